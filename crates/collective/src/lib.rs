//! tidewire collectives: the communicator behind the `torch.distributed` backend.
//!
//! A group's ranks exchange their engines' names and a receive region each through the
//! group's store (the caller's job); [`Comm::connect`] maps every rank's ring for us and the
//! collectives run on the caller's thread with the group's timeout. The algorithms' schedules
//! are plain functions (`plan`), the reductions work on bytes (`dtype`).

mod comm;
pub mod cuda;
mod dtype;
pub mod elastic;
mod error;
pub mod membership;
mod pipes;
pub mod plan;

pub use comm::{Comm, OpId, PeerInfo, Region};
pub use cuda::{CudaComm, CudaOp, Gate};
pub use dtype::{finish_avg, reduce_into, DType, ReduceOp};
pub use error::{record, Error, Result};
