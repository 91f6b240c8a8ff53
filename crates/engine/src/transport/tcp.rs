//! The TCP transport: a few persistent connections (lanes) per peer, served by the engine's
//! readiness loop (`reactor.rs`), so a peer costs sockets, not threads. A submitting thread
//! queues a lane's frames and, when the lane is idle and the batch small, writes them itself
//! (one thread hop less on the latency path); the loop writes the rest, streaming large
//! payloads straight from registered memory, reads the answers, completes chunks and streams
//! READ data straight into registered memory. The handshake and the stall detection are the
//! sans-io machines of `tidewire_core` (`handshake`, `stall`), fed by the loop's clock. A lane
//! that fails fails every request pending on it, with the reason.
//!
//! `tcp/lane.rs` holds one lane (both sides of it); `tcp/oneshot.rs` the blocking one-shot
//! exchanges (descriptor fetches, probes, name claims).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::RecvTimeoutError;
use tidewire_core::select::TransportKind;
use tidewire_core::wire::{FrameKind, Header};
use tidewire_core::InstanceId;

use crate::batch::{Batch, Mark};
use crate::config::{Credentials, Deadlines, EngineConfig};
use crate::error::{Error, PeerRef, Result};
use crate::frames::Item;
use crate::lifecycle::Lifecycle;
use crate::peer::PeerConn;
use crate::reactor::SWEEP;
use crate::registry::RegionEntry;
use crate::request::{Op, Request, Step};
use crate::transport::{BatchCtx, Submission, Transport};

mod lane;
mod oneshot;

use lane::{Lane, Queued};
pub(crate) use oneshot::{exchange, handshake, read_frame, run_handshake};

/// Requests larger than this are split into chunks spread over the lanes.
pub(crate) const CHUNK: u64 = 4 << 20;

/// A lane's total payload up to which the submitting thread writes the frames itself (when
/// the lane is idle) instead of handing them to the loop: one thread hop less on the latency
/// path, and a batch's small frames leave in one flush.
const INLINE_BYTES: u64 = 256 << 10;

/// Bytes received, and bytes sent, per turn of one lane before the loop serves others.
const BUDGET: u64 = 4 << 20;

/// What a lane waits for an answer to.
enum Pending {
    /// A chunk of request `req` at local address `local`. For READ, the data lands there,
    /// inside `read_into`.
    Chunk {
        batch: Arc<Batch>,
        req: usize,
        local: u64,
        len: u64,
        read_into: Option<Arc<RegionEntry>>,
    },
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

    /// The frame of this chunk could not be sent: its local memory was unregistered.
    fn refused(self) {
        match self {
            Pending::Chunk { batch, req, local, len, .. } => {
                batch.fail_request(req, Error::NotRegistered { addr: local, len })
            }
            Pending::Trailer(batch) => {
                batch.trailer_failed(Error::Internal("a notification refused"))
            }
        }
    }
}

/// One request's share of a TCP batch, before it is split into chunks: `len` bytes between
/// local `local` (inside `entry`) and remote `remote`, in the direction of `op`.
struct Work {
    req: usize,
    op: Op,
    entry: Arc<RegionEntry>,
    local: u64,
    remote: u64,
    len: u64,
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

impl TcpConn {
    /// Opens `lanes` connections to the peer instance `expect` at `addr`; their handshakes
    /// run on the readiness loop, together, within the handshake deadline.
    pub(crate) fn connect(
        peer: &PeerRef,
        addr: SocketAddr,
        expect: InstanceId,
        lanes: usize,
        deadlines: &Deadlines,
        creds: &Credentials,
        life: &Arc<Lifecycle>,
    ) -> Result<Arc<Self>> {
        let reactor = life.reactor()?;
        let mut built = Vec::with_capacity(lanes);
        let mut waits = Vec::with_capacity(lanes);
        for _ in 0..lanes.max(1) {
            match Lane::open(peer, addr, expect, deadlines, creds, &reactor) {
                Ok((lane, rx)) => {
                    built.push(lane);
                    waits.push(rx);
                }
                Err(e) => {
                    // The lanes already open would sit on the loop, idle, for good.
                    for lane in &built {
                        lane.close(Some(e.clone()));
                    }
                    return Err(e);
                }
            }
        }
        let conn = Arc::new(Self { lanes: built, rr: AtomicUsize::new(0) });
        // The machine fails the handshake at its deadline; this bound only covers a loop
        // that stopped running.
        let limit = Instant::now() + deadlines.handshake + 4 * SWEEP;
        for rx in waits {
            match rx.recv_deadline(limit) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Timeout) => {
                    let reason = format!("the handshakes with {addr} did not end in time");
                    return Err(Error::PeerUnreachable { peer: peer.clone(), reason });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::ShuttingDown { who: "this engine".into() });
                }
            }
        }
        Ok(conn)
    }

    /// Closes every lane; pending requests fail with `err` (default: closed by this engine).
    pub(crate) fn close(&self, err: Option<Error>) {
        for lane in &self.lanes {
            lane.close(err.clone());
        }
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.lanes.iter().any(Lane::is_dead)
    }

    /// Splits the batch's TCP work into chunks, spreads them over the lanes and sends them.
    fn dispatch(&self, batch: &Arc<Batch>, works: Vec<Work>) {
        batch.mark(Mark::FirstByte);
        let mut per_lane: Vec<Vec<Queued<'_>>> =
            (0..self.lanes.len()).map(|_| Vec::new()).collect();
        let mut next = self.rr.fetch_add(1, Ordering::Relaxed);
        for work in works {
            let Work { req, op, entry, local, remote, len } = work;
            let write = op == Op::Write;
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                let (l, r) = (local + off, remote + off);
                let item: Queued<'_> = if write {
                    let pending = Pending::Chunk {
                        batch: batch.clone(),
                        req,
                        local: l,
                        len: n,
                        read_into: None,
                    };
                    let entry = entry.clone();
                    (
                        pending,
                        Box::new(move |tag| Item::Memory {
                            header: Header::new(FrameKind::Write, tag, r, n).encode(),
                            entry,
                            addr: l,
                            len: n,
                            refusal: None,
                            tag,
                        }),
                    )
                } else {
                    let read_into = Some(entry.clone());
                    let pending =
                        Pending::Chunk { batch: batch.clone(), req, local: l, len: n, read_into };
                    (
                        pending,
                        Box::new(move |tag| Item::Frame {
                            header: Header::new(FrameKind::Read, tag, r, n).encode(),
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
            Box::new(move |tag| Item::Frame {
                header: Header::new(FrameKind::Notify, tag, 0, len).encode(),
                payload,
            }),
        )]);
    }
}
/// The `tcp` transport: each peer's lanes (made on first use, served by the engine's
/// readiness loop) carry the batch's requests in chunks.
pub(crate) struct TcpTransport {
    config: EngineConfig,
    life: Arc<Lifecycle>,
}

impl TcpTransport {
    /// Starts the engine's readiness loop now, so that its threads exist from the start and
    /// never grow with peers (a failure here is retried, and reported, on first use).
    pub(crate) fn new(config: EngineConfig, life: Arc<Lifecycle>) -> Self {
        if let Err(e) = life.reactor() {
            log::warn!("the I/O loop did not start (retried on first use): {e}");
        }
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
            let entry = step.local.clone();
            Work { req, op: r.op, entry, local: r.local, remote: r.remote, len: r.len }
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
                        self.batch.fail_request(w.req, e.clone());
                    }
                }
            }
        }
    }

    fn abort(self: Box<Self>, _until: Instant) {}
}
