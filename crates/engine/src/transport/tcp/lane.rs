//! One lane: a TCP connection to a peer's RPC/data port, shared by the submitting threads
//! (which queue frames, and write them when the lane is idle) and the readiness loop (which
//! writes the rest and reads the answers).

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use tidewire_core::handshake::{Handshake, HandshakeEvent};
use tidewire_core::select::TransportKind;
use tidewire_core::stall::StallDetector;
use tidewire_core::wire::{FrameKind, Header, Status, HEADER_LEN};
use tidewire_core::InstanceId;

use super::oneshot::{handshake_error, unreachable};
use super::{Pending, BUDGET, INLINE_BYTES};
use crate::batch::Batch;
use crate::config::{Credentials, Deadlines};
use crate::error::{Error, PeerRef, Result};
use crate::frames::{Flushed, Got, Item, RecvBuf, SendQueue, IO_BUFFER};
use crate::reactor::{Flow, Reactor, Source, Waker};
use crate::registry::OwnedPinned;

/// The answers a lane awaits: submitters add, the loop removes.
struct Awaited {
    pending: HashMap<u64, Pending>,
    /// The receive side's stall watch (silence while answers are awaited, a stop mid-frame).
    watch: StallDetector,
}

/// A lane's frames to send: submitters queue (and write, when the lane is idle), the loop
/// writes the rest.
struct Sending {
    out: SendQueue,
    /// The send side's stall watch (a peer that stops reading).
    watch: StallDetector,
    /// The loop was woken for queued frames and has not run since.
    woken: bool,
}

struct LaneShared {
    peer: PeerRef,
    stream: TcpStream,
    /// Why the lane failed (set once, under the `awaited` lock): while unset, it is alive.
    death: OnceLock<Error>,
    next_tag: AtomicU64,
    /// Never held together with `sending`.
    awaited: Mutex<Awaited>,
    sending: Mutex<Sending>,
    waker: Waker,
}

impl LaneShared {
    fn failure(&self, reason: impl std::fmt::Display) -> Error {
        Error::PeerFailed {
            peer: self.peer.clone(),
            transport: TransportKind::Tcp,
            reason: reason.to_string(),
        }
    }

    /// Fails the lane: no new work is accepted, every pending request fails with `err`,
    /// queued frames (and the pins they hold) are dropped, and the loop lets the socket go.
    fn kill(&self, err: Error) {
        let drained: Vec<Pending> = {
            let mut aw = self.awaited.lock();
            let _ = self.death.set(err.clone());
            aw.pending.drain().map(|(_, v)| v).collect()
        };
        self.sending.lock().out.clear();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.waker.wake();
        for p in drained {
            p.fail(err.clone());
        }
    }

    fn is_dead(&self) -> bool {
        self.death.get().is_some()
    }

    fn death(&self) -> Error {
        self.death.get().cloned().unwrap_or_else(|| self.failure("the connection closed"))
    }

    /// Writes what the socket takes (`sending` locked); the tags of frames refused because
    /// their memory was unregistered are pushed onto `refused`.
    fn flush(
        &self,
        snd: &mut Sending,
        now: Instant,
        budget: u64,
        refused: &mut Vec<u64>,
    ) -> io::Result<Flushed> {
        let f = snd.out.flush(&self.stream, refused, budget)?;
        if f.wrote > 0 {
            snd.watch.handle_sent(now);
        }
        snd.watch.handle_send_blocked(now, f.blocked);
        Ok(f)
    }

    /// Fails the requests whose frames were refused (their local memory was unregistered).
    fn refuse(&self, tags: Vec<u64>) {
        if tags.is_empty() {
            return;
        }
        let refused: Vec<Pending> = {
            let mut aw = self.awaited.lock();
            let gone: Vec<Pending> = tags.iter().filter_map(|t| aw.pending.remove(t)).collect();
            // No answer will come for these: they leave the count the silence watch waits on.
            let awaiting = aw.pending.len();
            aw.watch.handle_awaiting(Instant::now(), awaiting);
            gone
        };
        for p in refused {
            p.refused();
        }
    }
}

/// A pending answer and the frame to send once its tag is known.
pub(super) type Queued<'a> = (Pending, Box<dyn FnOnce(u64) -> Item + 'a>);

pub(super) struct Lane {
    shared: Arc<LaneShared>,
}

impl Lane {
    /// Connects one lane (bounded by the connect deadline) and hands it to the loop, which
    /// runs its handshake; the outcome arrives on the returned channel.
    pub(super) fn open(
        peer: &PeerRef,
        addr: SocketAddr,
        expect: InstanceId,
        deadlines: &Deadlines,
        creds: &Credentials,
        reactor: &Reactor,
    ) -> Result<(Self, Receiver<Result<()>>)> {
        let fail = |what: &str, e: &io::Error| unreachable(peer, what, addr, e);
        let stream = TcpStream::connect_timeout(&addr, deadlines.connect)
            .map_err(|e| fail("connect to", &e))?;
        stream.set_nodelay(true).map_err(|e| fail("set_nodelay on", &e))?;
        stream.set_nonblocking(true).map_err(|e| fail("configure", &e))?;
        let now = Instant::now();
        let mut hs = Handshake::new(now, deadlines.handshake, Some(expect), creds.client());
        let mut out = SendQueue::default();
        while let Some(item) = hs.poll_transmit().and_then(|f| Item::from_frame(&f)) {
            out.push(item);
        }
        let slot = reactor.slot();
        let shared = Arc::new(LaneShared {
            peer: peer.clone(),
            stream,
            death: OnceLock::new(),
            next_tag: AtomicU64::new(1),
            awaited: Mutex::new(Awaited {
                pending: HashMap::new(),
                watch: StallDetector::new(now, deadlines.stall),
            }),
            sending: Mutex::new(Sending {
                out,
                watch: StallDetector::new(now, deadlines.stall),
                woken: false,
            }),
            waker: slot.clone(),
        });
        let (tx, rx) = crossbeam_channel::bounded(1);
        slot.attach(Box::new(LaneSource {
            shared: shared.clone(),
            addr,
            recv: RecvBuf::new(IO_BUFFER),
            state: LaneRecv::Header,
            handshake: Some((hs, tx)),
        }))?;
        Ok((Self { shared }, rx))
    }

    /// Fails the lane: pending requests fail with `err` (default: closed by this engine).
    pub(super) fn close(&self, err: Option<Error>) {
        let err =
            err.unwrap_or_else(|| self.shared.failure("the connection was closed by this engine"));
        self.shared.kill(err);
    }

    pub(super) fn is_dead(&self) -> bool {
        self.shared.is_dead()
    }

    /// Registers the pending answers and queues the frames: written here when they are small
    /// and the lane is idle, else by the loop. Fails them at once if the lane is dead.
    pub(super) fn submit(&self, items: Vec<Queued<'_>>) {
        let sh = &self.shared;
        let now = Instant::now();
        let first = sh.next_tag.fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut frames = Vec::with_capacity(items.len());
        {
            let mut aw = sh.awaited.lock();
            if sh.is_dead() {
                drop(aw);
                for (pending, _) in items {
                    pending.fail(sh.failure("the connection is closed"));
                }
                return;
            }
            for (tag, (pending, make)) in (first..).zip(items) {
                aw.pending.insert(tag, pending);
                frames.push(make(tag));
            }
            let awaiting = aw.pending.len();
            aw.watch.handle_awaiting(now, awaiting);
        }
        let mut refused = Vec::new();
        let mut kill = None;
        let mut wake = false;
        {
            let mut snd = sh.sending.lock();
            let idle = snd.out.is_empty();
            let mut bytes = 0;
            for item in frames {
                bytes += item.bytes();
                snd.out.push(item);
            }
            if sh.is_dead() {
                // Killed meanwhile: its requests failed already.
                snd.out.clear();
                return;
            }
            if idle && bytes <= INLINE_BYTES {
                if let Err(e) = sh.flush(&mut snd, now, u64::MAX, &mut refused) {
                    kill = Some(sh.failure(format!("send failed: {e}")));
                }
            }
            if kill.is_none() && !snd.out.is_empty() && !snd.woken {
                snd.woken = true;
                wake = true;
            }
        }
        if let Some(err) = kill {
            sh.kill(err);
        }
        sh.refuse(refused);
        if wake {
            sh.waker.wake();
        }
    }
}

/// What the lane's loop is receiving.
enum LaneRecv {
    Header,
    /// The payload of a `HelloAck`.
    Hello {
        h: Header,
        buf: Vec<u8>,
    },
    /// READ data landing in local memory, pinned until it is in.
    Into {
        batch: Arc<Batch>,
        req: usize,
        pin: OwnedPinned,
        done: u64,
    },
    /// Payload bytes nobody awaits any more.
    Skip {
        left: u64,
    },
}

/// A lane on its loop thread.
struct LaneSource {
    shared: Arc<LaneShared>,
    addr: SocketAddr,
    recv: RecvBuf,
    state: LaneRecv,
    /// Until the peer answered the hello: the machine and where its outcome goes.
    handshake: Option<(Handshake, Sender<Result<()>>)>,
}

impl Drop for LaneSource {
    fn drop(&mut self) {
        if let LaneRecv::Into { batch, req, .. } = &self.state {
            batch.fail_request(*req, self.shared.death());
        }
        if let Some((_, tx)) = self.handshake.take() {
            let _ = tx.send(Err(self.shared.death()));
        }
    }
}

impl LaneSource {
    fn mid_frame(&self) -> bool {
        !matches!(self.state, LaneRecv::Header) || self.recv.buffered() > 0
    }

    /// Queues what the handshake has to send (its proof of the cluster secret), and passes
    /// its outcome on, once.
    fn handshake_events(&mut self) -> Result<()> {
        let Some((hs, _)) = self.handshake.as_mut() else { return Ok(()) };
        let mut sent = false;
        while let Some(item) = hs.poll_transmit().and_then(|f| Item::from_frame(&f)) {
            self.shared.sending.lock().out.push(item);
            sent = true;
        }
        if sent {
            self.shared.waker.wake();
        }
        let Some((hs, _)) = self.handshake.as_mut() else { return Ok(()) };
        let Some(event) = hs.poll_event() else { return Ok(()) };
        let Some((_, tx)) = self.handshake.take() else { return Ok(()) };
        match event {
            HandshakeEvent::Established(_) => {
                let _ = tx.send(Ok(()));
                Ok(())
            }
            HandshakeEvent::Failed(f) => {
                let err = handshake_error(&self.shared.peer, self.addr, f);
                let _ = tx.send(Err(err.clone()));
                Err(err)
            }
        }
    }

    fn protocol(&self, reason: impl std::fmt::Display) -> Error {
        Error::Protocol { peer: self.shared.peer.clone(), reason: reason.to_string() }
    }

    fn turn(&mut self, now: Instant, received: &mut u64) -> Result<Flow> {
        let sh = self.shared.clone();
        let mut refused = Vec::new();
        let more_to_send = {
            let mut snd = sh.sending.lock();
            snd.woken = false;
            let f = sh.flush(&mut snd, now, BUDGET, &mut refused);
            let f = match f {
                Ok(f) => f,
                Err(e) => {
                    drop(snd);
                    return Err(sh.failure(format!("send failed: {e}")));
                }
            };
            !f.blocked && !snd.out.is_empty()
        };
        sh.refuse(refused);
        loop {
            if *received >= BUDGET {
                return Ok(Flow::Again);
            }
            match self.step(&sh, now)? {
                Got::Bytes(n) => *received += n as u64,
                Got::Blocked => break,
                Got::Eof => {
                    // Closed before it answered the hello: the handshake's failure (the peer
                    // is unreachable), not a failure of an established connection.
                    if let Some((hs, _)) = self.handshake.as_mut() {
                        hs.handle_closed();
                        self.handshake_events()?;
                    }
                    return Err(sh.failure("the peer closed the connection"));
                }
            }
        }
        Ok(if more_to_send { Flow::Again } else { Flow::Continue })
    }

    /// One unit of receiving: a header, or a piece of a payload.
    fn step(&mut self, sh: &LaneShared, now: Instant) -> Result<Got> {
        let stream = &sh.stream;
        let io = |e: io::Error| sh.failure(format!("receive failed: {e}"));
        match &mut self.state {
            LaneRecv::Header => match self.recv.header() {
                Some(raw) => {
                    self.on_header(now, &raw)?;
                    Ok(Got::Bytes(0))
                }
                None => self.recv.fill(stream).map_err(io),
            },
            LaneRecv::Hello { h, buf } => {
                let want = h.payload_len() as usize - buf.len();
                let got = self.recv.recv_vec(stream, buf, want).map_err(io)?;
                if buf.len() as u64 == h.payload_len() {
                    let (h, buf) = (*h, std::mem::take(buf));
                    self.state = LaneRecv::Header;
                    if let Some((hs, _)) = self.handshake.as_mut() {
                        hs.handle_frame(now, &h, &buf);
                    }
                    self.handshake_events()?;
                }
                Ok(got)
            }
            LaneRecv::Into { batch, req, pin, done } => {
                let got = {
                    // The gate keeps the request pending (the caller has not been told it
                    // failed) while these bytes land; once it failed, the rest is skipped.
                    let Some(_gate) = batch.accepts_data(*req) else {
                        let left = pin.len() - *done;
                        self.state = LaneRecv::Skip { left };
                        return Ok(Got::Bytes(0));
                    };
                    self.recv.recv_into(stream, pin, *done).map_err(io)?
                };
                if let Got::Bytes(n) = got {
                    *done += n as u64;
                    if *done >= pin.len() {
                        let (batch, req) = (batch.clone(), *req);
                        self.state = LaneRecv::Header;
                        batch.chunk_done(req);
                    }
                }
                Ok(got)
            }
            LaneRecv::Skip { left } => {
                let got = self.recv.discard(stream, *left).map_err(io)?;
                if let Got::Bytes(n) = got {
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = LaneRecv::Header;
                    }
                }
                Ok(got)
            }
        }
    }

    /// Handles one answer's header.
    fn on_header(&mut self, now: Instant, raw: &[u8; HEADER_LEN]) -> Result<()> {
        let h = Header::decode(raw).map_err(|e| self.protocol(e))?;
        if let Some((hs, _)) = self.handshake.as_mut() {
            if h.kind == FrameKind::HelloAck && h.payload_len() > 0 {
                // A handshake answer's payload (bounded by its kind's limit, checked by the
                // header's decoder); any other frame goes to the handshake without one (it
                // ends it), so a peer still in its handshake cannot make us buffer a large one.
                let len = h.payload_len() as usize;
                self.state = LaneRecv::Hello { h, buf: Vec::with_capacity(len) };
                return Ok(());
            }
            hs.handle_frame(now, &h, &[]);
            return self.handshake_events();
        }
        let pending = {
            let mut aw = self.shared.awaited.lock();
            let p = aw.pending.remove(&h.tag);
            let awaiting = aw.pending.len();
            aw.watch.handle_awaiting(now, awaiting);
            p
        };
        let Some(pending) = pending else {
            return Err(self.protocol(format!("answer to unknown tag {}", h.tag)));
        };
        let peer = &self.shared.peer;
        match (h.kind, pending) {
            (FrameKind::WriteAck, Pending::Chunk { batch, req, read_into: None, len, .. }) => {
                if h.status == Status::Ok {
                    batch.chunk_done(req);
                } else {
                    batch.fail_request(req, Error::from_status(h.status, peer, h.addr, len));
                }
            }
            (
                FrameKind::ReadData,
                Pending::Chunk { batch, req, read_into: Some(entry), local, len },
            ) => {
                if h.status != Status::Ok {
                    batch.fail_request(req, Error::from_status(h.status, peer, h.addr, len));
                    if h.payload_len() > 0 {
                        self.state = LaneRecv::Skip { left: h.payload_len() };
                    }
                    return Ok(());
                }
                if h.len != len {
                    let reason = format!("READ answer of {} bytes for {len} asked", h.len);
                    batch.fail_request(req, self.protocol(&reason));
                    return Err(self.protocol(reason));
                }
                match entry.try_pin_owned(local, len) {
                    Some(pin) if len > 0 => {
                        self.state = LaneRecv::Into { batch, req, pin, done: 0 }
                    }
                    Some(_) => batch.chunk_done(req),
                    None => {
                        batch.fail_request(req, Error::NotRegistered { addr: local, len });
                        self.state = LaneRecv::Skip { left: len };
                    }
                }
            }
            (FrameKind::NotifyAck, Pending::Trailer(batch)) => {
                if h.status == Status::Ok {
                    batch.trailer_done();
                } else {
                    batch.trailer_failed(Error::from_status(h.status, peer, 0, 0));
                }
            }
            (kind, pending) => {
                let err = self.protocol(format!("unexpected {kind:?} answer"));
                pending.fail(err.clone());
                return Err(err);
            }
        }
        Ok(())
    }

    /// The lane failed with `err`: every pending request fails, the loop drops it.
    fn fail(&mut self, err: Error) -> Flow {
        self.shared.kill(err);
        Flow::Close
    }
}

impl Source for LaneSource {
    fn fd(&self) -> RawFd {
        self.shared.stream.as_raw_fd()
    }

    fn on_ready(&mut self, now: Instant) -> Flow {
        if self.shared.is_dead() {
            return Flow::Close;
        }
        self.recv.on_event();
        let mut received = 0;
        let result = self.turn(now, &mut received);
        if received > 0 {
            let mid = self.mid_frame();
            self.shared.awaited.lock().watch.handle_received(now, mid);
        }
        match result {
            Ok(flow) => flow,
            Err(e) => self.fail(e),
        }
    }

    fn poll_timeout(&mut self, _now: Instant) -> Option<Instant> {
        let hs = self.handshake.as_ref().and_then(|(hs, _)| hs.poll_timeout());
        let recv = self.shared.awaited.lock().watch.poll_timeout();
        let send = self.shared.sending.lock().watch.poll_timeout();
        hs.into_iter().chain(recv).chain(send).min()
    }

    fn on_timeout(&mut self, now: Instant) -> Flow {
        if let Some((hs, _)) = self.handshake.as_mut() {
            hs.handle_timeout(now);
            if let Err(e) = self.handshake_events() {
                return self.fail(e);
            }
        }
        let stalled = {
            let mut aw = self.shared.awaited.lock();
            aw.watch.handle_timeout(now);
            aw.watch.poll_event()
        };
        let stalled = stalled.or_else(|| {
            let mut snd = self.shared.sending.lock();
            snd.watch.handle_timeout(now);
            snd.watch.poll_event()
        });
        match stalled {
            Some(s) => {
                let err = self.shared.failure(s);
                self.fail(err)
            }
            None => Flow::Continue,
        }
    }

    fn on_stop(&mut self) {
        self.shared.kill(Error::ShuttingDown { who: "this engine".into() });
    }
}
