//! The Python exception hierarchy, created once, and the one exhaustive mapping from engine
//! errors to it.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

/// Declares every exception class once: the class and its registration in the module.
macro_rules! exceptions {
    ($($name:ident($base:ty, $doc:literal)),* $(,)?) => {
        $(create_exception!(tidewire._native, $name, $base, $doc);)*

        /// Adds every exception class to the module.
        pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            $(m.add(stringify!($name), m.py().get_type::<$name>())?;)*
            Ok(())
        }
    };
}

exceptions! {
    TidewireError(PyException, "Base class of every tidewire error."),
    ConfigError(TidewireError, "Invalid or contradictory configuration."),
    InvalidArgument(TidewireError, "The API was called wrongly."),
    BindError(TidewireError, "No RPC port could be bound."),
    MetadataError(TidewireError, "The metadata backend failed or is unreachable."),
    SegmentNotFound(TidewireError, "No segment is published under this name."),
    PeerUnreachable(TidewireError, "A peer could not be reached."),
    PeerFailed(TidewireError, "A peer's connection failed with requests in flight."),
    RemoteAccessDenied(TidewireError, "The peer refused a range outside its registered memory."),
    NotRegistered(TidewireError, "A local range is not inside a registered region."),
    RegistrationError(TidewireError, "A registration overlaps another or contradicts its location hint."),
    NoTransport(TidewireError, "No transport can serve a request."),
    Timeout(TidewireError, "A deadline passed."),
    Cancelled(TidewireError, "The batch was cancelled."),
    ShuttingDown(TidewireError, "The engine or the peer is shutting down."),
    ProtocolError(TidewireError, "A peer spoke the protocol wrongly."),
    OsError(TidewireError, "An operating-system call failed."),
    GpuError(TidewireError, "The GPU driver failed (the message names the call and its error)."),
    StalePlan(TidewireError, "A prepared plan no longer holds (a peer restarted or died, a region was unregistered): prepare it again."),
    InternalError(TidewireError, "A bug in tidewire."),
}

pub(crate) fn invalid(msg: String) -> PyErr {
    InvalidArgument::new_err(msg)
}

/// Maps an engine error to its Python exception, keeping the message. Exhaustive over
/// `ErrorKind`: a new kind does not compile here until it is mapped.
pub(crate) fn to_py(e: tidewire::Error) -> PyErr {
    use tidewire::ErrorKind as K;
    let msg = e.to_string();
    match e.kind() {
        K::Config => ConfigError::new_err(msg),
        K::InvalidArgument => InvalidArgument::new_err(msg),
        K::Bind => BindError::new_err(msg),
        K::Metadata | K::NameInUse => MetadataError::new_err(msg),
        K::SegmentNotFound => SegmentNotFound::new_err(msg),
        K::PeerUnreachable => PeerUnreachable::new_err(msg),
        K::PeerFailed => PeerFailed::new_err(msg),
        K::RemoteAccessDenied => RemoteAccessDenied::new_err(msg),
        K::NotRegistered => NotRegistered::new_err(msg),
        K::Registration => RegistrationError::new_err(msg),
        K::NoTransport => NoTransport::new_err(msg),
        K::Timeout => Timeout::new_err(msg),
        K::Cancelled => Cancelled::new_err(msg),
        K::ShuttingDown => ShuttingDown::new_err(msg),
        K::Decode | K::Protocol => ProtocolError::new_err(msg),
        K::Io => OsError::new_err(msg),
        K::StalePlan => StalePlan::new_err(msg),
        K::Gpu => GpuError::new_err(msg),
        K::Internal => InternalError::new_err(msg),
    }
}
