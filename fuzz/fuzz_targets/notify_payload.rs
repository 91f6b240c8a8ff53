//! Notification payloads (length-prefixed strings) arrive from peers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tidewire_core::wire::{decode_strings, encode_strings};

fuzz_target!(|data: &[u8]| {
    if let Ok(parts) = decode_strings::<3>(data) {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        assert_eq!(encode_strings(&refs), data);
    }
});
