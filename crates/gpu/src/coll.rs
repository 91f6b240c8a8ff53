//! The collective kernels (`coll.cu`): a segment exchange and a reduction over the group's
//! NVLink-mapped buffers, launched on the caller's stream. Compiled with NVRTC and loaded per
//! GPU by [`CollKernels::load`], which the communicator calls when its CUDA path starts (never
//! on the first collective).

use std::sync::Arc;

use crate::device::Gpu;
use crate::kernels::{param, Loaded, Source};
use crate::GpuError;

/// Ranks a group's CUDA path may have (the kernels' fixed arrays).
pub const MAX_RANKS: usize = 64;
/// Blocks a collective kernel may have.
pub const MAX_BLOCKS: u32 = 128;
/// Threads of a block.
pub const THREADS: u32 = 512;
/// Buffers a pair's rounds rotate through.
pub const BUFS: u64 = 4;
/// Bytes of a buffer's header (flags, counters) before the data.
pub const HEADER: u64 = 2 * MAX_RANKS as u64 * MAX_BLOCKS as u64 * 8;
/// Point-to-point: blocks per operation, slots per (source, lane), bytes of a chunk (the
/// `TW_P2P_*` of `coll.cu`).
pub const P2P_MAX_LANES: u32 = 64;
pub const P2P_DEPTH: u64 = 4;
pub const P2P_CHUNK: u64 = 32 << 10;
/// The largest message a send may carry (its length travels in 48 bits, with the tag above).
pub const P2P_MAX_BYTES: u64 = (1 << 48) - 2;
/// The largest tag a send may carry on the NVLink path.
pub const P2P_MAX_TAG: u64 = 0xffff;

/// Bytes of the point-to-point area after the collectives' data, for `ranks` ranks: four
/// tables of a word per (rank, lane), then the slots of every source.
pub fn p2p_bytes(ranks: usize) -> u64 {
    4 * MAX_RANKS as u64 * u64::from(P2P_MAX_LANES) * 8
        + ranks as u64 * u64::from(p2p_lanes(ranks)) * P2P_DEPTH * (P2P_CHUNK + 16)
}

/// Blocks per point-to-point message in a group of `ranks`: the most (a power of two, 4 to
/// [`P2P_MAX_LANES`]) with which a launch of a message each way to every peer stays within
/// [`P2P_LAUNCH_BLOCKS`]. Every block of a launch must be resident at once (a receive block
/// that spins while the send block behind it waits for an SM could close a cycle across
/// ranks), and both ends of a message compute the same lanes from the group's size alone. One
/// block copies ≈ 7.5 GB/s over NVLink: two ranks (64 lanes) move twice what 16 lanes did.
pub fn p2p_lanes(ranks: usize) -> u32 {
    let ops = (2 * ranks.saturating_sub(1)).clamp(1, P2P_MAX_OPS as usize) as u32;
    let mut lanes = P2P_MAX_LANES;
    while lanes > 4 && ops * lanes > P2P_LAUNCH_BLOCKS {
        lanes /= 2;
    }
    lanes
}

/// Messages a point-to-point launch carries at most (the group queues the rest for the next).
pub const P2P_MAX_OPS: u32 = 32;
/// Blocks of 512 threads a point-to-point launch keeps to: two per SM (the kernel's launch
/// bounds guarantee two) of a GPU with 96 SMs or more (A100 108, H100 PCIe 114, H100 / H200
/// SXM 132).
pub const P2P_LAUNCH_BLOCKS: u32 = 192;

/// A message's word of the p2p kernel's arguments: its bytes + 1, with the tag above bit 48.
pub fn p2p_word(bytes: u64, tag: u64) -> Option<u64> {
    (bytes <= P2P_MAX_BYTES && tag <= P2P_MAX_TAG).then(|| (bytes + 1) | (tag << 48))
}

/// What both kernels are told (the `CollArgs` struct of `coll.cu`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CollArgs {
    /// Each rank's buffer as this GPU addresses it (ours included).
    pub peers: [u64; MAX_RANKS],
    /// Each rank's liveness word (device-readable; 0: none, for ourselves).
    pub alive: [u64; MAX_RANKS],
    /// The bytes of `send_base` going to each rank.
    pub send_off: [u64; MAX_RANKS],
    pub send_len: [u64; MAX_RANKS],
    /// Where each rank's bytes land in `recv_base` (reduce: a contributor has a length, ours
    /// is the output's).
    pub recv_off: [u64; MAX_RANKS],
    pub recv_len: [u64; MAX_RANKS],
    pub send_base: u64,
    pub recv_base: u64,
    /// A 32-bit word of pinned host memory: a failure a kernel recorded.
    pub err_at: u64,
    /// A 32-bit word of device memory, kept for the process: nonzero while the path is open
    /// (a launch replayed from a CUDA graph after the path closed finds 0 and moves nothing).
    pub gate: u64,
    /// A 32-bit word of pinned host memory, kept for the process: launches that found the
    /// gate closed add 1.
    pub stale_at: u64,
    /// Bytes of one (buffer, source rank) slot.
    pub slot: u64,
    pub timeout_ns: i64,
    pub rank: i32,
    pub ranks: i32,
    /// Reduce only: the element type and the operation (codes of [`DTYPES`] and [`OPS`]).
    pub dtype: i32,
    pub redop: i32,
    /// The operation, for failure reports ([`WHAT`]).
    pub what: i32,
    /// The most bytes a block moves to a peer in one round, in KiB (0: its share of a slot);
    /// smaller rounds pipeline more (the same on every rank).
    pub chunk_kib: i32,
    /// Point-to-point: blocks per message ([`p2p_lanes`] of the group's size; set by
    /// [`CollKernels::launch_p2p`]).
    pub p2p_lanes: i32,
}

/// Element types by kernel code.
pub const DTYPES: [&str; 10] = [
    "int8", "int16", "int32", "int64", "uint8", "bool", "float16", "bfloat16", "float32", "float64",
];
/// Reductions by kernel code.
pub const OPS: [&str; 5] = ["sum", "avg", "product", "min", "max"];
/// Operations by code, as failures name them.
pub const WHAT: [&str; 9] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send/recv",
];

impl CollArgs {
    /// Arguments with every segment empty.
    pub fn empty() -> Self {
        Self {
            peers: [0; MAX_RANKS],
            alive: [0; MAX_RANKS],
            send_off: [0; MAX_RANKS],
            send_len: [0; MAX_RANKS],
            recv_off: [0; MAX_RANKS],
            recv_len: [0; MAX_RANKS],
            send_base: 0,
            recv_base: 0,
            err_at: 0,
            gate: 0,
            stale_at: 0,
            slot: 0,
            timeout_ns: 0,
            rank: 0,
            ranks: 0,
            dtype: 0,
            redop: 0,
            what: 0,
            chunk_kib: 0,
            p2p_lanes: 0,
        }
    }
}

/// A failure a kernel recorded (from the word it wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The operation ([`WHAT`]).
    pub what: &'static str,
    /// The rank waited for.
    pub peer: usize,
    /// What that rank did.
    pub why: Why,
}

/// Why a kernel gave up on a rank (the low byte of the failure word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It sent nothing by the deadline (1).
    TimedOut,
    /// Its process exited (2).
    Exited,
    /// It sent a message of another length or tag than the receive expected (3).
    Mismatched,
}

impl Failure {
    /// The failure in `word` (reason | operation << 8 | (peer + 1) << 16), if any.
    pub fn decode(word: u32) -> Option<Self> {
        if word == 0 {
            return None;
        }
        let what = WHAT.get(((word >> 8) & 0xff) as usize).copied().unwrap_or("a collective");
        let peer = ((word >> 16) as usize).saturating_sub(1);
        let why = match word & 0xff {
            1 => Why::TimedOut,
            3 => Why::Mismatched,
            _ => Why::Exited,
        };
        Some(Self { what, peer, why })
    }

    /// Why, in words.
    pub fn reason(&self) -> &'static str {
        match self.why {
            Why::TimedOut => "it sent nothing within the group's timeout",
            Why::Mismatched => {
                "it sent a message of another length or tag than the receive expects"
            }
            Why::Exited => "its process exited",
        }
    }
}

static SOURCE: Source = Source::new(
    concat!(include_str!("common.cuh"), include_str!("coll.cu")),
    c"tw_coll.cu",
    &[c"tw_coll_exchange", c"tw_coll_reduce", c"tw_coll_p2p"],
    "cuLaunchKernel(tw_coll)",
);

/// The collective kernels, loaded on one GPU.
pub struct CollKernels {
    k: Arc<Loaded>,
}

impl std::fmt::Debug for CollKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CollKernels(cuda:{})", self.k.gpu.ordinal)
    }
}

impl CollKernels {
    /// Compiles (once per process) and loads (once per GPU) the collective kernels on `gpu`.
    pub fn load(gpu: &'static Gpu) -> Result<Arc<Self>, GpuError> {
        Ok(Arc::new(Self { k: SOURCE.load(gpu)? }))
    }

    /// Launches `kernel` with `blocks` blocks on `stream`: [`Kernel::Exchange`] moves every
    /// segment (`send_len[j]` bytes at `send_base + send_off[j]` to rank `j`, whose kernel
    /// writes them at its `recv_base + recv_off[r]`; ours copied locally); [`Kernel::Reduce`]
    /// reduces: rank `j` contributes `send_len[j]` bytes at its `send_base + send_off[j]` to
    /// this rank if `recv_len[j] > 0`, and our output is `recv_len[rank]` bytes at
    /// `recv_base + recv_off[rank]`, the reduction of our own `send_off[rank]` segment and
    /// every contributor's, in rank order (`dtype` and `redop` codes of [`DTYPES`], [`OPS`]).
    ///
    /// # Safety
    /// `args` describes live buffers of every rank mapped for this GPU, laid out as `coll.cu`
    /// says, and segments inside live device memory of this GPU until the work on `stream` is
    /// done; every rank launches the matching call (the same pair byte counts) with the same
    /// `blocks`, in the same order.
    pub unsafe fn launch(
        &self,
        kernel: Kernel,
        stream: u64,
        args: &CollArgs,
        blocks: u32,
    ) -> Result<(), GpuError> {
        let mut a = *args;
        let mut p = [param(&mut a)];
        // SAFETY: (CollArgs), as both kernels declare; forwarded contract.
        unsafe {
            self.k.launch(kernel as usize, blocks.clamp(1, MAX_BLOCKS), THREADS, stream, &mut p)
        }
    }

    /// Launches the point-to-point kernel on `stream` for the `ops` messages `args` holds
    /// (see `tw_coll_p2p`): [`p2p_lanes`] blocks each.
    ///
    /// # Safety
    /// As for [`CollKernels::launch`]; every message's rank launches the matching operation
    /// (the same length and tag) in the same order.
    pub unsafe fn launch_p2p(
        &self,
        stream: u64,
        args: &CollArgs,
        ops: u32,
    ) -> Result<(), GpuError> {
        let mut a = *args;
        let lanes = p2p_lanes(usize::try_from(a.ranks).unwrap_or(0));
        a.p2p_lanes = lanes as i32;
        let mut p = [param(&mut a)];
        let blocks = ops.clamp(1, 2 * MAX_RANKS as u32) * lanes;
        // SAFETY: (CollArgs), as the kernel declares; forwarded contract.
        unsafe { self.k.launch(Kernel::P2p as usize, blocks, THREADS, stream, &mut p) }
    }
}

/// The two collective kernels (in the order of `SOURCE`'s names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Exchange = 0,
    Reduce = 1,
    P2p = 2,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_args_have_the_kernels_layout() {
        // Six arrays of 64 words, six words, an i64 and seven i32 (padded to 8 bytes, as C
        // pads the struct).
        assert_eq!(size_of::<CollArgs>(), 6 * 64 * 8 + 6 * 8 + 8 + 7 * 4 + 4);
        assert!(size_of::<CollArgs>() <= 4096, "a kernel's parameters fit 4 KiB");
    }

    #[test]
    fn p2p_lanes_keep_a_launch_within_its_blocks_and_depend_on_the_group_size_alone() {
        let lanes: Vec<u32> = (1..=10).map(p2p_lanes).collect();
        assert_eq!(lanes, [64, 64, 32, 32, 16, 16, 16, 8, 8, 8]);
        for ranks in 2..=MAX_RANKS {
            let ops = (2 * (ranks as u32 - 1)).min(P2P_MAX_OPS);
            let l = p2p_lanes(ranks);
            assert!(ops * l <= P2P_LAUNCH_BLOCKS, "{ranks} ranks: {l} lanes");
            assert!(l.is_power_of_two() && (4..=P2P_MAX_LANES).contains(&l));
        }
    }

    #[test]
    fn the_args_and_constants_are_the_sources() {
        let src = include_str!("coll.cu");
        use crate::kernels::layout::{define, fields, rust_fields};
        assert_eq!(define(src, "TW_COLL_RANKS"), MAX_RANKS as u64);
        assert_eq!(define(src, "TW_COLL_BLOCKS"), u64::from(MAX_BLOCKS));
        assert_eq!(define(src, "TW_COLL_BUFS"), BUFS);
        assert_eq!(define(src, "TW_P2P_MAX_LANES"), u64::from(P2P_MAX_LANES));
        assert_eq!(define(src, "TW_P2P_DEPTH"), P2P_DEPTH);
        assert_eq!(define(src, "TW_P2P_CHUNK"), P2P_CHUNK);
        let ours = rust_fields!(CollArgs: peers, alive, send_off, send_len, recv_off, recv_len, send_base, recv_base, err_at,
            gate, stale_at, slot, timeout_ns, rank, ranks, dtype, redop, what, chunk_kib, p2p_lanes
        );
        assert_eq!(fields(src, "CollArgs"), ours);
        assert!(src.contains("__launch_bounds__(512)") && THREADS == 512);
    }

    #[test]
    fn failures_decode_to_the_operation_peer_and_reason() {
        assert_eq!(Failure::decode(0), None);
        let dead = Failure::decode(2 | (3 << 8) | (2 << 16));
        let want = Failure { what: "all_to_all", peer: 1, why: Why::Exited };
        assert_eq!(dead, Some(want));
        assert_eq!(dead.map(|f| f.reason()), Some("its process exited"));
        let late = Failure::decode(1 | (1 << 16));
        let want = Failure { what: "all_reduce", peer: 0, why: Why::TimedOut };
        assert_eq!(late, Some(want));
        let other = Failure::decode(3 | (8 << 8) | (1 << 16));
        let want = Failure { what: "send/recv", peer: 0, why: Why::Mismatched };
        assert_eq!(other, Some(want));
        assert!(other.is_some_and(|f| f.reason().contains("length or tag")));
    }

    #[test]
    fn p2p_words_carry_length_and_tag() {
        assert_eq!(p2p_word(0, 0), Some(1));
        assert_eq!(p2p_word(5, 3), Some(6 | (3 << 48)));
        assert_eq!(p2p_word(P2P_MAX_BYTES + 1, 0), None);
        assert_eq!(p2p_word(1, P2P_MAX_TAG + 1), None);
    }
}
