//! The shm socket's 9-byte control messages arrive from another process: decoding must never
//! panic; a request that decodes re-encodes to the same bytes, an answer to an equal answer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tidewire_core::shmwire::{ShmAnswer, ShmRequest, SHM_MESSAGE_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.first_chunk::<SHM_MESSAGE_LEN>() else { return };
    if let Ok(r) = ShmRequest::decode(raw) {
        assert_eq!(&r.encode(), raw);
    }
    let a = ShmAnswer::decode(raw);
    assert_eq!(ShmAnswer::decode(&a.encode()), a);
    if let ShmAnswer::Granted { .. } = a {
        assert_eq!(&a.encode(), raw);
    }
});
