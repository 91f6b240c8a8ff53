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
    StalePlan(TidewireError, "A prepared plan no longer holds (a peer restarted or died, a region was unregistered): prepare it again."),
    InternalError(TidewireError, "A bug in tidewire."),
}

pub(crate) fn invalid(msg: String) -> PyErr {
    InvalidArgument::new_err(msg)
}

/// Maps an engine error to its Python exception, keeping the message.
pub(crate) fn to_py(e: tidewire::Error) -> PyErr {
    use tidewire::Error as E;
    let msg = e.to_string();
    match e {
        E::Config { .. } => ConfigError::new_err(msg),
        E::InvalidArgument { .. } => InvalidArgument::new_err(msg),
        E::Bind { .. } => BindError::new_err(msg),
        E::MetadataUnreachable { .. } | E::Metadata { .. } | E::NameInUse { .. } => {
            MetadataError::new_err(msg)
        }
        E::SegmentNotFound { .. } => SegmentNotFound::new_err(msg),
        E::PeerUnreachable { .. } => PeerUnreachable::new_err(msg),
        E::PeerFailed { .. } => PeerFailed::new_err(msg),
        E::RemoteAccessDenied { .. } => RemoteAccessDenied::new_err(msg),
        E::NotRegistered { .. } => NotRegistered::new_err(msg),
        E::Overlap { .. } | E::LocationMismatch { .. } => RegistrationError::new_err(msg),
        E::NoTransport { .. } => NoTransport::new_err(msg),
        E::Timeout { .. } => Timeout::new_err(msg),
        E::Cancelled { .. } => Cancelled::new_err(msg),
        E::ShuttingDown { .. } => ShuttingDown::new_err(msg),
        E::Decode(_) | E::Protocol { .. } => ProtocolError::new_err(msg),
        E::Io { .. } => OsError::new_err(msg),
        E::StalePlan { .. } => StalePlan::new_err(msg),
        E::Internal(_) => InternalError::new_err(msg),
        _ => TidewireError::new_err(msg),
    }
}
