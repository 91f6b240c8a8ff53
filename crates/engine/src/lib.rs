//! tidewire: a one-sided (READ / WRITE) transfer engine for LLM serving.
//!
//! An [`Engine`] owns this process's registered memory, an RPC/data endpoint, a metadata
//! backend and the transports (`local`, `shm`, `tcp`). Peers are opened by segment name;
//! batches of requests are submitted without blocking and complete with a status per request,
//! within a deadline, with a reason on every failure.
//!
//! ```no_run
//! use tidewire::{Engine, EngineConfig, HostBuffer, Op, Request, BatchOptions};
//! # fn main() -> Result<(), tidewire::Error> {
//! let target = Engine::new(EngineConfig::default())?;
//! let remote = target.allocate_shared(1 << 20)?;
//! let initiator = Engine::new(EngineConfig::default())?;
//! let buf = HostBuffer::new(1 << 20)?;
//! // SAFETY: `buf` outlives its registration (it is unregistered at shutdown, before drop).
//! unsafe { initiator.register(buf.addr(), buf.len() as u64, "cpu")? };
//! let peer = initiator.open_segment(target.name())?;
//! let req = Request { op: Op::Write, local: buf.addr(), len: 4096, peer, remote };
//! initiator.submit(&[req], BatchOptions::default())?.wait()?;
//! # Ok(()) }
//! ```
//!
//! What it never does: retry without a bound, fall back to another transport silently, or
//! touch memory outside registered regions.
#![deny(unsafe_code)]

mod batch;
mod config;
mod engine;
mod epoll;
mod error;
pub mod fabric;
mod frames;
mod guard;
mod hostinfo;
mod lifecycle;
mod liveness;
mod mapped;
mod mem;
mod metadata;
mod metadata_server;
pub mod metrics;
mod notify;
mod paged;
mod peer;
mod peers;
mod plan;
mod reactor;
mod registry;
mod request;
mod rpc;
mod trace;
mod transport;
mod watch;

pub use batch::{BatchHandle, RequestStatus, Timings};
pub use config::{secret_from_file, Deadlines, EngineConfig, MetadataUri};
pub use engine::{
    BatchOptions, DeathCheck, Engine, Op, PeerInfo, PeerState, PeerStatus, Request, TransportReport,
};
pub use error::{Error, ErrorKind, PeerRef, Result};
pub use mapped::MappedPeer;
pub use mem::HostBuffer;
pub use metadata::{segment_key, segments_prefix, MetadataClient};
pub use metadata_server::MetadataServer;
pub use notify::Notification;
pub use paged::PageTransfer;
pub use peers::{PeerBuffer, PeerBuffers, PeersError};
pub use plan::Plan;
pub use tidewire_core as core;
pub use tidewire_core::auth::ClusterSecret;
pub use tidewire_core::{BatchId, PeerId, RegionId};
pub use tidewire_gpu as gpu;
pub use transport::fabric::FabricMap;
