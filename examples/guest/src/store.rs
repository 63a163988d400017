//! The key-value store's pure parts: the open-addressing table in RAM and the 512-byte write-ahead log
//! record format. No I/O and no crate imports, so the host's tests compile this file too and check it
//! against a `HashMap` model.

/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VAL: usize = 255;
const SLOTS: usize = 4096;
const MAX_KEYS: usize = SLOTS * 3 / 4;
const REC_MAGIC: u32 = 0x4c41_5743; // "CWAL"
/// WAL operation: set.
pub const OP_SET: u8 = 1;
/// WAL operation: delete.
pub const OP_DEL: u8 = 2;

#[derive(Clone, Copy)]
struct Entry {
    state: u8, // 0 empty, 1 used, 2 deleted
    klen: u8,
    vlen: u8,
    key: [u8; MAX_KEY],
    val: [u8; MAX_VAL],
}

const EMPTY: Entry = Entry {
    state: 0,
    klen: 0,
    vlen: 0,
    key: [0; MAX_KEY],
    val: [0; MAX_VAL],
};

/// The table.
pub struct Table {
    slots: [Entry; SLOTS],
    keys: usize,
}

fn hash(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h as usize
}

/// Why a change was refused.
#[derive(Debug, Clone, Copy)]
pub enum KvError {
    /// Key empty or too long.
    BadKey,
    /// Value too long.
    BadValue,
    /// The table is full.
    Full,
}

impl Table {
    /// An empty table (for a zeroed static).
    pub const fn new() -> Self {
        Self {
            slots: [EMPTY; SLOTS],
            keys: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys
    }

    fn find(&self, key: &[u8]) -> Result<usize, Option<usize>> {
        let mut i = hash(key) % SLOTS;
        let mut free = None;
        for _ in 0..SLOTS {
            let e = &self.slots[i];
            match e.state {
                0 => return Err(free.or(Some(i))),
                1 if &e.key[..usize::from(e.klen)] == key => return Ok(i),
                2 if free.is_none() => free = Some(i),
                _ => {}
            }
            i = (i + 1) % SLOTS;
        }
        Err(free)
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key)
            .ok()
            .map(|i| &self.slots[i].val[..usize::from(self.slots[i].vlen)])
    }

    /// Check that `set(key, val)` would succeed.
    pub fn can_set(&self, key: &[u8], val: &[u8]) -> Result<(), KvError> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(KvError::BadKey);
        }
        if val.len() > MAX_VAL {
            return Err(KvError::BadValue);
        }
        if self.find(key).is_err() && self.keys >= MAX_KEYS {
            return Err(KvError::Full);
        }
        Ok(())
    }

    /// Insert or replace.
    pub fn set(&mut self, key: &[u8], val: &[u8]) -> Result<(), KvError> {
        self.can_set(key, val)?;
        let i = match self.find(key) {
            Ok(i) => i,
            Err(Some(i)) => {
                self.keys += 1;
                i
            }
            Err(None) => return Err(KvError::Full),
        };
        let e = &mut self.slots[i];
        e.state = 1;
        e.klen = key.len() as u8;
        e.key[..key.len()].copy_from_slice(key);
        e.vlen = val.len() as u8;
        e.val[..val.len()].copy_from_slice(val);
        Ok(())
    }

    /// Remove; true if the key existed.
    pub fn del(&mut self, key: &[u8]) -> bool {
        match self.find(key) {
            Ok(i) => {
                self.slots[i].state = 2;
                self.keys -= 1;
                true
            }
            Err(_) => false,
        }
    }
}

/// CRC-32 (IEEE), bitwise: the WAL is small.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Write one record into a 512-byte sector buffer.
pub fn encode_record(sector: &mut [u8], seq: u64, op: u8, key: &[u8], val: &[u8]) {
    sector.fill(0);
    sector[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    sector[4] = op;
    sector[5] = key.len() as u8;
    sector[6] = val.len() as u8;
    sector[8..16].copy_from_slice(&seq.to_le_bytes());
    sector[16..16 + key.len()].copy_from_slice(key);
    sector[16 + key.len()..16 + key.len() + val.len()].copy_from_slice(val);
    let crc = crc32(&sector[..508]);
    sector[508..512].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded record, borrowing from its sector.
pub struct Record<'a> {
    /// Sequence number (1, 2, ...).
    pub seq: u64,
    /// OP_SET or OP_DEL.
    pub op: u8,
    /// Key.
    pub key: &'a [u8],
    /// Value (empty for deletes).
    pub val: &'a [u8],
}

/// Decode a record; None if the sector holds none (end of log).
pub fn decode_record(sector: &[u8]) -> Option<Record<'_>> {
    if sector.len() < 512 || sector[0..4] != REC_MAGIC.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes([sector[508], sector[509], sector[510], sector[511]]);
    if crc != crc32(&sector[..508]) {
        return None;
    }
    let (op, klen, vlen) = (sector[4], usize::from(sector[5]), usize::from(sector[6]));
    if klen > MAX_KEY || 16 + klen + vlen > 508 || (op != OP_SET && op != OP_DEL) {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&sector[8..16]);
    Some(Record {
        seq: u64::from_le_bytes(seq),
        op,
        key: &sector[16..16 + klen],
        val: &sector[16 + klen..16 + klen + vlen],
    })
}
