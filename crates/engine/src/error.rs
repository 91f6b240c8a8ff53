//! The engine's error type: one variant per failure class, with the context as fields.

use std::time::Duration;

use tidewire_core::select::{describe_refusals, Refusal, TransportKind};
use tidewire_core::wire::Status;
use tidewire_core::{BatchId, CoreError, PeerId};

/// The peer an error is about: its handle from `open_segment` (none while it is being
/// opened, or for a lookup by name) and its segment name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerRef {
    pub id: Option<PeerId>,
    pub name: String,
}

impl PeerRef {
    /// A peer known by name only (no handle yet).
    pub fn named(name: impl Into<String>) -> Self {
        Self { id: None, name: name.into() }
    }
}

impl std::fmt::Display for PeerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(f, "{} ({id})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

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
    PeerUnreachable { peer: PeerRef, reason: String },
    /// The connection to a peer failed while requests were in flight.
    #[error("peer {peer} failed on {transport}: {reason}")]
    PeerFailed { peer: PeerRef, transport: TransportKind, reason: String },
    /// The peer refused the access: the range is not inside its registered memory.
    #[error("peer {peer} denied access to [{addr:#x}, +{len}): {reason}")]
    RemoteAccessDenied { peer: PeerRef, addr: u64, len: u64, reason: String },
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
    /// No transport can serve a request: each one considered, and why it refused.
    #[error("no transport reaches [{addr:#x}, +{len}) on peer {peer}: {}", describe_refusals(.refusals))]
    NoTransport { peer: PeerRef, addr: u64, len: u64, refusals: Vec<Refusal> },
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
    Protocol { peer: PeerRef, reason: String },
    /// An operating-system call failed.
    #[error("{context}: {message}")]
    Io { context: String, kind: std::io::ErrorKind, message: String },
    /// A prepared plan no longer holds: a peer of it restarted or died, or a local region of
    /// it was unregistered. Nothing moved; prepare it again.
    #[error("stale plan: {reason}")]
    StalePlan { reason: String },
    /// The GPU driver (or NVML, NVRTC) failed; `source` names the call and its error.
    #[error("{context}: {source}")]
    Gpu { context: String, source: tidewire_gpu::GpuError },
    /// The caller used the API wrongly.
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// Cannot happen: a bug in tidewire.
    #[error("internal error (a bug): {0}")]
    Internal(&'static str),
}

/// The class of an [`Error`], for mapping errors to other worlds (Python exceptions, Mooncake
/// return codes) with one exhaustive `match`: a new class fails to compile there until it is
/// mapped, rather than falling into a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Config,
    Decode,
    Bind,
    Metadata,
    NameInUse,
    SegmentNotFound,
    PeerUnreachable,
    PeerFailed,
    RemoteAccessDenied,
    NotRegistered,
    Registration,
    NoTransport,
    Timeout,
    Cancelled,
    ShuttingDown,
    Protocol,
    Io,
    StalePlan,
    Gpu,
    InvalidArgument,
    Internal,
}

impl Error {
    /// The error's class (exhaustive: every variant has one).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config { .. } => ErrorKind::Config,
            Self::Decode(_) => ErrorKind::Decode,
            Self::Bind { .. } => ErrorKind::Bind,
            Self::MetadataUnreachable { .. } | Self::Metadata { .. } => ErrorKind::Metadata,
            Self::NameInUse { .. } => ErrorKind::NameInUse,
            Self::SegmentNotFound { .. } => ErrorKind::SegmentNotFound,
            Self::PeerUnreachable { .. } => ErrorKind::PeerUnreachable,
            Self::PeerFailed { .. } => ErrorKind::PeerFailed,
            Self::RemoteAccessDenied { .. } => ErrorKind::RemoteAccessDenied,
            Self::NotRegistered { .. } => ErrorKind::NotRegistered,
            Self::Overlap { .. } | Self::LocationMismatch { .. } => ErrorKind::Registration,
            Self::NoTransport { .. } => ErrorKind::NoTransport,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Cancelled { .. } => ErrorKind::Cancelled,
            Self::ShuttingDown { .. } => ErrorKind::ShuttingDown,
            Self::Protocol { .. } => ErrorKind::Protocol,
            Self::Io { .. } => ErrorKind::Io,
            Self::StalePlan { .. } => ErrorKind::StalePlan,
            Self::Gpu { .. } => ErrorKind::Gpu,
            Self::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The error with its peer's handle filled in where it names the peer by name only (a
    /// descriptor fetched by name while re-opening peer `id`).
    pub(crate) fn for_peer(mut self, id: PeerId) -> Self {
        match &mut self {
            Self::PeerUnreachable { peer, .. }
            | Self::PeerFailed { peer, .. }
            | Self::RemoteAccessDenied { peer, .. }
            | Self::NoTransport { peer, .. }
            | Self::Protocol { peer, .. } => {
                peer.id.get_or_insert(id);
            }
            _ => {}
        }
        self
    }

    /// A GPU failure while doing `context`.
    pub fn gpu(context: impl Into<String>, source: tidewire_gpu::GpuError) -> Self {
        Self::Gpu { context: context.into(), source }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, e: &std::io::Error) -> Self {
        Self::Io { context: context.into(), kind: e.kind(), message: e.to_string() }
    }

    /// The error for a non-Ok wire status from `peer` about `[addr, +len)`. The one place
    /// where wire statuses become errors.
    pub(crate) fn from_status(status: Status, peer: &PeerRef, addr: u64, len: u64) -> Self {
        match status {
            Status::AccessDenied => Self::RemoteAccessDenied {
                peer: peer.clone(),
                addr,
                len,
                reason: "outside the target's registered memory".into(),
            },
            Status::ShuttingDown => Self::ShuttingDown { who: format!("peer {peer}") },
            Status::BadRequest => Self::Protocol {
                peer: peer.clone(),
                reason: "the peer rejected the request".into(),
            },
            Status::Ok | Status::Internal => Self::PeerFailed {
                peer: peer.clone(),
                transport: TransportKind::Tcp,
                reason: "the peer reported an internal error".into(),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_failures_keep_their_call_and_have_their_own_kind() {
        let source = tidewire_gpu::GpuError::Driver {
            call: "cuMemCreate",
            code: 2,
            name: "CUDA_ERROR_OUT_OF_MEMORY",
        };
        let e = Error::gpu("allocating 4096 bytes on cuda:1", source.clone());
        assert_eq!(e.kind(), ErrorKind::Gpu);
        let text = e.to_string();
        assert!(text.contains("cuda:1") && text.contains("cuMemCreate"), "{text}");
        assert!(matches!(e, Error::Gpu { source: s, .. } if s == source));
        let stale = Error::StalePlan { reason: "x".into() };
        assert_eq!(stale.kind(), ErrorKind::StalePlan);
        let overlap = Error::Overlap { addr: 0, len: 1, existing_addr: 0, existing_len: 1 };
        assert_eq!(overlap.kind(), ErrorKind::Registration);
    }
}
