//! Transports. Each moves bytes for requests the selection policy assigned to it.
//!
//! - `local`: the peer is this engine; a copy within the process (in `engine.rs`).
//! - `shm`: same host; the target's memfd is mapped once and copied into directly.
//! - `nvlink` (and `mnnvl`): same host (same fabric), the peer's device memory imported and
//!   copied by our GPU; asynchronous, completed by the GPU completion thread.
//! - `tcp`: pooled connections (lanes) to the peer's RPC/data port.
//!
//! Memory transports (local, shm) complete inside `submit`: a copy is bounded CPU work with
//! nothing to wait for. TCP is asynchronous: lane threads send and complete chunks.

pub(crate) mod lease;
pub(crate) mod memory;
pub(crate) mod nvlink;
pub(crate) mod shm;
pub(crate) mod tcp;
