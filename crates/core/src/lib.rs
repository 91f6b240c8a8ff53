//! tidewire-core: the deterministic heart of tidewire.
//!
//! This crate holds the types every other crate shares (ids, memory kinds, segment
//! descriptors), the wire codecs (the RPC/data protocol, the shm socket's control messages,
//! Redis replies), the transport-selection policy and the batch state machine.
//!
//! It never does I/O: no sockets, no threads, no clocks, no FFI. Every time-dependent method
//! takes `now: Instant` from the caller, so the state machines are tested with simulated time.
#![forbid(unsafe_code)]

pub mod auth;
pub mod batch;
pub mod descriptor;
pub mod error;
pub mod fabric;
pub mod handshake;
pub mod ids;
pub mod lease;
pub mod memory;
pub mod paged;
pub mod resp;
pub mod select;
pub mod shmwire;
#[cfg(test)]
mod sim;
pub mod size;
pub mod stall;
pub mod wire;

pub use error::CoreError;
pub use ids::{BatchId, HostId, InstanceId, PeerId, RegionId};
