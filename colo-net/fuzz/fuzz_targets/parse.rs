//! Any bytes: the packet view never panics, and the fast path agrees with etherparse.
#![no_main]

use colo_net::PacketView;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&v, frame)) = data.split_first() else {
        return;
    };
    let vnet = usize::from(v % 16);
    let fast = PacketView::parse(frame, vnet);
    let general = PacketView::parse_general(frame, vnet);
    match (&fast, &general) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("fast {fast:?} vs general {general:?}"),
    }
    if let Ok(view) = fast {
        // Every accessor stays inside the buffer.
        let _ = (
            view.tcp_payload(),
            view.tcp_options(),
            view.layout(),
            colo_net::FlowKey::of(&view),
        );
        let l = view.layout();
        assert!(l.ip_end as usize <= frame.len());
    }
});
