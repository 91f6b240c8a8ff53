//! The `fabric` transport: one-sided RMA through libfabric (`crate::fabric::rma`), for peers
//! whose regions are registered with a NIC of the same provider (RDMA NICs with `verbs` or
//! `efa`; the `tcp` provider when asked for by name, which is how it is tested here).
//!
//! - Memory is registered with every endpoint (one per NIC) nearest to it when the engine
//!   registers it; the keys, addresses and endpoint names a peer needs are published as the
//!   region's `Rma` reaches, one per NIC. Unregistration closes the registrations after the
//!   last local access ended: a peer's later access is refused by the NIC.
//! - A batch's requests are cut into chunks of at most [`CHUNK`] bytes, spread over the
//!   local NICs nearest the local buffer and the NICs the target published for its buffer,
//!   and posted by the submitting thread (`fi_write` / `fi_read`, delivery-complete); what
//!   the provider cannot take now waits in the NIC's backlog.
//! - One completion thread per NIC sleeps in the completion queue (which also drives the
//!   provider's progress, the target side of incoming RMA included), maps completions back
//!   to requests, posts the backlog, and every [`SWEEP`] gives up on operations whose batch
//!   already failed (its deadline, a cancel) or whose peer died: the peer's address is
//!   removed (the provider flushes what it still holds for it) and the request fails with
//!   the reason. An operation keeps its local range pinned until the provider returns it, so
//!   an unregistration never frees memory a NIC may still write.
//! - The notification of a batch follows its data over the peer's tcp lanes, which are also
//!   how a peer's death is seen at once (its sockets hang up).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tidewire_core::descriptor::{bytes_from_hex, bytes_to_hex, Reach};
use tidewire_core::memory::{Location, MemoryKind};
use tidewire_core::select::{FabricFacts, TransportKind};

use crate::batch::Batch;
use crate::config::EngineConfig;
use crate::error::{Error, PeerRef, Result};
use crate::fabric::rma::{self, Endpoint, Remote};
use crate::fabric::topo;
use crate::lifecycle::Lifecycle;
use crate::peer::PeerConn;
use crate::registry::OwnedAccess;
use crate::request::{Op, Request, Step};
use crate::transport::{BatchCtx, Submission, Transport};

/// Requests larger than this are cut into chunks spread over the NICs.
pub(crate) const CHUNK: u64 = 4 << 20;

/// How often a completion thread looks for operations to give up on.
const SWEEP: Duration = Duration::from_millis(10);

/// How long a stopping engine waits for the provider to return its operations.
const DRAIN: Duration = Duration::from_secs(1);

/// One NIC's endpoint and the operations posted on it.
pub(crate) struct Nic {
    pub(crate) ep: Endpoint,
    /// The endpoint's address, as peers insert it (hex in descriptors).
    pub(crate) name_hex: String,
    /// Where the NIC sits (NUMA node, PCIe path), for the buffer → NIC map.
    pub(crate) place: topo::Place,
    ops: Mutex<HashMap<u64, InFlight>>,
    backlog: Mutex<VecDeque<Post>>,
    next_id: AtomicU64,
}

/// An operation the provider holds.
struct InFlight {
    batch: Arc<Batch>,
    req: usize,
    peer: Arc<FabricPeer>,
    fi_addr: u64,
    /// What the error of this operation names.
    remote: u64,
    len: u64,
    /// The local range stays registered (its memory alive) until the provider returns it.
    _pin: OwnedAccess,
    /// Failed already (its batch ended or its peer died); waiting only for the provider to
    /// give the operation back.
    abandoned: bool,
}

/// An operation to post.
struct Post {
    id: u64,
    write: bool,
    local: u64,
    len: u64,
    region: Arc<FabricRegion>,
    remote: Remote,
}

/// The engine's fabric endpoints, one per NIC of the chosen provider.
pub(crate) struct Fabric {
    pub(crate) nics: Vec<Nic>,
    pub(crate) facts: FabricFacts,
}

impl Fabric {
    /// Opens an endpoint on every NIC of the provider `config` asks for (or the probe
    /// chose); `Err` says why this engine has none.
    pub(crate) fn open(config: &EngineConfig) -> std::result::Result<Arc<Self>, String> {
        if !config.transports.enabled.contains(&TransportKind::Fabric) {
            return Err("disabled by configuration".into());
        }
        let probe = crate::fabric::probe();
        probe.library.clone()?;
        let provider = match &config.fabric_provider {
            Some(p) => {
                let offered: Vec<&str> = probe.providers.iter().map(|p| p.core()).collect();
                crate::fabric::choose(&offered, Some(p))?
            }
            None => probe.chosen.clone()?,
        };
        let domains: Vec<String> = {
            let mut d: Vec<String> = probe
                .providers
                .iter()
                .filter(|p| p.core() == provider)
                .map(|p| p.domain.clone())
                .collect();
            d.dedup();
            d
        };
        // The tcp and shm providers reach every peer through any one interface: one endpoint.
        let one = matches!(provider.as_str(), "tcp" | "shm" | "sockets");
        let wanted: Vec<Option<&str>> = if one || domains.is_empty() {
            vec![None]
        } else {
            domains.iter().map(|d| Some(d.as_str())).collect()
        };
        let mut nics = Vec::new();
        let mut why = Vec::new();
        let mut hmem = true;
        for domain in wanted {
            let ep = Endpoint::open(&provider, domain, true)
                .or_else(|_| Endpoint::open(&provider, domain, false));
            match ep.and_then(|ep| ep.name().map(|n| (ep, n))) {
                Ok((ep, name)) => {
                    hmem &= ep.hmem;
                    let place = topo::nic_place(&topo::Sysfs::host(), &ep.nic);
                    nics.push(Nic {
                        name_hex: bytes_to_hex(&name),
                        place,
                        ep,
                        ops: Mutex::default(),
                        backlog: Mutex::default(),
                        next_id: AtomicU64::new(1),
                    });
                }
                Err(e) => why.push(e),
            }
        }
        if nics.is_empty() {
            return Err(format!("no {provider} endpoint opened: {}", why.join("; ")));
        }
        for w in why {
            log::warn!("fabric: a {provider} NIC is left out: {w}");
        }
        let facts = FabricFacts { provider: Ok(provider), hmem };
        Ok(Arc::new(Self { nics, facts }))
    }

    /// Starts one completion thread per NIC.
    pub(crate) fn start(self: &Arc<Self>, life: &Arc<Lifecycle>) -> Result<()> {
        for i in 0..self.nics.len() {
            let (me, l) = (self.clone(), life.clone());
            life.spawn(format!("tw-fabric-{i}"), move || me.completion_loop(i, &l))?;
        }
        Ok(())
    }

    /// The provider's name (the facts say it, or why none).
    pub(crate) fn provider(&self) -> &str {
        self.facts.provider.as_deref().unwrap_or("fabric")
    }

    /// The NICs nearest memory at `[addr, +len)` of `location`: where it is registered and
    /// what its requests are spread over.
    pub(crate) fn nearest(&self, addr: u64, location: Location) -> Vec<usize> {
        let places: Vec<&topo::Place> = self.nics.iter().map(|n| &n.place).collect();
        topo::nearest(&places, &topo::buffer_place(&topo::Sysfs::host(), addr, location))
    }

    /// Registers `[addr, +len)` with the NICs nearest it; `Err` says why peers cannot reach
    /// it over the fabric (it stays reachable by the other transports).
    #[allow(unsafe_code)]
    pub(crate) fn register(
        self: &Arc<Self>,
        addr: u64,
        len: u64,
        location: Location,
    ) -> std::result::Result<Arc<FabricRegion>, String> {
        let gpu = matches!(location.kind, MemoryKind::Device | MemoryKind::DeviceVmm);
        if gpu && !self.facts.hmem {
            return Err(format!("{location}: the {} endpoints have no FI_HMEM", self.provider()));
        }
        let mut mrs = Vec::new();
        let mut reach = Vec::new();
        for i in self.nearest(addr, location) {
            let nic = &self.nics[i];
            // SAFETY: the caller of `Engine::register` promised the range stays valid until
            // it is unregistered, which closes this registration first
            // (`FabricRegion::close`).
            let mr = unsafe {
                if gpu {
                    nic.ep.register_cuda(
                        addr as *const u8,
                        len as usize,
                        location.device.unwrap_or(0) as i32,
                    )
                } else {
                    nic.ep.register(addr as *const u8, len as usize)
                }
            };
            match mr {
                Ok(mr) => {
                    reach.push(Reach::Rma {
                        provider: self.provider().to_string(),
                        nic: nic.ep.nic.clone(),
                        endpoint: nic.name_hex.clone(),
                        key: mr.key,
                        addr: mr.addr,
                    });
                    mrs.push((i, mr));
                }
                Err(e) => {
                    for (i, mr) in mrs {
                        self.nics[i].ep.deregister(mr);
                    }
                    return Err(format!("registering with {}: {e}", nic.ep.nic));
                }
            }
        }
        Ok(Arc::new(FabricRegion { fabric: self.clone(), mrs: RwLock::new(mrs), reach }))
    }

    fn completion_loop(&self, i: usize, life: &Lifecycle) {
        let nic = &self.nics[i];
        let mut done = Vec::new();
        let mut swept = Instant::now();
        while !life.stopping() {
            nic.ep.wait(&mut done, 10);
            for (id, outcome) in done.drain(..) {
                nic.complete(id, outcome, self.provider());
            }
            nic.post_backlog(self.provider());
            if swept.elapsed() >= SWEEP {
                swept = Instant::now();
                nic.sweep(Instant::now());
            }
        }
        // Stopping: give up on everything and wait (bounded) for the provider to return it,
        // so no NIC writes into memory the engine is about to release.
        let stopping = Error::ShuttingDown { who: "this engine".into() };
        nic.backlog.lock().clear();
        nic.give_up(|_| Some(stopping.clone()));
        let until = Instant::now() + DRAIN;
        while !nic.ops.lock().is_empty() && Instant::now() < until {
            nic.ep.wait(&mut done, 10);
            for (id, outcome) in done.drain(..) {
                nic.complete(id, outcome, self.provider());
            }
        }
        let left = std::mem::take(&mut *nic.ops.lock()).len();
        if left > 0 {
            log::warn!(
                "fabric: {left} operations on {} were not returned in {DRAIN:?}",
                nic.ep.nic
            );
        }
    }
}

impl Nic {
    /// The provider returned operation `id`.
    fn complete(&self, id: u64, outcome: std::result::Result<(), String>, provider: &str) {
        let Some(op) = self.ops.lock().remove(&id) else { return };
        if op.abandoned {
            return;
        }
        match outcome {
            Ok(()) => op.batch.chunk_done(op.req),
            Err(why) => {
                let err = classify(&op.peer.who, op.remote, op.len, provider, &why);
                op.batch.fail_request(op.req, err);
            }
        }
    }

    /// Posts what waits in the backlog until the provider is busy again.
    fn post_backlog(&self, provider: &str) {
        loop {
            let Some(post) = self.backlog.lock().pop_front() else { return };
            match self.post(&post) {
                Ok(true) => {}
                Ok(false) => {
                    self.backlog.lock().push_front(post);
                    return;
                }
                Err(why) => self.refused(post.id, provider, &why),
            }
        }
    }

    /// Posts one operation: `Ok(false)` when the provider is busy.
    #[allow(unsafe_code)]
    fn post(&self, p: &Post) -> std::result::Result<bool, String> {
        let mrs = p.region.mrs.read();
        let Some((_, mr)) =
            mrs.iter().find(|(i, _)| std::ptr::eq(&self.ep, &p.region.fabric.nics[*i].ep))
        else {
            return Err("the local region is no longer registered with this NIC".into());
        };
        // SAFETY: the local range lies inside the registered region `mr` covers (checked when
        // the request was planned) and stays pinned (`InFlight::_pin`) until the provider
        // returns the operation.
        unsafe {
            if p.write {
                self.ep.write(p.local as *const u8, p.len as usize, mr, p.remote, p.id)
            } else {
                self.ep.read(p.local as *mut u8, p.len as usize, mr, p.remote, p.id)
            }
        }
    }

    /// The provider refused to start operation `id`.
    fn refused(&self, id: u64, provider: &str, why: &str) {
        if let Some(op) = self.ops.lock().remove(&id) {
            if !op.abandoned {
                let err = classify(&op.peer.who, op.remote, op.len, provider, why);
                op.batch.fail_request(op.req, err);
            }
        }
    }

    /// Gives up on operations whose batch already ended (failed at its deadline, cancelled)
    /// or whose peer died.
    fn sweep(&self, now: Instant) {
        self.give_up(|op| {
            if let Some(err) = op.peer.dead() {
                return Some(err);
            }
            op.batch.expire(now);
            op.batch.is_finished().then(|| Error::Timeout {
                what: format!("a {} operation of {}", TransportKind::Fabric, op.batch.id),
                after: Duration::ZERO,
            })
        });
    }

    /// Fails the operations `why` returns an error for and removes their peers' addresses,
    /// so that the provider flushes what it holds for them; the operations stay until it
    /// returns them (their local ranges pinned).
    fn give_up(&self, why: impl Fn(&InFlight) -> Option<Error>) {
        let mut removed = Vec::new();
        {
            let mut ops = self.ops.lock();
            for op in ops.values_mut().filter(|op| !op.abandoned) {
                if let Some(err) = why(op) {
                    op.abandoned = true;
                    op.batch.fail_request(op.req, err);
                    if !removed.contains(&op.fi_addr) {
                        removed.push(op.fi_addr);
                        op.peer.forget(op.fi_addr);
                    }
                }
            }
        }
        for a in removed {
            self.ep.remove(a);
        }
    }
}

/// A provider's error for an operation, as the engine's error.
fn classify(peer: &PeerRef, addr: u64, len: u64, provider: &str, why: &str) -> Error {
    let w = why.to_ascii_lowercase();
    if w.contains("key") || w.contains("permission") || w.contains("access") {
        Error::RemoteAccessDenied {
            peer: peer.clone(),
            addr,
            len,
            reason: format!(
                "the {provider} NIC refused the access ({why}): not registered there (any more)"
            ),
        }
    } else {
        Error::PeerFailed {
            peer: peer.clone(),
            transport: TransportKind::Fabric,
            reason: format!("{provider}: {why}"),
        }
    }
}

/// A region's registrations with the NICs.
pub(crate) struct FabricRegion {
    fabric: Arc<Fabric>,
    /// (NIC index, registration); emptied by `close`.
    mrs: RwLock<Vec<(usize, rma::Region)>>,
    /// What peers need, one `Rma` reach per NIC.
    pub(crate) reach: Vec<Reach>,
}

impl FabricRegion {
    /// Closes the registrations (unregistration, once no local access is in flight): a
    /// peer's later access is refused by the NIC.
    pub(crate) fn close(&self) {
        for (i, mr) in std::mem::take(&mut *self.mrs.write()) {
            self.fabric.nics[i].ep.deregister(mr);
        }
    }

    /// The NICs this region is registered with (the local side of its requests).
    fn nics(&self) -> Vec<usize> {
        self.mrs.read().iter().map(|(i, _)| *i).collect()
    }
}

impl Drop for FabricRegion {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the fabric transport keeps per peer instance: the addresses of its endpoints in
/// each NIC's address vector, and whether it died.
pub(crate) struct FabricPeer {
    who: PeerRef,
    /// (local NIC, remote endpoint name in hex) → address-vector handle.
    addrs: Mutex<HashMap<(usize, String), u64>>,
    dead: Mutex<Option<Error>>,
}

impl FabricPeer {
    pub(crate) fn new(who: PeerRef) -> Arc<Self> {
        Arc::new(Self { who, addrs: Mutex::default(), dead: Mutex::default() })
    }

    /// The peer's process exited or its engine closed: its operations fail with `err`.
    pub(crate) fn close(&self, err: Error) {
        self.dead.lock().get_or_insert(err);
    }

    fn dead(&self) -> Option<Error> {
        self.dead.lock().clone()
    }

    /// The handle of the remote endpoint `endpoint` (hex) in NIC `nic`'s address vector.
    fn addr(&self, fabric: &Fabric, nic: usize, endpoint: &str) -> Result<u64> {
        if let Some(err) = self.dead() {
            return Err(err);
        }
        let mut addrs = self.addrs.lock();
        if let Some(a) = addrs.get(&(nic, endpoint.to_string())) {
            return Ok(*a);
        }
        let name = bytes_from_hex(endpoint).ok_or_else(|| Error::Protocol {
            peer: self.who.clone(),
            reason: "a malformed fabric endpoint address".into(),
        })?;
        let a = fabric.nics[nic].ep.insert(&name).map_err(|why| Error::PeerUnreachable {
            peer: self.who.clone(),
            reason: format!("{} on {}: {why}", fabric.provider(), fabric.nics[nic].ep.nic),
        })?;
        addrs.insert((nic, endpoint.to_string()), a);
        Ok(a)
    }

    /// Forgets an address the NIC removed (the next use inserts it again).
    fn forget(&self, fi_addr: u64) {
        self.addrs.lock().retain(|_, a| *a != fi_addr);
    }
}

/// The `fabric` transport.
pub(crate) struct FabricTransport {
    fabric: Arc<Fabric>,
    config: EngineConfig,
    life: Arc<Lifecycle>,
}

impl FabricTransport {
    pub(crate) fn new(fabric: Arc<Fabric>, config: EngineConfig, life: Arc<Lifecycle>) -> Self {
        Self { fabric, config, life }
    }
}

impl Transport for FabricTransport {
    fn serves(&self) -> &'static [TransportKind] {
        &[TransportKind::Fabric]
    }

    fn begin<'a>(&'a self, batch: &'a Arc<Batch>, ctx: BatchCtx) -> Box<dyn Submission + 'a> {
        Box::new(FabricSubmission { t: self, batch, ctx, runs: Vec::new() })
    }
}

/// One run of a batch: requests `from..end` between `step`'s two regions.
struct Run {
    step: Step,
    from: usize,
    end: usize,
}

struct FabricSubmission<'a> {
    t: &'a FabricTransport,
    batch: &'a Arc<Batch>,
    ctx: BatchCtx,
    runs: Vec<Run>,
}

/// Round-robin position over NIC pairs, shared by the engine's batches.
static NEXT_PAIR: AtomicUsize = AtomicUsize::new(0);

impl Submission for FabricSubmission<'_> {
    fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize> {
        if self.ctx.complete_on.is_some() {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "complete_on: request {from} goes over the fabric to {}, completed on a \
                     host thread that a CUDA stream cannot wait for",
                    step.conn.name
                ),
            });
        }
        let end = step.run_end(requests, from + 1);
        self.batch.set_chunks(from..end, |i| requests[i].len.div_ceil(CHUNK) as u32);
        self.runs.push(Run { step, from, end });
        Ok(end)
    }

    fn finish(self: Box<Self>, requests: &[Request]) {
        for run in &self.runs {
            if let Err(e) = self.post_run(run, requests) {
                self.batch.fail_runs(std::slice::from_ref(&(run.from..run.end)), e);
            }
        }
    }

    fn abort(self: Box<Self>, _until: Instant) {}
}

impl FabricSubmission<'_> {
    /// Posts one run's chunks, spread over the local NICs its buffer is registered with and
    /// the NICs the target published for its region.
    fn post_run(&self, run: &Run, requests: &[Request]) -> Result<()> {
        let fabric = &self.t.fabric;
        let step = &run.step;
        let conn: &Arc<PeerConn> = &step.conn;
        // The peer's tcp lanes: how its death is seen at once, and what carries the
        // notification after the data.
        conn.tcp(&self.t.config, &self.t.life)?;
        let peer = conn.fabric();
        let local = step.local.fabric.clone().ok_or_else(|| Error::NoTransport {
            peer: conn.who(),
            addr: requests[run.from].remote,
            len: requests[run.from].len,
            refusals: vec![tidewire_core::select::Refusal {
                transport: TransportKind::Fabric,
                reason: format!(
                    "local region {} is not registered with a fabric NIC",
                    step.local.id
                ),
            }],
        })?;
        let region =
            conn.find(step.region.addr, 1).ok_or(Error::Internal("a planned region vanished"))?;
        let ours = fabric.provider();
        let remotes: Vec<(String, u64, u64)> = region
            .reach
            .iter()
            .filter_map(|r| match r {
                Reach::Rma { provider, endpoint, key, addr, .. } if provider == ours => {
                    Some((endpoint.clone(), *key, *addr))
                }
                _ => None,
            })
            .collect();
        let locals = local.nics();
        if remotes.is_empty() || locals.is_empty() {
            return Err(Error::Internal("a fabric run without registrations on one side"));
        }
        let mut pair = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        let mut per_nic: Vec<Vec<(Post, InFlight)>> =
            (0..fabric.nics.len()).map(|_| Vec::new()).collect();
        for (req, r) in requests.iter().enumerate().take(run.end).skip(run.from) {
            let mut off = 0;
            while off < r.len {
                let n = CHUNK.min(r.len - off);
                let nic = locals[pair % locals.len()];
                let (endpoint, key, base) = &remotes[pair % remotes.len()];
                pair += 1;
                let fi_addr = peer.addr(fabric, nic, endpoint)?;
                let pin = step
                    .local
                    .access_owned()
                    .ok_or(Error::NotRegistered { addr: r.local, len: r.len })?;
                let id = fabric.nics[nic].next_id.fetch_add(1, Ordering::Relaxed);
                let remote = Remote {
                    peer: fi_addr,
                    addr: base + (r.remote + off - region.addr),
                    key: *key,
                };
                let post = Post {
                    id,
                    write: r.op == Op::Write,
                    local: r.local + off,
                    len: n,
                    region: local.clone(),
                    remote,
                };
                let op = InFlight {
                    batch: self.batch.clone(),
                    req,
                    peer: peer.clone(),
                    fi_addr,
                    remote: r.remote + off,
                    len: n,
                    _pin: pin,
                    abandoned: false,
                };
                per_nic[nic].push((post, op));
                off += n;
            }
        }
        for (i, posts) in per_nic.into_iter().enumerate() {
            if posts.is_empty() {
                continue;
            }
            let nic = &fabric.nics[i];
            let mut rest = Vec::new();
            {
                let mut ops = nic.ops.lock();
                for (post, op) in posts {
                    ops.insert(post.id, op);
                    rest.push(post);
                }
            }
            let mut rest = rest.into_iter();
            // Posted here while the NIC's backlog is empty (order kept); the rest waits there.
            if nic.backlog.lock().is_empty() {
                for post in rest.by_ref() {
                    match nic.post(&post) {
                        Ok(true) => {}
                        Ok(false) => {
                            nic.backlog.lock().push_back(post);
                            break;
                        }
                        Err(why) => nic.refused(post.id, ours, &why),
                    }
                }
            }
            let left: Vec<Post> = rest.collect();
            if !left.is_empty() {
                nic.backlog.lock().extend(left);
            }
            if !nic.backlog.lock().is_empty() {
                nic.ep.signal();
            }
        }
        Ok(())
    }
}
