//! Redis replies arrive from a metadata server: decoding must never panic, stay within its
//! limits, and whatever decodes must re-encode to bytes that decode to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tidewire_core::resp::{decode, Limits};

fuzz_target!(|data: &[u8]| {
    let tight =
        Limits { max_depth: 4, max_bulk: 64, max_elements: 8, max_line: 32, max_reply: 512 };
    for limits in [Limits::default(), tight] {
        match decode(data, &limits) {
            Ok(Some((value, used))) => {
                assert!(used <= data.len() && used <= limits.max_reply);
                let mut again = Vec::new();
                value.encode(&mut again).expect("a decoded value re-encodes");
                assert_eq!(decode(&again, &limits), Ok(Some((value, again.len()))));
            }
            Ok(None) => assert!(data.len() < limits.max_reply),
            Err(_) => {}
        }
    }
});
