//! The engine's error type: one variant per failure class, with the context as fields.

use std::time::Duration;

use tidewire_core::select::TransportKind;
use tidewire_core::wire::Status;
use tidewire_core::{BatchId, CoreError};

/// Everything the engine can fail with. Cloneable, because one failure (a peer dying) is
/// reported to every request it affects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Invalid or contradictory configuration.
    #[error("configuration error: {reason}")]
    Config { reason: String },
    /// Bytes or a document from outside failed to decode.
    #[error(transparent)]
    Decode(#[from] CoreError),
    /// No port could be bound.
    #[error("could not bind {addr}: {reason}")]
    Bind { addr: String, reason: String },
    /// The metadata backend could not be reached.
    #[error("metadata server {uri} unreachable: {reason}")]
    MetadataUnreachable { uri: String, reason: String },
    /// The metadata backend answered something unexpected.
    #[error("metadata server {uri}, key {key:?}: {reason}")]
    Metadata { uri: String, key: String, reason: String },
    /// Another live engine already publishes this segment name.
    #[error("segment name {name:?} is already used by a live engine at {rpc_addr}")]
    NameInUse { name: String, rpc_addr: String },
    /// No descriptor is published under this name.
    #[error("segment {name:?} not found")]
    SegmentNotFound { name: String },
    /// The peer could not be reached or handshaken with.
    #[error("peer {peer} unreachable: {reason}")]
    PeerUnreachable { peer: String, reason: String },
    /// The connection to a peer failed while requests were in flight.
    #[error("peer {peer} failed on {transport}: {reason}")]
    PeerFailed { peer: String, transport: TransportKind, reason: String },
    /// The peer refused the access: the range is not inside its registered memory.
    #[error("peer {peer} denied access to [{addr:#x}, +{len}): {reason}")]
    RemoteAccessDenied { peer: String, addr: u64, len: u64, reason: String },
    /// A local range is not inside a registered region.
    #[error("local range [{addr:#x}, +{len}) is not inside a registered region")]
    NotRegistered { addr: u64, len: u64 },
    /// A registration overlaps an existing one.
    #[error(
        "[{addr:#x}, +{len}) overlaps the registered region [{existing_addr:#x}, +{existing_len})"
    )]
    Overlap { addr: u64, len: u64, existing_addr: u64, existing_len: u64 },
    /// A location hint contradicts what the pointer is.
    #[error("registration of {addr:#x}: {detail}")]
    LocationMismatch { addr: u64, detail: String },
    /// No transport can serve a request.
    #[error("no transport reaches [{addr:#x}, +{len}) on peer {peer}: {refusals}")]
    NoTransport { peer: String, addr: u64, len: u64, refusals: String },
    /// A deadline passed.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// The batch was cancelled by the caller.
    #[error("{batch} was cancelled")]
    Cancelled { batch: BatchId },
    /// The engine (or the peer) is shutting down.
    #[error("{who} is shutting down")]
    ShuttingDown { who: String },
    /// The peer spoke the protocol wrongly.
    #[error("protocol error with {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    /// An operating-system call failed.
    #[error("{context}: {message}")]
    Io { context: String, kind: std::io::ErrorKind, message: String },
    /// A prepared plan no longer holds: a peer of it restarted or died, or a local region of
    /// it was unregistered. Nothing moved; prepare it again.
    #[error("stale plan: {reason}")]
    StalePlan { reason: String },
    /// The caller used the API wrongly.
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// Cannot happen: a bug in tidewire.
    #[error("internal error (a bug): {0}")]
    Internal(&'static str),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, e: &std::io::Error) -> Self {
        Self::Io { context: context.into(), kind: e.kind(), message: e.to_string() }
    }

    /// The error for a non-Ok wire status from `peer` about `[addr, +len)`. The one place
    /// where wire statuses become errors.
    pub(crate) fn from_status(status: Status, peer: &str, addr: u64, len: u64) -> Self {
        match status {
            Status::AccessDenied => Self::RemoteAccessDenied {
                peer: peer.into(),
                addr,
                len,
                reason: "outside the target's registered memory".into(),
            },
            Status::ShuttingDown => Self::ShuttingDown { who: format!("peer {peer}") },
            Status::BadRequest => {
                Self::Protocol { peer: peer.into(), reason: "the peer rejected the request".into() }
            }
            Status::Ok | Status::Internal => Self::PeerFailed {
                peer: peer.into(),
                transport: TransportKind::Tcp,
                reason: "the peer reported an internal error".into(),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
