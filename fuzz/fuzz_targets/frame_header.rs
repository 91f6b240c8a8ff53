//! Frame headers arrive from the network: decoding must never panic, and whatever decodes
//! must re-encode to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tidewire_core::wire::{Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.first_chunk::<HEADER_LEN>() else { return };
    if let Ok(h) = Header::decode(raw) {
        assert_eq!(&h.encode(), raw);
        assert!(h.payload_len() <= h.kind.payload_limit());
    }
});
