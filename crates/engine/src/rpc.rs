//! The RPC/data endpoint: one TCP port per engine serving handshakes, descriptors (the p2p
//! metadata backend), probes, notifications and one-sided READ/WRITE.
//!
//! Every remote access is checked against the registry: a range not inside one live
//! registered region is refused with `AccessDenied`, its payload skipped, the memory untouched.
//! A malformed, truncated or oversized frame drops that connection only; a connection that
//! stalls mid-frame (or stops reading our answers) longer than the stall deadline is dropped
//! too (`tidewire_core::stall`).
//!
//! One thread accepts; every connection is then served by the engine's readiness loop
//! (`reactor.rs`), whose thread count does not depend on how many peers connect. A connection
//! reads frames only while fewer than [`OUT_LIMIT`] bytes of answers wait to be sent, so a
//! peer that asks faster than it reads is slowed, not buffered without bound.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use tidewire_core::lease::{self, LeaseTable};
use tidewire_core::stall::{StallDetector, Stalled};
use tidewire_core::wire::{decode_strings, FrameKind, Header, Status, HEADER_LEN, MAX_DATA_FRAME};

use crate::config::EngineConfig;
use crate::engine::Inner;
use crate::error::{Error, Result};
use crate::frames::{Got, Item, RecvBuf, SendQueue, IO_BUFFER, POLL};
use crate::guard::Step;
use crate::notify::Notification;
use crate::reactor::{Flow, Source};
use crate::registry::{OwnedPinned, RegionEntry};

/// Answers queued beyond this stop the reading of further requests until the peer reads.
const OUT_LIMIT: u64 = 4 << 20;
/// Bytes received, and bytes sent, per turn of one connection before the loop serves others.
const BUDGET: u64 = 4 << 20;

/// Binds the RPC port: the configured port, or random ports of the range until one is free.
/// Only what this returns is ever published.
pub(crate) fn bind(cfg: &EngineConfig) -> Result<TcpListener> {
    let host = cfg.host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => {
            (host, 0).to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip()).ok_or_else(
                || Error::Bind { addr: cfg.host.clone(), reason: "cannot resolve host".into() },
            )?
        }
    };
    let try_bind = |port: u16| TcpListener::bind(SocketAddr::new(ip, port));
    let fail = |port: u16, e: io::Error| Error::Bind {
        addr: SocketAddr::new(ip, port).to_string(),
        reason: e.to_string(),
    };
    if let Some(port) = cfg.port {
        return try_bind(port).map_err(|e| fail(port, e));
    }
    let (lo, hi) = cfg.port_range;
    let mut rng = rand::thread_rng();
    let attempts = 64.min(usize::from(hi - lo) + 1);
    let mut last = None;
    for _ in 0..attempts {
        let port = rng.gen_range(lo..=hi);
        match try_bind(port) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some((port, e)),
            Err(e) => return Err(fail(port, e)),
        }
    }
    let (port, e) = last.unwrap_or((lo, io::ErrorKind::AddrInUse.into()));
    Err(Error::Bind {
        addr: format!("{ip}:{lo}-{hi}"),
        reason: format!("{attempts} random ports in use (last {port}: {e})"),
    })
}

/// Accepts connections until the engine stops, handing each to the readiness loop.
pub(crate) fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    for stream in listener.incoming() {
        if inner.life.stopping() {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("{}: accept failed: {e}", inner.name);
                std::thread::sleep(POLL / 10);
                continue;
            }
        };
        if let Err(e) = serve(&inner, stream) {
            if !inner.life.stopping() {
                log::warn!("{}: {e}", inner.name);
            }
        }
    }
}

fn serve(inner: &Arc<Inner>, stream: TcpStream) -> Result<()> {
    let peer = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)
    };
    setup(&stream).map_err(|e| Error::io(format!("setting up the connection from {peer}"), &e))?;
    let slot = inner.life.reactor()?.slot();
    let watch = StallDetector::new(Instant::now(), inner.config.deadlines.stall);
    let gate = if inner.guard.secret.is_some() { Gate::Hello } else { Gate::Open };
    let prove_by = Instant::now() + inner.config.deadlines.handshake;
    slot.attach(Box::new(Inbound {
        gate,
        prove_by,
        inner: inner.clone(),
        stream,
        peer,
        recv: RecvBuf::new(IO_BUFFER),
        state: Recv::Header,
        out: SendQueue::default(),
        watch,
        leases: LeaseTable::default(),
        refused: Vec::new(),
    }))
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Decode(#[from] tidewire_core::CoreError),
    #[error("unexpected {0:?} frame from an initiator")]
    Unexpected(FrameKind),
    #[error("{0}")]
    Stalled(Stalled),
    #[error("refused: {0}")]
    Refused(String),
}

/// How far an inbound connection got in proving the cluster secret.
enum Gate {
    /// Served (the handshake succeeded, or no secret is in force).
    Open,
    /// Nothing but a `Hello` is served.
    Hello,
    /// Nothing but the initiator's `Auth` for this handshake.
    Proof(tidewire_core::auth::Transcript),
    /// Refused: the answer saying so is sent, then the connection closes.
    Closing,
}

/// Where a payload goes.
enum Sink {
    /// A WRITE into registered memory, pinned until the payload is in.
    Memory(OwnedPinned),
    /// A control payload (hello, notification).
    Bytes(Vec<u8>),
    /// A refused WRITE: skipped, then answered with this status.
    Discard(Status),
}

enum Recv {
    Header,
    Payload { h: Header, sink: Sink, done: u64 },
}

/// One inbound connection, on a loop thread.
struct Inbound {
    gate: Gate,
    /// A connection that has not proved the cluster secret by then is closed (it holds a
    /// descriptor and a loop slot).
    prove_by: Instant,
    inner: Arc<Inner>,
    stream: TcpStream,
    peer: String,
    recv: RecvBuf,
    state: Recv,
    out: SendQueue,
    watch: StallDetector,
    /// In-flight marks the peer took with `Enter`; the ones it did not `Leave` are cleared
    /// when the connection ends (the peer died or gave up), so an `unregister` waiting for
    /// them is never held by a peer that is gone.
    leases: LeaseTable<Arc<RegionEntry>>,
    refused: Vec<u64>,
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if matches!(self.gate, Gate::Proof(_)) {
            // It saw our proof and left without giving its own: it holds another secret (or it
            // found that this engine is not the instance it expected: a restart).
            let why = "it left without proving the cluster secret (another secret, or it found \
                       this engine restarted)";
            self.inner.guard.refuse("rpc", &self.peer, why);
        }
        for entry in self.leases.handle_closed() {
            if let Some(control) = entry.control() {
                control.leave_remote();
            }
        }
    }
}

fn frame(h: Header) -> Item {
    Item::Frame { header: h.encode(), payload: Vec::new() }
}

impl Inbound {
    fn mid_frame(&self) -> bool {
        !matches!(self.state, Recv::Header) || self.recv.buffered() > 0
    }

    /// Writes queued answers. Returns what the loop should do about the rest: nothing left
    /// or the socket full (`Continue`: an edge comes when it drains), or more to write now
    /// (`Again`: the budget ran out).
    fn flush(&mut self, now: Instant) -> Result<Flow, ConnError> {
        if self.out.is_empty() {
            return Ok(Flow::Continue);
        }
        let f = self.out.flush(&self.stream, &mut self.refused, BUDGET)?;
        self.refused.clear();
        if f.wrote > 0 {
            self.watch.handle_sent(now);
        }
        self.watch.handle_send_blocked(now, f.blocked);
        Ok(if f.blocked || self.out.is_empty() { Flow::Continue } else { Flow::Again })
    }

    /// Reads and serves frames until the socket is drained, a budget runs out or answers
    /// pile up.
    fn pump(&mut self, now: Instant, received: &mut u64) -> Result<Flow, ConnError> {
        loop {
            if matches!(self.gate, Gate::Closing) {
                // Nothing more is read from a refused peer; close once the refusal is out.
                let f = self.flush(now)?;
                return Ok(if self.out.is_empty() { Flow::Close } else { f });
            }
            let mut sending = Flow::Continue;
            if self.recv.buffered() == 0 || self.out.queued_bytes() > OUT_LIMIT {
                sending = self.flush(now)?;
            }
            if self.out.queued_bytes() > OUT_LIMIT {
                // Resumed when the socket drains (`Continue`), or at once (`Again`).
                return Ok(sending);
            }
            if *received >= BUDGET {
                self.flush(now)?;
                return Ok(Flow::Again);
            }
            match self.step()? {
                Got::Bytes(n) => *received += n as u64,
                Got::Blocked => return self.flush(now),
                Got::Eof if !self.mid_frame() => return Ok(Flow::Close),
                Got::Eof => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            }
        }
    }

    /// One unit of work: a header, or a piece of a payload.
    fn step(&mut self) -> Result<Got, ConnError> {
        match &mut self.state {
            Recv::Header => match self.recv.header() {
                Some(raw) => {
                    self.on_header(&raw)?;
                    Ok(Got::Bytes(0))
                }
                None => Ok(self.recv.fill(&self.stream)?),
            },
            Recv::Payload { h, sink, done } => {
                let left = h.payload_len() - *done;
                let got = match sink {
                    Sink::Memory(pin) => self.recv.recv_into(&self.stream, pin, *done)?,
                    Sink::Bytes(v) => self.recv.recv_vec(&self.stream, v, left as usize)?,
                    Sink::Discard(_) => self.recv.discard(&self.stream, left)?,
                };
                if let Got::Bytes(n) = got {
                    *done += n as u64;
                    if *done == h.payload_len() {
                        let Recv::Payload { h, sink, .. } =
                            std::mem::replace(&mut self.state, Recv::Header)
                        else {
                            return Ok(got);
                        };
                        self.finish(h, sink);
                    }
                }
                Ok(got)
            }
        }
    }

    fn expect(&mut self, h: Header, sink: Sink) {
        if h.payload_len() == 0 {
            self.finish(h, sink);
        } else {
            self.state = Recv::Payload { h, sink, done: 0 };
        }
    }

    fn on_header(&mut self, raw: &[u8; HEADER_LEN]) -> Result<(), ConnError> {
        let h = Header::decode(raw)?;
        let inner = &self.inner;
        let stopping = inner.life.stopping();
        let allowed = matches!(
            (&self.gate, h.kind),
            (Gate::Open, _) | (Gate::Hello, FrameKind::Hello) | (Gate::Proof(_), FrameKind::Auth)
        );
        if !allowed {
            let why = format!("a {:?} frame before it proved the cluster secret", h.kind);
            inner.guard.refuse("rpc", &self.peer, &why);
            // Counted once: the connection's end does not count it again.
            self.gate = Gate::Closing;
            return Err(ConnError::Refused(why));
        }
        match h.kind {
            FrameKind::Hello => self.expect(h, Sink::Bytes(Vec::new())),
            // The proof, in its turn only (an open connection has no business with one).
            FrameKind::Auth if matches!(self.gate, Gate::Proof(_)) => {
                self.expect(h, Sink::Bytes(Vec::new()))
            }
            FrameKind::GetDescriptor => {
                let json = inner.descriptor().to_json();
                let header = Header::new(FrameKind::Descriptor, h.tag, 0, json.len() as u64);
                self.out.push(Item::Frame { header: header.encode(), payload: json });
            }
            FrameKind::Probe => self.out.push(frame(Header::new(FrameKind::ProbeAck, h.tag, 0, 0))),
            FrameKind::Write => {
                let pin =
                    inner.registry.find(h.addr, h.len).and_then(|e| e.try_pin_owned(h.addr, h.len));
                let sink = match pin {
                    Some(_) if stopping => Sink::Discard(Status::ShuttingDown),
                    Some(pin) => Sink::Memory(pin),
                    None => Sink::Discard(Status::AccessDenied),
                };
                self.expect(h, sink);
            }
            FrameKind::Read => {
                let refusal =
                    |status| Header::new(FrameKind::ReadData, h.tag, h.addr, 0).with_status(status);
                let entry = inner.registry.find(h.addr, h.len);
                match entry {
                    _ if stopping => self.out.push(frame(refusal(Status::ShuttingDown))),
                    _ if h.len > MAX_DATA_FRAME => {
                        self.out.push(frame(refusal(Status::BadRequest)))
                    }
                    // Pinned when the answer is sent; refused then if unregistered meanwhile.
                    Some(entry) => self.out.push(Item::Memory {
                        header: Header::new(FrameKind::ReadData, h.tag, h.addr, h.len).encode(),
                        entry,
                        addr: h.addr,
                        len: h.len,
                        refusal: Some(refusal(Status::AccessDenied).encode()),
                        tag: h.tag,
                    }),
                    None => self.out.push(frame(refusal(Status::AccessDenied))),
                }
            }
            FrameKind::Notify => self.expect(h, Sink::Bytes(Vec::new())),
            FrameKind::Enter => {
                let ack = if stopping {
                    lease::ack(FrameKind::EnterAck, &h, Status::ShuttingDown)
                } else {
                    let registry = &inner.registry;
                    self.leases.handle_enter(&h, |region| {
                        let entry = registry.by_id(region)?;
                        entry.control().is_some_and(|c| c.enter_remote()).then_some(entry)
                    })
                };
                self.out.push(Item::Frame { header: ack, payload: Vec::new() });
            }
            FrameKind::Leave => {
                let (ack, cleared) = self.leases.handle_leave(&h);
                if let Some(control) = cleared.as_ref().and_then(|e| e.control()) {
                    control.leave_remote();
                }
                self.out.push(Item::Frame { header: ack, payload: Vec::new() });
            }
            kind => return Err(ConnError::Unexpected(kind)),
        }
        Ok(())
    }

    /// A whole payload arrived.
    fn finish(&mut self, h: Header, sink: Sink) {
        let answer = match (h.kind, sink) {
            (FrameKind::Hello, Sink::Bytes(payload)) => {
                let step = self.inner.guard.hello("rpc", &self.peer, &h, &payload);
                return self.handshake_step(step);
            }
            (FrameKind::Auth, Sink::Bytes(payload)) => {
                let Gate::Proof(t) = std::mem::replace(&mut self.gate, Gate::Closing) else {
                    return;
                };
                let step = self.inner.guard.auth("rpc", &self.peer, &h, &payload, &t);
                return self.handshake_step(step);
            }
            (FrameKind::Write, Sink::Memory(_pin)) => {
                Header::new(FrameKind::WriteAck, h.tag, h.addr, h.len)
            }
            (FrameKind::Write, Sink::Discard(status)) => {
                Header::new(FrameKind::WriteAck, h.tag, h.addr, h.len).with_status(status)
            }
            (FrameKind::Notify, Sink::Bytes(payload)) => {
                let status = match decode_strings::<3>(&payload) {
                    Ok([from, name, message]) => {
                        self.inner.notifications.push(Notification { from, name, message });
                        Status::Ok
                    }
                    Err(e) => {
                        log::warn!("{}: malformed notification: {e}", self.inner.name);
                        Status::BadRequest
                    }
                };
                Header::new(FrameKind::NotifyAck, h.tag, 0, 0).with_status(status)
            }
            (kind, _) => {
                log::error!(
                    "{}: a {kind:?} payload ended in the wrong sink (a bug)",
                    self.inner.name
                );
                Header::new(FrameKind::WriteAck, h.tag, h.addr, h.len).with_status(Status::Internal)
            }
        };
        self.out.push(frame(answer));
    }

    /// Sends a handshake answer and moves the gate on.
    fn handshake_step(&mut self, step: Step) {
        let (frame, gate) = match step {
            Step::Open(f) => (f, Gate::Open),
            Step::Wait(f, t) => (f, Gate::Proof(t)),
            Step::Refuse(f) => (f, Gate::Closing),
        };
        self.gate = gate;
        if let Some(item) = Item::from_frame(&frame) {
            self.out.push(item);
        }
    }

    fn dropped(&self, e: &ConnError) -> Flow {
        let quiet = self.inner.life.stopping()
            || matches!(e, ConnError::Io(io) if io.kind() == io::ErrorKind::ConnectionReset);
        if !quiet {
            log::warn!("{}: dropping connection from {}: {e}", self.inner.name, self.peer);
        }
        Flow::Close
    }
}

impl Source for Inbound {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn on_ready(&mut self, now: Instant) -> Flow {
        self.recv.on_event();
        let mut received = 0;
        let result = self.pump(now, &mut received);
        if received > 0 {
            self.watch.handle_received(now, self.mid_frame());
        }
        // Reading stops while answers pile up (back-pressure): the requests left in our
        // buffer are not a peer stalled mid-frame (the send watch catches one that stops
        // reading our answers).
        self.watch.handle_receive_paused(now, self.out.queued_bytes() > OUT_LIMIT);
        match result {
            Ok(flow) => flow,
            Err(e) => self.dropped(&e),
        }
    }

    fn poll_timeout(&mut self, _now: Instant) -> Option<Instant> {
        let proving = matches!(self.gate, Gate::Hello | Gate::Proof(_)).then_some(self.prove_by);
        [self.watch.poll_timeout(), proving].into_iter().flatten().min()
    }

    fn on_timeout(&mut self, now: Instant) -> Flow {
        if matches!(self.gate, Gate::Hello | Gate::Proof(_)) && now >= self.prove_by {
            let why = "it did not complete the handshake within the handshake deadline";
            self.inner.guard.refuse("rpc", &self.peer, why);
            self.gate = Gate::Closing;
            return Flow::Close;
        }
        self.watch.handle_timeout(now);
        match self.watch.poll_event() {
            Some(stalled) => self.dropped(&ConnError::Stalled(stalled)),
            None => Flow::Continue,
        }
    }

    fn on_stop(&mut self) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use tidewire_core::wire::INSTANCE_LEN;

    use super::*;
    use crate::{Engine, EngineConfig, HostBuffer};

    #[test]
    fn a_client_that_asks_far_more_than_it_reads_gets_every_answer() {
        const MIB: usize = 1 << 20;
        let e = Engine::new(EngineConfig { port: Some(0), ..Default::default() }).unwrap();
        let mut buf = HostBuffer::new(8 * MIB).unwrap();
        let pattern: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        buf.fill_from(&pattern);
        let base = buf.addr();
        e.register_buffer(Arc::new(buf), "cpu").unwrap();
        let mut s = TcpStream::connect(e.rpc_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = Header::new(FrameKind::Hello, 0, 0, INSTANCE_LEN).encode().to_vec();
        hello.extend_from_slice(&[0u8; 16]);
        s.write_all(&hello).unwrap();
        let mut ack = [0u8; HEADER_LEN + 16];
        s.read_exact(&mut ack).unwrap();
        // 48 MiB of answers asked for before a byte of them is read: the target stops reading
        // requests while answers pile up, and resumes as the client reads.
        let n = 48u64;
        for i in 0..n {
            let at = base + (i % 8) * MIB as u64;
            s.write_all(&Header::new(FrameKind::Read, i, at, MIB as u64).encode()).unwrap();
        }
        let mut payload = vec![0u8; MIB];
        for i in 0..n {
            let mut raw = [0u8; HEADER_LEN];
            s.read_exact(&mut raw).unwrap();
            let h = Header::decode(&raw).unwrap();
            assert_eq!(
                (h.kind, h.tag, h.status, h.len),
                (FrameKind::ReadData, i, Status::Ok, MIB as u64)
            );
            s.read_exact(&mut payload).unwrap();
            let off = (i % 8) as usize * MIB;
            assert!(payload == pattern[off..off + MIB], "answer {i} carries the region's bytes");
        }
    }
}
