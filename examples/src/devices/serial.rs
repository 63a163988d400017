//! Serial console: the guest writes bytes to a port (`rep outsb`, one exit per string); complete lines go to
//! the log and to an optional sink.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest partial line kept before it is emitted anyway.
pub const MAX_LINE: usize = 1024;

/// Saved serial console state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SerialState {
    /// Bytes of the current, unfinished line.
    pub partial: Vec<u8>,
    /// Bytes written since boot.
    pub bytes: u64,
    /// Lines written since boot.
    pub lines: u64,
}

/// Receives each complete console line.
pub type ConsoleSink = Box<dyn FnMut(&str) + Send>;

/// The serial console device.
pub struct Serial {
    state: SerialState,
    sink: Option<ConsoleSink>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Default for Serial {
    fn default() -> Self {
        Self::new()
    }
}

impl Serial {
    /// A console that logs lines with `tracing`.
    pub fn new() -> Self {
        Self {
            state: SerialState::default(),
            sink: None,
        }
    }

    /// Also hand every complete line to `sink`.
    pub fn set_sink(&mut self, sink: ConsoleSink) {
        self.sink = Some(sink);
    }

    /// The guest wrote `data`.
    pub fn write(&mut self, data: &[u8]) {
        self.state.bytes += data.len() as u64;
        for &b in data {
            if b == b'\n' || self.state.partial.len() >= MAX_LINE {
                self.emit();
                if b == b'\n' {
                    continue;
                }
            }
            self.state.partial.push(b);
        }
    }

    fn emit(&mut self) {
        let line = String::from_utf8_lossy(&self.state.partial).into_owned();
        self.state.partial.clear();
        self.state.lines += 1;
        tracing::info!(target: "guest", "{line}");
        if let Some(sink) = &mut self.sink {
            sink(&line);
        }
    }

    /// The current state.
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }

    /// Replace the state (the sink stays).
    pub fn restore(&mut self, state: &SerialState) -> Result<()> {
        if state.partial.len() > MAX_LINE {
            return Err(Error::state(
                "serial",
                format!("partial line of {} bytes", state.partial.len()),
            ));
        }
        self.state = state.clone();
        Ok(())
    }

    /// A new console with this state.
    pub fn from_state(state: &SerialState) -> Result<Self> {
        let mut s = Self::new();
        s.restore(state)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn lines_are_split_and_state_round_trips_into_fresh_and_running_consoles() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut s = Serial::new();
        let seen2 = seen.clone();
        s.set_sink(Box::new(move |l| seen2.lock().unwrap().push(l.to_string())));
        s.write(b"hello\nwor");
        let st = s.state();
        assert_eq!(st.partial, b"wor");
        let bytes = crate::devices::encode("serial", &st).unwrap();
        let st2: SerialState = crate::devices::decode("serial", &bytes).unwrap();
        assert_eq!(st, st2);
        for _ in 0..3 {
            let mut fresh = Serial::from_state(&st2).unwrap();
            fresh.write(b"ld\n");
            assert_eq!(fresh.state().lines, 2);
            s.restore(&st2).unwrap();
        }
        s.write(b"ld\n");
        assert_eq!(*seen.lock().unwrap(), ["hello", "world"]);
        let bad = SerialState {
            partial: vec![b'x'; MAX_LINE + 1],
            ..st
        };
        assert!(Serial::from_state(&bad).is_err());
    }
}
