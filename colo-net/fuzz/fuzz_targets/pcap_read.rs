//! Any bytes: the pcap reader returns records or a typed error, never panics or over-allocates.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cap) = colo_net::pcap::read(data, 10_000) {
        for r in &cap.records {
            assert!(r.data.len() <= data.len());
        }
    }
});
