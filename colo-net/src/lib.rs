//! `colo-net` decides whether the primary VM's and the secondary VM's network output still match, and so
//! when a COLO pair must checkpoint.
//!
//! In COLO both VMs run the same workload; only the primary's (PVM's) output reaches the client. The
//! client's frames are mirrored to the secondary (SVM). As long as both VMs send the same bytes, they may run
//! freely; the first difference means their states diverged, and a checkpoint copies the PVM onto the SVM.
//!
//! - [`packet`]: zero-copy, non-panicking views over Ethernet frames (etherparse underneath).
//! - [`flow`]: flow keys and the fast hasher of the connection tables.
//! - [`comparator`]: the primary side's [`Comparator`] — holds PVM frames until the SVM produced the same
//!   output, then releases them; requests checkpoints with a reason. The module docs say exactly what is
//!   compared.
//! - [`rewriter`]: the secondary side's [`Rewriter`] — keeps the SVM's TCP connections consistent with the
//!   client although the SVM chose different initial sequence numbers.
//! - [`build`]: frame builders for tests, benchmarks and examples.
//! - [`tcp`]: sequence arithmetic, option parsing, incremental checksums.
//! - [`pcap`] and [`replay`]: classic pcap files and the offline comparison `pcap_compare` runs.
//!
//! Everything is sans-IO: frames (`bytes::Bytes`) and the current [`Time`] go in, [`Action`]s come out.
//! The crate owns no socket, thread or clock. What it leaves to the VMM: moving frames between the guests'
//! NICs, the mirror and the client; running checkpoints when asked; passing the secondary's output through
//! the rewriter on the secondary host before sending it to the primary.
//!
//! ```
//! use bytes::Bytes;
//! use colo_net::{Action, Comparator, Config, Time};
//!
//! let mut cmp = Comparator::new(Config::default(), Time::ZERO).unwrap();
//! // The same UDP datagram from both VMs (Ethernet + IPv4 + UDP, "hi").
//! let frame = Bytes::from_static(&[
//!     2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, // Ethernet II
//!     0x45, 0, 0, 30, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1, // IPv4
//!     0x30, 0x39, 0x00, 0x35, 0, 10, 0, 0, b'h', b'i', // UDP
//! ]);
//! cmp.handle_primary(Time::from_millis(1), frame.clone()).unwrap();
//! assert_eq!(cmp.poll_action(), None); // held until the SVM produced the same datagram
//! cmp.handle_secondary(Time::from_millis(2), frame.clone());
//! assert_eq!(cmp.poll_action(), Some(Action::DropSecondary(frame.clone())));
//! assert_eq!(cmp.poll_action(), Some(Action::Release(frame)));
//! ```

#![warn(missing_docs)]

pub mod build;
pub mod comparator;
pub mod error;
pub mod flow;
pub mod packet;
pub mod pcap;
pub mod replay;
pub mod rewriter;
pub mod tcp;
pub mod time;

pub use comparator::{Action, Backpressure, CheckpointReason, Comparator, Config, MismatchKind, Side, Stats};
pub use error::NetError;
pub use flow::FlowKey;
pub use packet::PacketView;
pub use rewriter::{Rewriter, RewriterConfig};
pub use time::Time;
