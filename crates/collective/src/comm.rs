//! The communicator: one rank of a group, its byte channels to every other rank, and the
//! collectives on top of them.
//!
//! Channels. Every ordered pair of ranks (s → r) has a ring in r's shared memory (a region
//! r allocates with the engine and publishes through the group's store): a header with two
//! monotonic byte counters, `tail` (written by s) and `head` (written by r), and `cap` bytes of
//! data. s maps its ring in r's region with `Engine::map_peer` (same-host peers, over shm) and
//! copies into it; r copies out of its own memory. Bytes flow in order, so matching operations
//! issued in the same order on both sides pair up, as in every collective library.
//!
//! Progress. An operation is a set of transfers (sends and receives) advanced together by one
//! loop on the caller's thread until all are done: a rank sends to one neighbour while it
//! receives from another, so rings of any size never deadlock. Transfers on one channel advance
//! in order, pending `isend`/`irecv` first. Every wait has the group's deadline and watches
//! the liveness of the ranks it waits for: a dead rank is an error naming it at once, a stopped
//! one a timeout naming it.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidewire::{BatchOptions, Engine, MappedPeer, Op, PeerId, Request};

use crate::dtype::{finish_avg, reduce_into, DType, ReduceOp};
use crate::error::{Error, Result};
use crate::pipes::{self, Flow, Made, Pipes};
use crate::plan::{all_gather_step, blocks, reduce_scatter_step, ring_neighbours};

/// Bytes before a ring's data: the tail pair (value, !value) at 0, the head pair at 64
/// (separate cache lines), and the sender's abort word at 96.
const HEADER: u64 = 128;
/// Offsets of the counter pairs in a ring's header.
const TAIL: u64 = 0;
const HEAD: u64 = 64;
const ABORT: u64 = 96;
/// All-reduces up to this size send the whole buffer to every rank (one step, lowest latency);
/// larger ones run a ring (each rank moves 2·(n−1)/n of the buffer).
const DIRECT_ALL_REDUCE: usize = 64 << 10;

/// What a rank publishes for its peers: its engine's segment name and its receive region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: String,
    pub region: u64,
    /// The rank's process id, when it runs on this host (for single-copy reads of its
    /// buffers, `process_vm_readv`).
    pub pid: Option<u32>,
}

/// Bytes from which collectives between processes of one host read each other's buffers
/// directly (one copy, `process_vm_readv`) instead of going through the rings (two).
const DIRECT_MIN: usize = 1 << 20;
/// The same for one pair of an all-to-all (the bytes it moves both ways).
const DIRECT_PAIR_MIN: usize = 256 << 10;
/// Groups from which every direct pair of an all-to-all moves its blocks through its pipes
/// (see `pipes`): what pipes avoid is the contention of several ranks reading one rank's
/// memory (4 ranks' 1–4 MiB took 129–308 µs through pipes against 180–447 by reads; NOTES §70).
const PIPES_MIN_RANKS: usize = 3;
/// The bytes (both ways) for which the pair of a group of two moves its blocks through its
/// pipes; outside, it reads. Each rank's memory has one reader there, and nothing contends:
/// below 1 MiB the reads' fewer system calls win (256 KiB: 44–58 µs against 54–68), from
/// 8 MiB reads split over threads beat a pipe's one stream (8 MiB: 451–492 µs against
/// 645–735); between, the pipes skip the address round (1 MiB: 104–123 µs against 119–139;
/// 2 MiB 217–220 against 230–260). Measured on a 16-CPU host, NOTES §70.
const TWO_RANKS_PIPED: Range<usize> = (1 << 20)..(8 << 20);

/// A rank's receive region: one ring per source rank.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub addr: u64,
    pub len: u64,
    /// Data bytes per ring.
    pub cap: u64,
}

impl Region {
    /// Bytes of one ring (header and data).
    fn slot(cap: u64) -> u64 {
        HEADER + cap
    }

    /// Allocates (and registers) the receive region of a rank of a group of `size`, with rings
    /// of `cap` bytes (rounded up to 4 KiB).
    pub fn allocate(engine: &Engine, size: usize, cap: u64) -> Result<Self> {
        let cap = cap.max(4096).div_ceil(4096) * 4096;
        let len = Self::slot(cap) * size as u64;
        let addr = engine.allocate_shared(len).map_err(|source| Error::Engine {
            context: format!("allocating the {len}-byte receive region"),
            source,
        })?;
        // SAFETY: the region was just allocated, at least one slot long; this word of slot
        // 0's header is written by nobody else (the counters sit at TAIL, HEAD and ABORT).
        unsafe { std::ptr::write((addr + MARKER) as *mut u64, marker(addr, std::process::id())) };
        Ok(Self { addr, len, cap })
    }
}

/// Where a region carries its marker (in slot 0's header, between the TAIL and HEAD
/// counters).
const MARKER: u64 = 32;

/// The word a region of process `pid` at `addr` carries at [`MARKER`]: a rank that reads it
/// through `process_vm_readv` knows it reached that very process (a process id of another PID
/// namespace would name someone else).
fn marker(addr: u64, pid: u32) -> u64 {
    addr ^ (u64::from(pid) << 32) ^ 0x7477_6469_7265_6374
}

/// One ring, by its base address in this process (header first, then the data).
struct Ring {
    base: u64,
    cap: u64,
}

impl Ring {
    fn counter(&self, offset: u64) -> &AtomicU64 {
        // SAFETY: `base` is the start of a ring inside a mapping (our own shared region or a
        // peer's, mapped by `map_peer`) that the communicator holds for its whole life; the
        // header is 64-byte aligned (regions are page-aligned, slots multiples of 64 bytes),
        // and every access to the counters is atomic, from either process.
        unsafe { &*((self.base + offset) as *const AtomicU64) }
    }

    /// A counter stored as the pair (value, !value) at `offset`: `None` while the pair does
    /// not match (an update in progress, or a torn copy by a transfer).
    fn load_pair(&self, offset: u64) -> Option<u64> {
        let v = self.counter(offset).load(Ordering::Acquire);
        let check = self.counter(offset + 8).load(Ordering::Acquire);
        (check == !v).then_some(v)
    }

    /// Publishes `v` as the pair at `offset` (the check word first, then the value, released).
    fn store_pair(&self, offset: u64, v: u64) {
        self.counter(offset + 8).store(!v, Ordering::Relaxed);
        self.counter(offset).store(v, Ordering::Release);
    }

    /// Set by the sender when an operation failed on its side: 1 + the rank it blames.
    fn abort(&self) -> &AtomicU64 {
        self.counter(ABORT)
    }

    fn data(&self) -> u64 {
        self.base + HEADER
    }

    /// The `dst.len()` (at most `cap`) bytes from offset `at` of the data, wrapping at its end.
    ///
    /// # Safety
    /// Those bytes were written by the sender before it published the tail we read (acquire),
    /// and it does not write them again before we publish a head beyond them.
    unsafe fn copy_out(&self, at: u64, dst: &mut [u8]) {
        let first = ((self.cap - at) as usize).min(dst.len());
        // SAFETY: `[at, at + first)` and `[0, dst.len() - first)` lie in the ring's data
        // (`at < cap`, `dst.len() <= cap`), written as the caller vouches; `dst` is ours.
        unsafe {
            std::ptr::copy_nonoverlapping((self.data() + at) as *const u8, dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data() as *const u8,
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }
}

/// How this rank writes into its ring in a peer's region.
enum Out {
    /// Mapped into this process (a peer on this host): plain stores; the mapping tells
    /// whether the peer lives.
    Mapped { ring: Ring, map: MappedPeer, peer: PeerId },
    /// Through the engine's one-sided transfers (a peer on another host, or
    /// `TIDEWIRE_PG_CHANNEL=engine`): bytes are staged in our registered buffer `staging`
    /// (`cap` bytes, then 64 bytes of counter words) and written at the peer's `ring`; the
    /// counters travel as (value, !value) pairs, so a torn copy is never taken for a value.
    Remote { peer: PeerId, ring: u64, staging: u64 },
}

/// This rank's channels with one other rank.
struct Link {
    out: Out,
    /// The peer's process, when this process may read its memory (probed at connect).
    direct: Option<u32>,
    /// The pair's pipes for the all_to_all's large blocks (see `pipes`): set up at the first
    /// all_to_all that would send through them.
    pipes: PipeState,
    /// The peer's ring in our region (it writes).
    inp: Ring,
    /// Bytes we produced into our ring and consumed from the peer's (our copies of the
    /// counters), and the last valid counters we read of the other side.
    sent: u64,
    received: u64,
    head_seen: u64,
    tail_seen: u64,
}

/// Whether a pair moves its all_to_all blocks through pipes (see `pipes`).
enum PipeState {
    /// Not set up yet: both ends are, at the pair's first all_to_all that would use them.
    Untried,
    Ready(Pipes),
    /// Refused by either end (or dropped): the pair reads.
    Refused,
}

impl Link {
    /// The next 16 bytes the peer sent us, not taken (`None`: not all of them arrived yet).
    /// Only a message's start when no receive from this peer is under way.
    fn peek16(&mut self) -> Option<[u8; 16]> {
        let ring = &self.inp;
        if let Some(t) = ring.load_pair(TAIL) {
            self.tail_seen = self.tail_seen.max(t);
        }
        if self.tail_seen - self.received < 16 {
            return None;
        }
        let mut b = [0u8; 16];
        // SAFETY: the 16 bytes from `received` were written by the peer before it published
        // the tail just read, and it writes them again only after we publish a head beyond.
        unsafe { ring.copy_out(self.received % ring.cap, &mut b) };
        Some(b)
    }

    /// Why the peer is gone, once the mapping knows (remote peers fail their transfers).
    fn peer_error(&self) -> Option<tidewire::Error> {
        match &self.out {
            Out::Mapped { map, .. } => map.error(),
            Out::Remote { .. } => None,
        }
    }
}

/// One transfer of an operation: bytes to a rank or from a rank, and how far it got.
#[derive(Debug, Clone, Copy)]
enum Xfer {
    Send {
        peer: usize,
        src: u64,
        len: u64,
        done: u64,
    },
    /// With `reduce`, the bytes are reduced into `dst` (`dst op received`) as they arrive,
    /// straight out of the ring, instead of copied. With `expect`, a collective's header
    /// (16 bytes): checked as soon as it arrived, before the channel's next bytes are taken.
    Recv {
        peer: usize,
        dst: u64,
        len: u64,
        done: u64,
        reduce: Option<(DType, ReduceOp)>,
        expect: Option<[u8; 16]>,
    },
}

impl Xfer {
    fn finished(&self) -> bool {
        match *self {
            Self::Send { len, done, .. } | Self::Recv { len, done, .. } => done >= len,
        }
    }

    /// The channel it uses: (peer, is a send).
    fn channel(&self) -> (usize, bool) {
        match *self {
            Self::Send { peer, .. } => (peer, true),
            Self::Recv { peer, .. } => (peer, false),
        }
    }
}

/// Handle of a pending `isend` / `irecv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId(pub u64);

/// One rank of a group.
pub struct Comm {
    rank: usize,
    size: usize,
    timeout: Duration,
    engine: Arc<Engine>,
    region: Region,
    links: Vec<Option<Link>>,
    /// Our staging buffers for peers reached through engine transfers.
    stagings: Vec<u64>,
    /// `isend`/`irecv` not finished yet, in issue order.
    pending: Vec<(OpId, Xfer)>,
    next_op: u64,
    /// The first failure and the ranks it named: every later operation fails with it, naming
    /// them (`get_failed_ranks_hint` of a failure a poll found says who failed).
    poisoned: Option<(String, Vec<usize>)>,
    /// Every pair of ranks of the group reads each other's memory directly (agreed at
    /// connect: algorithms that involve every pair take the single-copy path alike).
    group_direct: bool,
    /// Every rank's stage for collectives staged through shared memory (set up at the first
    /// collective of a staged size, when every rank maps every other's memory).
    stage: Staging,
    /// The sizes staged: from the first to the second per rank (`TIDEWIRE_PG_STAGED_MIN` /
    /// `_MAX`, or [`Comm::set_staged_sizes`]).
    staged_sizes: (usize, usize),
    /// Threads a large direct read (and all_reduce's reduction of it) is spread over.
    readers: Readers,
    /// The algorithm of the collective in progress (or the last), for the metrics.
    algorithm: &'static str,
    /// The phases of the direct-read collective in progress (timed when tracing).
    phases: Phases,
    /// The deadline of waits for point-to-point operations (`isend`/`irecv`), when it is not
    /// the group's timeout.
    p2p_timeout: Option<Duration>,
    /// Every point-to-point message travels behind a 16-byte header (its tag and length):
    /// the headers of pending sends and receives, by the operation of their message.
    headers: Vec<Header>,
    /// Receives from any rank (`irecv_any`) not bound to a rank's message yet, in issue order.
    anys: Vec<AnyRecv>,
    /// The rank each bound receive from any rank took its message from (the newest
    /// [`SOURCES_KEPT`], until asked for with [`Comm::take_source`]).
    sources: std::collections::VecDeque<(OpId, usize)>,
    /// The rank a receive from any rank looks at first (the one after the last bound: no rank
    /// is starved by a busier one).
    any_next: usize,
    /// Collectives called so far: every round of collective `seq` sends each peer it talks
    /// to a header naming it (`coll_header`), checked by the receiver before the round's
    /// bytes, so ranks out of step (different collectives, or one rank a call ahead) fail
    /// naming both calls instead of taking each other's bytes.
    seq: u64,
    /// A pause before the next direct-read collective's reads (tests: a rank late to a call,
    /// as a stopped or descheduled process is).
    late_for_test: Option<Duration>,
    /// Makes no pipe when its pairs set theirs up (for tests: a rank whose kernel refuses).
    refuse_pipes: bool,
    /// A pause in the next pipes, once every block is sent and before the reads (for tests).
    pause_in_pipes: Option<Duration>,
}

/// A point-to-point message's header: `(tag, length)` as 16 bytes, in a box that stays put
/// while its transfer runs; for a receive, what the caller expects, checked as soon as the
/// header has arrived (before the message's bytes are taken).
struct Header {
    /// The message's operation (the caller's id) and the header's own.
    op: OpId,
    own: OpId,
    peer: usize,
    bytes: Box<[u8; 16]>,
    expect: Option<(u64, u64)>,
}

/// A receive from whichever rank's message comes first: `len` bytes of tag `tag` into `dst`.
struct AnyRecv {
    id: OpId,
    dst: u64,
    len: u64,
    tag: u64,
}

/// The second half of a staged piece's first-round word (its length the first).
const STAGED_WORD: &[u8; 8] = b"twstaged";

/// How many sources of bound receives from any rank a communicator remembers (a caller that
/// never asks for them does not grow it without end).
const SOURCES_KEPT: usize = 1024;

/// Threads for one rank's large direct reads: `TIDEWIRE_PG_COPY_THREADS`, else the host's
/// CPUs shared among the group's ranks, at most four (one core copies a few GB/s; the
/// host's memory takes many times that).
fn readers(size: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fair = (cpus / size.max(1)).clamp(1, 4);
    env_usize("TIDEWIRE_PG_COPY_THREADS").map_or(fair, |n| n.clamp(1, 64))
}

/// A whole number from the environment (`None`: unset or not a number).
fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.trim().parse::<usize>().ok())
}

/// Bytes below which a reduction's reads stay on the caller's thread, and the least a reader
/// thread takes (a thread costs tens of µs to start; one core copies a few hundred KiB in
/// that time). `TIDEWIRE_PG_REDUCE_SPLIT_MIN` and `TIDEWIRE_PG_REDUCE_PIECE_MIN` tune them.
/// Measured on a 16-CPU host (NOTES §49): 4 ranks' all_reduce of 1 MiB 429 -> 330 µs (median
/// of three runs) with 256 / 64 KiB instead of 512 / 128 KiB, larger sizes unchanged.
const SPLIT_MIN: usize = 256 << 10;
const PIECE_MIN: usize = 64 << 10;
/// The same for plain reads (all_gather, all_to_all: `read_all`), whose threads only copy:
/// one thread below 1 MiB, pieces of at least 1 MiB (or half the bytes) above — measured on
/// 16- and 32-CPU hosts (NOTES §36, §46). `TIDEWIRE_PG_READ_SPLIT_MIN` and
/// `TIDEWIRE_PG_READ_PIECE_MIN` (bytes) tune them.
const READ_SPLIT_MIN: usize = 1 << 20;
const READ_PIECE_MIN: usize = 1 << 20;

/// The same for the copies and reductions of staged collectives (`TIDEWIRE_PG_SHARED_SPLIT_MIN`,
/// `TIDEWIRE_PG_SHARED_PIECE_MIN`).
const SHARED_SPLIT_MIN: usize = 128 << 10;
const SHARED_PIECE_MIN: usize = 64 << 10;

/// Staging of collectives through shared memory between the processes of one host: each rank
/// copies its bytes into a stage of its own, which every rank of the group maps, and the
/// others copy (or reduce) from there with plain loads. No system call and no page pinning,
/// where `process_vm_readv` pins every 4 KiB page it copies: two processes of the 16-CPU host
/// read each other's 2 MiB (heap memory) that way in 160-190 µs with 2-8 threads, against
/// 15-56 µs for the same bytes through shared memory (NOTES §54). The ranks agree on the
/// settings when the first collective of a staged size sets the stages up (a rank whose differ
/// stages nothing, and nor does the group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StageSettings {
    /// Bytes of each rank's stage (`TIDEWIRE_PG_STAGE_BYTES`, a multiple of 4 KiB; 0: no
    /// staging). Larger collectives pass through it in pieces of this size.
    cap: usize,
    /// Collectives of `min` to `max` × ranks bytes are staged (`TIDEWIRE_PG_STAGED_MIN`, and
    /// `TIDEWIRE_PG_STAGED_MAX` per rank): all_reduce's buffer, all_gather's output,
    /// reduce_scatter's input. Measured on a 16-CPU host (NOTES §55): staged beat the direct
    /// reads from 1 MiB to 4 MiB on 2 ranks and to 8 MiB on 4, and lost at 8 MiB on 2 (an extra
    /// copy of bytes that no longer stay in cache).
    min: usize,
    max: usize,
}

/// The settings in force (read once).
fn stage_settings() -> StageSettings {
    static AT: std::sync::OnceLock<StageSettings> = std::sync::OnceLock::new();
    *AT.get_or_init(|| StageSettings {
        cap: env_usize("TIDEWIRE_PG_STAGE_BYTES").unwrap_or(8 << 20).next_multiple_of(4096),
        min: env_usize("TIDEWIRE_PG_STAGED_MIN").unwrap_or(1 << 20),
        max: env_usize("TIDEWIRE_PG_STAGED_MAX").unwrap_or(2 << 20),
    })
}

/// Whether a group stages, as far as it knows.
enum Staging {
    /// No collective of a staged size yet: nothing allocated.
    Untried,
    /// Some rank could not stage (every rank logged why): nothing is staged.
    Refused,
    Ready(Stage),
}

/// Every rank's stage, as this rank maps it.
struct Stage {
    /// Bytes of each.
    cap: usize,
    /// Each rank's stage as mapped here, by rank; ours (at our rank) allocated and registered
    /// with the engine, freed with the communicator.
    at: Vec<u64>,
    /// The mappings of the others' stages (held for the communicator's life).
    maps: Vec<MappedPeer>,
}

/// `len` bytes at `addr` of a stage.
///
/// # Safety
/// `addr..addr + len` lies within a stage the communicator maps (mapped for its life), and
/// no rank writes those bytes while the slice lives (the collectives' rounds order it).
unsafe fn staged<'a>(addr: u64, len: usize) -> &'a [u8] {
    // SAFETY: forwarded contract.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// As [`staged`], to write: `len` bytes at `addr` of our own stage.
///
/// # Safety
/// As for [`staged`], and nobody (no rank, no other slice) reads or writes those bytes while
/// the slice lives.
#[allow(clippy::mut_from_ref)]
unsafe fn staged_mut<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    // SAFETY: forwarded contract.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// How a rank's reads of one call are cut among the reader threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// A reduction's reads (and all_reduce's reads of the reduced blocks): from
    /// [`SPLIT_MIN`], pieces of at least [`PIECE_MIN`].
    Reduction,
    /// Plain copies (all_gather, all_to_all): from [`READ_SPLIT_MIN`], pieces of at least
    /// [`READ_PIECE_MIN`].
    Copy,
    /// Copies and reductions of staged collectives (plain loads and stores in shared memory,
    /// no system call): from [`SHARED_SPLIT_MIN`], pieces of at least [`SHARED_PIECE_MIN`].
    Shared,
}

/// The (split, piece) thresholds in force for `cut`, read once.
fn thresholds(cut: Cut) -> (usize, usize) {
    type At = std::sync::OnceLock<(usize, usize)>;
    static REDUCE: At = At::new();
    static READ: At = At::new();
    static SHARED: At = At::new();
    let (at, what, split, piece) = match cut {
        Cut::Reduction => (&REDUCE, "REDUCE", SPLIT_MIN, PIECE_MIN),
        Cut::Copy => (&READ, "READ", READ_SPLIT_MIN, READ_PIECE_MIN),
        Cut::Shared => (&SHARED, "SHARED", SHARED_SPLIT_MIN, SHARED_PIECE_MIN),
    };
    *at.get_or_init(|| {
        let split = env_usize(&format!("TIDEWIRE_PG_{what}_SPLIT_MIN")).unwrap_or(split);
        let piece = env_usize(&format!("TIDEWIRE_PG_{what}_PIECE_MIN")).unwrap_or(piece);
        (split, piece.max(4096))
    })
}
/// How long each phase of a direct-read collective took, logged at trace level
/// (`TIDEWIRE_TRACE=tidewire_collective=trace`; nothing is timed otherwise).
struct Phases {
    /// When the last phase ended; None: tracing is off.
    last: Option<Instant>,
    took: Vec<Duration>,
}

impl Phases {
    fn new() -> Self {
        let on = log::log_enabled!(log::Level::Trace);
        Self { last: on.then(Instant::now), took: Vec::new() }
    }

    /// The phase in progress ends now.
    fn mark(&mut self) {
        if let Some(last) = self.last.as_mut() {
            let now = Instant::now();
            self.took.push(now - *last);
            *last = now;
        }
    }

    fn log(&self, rank: usize, op: &str, len: usize, names: &[&str]) {
        if self.last.is_none() {
            return;
        }
        // A collective that runs in pieces repeats the phases: each name sums its turns.
        let mut sums = vec![Duration::ZERO; names.len()];
        for (i, d) in self.took.iter().enumerate() {
            sums[i % names.len().max(1)] += *d;
        }
        let parts: Vec<String> = names
            .iter()
            .zip(&sums)
            .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e6))
            .collect();
        log::trace!("rank {rank}: {op} of {len} bytes: phases (µs) {}", parts.join(", "));
    }
}

/// Bytes a reader reduces at a time in all_reduce (read into a scratch block that stays in
/// cache, then summed into the buffer).
const REDUCE_CHUNK: usize = 256 << 10;

impl Comm {
    /// Connects rank `rank` of `size` ranks: opens every peer's engine by name, maps our ring
    /// in its region (`peers[r]` for every rank, ours included) and agrees with every rank on
    /// the pairs that read each other directly (two rounds: collective, within `timeout`,
    /// which bounds every later operation too). The communicator owns `region` from the call
    /// on: it is freed when it is dropped, or now if connecting fails.
    pub fn connect(
        engine: Arc<Engine>,
        rank: usize,
        region: Region,
        peers: &[PeerInfo],
        timeout: Duration,
    ) -> Result<Self> {
        let forced = std::env::var("TIDEWIRE_PG_CHANNEL").is_ok_and(|v| v == "engine");
        Self::connect_with(engine, rank, region, peers, timeout, forced)
    }

    /// As [`Comm::connect`]; with `via_engine`, every peer is reached through the engine's
    /// transfers even where its ring could be mapped (what a peer on another host gets).
    pub fn connect_with(
        engine: Arc<Engine>,
        rank: usize,
        region: Region,
        peers: &[PeerInfo],
        timeout: Duration,
        via_engine: bool,
    ) -> Result<Self> {
        let size = peers.len();
        let mut stagings = Vec::new();
        let built = if rank >= size {
            Err(Error::invalid(format!("rank {rank} of a group of {size}")))
        } else {
            Self::links(&engine, rank, region, peers, timeout, via_engine, &mut stagings)
        };
        let links = match built {
            Ok(links) => links,
            Err(e) => {
                // Nothing of a group that could not form stays allocated (its region included).
                for staging in stagings {
                    let _ = engine.free_shared(staging);
                }
                let _ = engine.free_shared(region.addr);
                return Err(e);
            }
        };
        let mut comm = Self {
            rank,
            size,
            timeout,
            engine,
            region,
            links,
            stagings,
            pending: Vec::new(),
            next_op: 0,
            poisoned: None,
            group_direct: false,
            stage: Staging::Untried,
            staged_sizes: (stage_settings().min, stage_settings().max),
            readers: Readers::new(readers(size)),
            algorithm: "local",
            phases: Phases::new(),
            p2p_timeout: None,
            headers: Vec::new(),
            anys: Vec::new(),
            sources: std::collections::VecDeque::new(),
            any_next: 0,
            seq: 0,
            late_for_test: None,
            refuse_pipes: false,
            pause_in_pipes: None,
        };
        comm.agree_direct()?;
        Ok(comm)
    }

    /// Allocates our stage and maps every other rank's (two rounds: each rank's stage address
    /// and size, then whether it mapped every other and its settings). The group stages only
    /// if every rank could (every peer on this host, its ring mapped) and all agree on the
    /// settings; else every rank logs why, and nothing is staged. Staging needs no leave to
    /// read another process's memory (`process_vm_readv`, which container runtimes often
    /// refuse): shared memory is enough.
    fn set_up_stage(&mut self, name: &str) -> Result<()> {
        let cfg = stage_settings();
        let (n, me) = (self.size, self.rank);
        let peers = self.others();
        let mut why: Option<String> = None;
        let mine = if cfg.cap == 0 {
            why = Some("TIDEWIRE_PG_STAGE_BYTES=0".into());
            None
        } else if cfg.cap / n < 4096 {
            // reduce_scatter stages a piece of every rank's block at once, whole pages each.
            why = Some(format!("a {}-byte stage is too small for {n} ranks", cfg.cap));
            None
        } else {
            match self.engine.allocate_shared(cfg.cap as u64) {
                Ok(a) => Some(a),
                Err(e) => {
                    why = Some(format!("allocating its {}-byte stage: {e}", cfg.cap));
                    None
                }
            }
        };
        let free = |engine: &Engine, mine: Option<u64>| {
            if let Some(a) = mine {
                if let Err(e) = engine.free_shared(a) {
                    log::warn!("rank {me}: freeing the stage: {e}");
                }
            }
        };
        let word = encode_block(mine.unwrap_or(0), cfg.cap);
        let theirs = match self.swap_words(name, &peers, |_| word) {
            Ok(t) => t,
            Err(e) => {
                free(&self.engine, mine);
                return Err(e);
            }
        };
        let mut at = vec![0u64; n];
        let mut maps = Vec::with_capacity(peers.len());
        if let Some(a) = mine {
            at[me] = a;
            for &r in &peers {
                let (addr, cap) = decode_block(&theirs[r]);
                let peer = match self.links[r].as_ref().map(|l| &l.out) {
                    Some(Out::Mapped { peer, .. }) => *peer,
                    _ => {
                        why = Some(format!("rank {r}'s ring is not mapped"));
                        break;
                    }
                };
                if addr == 0 {
                    why = Some(format!("rank {r} has no stage"));
                    break;
                }
                if cap != cfg.cap {
                    why = Some(format!(
                        "rank {r} stages {cap} bytes and rank {me} {} (TIDEWIRE_PG_STAGE_BYTES)",
                        cfg.cap
                    ));
                    break;
                }
                match self.engine.map_peer(peer, addr, cap as u64, None) {
                    Ok(m) => {
                        at[r] = m.addr();
                        maps.push(m);
                    }
                    Err(e) => {
                        why = Some(format!("mapping rank {r}'s stage: {e}"));
                        break;
                    }
                }
            }
        }
        // The sizes in force (the environment's, or `set_staged_sizes`), and whether this rank
        // can stage in the top byte of the first (sizes below 2^56 bytes).
        let (min, max) = self.staged_sizes;
        let settings = |ok: bool| {
            let mut w = [0u8; 16];
            w[..8].copy_from_slice(&(min as u64).to_le_bytes());
            w[8..].copy_from_slice(&(max as u64).to_le_bytes());
            w[7] = u8::from(ok);
            w
        };
        let mine_word = settings(why.is_none());
        let all = match self.swap_words(name, &peers, |_| mine_word) {
            Ok(a) => a,
            Err(e) => {
                drop(maps);
                free(&self.engine, mine);
                return Err(e);
            }
        };
        if why.is_none() {
            for &r in &peers {
                if all[r][7] == 0 {
                    why = Some(format!("rank {r} could not stage"));
                } else if all[r] != mine_word {
                    why = Some(format!(
                        "rank {r} stages other sizes than rank {me} (TIDEWIRE_PG_STAGED_MIN / _MAX)"
                    ));
                }
            }
        }
        match why {
            None => {
                log::debug!("rank {me}: staging collectives through shared memory");
                self.stage = Staging::Ready(Stage { cap: cfg.cap, at, maps });
            }
            Some(why) => {
                drop(maps);
                free(&self.engine, mine);
                self.stage = Staging::Refused;
                log::info!("rank {me}: no collective staged through shared memory: {why}");
            }
        }
        Ok(())
    }

    /// Whether collective `name` of `len` bytes (the same on every rank) is staged. The first
    /// one of a staged size sets the stages up (every rank reaches it at the same call; a
    /// group that never moves such sizes allocates and maps nothing).
    fn staged(&mut self, name: &str, len: usize) -> Result<bool> {
        let (min, max) = self.staged_sizes;
        if self.size == 1 || len < min || len > max.saturating_mul(self.size) {
            return Ok(false);
        }
        if matches!(self.stage, Staging::Untried) {
            // A failed round leaves it untried: the group is poisoned, nothing is called again.
            self.set_up_stage(name)?;
        }
        Ok(matches!(self.stage, Staging::Ready(_)))
    }

    /// Stages collectives of `min` to `max` × ranks bytes from now on, where the group stages at
    /// all (`TIDEWIRE_PG_STAGED_MIN` / `_MAX` otherwise); for tests and benchmarks. Every rank
    /// must call it alike, at the same point: ranks whose sizes differ when the stages are set
    /// up stage nothing (each logs why); a change after that is not checked, and ranks that
    /// choose different algorithms fail later as out of step (a header or length mismatch).
    pub fn set_staged_sizes(&mut self, min: usize, max: usize) {
        self.staged_sizes = (min, max);
    }

    /// Moves the all_to_all blocks of every pair that has pipes by direct reads from now on
    /// (for tests and benchmarks: both ways side by side). Every rank must call it alike, at
    /// the same point: a pair whose two ends differ waits for the other's way until the
    /// timeout.
    #[doc(hidden)]
    pub fn drop_pipes(&mut self) {
        for link in self.links.iter_mut().flatten() {
            link.pipes = PipeState::Refused;
        }
    }

    /// Makes this rank pause for `pause` in the pipes of its next all_to_all once it sent
    /// every block, before it reads the others' (for tests: a rank stopped in the middle).
    #[doc(hidden)]
    pub fn pause_in_pipes_for_test(&mut self, pause: Duration) {
        self.pause_in_pipes = Some(pause);
    }

    /// The ranks whose pair with this one has its pipes set up (for tests).
    #[doc(hidden)]
    pub fn piped_for_test(&self) -> Vec<usize> {
        (0..self.size).filter(|&r| self.pipes(r).is_some()).collect()
    }

    /// Makes this rank refuse the pipes its pairs set up from now on (for tests: what a rank
    /// whose kernel refuses pipes or `pidfd_getfd` does); its pairs read.
    #[doc(hidden)]
    pub fn refuse_pipes_for_test(&mut self) {
        self.refuse_pipes = true;
    }

    /// Makes this rank pause for `pause` before the reads (or pipes) of its next direct-read
    /// collective (for tests: what a rank stopped or descheduled in the middle of a call does).
    #[doc(hidden)]
    pub fn be_late_for_test(&mut self, pause: Duration) {
        self.late_for_test = Some(pause);
    }

    /// Agrees with every rank on which pairs read each other's memory directly: a pair does
    /// when both ends' probes succeeded; the group does when every pair does. (Two small
    /// rounds over the rings, so that no algorithm ever runs two protocols on one pair.)
    fn agree_direct(&mut self) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        if n == 1 {
            return Ok(());
        }
        let peers = self.others();
        let probed: Vec<bool> =
            (0..n).map(|r| self.links[r].as_ref().is_some_and(|l| l.direct.is_some())).collect();
        let theirs = self.swap_words("connecting", &peers, |r| [u8::from(probed[r]); 16])?;
        for &r in &peers {
            if theirs[r][0] == 0 {
                if let Some(l) = self.links[r].as_mut() {
                    l.direct = None;
                }
            }
        }
        let all_mine = self.all_direct();
        let all_theirs = self.swap_words("connecting", &peers, |_| [u8::from(all_mine); 16])?;
        self.group_direct = all_mine && peers.iter().all(|&r| all_theirs[r][0] == 1);
        log::debug!("rank {me}: direct reads between every pair: {}", self.group_direct);
        Ok(())
    }

    /// Opens every peer and reaches its ring (mapped, or through the engine), recording the
    /// staging buffers it allocates in `stagings`.
    fn links(
        engine: &Arc<Engine>,
        rank: usize,
        region: Region,
        peers: &[PeerInfo],
        timeout: Duration,
        via_engine: bool,
        stagings: &mut Vec<u64>,
    ) -> Result<Vec<Option<Link>>> {
        let slot = Region::slot(region.cap);
        let mut links = Vec::with_capacity(peers.len());
        // Every peer is opened within the group's timeout, counted from here.
        let opening = Instant::now() + timeout;
        for (r, peer) in peers.iter().enumerate() {
            if r == rank {
                links.push(None);
                continue;
            }
            let failed = |what: &str, source| Error::Engine {
                context: format!("rank {rank}: {what} rank {r} ({})", peer.name),
                source,
            };
            // The group's time running out (before or while opening it) names the rank.
            let late = |why: String| Error::Timeout {
                op: format!("rank {rank}: opening the group's peers ({}{why})", peer.name),
                ranks: vec![r],
                after: timeout,
            };
            let left = opening.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late(String::new()));
            }
            let id = engine.open_segment_within(&peer.name, left).map_err(|e| {
                if Instant::now() >= opening {
                    late(format!(": {e}"))
                } else {
                    failed("opening", e)
                }
            })?;
            let ring = peer.region + slot * rank as u64;
            let mapped =
                if via_engine { None } else { Some(engine.map_peer(id, ring, slot, None)) };
            let out = match mapped {
                Some(Ok(map)) => {
                    Out::Mapped { ring: Ring { base: map.addr(), cap: region.cap }, map, peer: id }
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "TIDEWIRE_PG_CHANNEL=engine".to_string(),
                    };
                    log::info!("rank {rank}: rank {r} reached through engine transfers ({why})");
                    let staging = engine
                        .allocate_shared(region.cap + 64)
                        .map_err(|e| failed("allocating the staging buffer for", e))?;
                    stagings.push(staging);
                    // A first READ of the ring's head: the cached descriptor may still name a
                    // region the peer freed at this address (a group destroyed and formed
                    // again), which the refusal marks stale; the second try re-reads it.
                    let probe = Request {
                        op: Op::Read,
                        local: staging + region.cap,
                        len: 16,
                        peer: id,
                        remote: ring + HEAD,
                    };
                    // Within the same time as the opening (k remote peers must not take k
                    // timeouts).
                    let deadline = opening;
                    let first = engine.transfer_sync(&[probe], bounded(deadline));
                    if let Err(tidewire::Error::RemoteAccessDenied { .. }) = first {
                        engine
                            .transfer_sync(&[probe], bounded(deadline))
                            .map_err(|e| failed("reaching the ring of", e))?;
                    } else {
                        first.map_err(|e| failed("reaching the ring of", e))?;
                    }
                    Out::Remote { peer: id, ring, staging }
                }
            };
            let inp = Ring { base: region.addr + slot * r as u64, cap: region.cap };
            // Single-copy reads need the peer's process on this host and the kernel's leave
            // (same user, no ptrace restriction): a read of 8 bytes of its region decides.
            let direct = match (&out, peer.pid) {
                (Out::Mapped { .. }, Some(pid)) if direct_allowed() => {
                    let mut probe = [0u8; 8];
                    let found = read_process(pid, &mut probe, peer.region + MARKER);
                    let want = marker(peer.region, pid);
                    match found.map(|()| u64::from_ne_bytes(probe)) {
                        Ok(v) if v == want => Some(pid),
                        Ok(_) => {
                            log::info!(
                                "rank {rank}: rank {r} only through the rings (its process id \
                                 {pid} names another process here: another PID namespace?)"
                            );
                            None
                        }
                        Err(e) => {
                            log::info!(
                                "rank {rank}: rank {r} only through the rings (reading its memory: {e})"
                            );
                            None
                        }
                    }
                }
                _ => None,
            };
            links.push(Some(Link {
                out,
                direct,
                pipes: PipeState::Untried,
                inp,
                sent: 0,
                received: 0,
                head_seen: 0,
                tail_seen: 0,
            }));
        }
        Ok(links)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// How each rank is reached: `self`, `mapped` (its ring mapped here, same host) or
    /// `engine` (the engine's transfers).
    pub fn channels(&self) -> Vec<&'static str> {
        self.links
            .iter()
            .map(|l| match l.as_ref().map(|l| &l.out) {
                None => "self",
                Some(Out::Mapped { .. }) => "mapped",
                Some(Out::Remote { .. }) => "engine",
            })
            .collect()
    }

    /// The ranks whose processes are gone (as far as this rank knows; no communication).
    pub fn dead_ranks(&self) -> Vec<usize> {
        (0..self.size)
            .filter(|&r| self.links[r].as_ref().is_some_and(|l| l.peer_error().is_some()))
            .collect()
    }

    /// The failure that made the group unusable, if an operation failed (no communication).
    pub fn failure(&self) -> Option<&str> {
        self.poisoned.as_ref().map(|(first, _)| first.as_str())
    }

    /// Fails if an earlier operation failed.
    fn usable(&self, op: &str) -> Result<()> {
        match &self.poisoned {
            Some((first, ranks)) => Err(Error::Poisoned {
                op: op.to_string(),
                first: first.clone(),
                ranks: ranks.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Runs `xfers` (with every pending operation, which comes first on its channel) until
    /// they are all done; a failure poisons the group.
    fn run(&mut self, op: &str, xfers: &mut [Xfer]) -> Result<()> {
        self.usable(op)?;
        for x in xfers.iter() {
            let (peer, _) = x.channel();
            if peer >= self.size || peer == self.rank {
                return Err(Error::invalid(format!("{op}: no channel to rank {peer}")));
            }
        }
        // The round's header first on every channel it uses (a peer's is checked before its
        // bytes are taken).
        let word = coll_header(self.seq, op);
        let mut got = vec![[0u8; 16]; self.size];
        let slots = got.as_mut_ptr();
        let mut all: Vec<Xfer> = Vec::with_capacity(2 * self.size + xfers.len());
        let mut seen = vec![(false, false); self.size];
        for x in xfers.iter() {
            let (peer, send) = x.channel();
            let (s, r) = &mut seen[peer];
            if send && !*s {
                *s = true;
                all.push(Xfer::Send { peer, src: word.as_ptr() as u64, len: 16, done: 0 });
            } else if !send && !*r {
                *r = true;
                // `peer < size` (checked above): a slot of `got`, which outlives the round.
                let dst = slots.wrapping_add(peer) as u64;
                all.push(Xfer::Recv {
                    peer,
                    dst,
                    len: 16,
                    done: 0,
                    reduce: None,
                    expect: Some(word),
                });
            }
        }
        let headers = all.len();
        all.extend_from_slice(xfers);
        let outcome = self.progress(op, &mut all, None, self.timeout);
        xfers.copy_from_slice(&all[headers..]);
        if let Err(e) = &outcome {
            self.fail(e);
        }
        outcome
    }

    /// Starts collective call number `seq + 1` (every rank counts its calls alike).
    fn begin(&mut self) {
        self.seq += 1;
        self.algorithm = "local";
    }

    /// Poisons the group after `e` and tells every rank, so that those waiting for us fail
    /// at once, blaming the same rank, instead of timing out on us. The first failure
    /// stands: a later one neither replaces it nor blames anew.
    fn fail(&mut self, e: &Error) {
        if self.poisoned.is_some() {
            return;
        }
        let ranks = e.ranks();
        let blamed = ranks.first().map_or(u64::MAX, |&r| r as u64 + 1);
        self.poisoned = Some((e.to_string(), ranks));
        // Peers reached through the engine are told all at once, within one short deadline
        // (best effort: some may be the ones that failed), so that dead peers do not add up.
        let until = Instant::now() + ABORT_WAIT;
        let mut told = Vec::new();
        for link in self.links.iter().flatten() {
            match &link.out {
                Out::Mapped { ring, .. } => ring.abort().store(blamed, Ordering::Release),
                Out::Remote { peer, ring, staging } => {
                    let word = staging + self.region.cap + 48;
                    // SAFETY: the last 16 bytes of our registered staging buffer, ours alone.
                    unsafe { std::ptr::write(word as *mut u64, blamed) };
                    let req = Request {
                        op: Op::Write,
                        local: word,
                        len: 8,
                        peer: *peer,
                        remote: ring + ABORT,
                    };
                    if let Ok(batch) = self.engine.submit(&[req], bounded(until)) {
                        told.push(batch);
                    }
                }
            }
        }
        // The abort words before anything the caller does after the error (reuse of a buffer
        // a late peer still reads): the peer reads the word after its reads.
        std::sync::atomic::fence(Ordering::SeqCst);
        for batch in told {
            let _ = batch.wait();
        }
    }

    /// The progress loop: advances the pending transfers and `xfers` until `xfers` (or, with
    /// `until`, the pending operation `until`) are done, or the deadline passes, or a rank we
    /// wait for dies.
    fn progress(
        &mut self,
        op: &str,
        xfers: &mut [Xfer],
        until: Option<OpId>,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut idle = 0u32;
        let engine = self.engine.clone();
        // Channels already used by an earlier unfinished transfer this round (order); one
        // vector for every round.
        let mut busy: Vec<(usize, bool)> = Vec::with_capacity(2 * self.size);
        loop {
            let mut moved = false;
            busy.clear();
            if !self.anys.is_empty() {
                moved |= self.bind_anys(op, xfers)?;
            }
            for x in self.pending.iter_mut().map(|(_, x)| x).chain(xfers.iter_mut()) {
                let peer = x.channel().0;
                match step(&engine, deadline, &mut self.links, &mut busy, x) {
                    Ok(m) => moved |= m,
                    // A rank that failed first and told us whom it blames is the cause (the
                    // transfer may have failed only because that rank then left the group).
                    Err(e) => {
                        return Err(blamed(&self.links, op)
                            .unwrap_or_else(|| transfer_failed(op, peer, e, start)))
                    }
                }
                check_header(op, x)?;
            }
            self.pending.retain(|(_, x)| !x.finished());
            if !self.headers.is_empty() {
                self.check_headers(op)?;
            }
            let done = match until {
                Some(id) => !self.under_way(id),
                None => xfers.iter().all(Xfer::finished),
            };
            if done {
                return Ok(());
            }
            if moved {
                idle = 0;
                continue;
            }
            idle = idle.saturating_add(1);
            if idle < 256 {
                std::hint::spin_loop();
                continue;
            }
            // Idle: check the ranks we wait for, then back off (yield, then short sleeps).
            let anyone = until.is_some_and(|id| self.anys.iter().any(|a| a.id == id));
            let waiting: Vec<usize> = {
                let mut w: Vec<usize> = self
                    .pending
                    .iter()
                    .map(|(_, x)| x)
                    .chain(xfers.iter())
                    .filter(|x| !x.finished())
                    .map(|x| x.channel().0)
                    .collect();
                // A receive from any rank waits for every rank (any of them dead fails it).
                if anyone {
                    w.extend(self.others());
                }
                w.sort_unstable();
                w.dedup();
                w
            };
            if let Some(e) = failure_seen(&self.links, op, &waiting) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                // Silence on a receive from any rank is no rank's fault: it names none (an
                // elastic group would otherwise suspect live ranks).
                return Err(Error::Timeout {
                    op: op.to_string(),
                    ranks: if anyone { Vec::new() } else { waiting },
                    after: now - start,
                });
            }
            if idle < 2048 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Copies `len` bytes at `src` to rank `peer` as part of one operation (blocking).
    fn sends(&self, peer: usize, src: &[u8]) -> Xfer {
        Xfer::Send { peer, src: src.as_ptr() as u64, len: src.len() as u64, done: 0 }
    }

    fn recvs(&self, peer: usize, dst: &mut [u8]) -> Xfer {
        Xfer::Recv {
            peer,
            dst: dst.as_mut_ptr() as u64,
            len: dst.len() as u64,
            done: 0,
            reduce: None,
            expect: None,
        }
    }

    /// Receives `acc.len()` bytes from rank `peer`, reducing them into `acc` as they arrive.
    fn recv_reduce(&self, peer: usize, acc: &mut [u8], dtype: DType, op: ReduceOp) -> Xfer {
        let (dst, len) = (acc.as_mut_ptr() as u64, acc.len() as u64);
        Xfer::Recv { peer, dst, len, done: 0, reduce: Some((dtype, op)), expect: None }
    }

    /// Starts sending `len` bytes at `src` to rank `peer`; they are copied out as the peer
    /// makes room, during this and later operations (or [`Comm::wait`]).
    ///
    /// # Safety
    /// `[src, src + len)` must stay readable until the operation is waited for (or the
    /// communicator is dropped).
    pub unsafe fn isend(&mut self, peer: usize, src: u64, len: u64, tag: u64) -> Result<OpId> {
        let bytes = Box::new(header_bytes(tag, len));
        let header = Xfer::Send { peer, src: bytes.as_ptr() as u64, len: 16, done: 0 };
        let body = Xfer::Send { peer, src, len, done: 0 };
        let id = self.queue_message("isend", peer, bytes, None, header, body, None)?;
        self.progress_now()?;
        Ok(id)
    }

    /// Starts receiving `len` bytes from rank `peer` into `dst` (the next bytes it sends us).
    ///
    /// # Safety
    /// `[dst, dst + len)` must stay writable, and not be read or written by anyone else, until
    /// the operation is waited for (or the communicator is dropped).
    pub unsafe fn irecv(&mut self, peer: usize, dst: u64, len: u64, tag: u64) -> Result<OpId> {
        let (bytes, header, body) = recv_parts(peer, dst, len);
        let id = self.queue_message("irecv", peer, bytes, Some((tag, len)), header, body, None)?;
        self.progress_now()?;
        Ok(id)
    }

    /// Starts receiving a message of `len` bytes and tag `tag` into `dst` from whichever rank
    /// sends one first: the first rank (from the one after the last taken, round the group)
    /// whose next message has that tag, among the ranks no receive of ours is under way or
    /// queued for (those take their rank's messages first); a message of that tag and another
    /// length fails it. [`Comm::take_source`] then names the rank.
    ///
    /// # Safety
    /// As for [`Comm::irecv`].
    pub unsafe fn irecv_any(&mut self, dst: u64, len: u64, tag: u64) -> Result<OpId> {
        let op = "irecv_any";
        self.usable(op)?;
        if self.size < 2 {
            return Err(Error::invalid(format!(
                "{op}: rank {} is alone in its group: no rank can send to it",
                self.rank
            )));
        }
        let id = self.next_id();
        self.anys.push(AnyRecv { id, dst, len, tag });
        self.progress_now()?;
        Ok(id)
    }

    /// The rank whose message the receive from any rank `id` took, once it is bound to one
    /// (asked once: the answer is then forgotten).
    pub fn take_source(&mut self, id: OpId) -> Option<usize> {
        let at = self.sources.iter().position(|(i, _)| *i == id)?;
        self.sources.remove(at).map(|(_, r)| r)
    }

    /// Binds each waiting receive from any rank to the first rank (round the group) whose
    /// next message it is: that rank has no receive of ours under way or queued (in the
    /// pending operations or the round's `xfers`), and the message's header carries its tag.
    /// Returns whether one was bound.
    fn bind_anys(&mut self, op: &str, xfers: &[Xfer]) -> Result<bool> {
        // The next message of each rank no receive of ours is under way for, looked at once
        // for the whole pass: the receives bind in the order they were posted (a later one
        // never takes a message that arrived while an earlier one of its tag looked).
        let mut heads: Vec<Option<(u64, u64)>> = vec![None; self.size];
        for (p, head) in heads.iter_mut().enumerate() {
            let receiving = |x: &Xfer| !x.finished() && x.channel() == (p, false);
            if p == self.rank
                || self.pending.iter().any(|(_, x)| receiving(x))
                || xfers.iter().any(receiving)
            {
                continue;
            }
            if let Some(link) = self.links[p].as_mut() {
                *head = link.peek16().map(|h| header_words(&h));
            }
        }
        let mut bound = false;
        let mut k = 0;
        while k < self.anys.len() {
            let (tag, len) = (self.anys[k].tag, self.anys[k].len);
            let mut took = None;
            for i in 0..self.size {
                let p = (self.any_next + i) % self.size;
                let Some((t, l)) = heads[p] else { continue };
                if coll_code(t).is_some() || t != tag {
                    continue; // a collective's round, or a message for a receive to come
                }
                if l != len {
                    return Err(Error::invalid(format!(
                        "irecv_any (during {op}): the next message of tag {tag} from rank {p} has \
                         {l} bytes; this receive from any rank expects {len}"
                    )));
                }
                took = Some(p);
                break;
            }
            let Some(p) = took else {
                k += 1;
                continue;
            };
            heads[p] = None; // its next message is this receive's now
            let any = self.anys.remove(k);
            let (bytes, header, body) = recv_parts(p, any.dst, len);
            self.queue_message(op, p, bytes, Some((tag, len)), header, body, Some(any.id))?;
            if self.sources.len() >= SOURCES_KEPT {
                self.sources.pop_front();
            }
            self.sources.push_back((any.id, p));
            self.any_next = (p + 1) % self.size;
            bound = true;
        }
        Ok(bound)
    }

    /// Whether operation `id` (an `isend` / `irecv` / `irecv_any`) is still under way.
    fn under_way(&self, id: OpId) -> bool {
        self.pending.iter().any(|(p, _)| *p == id) || self.anys.iter().any(|a| a.id == id)
    }

    /// Queues a message's header then its body (the header's box is kept in `headers` while
    /// either runs; nothing moves yet). An empty message is its header: the caller's operation
    /// is the header's. That operation is `id` when given (a receive from any rank, whose id
    /// was handed out before it was bound).
    #[allow(clippy::too_many_arguments)]
    fn queue_message(
        &mut self,
        op: &str,
        peer: usize,
        bytes: Box<[u8; 16]>,
        expect: Option<(u64, u64)>,
        header: Xfer,
        body: Xfer,
        id: Option<OpId>,
    ) -> Result<OpId> {
        let empty = body.finished();
        let own = match id {
            Some(id) if empty => id,
            _ => self.next_id(),
        };
        self.enqueue_as(op, own, header)?;
        let id = if empty {
            own
        } else {
            let id = id.unwrap_or_else(|| self.next_id());
            self.enqueue_as(op, id, body)?;
            id
        };
        self.headers.push(Header { op: id, own, peer, bytes, expect });
        Ok(id)
    }
    /// Checks the headers that arrived against what their receives expect (a message of
    /// another tag or length would otherwise land in the wrong buffer, or wait for bytes that
    /// never come), and drops the headers of finished messages.
    fn check_headers(&mut self, op: &str) -> Result<()> {
        let pending = &self.pending;
        let done = |id: OpId| !pending.iter().any(|(p, _)| *p == id);
        for h in &mut self.headers {
            let Some((tag, len)) = h.expect else { continue };
            if !done(h.own) {
                continue;
            }
            if *h.bytes != header_bytes(tag, len) {
                let got = header_words(&h.bytes);
                if coll_code(got.0).is_some() {
                    return Err(Error::invalid(format!(
                        "{op}: the next message from rank {} is {}, not the message of tag \
                         {tag} and {len} bytes this receive expects (the ranks are out of step)",
                        h.peer,
                        describe_header(&h.bytes)
                    )));
                }
                return Err(Error::invalid(format!(
                    "{op}: the next message from rank {} has tag {} and {} bytes; this receive \
                     expects tag {tag} and {len} bytes (messages between two ranks pair in the \
                     order they were sent)",
                    h.peer, got.0, got.1
                )));
            }
            h.expect = None;
        }
        self.headers.retain(|h| !(done(h.own) && done(h.op)));
        Ok(())
    }

    /// A fresh operation id.
    fn next_id(&mut self) -> OpId {
        self.next_op += 1;
        OpId(self.next_op - 1)
    }

    /// Queues `x` as pending operation `id` (nothing moves yet).
    fn enqueue_as(&mut self, op: &str, id: OpId, x: Xfer) -> Result<()> {
        self.usable(op)?;
        let (peer, _) = x.channel();
        if peer >= self.size || peer == self.rank {
            return Err(Error::invalid(format!(
                "{op}: no channel to rank {peer} (this is rank {}, of {})",
                self.rank, self.size
            )));
        }
        self.pending.push((id, x));
        Ok(())
    }

    /// Makes what progress there is now (an eager send usually completes here); a failure
    /// fails the group.
    fn progress_now(&mut self) -> Result<()> {
        if let Err(e) = self.poll(&mut []) {
            return Err(self.failed(e));
        }
        Ok(())
    }

    /// True once the operation `id` is done (no waiting; advances what can move).
    pub fn test(&mut self, id: OpId) -> bool {
        // A poisoned group moves nothing more: a receive whose failure was reported may have
        // its buffer reused by now.
        if self.under_way(id) && self.poisoned.is_none() {
            if let Err(e) = self.poll(&mut []) {
                // Not done; the wait for it reports the failure.
                self.fail(&e);
            }
        }
        !self.under_way(id)
    }

    /// One round of progress on the pending operations.
    fn poll(&mut self, xfers: &mut [Xfer]) -> Result<bool> {
        let mut busy = Vec::new();
        let mut moved = false;
        if !self.anys.is_empty() {
            moved |= self.bind_anys("progress", xfers)?;
        }
        let engine = self.engine.clone();
        for x in self.pending.iter_mut().map(|(_, x)| x).chain(xfers.iter_mut()) {
            let peer = x.channel().0;
            let now = Instant::now();
            moved |= step(&engine, now + self.timeout, &mut self.links, &mut busy, x)
                .map_err(|e| transfer_failed("progress", peer, e, now))?;
        }
        self.pending.retain(|(_, x)| !x.finished());
        if !self.headers.is_empty() {
            self.check_headers("progress")?;
        }
        Ok(moved)
    }

    /// Waits for a pending `isend` / `irecv` (within the group's timeout).
    pub fn wait(&mut self, id: OpId, op: &str) -> Result<()> {
        if !self.under_way(id) {
            return Ok(());
        }
        self.usable(op)?;
        let outcome =
            self.progress(op, &mut [], Some(id), self.p2p_timeout.unwrap_or(self.timeout));
        if let Err(e) = &outcome {
            self.fail(e);
        }
        outcome
    }

    /// Reduces `buf` (`dtype` elements) over every rank with `op`; every rank ends with the
    /// same bytes.
    pub fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.begin();
        op.check(dtype)?;
        let n = self.size;
        if n > 1 {
            let count = buf.len() / dtype.size();
            if buf.len() <= DIRECT_ALL_REDUCE || count < n {
                self.chose(
                    "all_reduce",
                    buf.len(),
                    "direct",
                    format_args!("direct (every rank sends its buffer to every rank)"),
                );
                self.all_reduce_direct(buf, dtype, op)?;
            } else if self.staged("all_reduce", buf.len())? {
                self.chose(
                    "all_reduce",
                    buf.len(),
                    "staged",
                    format_args!(
                        "staged (each rank's bytes into its shared stage, each block reduced \
                     there by one rank, every block copied out)"
                    ),
                );
                self.all_reduce_staged(buf, dtype, op)?;
            } else if buf.len() >= DIRECT_MIN && self.group_direct {
                self.chose(
                    "all_reduce",
                    buf.len(),
                    "direct_reads",
                    format_args!(
                        "direct reads (each rank reduces its block, then reads the others')"
                    ),
                );
                let parts = blocks(count, n, dtype.size());
                self.all_reduce_reads(buf, &parts, dtype, op)?;
            } else {
                self.chose(
                    "all_reduce",
                    buf.len(),
                    "ring",
                    format_args!("ring (reduce-scatter, then all-gather)"),
                );
                let parts = blocks(count, n, dtype.size());
                self.ring_reduce_scatter(buf, &parts, dtype, op, "all_reduce")?;
                self.ring_all_gather(buf, &parts, "all_reduce")?;
            }
        }
        if op == ReduceOp::Avg {
            finish_avg(buf, dtype, n);
        }
        Ok(())
    }

    /// All-reduce by direct reads between processes of one host: each rank reduces its own
    /// block `parts[rank]` from every other rank's buffer (read into a scratch block), then
    /// reads every other rank's reduced block into its own buffer. Each block is reduced by
    /// one rank only, so every rank ends with the same bytes. The rounds separate the phases:
    /// no rank reads a block its owner still reduces, or returns while another reads its
    /// buffer.
    fn all_reduce_reads(
        &mut self,
        buf: &mut [u8],
        parts: &[Range<usize>],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let me = self.rank;
        let name = "all_reduce";
        self.phases = Phases::new();
        let peers = self.others();
        let mine = encode_block(buf.as_ptr() as u64, buf.len());
        let theirs = self.swap_words(name, &peers, |_| mine)?;
        self.phases.mark();
        let own = parts[me].clone();
        let sources = self.sources(name, &peers, &theirs, buf.len(), own.start as u64)?;
        self.reduce_from(name, &mut buf[own.clone()], &sources, dtype, op)?;
        self.phases.mark();
        // Every reader wants our reduced block; the round that tells them where it is also
        // tells them that it is reduced (and that we read nothing of theirs any more).
        let reduced = (buf.as_ptr() as u64 + own.start as u64, own.len());
        // Its reads are cut like a reduction's (more threads than plain reads: the pool was
        // just woken; NOTES §49).
        let blocks = vec![reduced; self.size];
        self.direct_exchange(name, buf, parts, &blocks, None, Cut::Reduction)?;
        let names = ["addresses", "reduction", "addresses", "reads", "tokens"];
        self.phases.log(me, name, buf.len(), &names);
        Ok(())
    }

    /// Every rank's stage, as mapped here, by rank (the caller checked there is one). A failed
    /// group refuses here, before our stage is written: a peer of the failed call may still
    /// be copying out of it.
    fn stages(&mut self, name: &str) -> Result<(Vec<u64>, usize)> {
        self.usable(name)?;
        match &self.stage {
            Staging::Ready(st) => Ok((st.at.clone(), st.cap)),
            Staging::Untried | Staging::Refused => {
                let e = Error::invalid(format!("{name}: staged without a stage"));
                Err(self.failed(e))
            }
        }
    }

    /// All-reduce staged through shared memory, `cap` bytes at a time: every rank copies its
    /// bytes into its stage; each rank reduces its block there from every other rank's stage
    /// (in place); every rank copies each block out of the stage of the rank that reduced it.
    /// Three rounds a piece: the bytes are staged; the blocks are reduced; nobody reads a
    /// stage any more (so the next piece or call may overwrite it).
    fn all_reduce_staged(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let (n, me, name) = (self.size, self.rank, "all_reduce");
        let (at, cap) = self.stages(name)?;
        let peers = self.others();
        self.phases = Phases::new();
        // `cap` is a multiple of 4 KiB: every piece holds whole elements.
        for piece in buf.chunks_mut(cap) {
            let parts = blocks(piece.len() / dtype.size(), n, dtype.size());
            // SAFETY: our stage holds `cap` ≥ `piece.len()` bytes; the last round of the
            // previous piece (or call) ended every other rank's reads of it.
            let mine = unsafe { staged_mut(at[me], piece.len()) };
            self.readers.copy(mine, piece, Cut::Shared);
            self.staged_round_of(name, &peers, piece.len())?;
            let own = parts[me].clone();
            // SAFETY: until the next round every rank writes only its own block of its own
            // stage: `acc` is ours (nobody else touches it), the sources the others' copies of
            // our block (which they only read).
            let acc = unsafe { staged_mut(at[me] + own.start as u64, own.len()) };
            let srcs: Vec<&[u8]> = peers
                .iter()
                // SAFETY: as above.
                .map(|&r| unsafe { staged(at[r] + own.start as u64, own.len()) })
                .collect();
            self.reduce_staged(name, acc, None, &srcs, dtype, op)?;
            self.staged_round(name, &peers)?;
            let mut dsts = disjoint_mut(piece, &parts);
            let jobs: Vec<Read<'_>> = (0..n)
                .map(|r| {
                    let at = at[r] + parts[r].start as u64;
                    // SAFETY: every block is reduced and nobody writes a stage until the
                    // round after this copy.
                    let src = unsafe { staged(at, parts[r].len()) };
                    (r, Move::Copy(src, std::mem::take(&mut dsts[r])))
                })
                .collect();
            self.copy_staged(name, jobs)?;
            self.staged_round(name, &peers)?;
        }
        self.phases.log(
            me,
            name,
            buf.len(),
            &["copy in", "round", "reduction", "round", "copy out", "round"],
        );
        Ok(())
    }

    /// All-gather staged through shared memory, `cap` bytes of each rank's input at a time:
    /// every rank copies its piece into its stage, then every rank copies every other rank's
    /// out of its stage (ours straight from the input); two rounds a piece.
    fn all_gather_staged(&mut self, out: &mut [u8], input: &[u8]) -> Result<()> {
        let (n, me, name, len) = (self.size, self.rank, "all_gather", input.len());
        let (at, cap) = self.stages(name)?;
        let peers = self.others();
        self.phases = Phases::new();
        for (i, piece) in input.chunks(cap).enumerate() {
            let from = i * cap;
            // SAFETY: our stage holds `cap` bytes; the last round of the previous piece (or
            // call) ended every other rank's reads of it.
            let mine = unsafe { staged_mut(at[me], piece.len()) };
            self.readers.copy(mine, piece, Cut::Shared);
            self.staged_round_of(name, &peers, piece.len())?;
            let parts: Vec<Range<usize>> =
                (0..n).map(|r| r * len + from..r * len + from + piece.len()).collect();
            let mut dsts = disjoint_mut(out, &parts);
            let jobs: Vec<Read<'_>> = (0..n)
                .map(|r| {
                    let src = if r == me {
                        piece
                    } else {
                        // SAFETY: rank `r` staged this piece and writes its stage only after
                        // the next round.
                        unsafe { staged(at[r], piece.len()) }
                    };
                    (r, Move::Copy(src, std::mem::take(&mut dsts[r])))
                })
                .collect();
            self.copy_staged(name, jobs)?;
            self.staged_round(name, &peers)?;
        }
        self.phases.log(me, name, len, &["copy in", "round", "copy out", "round"]);
        Ok(())
    }

    /// Reduce-scatter staged through shared memory: every rank copies the blocks of the others
    /// (a piece of each, `cap / n` bytes at most) into its stage, then reduces its own block's
    /// piece from every other rank's stage into `out` (ours straight from the input); two
    /// rounds a piece.
    fn reduce_scatter_staged(
        &mut self,
        out: &mut [u8],
        input: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, me, name, len) = (self.size, self.rank, "reduce_scatter", out.len());
        let (at, cap) = self.stages(name)?;
        let peers = self.others();
        // A piece of every block fits in the stage; 4 KiB multiples hold whole elements (a
        // group stages only with at least 4 KiB per rank: `set_up_stage`).
        let step = (cap / n) / 4096 * 4096;
        self.phases = Phases::new();
        let mut from = 0;
        while from < len {
            let m = step.min(len - from);
            // SAFETY: our stage holds `cap` ≥ n·m bytes; the last round of the previous
            // piece (or call) ended every other rank's reads of it.
            let mine = unsafe { staged_mut(at[me], n * m) };
            let parts: Vec<Range<usize>> = (0..n).map(|r| r * m..(r + 1) * m).collect();
            let mut dsts = disjoint_mut(mine, &parts);
            let jobs: Vec<Read<'_>> = peers
                .iter()
                .map(|&r| {
                    let src = &input[r * len + from..r * len + from + m];
                    (r, Move::Copy(src, std::mem::take(&mut dsts[r])))
                })
                .collect();
            self.copy_staged(name, jobs)?;
            self.staged_round_of(name, &peers, m)?;
            let own = &input[me * len + from..me * len + from + m];
            let srcs: Vec<&[u8]> = peers
                .iter()
                // SAFETY: rank `r` staged our block's piece and writes its stage only after
                // the next round.
                .map(|&r| unsafe { staged(at[r] + (me * m) as u64, m) })
                .collect();
            self.reduce_staged(name, &mut out[from..from + m], Some(own), &srcs, dtype, op)?;
            self.staged_round(name, &peers)?;
            from += m;
        }
        self.phases.log(me, name, input.len(), &["copy in", "round", "reduction", "round"]);
        Ok(())
    }

    /// A staged collective's round (after it, every rank's copies or reductions before it
    /// are done), timed apart from the work before it when tracing.
    fn staged_round(&mut self, name: &str, peers: &[usize]) -> Result<()> {
        self.phases.mark();
        self.tokens(name, peers)?;
        self.phases.mark();
        Ok(())
    }

    /// The first round of a staged piece of `len` bytes: each rank's word carries the
    /// piece's length, which must be every rank's. Ranks that passed different sizes would
    /// otherwise read past what a peer staged (bytes of an earlier call) and return them.
    fn staged_round_of(&mut self, name: &str, peers: &[usize], len: usize) -> Result<()> {
        self.phases.mark();
        let mut mine = [0u8; 16];
        mine[..8].copy_from_slice(&(len as u64).to_le_bytes());
        mine[8..].copy_from_slice(STAGED_WORD);
        let theirs = self.swap_words(name, peers, |_| mine)?;
        // (Before the abort words: a peer that saw the sizes differ first has given up.)
        if let Some(&r) = peers.iter().find(|&&r| theirs[r] != mine) {
            let w = theirs[r];
            let what = match (w[8..] == *STAGED_WORD, w[..8].try_into()) {
                (true, Ok(b)) => format!("staged a piece of {} bytes", u64::from_le_bytes(b)),
                _ => "is not staging this call".to_string(),
            };
            let e = Error::invalid(format!(
                "{name}: rank {r} {what} where this rank staged {len} (the ranks passed \
                 different sizes: every rank must pass the same)"
            ));
            return Err(self.failed(e));
        }
        self.not_given_up(name)?;
        self.phases.mark();
        Ok(())
    }

    /// The staged copies `jobs`, spread over the threads (a failure poisons the group).
    fn copy_staged(&mut self, name: &str, jobs: Vec<Read<'_>>) -> Result<()> {
        let copied = self.readers.read_all(jobs, Cut::Shared);
        self.staged_failed(name, copied)
    }

    /// `acc` becomes `first` (when given, else itself) reduced with every source in order, cut
    /// among the threads (a failure poisons the group).
    fn reduce_staged(
        &mut self,
        name: &str,
        acc: &mut [u8],
        first: Option<&[u8]>,
        srcs: &[&[u8]],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let me = self.rank;
        let reduced = self.readers.split(acc, Cut::Shared, |off, acc| {
            unwound(me, || {
                if let Some(first) = first {
                    acc.copy_from_slice(&first[off..off + acc.len()]);
                }
                for src in srcs {
                    reduce_into(acc, &src[off..off + acc.len()], dtype, op);
                }
                Ok(())
            })
        });
        self.staged_failed(name, reduced)
    }

    /// A staged collective's copy or reduction that failed (a reader thread panicked): the
    /// group is poisoned, as a failed read does.
    fn staged_failed<E: std::fmt::Display>(
        &mut self,
        name: &str,
        r: std::result::Result<(), (usize, E)>,
    ) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err((rank, e)) => {
                let e = Error::invalid(format!("{name}: rank {rank}: {e}"));
                Err(self.failed(e))
            }
        }
    }

    /// Where to read each peer's piece: `(rank, process, address)` of the byte `at` of the
    /// buffer it announced (`theirs`), which must be `len` bytes. A mismatch poisons the group
    /// (the ranks are out of step), as a failed read does.
    fn sources(
        &mut self,
        name: &str,
        peers: &[usize],
        theirs: &[[u8; 16]],
        len: usize,
        at: u64,
    ) -> Result<Vec<(usize, u32, u64)>> {
        let me = self.rank;
        let mut sources = Vec::with_capacity(peers.len());
        for &r in peers {
            let (addr, theirs_len) = decode_block(&theirs[r]);
            let refused = match self.links[r].as_ref().and_then(|l| l.direct) {
                _ if theirs_len != len => {
                    format!("{name}: rank {r} has {theirs_len} bytes, rank {me} {len}")
                }
                // Every offset we read at lies within the block (`at` included).
                _ if addr.checked_add(len as u64).is_none() || at > len as u64 => {
                    format!("{name}: rank {r} announced a buffer at {addr:#x} of {len} bytes")
                }
                None => format!("{name}: rank {r} is not read directly (no process id agreed)"),
                Some(pid) => {
                    sources.push((r, pid, addr + at));
                    continue;
                }
            };
            let e = Error::invalid(refused);
            return Err(self.failed(e));
        }
        Ok(sources)
    }

    /// Reduces into `acc` the bytes at each source (`sources` in order: every element the same
    /// way), read a chunk at a time into a scratch block that stays in cache; `acc` is cut
    /// among the readers' threads.
    fn reduce_from(
        &mut self,
        name: &str,
        acc: &mut [u8],
        sources: &[(usize, u32, u64)],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let me = self.rank;
        let failed = self.readers.split(acc, Cut::Reduction, |at, acc| {
            unwound(me, || {
                SCRATCH.with(|scratch| {
                    // The thread's scratch block, kept between calls (a fresh one costs its page
                    // faults at every call).
                    let mut scratch = scratch.borrow_mut();
                    if scratch.len() < REDUCE_CHUNK.min(acc.len()) {
                        scratch.resize(REDUCE_CHUNK.min(acc.len()), 0);
                    }
                    for (i, acc) in acc.chunks_mut(REDUCE_CHUNK).enumerate() {
                        let off = (at + i * REDUCE_CHUNK) as u64;
                        for &(r, pid, addr) in sources {
                            let tmp = &mut scratch[..acc.len()];
                            read_process(pid, tmp, addr + off).map_err(|e| (r, e))?;
                            reduce_into(acc, tmp, dtype, op);
                        }
                    }
                    Ok(())
                })
            })
        });
        if let Err((r, e)) = failed {
            let e = Error::RankFailed {
                op: name.to_string(),
                rank: r,
                reason: format!("reading its memory: {e}"),
            };
            return Err(self.failed(e));
        }
        Ok(())
    }

    /// Every rank sends its whole buffer to every other and reduces all of them in rank order.
    fn all_reduce_direct(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let (n, me, len) = (self.size, self.rank, buf.len());
        let mut others = vec![0u8; len * n];
        let mut xfers = Vec::with_capacity(2 * n);
        for (r, part) in others.chunks_exact_mut(len.max(1)).enumerate().take(n) {
            if r != me && len > 0 {
                xfers.push(self.sends(r, buf));
                xfers.push(self.recvs(r, part));
            }
        }
        self.run("all_reduce", &mut xfers)?;
        if len == 0 {
            return Ok(());
        }
        others[me * len..(me + 1) * len].copy_from_slice(buf);
        reduce_blocks(&mut others, len, dtype, op);
        buf.copy_from_slice(&others[..len]);
        Ok(())
    }

    /// Ring reduce-scatter in place: afterwards block `rank` of `buf` holds the reduction of
    /// every rank's block `rank` (the other blocks hold partial sums).
    fn ring_reduce_scatter(
        &mut self,
        buf: &mut [u8],
        parts: &[Range<usize>],
        dtype: DType,
        op: ReduceOp,
        name: &str,
    ) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        let (next, prev) = ring_neighbours(me, n);
        for s in 0..n - 1 {
            let (out, inp) = reduce_scatter_step(me, n, s);
            let (o, i) = (parts[out].clone(), parts[inp].clone());
            // Disjoint blocks: one is sent while the partial for the other is reduced into it.
            let (src, acc) = split_two(buf, o, i);
            let mut xfers = [self.sends(next, src), self.recv_reduce(prev, acc, dtype, op)];
            self.run(name, &mut xfers)?;
        }
        Ok(())
    }

    /// Ring reduce-scatter of `input` (`n` blocks of `out.len()` bytes) into `out`, without
    /// copying the input: each step receives the partial into one of two block buffers (the
    /// other is being sent) and reduces our block into it; the last step receives into `out`.
    fn ring_reduce_scatter_into(
        &mut self,
        out: &mut [u8],
        input: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (n, me, len) = (self.size, self.rank, out.len());
        let (next, prev) = ring_neighbours(me, n);
        let block = |b: usize| &input[b * len..(b + 1) * len];
        let mut bufs = [vec![0u8; len], vec![0u8; if n > 2 { len } else { 0 }]];
        for s in 0..n - 1 {
            let (b_out, b_in) = reduce_scatter_step(me, n, s);
            let last = s == n - 2;
            let (sent, recv) = bufs.split_at_mut(1);
            let (prev_buf, next_buf) = if s % 2 == 1 {
                (&mut sent[0], &mut recv[0])
            } else {
                (&mut recv[0], &mut sent[0])
            };
            let src: &[u8] = if s == 0 { block(b_out) } else { prev_buf };
            let dst: &mut [u8] = if last { &mut *out } else { next_buf };
            let mut xfers = [self.sends(next, src), self.recvs(prev, dst)];
            self.run("reduce_scatter", &mut xfers)?;
            reduce_into(dst, block(b_in), dtype, op);
        }
        Ok(())
    }

    /// Ring all-gather in place, every rank starting with block `rank` of `buf`.
    fn ring_all_gather(
        &mut self,
        buf: &mut [u8],
        parts: &[Range<usize>],
        name: &str,
    ) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        let (next, prev) = ring_neighbours(me, n);
        for s in 0..n - 1 {
            let (out, inp) = all_gather_step(me, n, s);
            let (o, i) = (parts[out].clone(), parts[inp].clone());
            // Disjoint blocks of one buffer: split it so both can be borrowed.
            let (src, dst) = split_two(buf, o, i);
            let mut xfers = [self.sends(next, src), self.recvs(prev, dst)];
            self.run(name, &mut xfers)?;
        }
        Ok(())
    }

    /// An all-to-all whose pairs `piped` and `reads` move their blocks in one copy and the
    /// others go through their rings: the pairs `piped` send through their pipes (see
    /// `pipes`), the pairs `reads` read each other's memory. One round carries the ring pairs'
    /// data and the reading pairs' addresses, then the pipes and the reads, then a token per
    /// reading pair (no rank returns while another reads its input; a pipe's sender waits
    /// until its pipe is empty).
    fn all_to_all_mixed(
        &mut self,
        out: &mut [u8],
        o: &[Range<usize>],
        input: &[u8],
        i: &[Range<usize>],
        piped: &[usize],
        reads: &[usize],
    ) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        let name = "all_to_all";
        self.phases = Phases::new();
        // Where each of our blocks lies, for the peers that read it.
        let mine: Vec<[u8; 16]> = i
            .iter()
            .map(|r| encode_block(input.as_ptr() as u64 + r.start as u64, r.len()))
            .collect();
        let mut theirs = vec![[0u8; 16]; n];
        {
            let mut dsts: Vec<&mut [u8]> = Vec::with_capacity(n);
            let mut rest: &mut [u8] = out;
            for range in o {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(range.len());
                dsts.push(head);
                rest = tail;
            }
            let mut xfers = Vec::with_capacity(2 * n);
            for ((r, dst), t) in dsts.into_iter().enumerate().zip(theirs.iter_mut()) {
                if r == me || piped.contains(&r) {
                    continue;
                }
                if reads.contains(&r) {
                    xfers.push(self.sends(r, &mine[r]));
                    xfers.push(self.recvs(r, t));
                } else {
                    if !i[r].is_empty() {
                        xfers.push(self.sends(r, &input[i[r].clone()]));
                    }
                    if !dst.is_empty() {
                        xfers.push(self.recvs(r, dst));
                    }
                }
            }
            self.run(name, &mut xfers)?;
        }
        self.phases.mark();
        let mut dsts = disjoint_mut(out, o);
        let mut own = Some((std::mem::take(&mut dsts[me]), &input[i[me].clone()]));
        if !piped.is_empty() {
            let word = coll_header(self.seq, name);
            let mut flows: Vec<Flow<'_>> = Vec::with_capacity(piped.len());
            for &r in piped {
                let Some(pipes) = self.pipes(r) else {
                    let e = Error::invalid(format!("{name}: the pipes with rank {r} are gone"));
                    return Err(self.failed(e));
                };
                flows.push(Flow::new(
                    r,
                    pipes,
                    word,
                    &input[i[r].clone()],
                    std::mem::take(&mut dsts[r]),
                ));
            }
            // Our own block is copied along with the pipes.
            self.pipe_exchange(name, flows, own.take())?;
        }
        if !reads.is_empty() || own.is_some() {
            let reads = reads
                .iter()
                .map(|&r| {
                    let (addr, len) = decode_block(&theirs[r]);
                    (r, std::mem::take(&mut dsts[r]), addr, len)
                })
                .collect();
            self.read_blocks(name, reads, own, Cut::Copy)?;
        }
        self.phases.mark();
        if reads.is_empty() {
            self.not_given_up(name)?;
        } else {
            self.tokens(name, reads)?;
        }
        self.phases.mark();
        self.phases.log(me, name, input.len(), &["addresses", "pipes and reads", "tokens"]);
        Ok(())
    }

    /// The pair with rank `r`'s pipes, if it has them.
    fn pipes(&self, r: usize) -> Option<&Pipes> {
        match &self.links.get(r)?.as_ref()?.pipes {
            PipeState::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Sets up the pipes of the pairs with `peers` (untried on both ends, which both come
    /// here in the same call), in two rounds: each rank makes a pipe for each peer and sends
    /// its ends' numbers; each takes the peer's pipe for it into its own process
    /// (`pidfd_getfd`) and says whether it did. A pair has pipes when both took theirs; a
    /// refusal is logged, and the pair reads from then on.
    fn set_up_pipes(&mut self, name: &str, peers: &[usize]) -> Result<()> {
        let me = self.rank;
        let made: Vec<Option<Made>> = (0..self.size)
            .map(|r| {
                if !peers.contains(&r) || self.refuse_pipes || !pipes_allowed() {
                    return None;
                }
                Made::new().map_err(|e| log::info!("rank {me}: no pipe for rank {r} ({e})")).ok()
            })
            .collect();
        let theirs = self.swap_words(name, peers, |r| {
            let mut word = [0u8; 16];
            if let Some(m) = &made[r] {
                let (read, write) = m.fds();
                word[0] = 1;
                word[4..8].copy_from_slice(&read.to_le_bytes());
                word[8..12].copy_from_slice(&write.to_le_bytes());
            }
            word
        })?;
        let mut taken: Vec<Option<pipes::Taken>> = (0..self.size)
            .map(|r| {
                let pid = self.links[r].as_ref().and_then(|l| l.direct)?;
                let w = &theirs[r];
                if made[r].is_none() || w[0] != 1 {
                    return None;
                }
                let fd = |at: usize| i32::from_le_bytes([w[at], w[at + 1], w[at + 2], w[at + 3]]);
                pipes::take(pid, fd(4), fd(8))
                    .map_err(|e| {
                        log::info!(
                            "rank {me}: rank {r}'s all_to_all blocks by direct reads, not \
                             pipes (taking its pipe: {e})"
                        )
                    })
                    .ok()
            })
            .collect();
        let took = self.swap_words(name, peers, |r| [u8::from(taken[r].is_some()); 16])?;
        for (r, m) in made.into_iter().enumerate() {
            if !peers.contains(&r) {
                continue;
            }
            let Some(link) = self.links[r].as_mut() else { continue };
            link.pipes = match (m, taken[r].take()) {
                (Some(m), Some(t)) if took[r][0] == 1 => PipeState::Ready(m.pair(t)),
                _ => PipeState::Refused,
            };
        }
        let ready: Vec<usize> =
            peers.iter().copied().filter(|&r| self.pipes(r).is_some()).collect();
        log::debug!("rank {me}: all_to_all pipes set up with ranks {ready:?} (of {peers:?})");
        Ok(())
    }

    /// Runs `flows` (see `pipes::run`) and copies `own` (`dst`, `src`), spread over the
    /// reader threads: the flows cut into as many groups as there are threads, each group on
    /// a thread of its own (a group never waits on one peer, so the pairs complete whatever
    /// the peers' order), our own copy after them (before them where there is one thread).
    /// A failure poisons the group.
    fn pipe_exchange(
        &mut self,
        name: &str,
        flows: Vec<Flow<'_>>,
        own: Option<(&mut [u8], &[u8])>,
    ) -> Result<()> {
        enum Job<'a, 'b> {
            Flows(Vec<Flow<'a>>),
            Own(&'b mut [u8], &'b [u8]),
        }
        self.before_moves(name, own.as_ref())?;
        let threads = self.readers.threads();
        let k = threads.min(flows.len()).max(1);
        let mut groups: Vec<Vec<Flow<'_>>> = (0..k).map(|_| Vec::new()).collect();
        for (j, f) in flows.into_iter().enumerate() {
            groups[j % k].push(f);
        }
        let mut jobs: Vec<Job<'_, '_>> = groups.into_iter().map(Job::Flows).collect();
        // (One thread runs the jobs in order.)
        if let Some((dst, src)) = own {
            let at = if threads == 1 { 0 } else { jobs.len() };
            jobs.insert(at, Job::Own(dst, src));
        }
        let deadline = Instant::now() + self.timeout;
        let links = &self.links;
        let watch = |waiting: &[usize]| failure_seen(links, name, waiting);
        // A part that fails stops the others at their next wait, so that the peers hear of
        // the failure now, not after the others' deadline.
        let cancel = AtomicBool::new(false);
        let pause = self.pause_in_pipes.take();
        let run =
            |flows: &mut [Flow<'_>]| pipes::run(name, flows, deadline, &watch, &cancel, pause);
        let outcome = self.readers.run(jobs, |job| match job {
            Job::Flows(mut flows) => run(&mut flows),
            Job::Own(dst, src) => {
                dst.copy_from_slice(src);
                Ok(())
            }
        });
        outcome.map_err(|e| self.failed(e))
    }

    /// Before the reads or pipes of a direct collective: the test's pause, if one is set (see
    /// `be_late_for_test`), and the check that our own block (`dst`, `src`) fits its place.
    fn before_moves(&mut self, name: &str, own: Option<&(&mut [u8], &[u8])>) -> Result<()> {
        if let Some(pause) = self.late_for_test.take() {
            std::thread::sleep(pause);
        }
        match own {
            Some((dst, src)) if dst.len() != src.len() => {
                let e = Error::invalid(format!(
                    "{name}: rank {}'s own block is {} bytes into {}",
                    self.rank,
                    src.len(),
                    dst.len()
                ));
                Err(self.failed(e))
            }
            _ => Ok(()),
        }
    }

    /// Reads each `(rank, dst, addr, len)`: rank `rank`'s block (`addr`, `len` bytes in its
    /// memory) into `dst`, all of them at once over the reader threads.
    fn read_blocks(
        &mut self,
        name: &str,
        reads: Vec<(usize, &mut [u8], u64, usize)>,
        own: Option<(&mut [u8], &[u8])>,
        cut: Cut,
    ) -> Result<()> {
        // Any failure leaves the ranks out of step: the group is poisoned (and the others
        // told) so that none of them waits for us until its timeout.
        self.before_moves(name, own.as_ref())?;
        let mut jobs = Vec::with_capacity(reads.len() + 1);
        if let Some((dst, src)) = own {
            jobs.push((self.rank, Move::Copy(src, dst)));
        }
        for (r, dst, addr, len) in reads {
            let refused = if len != dst.len() {
                format!(
                    "{name}: rank {r} has {len} bytes for rank {}, which expects {}",
                    self.rank,
                    dst.len()
                )
            } else if addr.checked_add(len as u64).is_none() {
                format!("{name}: rank {r} announced a block at {addr:#x} of {len} bytes")
            } else {
                match self.links[r].as_ref().and_then(|l| l.direct) {
                    None => format!("{name}: rank {r} is not read directly (no process id agreed)"),
                    Some(pid) => {
                        jobs.push((r, Move::Read(pid, addr, dst)));
                        continue;
                    }
                }
            };
            let e = Error::invalid(refused);
            return Err(self.failed(e));
        }
        if let Err((r, e)) = self.readers.read_all(jobs, cut) {
            let e = Error::RankFailed {
                op: name.to_string(),
                rank: r,
                reason: format!("reading its memory: {e}"),
            };
            return Err(self.failed(e));
        }
        Ok(())
    }

    /// A token to and from each of `peers`: after it, neither side reads the other's buffers.
    /// A peer that gave up on this call first (we were late: stopped, descheduled) sent its
    /// token before it did, so the round passes; but its caller may have had its error and
    /// reused the buffers we read since. Its abort word, stored before its error returned,
    /// says so: the call fails here rather than return what we read.
    fn tokens(&mut self, name: &str, peers: &[usize]) -> Result<()> {
        self.swap_words(name, peers, |_| [1u8; 16])?;
        self.not_given_up(name)
    }

    /// `e`, after poisoning the group with it (see [`Comm::fail`]): `return Err(self.failed(e))`.
    fn failed(&mut self, e: Error) -> Error {
        self.fail(&e);
        e
    }

    /// Fails the call if a peer gave up on it (its abort word; see [`Comm::tokens`]).
    fn not_given_up(&mut self, name: &str) -> Result<()> {
        if let Some(e) = blamed(&self.links, name) {
            return Err(self.failed(e));
        }
        Ok(())
    }

    /// Sends `mine(r)` to every rank `r` of `peers` and receives its word (16 bytes) in one
    /// round; returns them by rank (zeros for the others).
    fn swap_words(
        &mut self,
        name: &str,
        peers: &[usize],
        mine: impl Fn(usize) -> [u8; 16],
    ) -> Result<Vec<[u8; 16]>> {
        let words: Vec<[u8; 16]> = (0..self.size).map(&mine).collect();
        let mut theirs = vec![[0u8; 16]; self.size];
        let mut xfers = Vec::with_capacity(2 * peers.len());
        for (r, t) in theirs.iter_mut().enumerate() {
            if peers.contains(&r) {
                xfers.push(self.sends(r, &words[r]));
                xfers.push(self.recvs(r, t));
            }
        }
        self.run(name, &mut xfers)?;
        Ok(theirs)
    }

    /// Every rank but ours, from the next one on (wrapping): ranks that read every peer's
    /// memory in this order start on different peers, instead of all reading rank 0's pages
    /// at once (every read pins the pages it copies).
    fn others(&self) -> Vec<usize> {
        (1..self.size).map(|i| (self.rank + i) % self.size).collect()
    }

    /// Bounds each wait for a point-to-point operation by `timeout` instead of the group's
    /// (`None`: the group's again).
    pub fn set_p2p_timeout(&mut self, timeout: Option<Duration>) {
        self.p2p_timeout = timeout;
    }

    /// Spreads large direct reads (and all_reduce's sums of them) over `n` threads from now
    /// on (default: `TIDEWIRE_PG_COPY_THREADS`, else the host's CPUs shared among the ranks,
    /// at most four).
    pub fn set_readers(&mut self, n: usize) {
        self.readers = Readers::new(n);
    }

    /// The algorithm of the last collective, as the metrics label it: `direct` (every rank
    /// sends to every rank), `ring`, `staged`, `direct_reads`, `pipes` (an all_to_all whose
    /// direct pairs all moved their blocks through pipes), `root` (to or from the root),
    /// `token` (the barrier), `local` (nothing moved between ranks).
    pub fn algorithm(&self) -> &'static str {
        self.algorithm
    }

    /// Whether every pair of the group reads each other's buffers directly (one copy) for
    /// large collectives.
    pub fn reads_directly(&self) -> bool {
        self.group_direct
    }

    /// Whether every other rank's memory can be read directly.
    fn all_direct(&self) -> bool {
        self.links.iter().flatten().all(|l| l.direct.is_some())
    }

    /// A single-copy exchange between processes of one host: every rank tells every other
    /// where the block for it lies in its memory (`blocks[r]`: address and length), reads the
    /// block each rank has for it into `out[parts[r]]` (`process_vm_readv`), then every pair
    /// exchanges a token, so that no rank returns (and lets its buffer change) while another
    /// still reads it. Our own block is the caller's.
    fn direct_exchange(
        &mut self,
        name: &str,
        out: &mut [u8],
        parts: &[Range<usize>],
        blocks: &[(u64, usize)],
        own: Option<&[u8]>,
        cut: Cut,
    ) -> Result<()> {
        let peers = self.others();
        let theirs = self.swap_words(name, &peers, |r| encode_block(blocks[r].0, blocks[r].1))?;
        self.phases.mark();
        let mut dsts = disjoint_mut(out, parts);
        let own = own.map(|src| (std::mem::take(&mut dsts[self.rank]), src));
        let reads = peers
            .iter()
            .map(|&r| {
                let (addr, len) = decode_block(&theirs[r]);
                (r, std::mem::take(&mut dsts[r]), addr, len)
            })
            .collect();
        self.read_blocks(name, reads, own, cut)?;
        self.phases.mark();
        self.tokens(name, &peers)?;
        self.phases.mark();
        Ok(())
    }

    /// Every rank's `input` (all of equal length) into `out`, rank after rank.
    pub fn all_gather(&mut self, out: &mut [u8], input: &[u8]) -> Result<()> {
        self.begin();
        let (n, len) = (self.size, input.len());
        if out.len() != n * len {
            return Err(Error::invalid(format!(
                "all_gather: output of {} bytes for {n} × {len}",
                out.len()
            )));
        }
        if n > 1 && len > 0 && self.staged("all_gather", out.len())? {
            self.chose(
                "all_gather",
                len,
                "staged",
                format_args!("staged (each rank's input into its shared stage)"),
            );
            return self.all_gather_staged(out, input);
        }
        if n > 1 && len > 0 && len * (n - 1) >= DIRECT_MIN && self.group_direct {
            self.chose("all_gather", len, "direct_reads", format_args!("direct reads"));
            // Our own block is copied along with the reads.
            let blocks = vec![(input.as_ptr() as u64, len); n];
            let parts = offsets_of(&vec![len; n]);
            self.phases = Phases::new();
            let own = Some(input);
            self.direct_exchange("all_gather", out, &parts, &blocks, own, Cut::Copy)?;
            self.phases.log(self.rank, "all_gather", len, &["addresses", "reads", "tokens"]);
            return Ok(());
        }
        self.readers.copy(&mut out[self.rank * len..(self.rank + 1) * len], input, Cut::Reduction);
        if n > 1 && len > 0 {
            self.chose("all_gather", len, "ring", format_args!("ring"));
            let parts: Vec<Range<usize>> = (0..n).map(|r| r * len..(r + 1) * len).collect();
            self.ring_all_gather(out, &parts, "all_gather")?;
        }
        Ok(())
    }

    /// Reduces `input` (`n` blocks of `out.len()` bytes) over every rank; rank `r` gets block
    /// `r` of the reduction in `out`.
    pub fn reduce_scatter(
        &mut self,
        out: &mut [u8],
        input: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.begin();
        op.check(dtype)?;
        let (n, len) = (self.size, out.len());
        if input.len() != n * len {
            return Err(Error::invalid(format!(
                "reduce_scatter: input of {} bytes for {n} × {len}",
                input.len()
            )));
        }
        if n == 1 || len == 0 {
            out.copy_from_slice(input);
        } else if self.staged("reduce_scatter", input.len())? {
            self.chose(
                "reduce_scatter",
                len,
                "staged",
                format_args!("staged (the others' blocks into a shared stage)"),
            );
            self.reduce_scatter_staged(out, input, dtype, op)?;
        } else if len * (n - 1) >= DIRECT_MIN && self.group_direct {
            self.chose("reduce_scatter", len, "direct_reads", format_args!("direct reads"));
            self.reduce_scatter_reads(out, input, dtype, op)?;
        } else {
            self.chose("reduce_scatter", len, "ring", format_args!("ring"));
            self.ring_reduce_scatter_into(out, input, dtype, op)?;
        }
        if op == ReduceOp::Avg {
            finish_avg(out, dtype, n);
        }
        Ok(())
    }

    /// Reduce-scatter by direct reads between processes of one host: each rank reduces its
    /// block of every other rank's input into `out` (its own block first, then the others from
    /// the next rank on); a token to and from every rank then says that nobody reads our input
    /// any more.
    fn reduce_scatter_reads(
        &mut self,
        out: &mut [u8],
        input: &[u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (me, len) = (self.rank, out.len());
        let name = "reduce_scatter";
        let peers = self.others();
        let mine = encode_block(input.as_ptr() as u64, input.len());
        let theirs = self.swap_words(name, &peers, |_| mine)?;
        let sources = self.sources(name, &peers, &theirs, input.len(), (me * len) as u64)?;
        self.readers.copy(out, &input[me * len..(me + 1) * len], Cut::Reduction);
        self.reduce_from(name, out, &sources, dtype, op)?;
        self.tokens(name, &peers)
    }

    /// Rank `root`'s `buf` into every rank's `buf`.
    pub fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.begin();
        self.check_root("broadcast", root)?;
        let (n, me) = (self.size, self.rank);
        if n == 1 || buf.is_empty() {
            return Ok(());
        }
        self.chose("broadcast", buf.len(), "root", format_args!("direct from the root"));
        let mut xfers: Vec<Xfer> = if me == root {
            (0..n).filter(|&r| r != me).map(|r| self.sends(r, buf)).collect()
        } else {
            vec![self.recvs(root, buf)]
        };
        self.run("broadcast", &mut xfers)
    }

    /// Block `r` of `input` (split by `in_splits`, bytes) to rank `r`; rank `r`'s block for us
    /// into `out` (split by `out_splits`).
    pub fn all_to_all(
        &mut self,
        out: &mut [u8],
        out_splits: &[usize],
        input: &[u8],
        in_splits: &[usize],
    ) -> Result<()> {
        self.begin();
        let n = self.size;
        let me = self.rank;
        // (Splits that overflow when summed match no buffer.)
        let sum = |s: &[usize]| s.iter().try_fold(0usize, |a, &b| a.checked_add(b));
        if out_splits.len() != n
            || in_splits.len() != n
            || sum(out_splits) != Some(out.len())
            || sum(in_splits) != Some(input.len())
        {
            return Err(Error::invalid(format!(
                "all_to_all: splits {out_splits:?} / {in_splits:?} do not match {n} ranks and buffers of {} / {} bytes",
                out.len(),
                input.len()
            )));
        }
        let (o, i) = (offsets_of(out_splits), offsets_of(in_splits));
        if o[me].len() != i[me].len() {
            return Err(Error::invalid(format!(
                "all_to_all: {} bytes to ourselves but {} expected",
                i[me].len(),
                o[me].len()
            )));
        }
        // A pair that moves at least DIRECT_PAIR_MIN between its two ranks (both know both
        // sizes) reads directly, in one copy; the others go through their rings.
        let direct = |this: &Self, r: usize| {
            r != me
                && this.links[r].as_ref().is_some_and(|l| l.direct.is_some())
                && i[r].len() + o[r].len() >= DIRECT_PAIR_MIN
        };
        let directs: Vec<usize> = (0..n).filter(|&r| direct(self, r)).collect();
        if !directs.is_empty() {
            // Of those, the pairs with pipes send through them where they pay (both ranks
            // know the group's size and the pair's bytes, so both choose alike); a pair's
            // first such call sets its pipes up.
            let pays = |r: usize| {
                n >= PIPES_MIN_RANKS || TWO_RANKS_PIPED.contains(&(i[r].len() + o[r].len()))
            };
            let untried: Vec<usize> = directs
                .iter()
                .copied()
                .filter(|&r| {
                    pays(r)
                        && self.links[r]
                            .as_ref()
                            .is_some_and(|l| matches!(l.pipes, PipeState::Untried))
                })
                .collect();
            if !untried.is_empty() {
                self.set_up_pipes("all_to_all", &untried)?;
            }
            let (piped, reads): (Vec<usize>, Vec<usize>) =
                directs.iter().partition(|&&r| pays(r) && self.pipes(r).is_some());
            let how = format_args!(
                "pipes with ranks {piped:?}, direct reads with {reads:?}, rings with the others"
            );
            let label = if reads.is_empty() { "pipes" } else { "direct_reads" };
            self.chose("all_to_all", input.len(), label, how);
            return self.all_to_all_mixed(out, &o, input, &i, &piped, &reads);
        }
        self.chose("all_to_all", input.len(), "ring", format_args!("rings"));
        // The output split into one destination per rank.
        let mut dsts: Vec<&mut [u8]> = Vec::with_capacity(n);
        let mut rest: &mut [u8] = out;
        for &l in out_splits {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(l);
            dsts.push(head);
            rest = tail;
        }
        let mut xfers = Vec::new();
        for (r, dst) in dsts.into_iter().enumerate() {
            if r == me {
                dst.copy_from_slice(&input[i[me].clone()]);
                continue;
            }
            if !i[r].is_empty() {
                xfers.push(self.sends(r, &input[i[r].clone()]));
            }
            if !dst.is_empty() {
                xfers.push(self.recvs(r, dst));
            }
        }
        self.run("all_to_all", &mut xfers)
    }

    /// Reduces `buf` over every rank into rank `root`'s `buf` (the others' are left as given).
    pub fn reduce(
        &mut self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.begin();
        op.check(dtype)?;
        let (n, me, len) = (self.size, self.rank, buf.len());
        // Every rank's buffer to the root, which reduces them in rank order.
        self.chose("reduce", len, "root", format_args!("direct to the root, reduced there"));
        let mut all = vec![0u8; if me == root { len * n } else { 0 }];
        self.gather_as("reduce", &mut all, buf, root)?;
        if me != root {
            return Ok(());
        }
        if len > 0 {
            reduce_blocks(&mut all, len, dtype, op);
            buf.copy_from_slice(&all[..len]);
        }
        if op == ReduceOp::Avg {
            finish_avg(buf, dtype, n);
        }
        Ok(())
    }

    /// Every rank's `input` into rank `root`'s `out` (rank after rank; `out` is only used on
    /// the root).
    pub fn gather(&mut self, out: &mut [u8], input: &[u8], root: usize) -> Result<()> {
        self.begin();
        self.chose("gather", input.len(), "root", format_args!("direct to the root"));
        self.gather_as("gather", out, input, root)
    }

    /// [`Comm::gather`], its errors naming the operation `name` it serves.
    fn gather_as(&mut self, name: &str, out: &mut [u8], input: &[u8], root: usize) -> Result<()> {
        self.check_root(name, root)?;
        let (n, me, len) = (self.size, self.rank, input.len());
        if me != root {
            if len > 0 {
                let mut xfers = [self.sends(root, input)];
                self.run(name, &mut xfers)?;
            }
            return Ok(());
        }
        if out.len() != n * len {
            return Err(Error::invalid(format!(
                "{name}: output of {} bytes for {n} × {len}",
                out.len()
            )));
        }
        let mut xfers = Vec::new();
        for (r, part) in out.chunks_exact_mut(len.max(1)).enumerate().take(n) {
            if r == me {
                part.copy_from_slice(input);
            } else if len > 0 {
                xfers.push(self.recvs(r, part));
            }
        }
        self.run(name, &mut xfers)
    }

    /// Block `r` of rank `root`'s `input` into rank `r`'s `out` (`input` only used on the root).
    pub fn scatter(&mut self, out: &mut [u8], input: &[u8], root: usize) -> Result<()> {
        self.begin();
        self.check_root("scatter", root)?;
        let (n, me, len) = (self.size, self.rank, out.len());
        self.chose("scatter", len, "root", format_args!("direct from the root"));
        if me != root {
            if len > 0 {
                let mut xfers = [self.recvs(root, out)];
                self.run("scatter", &mut xfers)?;
            }
            return Ok(());
        }
        if input.len() != n * len {
            return Err(Error::invalid(format!(
                "scatter: input of {} bytes for {n} × {len}",
                input.len()
            )));
        }
        let mut xfers = Vec::new();
        for (r, part) in input.chunks_exact(len.max(1)).enumerate().take(n) {
            if r == me {
                out.copy_from_slice(part);
            } else if len > 0 {
                xfers.push(self.sends(r, part));
            }
        }
        self.run("scatter", &mut xfers)
    }

    /// Returns once every rank called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.begin();
        let (n, me) = (self.size, self.rank);
        self.chose("barrier", 1, "token", format_args!("a byte to and from every rank"));
        let token = [1u8];
        let mut got = vec![0u8; n];
        let mut xfers = Vec::new();
        for (r, slot) in got.iter_mut().enumerate() {
            if r != me {
                xfers.push(self.sends(r, &token));
                xfers.push(self.recvs(r, std::slice::from_mut(slot)));
            }
        }
        self.run("barrier", &mut xfers)
    }

    /// Records the algorithm collective `op` of `len` bytes takes (`label`, for the metrics)
    /// and logs its choice (`how`: formatted only when `TIDEWIRE_TRACE=tidewire=debug`).
    fn chose(&mut self, op: &str, len: usize, label: &'static str, how: std::fmt::Arguments<'_>) {
        self.algorithm = label;
        log::debug!("rank {}: {op} of {len} bytes on {} ranks: {how}", self.rank, self.size);
    }

    fn check_root(&self, op: &str, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::invalid(format!("{op}: root {root} in a group of {}", self.size)));
        }
        Ok(())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // Our mappings of the peers' regions go first, then our own region.
        self.links.clear();
        if let Staging::Ready(stage) = std::mem::replace(&mut self.stage, Staging::Refused) {
            drop(stage.maps);
            if let Err(e) = self.engine.free_shared(stage.at[self.rank]) {
                log::warn!("rank {}: freeing the stage: {e}", self.rank);
            }
        }
        for staging in self.stagings.drain(..) {
            if let Err(e) = self.engine.free_shared(staging) {
                log::warn!("rank {}: freeing a staging buffer: {e}", self.rank);
            }
        }
        if let Err(e) = self.engine.free_shared(self.region.addr) {
            log::warn!("rank {}: freeing the receive region: {e}", self.rank);
        }
    }
}

/// What a wait for the ranks `waiting` learns of a failure: a rank that failed tells us whom
/// it blames (its abort word); else a rank we wait for whose process died (its mapping's
/// liveness).
fn failure_seen(links: &[Option<Link>], op: &str, waiting: &[usize]) -> Option<Error> {
    blamed(links, op).or_else(|| {
        waiting.iter().find_map(|&r| {
            let e = links.get(r)?.as_ref()?.peer_error()?;
            Some(Error::RankFailed { op: op.to_string(), rank: r, reason: e.to_string() })
        })
    })
}

/// The failure a rank that failed first reported to us (the rank it blames), if any.
fn blamed(links: &[Option<Link>], op: &str) -> Option<Error> {
    links.iter().enumerate().find_map(|(r, link)| {
        let word = link.as_ref()?.inp.abort().load(Ordering::Acquire);
        match word {
            0 => None,
            // It blamed nobody (ranks out of step, a call it refused): no rank is named, so
            // no membership suspects a rank that lives.
            u64::MAX => Some(Error::Poisoned {
                op: op.to_string(),
                first: format!("rank {r} failed an operation without blaming a rank"),
                ranks: Vec::new(),
            }),
            _ => Some(Error::RankFailed {
                op: op.to_string(),
                rank: (word - 1) as usize,
                reason: format!("rank {r} failed an operation waiting for it"),
            }),
        }
    })
}

/// An engine transfer to or from rank `peer` failed during `op` (started at `start`): a
/// timeout is the group's timeout naming the rank, anything else the rank's failure.
fn transfer_failed(op: &str, peer: usize, e: tidewire::Error, start: Instant) -> Error {
    match e.kind() {
        tidewire::ErrorKind::Timeout => {
            Error::Timeout { op: op.to_string(), ranks: vec![peer], after: start.elapsed() }
        }
        _ => Error::RankFailed { op: op.to_string(), rank: peer, reason: e.to_string() },
    }
}

/// How long telling a peer of our failure may take (it may be the peer that failed).
const ABORT_WAIT: Duration = Duration::from_millis(500);

/// Batch options whose deadline is `until` (at least 1 ms from now): an engine transfer of a
/// collective never outlives the operation's deadline.
fn bounded(until: Instant) -> BatchOptions {
    let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    BatchOptions { timeout: Some(left), ..BatchOptions::default() }
}

/// Reduces the blocks of `len` bytes in `all` (one per rank, in rank order) into the first:
/// every rank that reduces the same blocks gets the same bytes.
fn reduce_blocks(all: &mut [u8], len: usize, dtype: DType, op: ReduceOp) {
    let (first, rest) = all.split_at_mut(len);
    for part in rest.chunks_exact(len) {
        reduce_into(first, part, dtype, op);
    }
}

/// Two disjoint ranges of one buffer: the first to read, the second to write.
fn split_two(buf: &mut [u8], read: Range<usize>, write: Range<usize>) -> (&[u8], &mut [u8]) {
    if read.start < write.start {
        let (a, b) = buf.split_at_mut(write.start);
        (&a[read], &mut b[..write.len()])
    } else {
        let (a, b) = buf.split_at_mut(read.start);
        (&b[..read.len()], &mut a[write])
    }
}

/// Advances one transfer as far as its channel allows, unless an earlier transfer on the same
/// channel is unfinished; returns whether bytes moved.
fn step(
    engine: &Engine,
    until: Instant,
    links: &mut [Option<Link>],
    busy: &mut Vec<(usize, bool)>,
    x: &mut Xfer,
) -> tidewire::Result<bool> {
    if x.finished() {
        return Ok(false);
    }
    let channel = x.channel();
    if busy.contains(&channel) {
        return Ok(false);
    }
    busy.push(channel);
    let Some(link) = links.get_mut(channel.0).and_then(Option::as_mut) else { return Ok(false) };
    let moved = match x {
        Xfer::Send { src, len, done, .. } => {
            let cap = link.inp.cap;
            // What this step would copy if the room we last saw were all there is.
            let want = (*len - *done).min(cap - link.sent % cap);
            let head = match &link.out {
                Out::Mapped { ring, .. } => ring.load_pair(HEAD),
                // The room we last saw is enough (the receiver only ever frees more): no
                // round trip for the counter (a collective's header and its round's first
                // bytes then cost a write each, not a read and a write).
                Out::Remote { .. } if cap - (link.sent - link.head_seen) >= want => None,
                Out::Remote { peer, ring, staging } => {
                    let word = staging + cap;
                    let req = Request {
                        op: Op::Read,
                        local: word,
                        len: 16,
                        peer: *peer,
                        remote: ring + HEAD,
                    };
                    engine.transfer_sync(&[req], bounded(until))?;
                    // SAFETY: the counter words of our own registered staging buffer, just
                    // written by the READ above; nobody else uses them.
                    let (v, check) = unsafe {
                        (
                            std::ptr::read(word as *const u64),
                            std::ptr::read((word + 8) as *const u64),
                        )
                    };
                    (check == !v).then_some(v)
                }
            };
            if let Some(h) = head {
                link.head_seen = link.head_seen.max(h);
            }
            let free = cap - (link.sent - link.head_seen);
            let at = link.sent % cap;
            let n = free.min(*len - *done).min(cap - at);
            if n == 0 {
                return Ok(false);
            }
            match &link.out {
                Out::Mapped { ring, .. } => {
                    // SAFETY: the source range was vouched for by the caller (a slice of this
                    // operation or an `isend`'s buffer); the destination lies inside the
                    // ring's data (`at + n <= cap`), which the peer reads only up to the tail,
                    // published below.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (*src + *done) as *const u8,
                            (ring.data() + at) as *mut u8,
                            n as usize,
                        )
                    };
                    link.sent += n;
                    ring.store_pair(TAIL, link.sent);
                }
                Out::Remote { peer, ring, staging } => {
                    // SAFETY: the source as above; the destination is our registered staging
                    // buffer of `cap` bytes (`n <= cap`), used by this channel only.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (*src + *done) as *const u8,
                            *staging as *mut u8,
                            n as usize,
                        )
                    };
                    let data = Request {
                        op: Op::Write,
                        local: *staging,
                        len: n,
                        peer: *peer,
                        remote: ring + HEADER + at,
                    };
                    engine.transfer_sync(&[data], bounded(until))?;
                    link.sent += n;
                    let word = staging + cap + 16;
                    // SAFETY: two counter words of our own staging buffer.
                    unsafe {
                        std::ptr::write(word as *mut u64, link.sent);
                        std::ptr::write((word + 8) as *mut u64, !link.sent);
                    }
                    // After the data is written: the peer never sees a tail beyond it.
                    let tail = Request {
                        op: Op::Write,
                        local: word,
                        len: 16,
                        peer: *peer,
                        remote: ring + TAIL,
                    };
                    engine.transfer_sync(&[tail], bounded(until))?;
                }
            }
            *done += n;
            true
        }
        Xfer::Recv { dst, len, done, reduce: Some((dtype, op)), .. } => {
            let ring = &link.inp;
            if let Some(t) = ring.load_pair(TAIL) {
                link.tail_seen = link.tail_seen.max(t);
            }
            let avail = link.tail_seen - link.received;
            let at = link.received % ring.cap;
            let es = dtype.size() as u64;
            let want = avail.min(*len - *done);
            let contiguous = want.min(ring.cap - at);
            let whole = contiguous - contiguous % es;
            let n = if whole > 0 {
                // SAFETY: `[at, at + whole)` lies in the ring's data, written by the peer before
                // it published `tail`; the destination was vouched for by the caller.
                let (got, acc) = unsafe {
                    (
                        std::slice::from_raw_parts((ring.data() + at) as *const u8, whole as usize),
                        std::slice::from_raw_parts_mut((*dst + *done) as *mut u8, whole as usize),
                    )
                };
                reduce_into(acc, got, *dtype, *op);
                whole
            } else if want >= es {
                // One element straddles the end of the ring: gather its two pieces.
                let mut e = [0u8; 8];
                // SAFETY: as above, for the element's bytes from `at`, all before `tail`.
                unsafe { ring.copy_out(at, &mut e[..es as usize]) };
                // SAFETY: one element of the destination, vouched for by the caller.
                let acc = unsafe {
                    std::slice::from_raw_parts_mut((*dst + *done) as *mut u8, es as usize)
                };
                reduce_into(acc, &e[..es as usize], *dtype, *op);
                es
            } else {
                return Ok(false);
            };
            link.received += n;
            *done += n;
            ring.store_pair(HEAD, link.received);
            true
        }
        Xfer::Recv { dst, len, done, reduce: None, .. } => {
            let ring = &link.inp;
            if let Some(t) = ring.load_pair(TAIL) {
                link.tail_seen = link.tail_seen.max(t);
            }
            let avail = link.tail_seen - link.received;
            let at = link.received % ring.cap;
            let n = avail.min(*len - *done).min(ring.cap - at);
            if n == 0 {
                return Ok(false);
            }
            // SAFETY: the bytes up to `tail` were written by the peer before it published
            // `tail` (release/acquire); the destination was vouched for by the caller.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (ring.data() + at) as *const u8,
                    (*dst + *done) as *mut u8,
                    n as usize,
                )
            };
            link.received += n;
            *done += n;
            ring.store_pair(HEAD, link.received);
            true
        }
    };
    Ok(moved)
}

/// The operations a collective's header names (its code is the index).
const COLLECTIVES: [&str; 10] = [
    "connecting",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "all_to_all",
    "reduce",
    "gather",
    "scatter",
    "barrier",
];
/// A collective header's first word, but for the operation's code in its low 16 bits
/// ("twcoll").
const COLL_MAGIC: u64 = 0x7477_636f_6c6c_0000;

/// The header of a round of collective call `seq` (operation `op`): `COLL_MAGIC | code`, then
/// `seq`.
fn coll_header(seq: u64, op: &str) -> [u8; 16] {
    let code = COLLECTIVES.iter().position(|&c| c == op);
    debug_assert!(code.is_some(), "{op} is not in COLLECTIVES");
    let code = code.unwrap_or(0xffff) as u64;
    header_bytes(COLL_MAGIC | code, seq)
}

/// The operation's code of a header's first word, if it is a collective's.
fn coll_code(first: u64) -> Option<u64> {
    (first & !0xffff == COLL_MAGIC).then_some(first & 0xffff)
}

/// What a 16-byte header names, for an error: a collective's call, else a point-to-point
/// message.
pub(crate) fn describe_header(bytes: &[u8; 16]) -> String {
    let (first, second) = header_words(bytes);
    match coll_code(first) {
        Some(code) => {
            let op = COLLECTIVES.get(code as usize).copied().unwrap_or("a collective");
            format!("collective call #{second} ({op})")
        }
        None => {
            format!("a point-to-point message (tag {first}, {second} bytes) or no header at all")
        }
    }
}

/// Fails if `x` is a collective's header that arrived and names another call than ours (the
/// ranks are out of step); a matching one is checked once.
fn check_header(op: &str, x: &mut Xfer) -> Result<()> {
    let Xfer::Recv { peer, dst, len, done, expect, .. } = x else { return Ok(()) };
    let Some(want) = *expect else { return Ok(()) };
    if *done < *len {
        return Ok(());
    }
    // SAFETY: `dst` is the 16-byte slot `run` keeps for this header while the round runs,
    // all of it written (`done == len == 16`).
    let got = unsafe { std::ptr::read(*dst as *const [u8; 16]) };
    if got != want {
        return Err(Error::invalid(format!(
            "{op}: rank {peer}'s next message is {}, and this rank is in {}: the ranks called \
             different collectives, or not in the same order",
            describe_header(&got),
            describe_header(&want)
        )));
    }
    *expect = None;
    Ok(())
}

/// A receive's transfers from rank `peer`: its header's box, the header's transfer into it,
/// then the message's `len` bytes into `dst`.
fn recv_parts(peer: usize, dst: u64, len: u64) -> (Box<[u8; 16]>, Xfer, Xfer) {
    let mut bytes = Box::new([0u8; 16]);
    let at = bytes.as_mut_ptr() as u64;
    let header = Xfer::Recv { peer, dst: at, len: 16, done: 0, reduce: None, expect: None };
    let body = Xfer::Recv { peer, dst, len, done: 0, reduce: None, expect: None };
    (bytes, header, body)
}

/// The two words of a header (the inverse of [`header_bytes`]).
fn header_words(bytes: &[u8; 16]) -> (u64, u64) {
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    (word(0), word(8))
}

/// A point-to-point message's header: its tag and length.
fn header_bytes(tag: u64, len: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..].copy_from_slice(&len.to_le_bytes());
    b
}

/// Bytes of each of at most `readers` pieces of `len` bytes of reads cut as `cut` says (whole
/// 4 KiB pages but the last).
fn piece_of(len: usize, readers: usize, cut: Cut) -> usize {
    let (split, piece) = thresholds(cut);
    pieces(len, readers, split, piece)
}

/// At most `readers` pieces of at least `piece_min` bytes or half of `len`, whichever is
/// less; one piece below `split_min`.
fn pieces(len: usize, readers: usize, split_min: usize, piece_min: usize) -> usize {
    if readers <= 1 || len < split_min {
        return len;
    }
    len.div_ceil(readers).max(piece_min.min(len.div_ceil(2))).next_multiple_of(4096)
}

/// `f()`, with a panic turned into an error naming `rank` (a reader thread's panic fails the
/// operation like a failed read: the group is told, instead of the unwinding caller leaving
/// the others to wait for their timeout).
fn unwound(
    rank: usize,
    f: impl FnOnce() -> std::result::Result<(), (usize, std::io::Error)>,
) -> std::result::Result<(), (usize, std::io::Error)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err((rank, std::io::Error::other("a reader thread panicked"))))
}

/// A piece of a collective's copying, and the rank it concerns (named if it fails).
type Read<'a> = (usize, Move<'a>);

/// Bytes moved by a reader thread.
enum Move<'a> {
    /// `dst.len()` bytes at an address of another process (`pid`, `addr`) into `dst`
    /// (`process_vm_readv`).
    Read(u32, u64, &'a mut [u8]),
    /// Within this process (`src` into `dst`, of one length).
    Copy(&'a [u8], &'a mut [u8]),
}

impl<'a> Move<'a> {
    fn len(&self) -> usize {
        match self {
            Self::Read(_, _, d) | Self::Copy(_, d) => d.len(),
        }
    }

    /// The first `at` bytes (at most all), and the rest.
    fn split(self, at: usize) -> (Self, Self) {
        let at = at.min(self.len());
        match self {
            Self::Read(pid, addr, d) => {
                let (a, b) = d.split_at_mut(at);
                (Self::Read(pid, addr, a), Self::Read(pid, addr + at as u64, b))
            }
            Self::Copy(s, d) => {
                let (sa, sb) = s.split_at(at.min(s.len()));
                let (da, db) = d.split_at_mut(at);
                (Self::Copy(sa, da), Self::Copy(sb, db))
            }
        }
    }

    fn run(self) -> std::io::Result<()> {
        match self {
            Self::Read(pid, addr, d) => read_process(pid, d, addr),
            Self::Copy(s, d) => {
                d.copy_from_slice(s);
                Ok(())
            }
        }
    }
}

thread_local! {
    /// A reader thread's scratch block for all_reduce's reduction (kept between calls).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The threads one rank's large copies and direct reads are spread over: the caller's and a
/// pool of `n - 1` more, started at the first large copy and stopped with the communicator
/// (starting threads at every call cost tens of µs each, as much as a 2 MiB read).
struct Readers {
    n: usize,
    pool: std::sync::OnceLock<Option<rayon::ThreadPool>>,
}

impl Readers {
    fn new(n: usize) -> Self {
        Self { n: n.max(1), pool: std::sync::OnceLock::new() }
    }

    /// The pool, started on first use (`None`: the OS refused threads; the pieces then run
    /// one after another on the caller's thread).
    fn pool(&self) -> Option<&rayon::ThreadPool> {
        if self.n <= 1 {
            return None; // (a pool of 0 threads would be rayon's default: one per CPU)
        }
        self.pool
            .get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(self.n - 1)
                    .thread_name(|i| format!("tw-pg-reader-{i}"))
                    .build()
                    .map_err(|e| log::warn!("starting the collective's reader threads: {e}"))
                    .ok()
            })
            .as_ref()
    }

    /// The threads jobs run on at once: the caller's and the pool's (1 where the pool could
    /// not start).
    fn threads(&self) -> usize {
        if self.pool().is_some() {
            self.n
        } else {
            1
        }
    }

    /// `f(offset, piece)` for `dst` cut into at most `n` pieces (as `cut` says): the first on
    /// the caller's thread, the others on the pool; the first error.
    fn split<E: Send>(
        &self,
        dst: &mut [u8],
        cut: Cut,
        f: impl Fn(usize, &mut [u8]) -> std::result::Result<(), E> + Sync,
    ) -> std::result::Result<(), E> {
        let piece = piece_of(dst.len(), self.n, cut);
        if piece >= dst.len() {
            return f(0, dst);
        }
        let pieces: Vec<(usize, &mut [u8])> =
            dst.chunks_mut(piece).enumerate().map(|(i, d)| (i * piece, d)).collect();
        self.run(pieces, |(at, d)| f(at, d))
    }

    /// `f(job)` for every job: the first on the caller's thread, the others on the pool (one
    /// after another on the caller's when the pool could not start); the first error.
    fn run<T: Send, E: Send>(
        &self,
        jobs: Vec<T>,
        f: impl Fn(T) -> std::result::Result<(), E> + Sync,
    ) -> std::result::Result<(), E> {
        let Some(pool) = (if jobs.len() > 1 { self.pool() } else { None }) else {
            return jobs.into_iter().try_for_each(f);
        };
        let failed = std::sync::Mutex::new(None);
        pool.in_place_scope(|scope| {
            let (f, failed) = (&f, &failed);
            let note = |r: std::result::Result<(), E>| {
                if let Err(e) = r {
                    failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(e);
                }
            };
            let mut jobs = jobs.into_iter();
            let first = jobs.next();
            for job in jobs {
                scope.spawn(move |_| note(f(job)));
            }
            if let Some(job) = first {
                note(f(job));
            }
        });
        match failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads every `(rank, source, dst)` (`dst.len()` bytes) in one go: all the bytes cut
    /// into at most `n` equal shares in the order given (one wake-up of the pool for every
    /// block, not one per block); the first error, with the rank read.
    fn read_all(
        &self,
        reads: Vec<Read<'_>>,
        cut: Cut,
    ) -> std::result::Result<(), (usize, std::io::Error)> {
        let total: usize = reads.iter().map(|r| r.1.len()).sum();
        let share = piece_of(total, self.n, cut).max(1);
        let mut groups: Vec<Vec<Read<'_>>> = vec![Vec::new()];
        let mut room = share;
        for (r, mut m) in reads {
            while m.len() > 0 {
                if room == 0 {
                    groups.push(Vec::new());
                    room = share;
                }
                let take = room.min(m.len());
                let (now, rest) = m.split(take);
                if let Some(g) = groups.last_mut() {
                    g.push((r, now));
                }
                (m, room) = (rest, room - take);
            }
        }
        self.run(groups, |group| {
            let first = group.first().map_or(0, |g| g.0);
            unwound(first, || group.into_iter().try_for_each(|(r, m)| m.run().map_err(|e| (r, e))))
        })
    }

    /// `dst.copy_from_slice(src)`, spread over the threads when large.
    fn copy(&self, dst: &mut [u8], src: &[u8], cut: Cut) {
        let copied = self.split(dst, cut, |at, d| {
            d.copy_from_slice(&src[at..at + d.len()]);
            Ok::<(), std::convert::Infallible>(())
        });
        if let Err(never) = copied {
            match never {}
        }
    }
}

/// `buf` cut at `ranges` (disjoint; in any order): the slice of each, by index (empty for an
/// empty range).
fn disjoint_mut<'a>(buf: &'a mut [u8], ranges: &[Range<usize>]) -> Vec<&'a mut [u8]> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<&'a mut [u8]> = (0..ranges.len()).map(|_| <&mut [u8]>::default()).collect();
    let (mut rest, mut at): (&'a mut [u8], usize) = (buf, 0);
    for i in order {
        let r = &ranges[i];
        if r.is_empty() {
            continue;
        }
        let skip = r.start.saturating_sub(at).min(rest.len());
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let take = r.len().min(tail.len());
        let (head, tail) = tail.split_at_mut(take);
        out[i] = head;
        (rest, at) = (tail, r.start + take);
    }
    out
}

/// Reads `dst.len()` bytes at `addr` of process `pid` into `dst` (`process_vm_readv`).
fn read_process(pid: u32, dst: &mut [u8], addr: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let local =
            libc::iovec { iov_base: dst[done..].as_mut_ptr().cast(), iov_len: dst.len() - done };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: dst.len() - done,
        };
        // SAFETY: `local` covers the rest of `dst`, ours and writable; the kernel checks the
        // remote range against the other process's mappings (EFAULT, not a fault of ours).
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read 0 bytes"));
        }
        done += n as usize;
    }
    Ok(())
}

/// A block's place in its owner's memory, as sent to the rank that reads it.
fn encode_block(addr: u64, len: usize) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..].copy_from_slice(&(len as u64).to_le_bytes());
    b
}

fn decode_block(b: &[u8; 16]) -> (u64, usize) {
    let word = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());
    (word(&b[..8]), word(&b[8..]) as usize)
}

/// Direct reads are on unless `TIDEWIRE_PG_DIRECT=0`.
fn direct_allowed() -> bool {
    env_on("TIDEWIRE_PG_DIRECT")
}

/// Whether pairs read directly may move their all_to_all blocks through pipes
/// (`TIDEWIRE_PG_PIPES=0`: by `process_vm_readv` instead).
fn pipes_allowed() -> bool {
    env_on("TIDEWIRE_PG_PIPES")
}

/// A switch from the environment, on unless set to `0`.
fn env_on(key: &str) -> bool {
    std::env::var(key).map_or(true, |v| v != "0")
}

/// Consecutive ranges of the given lengths.
fn offsets_of(lens: &[usize]) -> Vec<Range<usize>> {
    let mut at = 0;
    lens.iter()
        .map(|&l| {
            let r = at..at + l;
            at += l;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_reads_split_into_pieces_of_a_mebibyte_and_at_least_two() {
        let (m, k) = (1usize << 20, 1usize << 10);
        let p = |len| pieces(len, 4, READ_SPLIT_MIN, READ_PIECE_MIN);
        assert_eq!(p(512 * k), 512 * k, "below the split: one piece on the caller's thread");
        assert_eq!(p(m), 512 * k, "two pieces at the split");
        assert_eq!(p(2 * m), m);
        assert_eq!(p(4 * m), m, "four readers");
        assert_eq!(p(8 * m), 2 * m, "no more pieces than readers");
        assert_eq!(p(3 * m + 5), m, "whole pages but the last");
        assert_eq!(
            pieces(8 * m, 1, READ_SPLIT_MIN, READ_PIECE_MIN),
            8 * m,
            "one reader: one piece"
        );
        // A reduction's reads: split from 256 KiB, in pieces of at least 64 KiB.
        assert_eq!(pieces(512 * k, 4, SPLIT_MIN, PIECE_MIN), 128 * k);
        assert_eq!(pieces(256 * k, 4, SPLIT_MIN, PIECE_MIN), 64 * k);
        assert_eq!(pieces(255 * k, 4, SPLIT_MIN, PIECE_MIN), 255 * k);
    }

    #[test]
    fn disjoint_mut_cuts_ranges_in_any_order_and_reports_a_short_buffer_as_short() {
        let mut buf: Vec<u8> = (0..20).collect();
        let ranges = [10..15, 0..4, 4..4, 15..25];
        let cut = disjoint_mut(&mut buf, &ranges);
        assert_eq!(cut[0], &[10, 11, 12, 13, 14]);
        assert_eq!(cut[1], &[0, 1, 2, 3]);
        assert!(cut[2].is_empty());
        // Past the end: only what there is (the caller's length check then refuses it).
        assert_eq!(cut[3], &[15, 16, 17, 18, 19]);
    }

    #[test]
    fn one_reader_starts_no_pool_and_runs_every_piece_itself() {
        let readers = Readers::new(1);
        let me = std::thread::current().id();
        let mut buf = vec![0u8; 4 << 20];
        let seen = std::sync::Mutex::new(Vec::new());
        let ran = readers.split(&mut buf, Cut::Reduction, |at, d| {
            seen.lock().unwrap().push((at, d.len(), std::thread::current().id()));
            Ok::<(), ()>(())
        });
        assert_eq!(ran, Ok(()));
        assert!(readers.pool().is_none(), "a pool for one reader");
        assert_eq!(*seen.lock().unwrap(), vec![(0, 4 << 20, me)]);
    }

    #[test]
    fn a_reader_that_panics_fails_the_read_naming_the_rank() {
        let got = unwound(3, || panic!("a bug in a reader"));
        match got {
            Err((3, e)) => assert!(e.to_string().contains("panicked"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(unwound(1, || Ok(())), Ok(())));
    }

    #[test]
    fn read_all_reads_every_block_over_the_pool_in_equal_shares() {
        let pid = std::process::id();
        let srcs: Vec<Vec<u8>> = (0..4u8)
            .map(|k| (0..(700 << 10) + k as usize).map(|i| (i as u8) ^ k).collect())
            .collect();
        let mut dsts: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len()]).collect();
        let readers = Readers::new(4);
        // Blocks 0-2 read from a process (ourselves), block 3 copied here.
        let reads: Vec<Read<'_>> = dsts
            .iter_mut()
            .zip(&srcs)
            .enumerate()
            .map(|(r, (d, s))| {
                let m = if r == 3 {
                    Move::Copy(s, d.as_mut_slice())
                } else {
                    Move::Read(pid, s.as_ptr() as u64, d.as_mut_slice())
                };
                (r, m)
            })
            .collect();
        if let Err((r, e)) = readers.read_all(reads, Cut::Copy) {
            panic!("reading block {r} (process_vm_readv of this process): {e}");
        }
        assert_eq!(dsts, srcs);
    }
}
