//! The EP layer's errors.

/// What an EP buffer can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A shape the kernels cannot run, or that does not fit the buffer.
    #[error("EP shape: {0}")]
    Shape(String),
    /// The engine refused something (allocation, a peer, a mapping).
    #[error("{context}: {source}")]
    Engine { context: String, source: tidewire::Error },
    /// The GPU driver failed (kernel compilation, loading, a launch).
    #[error("{context}: {source}")]
    Gpu { context: String, source: tidewire_gpu::GpuError },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<tidewire::PeersError> for Error {
    fn from(e: tidewire::PeersError) -> Self {
        Error::Engine { context: e.context, source: e.source }
    }
}
