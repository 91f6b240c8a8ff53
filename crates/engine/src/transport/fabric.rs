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
//!   to requests, posts the backlog, and every [`SWEEP`] gives up on operations whose batch's
//!   deadline passed or whose peer died. Operations go out through one initiator endpoint per
//!   (peer, NIC): giving up closes that endpoint, which discards what the provider still holds
//!   of it, and fails every operation it carried with the reason. Until the provider returns
//!   an operation or its endpoint is closed, the operation keeps its local range pinned, so
//!   an unregistration never frees memory a NIC may still write.
//! - The notification of a batch follows its data over the peer's tcp lanes, which are also
//!   how a peer's death is seen at once (its sockets hang up).

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tidewire_core::descriptor::{bytes_from_hex, bytes_to_hex, Reach};
use tidewire_core::memory::{Location, MemoryKind};
use tidewire_core::select::{FabricFacts, TransportKind};

use crate::batch::{Batch, Fence, Mark};
use crate::config::EngineConfig;
use crate::error::{Error, PeerRef, Result};
use crate::fabric::rma::{self, Endpoint, Initiator, Remote, Rma};
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

/// How long a failing batch waits for the NICs to return its READs in flight before it closes
/// the endpoints carrying them (failing what else they carried), where the provider may close
/// an endpoint that holds operations (see [`Fabric::closes_held`]).
const FENCE_WAIT: Duration = Duration::from_millis(50);

thread_local! {
    /// Set on the NICs' completion threads, which cannot wait for their own completions.
    static COMPLETING: Cell<bool> = const { Cell::new(false) };
}

/// One NIC's endpoint and the operations posted on it.
///
/// Fields drop in order: the operations (and the initiator endpoints they hold) before `ep`,
/// whose drop closes the domain they were opened on.
pub(crate) struct Nic {
    ops: Mutex<HashMap<u64, InFlight>>,
    /// Set (under `ops`) when the completion thread stops: nothing more is posted here.
    closed: AtomicBool,
    backlog: Mutex<VecDeque<Post>>,
    /// The peers' initiator endpoints on this NIC, whose queues the completion thread polls.
    inits: Mutex<Vec<Weak<Initiator>>>,
    next_id: AtomicU64,
    /// Operations posted on this NIC (what `tidewire info` and the map report).
    posted: AtomicU64,
    /// The endpoint's address, as peers insert it (hex in descriptors).
    pub(crate) name_hex: String,
    /// Where the NIC sits (NUMA node, PCIe path), for the buffer → NIC map.
    pub(crate) place: topo::Place,
    pub(crate) ep: Endpoint,
}

/// An operation the provider holds.
struct InFlight {
    batch: Arc<Batch>,
    req: usize,
    peer: Arc<FabricPeer>,
    /// The (peer, NIC) endpoint it went out on.
    via: Arc<Initiator>,
    /// A READ: the NIC writes into local memory.
    read: bool,
    /// What the error of this operation names.
    remote: u64,
    len: u64,
    /// The local range stays registered (its memory alive) until the provider returns the
    /// operation or its endpoint is closed (one pin per run, shared by its chunks).
    _pin: Arc<OwnedAccess>,
}

/// An operation to post.
struct Post {
    id: u64,
    op: Rma,
    local: u64,
    len: u64,
    region: Arc<FabricRegion>,
    via: Arc<Initiator>,
    remote: Remote,
}

/// The fabric transport as an engine runs it (`tidewire info`).
#[derive(Debug, Clone)]
pub struct FabricMap {
    /// The libfabric provider.
    pub provider: String,
    /// Whether GPU memory can be registered (`FI_HMEM`).
    pub hmem: bool,
    /// Each NIC (domain) and where it sits (PCIe device, NUMA node).
    pub nics: Vec<(String, String)>,
    /// Operations posted on each NIC so far (in `nics` order).
    pub posted: Vec<u64>,
    /// For each GPU and NUMA node: the NICs its buffers are registered with and spread over.
    pub buffers: Vec<(String, Vec<String>)>,
}

/// The engine's fabric endpoints, one per NIC of the chosen provider.
pub(crate) struct Fabric {
    pub(crate) nics: Vec<Nic>,
    pub(crate) facts: FabricFacts,
    /// Whether an endpoint may be closed while the provider holds operations of it. Not over
    /// libfabric's `ofi_rxm` layer (`tcp;ofi_rxm`, `verbs;ofi_rxm`): closing such an endpoint
    /// while a READ is in flight crashed the process inside libfabric 1.17 (`rxm_ep_close`
    /// reads the cancelled operations back and follows a null context); a cancelled batch
    /// then waits for its READs, up to its deadline, before anything is closed.
    closes_held: bool,
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
            // A NIC offered through several utility providers (verbs;ofi_rxm, verbs;ofi_rxd)
            // is listed once per provider: one endpoint each.
            dedupe(&mut d);
            d
        };
        // The tcp and shm providers reach every peer through any one interface: one endpoint,
        // unless NICs are named.
        let one = matches!(provider.as_str(), "tcp" | "shm" | "sockets");
        let wanted: Vec<Option<String>> = if !config.fabric_nics.is_empty() {
            if let Some(n) = config.fabric_nics.iter().find(|n| !domains.contains(n)) {
                return Err(format!(
                    "TIDEWIRE_FABRIC_NICS names {n}, which {provider} does not offer here \
                     (it offers {})",
                    domains.join(", ")
                ));
            }
            let mut named = config.fabric_nics.clone();
            dedupe(&mut named);
            named.into_iter().map(Some).collect()
        } else if one || domains.is_empty() {
            vec![None]
        } else {
            domains.iter().map(|d| Some(d.clone())).collect()
        };
        let mut nics = Vec::new();
        let mut why = Vec::new();
        let mut hmem = true;
        for domain in wanted {
            let domain = domain.as_deref();
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
                        closed: AtomicBool::new(false),
                        backlog: Mutex::default(),
                        inits: Mutex::default(),
                        next_id: AtomicU64::new(1),
                        posted: AtomicU64::new(0),
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
        let closes_held = !nics.iter().any(|n| n.ep.provider.contains("ofi_rxm"));
        let facts = FabricFacts { provider: Ok(provider), hmem };
        Ok(Arc::new(Self { nics, facts, closes_held }))
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

    /// The NICs and, for each GPU and NUMA node of this host, the NICs its buffers use.
    pub(crate) fn map(&self) -> FabricMap {
        let sys = topo::Sysfs::host();
        let places: Vec<&topo::Place> = self.nics.iter().map(|n| &n.place).collect();
        let names =
            |idx: Vec<usize>| idx.into_iter().map(|i| self.nics[i].ep.nic.clone()).collect();
        let mut buffers: Vec<(String, Vec<String>)> = Vec::new();
        if let Ok(t) = tidewire_gpu::topology() {
            for g in &t.gpus {
                let p = topo::gpu_place(&sys, &g.pci_bus_id);
                buffers
                    .push((format!("cuda:{} ({p})", g.index), names(topo::nearest(&places, &p))));
            }
        }
        let mut nodes: Vec<i32> = places.iter().filter_map(|p| p.numa).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for n in &nodes {
            let p = topo::Place { numa: Some(*n), pci: None };
            buffers.push((format!("host memory on NUMA {n}"), names(topo::nearest(&places, &p))));
        }
        if nodes.is_empty() {
            let every = names(topo::nearest(&places, &topo::Place::default()));
            buffers.push(("host memory (no NIC reports a NUMA node)".into(), every));
        }
        FabricMap {
            provider: self.provider().to_string(),
            hmem: self.facts.hmem,
            nics: self.nics.iter().map(|n| (n.ep.nic.clone(), n.place.to_string())).collect(),
            posted: self.nics.iter().map(|n| n.posted.load(Ordering::Relaxed)).collect(),
            buffers,
        }
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
        COMPLETING.with(|c| c.set(true));
        let nic = &self.nics[i];
        let mut done = Vec::new();
        let mut swept = Instant::now();
        let mut idle = 0u32;
        while !life.stopping() {
            if nic.ops.lock().is_empty() {
                // Nothing of ours in flight: sleep in the listening endpoint's queue (which
                // serves peers' RMA into our memory); a submission signals it.
                nic.ep.wait(&mut done, 10);
            } else {
                // Ours in flight: poll every queue, yielding the CPU while nothing comes.
                nic.ep.poll(&mut done);
                for via in nic.initiators() {
                    via.poll(&mut done);
                }
                idle = if done.is_empty() { idle + 1 } else { 0 };
                if idle > 64 {
                    std::thread::sleep(Duration::from_micros(20));
                } else if idle > 0 {
                    std::thread::yield_now();
                }
            }
            for (id, outcome) in done.drain(..) {
                nic.complete(id, outcome, self.provider());
            }
            nic.post_backlog(self.provider());
            if swept.elapsed() >= SWEEP {
                swept = Instant::now();
                nic.sweep(i, Instant::now());
            }
        }
        // Stopping: nothing more is posted here, and every endpoint with operations is closed
        // (the provider drops them), so no NIC writes into memory the engine is about to
        // release.
        {
            let _ops = nic.ops.lock();
            nic.closed.store(true, Ordering::Release);
        }
        let stopping = Error::ShuttingDown { who: "this engine".into() };
        nic.give_up(i, |_, _, _| Some(stopping.clone()));
    }
}

impl Nic {
    /// The open initiator endpoints on this NIC (forgetting the closed and the dropped).
    fn initiators(&self) -> Vec<Arc<Initiator>> {
        let mut inits = self.inits.lock();
        let live: Vec<Arc<Initiator>> = inits.iter().filter_map(Weak::upgrade).collect();
        if live.len() != inits.len() {
            inits.retain(|w| w.strong_count() > 0);
        }
        live
    }

    /// The provider returned operation `id`.
    fn complete(&self, id: u64, outcome: std::result::Result<(), rma::OpError>, provider: &str) {
        let Some(op) = self.ops.lock().remove(&id) else { return };
        match outcome {
            Ok(()) => op.batch.chunk_done(op.req),
            Err(why) => {
                let err = if why.is_refusal() {
                    op.peer.refused();
                    Error::RemoteAccessDenied {
                        peer: op.peer.who.clone(),
                        addr: op.remote,
                        len: op.len,
                        reason: format!(
                            "the {provider} NIC refused the access ({why}): the peer no longer \
                             registers it"
                        ),
                    }
                } else {
                    // The tcp provider may drop the connection instead of answering a key it
                    // does not know: the next request re-reads the descriptor either way.
                    op.peer.refused();
                    failed(&op.peer.who, provider, &why.to_string())
                };
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
        let posted =
            unsafe { p.via.post(p.op, p.local as *mut u8, p.len as usize, mr, p.remote, p.id) };
        if matches!(posted, Ok(true)) {
            self.posted.fetch_add(1, Ordering::Relaxed);
        }
        posted
    }

    /// The provider refused to start operation `id`.
    fn refused(&self, id: u64, provider: &str, why: &str) {
        let op = self.ops.lock().remove(&id);
        if let Some(op) = op {
            op.batch.fail_request(op.req, failed(&op.peer.who, provider, why));
        }
    }

    /// Gives up on operations whose batch's deadline passed, or whose peer died.
    fn sweep(&self, nic: usize, now: Instant) {
        self.give_up(nic, |peer, via, batch| {
            if via.is_closed() {
                return Some(Error::PeerFailed {
                    peer: peer.who.clone(),
                    transport: TransportKind::Fabric,
                    reason: "its endpoint was closed to stop the READs of a batch that failed \
                             or was cancelled while they were in flight"
                        .into(),
                });
            }
            if let Some(err) = peer.dead() {
                return Some(err);
            }
            let deadline = batch.deadline();
            (now >= deadline).then(|| Error::Timeout {
                what: format!(
                    "{} (the {} endpoint to {} is closed)",
                    batch.id,
                    TransportKind::Fabric,
                    peer.who
                ),
                after: now.saturating_duration_since(deadline),
            })
        });
    }

    /// Closes the endpoint of every operation `why` returns an error for: the provider
    /// discards what it held of that endpoint, and every operation it carried (other
    /// batches' to the same peer too) fails with the error and releases its local range.
    fn give_up(&self, nic: usize, why: impl Fn(&FabricPeer, &Initiator, &Batch) -> Option<Error>) {
        // What is in flight, one entry per (endpoint, batch), copied out: `why` may take
        // locks (the peer's connection) that must not nest inside `ops`.
        let seen: Vec<(Arc<Initiator>, Arc<FabricPeer>, Arc<Batch>)> = {
            let ops = self.ops.lock();
            let mut pairs: HashSet<(usize, usize)> = HashSet::new();
            ops.values()
                .filter(|op| {
                    pairs.insert((Arc::as_ptr(&op.via) as usize, Arc::as_ptr(&op.batch) as usize))
                })
                .map(|op| (op.via.clone(), op.peer.clone(), op.batch.clone()))
                .collect()
        };
        let mut closing: Vec<(Arc<Initiator>, Error)> = Vec::new();
        for (via, peer, batch) in seen {
            if closing.iter().any(|(v, _)| Arc::ptr_eq(v, &via)) {
                continue;
            }
            if let Some(err) = why(&peer, &via, &batch) {
                peer.drop_initiator(nic, &via);
                closing.push((via, err));
            }
        }
        for (via, err) in closing {
            tracing::debug!(nic, %err, "closing a peer's fabric endpoint");
            // After this the provider touches none of its operations' buffers.
            via.close();
            self.backlog.lock().retain(|p| !Arc::ptr_eq(&p.via, &via));
            let gone: Vec<InFlight> = {
                let mut ops = self.ops.lock();
                let ids: Vec<u64> = ops
                    .iter()
                    .filter(|(_, o)| Arc::ptr_eq(&o.via, &via))
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter().filter_map(|id| ops.remove(id)).collect()
            };
            for op in gone {
                op.batch.fail_request(op.req, err.clone());
            }
        }
    }
}

/// An operation the provider failed (or would not start), as the engine's error.
fn failed(peer: &PeerRef, provider: &str, why: &str) -> Error {
    Error::PeerFailed {
        peer: peer.clone(),
        transport: TransportKind::Fabric,
        reason: format!("{provider}: {why}"),
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
    /// The engine's view of the instance: broken (its tcp lanes hung up, it restarted)
    /// means its operations will not complete.
    conn: Weak<PeerConn>,
    /// (local NIC, remote endpoint name in hex) → address-vector handle.
    addrs: Mutex<HashMap<(usize, String), u64>>,
    /// The endpoint its operations go out on, per local NIC.
    inits: Mutex<HashMap<usize, Arc<Initiator>>>,
    dead: Mutex<Option<Error>>,
    /// The NICs those endpoints were opened on, kept open until they are closed (declared
    /// after `inits`: dropped after them).
    fabric: Mutex<Option<Arc<Fabric>>>,
}

impl FabricPeer {
    pub(crate) fn new(conn: &Arc<PeerConn>) -> Arc<Self> {
        let who = conn.who();
        Arc::new(Self {
            who,
            conn: Arc::downgrade(conn),
            addrs: Mutex::default(),
            inits: Mutex::default(),
            dead: Mutex::default(),
            fabric: Mutex::default(),
        })
    }

    /// The peer's process exited or its engine closed: its operations fail with `err`.
    pub(crate) fn close(&self, err: Error) {
        self.dead.lock().get_or_insert(err);
    }

    /// Why the instance's operations will not complete: it was closed (its process exited,
    /// our engine stops), or its view broke (its tcp lanes hung up, it restarted).
    fn dead(&self) -> Option<Error> {
        if let Some(e) = self.dead.lock().clone() {
            return Some(e);
        }
        let conn = self.conn.upgrade()?;
        conn.is_broken().then(|| {
            conn.dead().cloned().unwrap_or_else(|| Error::PeerFailed {
                peer: self.who.clone(),
                transport: TransportKind::Fabric,
                reason: "its connections hung up (the process exited, or its engine closed or \
                         restarted)"
                    .into(),
            })
        })
    }

    /// The peer's NIC refused a key of its cached descriptor (or an operation failed while
    /// the peer lives): the next request re-reads the descriptor.
    fn refused(&self) {
        if let Some(c) = self.conn.upgrade() {
            c.mark_stale();
        }
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

    /// The endpoint this peer's operations on NIC `nic` go out on, opened on first use.
    fn initiator(&self, fabric: &Arc<Fabric>, nic: usize) -> Result<Arc<Initiator>> {
        let mut inits = self.inits.lock();
        if let Some(i) = inits.get(&nic) {
            return Ok(i.clone());
        }
        let i = fabric.nics[nic].ep.initiator().map_err(|why| Error::PeerFailed {
            peer: self.who.clone(),
            transport: TransportKind::Fabric,
            reason: format!("opening an endpoint on {}: {why}", fabric.nics[nic].ep.nic),
        })?;
        let i = Arc::new(i);
        inits.insert(nic, i.clone());
        self.fabric.lock().get_or_insert_with(|| fabric.clone());
        fabric.nics[nic].inits.lock().push(Arc::downgrade(&i));
        Ok(i)
    }

    /// Forgets `via` (being closed): the next operation on NIC `nic` opens a fresh one.
    fn drop_initiator(&self, nic: usize, via: &Arc<Initiator>) {
        let mut inits = self.inits.lock();
        if inits.get(&nic).is_some_and(|i| Arc::ptr_eq(i, via)) {
            inits.remove(&nic);
        }
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
        self.batch.mark(Mark::FirstByte);
        if self.runs.iter().any(|r| requests[r.from..r.end].iter().any(|q| q.op == Op::Read)) {
            // The NICs write READ data straight into local memory: a failure of the batch
            // stops them before it is visible.
            self.batch.add_fence(Arc::new(ReadFence { fabric: self.t.fabric.clone() }));
        }
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
        // The region planned, not another one registered at its address since (its keys).
        let region =
            conn.find(step.region.addr, 1).filter(|r| r.id == step.region.id).ok_or_else(|| {
                Error::RemoteAccessDenied {
                    peer: conn.who(),
                    addr: requests[run.from].remote,
                    len: requests[run.from].len,
                    reason: format!(
                        "{} was unregistered or replaced after the request was planned",
                        step.region.id
                    ),
                }
            })?;
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
        // One pin for the run, taken without waiting: an unregistration waiting for the
        // region's accesses to end makes the run fail rather than queue behind it.
        let pin = Arc::new(
            step.local
                .try_access_owned()
                .ok_or(Error::NotRegistered { addr: step.local.addr, len: step.local.len })?,
        );
        // Pinned: its registrations stay open until the pin is released.
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
                let via = peer.initiator(fabric, nic)?;
                let id = fabric.nics[nic].next_id.fetch_add(1, Ordering::Relaxed);
                let remote = Remote {
                    peer: fi_addr,
                    addr: base + (r.remote + off - region.addr),
                    key: *key,
                };
                let post = Post {
                    id,
                    op: if r.op == Op::Write { Rma::Write } else { Rma::Read },
                    local: r.local + off,
                    len: n,
                    region: local.clone(),
                    via: via.clone(),
                    remote,
                };
                let op = InFlight {
                    batch: self.batch.clone(),
                    req,
                    peer: peer.clone(),
                    via,
                    read: r.op == Op::Read,
                    remote: r.remote + off,
                    len: n,
                    _pin: pin.clone(),
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
                if nic.closed.load(Ordering::Acquire) {
                    // Its completion thread stopped: nothing would ever complete them.
                    drop(ops);
                    return Err(Error::ShuttingDown { who: "this engine".into() });
                }
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
            // The completion thread may be asleep in the listening queue: it polls now.
            nic.ep.signal();
        }
        Ok(())
    }
}

/// Keeps the first of each name, in order.
fn dedupe(names: &mut Vec<String>) {
    let mut seen = HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
}

/// Stops a failing batch's READs on the fabric (see [`Fence`]): what waits in a backlog is
/// never posted; what the NICs hold is waited for up to [`FENCE_WAIT`] (up to the batch's
/// deadline where the provider cannot close an endpoint that holds operations; never on a
/// completion thread, which cannot wait for itself), then its endpoints are closed: the
/// provider discards the operations, and the completion threads fail what else those
/// endpoints carried, naming why.
struct ReadFence {
    fabric: Arc<Fabric>,
}

impl Fence for ReadFence {
    fn stop(&self, batch: &Batch, reqs: Option<&[Range<usize>]>) {
        let hit = |op: &InFlight| {
            op.read
                && std::ptr::eq(Arc::as_ptr(&op.batch), batch)
                && reqs.is_none_or(|rs| rs.iter().any(|r| r.contains(&op.req)))
        };
        for nic in &self.fabric.nics {
            let mut ops = nic.ops.lock();
            nic.backlog.lock().retain(|p| match ops.get(&p.id) {
                Some(op) if hit(op) => {
                    ops.remove(&p.id);
                    false
                }
                _ => true,
            });
        }
        let until = if self.fabric.closes_held {
            Instant::now() + FENCE_WAIT
        } else {
            batch.deadline().max(Instant::now() + FENCE_WAIT)
        };
        let waits = !COMPLETING.with(Cell::get);
        loop {
            let mut held: Vec<(usize, Arc<Initiator>, Arc<FabricPeer>)> = Vec::new();
            for (i, nic) in self.fabric.nics.iter().enumerate() {
                for op in nic.ops.lock().values().filter(|op| hit(op)) {
                    if !held.iter().any(|(_, v, _)| Arc::ptr_eq(v, &op.via)) {
                        held.push((i, op.via.clone(), op.peer.clone()));
                    }
                }
            }
            if held.is_empty() {
                return;
            }
            if !waits || Instant::now() >= until {
                for (i, via, peer) in held {
                    tracing::debug!(
                        nic = i,
                        batch = batch.id.0,
                        "closing a fabric endpoint to stop READs"
                    );
                    peer.drop_initiator(i, &via);
                    via.close();
                }
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dedupe;

    #[test]
    fn a_nic_listed_by_two_utility_providers_gets_one_endpoint() {
        let mut d: Vec<String> =
            ["mlx5_0", "mlx5_1", "mlx5_0", "mlx5_1"].iter().map(|s| s.to_string()).collect();
        dedupe(&mut d);
        assert_eq!(d, ["mlx5_0", "mlx5_1"]);
    }
}
