//! Errors of the core crate: decoding bytes and documents that came from outside.

/// A failure to decode or validate data that arrived from a peer, a file or a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A frame header was malformed (bad magic, unknown kind, impossible length).
    #[error("malformed frame: {reason}")]
    Frame { reason: &'static str },
    /// A frame announced a payload larger than the protocol allows for its kind.
    #[error("frame of kind {kind} announces {len} payload bytes, more than the limit {limit}")]
    Oversized { kind: u8, len: u64, limit: u64 },
    /// A payload did not have the layout its frame kind requires.
    #[error("malformed {what} payload: {reason}")]
    Payload { what: &'static str, reason: String },
    /// A segment descriptor could not be parsed or failed validation.
    #[error("invalid segment descriptor: {reason}")]
    Descriptor { reason: String },
    /// A descriptor of a version this build does not understand.
    #[error("segment descriptor version {found} is not supported (this build reads {supported})")]
    DescriptorVersion { found: u32, supported: u32 },
    /// A location hint that could not be parsed.
    #[error("invalid location hint {hint:?}: expected \"*\", \"cpu\", \"cpu:N\" or \"cuda:N\"")]
    LocationHint { hint: String },
    /// Contradictory or invalid configuration.
    #[error("configuration error: {reason}")]
    Config { reason: String },
    /// Bytes from a Redis server that are not a RESP reply.
    #[error("malformed RESP reply at byte {offset}: {reason}")]
    Resp { offset: usize, reason: &'static str },
    /// A RESP reply beyond a decoder limit (nesting, bulk or array size, line or reply bytes).
    #[error("RESP reply at byte {offset}: {found} {what}, more than the limit {limit}")]
    RespLimit { offset: usize, what: &'static str, found: u64, limit: u64 },
    /// A request on the shm socket of a kind this build does not know.
    #[error("shm control request of unknown kind {kind} (for {region})")]
    ShmKind { kind: u8, region: crate::RegionId },
    /// A paged layout that is malformed.
    #[error("layout {name:?}: {reason}")]
    Layout { name: String, reason: String },
    /// Page index arrays that do not fit their layouts.
    #[error("page transfer: {reason}")]
    Pages { reason: String },
    /// A size string (for example `4KiB`) that could not be parsed.
    #[error("invalid size {text:?}: {reason}")]
    Size { text: String, reason: &'static str },
}
