//! The TCP transport: a few persistent connections (lanes) per peer. Each lane has a writer
//! thread that coalesces small frames and streams large payloads straight from registered
//! memory, and a reader thread that completes chunks (and streams READ data straight into
//! registered memory). A lane that fails fails every request pending on it, with the reason.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tidewire_core::select::TransportKind;
use tidewire_core::wire::{FrameKind, Header, Status, INSTANCE_LEN};
use tidewire_core::InstanceId;

use crate::batch::Batch;
use crate::config::{Deadlines, EngineConfig};
use crate::error::{Error, Result};
use crate::frames::{FrameReader, FrameWriter, POLL};
use crate::lifecycle::Lifecycle;
use crate::peer::PeerConn;
use crate::registry::RegionEntry;
use crate::request::{Op, Request, Step};
use crate::transport::{BatchCtx, Submission, Transport};

/// Requests larger than this are split into chunks spread over the lanes.
pub(crate) const CHUNK: u64 = 4 << 20;
const IO_BUFFER: usize = 64 << 10;

/// What a lane waits for an answer to.
enum Pending {
    /// A chunk of request `req`. For READ, the data lands at `local` inside `entry`.
    Chunk { batch: Arc<Batch>, req: usize, read_into: Option<(Arc<RegionEntry>, u64)>, len: u64 },
    /// The batch's notification.
    Trailer(Arc<Batch>),
}

impl Pending {
    fn fail(self, err: Error) {
        match self {
            Pending::Chunk { batch, req, .. } => batch.fail_request(req, err),
            Pending::Trailer(batch) => batch.trailer_failed(err),
        }
    }
}

/// Work for a lane's writer.
enum Outgoing {
    /// Write `len` bytes from local `src` (inside `entry`) to remote `dst`.
    Write { tag: u64, dst: u64, src: u64, len: u64, entry: Arc<RegionEntry> },
    /// A header and a small payload.
    Frame { header: Header, payload: Vec<u8> },
}

impl Outgoing {
    fn payload_len(&self) -> u64 {
        match self {
            Outgoing::Write { len, .. } => *len,
            Outgoing::Frame { payload, .. } => payload.len() as u64,
        }
    }
}

/// One request's share of a TCP batch, before it is split into chunks.
enum Work {
    /// WRITE `len` bytes from local `src` (in `entry`) to remote `dst`.
    Write { req: usize, entry: Arc<RegionEntry>, src: u64, dst: u64, len: u64 },
    /// READ `len` bytes at remote `src` into local `dst` (in `entry`).
    Read { req: usize, entry: Arc<RegionEntry>, dst: u64, src: u64, len: u64 },
}

/// A lane's total payload up to which the submitting thread writes the frames itself (when
/// the lane is idle) instead of handing them to the lane's writer thread: one thread hop less
/// on the latency path, and a batch's small frames leave in one flush.
const INLINE_BYTES: u64 = 256 << 10;

struct LaneShared {
    peer: String,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once, under the `pending` lock, when the lane fails.
    dead: AtomicBool,
    stream: TcpStream,
    /// Frames are written under this lock, by the submitting thread or the writer thread.
    writer: Mutex<FrameWriter>,
    /// Items queued for the writer thread and not yet taken.
    queued: AtomicUsize,
}

impl LaneShared {
    /// Fails the lane: no new work is accepted, every pending request fails with `err`.
    fn kill(&self, err: Error) {
        let drained: Vec<Pending> = {
            let mut p = self.pending.lock();
            self.dead.store(true, Ordering::Release);
            p.drain().map(|(_, v)| v).collect()
        };
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        for p in drained {
            p.fail(err.clone());
        }
    }

    fn failure(&self, reason: impl std::fmt::Display) -> Error {
        Error::PeerFailed {
            peer: self.peer.clone(),
            transport: TransportKind::Tcp,
            reason: reason.to_string(),
        }
    }

    /// Writes one item. A WRITE whose local region was unregistered since submit fails alone.
    fn send(&self, w: &mut FrameWriter, item: Outgoing) -> io::Result<()> {
        match item {
            Outgoing::Write { tag, dst, src, len, entry } => {
                let Some(pinned) = entry.pin(src, len) else {
                    let pending = self.pending.lock().remove(&tag);
                    if let Some(p) = pending {
                        p.fail(Error::NotRegistered { addr: src, len });
                    }
                    return Ok(());
                };
                w.header(&Header::new(FrameKind::Write, tag, dst, len))?;
                w.pinned(&pinned)
            }
            Outgoing::Frame { header, payload } => {
                w.header(&header)?;
                w.bytes(&payload)
            }
        }
    }
}

/// A pending answer and the frame to send once its tag is known.
type Item<'a> = (Pending, Box<dyn FnOnce(u64) -> Outgoing + 'a>);

struct Lane {
    shared: Arc<LaneShared>,
    tx: Sender<Outgoing>,
    next_tag: AtomicU64,
}

impl Lane {
    /// Registers the pending answers and sends the items: inline when they are small and the
    /// lane is idle, else through the writer thread. Fails them at once if the lane is dead.
    fn submit(&self, items: Vec<Item<'_>>) {
        let mut out = Vec::with_capacity(items.len());
        {
            let mut p = self.shared.pending.lock();
            if self.shared.dead.load(Ordering::Acquire) {
                drop(p);
                for (pending, _) in items {
                    pending.fail(self.shared.failure("the connection is closed"));
                }
                return;
            }
            for (pending, make) in items {
                let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
                p.insert(tag, pending);
                out.push(make(tag));
            }
        }
        let bytes: u64 = out.iter().map(Outgoing::payload_len).sum();
        if bytes <= INLINE_BYTES && self.shared.queued.load(Ordering::Acquire) == 0 {
            if let Some(mut w) = self.shared.writer.try_lock() {
                let mut result = Ok(());
                for item in out {
                    result = result.and_then(|()| self.shared.send(&mut w, item));
                }
                if let Err(e) = result.and_then(|()| w.flush()) {
                    drop(w);
                    self.shared.kill(self.shared.failure(format!("send failed: {e}")));
                }
                return;
            }
        }
        for item in out {
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            if self.tx.send(item).is_err() {
                self.shared.kill(self.shared.failure("the lane's writer has stopped"));
                return;
            }
        }
    }
}

/// The pooled TCP connections to one peer instance.
pub(crate) struct TcpConn {
    lanes: Vec<Lane>,
    rr: AtomicUsize,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.close(None);
    }
}

/// Connects to `addr`, sends Hello and reads HelloAck, all within the deadlines.
/// Returns the stream (read timeout set to [`POLL`]) and the peer's instance id.
pub(crate) fn handshake(
    peer: &str,
    addr: SocketAddr,
    expect: Option<InstanceId>,
    deadlines: &Deadlines,
) -> Result<(TcpStream, InstanceId)> {
    let unreachable = |what: &str, e: &io::Error| Error::PeerUnreachable {
        peer: peer.to_string(),
        reason: format!("{what} {addr}: {e}"),
    };
    let stream = TcpStream::connect_timeout(&addr, deadlines.connect)
        .map_err(|e| unreachable("connect to", &e))?;
    stream.set_nodelay(true).map_err(|e| unreachable("set_nodelay on", &e))?;
    stream.set_write_timeout(Some(deadlines.stall)).map_err(|e| unreachable("configure", &e))?;
    stream.set_read_timeout(Some(deadlines.handshake)).map_err(|e| unreachable("configure", &e))?;
    let hello = Header::new(FrameKind::Hello, 0, 0, INSTANCE_LEN);
    let mut frame = hello.encode().to_vec();
    frame.extend_from_slice(&expect.map_or(0, |i| i.0).to_le_bytes());
    let (ack, payload) =
        exchange(&stream, &frame).map_err(|e| unreachable("handshake with", &e))?;
    if ack.kind != FrameKind::HelloAck || ack.status != Status::Ok || payload.len() != 16 {
        return Err(Error::Protocol {
            peer: peer.into(),
            reason: format!("bad hello answer {ack:?}"),
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&payload);
    stream.set_read_timeout(Some(POLL)).map_err(|e| unreachable("configure", &e))?;
    Ok((stream, InstanceId(u128::from_le_bytes(id))))
}

/// Sends one frame and reads one answer on a blocking stream whose timeouts are set.
pub(crate) fn exchange(stream: &TcpStream, frame: &[u8]) -> io::Result<(Header, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = stream;
    s.write_all(frame)?;
    let mut raw = [0u8; tidewire_core::wire::HEADER_LEN];
    s.read_exact(&mut raw)?;
    let h = Header::decode(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; h.payload_len() as usize];
    s.read_exact(&mut payload)?;
    Ok((h, payload))
}

impl TcpConn {
    /// Opens `lanes` connections to the peer instance `expect` at `addr`.
    pub(crate) fn connect(
        peer: &str,
        addr: SocketAddr,
        expect: InstanceId,
        lanes: usize,
        deadlines: &Deadlines,
        life: &Arc<Lifecycle>,
    ) -> Result<Arc<Self>> {
        let mut built = Vec::with_capacity(lanes);
        for i in 0..lanes.max(1) {
            let (stream, found) = handshake(peer, addr, Some(expect), deadlines)?;
            if found != expect {
                return Err(Error::PeerUnreachable {
                    peer: peer.into(),
                    reason: format!("the peer restarted (instance {found}, expected {expect})"),
                });
            }
            built.push(Self::start_lane(peer, i, stream, deadlines, life)?);
        }
        Ok(Arc::new(Self { lanes: built, rr: AtomicUsize::new(0) }))
    }

    fn start_lane(
        peer: &str,
        index: usize,
        stream: TcpStream,
        deadlines: &Deadlines,
        life: &Arc<Lifecycle>,
    ) -> Result<Lane> {
        let clone = |s: &TcpStream| {
            s.try_clone().map_err(|e| Error::io(format!("cloning socket to {peer}"), &e))
        };
        let shared = Arc::new(LaneShared {
            peer: peer.to_string(),
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            stream: clone(&stream)?,
            writer: Mutex::new(FrameWriter::new(clone(&stream)?, IO_BUFFER)),
            queued: AtomicUsize::new(0),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader = FrameReader::new(stream, IO_BUFFER, deadlines.stall);
        let (s1, s2, l1) = (shared.clone(), shared.clone(), life.clone());
        life.spawn(format!("tw-lane{index}-w"), move || writer_loop(&s1, &rx))?;
        let stall = deadlines.stall;
        life.spawn(format!("tw-lane{index}-r"), move || reader_loop(&s2, reader, &l1, stall))?;
        Ok(Lane { shared, tx, next_tag: AtomicU64::new(1) })
    }

    /// Closes every lane; pending requests fail with `err` (default: closed by this engine).
    pub(crate) fn close(&self, err: Option<Error>) {
        for lane in &self.lanes {
            let e = err
                .clone()
                .unwrap_or_else(|| lane.shared.failure("the connection was closed by this engine"));
            lane.shared.kill(e);
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.lanes.iter().any(|l| l.shared.dead.load(Ordering::Acquire))
    }

    /// Splits the batch's TCP work into chunks, spreads them over the lanes and sends them.
    fn dispatch(&self, batch: &Arc<Batch>, works: Vec<Work>) {
        let mut per_lane: Vec<Vec<Item<'_>>> = (0..self.lanes.len()).map(|_| Vec::new()).collect();
        let mut next = self.rr.fetch_add(1, Ordering::Relaxed);
        for work in works {
            let (req, entry, local, remote, len, write) = match work {
                Work::Write { req, entry, src, dst, len } => (req, entry, src, dst, len, true),
                Work::Read { req, entry, dst, src, len } => (req, entry, dst, src, len, false),
            };
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                let (l, r) = (local + off, remote + off);
                let item: Item<'_> = if write {
                    let pending =
                        Pending::Chunk { batch: batch.clone(), req, read_into: None, len: n };
                    let entry = entry.clone();
                    (
                        pending,
                        Box::new(move |tag| Outgoing::Write { tag, dst: r, src: l, len: n, entry }),
                    )
                } else {
                    let read_into = Some((entry.clone(), l));
                    let pending = Pending::Chunk { batch: batch.clone(), req, read_into, len: n };
                    (
                        pending,
                        Box::new(move |tag| Outgoing::Frame {
                            header: Header::new(FrameKind::Read, tag, r, n),
                            payload: Vec::new(),
                        }),
                    )
                };
                per_lane[next % self.lanes.len()].push(item);
                next += 1;
                off += n;
            }
        }
        for (lane, items) in self.lanes.iter().zip(per_lane) {
            if !items.is_empty() {
                lane.submit(items);
            }
        }
    }

    /// Sends a batch's notification (after its data is visible).
    pub(crate) fn send_notify(&self, batch: Arc<Batch>, payload: Vec<u8>) {
        let len = payload.len() as u64;
        self.lanes[0].submit(vec![(
            Pending::Trailer(batch),
            Box::new(move |tag| Outgoing::Frame {
                header: Header::new(FrameKind::Notify, tag, 0, len),
                payload,
            }),
        )]);
    }
}

fn writer_loop(lane: &LaneShared, rx: &Receiver<Outgoing>) {
    loop {
        let first = match rx.recv_timeout(POLL) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) if !lane.dead.load(Ordering::Acquire) => continue,
            Err(_) => return,
        };
        let mut w = lane.writer.lock();
        lane.queued.fetch_sub(1, Ordering::AcqRel);
        let mut result = lane.send(&mut w, first);
        while result.is_ok() {
            match rx.try_recv() {
                Ok(item) => {
                    lane.queued.fetch_sub(1, Ordering::AcqRel);
                    result = lane.send(&mut w, item);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = result.and_then(|()| w.flush()) {
            drop(w);
            lane.kill(lane.failure(format!("send failed: {e}")));
            return;
        }
    }
}

/// Reads answers until the lane fails. A peer that sends nothing for `stall` while requests
/// are pending (a host that vanished without a reset) fails them then, not at the batch
/// deadline, which grows with the batch's size.
fn reader_loop(lane: &LaneShared, mut r: FrameReader, life: &Lifecycle, stall: Duration) {
    let last_heard = Cell::new(Instant::now());
    let silent = Cell::new(false);
    let err = loop {
        let mut idle = || {
            if life.stopping() || lane.dead.load(Ordering::Acquire) {
                return false;
            }
            if lane.pending.lock().is_empty() {
                last_heard.set(Instant::now());
            } else if last_heard.get().elapsed() >= stall {
                silent.set(true);
                return false;
            }
            true
        };
        let raw = match r.next_header(&mut idle) {
            Ok(Some(raw)) => raw,
            Ok(None) => break lane.failure("the peer closed the connection"),
            Err(_) if silent.get() => {
                break lane.failure(format!(
                    "the peer sent nothing for {stall:?} while requests were pending"
                ))
            }
            Err(e) => break lane.failure(format!("receive failed: {e}")),
        };
        last_heard.set(Instant::now());
        let h = match Header::decode(&raw) {
            Ok(h) => h,
            Err(e) => break Error::Protocol { peer: lane.peer.clone(), reason: e.to_string() },
        };
        if let Err(e) = complete(lane, &mut r, h) {
            break e;
        }
    };
    let err = if life.stopping() { Error::ShuttingDown { who: "this engine".into() } } else { err };
    lane.kill(err);
}

/// Handles one response frame.
fn complete(lane: &LaneShared, r: &mut FrameReader, h: Header) -> Result<()> {
    let io_err = |e: io::Error| lane.failure(format!("receive failed: {e}"));
    let Some(pending) = lane.pending.lock().remove(&h.tag) else {
        return Err(Error::Protocol {
            peer: lane.peer.clone(),
            reason: format!("answer to unknown tag {}", h.tag),
        });
    };
    match (h.kind, pending) {
        (FrameKind::WriteAck, Pending::Chunk { batch, req, read_into: None, len }) => {
            if h.status == Status::Ok {
                batch.chunk_done(req);
            } else {
                batch.fail_request(req, Error::from_status(h.status, &lane.peer, h.addr, len));
            }
        }
        (
            FrameKind::ReadData,
            Pending::Chunk { batch, req, read_into: Some((entry, dst)), len },
        ) => {
            if h.status != Status::Ok {
                batch.fail_request(req, Error::from_status(h.status, &lane.peer, h.addr, len));
                return Ok(());
            }
            if h.len != len {
                let reason = format!("READ answer of {} bytes for {len} asked", h.len);
                batch.fail_request(
                    req,
                    Error::Protocol { peer: lane.peer.clone(), reason: reason.clone() },
                );
                return Err(Error::Protocol { peer: lane.peer.clone(), reason });
            }
            let landed = {
                // The gate keeps the request pending (the caller has not been told it failed)
                // and the pin keeps the local range registered while the bytes land.
                let gate = batch.accepts_data(req);
                let pinned = entry.pin(dst, len);
                match (gate, pinned) {
                    (Some(_gate), Some(pinned)) => {
                        r.read_into(&pinned).map_err(io_err)?;
                        true
                    }
                    _ => {
                        r.discard(len).map_err(io_err)?;
                        false
                    }
                }
            };
            if landed {
                batch.chunk_done(req);
            }
        }
        (FrameKind::NotifyAck, Pending::Trailer(batch)) => {
            if h.status == Status::Ok {
                batch.trailer_done();
            } else {
                batch.trailer_failed(Error::from_status(h.status, &lane.peer, 0, 0));
            }
        }
        (kind, pending) => {
            let err = Error::Protocol {
                peer: lane.peer.clone(),
                reason: format!("unexpected {kind:?} answer"),
            };
            pending.fail(err.clone());
            return Err(err);
        }
    }
    Ok(())
}

/// The `tcp` transport: each peer's lanes (made on first use, with their own threads) carry
/// the batch's requests in chunks.
pub(crate) struct TcpTransport {
    config: EngineConfig,
    life: Arc<Lifecycle>,
}

impl TcpTransport {
    pub(crate) fn new(config: EngineConfig, life: Arc<Lifecycle>) -> Self {
        Self { config, life }
    }
}

/// A batch's tcp work, per peer, sent once the batch is planned.
struct TcpSubmission<'a> {
    transport: &'a TcpTransport,
    batch: &'a Arc<Batch>,
    ctx: BatchCtx,
    work: Vec<(Arc<PeerConn>, Vec<Work>)>,
}

impl Transport for TcpTransport {
    fn serves(&self) -> &'static [TransportKind] {
        &[TransportKind::Tcp]
    }

    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, ctx: BatchCtx) -> Box<dyn Submission + 'a> {
        Box::new(TcpSubmission { transport: self, batch, ctx, work: Vec::new() })
    }
}

impl Submission for TcpSubmission<'_> {
    fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize> {
        if self.ctx.complete_on.is_some() {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "complete_on: request {from} goes over tcp to {}, whose bytes land on a \
                     host thread that a CUDA stream cannot wait for",
                    step.conn.name
                ),
            });
        }
        let end = step.run_end(requests, from + 1);
        self.batch.set_chunks(from..end, |i| requests[i].len.div_ceil(CHUNK) as u32);
        let works = (from..end).map(|req| {
            let r = &requests[req];
            let (entry, len) = (step.local.clone(), r.len);
            match r.op {
                Op::Write => Work::Write { req, entry, src: r.local, dst: r.remote, len },
                Op::Read => Work::Read { req, entry, dst: r.local, src: r.remote, len },
            }
        });
        match self.work.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &step.conn)) {
            Some((_, w)) => w.extend(works),
            None => self.work.push((step.conn.clone(), works.collect())),
        }
        Ok(end)
    }

    fn finish(self: Box<Self>, _requests: &[Request]) {
        let (cfg, life) = (&self.transport.config, &self.transport.life);
        for (conn, works) in self.work {
            match conn.tcp(cfg, life) {
                Ok(c) => c.dispatch(self.batch, works),
                Err(e) => {
                    for w in works {
                        let (Work::Write { req, .. } | Work::Read { req, .. }) = w;
                        self.batch.fail_request(req, e.clone());
                    }
                }
            }
        }
    }

    fn abort(self: Box<Self>, _until: Instant) {}
}
