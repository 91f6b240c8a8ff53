//! Segment descriptors arrive from peers and metadata servers: parsing must never panic, and
//! an accepted descriptor must round-trip and answer lookups without overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tidewire_core::descriptor::SegmentDescriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = SegmentDescriptor::from_json(data) {
        let again = SegmentDescriptor::from_json(&d.to_json()).expect("an accepted descriptor re-parses");
        assert_eq!(again, d);
        for r in &d.regions {
            assert_eq!(d.find_region(r.addr, r.len).map(|f| f.id), Some(r.id));
            let _ = d.find_region(r.addr.wrapping_add(r.len), 1);
        }
    }
});
