//! The guest's key-value table and write-ahead-log record format, compiled for the host and checked
//! against naive models (a `HashMap`, crc32fast).

#[path = "../guest/src/store.rs"]
#[allow(dead_code)]
mod store;

use std::collections::HashMap;

use proptest::prelude::*;
use store::{KvError, MAX_KEY, MAX_VAL, OP_DEL, OP_SET, Table, crc32, decode_record, encode_record};

fn table() -> Box<Table> {
    // SAFETY: `Table` is plain bytes and integers; all zeroes is the empty table (`Table::new()`), and the
    // 1.3 MB table is too large to build on a test thread's stack first.
    unsafe {
        let layout = std::alloc::Layout::new::<Table>();
        let p = std::alloc::alloc_zeroed(layout).cast::<Table>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(p)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Set(String, String),
    Del(String),
}

fn key() -> impl Strategy<Value = String> {
    "[a-e]{1,3}"
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (key(), "[ -~]{0,40}").prop_map(|(k, v)| Op::Set(k, v)),
        1 => key().prop_map(Op::Del),
    ]
}

proptest! {
    #[test]
    fn table_matches_a_hashmap(ops in proptest::collection::vec(op(), 0..300)) {
        let mut t = table();
        let mut model: HashMap<String, String> = HashMap::new();
        for op in ops {
            match op {
                Op::Set(k, v) => {
                    t.set(k.as_bytes(), v.as_bytes()).unwrap();
                    model.insert(k, v);
                }
                Op::Del(k) => prop_assert_eq!(t.del(k.as_bytes()), model.remove(&k).is_some()),
            }
            prop_assert_eq!(t.len(), model.len());
        }
        for a in ["a", "b", "c", "d", "e"] {
            for b in ["", "a", "b", "c", "d", "e"] {
                for c in ["", "a", "e"] {
                    let k = format!("{a}{b}{c}");
                    prop_assert_eq!(t.get(k.as_bytes()), model.get(&k).map(|v| v.as_bytes()));
                }
            }
        }
    }

    #[test]
    fn records_round_trip_and_any_damaged_byte_is_detected(
        seq in any::<u64>(),
        del in any::<bool>(),
        key in proptest::collection::vec(any::<u8>(), 1..=MAX_KEY),
        val in proptest::collection::vec(any::<u8>(), 0..=MAX_VAL),
        at in 0usize..512,
        flip in 1u8..=255,
    ) {
        let op = if del { OP_DEL } else { OP_SET };
        let mut sector = [0u8; 512];
        encode_record(&mut sector, seq, op, &key, &val);
        let r = decode_record(&sector).unwrap();
        prop_assert_eq!((r.seq, r.op, r.key, r.val), (seq, op, &key[..], &val[..]));
        sector[at] ^= flip;
        prop_assert!(decode_record(&sector).is_none());
    }

    #[test]
    fn crc32_is_ieee(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        prop_assert_eq!(crc32(&data), crc32fast::hash(&data));
    }
}

#[test]
fn bad_keys_values_and_a_full_table_are_refused() {
    let mut t = table();
    assert!(matches!(t.set(b"", b"v"), Err(KvError::BadKey)));
    assert!(matches!(t.set(&[b'k'; MAX_KEY + 1], b"v"), Err(KvError::BadKey)));
    assert!(matches!(
        t.set(b"k", &[b'v'; MAX_VAL + 1]),
        Err(KvError::BadValue)
    ));
    let mut n = 0;
    while t.set(format!("key{n}").as_bytes(), b"v").is_ok() {
        n += 1;
    }
    assert_eq!(n, 3072, "three quarters of the 4096 slots");
    assert!(matches!(t.set(b"one-more", b"v"), Err(KvError::Full)));
    // Replacing an existing key still works when full; deleting makes room.
    t.set(b"key0", b"new").unwrap();
    assert_eq!(t.get(b"key0"), Some(&b"new"[..]));
    assert!(t.del(b"key1"));
    t.set(b"one-more", b"v").unwrap();
    assert!(decode_record(&[0u8; 512]).is_none());
    assert!(decode_record(&[0u8; 100]).is_none());
}
