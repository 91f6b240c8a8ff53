//! The nvlink transport (and mnnvl, the same path with FABRIC handles): a same-host peer's
//! device memory is imported once (CUDA IPC handle, or a VMM allocation whose POSIX file
//! descriptor comes over the shm socket) and copied into by our GPU: the copy engine for
//! large runs, one gather-kernel launch for a batch of small or scattered ones.
//!
//! Revocation: every exported region has a revocation page (`shm.rs`). A same-host initiator
//! maps it and marks its slot in flight before enqueueing; a peer on another host (mnnvl)
//! marks it through `Enter` / `Leave` frames on the owner's RPC port (`lease.rs`). The mark is
//! cleared only when the GPU event completed, so the owner's `unregister` returns only after
//! our copies landed, and a copy is never enqueued after it. Imports are closed when the
//! region is found revoked, or when the peer restarts (the client is dropped with the peer's
//! connection state).
//!
//! Completion: a thread per engine polls the events of copies in flight and finishes their
//! requests; before reporting success it checks that the peer process is still alive (its
//! end of the shm socket is open, or it answered `Leave`), since a copy into a dead peer's
//! memory "succeeds".

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tidewire_core::descriptor::{handle_from_hex, handle_to_hex, Reach};
use tidewire_core::memory::Location;
use tidewire_core::paged::{PageCursor, Piece};
use tidewire_core::select::{GpuFacts, TransportKind};
use tidewire_core::RegionId;
use tidewire_gpu::copy::{Copier, Job, Pending, Prepared, Seg};
use tidewire_gpu::share::{self, Exportable, Imported, Shareable};
use tidewire_gpu::Gpu;

use crate::batch::{Batch, Mark};
use crate::config::EngineConfig;
use crate::error::{Error, PeerRef, Result};
use crate::lifecycle::Lifecycle;
use crate::peer::{Held, MapCount, PeerConn};
use crate::registry::{OwnedAccess, RegionEntry};
use crate::request::{Op, Request, Step};
use crate::transport::lease::LeaseConn;
use crate::transport::shm::{SharedRegion, ShmClient, ShmMap};
use crate::transport::{BatchCtx, LayerPages, Submission, Transport};
use tidewire_core::shmwire::ShmFetch;

/// What this process knows about its GPUs, for selection (read once per engine).
pub(crate) fn gpu_facts() -> GpuFacts {
    let topo = match tidewire_gpu::topology() {
        Ok(t) => t,
        Err(e) => return GpuFacts::none(&e.to_string()),
    };
    // One fabric identity per host: every GPU of a node sits in the same NVLink domain, so
    // GPU 0's NVML answer and probe stand for the host.
    let fabric = match topo.gpus.first() {
        None => Err("no GPU".to_string()),
        Some(g) => g.fabric.local_verdict().map(|()| {
            let uuid: String = g.fabric.cluster_uuid.iter().map(|b| format!("{b:02x}")).collect();
            (uuid, g.fabric.clique_id)
        }),
    };
    GpuFacts {
        available: Ok(()),
        uuids: topo.gpus.iter().map(|g| g.uuid.clone()).collect(),
        peer_access: topo.peer_access.clone(),
        fabric,
    }
}

/// The export side of a registered device region.
pub(crate) struct GpuRegion {
    pub(crate) reach: Vec<Reach>,
    /// A VMM allocation's descriptor and size, handed to same-host peers.
    pub(crate) vmm_fd: Option<(u64, OwnedFd)>,
    pub(crate) control: SharedRegion,
}

/// Exports `[addr, addr+len)` of device memory for the GPU transports, or says why not.
pub(crate) fn export(
    addr: u64,
    len: u64,
    location: Location,
    facts: &GpuFacts,
) -> std::result::Result<GpuRegion, String> {
    facts.available.clone()?;
    let device = location.device.ok_or("device memory without a device ordinal")?;
    let uuid = facts.uuids.get(device as usize).cloned().ok_or("unknown device")?;
    let gpu = Gpu::get(device).map_err(|e| e.to_string())?;
    let mut reach = Vec::new();
    let mut vmm_fd = None;
    let (base, size) = match share::exportable(gpu, addr).map_err(|e| e.to_string())? {
        Exportable::None { reason } => return Err(reason),
        Exportable::Ipc { handle, base, size } => {
            reach.push(Reach::CudaIpc { handle: handle_to_hex(&handle), base, size, device: uuid });
            (base, size)
        }
        Exportable::Vmm { base, size, posix_fd, fabric } => {
            if fabric {
                match (&facts.fabric, share::export_fabric(gpu, addr)) {
                    (Ok((cluster, clique)), Ok(h)) => reach.push(Reach::Fabric {
                        handle: handle_to_hex(&h),
                        base,
                        size,
                        device: uuid.clone(),
                        cluster_uuid: cluster.clone(),
                        clique_id: *clique,
                    }),
                    (Err(why), _) => log::debug!("no FABRIC reach for {addr:#x}: {why}"),
                    (_, Err(e)) => log::info!("no FABRIC reach for {addr:#x}: {e}"),
                }
            }
            if posix_fd {
                vmm_fd = Some((size, share::export_fd(gpu, addr).map_err(|e| e.to_string())?));
                reach.push(Reach::VmmFd { base, size, device: uuid });
            }
            (base, size)
        }
    };
    if addr < base || addr.checked_add(len).is_none_or(|end| end > base + size) {
        return Err(format!(
            "[{addr:#x}, +{len}) is not inside one allocation (it starts at {base:#x}, {size} bytes)"
        ));
    }
    let control = SharedRegion::control().map_err(|e| e.to_string())?;
    Ok(GpuRegion { reach, vmm_fd, control })
}

/// How in-flight copies into a peer's region are marked, so that its `unregister` waits for
/// them and refuses new ones.
enum Control {
    /// The region's revocation page, mapped from a same-host peer.
    Page(ShmMap),
    /// `Enter` / `Leave` round trips to the owner (peers on other hosts).
    Rpc(RegionId),
}

/// A peer's allocation imported into this process, counted among the peer's mappings.
/// Dropping the last reference unmaps it, which lets the owner's driver free the memory once
/// the owner is gone too.
struct Import {
    imported: Imported,
    _held: Held,
}

impl Import {
    fn ptr(&self) -> u64 {
        self.imported.ptr()
    }
}

/// A peer's region, mapped for one of our GPUs.
pub(crate) struct RemoteGpu {
    control: Control,
    import: Arc<Import>,
    base: u64,
}

/// An IPC import: the handle and the GPU it is mapped for.
type IpcKey = ([u8; 64], u32);

/// The initiator's state for one peer instance: imports and the revocation channel.
pub(crate) struct NvlinkClient {
    peer: PeerRef,
    /// nvlink for a same-host peer, mnnvl for one on another host (for errors).
    transport: TransportKind,
    /// A same-host peer's shm socket: revocation pages and VMM descriptors.
    pub(crate) shm: Option<Arc<ShmClient>>,
    /// The RPC revocation channel: peers on other hosts, or `TIDEWIRE_NVLINK_LEASE=rpc`.
    lease: Option<LeaseConn>,
    regions: Mutex<HashMap<(RegionId, u32), Arc<RemoteGpu>>>,
    ipc: Mutex<HashMap<IpcKey, Arc<Import>>>,
    /// Counts the imports of this peer's memory.
    mappings: MapCount,
}

impl NvlinkClient {
    /// A client marking copies through `lease` when given, else through `shm`'s pages (one of
    /// the two is required).
    pub(crate) fn new(
        peer: &PeerRef,
        transport: TransportKind,
        shm: Option<Arc<ShmClient>>,
        lease: Option<LeaseConn>,
        mappings: MapCount,
    ) -> Result<Self> {
        if shm.is_none() && lease.is_none() {
            return Err(Error::Internal("an nvlink client without a revocation channel"));
        }
        let (regions, ipc) = (Mutex::default(), Mutex::default());
        Ok(Self { peer: peer.clone(), transport, shm, lease, regions, ipc, mappings })
    }

    /// nvlink for a same-host peer, mnnvl for one on another host.
    pub(crate) fn transport(&self) -> TransportKind {
        self.transport
    }

    fn counted(&self, imported: Imported) -> Arc<Import> {
        Arc::new(Import { imported, _held: self.mappings.hold() })
    }

    /// False when this client's channel broke and a new one should be made.
    pub(crate) fn usable(&self, shm: Option<&Arc<ShmClient>>) -> bool {
        match (&self.shm, shm) {
            (Some(mine), Some(now)) => Arc::ptr_eq(mine, now),
            (None, None) => true,
            _ => false,
        }
    }

    /// Marks a copy into `remote` in flight; `Ok(false)` when the owner unregistered it.
    fn enter(&self, remote: &RemoteGpu) -> Result<bool> {
        match (&remote.control, &self.shm, &self.lease) {
            (Control::Page(map), Some(shm), _) => Ok(shm.enter(map)),
            (Control::Rpc(id), _, Some(lease)) => lease.enter(*id),
            _ => Err(Error::Internal("revocation channel and mapping disagree")),
        }
    }

    /// Clears the mark; an error when the owner could not be told (it is gone, or it dropped
    /// our connection and with it our marks).
    fn leave(&self, remote: &RemoteGpu) -> Result<()> {
        match (&remote.control, &self.shm, &self.lease) {
            (Control::Page(map), Some(shm), _) => {
                shm.leave(map);
                Ok(())
            }
            (Control::Rpc(id), _, Some(lease)) => lease.leave(*id),
            _ => Err(Error::Internal("revocation channel and mapping disagree")),
        }
    }

    /// False once a same-host peer's end of the shm socket closed (its process is gone).
    fn peer_alive(&self) -> bool {
        self.shm.as_ref().is_none_or(|s| s.peer_alive())
    }

    /// The peer's region `id`, reached through `reach`, mapped for GPU `exec`.
    fn remote(&self, id: RegionId, reach: &Reach, exec: u32) -> Result<Arc<RemoteGpu>> {
        if let Some(r) = self.regions.lock().get(&(id, exec)) {
            return Ok(r.clone());
        }
        let gpu = Gpu::get(exec).map_err(|e| self.failed(format!("cuda:{exec}: {e}")))?;
        let control = match (&self.lease, &self.shm) {
            (Some(_), _) => Control::Rpc(id),
            (None, Some(shm)) => Control::Page(shm.control(id)?),
            (None, None) => return Err(Error::Internal("an nvlink client without a channel")),
        };
        let (import, base) = match reach {
            Reach::CudaIpc { handle, base, .. } => {
                let h = handle_from_hex(handle)
                    .ok_or_else(|| self.failed(format!("{id}: malformed IPC handle")))?;
                let known = self.ipc.lock().get(&(h, exec)).cloned();
                let import = match known {
                    Some(i) => i,
                    None => {
                        let i = self.counted(
                            share::import_ipc(gpu, &h)
                                .map_err(|e| self.failed(format!("importing {id}: {e}")))?,
                        );
                        self.ipc.lock().insert((h, exec), i.clone());
                        i
                    }
                };
                (import, *base)
            }
            Reach::VmmFd { base, size, .. } => {
                let shm = self.shm.as_ref().ok_or_else(|| {
                    self.failed(format!("{id}: a VMM POSIX-FD handle needs a same-host peer"))
                })?;
                let (stated, fd) = shm.fetch(ShmFetch::VmmFd, id)?;
                if stated != *size {
                    return Err(self.failed(format!(
                        "{id}: the descriptor says {size} bytes, the socket {stated}"
                    )));
                }
                let i = share::import_vmm(gpu, Shareable::Fd(fd.as_fd()), *size)
                    .map_err(|e| self.failed(format!("importing {id}: {e}")))?;
                (self.counted(i), *base)
            }
            Reach::Fabric { handle, base, size, .. } => {
                let h = handle_from_hex(handle)
                    .ok_or_else(|| self.failed(format!("{id}: malformed FABRIC handle")))?;
                let i = share::import_vmm(gpu, Shareable::Fabric(&h), *size)
                    .map_err(|e| self.failed(format!("importing {id}: {e}")))?;
                (self.counted(i), *base)
            }
            _ => return Err(Error::Internal("nvlink given a host reach")),
        };
        let r = Arc::new(RemoteGpu { control, import, base });
        self.regions.lock().insert((id, exec), r.clone());
        Ok(r)
    }

    /// Maps the peer's region `id` for GPU `exec` and marks it in use until
    /// [`NvlinkClient::unmap`] (the owner's `unregister` waits for the mark, bounded);
    /// returns the mapping and where the region's allocation base appears in this process.
    pub(crate) fn map(
        &self,
        id: RegionId,
        reach: &Reach,
        exec: u32,
    ) -> Result<(Arc<RemoteGpu>, u64)> {
        let remote = self.remote(id, reach, exec)?;
        if !self.enter(&remote)? {
            self.forget(id, exec);
            return Err(Error::RemoteAccessDenied {
                peer: self.peer.clone(),
                addr: remote.base,
                len: 0,
                reason: format!("the peer unregistered {id}"),
            });
        }
        let mapped = remote.import.ptr();
        let base = remote.base;
        Ok((remote, mapped.wrapping_sub(base)))
    }

    /// Clears the mark of [`NvlinkClient::map`]; an error when the owner could not be told.
    pub(crate) fn unmap(&self, remote: &RemoteGpu) -> Result<()> {
        self.leave(remote)
    }

    /// Drops the mapping of a region the peer revoked.
    fn forget(&self, id: RegionId, exec: u32) {
        self.regions.lock().remove(&(id, exec));
    }

    fn failed(&self, reason: String) -> Error {
        Error::PeerFailed { peer: self.peer.clone(), transport: self.transport, reason }
    }
}

/// GPU copies in flight, handed to the completion thread.
pub(crate) struct GpuWork {
    pending: Pending,
    /// Set when part of the work could not be enqueued: its requests fail once what was
    /// enqueued has completed (their memory stays pinned until then).
    failed: Option<Error>,
    batch: Arc<Batch>,
    runs: Vec<Range<usize>>,
    /// Revocation marks to clear when the copy completed.
    entered: Vec<(Arc<NvlinkClient>, Arc<RemoteGpu>)>,
    /// Local regions kept registered until the copy completed.
    _pins: Vec<OwnedAccess>,
    /// The GPU that runs the copy.
    exec: u32,
}

/// A copy that failed on (or could not be given to) our GPU, named after the peer whose memory
/// it targeted and the GPU.
fn gpu_failed(entered: &[(Arc<NvlinkClient>, Arc<RemoteGpu>)], exec: u32, what: String) -> Error {
    match entered.first() {
        Some((c, _)) => c.failed(format!("cuda:{exec}: {what}")),
        None => Error::PeerFailed {
            peer: PeerRef::named("?"),
            transport: TransportKind::Nvlink,
            reason: format!("cuda:{exec}: {what}"),
        },
    }
}

/// A prepared plan's GPU run: where it ends, and its descriptors once written (keyed by the
/// mapping of the peer's memory they were translated into).
pub(crate) struct PreparedRun {
    pub(crate) end: usize,
    cache: Mutex<Option<(std::sync::Weak<RemoteGpu>, Arc<Prepared>)>>,
}

impl PreparedRun {
    pub(crate) fn new(end: usize) -> Self {
        Self { end, cache: Mutex::new(None) }
    }
}

/// A run refused before anything of it was enqueued, named after its peer, transport and GPU.
fn refused(step: &Step, exec: u32, what: String) -> Error {
    let reason = format!("cuda:{exec}: {what}");
    Error::PeerFailed { peer: step.conn.who(), transport: step.transport, reason }
}

impl GpuWork {
    fn finish(self, outcome: std::result::Result<(), Error>) {
        self.batch.mark(Mark::GpuDone);
        let mut dead = None;
        for (client, remote) in &self.entered {
            let left = client.leave(remote);
            if dead.is_none() && (left.is_err() || !client.peer_alive()) {
                dead = Some(client.failed("the peer process exited while the copy ran".into()));
            }
        }
        let outcome = match (outcome, self.failed) {
            (Ok(()), Some(e)) => Err(e),
            (outcome, _) => outcome,
        };
        match (outcome, dead) {
            (Err(e), _) => self.batch.fail_runs(&self.runs, e),
            (Ok(()), Some(e)) => self.batch.fail_runs(&self.runs, e),
            (Ok(()), None) => self.batch.runs_done(&self.runs),
        }
    }
}

/// The GPU transports (`nvlink` on one host, `mnnvl` across a proven fabric): one job per
/// GPU and batch, streamed while the batch is planned, completed by the transport's own
/// completion thread.
pub(crate) struct NvlinkTransport {
    config: EngineConfig,
    done: Sender<GpuWork>,
}

impl NvlinkTransport {
    /// Starts the completion thread.
    pub(crate) fn start(life: &Arc<Lifecycle>, config: EngineConfig) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (l2, grace) = (life.clone(), config.deadlines.stall);
        life.spawn("tw-gpu-done".into(), move || complete_loop(&rx, &l2, grace))?;
        Ok(Self { config, done: tx })
    }
}

impl Transport for NvlinkTransport {
    fn serves(&self) -> &'static [TransportKind] {
        &[TransportKind::Nvlink, TransportKind::Mnnvl]
    }

    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, ctx: BatchCtx) -> Box<dyn Submission + 'a> {
        Box::new(Launcher::new(batch, ctx.after, ctx.complete_on, &self.config, &self.done))
    }
}

impl Submission for Launcher<'_> {
    fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize> {
        Ok(self.push_run(&step, requests, from))
    }

    fn add_pages(
        &mut self,
        step: &Step,
        pages: &LayerPages<'_>,
        from: usize,
    ) -> Option<Result<usize>> {
        Some(self.push_pages(step, pages, from))
    }

    fn finish(self: Box<Self>, _requests: &[Request]) {
        self.launch_rest()
    }

    fn abort(self: Box<Self>, until: std::time::Instant) {
        self.abandon(until)
    }
}

fn complete_loop(rx: &Receiver<GpuWork>, life: &Lifecycle, grace: Duration) {
    let mut inflight: Vec<GpuWork> = Vec::new();
    // Idle, the thread polls for the next job (yielding) for as long as a waiter spins
    // (`batch::spin`, 1 ms) before it sleeps: a sleeping thread takes microseconds to wake,
    // as long as a small copy takes (measured: +1.3 µs per 4 KiB batch once a little more work
    // on the submitting side let it fall asleep between batches, bench/NOTES.md §28).
    let spin = crate::batch::spin();
    let mut idle_since = std::time::Instant::now();
    loop {
        if inflight.is_empty() {
            match rx.try_recv() {
                Ok(w) => inflight.push(w),
                Err(_) if idle_since.elapsed() < spin && !life.stopping() => {
                    std::thread::yield_now();
                    continue;
                }
                Err(_) => match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(w) => inflight.push(w),
                    Err(RecvTimeoutError::Timeout) if !life.stopping() => continue,
                    Err(_) => return,
                },
            }
        }
        inflight.extend(rx.try_iter());
        let mut progressed = false;
        let mut i = 0;
        while i < inflight.len() {
            match inflight[i].pending.is_done() {
                Ok(false) => i += 1,
                Ok(true) => {
                    inflight.swap_remove(i).finish(Ok(()));
                    progressed = true;
                }
                Err(e) => {
                    let w = inflight.swap_remove(i);
                    let err = gpu_failed(&w.entered, w.exec, format!("the copy failed: {e}"));
                    w.finish(Err(err));
                    progressed = true;
                }
            }
        }
        if life.stopping() {
            drain_on_stop(&mut inflight, grace);
            return;
        }
        if progressed {
            idle_since = std::time::Instant::now();
        } else {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }
}

/// At shutdown: waits (bounded) for copies in flight, then fails what is left.
fn drain_on_stop(inflight: &mut Vec<GpuWork>, grace: Duration) {
    let until = std::time::Instant::now() + grace;
    while !inflight.is_empty() && std::time::Instant::now() < until {
        let (done, left): (Vec<GpuWork>, Vec<GpuWork>) =
            inflight.drain(..).partition(|w| matches!(w.pending.is_done(), Ok(true)));
        done.into_iter().for_each(|w| w.finish(Ok(())));
        *inflight = left;
        std::thread::sleep(Duration::from_micros(100));
    }
    for w in inflight.drain(..) {
        let e = Error::ShuttingDown { who: "the engine".into() };
        w.finish(Err(e));
    }
}

/// The GPU route of a planned request: which reach of the remote region, and which of our
/// GPUs runs the copy.
#[derive(Clone)]
pub(crate) struct GpuRoute {
    pub(crate) reach: Reach,
    pub(crate) exec: u32,
}

/// A peer's region mapped for one job: marked in flight, its local region pinned.
struct Resolved {
    conn: Arc<PeerConn>,
    region: RegionId,
    local: Arc<RegionEntry>,
    client: Arc<NvlinkClient>,
    remote: Arc<RemoteGpu>,
}

/// Descriptors of the first launch of a job; each later launch takes twice as many, and the
/// last takes the rest when it is less than one more launch. The GPU starts on the first
/// while the CPU checks and prepares the next (16 384 pages: 2 048, 4 096 and 10 240).
/// `TIDEWIRE_FIRST_LAUNCH` overrides it (0: one launch for everything).
const FIRST_LAUNCH: usize = 2048;

fn first_launch() -> usize {
    static FIRST: OnceLock<usize> = OnceLock::new();
    *FIRST.get_or_init(|| {
        match tidewire_gpu::copy::tuning("TIDEWIRE_FIRST_LAUNCH", FIRST_LAUNCH as u32) {
            0 => usize::MAX,
            n => n as usize,
        }
    })
}

/// How many descriptors the job will have pushed after its next launch, given `pushed` so
/// far, the last launch's size and `total` (at most this many will come).
fn next_cut(pushed: usize, last: usize, total: usize) -> (usize, usize) {
    let first = first_launch();
    let size = if pushed == 0 { first } else { last.saturating_mul(2) };
    if total.saturating_sub(pushed.saturating_add(size)) < size.max(first) {
        (total, total.saturating_sub(pushed))
    } else {
        (pushed + size, size)
    }
}

/// What became of a finished lane's job.
enum Handover {
    /// Nothing was enqueued.
    Nothing,
    /// Enqueued; complete it through the completion thread.
    Work(GpuWork),
    /// Enqueued but its completion cannot be observed: fail these runs with `err`.
    Lost { runs: Vec<Range<usize>>, err: Error },
}

/// One GPU's share of a batch: a job on one stream, filled while the batch is planned.
struct Lane {
    exec: u32,
    /// `Err`: the job could not be started (the reason).
    job: std::result::Result<Job, String>,
    resolved: Vec<Resolved>,
    pins: Vec<OwnedAccess>,
    /// Requests enqueued (or about to be), as runs.
    runs: Vec<Range<usize>>,
    /// Why a launch failed: nothing more is enqueued after it.
    failed: Option<String>,
    segs: Vec<Seg>,
    seen: usize,
    cut: usize,
    size: usize,
}

/// Streams a batch's GPU runs into jobs while `submit` plans it: each run is checked and
/// turned into descriptors window by window, and a window is launched as soon as it is
/// complete, so the GPU copies the first pages while the CPU checks the last ones.
pub(crate) struct Launcher<'a> {
    batch: &'a Arc<Batch>,
    after: Option<u64>,
    /// A caller's stream made to wait for every job (`BatchOptions::complete_on`).
    complete_on: Option<u64>,
    config: &'a EngineConfig,
    done: &'a Sender<GpuWork>,
    lanes: Vec<Lane>,
}

impl<'a> Launcher<'a> {
    pub(crate) fn new(
        batch: &'a Arc<Batch>,
        after: Option<u64>,
        complete_on: Option<u64>,
        config: &'a EngineConfig,
        done: &'a Sender<GpuWork>,
    ) -> Self {
        Self { batch, after, complete_on, config, done, lanes: Vec::new() }
    }

    /// The lane of `step`'s GPU (started for `remaining` more requests when new), with the
    /// step's regions resolved: the lane's index and the peer's mapped region, or the reason
    /// the step's run fails.
    fn lane_for(&mut self, step: &Step, remaining: usize) -> Result<(usize, Arc<RemoteGpu>)> {
        let route = step.gpu.as_ref().ok_or(Error::Internal("nvlink step without a GPU route"))?;
        let exec = route.exec;
        let at = match self.lanes.iter().position(|l| l.exec == exec) {
            Some(k) => k,
            None => {
                let job = Gpu::get(exec)
                    .and_then(Copier::get)
                    .and_then(|c| c.job(self.after))
                    .map_err(|e| format!("starting the copy: {e}"));
                let (cut, size) = next_cut(0, 0, remaining);
                self.lanes.push(Lane {
                    exec,
                    job,
                    resolved: Vec::new(),
                    pins: Vec::new(),
                    runs: Vec::new(),
                    failed: None,
                    segs: Vec::with_capacity(size.min(remaining)),
                    seen: 0,
                    cut,
                    size,
                });
                self.lanes.len() - 1
            }
        };
        let lane = &mut self.lanes[at];
        if let Some(why) = lane.job.as_ref().err().or(lane.failed.as_ref()) {
            return Err(refused(step, exec, why.clone()));
        }
        let k = lane.resolve(step, exec, self.config)?;
        Ok((at, lane.resolved[k].remote.clone()))
    }

    /// Takes the run of requests from `from` (whose first request `step` planned) that the
    /// step covers, enqueueing as it goes; returns where the run ends. Requests that cannot
    /// be enqueued are failed in the batch with the reason.
    fn push_run(&mut self, step: &Step, requests: &[Request], from: usize) -> usize {
        let batch = self.batch;
        let (at, remote) = match self.lane_for(step, requests.len() - from) {
            Ok(found) => found,
            Err(e) => {
                let end = step.run_end(requests, from + 1);
                batch.fail_runs(std::slice::from_ref(&(from..end)), e);
                return end;
            }
        };
        let lane = &mut self.lanes[at];
        let exec = lane.exec;
        if let Some(prepared) = step.prepared.as_ref() {
            return lane.push_prepared(batch, step, prepared, &remote, requests, from);
        }
        // Remote addresses move from the owner's mapping to ours.
        let shift = remote.import.ptr().wrapping_sub(remote.base);
        let mut i = from;
        loop {
            // Check the next window (up to the next launch) and write its descriptors.
            let window = requests.len().min(i + (lane.cut - lane.seen).max(1));
            let end = step.run_end(&requests[..window], i.max(from + 1)).max(from + 1);
            lane.segs.extend(requests[i..end].iter().map(|r| {
                let there = r.remote.wrapping_add(shift);
                match r.op {
                    Op::Write => Seg { src: r.local, dst: there, len: r.len },
                    Op::Read => Seg { src: there, dst: r.local, len: r.len },
                }
            }));
            lane.seen += end - i;
            i = end;
            if lane.seen >= lane.cut {
                lane.launch(batch);
                let left = requests.len() - i;
                (lane.cut, lane.size) = next_cut(lane.seen, lane.size, lane.seen + left);
            }
            if i < window || i == requests.len() || lane.failed.is_some() {
                break;
            }
        }
        let end = if lane.failed.is_some() { step.run_end(requests, i.max(from + 1)) } else { i };
        if let Some(why) = lane.failed.as_ref().filter(|_| end > i) {
            // Not enqueued at all: these fail now (the enqueued part fails when it completes).
            let err = refused(step, exec, format!("enqueueing the copy: {why}"));
            batch.fail_runs(std::slice::from_ref(&(i..end)), err);
        }
        lane.runs.push(from..i);
        end
    }

    /// Takes a layer of a page transfer (requests `from..from + pages.shape.runs`), writing
    /// its descriptors straight from the index arrays window by window and launching each
    /// window as it completes, as `push_run` does for requests; returns where the layer ends.
    fn push_pages(&mut self, step: &Step, pages: &LayerPages<'_>, from: usize) -> Result<usize> {
        let (batch, end) = (self.batch, from + pages.shape.runs);
        let (at, remote) = match self.lane_for(step, pages.total - from) {
            Ok(found) => found,
            Err(e) => {
                batch.fail_runs(std::slice::from_ref(&(from..end)), e);
                return Ok(end);
            }
        };
        let lane = &mut self.lanes[at];
        // Remote addresses move from the owner's mapping to ours.
        let shift = remote.import.ptr().wrapping_sub(remote.base);
        let (size, here, there) = (pages.page_size, pages.local, pages.remote.wrapping_add(shift));
        let seg = |l: u64, r: u64, count: u64| {
            let (l, r) =
                (here.wrapping_add(l.wrapping_mul(size)), there.wrapping_add(r.wrapping_mul(size)));
            let len = count.wrapping_mul(size);
            match pages.op {
                Op::Write => Seg { src: l, dst: r, len },
                Op::Read => Seg { src: r, dst: l, len },
            }
        };
        let mut cursor = PageCursor::new(pages.local_pages, pages.remote_pages, pages.shape);
        let mut i = from;
        while !cursor.done() && lane.failed.is_none() {
            // The next window's descriptors (stretches without coalescing mapped in a tight
            // loop), then its launch.
            let want = (lane.cut - lane.seen).max(1);
            let before = lane.segs.len();
            let segs = &mut lane.segs;
            segs.reserve(want);
            let window = cursor.window(want, |piece| match piece {
                Piece::Singles { local, remote } => {
                    segs.extend(local.iter().zip(remote).map(|(&l, &r)| seg(l, r, 1)))
                }
                Piece::Run(run) => segs.push(seg(run.local, run.remote, run.count)),
            });
            let added = match window {
                Ok(added) => added,
                Err(e) => {
                    // Never launched; the submission fails (waiting for the launched part).
                    lane.segs.truncate(before);
                    lane.runs.push(from..i);
                    return Err(Error::InvalidArgument { reason: e.to_string() });
                }
            };
            lane.seen += added;
            i += added;
            if lane.seen >= lane.cut {
                lane.launch(batch);
                let left = pages.total - i;
                (lane.cut, lane.size) = next_cut(lane.seen, lane.size, lane.seen + left);
            }
        }
        if let Some(why) = lane.failed.as_ref().filter(|_| i < end) {
            // Not enqueued at all: these fail now (the enqueued part fails when it completes).
            let err = refused(step, lane.exec, format!("enqueueing the copy: {why}"));
            batch.fail_runs(std::slice::from_ref(&(i..end)), err);
        }
        lane.runs.push(from..i);
        Ok(end)
    }

    /// Launches what is left and hands every job to the completion thread.
    fn launch_rest(self) {
        let (batch, done) = (self.batch, self.done);
        for mut lane in self.lanes {
            if lane.failed.is_none() && !lane.segs.is_empty() {
                lane.launch(batch);
            }
            let mut work = match lane.into_work(batch) {
                Handover::Nothing => continue,
                Handover::Lost { runs, err } => {
                    batch.fail_runs(&runs, err);
                    continue;
                }
                Handover::Work(w) => w,
            };
            if let Some(stream) = self.complete_on {
                #[allow(unsafe_code)]
                // SAFETY: `BatchOptions::complete_on` documents that it names a live CUstream
                // of the caller's (as `stream` does for the start of the copies).
                let ordered = unsafe { work.pending.complete_on(stream) };
                if let Err(e) = ordered {
                    // The caller's stream is not ordered after the copies: the batch must not
                    // report success (the copies still complete and release their pins).
                    let why = format!("ordering the caller's stream after the copy: {e}");
                    let err = gpu_failed(&work.entered, work.exec, why);
                    work.failed.get_or_insert(err);
                }
            }
            if let Err(e) = done.send(work) {
                // The completion thread is gone (shutdown); the copy may still run, so keep
                // the marks and pins alive until the process ends rather than release early.
                let w = e.into_inner();
                w.batch.fail_runs(&w.runs, Error::ShuttingDown { who: "the engine".into() });
                std::mem::forget(w);
            }
        }
    }

    /// The submission failed after some copies were enqueued: waits (until `until`) for them,
    /// so that nothing is in flight once `submit` reports the failure, then drops the jobs.
    fn abandon(self, until: std::time::Instant) {
        let batch = self.batch;
        for lane in self.lanes {
            let exec = lane.exec;
            let Handover::Work(work) = lane.into_work(batch) else { continue };
            loop {
                if matches!(work.pending.is_done(), Ok(true) | Err(_)) {
                    // Clears the in-flight marks and releases the pins; the batch itself is
                    // never handed to the caller.
                    work.finish(Err(Error::Cancelled { batch: batch.id }));
                    break;
                }
                if std::time::Instant::now() >= until {
                    log::error!(
                        "cuda:{exec}: copies of a refused batch still running at its deadline; \
                         their memory stays pinned"
                    );
                    std::mem::forget(work);
                    break;
                }
                std::thread::yield_now();
            }
        }
    }
}

impl Lane {
    /// Pushes the prepared descriptors as one launch; records a failure.
    fn launch(&mut self, batch: &Batch) {
        let pushed = match &mut self.job {
            #[allow(unsafe_code)]
            // SAFETY: local ranges lie in registered regions pinned by `pins` until the work
            // completes; remote ranges lie in imports kept alive by `resolved`, inside the
            // region the owner registered (checked by `run_end`) and not revoked (checked by
            // `enter` in `resolve`).
            Ok(job) => unsafe { job.push(&self.segs) }.map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        self.segs.clear();
        batch.mark(Mark::FirstLaunch);
        if let Err(e) = pushed {
            self.failed = Some(e);
        }
    }

    /// Launches a prepared run (`requests[from..prepared.end]`, resolved as `remote`): its
    /// descriptors, translated into our mapping of the peer's memory, are written into pinned
    /// memory on the first execution and only launched on the next ones. Returns the run's end.
    fn push_prepared(
        &mut self,
        batch: &Batch,
        step: &Step,
        prepared: &PreparedRun,
        remote: &Arc<RemoteGpu>,
        requests: &[Request],
        from: usize,
    ) -> usize {
        let end = prepared.end;
        if !self.segs.is_empty() {
            self.launch(batch);
        }
        let set = self.job.as_ref().map_err(Clone::clone).and_then(|job| {
            let mut cache = prepared.cache.lock();
            match cache.as_ref().filter(|(w, _)| w.as_ptr() == Arc::as_ptr(remote)) {
                Some((_, set)) => Ok(set.clone()),
                None => {
                    let shift = remote.import.ptr().wrapping_sub(remote.base);
                    let segs: Vec<Seg> = requests[from..end]
                        .iter()
                        .map(|r| {
                            let there = r.remote.wrapping_add(shift);
                            match r.op {
                                Op::Write => Seg { src: r.local, dst: there, len: r.len },
                                Op::Read => Seg { src: there, dst: r.local, len: r.len },
                            }
                        })
                        .collect();
                    let set = job.copier().prepare(&segs).map_err(|e| e.to_string())?;
                    *cache = Some((Arc::downgrade(remote), set.clone()));
                    Ok(set)
                }
            }
        });
        let pushed = match (&mut self.job, set) {
            #[allow(unsafe_code)]
            // SAFETY: as in `launch`: local ranges pinned by `pins`, remote ranges inside the
            // import `remote` (kept alive by `resolved`; the cache is keyed by it, so the
            // descriptors name this very mapping), inside the owner's region (checked when
            // the plan was prepared) and not revoked (checked by `enter` in `resolve`).
            (Ok(job), Ok(set)) => unsafe { job.push_prepared(&set) }.map_err(|e| e.to_string()),
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e.clone()),
        };
        batch.mark(Mark::FirstLaunch);
        match pushed {
            Ok(()) => self.runs.push(from..end),
            Err(e) => {
                let err = refused(step, self.exec, format!("launching a prepared plan: {e}"));
                self.failed = Some(e);
                batch.fail_runs(std::slice::from_ref(&(from..end)), err);
            }
        }
        end
    }

    /// Finishes the job and says what became of it.
    fn into_work(self, batch: &Arc<Batch>) -> Handover {
        let entered: Vec<(Arc<NvlinkClient>, Arc<RemoteGpu>)> =
            self.resolved.into_iter().map(|r| (r.client, r.remote)).collect();
        // A job that never started enqueued nothing, pinned nothing and marked nothing.
        let Ok(job) = self.job else { return Handover::Nothing };
        let exec = self.exec;
        let failed =
            self.failed.map(|e| gpu_failed(&entered, exec, format!("enqueueing the copy: {e}")));
        let runs: Vec<Range<usize>> = self.runs.into_iter().filter(|r| !r.is_empty()).collect();
        match job.finish() {
            Ok(pending) => Handover::Work(GpuWork {
                pending,
                failed,
                batch: batch.clone(),
                runs,
                entered,
                _pins: self.pins,
                exec,
            }),
            Err(e) => {
                // Nothing tells when what was enqueued completes: keep the marks and pins for
                // the life of the process rather than release memory the GPU may still touch.
                let err = gpu_failed(&entered, exec, format!("recording the completion: {e}"));
                std::mem::forget((entered, self.pins));
                Handover::Lost { runs, err }
            }
        }
    }

    /// Maps a step's remote region, marks it in flight (unless revoked) and pins its local
    /// region; returns its index in `resolved`. Steps between the same two regions share one.
    fn resolve(&mut self, step: &Step, exec: u32, config: &EngineConfig) -> Result<usize> {
        if let Some(k) = self.resolved.iter().position(|r| {
            Arc::ptr_eq(&r.conn, &step.conn)
                && r.region == step.region.id
                && Arc::ptr_eq(&r.local, &step.local)
        }) {
            return Ok(k);
        }
        let route = step.gpu.as_ref().ok_or(Error::Internal("nvlink step without a GPU route"))?;
        // One pin per local region: a region already resolved for this job is pinned.
        if !self.resolved.iter().any(|r| Arc::ptr_eq(&r.local, &step.local)) {
            let local = &step.local;
            let pin = local
                .access_owned()
                .ok_or(Error::NotRegistered { addr: local.addr, len: local.len })?;
            self.pins.push(pin);
        }
        let client = step.conn.nvlink(config)?;
        let remote = client.remote(step.region.id, &route.reach, exec)?;
        if !client.enter(&remote)? {
            client.forget(step.region.id, exec);
            step.conn.mark_stale();
            return Err(Error::RemoteAccessDenied {
                peer: step.conn.who(),
                addr: step.region.addr,
                len: step.region.len,
                reason: format!("the peer unregistered {}", step.region.id),
            });
        }
        self.resolved.push(Resolved {
            conn: step.conn.clone(),
            region: step.region.id,
            local: step.local.clone(),
            client,
            remote,
        });
        Ok(self.resolved.len() - 1)
    }
}
