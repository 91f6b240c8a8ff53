//! The nvlink transport (and mnnvl, the same path with FABRIC handles): a same-host peer's
//! device memory is imported once (CUDA IPC handle, or a VMM allocation whose POSIX file
//! descriptor comes over the shm socket) and copied into by our GPU: the copy engine for
//! large runs, one gather-kernel launch for a batch of small or scattered ones.
//!
//! Revocation uses the shm transport's page (`shm.rs`): every exported region has one, the
//! initiator marks its slot in flight before enqueueing and clears it only when the GPU event
//! completes, so the owner's `unregister` returns only after our copies landed, and a copy
//! is never enqueued after it. Imports are closed when the region is found revoked, or
//! when the peer restarts (the client is dropped with the peer's connection state).
//!
//! Completion: a thread per engine polls the events of copies in flight and finishes their
//! requests; before reporting success it checks that the peer process is still alive (its
//! end of the shm socket is open), since a copy into a dead peer's memory "succeeds".

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use tidewire_core::descriptor::{handle_from_hex, handle_to_hex, Reach};
use tidewire_core::memory::Location;
use tidewire_core::select::{GpuFacts, TransportKind};
use tidewire_core::RegionId;
use tidewire_gpu::copy::{Copier, Pending, Seg};
use tidewire_gpu::share::{self, Exportable, Imported, Shareable};
use tidewire_gpu::Gpu;

use crate::batch::Batch;
use crate::engine::{Op, Request, Step};
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::registry::{OwnedAccess, RegionEntry};
use crate::transport::shm::{SharedRegion, ShmClient, ShmMap, FETCH_VMM_FD};

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
    let gpu = Gpu::get(device).map_err(|e| e.0)?;
    let mut reach = Vec::new();
    let mut vmm_fd = None;
    let (base, size) = match share::exportable(gpu, addr).map_err(|e| e.0)? {
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
                vmm_fd = Some((size, share::export_fd(gpu, addr).map_err(|e| e.0)?));
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

/// A peer's region, mapped for one of our GPUs.
pub(crate) struct RemoteGpu {
    control: ShmMap,
    import: Arc<Imported>,
    base: u64,
}

/// An IPC import: the handle and the GPU it is mapped for.
type IpcKey = ([u8; 64], u32);

/// The initiator's state for one peer instance: imports and revocation pages.
pub(crate) struct NvlinkClient {
    pub(crate) shm: Arc<ShmClient>,
    regions: Mutex<HashMap<(RegionId, u32), Arc<RemoteGpu>>>,
    ipc: Mutex<HashMap<IpcKey, Arc<Imported>>>,
}

impl NvlinkClient {
    pub(crate) fn new(shm: Arc<ShmClient>) -> Self {
        Self { shm, regions: Mutex::default(), ipc: Mutex::default() }
    }

    /// The peer's region `id`, reached through `reach`, mapped for GPU `exec`.
    fn remote(&self, id: RegionId, reach: &Reach, exec: u32) -> Result<Arc<RemoteGpu>> {
        if let Some(r) = self.regions.lock().get(&(id, exec)) {
            return Ok(r.clone());
        }
        let gpu = Gpu::get(exec).map_err(|e| self.failed(format!("cuda:{exec}: {e}")))?;
        let control = self.shm.control(id)?;
        let (import, base) = match reach {
            Reach::CudaIpc { handle, base, size, .. } => {
                let h = handle_from_hex(handle)
                    .ok_or_else(|| self.failed(format!("{id}: malformed IPC handle")))?;
                let known = self.ipc.lock().get(&(h, exec)).cloned();
                let import = match known {
                    Some(i) => i,
                    None => {
                        let i = Arc::new(
                            share::import_ipc(gpu, &h, *size)
                                .map_err(|e| self.failed(format!("importing {id}: {e}")))?,
                        );
                        self.ipc.lock().insert((h, exec), i.clone());
                        i
                    }
                };
                (import, *base)
            }
            Reach::VmmFd { base, size, .. } => {
                let (stated, fd) = self.shm.fetch(FETCH_VMM_FD, id)?;
                if stated != *size {
                    return Err(self.failed(format!(
                        "{id}: the descriptor says {size} bytes, the socket {stated}"
                    )));
                }
                let i = share::import_vmm(gpu, Shareable::Fd(fd.as_fd()), *size)
                    .map_err(|e| self.failed(format!("importing {id}: {e}")))?;
                (Arc::new(i), *base)
            }
            Reach::Fabric { handle, base, size, .. } => {
                let h = handle_from_hex(handle)
                    .ok_or_else(|| self.failed(format!("{id}: malformed FABRIC handle")))?;
                let i = share::import_vmm(gpu, Shareable::Fabric(&h), *size)
                    .map_err(|e| self.failed(format!("importing {id}: {e}")))?;
                (Arc::new(i), *base)
            }
            _ => return Err(Error::Internal("nvlink given a host reach")),
        };
        let r = Arc::new(RemoteGpu { control, import, base });
        self.regions.lock().insert((id, exec), r.clone());
        Ok(r)
    }

    /// Drops the mapping of a region the peer revoked.
    fn forget(&self, id: RegionId, exec: u32) {
        self.regions.lock().remove(&(id, exec));
    }

    fn failed(&self, reason: String) -> Error {
        Error::PeerFailed { peer: self.shm_peer(), transport: TransportKind::Nvlink, reason }
    }

    fn shm_peer(&self) -> String {
        self.shm.peer().to_string()
    }
}

/// GPU copies in flight, handed to the completion thread.
pub(crate) struct GpuWork {
    pending: Pending,
    batch: Arc<Batch>,
    reqs: Vec<usize>,
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
    Error::PeerFailed {
        peer: entered.first().map_or_else(|| "?".into(), |(c, _)| c.shm_peer()),
        transport: TransportKind::Nvlink,
        reason: format!("cuda:{exec}: {what}"),
    }
}

impl GpuWork {
    fn finish(self, outcome: std::result::Result<(), Error>) {
        let mut dead = None;
        for (client, remote) in &self.entered {
            client.shm.leave(&remote.control);
            if dead.is_none() && !client.shm.peer_alive() {
                dead = Some(client.shm_peer());
            }
        }
        match (outcome, dead) {
            (Err(e), _) => self.reqs.iter().for_each(|&i| self.batch.fail_request(i, e.clone())),
            (Ok(()), Some(peer)) => {
                let e = Error::PeerFailed {
                    peer,
                    transport: TransportKind::Nvlink,
                    reason: "the peer process exited while the copy ran".into(),
                };
                self.reqs.iter().for_each(|&i| self.batch.fail_request(i, e.clone()));
            }
            (Ok(()), None) => self.batch.chunks_done(&self.reqs),
        }
    }
}

/// Starts the completion thread; returns the queue GPU work is handed to.
pub(crate) fn start_completer(life: &Arc<Lifecycle>, grace: Duration) -> Result<Sender<GpuWork>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let l2 = life.clone();
    life.spawn("tw-gpu-done".into(), move || complete_loop(&rx, &l2, grace))?;
    Ok(tx)
}

fn complete_loop(rx: &Receiver<GpuWork>, life: &Lifecycle, grace: Duration) {
    let mut inflight: Vec<GpuWork> = Vec::new();
    loop {
        if inflight.is_empty() {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(w) => inflight.push(w),
                Err(RecvTimeoutError::Timeout) if !life.stopping() => continue,
                Err(_) => return,
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
        if !progressed {
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

/// Enqueues the GPU requests of a batch (`idx` indexes `requests` and `steps`), one launch
/// per executing GPU, and hands the completions to `done`.
pub(crate) fn run(
    batch: &Arc<Batch>,
    requests: &[Request],
    steps: &[&Step],
    idx: &[usize],
    after: Option<u64>,
    clients: &dyn Fn(&Step) -> Result<Arc<NvlinkClient>>,
    done: &Sender<GpuWork>,
) {
    let mut gpus: Vec<u32> = Vec::new();
    for &i in idx {
        if let Some(route) = &steps[i].gpu {
            if !gpus.contains(&route.exec) {
                gpus.push(route.exec);
            }
        }
    }
    for exec in gpus {
        let mine: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|&i| steps[i].gpu.as_ref().is_some_and(|g| g.exec == exec))
            .collect();
        run_on(batch, requests, steps, &mine, exec, after, clients, done);
    }
}

struct Resolved<'a> {
    step: &'a Step,
    client: Arc<NvlinkClient>,
    remote: Arc<RemoteGpu>,
}

#[allow(clippy::too_many_arguments)]
fn run_on<'a>(
    batch: &Arc<Batch>,
    requests: &[Request],
    steps: &[&'a Step],
    idx: &[usize],
    exec: u32,
    after: Option<u64>,
    clients: &dyn Fn(&Step) -> Result<Arc<NvlinkClient>>,
    done: &Sender<GpuWork>,
) {
    let mut resolved: Vec<Resolved> = Vec::new();
    let mut pins: Vec<OwnedAccess> = Vec::new();
    let mut pinned: Vec<&RegionEntry> = Vec::new();
    let mut segs: Vec<Seg> = Vec::with_capacity(idx.len());
    let mut reqs: Vec<usize> = Vec::with_capacity(idx.len());
    let mut last: Option<usize> = None;
    for &i in idx {
        let (r, step) = (&requests[i], steps[i]);
        let k = match last.filter(|&k| std::ptr::eq(resolved[k].step, step)) {
            Some(k) => k,
            None => match resolve(step, exec, clients, &mut resolved, &mut pins, &mut pinned) {
                Ok(k) => k,
                Err(e) => {
                    batch.fail_request(i, e);
                    continue;
                }
            },
        };
        last = Some(k);
        let remote = &resolved[k].remote;
        let at = remote.import.ptr() + (r.remote - remote.base);
        segs.push(match r.op {
            Op::Write => Seg { src: r.local, dst: at, len: r.len },
            Op::Read => Seg { src: at, dst: r.local, len: r.len },
        });
        reqs.push(i);
    }
    let entered: Vec<(Arc<NvlinkClient>, Arc<RemoteGpu>)> =
        resolved.into_iter().map(|r| (r.client, r.remote)).collect();
    if segs.is_empty() {
        return;
    }
    #[allow(unsafe_code)]
    let enqueued = Gpu::get(exec).and_then(Copier::get).and_then(|c| {
        // SAFETY: local ranges lie in registered regions pinned by `pins` until the work
        // completes; remote ranges lie in imports kept alive by `entered`, inside the
        // region the owner registered (checked at planning) and not revoked (checked by
        // `enter` in `resolve`).
        unsafe { c.enqueue(&segs, after) }
    });
    match enqueued {
        Ok(pending) => {
            let work = GpuWork { pending, batch: batch.clone(), reqs, entered, _pins: pins, exec };
            if let Err(e) = done.send(work) {
                // The completion thread is gone (shutdown); the copy may still run, so keep
                // the marks and pins alive until the process ends rather than release early.
                let w = e.into_inner();
                let err = Error::ShuttingDown { who: "the engine".into() };
                w.reqs.iter().for_each(|&i| w.batch.fail_request(i, err.clone()));
                std::mem::forget(w);
            }
        }
        Err(e) => {
            let err = gpu_failed(&entered, exec, format!("enqueueing the copy: {e}"));
            for (client, remote) in &entered {
                client.shm.leave(&remote.control);
            }
            reqs.iter().for_each(|&i| batch.fail_request(i, err.clone()));
        }
    }
}

/// Maps a step's remote region, marks it in flight (unless revoked) and pins its local
/// region; returns its index in `resolved`.
fn resolve<'a>(
    step: &'a Step,
    exec: u32,
    clients: &dyn Fn(&Step) -> Result<Arc<NvlinkClient>>,
    resolved: &mut Vec<Resolved<'a>>,
    pins: &mut Vec<OwnedAccess>,
    pinned: &mut Vec<&'a RegionEntry>,
) -> Result<usize> {
    if let Some(k) = resolved.iter().position(|r| std::ptr::eq(r.step, step)) {
        return Ok(k);
    }
    let route = step.gpu.as_ref().ok_or(Error::Internal("nvlink step without a GPU route"))?;
    let local = &*step.local;
    if !pinned.iter().any(|&p| std::ptr::eq(p, local)) {
        let pin = local
            .access_owned()
            .ok_or(Error::NotRegistered { addr: local.addr, len: local.len })?;
        pins.push(pin);
        pinned.push(local);
    }
    let client = clients(step)?;
    let remote = client.remote(step.region.id, &route.reach, exec)?;
    if !client.shm.enter(&remote.control) {
        client.forget(step.region.id, exec);
        return Err(Error::RemoteAccessDenied {
            peer: step.conn.name.clone(),
            addr: step.region.addr,
            len: step.region.len,
            reason: format!("the peer unregistered {}", step.region.id),
        });
    }
    resolved.push(Resolved { step, client, remote });
    Ok(resolved.len() - 1)
}
