//! The revocation channel to a peer that shares no host with us (mnnvl): before a GPU copy
//! into one of its regions is enqueued, an `Enter` frame marks the copy in flight in the
//! owner's process (refused once the region is unregistered); a `Leave` frame clears the mark
//! when the copy completed. The owner's `unregister` waits for the marks, bounded by its
//! deadline, and a connection that closes releases its marks (its peer is gone).
//! Same-host peers use the shared revocation page instead (`shm.rs`), which costs no round
//! trip; `TIDEWIRE_NVLINK_LEASE=rpc` makes them use this channel too, so that it is exercised
//! on one host.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;
use tidewire_core::select::TransportKind;
use tidewire_core::wire::{FrameKind, Header, Status};
use tidewire_core::{InstanceId, RegionId};

use crate::config::Deadlines;
use crate::error::{Error, Result};
use crate::transport::tcp;

/// True when same-host peers must use this channel too (`TIDEWIRE_NVLINK_LEASE=rpc`).
pub(crate) fn forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("TIDEWIRE_NVLINK_LEASE").is_ok_and(|v| v == "rpc"))
}

/// One connection to the owner's RPC port carrying `Enter` / `Leave` round trips.
pub(crate) struct LeaseConn {
    peer: String,
    /// The transport the copies it guards go by (mnnvl across hosts), for errors.
    transport: TransportKind,
    addr: SocketAddr,
    instance: InstanceId,
    deadlines: Deadlines,
    /// `None` after a failure: the owner released our marks when it saw the connection close.
    stream: Mutex<Option<TcpStream>>,
    /// A fresh tag per frame: the owner takes a repeated frame for a duplicate.
    next_tag: AtomicU64,
}

impl LeaseConn {
    pub(crate) fn connect(
        peer: &str,
        transport: TransportKind,
        addr: SocketAddr,
        instance: InstanceId,
        deadlines: &Deadlines,
    ) -> Result<Self> {
        let stream = Self::open(peer, addr, instance, deadlines)?;
        Ok(Self {
            peer: peer.into(),
            transport,
            addr,
            instance,
            deadlines: *deadlines,
            stream: Mutex::new(Some(stream)),
            next_tag: AtomicU64::new(1),
        })
    }

    fn open(
        peer: &str,
        addr: SocketAddr,
        instance: InstanceId,
        deadlines: &Deadlines,
    ) -> Result<TcpStream> {
        let (stream, found) = tcp::handshake(peer, addr, Some(instance), deadlines)?;
        if found != instance {
            return Err(Error::PeerUnreachable {
                peer: peer.into(),
                reason: format!("the peer restarted (instance {found}, expected {instance})"),
            });
        }
        Ok(stream)
    }

    /// The connection's descriptor while it is open (for the peer watcher: the owner's
    /// process exiting hangs it up).
    pub(crate) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.stream.lock().as_ref().map(|s| s.as_raw_fd())
    }

    fn failed(&self, reason: String) -> Error {
        let reason = format!("the revocation channel to the peer failed: {reason}");
        Error::PeerFailed { peer: self.peer.clone(), transport: self.transport, reason }
    }

    /// One round trip; a failed one closes the connection.
    fn call(&self, kind: FrameKind, id: RegionId, reopen: bool) -> Result<Status> {
        let mut slot = self.stream.lock();
        if slot.is_none() && reopen {
            *slot = Some(Self::open(&self.peer, self.addr, self.instance, &self.deadlines)?);
        }
        let Some(stream) = slot.as_ref() else {
            return Err(self.failed("the revocation channel closed".into()));
        };
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let frame = Header::new(kind, tag, id.0, 0).encode();
        match tcp::exchange(stream, &frame) {
            Ok((h, _)) if h.addr == id.0 => Ok(h.status),
            Ok((h, _)) => {
                *slot = None;
                Err(self.failed(format!("{kind:?} for {id} answered for region#{}", h.addr)))
            }
            Err(e) => {
                *slot = None;
                Err(self.failed(format!("{kind:?} for {id}: {e}")))
            }
        }
    }

    /// Marks a copy into `id` in flight; `Ok(false)` when the owner unregistered it.
    pub(crate) fn enter(&self, id: RegionId) -> Result<bool> {
        match self.call(FrameKind::Enter, id, true)? {
            Status::Ok => Ok(true),
            Status::AccessDenied => Ok(false),
            other => Err(self.failed(format!("Enter for {id} answered {other:?}"))),
        }
    }

    /// Clears one mark of `id`. An error means the owner is unreachable (its marks are
    /// released on its side when it sees the connection close).
    pub(crate) fn leave(&self, id: RegionId) -> Result<()> {
        match self.call(FrameKind::Leave, id, false)? {
            Status::Ok => Ok(()),
            other => Err(self.failed(format!("Leave for {id} answered {other:?}"))),
        }
    }
}
