//! The revocation channel to a peer that shares no host with us (mnnvl): before a GPU copy
//! into one of its regions is enqueued, an `Enter` frame marks the copy in flight in the
//! owner's process (refused once the region is unregistered); a `Leave` frame clears the mark
//! when the copy completed. The owner's `unregister` waits for the marks, bounded by its
//! deadline, and a connection that closes releases its marks (its peer is gone).
//! Same-host peers use the shared revocation page instead (`shm.rs`), which costs no round
//! trip; `TIDEWIRE_NVLINK_LEASE=rpc` makes them use this channel too, so that it is exercised
//! on one host.
//!
//! The protocol is `tidewire_core::lease::LeaseClient`, a sans-io machine: each call has a
//! deadline (the handshake deadline), an answer that makes no sense or a call that times out
//! breaks the channel, and late or duplicated answers are ignored. This file only feeds it
//! the socket and the clock, on the calling thread: the caller needs the answer before it
//! enqueues its copy, so it waits for it, one call at a time per peer.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewire_core::lease::{CallId, LeaseClient, LeaseEvent, LeaseFailure, Mark};
use tidewire_core::select::TransportKind;
use tidewire_core::wire::FrameKind;
use tidewire_core::{InstanceId, RegionId};

use crate::config::{Credentials, Deadlines};
use crate::error::{Error, PeerRef, Result};
use crate::frames::would_block;
use crate::transport::tcp;

/// True when same-host peers must use this channel too (`TIDEWIRE_NVLINK_LEASE=rpc`).
pub(crate) fn forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("TIDEWIRE_NVLINK_LEASE").is_ok_and(|v| v == "rpc"))
}

/// An open channel: the connection and the machine speaking on it.
struct Channel {
    stream: TcpStream,
    client: LeaseClient,
    /// Marks held, per region (several copies into one region may be in flight).
    marks: HashMap<RegionId, Vec<Mark>>,
}

/// One connection to the owner's RPC port carrying `Enter` / `Leave` round trips.
pub(crate) struct LeaseConn {
    peer: PeerRef,
    /// The transport the copies it guards go by (mnnvl across hosts), for errors.
    transport: TransportKind,
    addr: SocketAddr,
    instance: InstanceId,
    deadlines: Deadlines,
    creds: Credentials,
    /// `None` after a failure: the owner released our marks when it saw the connection close.
    channel: Mutex<Option<Channel>>,
}

impl LeaseConn {
    pub(crate) fn connect(
        peer: &PeerRef,
        transport: TransportKind,
        addr: SocketAddr,
        instance: InstanceId,
        deadlines: &Deadlines,
        creds: &Credentials,
    ) -> Result<Self> {
        let channel = Self::open(peer, addr, instance, deadlines, creds)?;
        Ok(Self {
            peer: peer.clone(),
            transport,
            addr,
            instance,
            deadlines: *deadlines,
            creds: creds.clone(),
            channel: Mutex::new(Some(channel)),
        })
    }

    fn open(
        peer: &PeerRef,
        addr: SocketAddr,
        instance: InstanceId,
        deadlines: &Deadlines,
        creds: &Credentials,
    ) -> Result<Channel> {
        let (stream, found) = tcp::handshake(peer, addr, Some(instance), deadlines, creds)?;
        if found != instance {
            return Err(Error::PeerUnreachable {
                peer: peer.clone(),
                reason: format!("the peer restarted (instance {found}, expected {instance})"),
            });
        }
        let client = LeaseClient::new(deadlines.handshake);
        Ok(Channel { stream, client, marks: HashMap::new() })
    }

    /// The connection's descriptor while it is open (for the peer watcher: the owner's
    /// process exiting hangs it up).
    pub(crate) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.channel.lock().as_ref().map(|c| c.stream.as_raw_fd())
    }

    fn failed(&self, reason: impl std::fmt::Display) -> Error {
        let reason = format!("the revocation channel to the peer failed: {reason}");
        Error::PeerFailed { peer: self.peer.clone(), transport: self.transport, reason }
    }

    /// Runs the machine until `call` ended: sends what it asks, reads answers until its next
    /// deadline, tells it when the connection fails. Returns the call's event.
    fn drive(ch: &mut Channel, call: CallId) -> LeaseEvent {
        let mut s = &ch.stream;
        loop {
            while let Some(frame) = ch.client.poll_transmit() {
                if s.write_all(&frame).is_err() {
                    ch.client.handle_closed();
                }
            }
            while let Some(event) = ch.client.poll_event() {
                let id = match &event {
                    LeaseEvent::Entered { call, .. } | LeaseEvent::Left { call, .. } => *call,
                    LeaseEvent::Failed { call, .. } => *call,
                };
                if id == call {
                    return event;
                }
            }
            let Some(due) = ch.client.poll_timeout() else {
                // Nothing in flight and no event for the call: it cannot end any more.
                ch.client.handle_closed();
                continue;
            };
            let due = due.max(Instant::now() + Duration::from_millis(1));
            match tcp::read_frame(&ch.stream, due) {
                Ok((h, _)) if matches!(h.kind, FrameKind::EnterAck | FrameKind::LeaveAck) => {
                    ch.client.handle_frame(Instant::now(), &h)
                }
                Ok((h, _)) => {
                    log::warn!("unexpected {:?} frame on a revocation channel", h.kind);
                    ch.client.handle_frame(Instant::now(), &h);
                }
                // The socket waited at least until `due`.
                Err(e) if would_block(&e) => ch.client.handle_timeout(Instant::now().max(due)),
                Err(_) => ch.client.handle_closed(),
            }
        }
    }

    /// One call on the open channel (opened first when `reopen`); a channel the machine
    /// declares broken is closed, which releases our marks on the owner's side.
    fn call(
        &self,
        reopen: bool,
        submit: impl FnOnce(&mut Channel) -> Result<CallId>,
    ) -> Result<LeaseEvent> {
        let mut slot = self.channel.lock();
        if slot.is_none() && reopen {
            *slot = Some(Self::open(
                &self.peer,
                self.addr,
                self.instance,
                &self.deadlines,
                &self.creds,
            )?);
        }
        let Some(ch) = slot.as_mut() else {
            return Err(self.failed("the revocation channel closed"));
        };
        let call = submit(ch)?;
        let event = Self::drive(ch, call);
        if let LeaseEvent::Entered { region, mark: Some(mark), .. } = &event {
            ch.marks.entry(*region).or_default().push(*mark);
        }
        if ch.client.broken().is_some() {
            *slot = None;
        }
        Ok(event)
    }

    /// Marks a copy into `id` in flight; `Ok(false)` when the owner unregistered it.
    pub(crate) fn enter(&self, id: RegionId) -> Result<bool> {
        let event = self.call(true, |ch| Ok(ch.client.submit_enter(Instant::now(), id)))?;
        match event {
            LeaseEvent::Entered { mark: Some(_), .. } => Ok(true),
            LeaseEvent::Entered { mark: None, .. } => Ok(false),
            LeaseEvent::Failed { failure, .. } => Err(self.failed(failure)),
            LeaseEvent::Left { .. } => Err(Error::Internal("an enter ended as a leave")),
        }
    }

    /// Clears one mark of `id`. An error means the owner is unreachable (its marks are
    /// released on its side when it sees the connection close).
    pub(crate) fn leave(&self, id: RegionId) -> Result<()> {
        let event = self.call(false, |ch| {
            let mark = ch
                .marks
                .get_mut(&id)
                .and_then(Vec::pop)
                .ok_or_else(|| self.failed(LeaseFailure::NotHeld { region: id, tag: 0 }))?;
            Ok(ch.client.submit_leave(Instant::now(), mark))
        })?;
        match event {
            LeaseEvent::Left { .. } => Ok(()),
            LeaseEvent::Failed { failure, .. } => Err(self.failed(failure)),
            LeaseEvent::Entered { .. } => Err(Error::Internal("a leave ended as an enter")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use tidewire_core::handshake::answer;
    use tidewire_core::wire::{Header, HEADER_LEN};

    use super::*;
    use crate::{Engine, EngineConfig};

    fn region_id(e: &Engine, addr: u64) -> RegionId {
        e.descriptor().regions.iter().find(|r| r.addr == addr).map(|r| r.id).unwrap()
    }

    #[test]
    fn marks_hold_unregister_until_left_and_a_revoked_region_is_refused() {
        let target = std::sync::Arc::new(
            Engine::new(EngineConfig { port: Some(0), ..Default::default() }).unwrap(),
        );
        let a = target.allocate_shared(4096).unwrap();
        let id = region_id(&target, a);
        let deadlines = Deadlines::default();
        let lease = LeaseConn::connect(
            &PeerRef::named("t"),
            TransportKind::Mnnvl,
            target.rpc_addr(),
            target.instance_id(),
            &deadlines,
            &Credentials { secret: None, me: InstanceId(5) },
        )
        .unwrap();
        assert!(lease.enter(id).unwrap());
        assert!(lease.enter(id).unwrap(), "two copies in flight");
        lease.leave(id).unwrap();
        let t2 = target.clone();
        let freeing = std::thread::spawn(move || t2.free_shared(a));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!freeing.is_finished(), "one mark is still held");
        lease.leave(id).unwrap();
        freeing.join().unwrap().unwrap();
        assert!(!lease.enter(id).unwrap(), "refused once unregistered");
        assert!(lease.leave(id).is_err(), "no mark held");
        assert!(lease.raw_fd().is_some(), "the channel is still open");
    }

    #[test]
    fn the_revocation_channel_needs_the_owners_cluster_secret() {
        let secret = |s: &str| Some(tidewire_core::auth::ClusterSecret::new(s.as_bytes()).unwrap());
        let cfg = EngineConfig { port: Some(0), cluster_secret: secret("k"), ..Default::default() };
        let target = Engine::new(cfg).unwrap();
        let a = target.allocate_shared(4096).unwrap();
        let id = region_id(&target, a);
        let deadlines = Deadlines::default();
        let connect = |s: Option<&str>| {
            let creds = Credentials { secret: s.and_then(secret), me: InstanceId(5) };
            let peer = PeerRef::named("t");
            let (addr, inst) = (target.rpc_addr(), target.instance_id());
            LeaseConn::connect(&peer, TransportKind::Mnnvl, addr, inst, &deadlines, &creds)
        };
        for wrong in [None, Some("other")] {
            let err = connect(wrong).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("secret") || err.contains("trusted"), "{wrong:?}: {err}");
        }
        let lease = connect(Some("k")).unwrap();
        assert!(lease.enter(id).unwrap());
        lease.leave(id).unwrap();
    }

    #[test]
    fn an_owner_that_never_answers_breaks_the_channel_at_the_deadline() {
        // Answers the hello, then reads and ignores everything.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = InstanceId(77);
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; HEADER_LEN + 16];
            s.read_exact(&mut hello).unwrap();
            let raw: [u8; HEADER_LEN] = hello[..HEADER_LEN].try_into().unwrap();
            s.write_all(&answer(&Header::decode(&raw).unwrap(), me)).unwrap();
            let mut sink = [0u8; 64];
            while s.read(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let deadlines = Deadlines { handshake: Duration::from_millis(300), ..Deadlines::default() };
        let creds = Credentials { secret: None, me: InstanceId(5) };
        let peer = PeerRef::named("mute");
        let lease =
            LeaseConn::connect(&peer, TransportKind::Mnnvl, addr, me, &deadlines, &creds).unwrap();
        let start = Instant::now();
        let err = lease.enter(RegionId(1)).unwrap_err();
        let took = start.elapsed();
        assert!(err.to_string().contains("not answered within"), "{err}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
        assert!(lease.raw_fd().is_none(), "a broken channel is closed");
        drop(lease);
        server.join().unwrap();
    }
}
