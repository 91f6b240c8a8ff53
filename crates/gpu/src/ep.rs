//! The expert-parallel kernels (`ep.cu`): dispatch and combine, each a send kernel and a
//! receive kernel, launched on the caller's stream. Compiled with NVRTC and loaded per GPU by
//! [`EpKernels::load`], which the EP buffer calls when it is created (never on the first
//! dispatch).

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use crate::device::Gpu;
use crate::kernels::{param as ptr, Loaded, Source};
use crate::GpuError;

static SOURCE: Source = Source::new(
    concat!(include_str!("common.cuh"), include_str!("ep.cu")),
    c"tw_ep.cu",
    &NAMES,
    "cuLaunchKernel(tw_ep)",
);

/// Ranks an EP buffer may have (the kernels' fixed arrays).
pub const MAX_RANKS: usize = 64;

/// Every rank's buffer as this GPU reaches it (the `EpTable` struct of `ep.cu`, field for
/// field), in device memory the kernels read at every launch: rewritten when the membership
/// changes (between calls), so a call captured in a CUDA graph uses the buffers in force at
/// each replay.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EpTable {
    /// Each rank's buffer as this GPU addresses it (ours included; 0: takes no part).
    pub peers: [u64; MAX_RANKS],
    /// Each rank's liveness word (device-readable; 0: none, for ourselves).
    pub alive: [u64; MAX_RANKS],
    /// Bytes of one half.
    pub half: u64,
    /// Host-mapped u32 per rank ([`crate::alloc::HostWords`]): how often a wait marked
    /// that source rank inactive (its deadline passed or its process died); 0: not counted.
    pub marks: u64,
}

impl EpTable {
    /// No rank reached, half 0: a launch reading it fits nowhere and takes part in nothing.
    pub const EMPTY: Self =
        Self { peers: [0; MAX_RANKS], alive: [0; MAX_RANKS], half: 0, marks: 0 };
}

/// Bytes of an [`EpTable`] in device memory.
pub const TABLE_BYTES: u64 = size_of::<EpTable>() as u64;

/// What every EP kernel is told (the `EpArgs` struct of `ep.cu`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EpArgs {
    /// The device address of the buffer's [`EpTable`].
    pub table: u64,
    /// The device word holding the call's sequence number (from 1; its parity picks the
    /// buffer half), written by [`EpKernels::dispatch_send`] on the same stream.
    pub seq_at: u64,
    /// Bytes of one half the call's layout uses: a launch whose table holds smaller buffers
    /// (a graph replayed after the membership changed) takes part in nothing and marks every
    /// other rank inactive.
    pub need: u64,
    pub off_dsig: u64,
    pub off_ddata: u64,
    pub off_dsrc: u64,
    pub off_csig: u64,
    pub off_cdata: u64,
    pub off_fin: u64,
    pub timeout_ns: i64,
    pub rank: i32,
    pub ranks: i32,
    pub experts: i32,
    pub local_experts: i32,
    pub max_tokens: i32,
    pub hidden: i32,
    pub topk: i32,
    pub num_tokens: i32,
    /// 1: dispatch rows as e4m3 with one fp32 scale per 128 channels; 0: bf16.
    pub fp8: i32,
    /// Dispatch send: the parts each token's row is cut into (one warp each); set by
    /// [`EpKernels::dispatch_send`].
    pub slices: i32,
    /// 16 bits naming the call's shape (tokens per rank, hidden, experts, fp8), carried in
    /// every signal: a signal of another shape marks its sender inactive (counted apart in
    /// the marks' second half, `ranks` words on) instead of its rows being read.
    pub shape: i32,
}

const NAMES: [&std::ffi::CStr; 4] =
    [c"tw_ep_dispatch_send", c"tw_ep_dispatch_recv", c"tw_ep_combine_send", c"tw_ep_combine_recv"];

/// The EP kernels, loaded on one GPU.
pub struct EpKernels {
    k: Arc<Loaded>,
}

impl std::fmt::Debug for EpKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpKernels(cuda:{})", self.k.gpu.ordinal)
    }
}

impl EpKernels {
    /// Compiles (once per process) and loads (once per GPU) the EP kernels on `gpu`.
    pub fn load(gpu: &'static Gpu) -> Result<Arc<Self>, GpuError> {
        Ok(Arc::new(Self { k: SOURCE.load(gpu)? }))
    }

    /// Dispatch, send phase: every token's row to the ranks owning its experts (our own
    /// experts' straight into `recv_x`, `scales` and `src_info`, the receive kernel's outputs).
    /// It numbers the call: `counter[0] + 1` (two device u64 words: the buffer's last number,
    /// and the launch's finished blocks, 0 between launches) into `counter[0]` and
    /// `args.seq_at`, so that a CUDA-graph replay numbers its calls afresh.
    ///
    /// # Safety
    /// `args.table` is an [`EpTable`] in this GPU's memory, alive until the work on `stream`
    /// is done, describing live buffers of every rank mapped for this GPU, laid out as the
    /// offsets of `args` say; `x` is `[num_tokens, hidden]` bf16, `topk` `[num_tokens, topk]` int64,
    /// `active` `[ranks]` int32, the outputs as for [`EpKernels::dispatch_recv`], `counter`
    /// the buffer's own two words (no other kernel uses them meanwhile), all on this GPU and
    /// alive until the work on `stream` is done.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dispatch_send(
        &self,
        stream: u64,
        args: &EpArgs,
        x: u64,
        topk: u64,
        active: u64,
        recv_x: u64,
        scales: u64,
        src_info: u64,
        counter: u64,
    ) -> Result<(), GpuError> {
        let (mut a, mut x, mut t, mut act) = (*args, x, topk, active);
        let (mut rx, mut sc, mut si, mut ctr) = (recv_x, scales, src_info, counter);
        let (grid, slices) = send_shape(args.num_tokens, args.hidden, self.k.gpu.sm_count);
        a.slices = slices;
        let mut p: [*mut c_void; 8] = [
            ptr(&mut a),
            ptr(&mut x),
            ptr(&mut t),
            ptr(&mut act),
            ptr(&mut rx),
            ptr(&mut sc),
            ptr(&mut si),
            ptr(&mut ctr),
        ];
        // SAFETY: (EpArgs, const ushort*, const long long*, int*, ushort*, float*, int*,
        // unsigned long long*), as the kernel declares.
        unsafe { self.k.launch(0, grid, 1024, stream, &mut p) }
    }

    /// Dispatch, receive phase: waits for every source's rows and packs them into `recv_x`.
    ///
    /// # Safety
    /// As for [`EpKernels::dispatch_send`]; `recv_x` is `[local_experts, ranks·max_tokens,
    /// hidden]` bf16 (e4m3 with `args.fp8`), `src_info` `[local_experts, ranks·max_tokens]`
    /// int32, `layout_range` `[local_experts, ranks]` int64, `recv_count` `[local_experts]`
    /// int32 (all written here); with `args.fp8`, `scales` is `[local_experts, hidden / 128,
    /// ranks·max_tokens]` fp32 (else unused).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dispatch_recv(
        &self,
        stream: u64,
        args: &EpArgs,
        recv_x: u64,
        src_info: u64,
        layout_range: u64,
        recv_count: u64,
        active: u64,
        scales: u64,
    ) -> Result<(), GpuError> {
        let (mut a, mut r, mut s, mut l, mut c, mut act, mut sc) =
            (*args, recv_x, src_info, layout_range, recv_count, active, scales);
        let mut p: [*mut c_void; 7] = [
            ptr(&mut a),
            ptr(&mut r),
            ptr(&mut s),
            ptr(&mut l),
            ptr(&mut c),
            ptr(&mut act),
            ptr(&mut sc),
        ];
        // SAFETY: (EpArgs, ushort*, int*, long long*, int*, int*, float*), as the kernel
        // declares.
        unsafe { self.k.launch(1, args.local_experts as u32, 1024, stream, &mut p) }
    }

    /// Combine, send phase: every expert's output rows back to their tokens' home ranks.
    ///
    /// # Safety
    /// As for [`EpKernels::dispatch_recv`]; `y` is `[local_experts, ranks·max_tokens, hidden]`
    /// bf16, `src_info` and `layout_range` the handle of the dispatch with the same `seq`.
    pub unsafe fn combine_send(
        &self,
        stream: u64,
        args: &EpArgs,
        y: u64,
        src_info: u64,
        layout_range: u64,
        active: u64,
    ) -> Result<(), GpuError> {
        let (mut a, mut y, mut s, mut l, mut act) = (*args, y, src_info, layout_range, active);
        let mut p: [*mut c_void; 5] =
            [ptr(&mut a), ptr(&mut y), ptr(&mut s), ptr(&mut l), ptr(&mut act)];
        let grid = (args.local_experts * args.ranks) as u32;
        // SAFETY: (EpArgs, const ushort*, const int*, const long long*, int*).
        unsafe { self.k.launch(2, grid, 1024, stream, &mut p) }
    }

    /// Combine, receive phase: the weighted sum of every token's expert outputs into `out`.
    ///
    /// # Safety
    /// As for [`EpKernels::dispatch_send`]; `weights` is `[num_tokens, topk]` fp32, `out`
    /// `[num_tokens, hidden]` bf16.
    pub unsafe fn combine_recv(
        &self,
        stream: u64,
        args: &EpArgs,
        topk: u64,
        weights: u64,
        out: u64,
        active: u64,
    ) -> Result<(), GpuError> {
        let (mut a, mut t, mut w, mut o, mut act) = (*args, topk, weights, out, active);
        let mut p: [*mut c_void; 5] =
            [ptr(&mut a), ptr(&mut t), ptr(&mut w), ptr(&mut o), ptr(&mut act)];
        // A block per token (a thread per 8 channels, at most 1024), and one that waits for
        // every expert's signal.
        let block = (args.hidden as u32 / 8).next_multiple_of(32).clamp(32, 1024);
        // SAFETY: (EpArgs, const long long*, const float*, ushort*, int*).
        unsafe { self.k.launch(3, args.num_tokens as u32 + 1, block, stream, &mut p) }
    }
}

/// Tokens one dispatch-send block handles at most (`TW_SEND_TOKENS` in `ep.cu`).
const SEND_TOKENS: u32 = 32;
/// Warp tasks a dispatch send aims for. On 2×H200 (H = 7168, T = 128) fewer tasks make the
/// send kernel a little faster (19.9–20.4 µs with 256–1024, 21.8 with 4096) and a graph-replayed
/// dispatch + combine pair the same (63.0–63.4 µs against 64.6): bench/NOTES.md §17 and the
/// sweep of session 8's call 1. The whole-call slowdown §17 saw with 256 tasks is gone since
/// the kernels stopped polling host memory (§20, probably its cause); the default stays until
/// a sweep shows a gain at every T.
const SEND_TASKS: u32 = 4096;

/// The dispatch send's grid and slices per token for `tokens` tokens of `hidden` channels on
/// `sms` SMs: contiguous token ranges of at most [`SEND_TOKENS`] a block, a block per SM when
/// there are tokens enough; each row cut into 512-channel steps shared by up to `slices`
/// warps, so that small batches still spread over many warps.
/// `TIDEWIRE_EP_SEND_TASKS` replaces the aim (a tuning knob for benchmarks).
pub fn send_shape(tokens: i32, hidden: i32, sms: u32) -> (u32, i32) {
    static TASKS: OnceLock<u32> = OnceLock::new();
    let tasks = *TASKS.get_or_init(|| {
        std::env::var("TIDEWIRE_EP_SEND_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SEND_TASKS)
    });
    shape_for(tokens, hidden, sms, tasks)
}

fn shape_for(tokens: i32, hidden: i32, sms: u32, tasks: u32) -> (u32, i32) {
    let t = tokens.max(0) as u32;
    if t == 0 {
        return (1, 1);
    }
    let grid = t.div_ceil(SEND_TOKENS).max(sms.min(t));
    let steps = (hidden.max(1) as u32).div_ceil(512);
    let slices = tasks.div_ceil(t).clamp(1, steps);
    (grid, slices as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_args_and_constants_are_the_sources() {
        use crate::kernels::layout::{define, fields, rust_fields};
        let src = include_str!("ep.cu");
        assert_eq!(define(src, "TW_MAX_RANKS"), MAX_RANKS as u64);
        assert_eq!(define(src, "TW_SEND_TOKENS"), u64::from(SEND_TOKENS));
        let ours = rust_fields!(EpArgs: table, seq_at, need, off_dsig, off_ddata,
            off_dsrc, off_csig, off_cdata, off_fin, timeout_ns, rank, ranks, experts,
            local_experts, max_tokens, hidden, topk, num_tokens, fp8, slices, shape);
        assert_eq!(fields(src, "EpArgs"), ours);
        assert_eq!(size_of::<EpArgs>(), ours.last().map_or(0, |f| f.1 + f.2).next_multiple_of(8));
        let table = rust_fields!(EpTable: peers, alive, half, marks);
        assert_eq!(fields(src, "EpTable"), table);
        // The kernels copy TW_TABLE_WORDS = 2 * TW_MAX_RANKS + 2 words.
        assert!(src.contains("#define TW_TABLE_WORDS (2 * TW_MAX_RANKS + 2)"));
        assert_eq!(TABLE_BYTES, 8 * (2 * MAX_RANKS as u64 + 2));
    }

    #[test]
    fn send_shape_keeps_blocks_within_their_token_limit_and_spreads_small_batches() {
        for sms in [1u32, 16, 132] {
            for tokens in [0, 1, 7, 128, 133, 512, 1000, 1024] {
                for hidden in [128, 1024, 2048, 7168, 8192] {
                    let (grid, slices) = shape_for(tokens, hidden, sms, SEND_TASKS);
                    assert!(grid >= 1);
                    let per_block = (tokens as u32).div_ceil(grid);
                    assert!(per_block <= SEND_TOKENS, "{tokens} tokens over {grid} blocks");
                    let steps = (hidden as u32).div_ceil(512) as i32;
                    assert!((1..=steps).contains(&slices), "{slices} slices of {steps} steps");
                }
            }
        }
        // T = 128 on an H200: a token a block, a warp per 512 channels.
        assert_eq!(shape_for(128, 7168, 132, SEND_TASKS), (128, 14));
        assert_eq!(shape_for(1024, 7168, 132, SEND_TASKS), (132, 4));
    }
}
