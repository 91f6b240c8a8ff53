//! An EP buffer: this rank's transferable GPU allocation, every other rank's mapped for our
//! GPU, and the launches of the dispatch and combine kernels on the caller's stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tidewire::metrics::{Metrics, Scrape};
use tidewire::{Engine, PeerBuffer, PeerBuffers};
use tidewire_gpu::alloc::HostWords;
use tidewire_gpu::ep::{EpArgs, EpKernels, EpTable, MAX_RANKS};
use tidewire_gpu::Gpu;

use crate::error::{Error, Result};
use crate::layout::{Layout, MAX_TOPK};

/// Where a dispatch's results go (device addresses of the caller's tensors; see
/// [`tidewire_gpu::ep::EpKernels::dispatch_recv`] for their shapes).
#[derive(Debug, Clone, Copy)]
pub struct DispatchOut {
    pub recv_x: u64,
    pub scales: u64,
    pub src_info: u64,
    pub layout_range: u64,
    pub recv_count: u64,
}

/// A combine's inputs and output (device addresses).
#[derive(Debug, Clone, Copy)]
pub struct CombineIo {
    pub y: u64,
    pub src_info: u64,
    pub layout_range: u64,
    pub topk: u64,
    pub weights: u64,
    pub out: u64,
}

/// The shape of one call.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub layout: Layout,
    /// The device word holding the call's sequence number (written by the dispatch's send
    /// kernel; a combine reads its dispatch's).
    pub seq_at: u64,
    pub num_tokens: usize,
    pub topk: usize,
    pub timeout_ns: i64,
    /// Dispatch rows as e4m3 with one fp32 scale per 128 channels.
    pub fp8: bool,
}

/// One rank's EP buffer.
pub struct Buffer {
    peers: PeerBuffers,
    /// Bytes of one half of every rank's buffer: half the smallest, so that every rank finds
    /// the second half at the same offset whatever the call's shape.
    half: u64,
    kernels: Arc<EpKernels>,
    /// What the kernels marked inactive, read by the metrics.
    watch: Arc<Watch>,
    /// The caller's device table the kernels read every rank's buffer from (written at
    /// connect, zeroed as the buffer goes — no call can come after — then 0).
    table: u64,
    device: u32,
    /// Why the kernels cannot run (a rank no GPU path reaches), if so.
    unreached: Option<String>,
}

/// An EP buffer's counters as the metrics read them: per source rank, how often a kernel's
/// wait marked it inactive (host-mapped, added to by the kernels).
struct Watch {
    marks: HostWords,
    rank: usize,
    /// The ranks that took no part in the buffers' exchange (outside the group's view).
    absent: Vec<bool>,
    /// The marks already added to the timeout counters.
    counted: Mutex<Vec<u32>>,
    /// The buffer is going (released on a thread of its own while its successor counts):
    /// scrapes leave the metrics to the successor.
    retired: AtomicBool,
}

impl Watch {
    /// The marks as the kernels left them: per source rank, how often a wait marked it
    /// inactive, and how many of those for a call of another shape (the words' second half).
    fn halves(&self) -> (Vec<u32>, Vec<u32>) {
        let mut all = self.marks.load_all();
        let shapes = all.split_off(self.absent.len());
        (all, shapes)
    }
}

impl Scrape for Watch {
    fn scrape(&self, m: &Metrics) {
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let (now, _) = self.halves();
        let mut counted = self.counted.lock();
        for (r, (n, s)) in now.iter().zip(counted.iter_mut()).enumerate() {
            if *n > *s {
                let l = [("source_rank", r.to_string())];
                m.ep_rank_timeouts.get_or_create(&l).inc_by(u64::from(*n - *s));
                *s = *n;
            }
        }
        // A buffer lives for one membership: a rank marked once is inactive for its life.
        let active =
            now.iter().zip(&self.absent).filter(|(n, absent)| **n == 0 && !**absent).count();
        m.ep_active_ranks.get_or_create(&[("rank", self.rank.to_string())]).set(active as i64);
    }
}

impl Buffer {
    /// Allocates `bytes` of transferable memory on GPU `device` (the best reach the topology
    /// proves), zeroed; returns `(address, length)`.
    pub fn allocate(engine: &Engine, device: u32, bytes: u64) -> Result<(u64, u64)> {
        PeerBuffers::allocate(engine, "EP", device, bytes).map_err(Error::from)
    }

    /// Maps every other rank's buffer (`peers[r]`, ours included) for our GPU and loads the
    /// kernels. A rank no GPU path reaches is recorded with the reason (see
    /// [`Buffer::unreached`]: the caller then takes the collective fallback); any other
    /// failure (the rank's engine cannot be opened, its buffer is not what it published) is an
    /// error naming it. Our buffer belongs to the EP buffer from the call on (freed with it, or
    /// now if this fails).
    ///
    /// Every rank's buffer goes into the caller's `table`, which the kernels read at every
    /// launch (so a call captured in a CUDA graph uses the buffers of the membership in force
    /// at each replay); it is zeroed when this buffer goes (a replay then takes part in
    /// nothing).
    ///
    /// # Safety
    /// `table` is [`tidewire_gpu::ep::TABLE_BYTES`] of GPU `device`'s memory that nothing
    /// else writes, alive as long as any launch or captured graph of this buffer may run.
    pub unsafe fn connect(
        engine: Arc<Engine>,
        rank: usize,
        device: u32,
        peers: &[PeerBuffer],
        table: u64,
    ) -> Result<Self> {
        // First: from here on our buffer belongs to the mappings, freed with them on any
        // later failure.
        let peers_in = peers;
        let peers = PeerBuffers::connect(engine, "EP", rank, device, peers).map_err(Error::from)?;
        let ranks = peers.ranks();
        if ranks > MAX_RANKS {
            return Err(Error::Shape(format!("{ranks} ranks (at most {MAX_RANKS})")));
        }
        let gpu = Gpu::get(device)
            .map_err(|source| Error::Gpu { context: format!("cuda:{device}"), source })?;
        let kernels = EpKernels::load(gpu)
            .map_err(|source| Error::Gpu { context: "loading the EP kernels".into(), source })?;
        let half = peers.smallest() / 2 / 4096 * 4096;
        // Per source rank: how often a wait marked it inactive, then (`ranks` words on) how
        // often for a call of another shape.
        let marks = HostWords::new(2 * ranks)
            .map_err(|source| Error::Gpu { context: "the EP timeout counters".into(), source })?;
        let absent = peers_in.iter().map(PeerBuffer::is_absent).collect();
        let watch = Arc::new(Watch {
            marks,
            rank,
            absent,
            counted: Mutex::new(vec![0; ranks]),
            retired: AtomicBool::new(false),
        });
        let w: Arc<dyn Scrape> = watch.clone();
        tidewire::metrics::watch(Arc::downgrade(&w));
        // The table of the buffers as mapped: every rank's, or none (no launch fits) when one
        // is not reached.
        let mut t = EpTable::EMPTY;
        let unreached = match peers.addresses(0) {
            Ok(all) => {
                for (r, (addr, flag)) in all.into_iter().enumerate() {
                    t.peers[r] = addr;
                    t.alive[r] = flag;
                }
                t.half = half;
                t.marks = watch.marks.addr();
                None
            }
            Err(why) => Some(why),
        };
        let buf = Self { peers, half, kernels, watch, table, device, unreached };
        buf.write_table(&t)?;
        Ok(buf)
    }

    fn write_table(&self, t: &EpTable) -> Result<()> {
        // SAFETY: `EpTable` is plain `repr(C)` words; the slice covers exactly it.
        let bytes = unsafe {
            std::slice::from_raw_parts((t as *const EpTable).cast::<u8>(), size_of::<EpTable>())
        };
        // SAFETY: `connect`'s contract: the table is this GPU's memory of `TABLE_BYTES`, ours
        // to write; calls happen between launches (the caller's calls are done).
        unsafe { tidewire_gpu::alloc::write_device(self.device, self.table, bytes) }
            .map_err(|source| Error::Gpu { context: "writing the EP buffer table".into(), source })
    }

    /// Zeroes the table (later launches of captured calls take part in nothing), once.
    fn clear_table(&mut self) {
        if self.table == 0 {
            return;
        }
        if let Err(e) = self.write_table(&EpTable::EMPTY) {
            // A copy of 1 KiB into our own device memory fails only with the context broken
            // (a sticky error): no launch reads the table again.
            log::warn!("EP buffer: {e}");
        }
        self.table = 0;
    }

    /// Readies the buffer to be released on a thread of its own while a successor takes
    /// over (its free waits up to the engine's stall deadline for every process that mapped
    /// it: a stopped one never lets go): the table is zeroed now (the successor writes it
    /// next) and the metrics leave this buffer to the successor.
    pub fn retire(&mut self) {
        self.clear_table();
        self.watch.retired.store(true, Ordering::Relaxed);
    }

    /// Per source rank, how often a kernel's wait marked it inactive since the buffer was
    /// made (deadline passed or process died): host-mapped words the kernels add to, read
    /// without waiting for the GPU.
    pub fn marks(&self) -> Vec<u32> {
        self.watch.halves().0
    }

    /// Per source rank, how many of those marks were for a call of another shape (its
    /// signal named other tokens per rank, hidden size, experts or fp8 than ours: its rows
    /// were not read).
    pub fn shape_marks(&self) -> Vec<u32> {
        self.watch.halves().1
    }

    /// The ranks no GPU path reaches, with the reason.
    pub fn unreached(&self) -> Vec<(usize, String)> {
        self.peers.unreached()
    }

    /// How each rank is reached (`local` for ourselves, `none` where no GPU path does).
    pub fn paths(&self) -> Vec<String> {
        self.peers.paths()
    }

    fn args(&self, c: &Call) -> Result<EpArgs> {
        let l = &c.layout;
        // The kernels trust every offset and bound of the layout (shared arrays, the fixed
        // header): only what `Layout::new` makes is launched.
        if Layout::new(l.max_tokens, l.hidden, l.ranks, l.experts)? != *l {
            return Err(Error::Shape(format!("a layout not made by Layout::new: {l:?}")));
        }
        if l.ranks != self.peers.ranks() {
            return Err(Error::Shape(format!(
                "a call for {} ranks on a buffer of {}",
                l.ranks,
                self.peers.ranks()
            )));
        }
        if l.half > self.half {
            return Err(Error::Shape(format!(
                "the call needs {} bytes (get_ep_buffer_size_hint), the smallest rank's buffer has {}",
                l.bytes(),
                2 * self.half
            )));
        }
        if c.num_tokens > l.max_tokens || c.topk == 0 || c.topk > MAX_TOPK {
            return Err(Error::Shape(format!(
                "{} tokens (at most {}) with {} experts each (1 to {MAX_TOPK})",
                c.num_tokens, l.max_tokens, c.topk
            )));
        }
        if let Some(why) = &self.unreached {
            return Err(Error::Shape(why.clone()));
        }
        let i = |v: usize| v as i32;
        Ok(EpArgs {
            table: self.table,
            seq_at: c.seq_at,
            need: l.half,
            off_dsig: l.off_dsig,
            off_ddata: l.off_ddata,
            off_dsrc: l.off_dsrc,
            off_csig: l.off_csig,
            off_cdata: l.off_cdata,
            off_fin: l.off_fin,
            timeout_ns: c.timeout_ns,
            rank: i(self.peers.rank()),
            ranks: i(l.ranks),
            experts: i(l.experts),
            local_experts: i(l.local_experts),
            max_tokens: i(l.max_tokens),
            hidden: i(l.hidden),
            topk: i(c.topk),
            num_tokens: i(c.num_tokens),
            fp8: i32::from(c.fp8),
            slices: 1,
            shape: shape_tag(l.max_tokens, l.hidden, l.experts, c.fp8),
        })
    }

    fn gpu_err(what: &str) -> impl FnOnce(tidewire_gpu::GpuError) -> Error + '_ {
        move |source| Error::Gpu { context: format!("launching the {what} kernel"), source }
    }

    /// A whole dispatch on `stream`, with one check of the call: launches the send phase
    /// (which numbers the call: `counter`, two device words of the buffer's, into `c.seq_at`,
    /// the call's), and the receive phase too unless the caller launches it later (`recv_now`
    /// false: the hook). A call the buffer refuses is not numbered.
    ///
    /// # Safety
    /// `counter` (two u64 words, the second 0 between calls) and `c.seq_at` (one) are in this
    /// GPU's memory (the first the buffer's own, used by nobody else); the inputs (`x`
    /// `[num_tokens, hidden]` bf16, `topk` `[num_tokens, topk]` int64, `active` `[ranks]`
    /// int32) and outputs are on this buffer's GPU and live until the work on `stream` is
    /// done; every rank makes the same calls in the same order.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dispatch(
        &self,
        stream: u64,
        c: &Call,
        counter: u64,
        x: u64,
        topk: u64,
        active: u64,
        out: DispatchOut,
        recv_now: bool,
    ) -> Result<()> {
        let a = self.args(c)?;
        let k = &self.kernels;
        // SAFETY: forwarded contract.
        unsafe {
            k.dispatch_send(
                stream,
                &a,
                x,
                topk,
                active,
                out.recv_x,
                out.scales,
                out.src_info,
                counter,
            )
            .map_err(Self::gpu_err("dispatch send"))?;
        }
        if recv_now {
            // SAFETY: forwarded contract.
            unsafe { self.launch_dispatch_recv(stream, &a, out, active) }?;
        }
        Ok(())
    }

    /// A whole combine on `stream`: the send phase, and the receive phase too unless the
    /// caller launches it later (`recv_now` false: the hook).
    ///
    /// # Safety
    /// As for [`Buffer::dispatch`]; `io.y` is the experts' output, `io.src_info` and
    /// `io.layout_range` the handle of the dispatch whose sequence word `c` names, `io.weights`
    /// `[num_tokens, topk]` fp32 and `io.out` `[num_tokens, hidden]` bf16.
    pub unsafe fn combine(
        &self,
        stream: u64,
        c: &Call,
        io: CombineIo,
        active: u64,
        recv_now: bool,
    ) -> Result<()> {
        let a = self.args(c)?;
        let k = &self.kernels;
        // SAFETY: forwarded contract.
        unsafe {
            k.combine_send(stream, &a, io.y, io.src_info, io.layout_range, active)
                .map_err(Self::gpu_err("combine send"))?;
        }
        if recv_now {
            // SAFETY: forwarded contract.
            unsafe { self.launch_combine_recv(stream, &a, io, active) }?;
        }
        Ok(())
    }

    /// Dispatch, receive phase, on `stream` (the hook of a dispatch made with `recv_now`
    /// false).
    ///
    /// # Safety
    /// As for [`Buffer::dispatch`], with the call and outputs of that dispatch.
    pub unsafe fn dispatch_recv(
        &self,
        stream: u64,
        c: &Call,
        out: DispatchOut,
        active: u64,
    ) -> Result<()> {
        let a = self.args(c)?;
        // SAFETY: forwarded contract.
        unsafe { self.launch_dispatch_recv(stream, &a, out, active) }
    }

    /// Combine, receive phase, on `stream` (the hook of a combine made with `recv_now`
    /// false).
    ///
    /// # Safety
    /// As for [`Buffer::combine`], with the call and tensors of that combine.
    pub unsafe fn combine_recv(
        &self,
        stream: u64,
        c: &Call,
        io: CombineIo,
        active: u64,
    ) -> Result<()> {
        let a = self.args(c)?;
        // SAFETY: forwarded contract.
        unsafe { self.launch_combine_recv(stream, &a, io, active) }
    }

    /// # Safety
    /// As for [`Buffer::dispatch`].
    unsafe fn launch_dispatch_recv(
        &self,
        stream: u64,
        a: &EpArgs,
        out: DispatchOut,
        active: u64,
    ) -> Result<()> {
        let DispatchOut { recv_x, scales, src_info, layout_range, recv_count } = out;
        // SAFETY: forwarded contract.
        unsafe {
            self.kernels.dispatch_recv(
                stream,
                a,
                recv_x,
                src_info,
                layout_range,
                recv_count,
                active,
                scales,
            )
        }
        .map_err(Self::gpu_err("dispatch receive"))
    }

    /// # Safety
    /// As for [`Buffer::combine`].
    unsafe fn launch_combine_recv(
        &self,
        stream: u64,
        a: &EpArgs,
        io: CombineIo,
        active: u64,
    ) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.kernels.combine_recv(stream, a, io.topk, io.weights, io.out, active) }
            .map_err(Self::gpu_err("combine receive"))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.clear_table();
    }
}

/// 16 bits naming a call's shape, the same on every rank that calls with the same tokens per
/// rank, hidden size, experts and fp8 (FNV-1a over the four, folded): ranks that disagree
/// would read each other's rows at the wrong offsets or in the wrong format.
fn shape_tag(max_tokens: usize, hidden: usize, experts: usize, fp8: bool) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [max_tokens as u64, hidden as u64, experts as u64, u64::from(fp8)] {
        for b in v.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    ((h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) & 0xffff) as i32
}
