//! tidewire-ep: the expert-parallel buffer behind `tidewire.ep.Buffer` (low-latency dispatch
//! and combine, the Mooncake EP / DeepEP interface).
//!
//! Each rank allocates its buffer with the engine's transferable allocation
//! ([`Buffer::allocate`]), the ranks exchange `(engine name, address, length)` over the
//! caller's group, and [`Buffer::connect`] maps every other rank's buffer for our GPU
//! (`Engine::map_peer`: CUDA IPC or VMM POSIX-FD on one host, FABRIC where proven) and loads
//! the kernels (`tidewire_gpu::ep`). The layout arithmetic is plain code ([`layout`]).

mod buffer;
mod error;
pub mod layout;

pub use buffer::{Buffer, Call, CombineIo, DispatchOut};
pub use error::{Error, Result};
pub use layout::{size_hint, Layout};
pub use tidewire::PeerBuffer;
