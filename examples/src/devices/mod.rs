//! The mini-VMM's devices. Each has a plain, serialisable state struct, `state()` to take it and
//! `from_state()` / `restore()` to load it after validation; a state loads any number of times into a fresh
//! or a running device.

pub mod backend;
pub mod block;
pub mod nic;
pub mod serial;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest encoded device state accepted.
pub const MAX_DEVICE_STATE: usize = 64 << 10;

/// Encode a device state.
pub fn encode<T: Serialize>(what: &'static str, state: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| Error::state(what, format!("encode: {e}")))
}

/// Decode a device state, bounded in size and exact in length.
pub fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T> {
    if bytes.len() > MAX_DEVICE_STATE {
        return Err(Error::state(what, format!("{} bytes is too large", bytes.len())));
    }
    let cfg = bincode::config::standard().with_limit::<MAX_DEVICE_STATE>();
    let (s, used) = bincode::serde::decode_from_slice(bytes, cfg)
        .map_err(|e| Error::state(what, format!("decode: {e}")))?;
    if used != bytes.len() {
        return Err(Error::state(
            what,
            format!("{} trailing bytes", bytes.len() - used),
        ));
    }
    Ok(s)
}

/// The state of all devices, saved and loaded together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// Serial console.
    pub serial: serial::SerialState,
    /// NIC.
    pub nic: nic::NicState,
    /// Block device.
    pub block: block::BlockState,
}
