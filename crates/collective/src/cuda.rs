//! The CUDA path of a group: every rank's GPU buffer mapped for ours (over NVLink), and the
//! collectives as kernel launches on the caller's stream. Nothing here waits on the host:
//! a launch returns at once, the kernels wait for their peers with a deadline (the group's
//! timeout) and record a failure in a host word the next call reads.

use std::sync::Arc;
use std::time::Duration;

use tidewire::gpu::alloc::HostFlag;
use tidewire::gpu::coll::{
    self, p2p_bytes, p2p_word, CollArgs, CollKernels, Failure, Kernel, BUFS, HEADER, MAX_BLOCKS,
    MAX_RANKS, P2P_MAX_TAG,
};
use tidewire::gpu::{Gpu, GpuError};
use tidewire::{Engine, PeerBuffer, PeerBuffers};

use crate::dtype::{DType, ReduceOp};
use crate::error::{Error, Result};

/// Which collective a launch is (what a failure names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaOp {
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    Broadcast,
    Reduce,
    Gather,
    Scatter,
    /// Sends and receives (one launch: [`CudaComm::p2p`]).
    P2p,
}

impl CudaOp {
    fn code(self) -> i32 {
        self as i32
    }

    pub fn name(self) -> &'static str {
        coll::WHAT[self as usize]
    }

    /// The operation of a name ([`CudaOp::name`]).
    pub fn parse(name: &str) -> Result<Self> {
        const ALL: [CudaOp; 9] = [
            CudaOp::AllReduce,
            CudaOp::AllGather,
            CudaOp::ReduceScatter,
            CudaOp::AllToAll,
            CudaOp::Broadcast,
            CudaOp::Reduce,
            CudaOp::Gather,
            CudaOp::Scatter,
            CudaOp::P2p,
        ];
        ALL.into_iter()
            .find(|o| o.name() == name)
            .ok_or_else(|| Error::invalid(format!("no collective {name:?} on the CUDA path")))
    }
}

/// Bytes of the data area of a rank's buffer when `TIDEWIRE_PG_CUDA_BYTES` does not say.
const DATA_BYTES: u64 = 128 << 20;
/// Blocks a collective launch uses when `TIDEWIRE_PG_CUDA_BLOCKS` does not say.
const BLOCKS: u32 = 128;

/// The blocks every launch of a group uses (every rank must use the same).
pub fn blocks() -> u32 {
    tidewire::gpu::copy::tuning("TIDEWIRE_PG_CUDA_BLOCKS", BLOCKS).clamp(1, MAX_BLOCKS)
}

/// The most KiB a block moves to a peer in one round (`TIDEWIRE_PG_CUDA_CHUNK_KIB`; 0, the
/// default: a block's share of a slot). Every rank must use the same.
pub fn chunk_kib() -> u32 {
    tidewire::gpu::copy::tuning("TIDEWIRE_PG_CUDA_CHUNK_KIB", 0).min(1 << 20)
}

/// The bytes of a rank's buffer for a group of `ranks`: the header, four buffers of a slot per
/// rank (`TIDEWIRE_PG_CUDA_BYTES` of data in all, at least 64 KiB a slot), then the
/// point-to-point area.
pub fn buffer_bytes(ranks: usize) -> u64 {
    let data = std::env::var("TIDEWIRE_PG_CUDA_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DATA_BYTES);
    let slot = (data / (BUFS * ranks.max(1) as u64) / 4096 * 4096).max(64 << 10);
    HEADER + BUFS * ranks.max(1) as u64 * slot + p2p_bytes(ranks.max(1))
}

/// The kernels' code of an element type (the order of [`coll::DTYPES`]).
fn dtype_code(d: DType) -> i32 {
    match d {
        DType::I8 => 0,
        DType::I16 => 1,
        DType::I32 => 2,
        DType::I64 => 3,
        DType::U8 => 4,
        DType::Bool => 5,
        DType::F16 => 6,
        DType::BF16 => 7,
        DType::F32 => 8,
        DType::F64 => 9,
    }
}

/// The kernels' code of a reduction (the order of [`coll::OPS`]).
fn op_code(op: ReduceOp) -> i32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Product => 2,
        ReduceOp::Min => 3,
        ReduceOp::Max => 4,
    }
}

fn gpu_err(context: String) -> impl FnOnce(GpuError) -> Error {
    move |source| Error::Engine { context, source: tidewire::Error::gpu("CUDA", source) }
}

/// The two words that let a launch replayed from a CUDA graph find that its path closed.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    /// A 32-bit word of device memory: nonzero while the path is open (the caller zeroes it
    /// when it closes the path).
    pub gate: u64,
    /// A 32-bit word of pinned host memory: launches that found the gate closed add 1.
    pub stale: u64,
}

/// One rank's CUDA path of a group.
pub struct CudaComm {
    peers: PeerBuffers,
    kernels: Arc<CollKernels>,
    /// Where the kernels record a failure.
    failure: HostFlag,
    gate: Gate,
    slot: u64,
    blocks: u32,
    chunk_kib: u32,
    timeout: Duration,
}

impl CudaComm {
    /// Allocates this rank's buffer on GPU `device` for a group of `ranks`: `(address,
    /// length)`, to publish.
    pub fn allocate(engine: &Engine, device: u32, ranks: usize) -> Result<(u64, u64)> {
        PeerBuffers::allocate(engine, "collective", device, buffer_bytes(ranks))
            .map_err(Error::from)
    }

    /// Maps every rank's buffer (`peers[r]`, ours included) and loads the kernels. Ranks no
    /// GPU path reaches are listed by [`CudaComm::unreached`] (the caller then stages CUDA
    /// tensors through host memory, for every rank alike).
    ///
    /// # Safety
    /// `gate.gate` is 4 bytes of device memory of `device` and `gate.stale` 4 bytes of pinned
    /// host memory, both alive for the process (a graph may replay a launch at any time).
    pub unsafe fn connect(
        engine: Arc<Engine>,
        rank: usize,
        device: u32,
        peers: &[PeerBuffer],
        timeout: Duration,
        gate: Gate,
    ) -> Result<Self> {
        // Every rank of the path takes part in every collective: its kernels have no absent
        // ranks (the caller forms a path over the ranks taking part).
        if let Some(r) = peers.iter().position(PeerBuffer::is_absent) {
            if let Some(mine) = peers.get(rank) {
                // Ours is freed here, as on any later failure.
                let _ = engine.free_device(mine.addr);
            }
            return Err(Error::invalid(format!(
                "rank {r} has no buffer (absent) on the CUDA path"
            )));
        }
        // First: from here on our buffer belongs to the mappings, freed with them on any
        // later failure.
        let peers =
            PeerBuffers::connect(engine, "collective", rank, device, peers).map_err(Error::from)?;
        let ranks = peers.ranks();
        if !(2..=MAX_RANKS).contains(&ranks) {
            return Err(Error::invalid(format!(
                "rank {rank} of {ranks} (2 to {MAX_RANKS} ranks on the CUDA path)"
            )));
        }
        let gpu = Gpu::get(device).map_err(gpu_err(format!("cuda:{device}")))?;
        let kernels =
            CollKernels::load(gpu).map_err(gpu_err("loading the collective kernels".into()))?;
        let failure = HostFlag::new(0).map_err(gpu_err("the failure word".into()))?;
        let data = peers.smallest().saturating_sub(HEADER + p2p_bytes(ranks));
        let slot = data / (BUFS * ranks as u64) / 4096 * 4096;
        let blocks = blocks();
        if slot < 16 * u64::from(blocks) {
            return Err(Error::invalid(format!(
                "the smallest rank's buffer ({} bytes) leaves {slot}-byte slots for {blocks} blocks",
                peers.smallest()
            )));
        }
        Ok(Self { peers, kernels, failure, gate, slot, blocks, chunk_kib: chunk_kib(), timeout })
    }

    /// The ranks no GPU path reaches, with the reason.
    pub fn unreached(&self) -> Vec<(usize, String)> {
        self.peers.unreached()
    }

    /// How each rank is reached (`local`, `nvlink`, `mnnvl`, `none`).
    pub fn paths(&self) -> Vec<String> {
        self.peers.paths()
    }

    /// A failure a kernel recorded, as the error later calls get.
    pub fn failure(&self) -> Option<Error> {
        let f = Failure::decode(self.failure.load())?;
        let op = f.what.to_string();
        Some(if f.why == coll::Why::TimedOut {
            Error::Timeout { op, ranks: vec![f.peer], after: self.timeout }
        } else {
            Error::RankFailed { op, rank: f.peer, reason: f.reason().to_string() }
        })
    }

    /// The kernels' arguments of a call, checked: the segments of `send_base` to each rank and
    /// of `recv_base` from each.
    fn args(
        &self,
        op: CudaOp,
        send_base: u64,
        send: &[(u64, u64)],
        recv_base: u64,
        recv: &[(u64, u64)],
    ) -> Result<CollArgs> {
        if let Some(first) = self.failure() {
            // The group is unusable: every later call says why, naming the failed rank.
            let earlier = |f: &str| format!("{} (the group failed in an earlier {f})", op.name());
            return Err(match first {
                Error::RankFailed { op: f, rank, reason } => {
                    Error::RankFailed { op: earlier(&f), rank, reason }
                }
                Error::Timeout { op: f, ranks, after } => {
                    Error::Timeout { op: earlier(&f), ranks, after }
                }
                other => other,
            });
        }
        let ranks = self.peers.ranks();
        if send.len() != ranks || recv.len() != ranks {
            return Err(Error::invalid(format!(
                "{}: {} send and {} receive segments for {ranks} ranks",
                op.name(),
                send.len(),
                recv.len()
            )));
        }
        let need = HEADER + BUFS * ranks as u64 * self.slot + p2p_bytes(ranks);
        let addrs = self
            .peers
            .addresses(need)
            .map_err(|why| Error::invalid(format!("{}: {why}", op.name())))?;
        let mut a = CollArgs::empty();
        for (r, (addr, alive)) in addrs.into_iter().enumerate() {
            a.peers[r] = addr;
            a.alive[r] = alive;
            (a.send_off[r], a.send_len[r]) = send[r];
            (a.recv_off[r], a.recv_len[r]) = recv[r];
        }
        (a.send_base, a.recv_base) = (send_base, recv_base);
        a.err_at = self.failure.addr();
        (a.gate, a.stale_at) = (self.gate.gate, self.gate.stale);
        a.slot = self.slot;
        a.timeout_ns = i64::try_from(self.timeout.as_nanos()).unwrap_or(i64::MAX);
        a.rank = self.peers.rank() as i32;
        a.ranks = ranks as i32;
        a.what = op.code();
        a.chunk_kib = self.chunk_kib as i32;
        Ok(a)
    }

    /// Moves segments on `stream`: `send[j] = (offset, length)` of `send_base` to rank `j`,
    /// which receives it at its own `recv[r]` of its `recv_base`; our own segment is copied
    /// locally (`send[r]` and `recv[r]` of equal length).
    ///
    /// # Safety
    /// Every segment is device memory of this GPU, alive until the work on `stream` is done;
    /// every rank makes the matching call (rank `j`'s `recv[r]` as long as our `send[j]`) in
    /// the same order.
    pub unsafe fn exchange(
        &self,
        stream: u64,
        op: CudaOp,
        send_base: u64,
        send: &[(u64, u64)],
        recv_base: u64,
        recv: &[(u64, u64)],
    ) -> Result<()> {
        let a = self.args(op, send_base, send, recv_base, recv)?;
        let r = self.peers.rank();
        if send[r].1 != recv[r].1 {
            return Err(Error::invalid(format!(
                "{}: rank {r} sends itself {} bytes and receives {}",
                op.name(),
                send[r].1,
                recv[r].1
            )));
        }
        // SAFETY: forwarded contract; `args` laid the buffers out as the kernel expects.
        unsafe { self.launch(op, Kernel::Exchange, stream, &a) }
    }

    /// Reduces on `stream`: our output is `recv[r]` of `recv_base`, the reduction (in rank
    /// order) of our `send[r]` segment of `send_base` and what every rank `j` with
    /// `recv[j].1 > 0` sends us (its `send[r]`); we send `send[j]` to every rank `j` that
    /// expects it.
    ///
    /// # Safety
    /// As for [`CudaComm::exchange`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce(
        &self,
        stream: u64,
        op: CudaOp,
        send_base: u64,
        send: &[(u64, u64)],
        recv_base: u64,
        recv: &[(u64, u64)],
        dtype: DType,
        redop: ReduceOp,
    ) -> Result<()> {
        redop.check(dtype)?;
        let mut a = self.args(op, send_base, send, recv_base, recv)?;
        let r = self.peers.rank();
        let out = recv[r].1;
        let size = dtype.size() as u64;
        let uneven = recv.iter().enumerate().any(|(j, s)| j != r && s.1 != 0 && s.1 != out)
            || send.iter().chain(recv).any(|s| s.0 % size != 0 || s.1 % size != 0)
            || (out > 0 && send[r].1 != out);
        if uneven {
            return Err(Error::invalid(format!(
                "{}: every contribution must be as long as the output ({out} bytes) and whole {dtype:?} elements",
                op.name()
            )));
        }
        (a.dtype, a.redop) = (dtype_code(dtype), op_code(redop));
        // SAFETY: forwarded contract; the codes are the kernel's.
        unsafe { self.launch(op, Kernel::Reduce, stream, &a) }
    }

    /// Sends and receives on `stream`, in one launch: `sends` are `(rank, address, bytes, tag)`
    /// of messages to those ranks, `recvs` where messages from those ranks land; at most one
    /// of each per rank. Each travels in the rank pair's own direction, so the two ranks of a
    /// pair may both send and receive in one launch; a message of up to lanes × 128 KiB
    /// (`coll::p2p_lanes`: 8 MiB for two ranks) leaves without waiting for its receiver. The
    /// receiver checks the length and tag (another is a failure naming the sender, and the
    /// group is unusable after it).
    ///
    /// # Safety
    /// Every message is device memory of this GPU, alive until the work on `stream` is done;
    /// the rank of each message makes the matching call (a receive for our send, of the same
    /// length and tag) in the same order with respect to its other messages with us.
    pub unsafe fn p2p(
        &self,
        stream: u64,
        sends: &[(usize, u64, u64, u64)],
        recvs: &[(usize, u64, u64, u64)],
    ) -> Result<()> {
        let ranks = self.peers.ranks();
        let empty = vec![(0u64, 0u64); ranks];
        let mut a = self.args(CudaOp::P2p, 0, &empty, 0, &empty)?;
        let me = self.peers.rank();
        for (list, to) in [(sends, true), (recvs, false)] {
            for &(r, addr, bytes, tag) in list {
                let what = if to { "a send to" } else { "a receive from" };
                if r >= ranks || r == me {
                    return Err(Error::invalid(format!(
                        "send/recv: {what} rank {r} (rank {me} of {ranks})"
                    )));
                }
                let Some(word) = p2p_word(bytes, tag) else {
                    return Err(Error::invalid(format!(
                        "send/recv: {what} rank {r} of {bytes} bytes with tag {tag} (tags up to {P2P_MAX_TAG} on the NVLink path)"
                    )));
                };
                let (off, len) = if to {
                    (&mut a.send_off[r], &mut a.send_len[r])
                } else {
                    (&mut a.recv_off[r], &mut a.recv_len[r])
                };
                if *len != 0 {
                    return Err(Error::invalid(format!(
                        "send/recv: two messages in one launch for {what} rank {r}"
                    )));
                }
                (*off, *len) = (addr, word);
            }
        }
        let ops = sends.len() + recvs.len();
        if ops == 0 {
            return Ok(());
        }
        if ops > coll::P2P_MAX_OPS as usize {
            // Every block of a launch must be resident at once (a send's blocks spin until
            // the peer's receive runs): more would risk blocks that never get an SM.
            return Err(Error::invalid(format!(
                "send/recv: {ops} messages in one launch (at most {}: {} peers both ways)",
                coll::P2P_MAX_OPS,
                coll::P2P_MAX_OPS / 2
            )));
        }
        let ops = ops as u32;
        log::debug!(
            "send/recv: {} sends, {} receives on the NVLink path",
            sends.len(),
            recvs.len()
        );
        // SAFETY: forwarded contract; `args` laid the buffers out as the kernel expects and the
        // messages are as `tw_coll_p2p` reads them.
        unsafe { self.kernels.launch_p2p(stream, &a, ops) }
            .map_err(gpu_err("launching send/recv".into()))
    }

    /// # Safety
    /// As for [`CudaComm::exchange`], with `a` made by `args`.
    unsafe fn launch(&self, op: CudaOp, kernel: Kernel, stream: u64, a: &CollArgs) -> Result<()> {
        log::debug!("{}: {kernel:?} kernel on the NVLink path, {} blocks", op.name(), self.blocks);
        // SAFETY: forwarded contract.
        unsafe { self.kernels.launch(kernel, stream, a, self.blocks) }
            .map_err(gpu_err(format!("launching {}", op.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_codes_follow_the_kernels_tables() {
        for (k, name) in coll::DTYPES.iter().enumerate() {
            let d = DType::parse(name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(dtype_code(d), k as i32, "{name}");
        }
        for (k, name) in coll::OPS.iter().enumerate() {
            let op = ReduceOp::parse(name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(op_code(op), k as i32, "{name}");
        }
    }
}
