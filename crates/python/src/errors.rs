//! The Python exception hierarchy, created once, and the one exhaustive mapping from engine
//! errors to it.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    tidewire._native,
    TidewireError,
    PyException,
    "Base class of every tidewire error."
);
create_exception!(
    tidewire._native,
    ConfigError,
    TidewireError,
    "Invalid or contradictory configuration."
);
create_exception!(tidewire._native, InvalidArgument, TidewireError, "The API was called wrongly.");
create_exception!(tidewire._native, BindError, TidewireError, "No RPC port could be bound.");
create_exception!(
    tidewire._native,
    MetadataError,
    TidewireError,
    "The metadata backend failed or is unreachable."
);
create_exception!(
    tidewire._native,
    SegmentNotFound,
    TidewireError,
    "No segment is published under this name."
);
create_exception!(tidewire._native, PeerUnreachable, TidewireError, "A peer could not be reached.");
create_exception!(
    tidewire._native,
    PeerFailed,
    TidewireError,
    "A peer's connection failed with requests in flight."
);
create_exception!(
    tidewire._native,
    RemoteAccessDenied,
    TidewireError,
    "The peer refused a range outside its registered memory."
);
create_exception!(
    tidewire._native,
    NotRegistered,
    TidewireError,
    "A local range is not inside a registered region."
);
create_exception!(
    tidewire._native,
    RegistrationError,
    TidewireError,
    "A registration overlaps another or contradicts its location hint."
);
create_exception!(
    tidewire._native,
    NoTransport,
    TidewireError,
    "No transport can serve a request."
);
create_exception!(tidewire._native, Timeout, TidewireError, "A deadline passed.");
create_exception!(tidewire._native, Cancelled, TidewireError, "The batch was cancelled.");
create_exception!(
    tidewire._native,
    ShuttingDown,
    TidewireError,
    "The engine or the peer is shutting down."
);
create_exception!(
    tidewire._native,
    ProtocolError,
    TidewireError,
    "A peer spoke the protocol wrongly."
);
create_exception!(tidewire._native, OsError, TidewireError, "An operating-system call failed.");
create_exception!(tidewire._native, InternalError, TidewireError, "A bug in tidewire.");

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
        E::Internal(_) => InternalError::new_err(msg),
        _ => TidewireError::new_err(msg),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("TidewireError", py.get_type::<TidewireError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("BindError", py.get_type::<BindError>())?;
    m.add("MetadataError", py.get_type::<MetadataError>())?;
    m.add("SegmentNotFound", py.get_type::<SegmentNotFound>())?;
    m.add("PeerUnreachable", py.get_type::<PeerUnreachable>())?;
    m.add("PeerFailed", py.get_type::<PeerFailed>())?;
    m.add("RemoteAccessDenied", py.get_type::<RemoteAccessDenied>())?;
    m.add("NotRegistered", py.get_type::<NotRegistered>())?;
    m.add("RegistrationError", py.get_type::<RegistrationError>())?;
    m.add("NoTransport", py.get_type::<NoTransport>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("Cancelled", py.get_type::<Cancelled>())?;
    m.add("ShuttingDown", py.get_type::<ShuttingDown>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("OsError", py.get_type::<OsError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    Ok(())
}
