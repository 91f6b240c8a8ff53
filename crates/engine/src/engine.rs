//! The engine: lifecycle, registration, peers, batch submission and transport dispatch.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewire_core::descriptor::{Reach, RegionDescriptor, SegmentDescriptor, DESCRIPTOR_VERSION};
use tidewire_core::memory::{Location, LocationHint, MemoryKind};
use tidewire_core::paged::LayoutDescriptor;
use tidewire_core::select::{
    self, executing_gpu, nvlink_reach, Choice, Endpoints, FabricFacts, GpuFacts, Refusal,
    TransportKind,
};
use tidewire_core::wire::{encode_strings, FrameKind, Header};
use tidewire_core::{BatchId, HostId, InstanceId, PeerId, RegionId};

use crate::batch::{Batch, BatchHandle, Mark, RunMeta, TrailerRoute};
use crate::config::{Credentials, Deadlines, EngineConfig};
use crate::error::{Error, PeerRef, Result};
use crate::guard::Guard;
use crate::lifecycle::Lifecycle;
use crate::mapped;
use crate::mem::HostBuffer;
use crate::metadata::{resolve, Metadata};
use crate::notify::{Notification, NotifyQueue};
use crate::peer::{exited, MapCount, PeerConn, RegionRef};
use crate::registry::{NewRegion, RegionEntry, Registry};
pub use crate::request::{Op, Request};
use crate::request::{RemoteRegion, Step};
use crate::transport::fabric::{Fabric, FabricTransport};
use crate::transport::memory::{LocalTransport, ShmTransport};
use crate::transport::nvlink::{self, GpuRoute, NvlinkTransport};
use crate::transport::shm::{self, SharedRegion, ShmServer};
use crate::transport::tcp::{self, TcpTransport};
use crate::transport::{BatchCtx, LayerPages, Submission, Transports};
use crate::watch::{self, Watch};
use crate::{hostinfo, liveness, mem, rpc};

/// Options of one batch.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// `(name, message)` delivered to the peer's notification queue after all the batch's
    /// data is visible there. Every request of the batch must target the same peer.
    pub notify: Option<(String, String)>,
    /// Overrides the batch deadline (default: transfer deadline + 1 ns per byte).
    pub timeout: Option<Duration>,
    /// A caller's `CUstream` (in the primary context): GPU copies start after the work
    /// queued on it so far (an event, not a host sync).
    pub stream: Option<u64>,
    /// A caller's `CUstream` that waits for the batch's GPU copies (an event, no host round
    /// trip): work queued on it after `submit` returns sees every byte. Requests over `local`
    /// and `shm` are copied before `submit` returns; a batch with a `tcp` request is refused
    /// (its bytes land on a host thread, which a stream cannot wait for). The host-side
    /// status is kept as without it.
    pub complete_on: Option<u64>,
}

/// The transport decision for one of a peer's regions.
#[derive(Debug, Clone)]
pub struct TransportReport {
    pub region: RegionDescriptor,
    pub decision: std::result::Result<Choice, Vec<Refusal>>,
}

/// What `tidewire info --peer` prints.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub descriptor: Arc<SegmentDescriptor>,
    pub same_engine: bool,
    pub same_host: bool,
    pub regions: Vec<TransportReport>,
}

pub(crate) struct PeerSlot {
    pub(crate) name: String,
    pub(crate) conn: Option<Arc<PeerConn>>,
    /// Set when the peer instance was retired (its process exited, it restarted, it left
    /// the metadata store); cleared when a new instance is reached.
    pub(crate) retired: Option<Retired>,
}

/// A retired peer instance: why, and the count of its mappings still held (by copies that
/// were in flight), which drops to zero as they complete.
#[derive(Clone)]
pub(crate) struct Retired {
    instance: InstanceId,
    error: Error,
    /// The process is gone: a descriptor still naming this instance is stale.
    exited: bool,
    mappings: MapCount,
}

/// What [`Engine::peers`] reports for each peer opened by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub id: PeerId,
    pub name: String,
    /// The instance last reached.
    pub instance: InstanceId,
    pub state: PeerState,
    /// Mappings of this instance's memory held in this process (shm mappings, revocation
    /// pages, GPU imports), including those held by copies still in flight.
    pub mappings: usize,
    /// How a copy into this peer's memory on this host (shm, NVLink) learns that the peer's
    /// process is gone; `None` while no shm attachment is open to it.
    pub death_check: Option<DeathCheck>,
}

/// How the engine checks, after copying into a same-host peer's memory, that the bytes went
/// to a live process ("done" means visible to the peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCheck {
    /// A load of the word the peer's engine holds as a robust mutex: the kernel marks it
    /// when the holder's process dies, before it closes the process's sockets.
    Word,
    /// A peek at the peer's shm socket (a system call per run): the peer offered no word.
    SocketPeek,
}

/// Whether a peer opened by name is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Reachable as far as this engine knows.
    Open,
    /// Retired: the next request re-reads its descriptor and reaches a new instance if there
    /// is one, else fails with this error.
    Retired(Error),
}

#[derive(Default)]
pub(crate) struct Peers {
    by_name: HashMap<String, PeerId>,
    pub(crate) slots: Vec<PeerSlot>,
}

pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) instance: InstanceId,
    host_id: HostId,
    hostname: String,
    rpc_addr: SocketAddr,
    pub(crate) config: EngineConfig,
    /// Who may connect: the cluster secret, the shm uid check, the refusals counted.
    pub(crate) guard: Arc<Guard>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) notifications: Arc<NotifyQueue>,
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) metadata: Metadata,
    shm: std::result::Result<Arc<ShmServer>, String>,
    shared_allocs: Mutex<HashMap<u64, Arc<SharedRegion>>>,
    device_allocs: Mutex<Vec<u64>>,
    /// This process's GPUs, for selection and export.
    pub(crate) gpu_facts: GpuFacts,
    /// The fabric NICs this engine registers memory with, if any.
    pub(crate) fabric: Option<Arc<Fabric>>,
    /// What selection knows of them (the provider, or why there is none).
    pub(crate) fabric_facts: FabricFacts,
    /// The transports, by the kinds they serve.
    transports: Transports,
    pub(crate) peers: Mutex<Peers>,
    /// Paged layouts registered over this engine's regions (published with the descriptor).
    pub(crate) layouts: Mutex<Vec<LayoutDescriptor>>,
    /// Peer hang-ups and batch deadlines.
    pub(crate) watch: Arc<Watch>,
    next_batch: AtomicU64,
    stopped: AtomicBool,
}

/// Warns, once per process, that an engine serves its memory on a non-loopback address to
/// anyone who reaches it.
fn warn_exposed(addr: SocketAddr) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        log::warn!(
            "the RPC port {addr} is not on loopback and no cluster secret is set: anyone who \
             reaches it can read and write this engine's registered memory \
             (set TIDEWIRE_CLUSTER_SECRET or TIDEWIRE_CLUSTER_SECRET_FILE on every engine)"
        );
    });
}

impl Inner {
    /// What this engine's handshakes prove.
    pub(crate) fn creds(&self) -> Credentials {
        Credentials { secret: self.config.cluster_secret.clone(), me: self.instance }
    }

    /// Retires a peer instance: its view is dropped from the peer table (so nothing new
    /// uses it), its connections close (requests in flight fail with `err`) and every
    /// mapping of its memory is released once the copies using it have finished. `exited`:
    /// the process is gone, so a descriptor naming this instance is stale.
    pub(crate) fn retire(&self, conn: &Arc<PeerConn>, err: Error, exited: bool) {
        if exited {
            conn.mark_dead(err.clone());
        } else {
            conn.mark_broken();
        }
        let retired = Retired {
            instance: conn.instance(),
            error: err.clone(),
            exited,
            mappings: conn.mappings.clone(),
        };
        let found = {
            let mut peers = self.peers.lock();
            let slot = peers
                .slots
                .iter_mut()
                .find(|s| s.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)));
            match slot {
                Some(slot) => {
                    slot.conn = None;
                    slot.retired = Some(retired);
                    true
                }
                None => false,
            }
        };
        if found {
            log::info!("{}: {err}; its mappings are released", self.name);
        }
        conn.close(err);
    }

    /// What `Engine::peers` reports.
    pub(crate) fn peers(&self) -> Vec<PeerStatus> {
        let peers = self.peers.lock();
        // Counts what is really mapped: regions a peer revoked are unmapped first.
        for conn in peers.slots.iter().filter_map(|s| s.conn.as_ref()) {
            conn.sweep_shm();
        }
        peers
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let id = PeerId(i as u32);
                let name = slot.name.clone();
                match (&slot.conn, &slot.retired) {
                    (Some(c), _) => PeerStatus {
                        id,
                        name,
                        instance: c.instance(),
                        state: match c.dead() {
                            Some(e) => PeerState::Retired(e.clone()),
                            None => PeerState::Open,
                        },
                        mappings: c.mappings.get(),
                        death_check: c.death_check(),
                    },
                    (None, Some(r)) => PeerStatus {
                        id,
                        name,
                        instance: r.instance,
                        state: PeerState::Retired(r.error.clone()),
                        mappings: r.mappings.get(),
                        death_check: None,
                    },
                    // Connections are dropped only by shutdown.
                    (None, None) => PeerStatus {
                        id,
                        name,
                        instance: InstanceId(0),
                        state: PeerState::Retired(Error::ShuttingDown {
                            who: format!("engine {}", self.name),
                        }),
                        mappings: 0,
                        death_check: None,
                    },
                }
            })
            .collect()
    }

    /// A watched socket of `conn` hung up: its process exited (or its engine shut down).
    pub(crate) fn on_hang_up(&self, conn: &Arc<PeerConn>, channel: TransportKind) {
        let transport = conn.gpu_transport().unwrap_or(channel);
        let err = conn.dead().cloned().unwrap_or_else(|| {
            exited(&conn.who(), transport, &format!("its {channel} socket hung up"))
        });
        self.retire(conn, err, true);
    }

    pub(crate) fn descriptor(&self) -> SegmentDescriptor {
        let (generation, mut regions) = self.registry.snapshot();
        if self.shm.is_err() {
            // Without the shm socket no peer can fetch a memfd: shared memory is offered to
            // tcp alone (it is host memory), never as a reach nobody can use.
            for r in &mut regions {
                r.reach.retain(|x| !matches!(x, Reach::Shm | Reach::VmmFd { .. }));
            }
        }
        SegmentDescriptor {
            version: DESCRIPTOR_VERSION,
            name: self.name.clone(),
            instance_id: self.instance,
            host_id: self.host_id.clone(),
            hostname: self.hostname.clone(),
            rpc_addr: self.rpc_addr.to_string(),
            shm_socket: self.shm.is_ok().then(|| shm::socket_name(self.instance)),
            generation,
            regions,
            layouts: self.layouts.lock().clone(),
        }
    }
}

/// One transfer engine per process (or several, for tests). Shut down on drop.
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl Engine {
    /// Starts an engine: binds the RPC port, starts the shm server, publishes the descriptor.
    /// The configuration is used as given; apply the environment with
    /// [`EngineConfig::from_env`] first where `MC_*` variables should count.
    pub fn new(config: EngineConfig) -> Result<Self> {
        if config.tcp_lanes == 0 {
            return Err(Error::Config { reason: "tcp_lanes must be at least 1".into() });
        }
        if let Some(addr) = &config.metrics_addr {
            crate::metrics::serve(addr)?;
        }
        crate::trace::init_from_env();
        let metadata = Metadata::new(
            &config.metadata,
            &config.cluster_id,
            config.metadata_ttl,
            &config.deadlines,
        )?;
        metadata.check_reachable()?;
        let listener = rpc::bind(&config)?;
        let rpc_addr =
            listener.local_addr().map_err(|e| Error::io("reading the bound RPC address", &e))?;
        if config.cluster_secret.is_none() && !rpc_addr.ip().is_loopback() {
            warn_exposed(rpc_addr);
        }
        let name = match (&config.metadata, &config.name) {
            (_, Some(n)) if !n.is_empty() => n.clone(),
            _ => rpc_addr.to_string(),
        };
        let instance = InstanceId(rand::random::<u128>() | 1);
        let guard = Arc::new(Guard::new(
            config.cluster_secret.clone(),
            instance,
            config.shm_any_uid,
            config.deadlines.handshake,
        ));
        let life = Arc::new(Lifecycle::default());
        let registry = Arc::new(Registry::default());
        let shm = if config.enable_shm && config.transports.enabled.contains(&TransportKind::Shm) {
            ShmServer::start(
                &shm::socket_name(instance),
                registry.clone(),
                guard.clone(),
                &life,
                config.shm_liveness_word,
            )
            .map_err(|e| e.to_string())
        } else {
            Err("disabled by configuration".into())
        };
        if let Err(reason) = &shm {
            log::info!("{name}: shm transport off: {reason}");
        }
        let watch = Watch::new()?;
        let gpu_facts = nvlink::gpu_facts();
        let mut transports = Transports::default();
        transports.add(Box::new(LocalTransport::new(registry.clone())));
        transports.add(Box::new(ShmTransport::new(config.clone())));
        transports.add(Box::new(TcpTransport::new(config.clone(), life.clone())));
        match &gpu_facts.available {
            Ok(()) => transports.add(Box::new(NvlinkTransport::start(&life, config.clone())?)),
            Err(reason) => log::debug!("{name}: GPU transports off: {reason}"),
        }
        let (fabric, fabric_facts) = match Fabric::open(&config) {
            Ok(f) => {
                f.start(&life)?;
                let nics: Vec<&str> = f.nics.iter().map(|n| n.ep.nic.as_str()).collect();
                log::info!("{name}: fabric transport on {} ({})", f.provider(), nics.join(", "));
                let facts = f.facts.clone();
                transports.add(Box::new(FabricTransport::new(
                    f.clone(),
                    config.clone(),
                    life.clone(),
                )));
                (Some(f), facts)
            }
            Err(reason) => {
                log::info!(
                    "{name}: fabric transport off (tcp carries transfers across hosts): {reason}"
                );
                (None, FabricFacts::none(&reason))
            }
        };
        let inner = Arc::new(Inner {
            name,
            instance,
            host_id: hostinfo::host_id(),
            hostname: hostinfo::hostname(),
            rpc_addr,
            config,
            guard,
            registry,
            notifications: Arc::default(),
            life,
            metadata,
            shm,
            shared_allocs: Mutex::default(),
            device_allocs: Mutex::default(),
            gpu_facts,
            fabric,
            fabric_facts,
            transports,
            peers: Mutex::default(),
            layouts: Mutex::default(),
            watch,
            next_batch: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
        });
        crate::metrics::watch_engine(&inner);
        let engine = Engine { inner: inner.clone() };
        let i2 = inner.clone();
        inner.life.spawn("tw-rpc-accept".into(), move || rpc::accept_loop(i2, listener))?;
        let i3 = inner.clone();
        inner.life.spawn("tw-watch".into(), move || watch::watch_loop(&i3))?;
        engine.claim_name()?;
        engine.publish()?;
        if inner.metadata.is_leased() {
            let i2 = inner.clone();
            inner.life.spawn("tw-meta-keeper".into(), move || liveness::keeper_loop(&i2))?;
            let i3 = inner.clone();
            inner.life.spawn("tw-meta-watch".into(), move || liveness::watch_loop(&i3))?;
        }
        log::info!(
            "{}: engine started (instance {}, rpc {})",
            inner.name,
            inner.instance,
            inner.rpc_addr
        );
        Ok(engine)
    }

    /// With a metadata server, refuses a name a live engine already publishes; a stale entry
    /// (its engine no longer answers as that instance) is replaced.
    fn claim_name(&self) -> Result<()> {
        let me = &self.inner;
        let key = me.metadata.key(&me.name);
        let Some(raw) = me.metadata.get_raw(&key)? else {
            return Ok(());
        };
        let Ok(old) = SegmentDescriptor::from_json(&raw) else {
            log::warn!(
                "{}: replacing a value that is not a tidewire descriptor under {key}",
                me.name
            );
            return Ok(());
        };
        let alive = resolve(&old.rpc_addr)
            .and_then(|addr| {
                let peer = PeerRef::named(old.name.clone());
                tcp::handshake(&peer, addr, None, &me.config.deadlines, &me.creds())
            })
            .is_ok_and(|(_, id)| id == old.instance_id);
        if alive && old.instance_id != me.instance {
            return Err(Error::NameInUse { name: me.name.clone(), rpc_addr: old.rpc_addr });
        }
        Ok(())
    }

    pub(crate) fn publish(&self) -> Result<()> {
        self.inner.metadata.publish(&self.inner.descriptor())
    }

    /// The segment name peers open this engine by.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The bound RPC/data address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.inner.rpc_addr
    }

    pub fn instance_id(&self) -> InstanceId {
        self.inner.instance
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The fingerprint of the cluster secret in force (`None`: no secret; anyone who reaches
    /// the RPC port or the shm socket may use this engine's registered memory).
    pub fn cluster_secret_fingerprint(&self) -> Option<String> {
        self.inner.guard.secret.as_ref().map(|s| s.fingerprint())
    }

    /// Connections refused so far, at every entry point (no or another cluster secret, a
    /// process of another uid on the shm socket).
    pub fn refused_connections(&self) -> u64 {
        self.inner.guard.refusals()
    }

    /// This engine's descriptor as peers see it.
    pub fn descriptor(&self) -> SegmentDescriptor {
        self.inner.descriptor()
    }

    /// Whether the shm transport is serving, and why not.
    pub fn shm_status(&self) -> std::result::Result<(), String> {
        self.inner.shm.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    pub(crate) fn check_running(&self) -> Result<()> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown { who: format!("engine {}", self.inner.name) });
        }
        Ok(())
    }

    /// Registers `[addr, addr+len)` so peers may read and write it.
    ///
    /// # Safety
    /// The range must be valid, mapped memory that stays so until [`Engine::unregister`]
    /// returns for it (or the engine shuts down). Peers write into it at any time while it
    /// is registered.
    #[allow(unsafe_code)]
    pub unsafe fn register(&self, addr: u64, len: u64, location: &str) -> Result<RegionId> {
        // SAFETY: forwarded contract.
        let ids = unsafe { self.register_batch(&[(addr, len)], location)? };
        ids.into_iter().next().ok_or(Error::Internal("one registration returned no id"))
    }

    /// Registers several ranges, all or none.
    ///
    /// # Safety
    /// As for [`Engine::register`], for every range.
    #[allow(unsafe_code)]
    pub unsafe fn register_batch(
        &self,
        ranges: &[(u64, u64)],
        location: &str,
    ) -> Result<Vec<RegionId>> {
        self.check_running()?;
        let hint = LocationHint::parse(location)?;
        let mut news = Vec::with_capacity(ranges.len());
        for &(addr, len) in ranges {
            let found = tidewire_gpu::classify(addr, len);
            if let Some(detail) = hint.contradiction(found) {
                return Err(Error::LocationMismatch { addr, detail });
            }
            let gpu = self.export_gpu(addr, len, found);
            news.push(NewRegion::user(addr, len, found, gpu, None));
        }
        self.register_new(news)
    }

    /// Registers a buffer the engine keeps alive while it is registered: the safe form of
    /// [`Engine::register`].
    pub fn register_buffer(&self, buffer: Arc<HostBuffer>, location: &str) -> Result<RegionId> {
        let (addr, len) = (buffer.addr(), buffer.len() as u64);
        // SAFETY: the range is exactly the buffer's allocation, which the registry keeps alive
        // (it owns an `Arc` of it) until the region is unregistered.
        #[allow(unsafe_code)]
        unsafe {
            self.register_with_owner(addr, len, location, buffer)
        }
    }

    /// Registers `[addr, addr+len)` and keeps `owner` alive until the region is unregistered
    /// (for memory owned by another runtime, such as a Python object).
    ///
    /// # Safety
    /// The range must be valid, writable memory for as long as `owner` is alive.
    #[allow(unsafe_code)]
    pub unsafe fn register_with_owner(
        &self,
        addr: u64,
        len: u64,
        location: &str,
        owner: Arc<dyn Send + Sync>,
    ) -> Result<RegionId> {
        self.check_running()?;
        let found = tidewire_gpu::classify(addr, len);
        if let Some(detail) = LocationHint::parse(location)?.contradiction(found) {
            return Err(Error::LocationMismatch { addr, detail });
        }
        let gpu = self.export_gpu(addr, len, found);
        let region = NewRegion::user(addr, len, found, gpu, Some(owner));
        let ids = self.register_new(vec![region])?;
        ids.into_iter().next().ok_or(Error::Internal("one registration returned no id"))
    }

    /// Exports device memory for the GPU transports; `None` (logged with the reason) leaves
    /// the region reachable by no transport, so requests on it fail at submit with reasons.
    fn export_gpu(&self, addr: u64, len: u64, found: Location) -> Option<Arc<nvlink::GpuRegion>> {
        if !matches!(found.kind, MemoryKind::Device | MemoryKind::DeviceVmm) {
            return None;
        }
        if let Err(why) = &self.inner.shm {
            log::warn!(
                "{}: {addr:#x} is not exported: GPU revocation needs the shm socket ({why})",
                self.inner.name
            );
            return None;
        }
        match nvlink::export(addr, len, found, &self.inner.gpu_facts) {
            Ok(g) => Some(Arc::new(g)),
            Err(why) => {
                log::warn!("{}: {addr:#x} ({found}) is not exported: {why}", self.inner.name);
                None
            }
        }
    }

    /// Where this process serves its Prometheus metrics, if it does.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        crate::metrics::served()
    }

    /// The fabric transport as this engine runs it (provider, NICs, the buffer → NIC map), or
    /// why it has none.
    pub fn fabric_map(&self) -> std::result::Result<crate::transport::fabric::FabricMap, String> {
        match (&self.inner.fabric, &self.inner.fabric_facts.provider) {
            (Some(f), _) => Ok(f.map()),
            (None, Err(why)) => Err(why.clone()),
            (None, Ok(_)) => Err("not started".into()),
        }
    }

    /// Copies `data` into this engine's registered memory at `addr` (the range must lie
    /// inside one registered region).
    pub fn write_local(&self, addr: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let entry =
            self.inner.registry.find(addr, len).ok_or(Error::NotRegistered { addr, len })?;
        let dst = entry.pin(addr, len).ok_or(Error::NotRegistered { addr, len })?;
        mem::copy_from_slice(&dst, data);
        Ok(())
    }

    /// Copies `len` bytes of this engine's registered memory at `addr`.
    pub fn read_local(&self, addr: u64, len: u64) -> Result<Vec<u8>> {
        let entry =
            self.inner.registry.find(addr, len).ok_or(Error::NotRegistered { addr, len })?;
        let src = entry.pin(addr, len).ok_or(Error::NotRegistered { addr, len })?;
        Ok(mem::copy_to_vec(&src))
    }

    /// The first registered region of this engine, if any (address, length).
    pub fn first_region(&self) -> Option<(u64, u64)> {
        self.inner.registry.snapshot().1.first().map(|r| (r.addr, r.len))
    }

    fn register_new(&self, mut news: Vec<NewRegion>) -> Result<Vec<RegionId>> {
        let addrs: Vec<u64> = news.iter().map(|n| n.addr).collect();
        if let Some(fabric) = &self.inner.fabric {
            for n in &mut news {
                match fabric.register(n.addr, n.len, n.location) {
                    Ok(f) => n.fabric = Some(f),
                    // Still reachable by the other transports; the fabric's refusal names it.
                    Err(why) => log::warn!(
                        "{}: {:#x} is not reachable over the fabric: {why}",
                        self.inner.name,
                        n.addr
                    ),
                }
            }
        }
        let ids = self.inner.registry.register(news)?;
        if let Err(e) = self.publish() {
            let _ = self.inner.registry.unregister(&addrs);
            return Err(e);
        }
        Ok(ids)
    }

    /// Unregisters the region starting at `addr`. Returns once no transfer touches it; peers'
    /// later requests to it fail with `RemoteAccessDenied`.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.unregister_batch(&[addr])
    }

    /// Unregisters several regions (all must be registered).
    pub fn unregister_batch(&self, addrs: &[u64]) -> Result<()> {
        let removed = self.inner.registry.unregister(addrs)?;
        self.revoke_shared(&removed)?;
        self.publish()
    }

    fn revoke_shared(&self, removed: &[Arc<RegionEntry>]) -> Result<()> {
        match self.revoke_each(removed).into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Revokes every region of `removed` that peers may map, each logged if it fails: the
    /// address and error of each that did not (a peer may still hold it).
    fn revoke_each(&self, removed: &[Arc<RegionEntry>]) -> Vec<(u64, Error)> {
        // Without an shm server no same-host initiator is attached; peers on other hosts may
        // still hold marks taken over RPC.
        let attached = || self.inner.shm.as_ref().map_or([false; shm::SLOTS], |s| s.attached());
        let mut failed = Vec::new();
        for entry in removed {
            let Some(shared) = entry.control() else { continue };
            if let Err(e) = shared.revoke(&attached, self.inner.config.deadlines.stall) {
                log::error!("{}: {e}", self.inner.name);
                failed.push((entry.addr, e));
            }
        }
        failed
    }

    /// Allocates `len` bytes of shareable host memory (a memfd) and registers it; same-host
    /// peers reach it through shm, others through tcp. Freed by [`Engine::free_shared`] or
    /// when the engine is dropped.
    pub fn allocate_shared(&self, len: u64) -> Result<u64> {
        self.check_running()?;
        if len == 0 {
            return Err(Error::InvalidArgument { reason: "zero-length shared allocation".into() });
        }
        let region = Arc::new(SharedRegion::allocate(len)?);
        let addr = region.data_addr();
        let location = Location { kind: MemoryKind::HostShared, device: None };
        self.register_new(vec![NewRegion {
            addr,
            len,
            location,
            shared: Some(region.clone()),
            gpu: None,
            fabric: None,
            owner: None,
        }])?;
        self.inner.shared_allocs.lock().insert(addr, region);
        Ok(addr)
    }

    /// Allocates `len` bytes of transferable memory on CUDA device `device` (or pinned host
    /// memory with `AllocKind::HostPinned`) and registers it. `kind: None` takes the best reach
    /// the topology proves: a FABRIC-exportable VMM allocation when the fabric probe passed,
    /// else a POSIX-FD VMM allocation, else `cuMemAlloc`. Returns the allocation (its kind and
    /// why). Freed by [`Engine::free_device`] or when the engine shuts down.
    pub fn allocate_device(
        &self,
        len: u64,
        device: u32,
        kind: Option<tidewire_gpu::alloc::AllocKind>,
    ) -> Result<tidewire_gpu::alloc::Allocation> {
        self.check_running()?;
        let a = tidewire_gpu::alloc::alloc_device(len, device, kind)
            .map_err(|e| Error::gpu(format!("allocating {len} bytes on cuda:{device}"), e))?;
        let hint = if a.device.is_some() { format!("cuda:{device}") } else { "cpu".into() };
        // SAFETY: the allocation spans at least `len` bytes and is freed only by `free_device`
        // or shutdown, both after unregistering it.
        #[allow(unsafe_code)]
        let registered = unsafe { self.register(a.ptr, len, &hint) };
        if let Err(e) = registered {
            if let Err(f) = tidewire_gpu::alloc::free(a.ptr) {
                log::error!(
                    "{}: freeing {:#x} after a failed registration: {f}",
                    self.name(),
                    a.ptr
                );
            }
            return Err(e);
        }
        self.inner.device_allocs.lock().push(a.ptr);
        Ok(a)
    }

    /// Unregisters (if still registered) and frees an allocation of [`Engine::allocate_device`].
    pub fn free_device(&self, addr: u64) -> Result<()> {
        let mut allocs = self.inner.device_allocs.lock();
        let Some(i) = allocs.iter().position(|&a| a == addr) else {
            return Err(Error::InvalidArgument {
                reason: format!("{addr:#x} is not a device allocation of this engine"),
            });
        };
        allocs.swap_remove(i);
        drop(allocs);
        if self.inner.registry.find(addr, 1).is_some_and(|e| e.addr == addr) {
            self.unregister(addr)?;
        }
        tidewire_gpu::alloc::free(addr).map_err(|e| Error::gpu(format!("freeing {addr:#x}"), e))
    }

    /// Unregisters (if still registered) and frees a shared allocation.
    pub fn free_shared(&self, addr: u64) -> Result<()> {
        if !self.inner.shared_allocs.lock().contains_key(&addr) {
            return Err(Error::InvalidArgument {
                reason: format!("{addr:#x} is not a shared allocation of this engine"),
            });
        }
        if self.inner.registry.find(addr, 1).is_some_and(|e| e.addr == addr) {
            self.unregister(addr)?;
        }
        self.inner.shared_allocs.lock().remove(&addr);
        Ok(())
    }

    /// Opens a peer segment by name (fetching its descriptor now) and returns its handle.
    /// Opening the same name again returns the same handle.
    pub fn open_segment(&self, name: &str) -> Result<PeerId> {
        self.open_segment_with(name, &self.inner.config.deadlines)
    }

    /// [`Engine::open_segment`] within `limit` (a caller's own deadline, such as a process
    /// group's timeout): each step of fetching the descriptor (connect, hello, request) gets at
    /// most a third of it, and never more than the engine's own deadline for that step.
    pub fn open_segment_within(&self, name: &str, limit: Duration) -> Result<PeerId> {
        let own = self.inner.config.deadlines;
        // (At least a millisecond: a zero connect timeout is refused as an invalid argument.)
        let step = (limit / 3).max(Duration::from_millis(1));
        let deadlines =
            Deadlines { connect: own.connect.min(step), handshake: own.handshake.min(step), ..own };
        self.open_segment_with(name, &deadlines)
    }

    fn open_segment_with(&self, name: &str, deadlines: &Deadlines) -> Result<PeerId> {
        self.check_running()?;
        let known = self.inner.peers.lock().by_name.get(name).copied();
        if let Some(id) = known {
            self.peer(id)?;
            return Ok(id);
        }
        let desc = self.fetch_descriptor_with(name, deadlines)?;
        let mut peers = self.inner.peers.lock();
        if let Some(&id) = peers.by_name.get(name) {
            return Ok(id);
        }
        let id = PeerId(
            u32::try_from(peers.slots.len()).map_err(|_| Error::Internal("too many peers"))?,
        );
        let conn = self.peer_conn(id, name, desc);
        peers.slots.push(PeerSlot { name: name.to_string(), conn: Some(conn), retired: None });
        peers.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    pub(crate) fn fetch_descriptor(&self, name: &str) -> Result<SegmentDescriptor> {
        self.fetch_descriptor_with(name, &self.inner.config.deadlines)
    }

    fn fetch_descriptor_with(
        &self,
        name: &str,
        deadlines: &Deadlines,
    ) -> Result<SegmentDescriptor> {
        if name == self.inner.name {
            return Ok(self.inner.descriptor());
        }
        self.inner.metadata.fetch(name, deadlines, &self.inner.creds())
    }

    /// A new view of peer `id` (named `name`) from its descriptor `desc`.
    fn peer_conn(&self, id: PeerId, name: &str, desc: SegmentDescriptor) -> Arc<PeerConn> {
        let me = &self.inner;
        PeerConn::new(id, name.to_string(), desc, me.instance, &me.host_id, me.watch.clone())
    }

    /// The current connection state of a peer, re-opened when broken or restarted. A peer
    /// whose process exited stays failed (with that reason) until its name leads to a new
    /// instance; a broken view that cannot be re-opened is retired (its mappings released).
    pub(crate) fn peer(&self, id: PeerId) -> Result<Arc<PeerConn>> {
        let unknown =
            || Error::InvalidArgument { reason: format!("{id} was not returned by open_segment") };
        let usable = |c: &Option<Arc<PeerConn>>| c.as_ref().filter(|c| !c.is_broken()).cloned();
        // Every request comes here: the open view without copying the slot's name.
        let existing =
            self.inner.peers.lock().slots.get(id.0 as usize).ok_or_else(unknown)?.conn.clone();
        if let Some(c) = usable(&existing) {
            return Ok(c);
        }
        let (name, existing, retired) = {
            let peers = self.inner.peers.lock();
            let slot = peers.slots.get(id.0 as usize).ok_or_else(unknown)?;
            (slot.name.clone(), slot.conn.clone(), slot.retired.clone())
        };
        if let Some(c) = usable(&existing) {
            return Ok(c); // another thread re-opened it meanwhile
        }
        // The instance whose process exited, if this peer's last one did.
        let gone: Option<(InstanceId, Error)> = match (&existing, retired) {
            (Some(c), _) if c.dead().is_some() => c.dead().map(|e| (c.instance(), e.clone())),
            (_, Some(r)) if r.exited => Some((r.instance, r.error)),
            _ => None,
        };
        let fetched = self.fetch_descriptor(&name).map_err(|e| e.for_peer(id));
        let fresh = fetched.and_then(|desc| match &gone {
            // The descriptor still names the instance whose process exited.
            Some((instance, err)) if *instance == desc.instance_id => Err(err.clone()),
            _ => Ok(self.peer_conn(id, &name, desc)),
        });
        let conn = match fresh {
            Ok(conn) => conn,
            Err(e) => {
                let err = gone.map_or(e, |(_, err)| err);
                if let Some(old) = existing {
                    let exited = old.dead().is_some();
                    self.inner.retire(&old, err.clone(), exited);
                }
                return Err(err);
            }
        };
        let old = {
            let mut peers = self.inner.peers.lock();
            let slot = peers.slots.get_mut(id.0 as usize).ok_or(Error::Internal("peer slot"))?;
            let same = |a: &Option<Arc<PeerConn>>, b: &Option<Arc<PeerConn>>| match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same(&slot.conn, &existing) {
                // Another thread re-opened the peer meanwhile: use its view (replacing it
                // would close the connections it is using), unless that one is broken too.
                if let Some(current) = usable(&slot.conn) {
                    return Ok(current);
                }
            }
            slot.retired = None;
            slot.conn.replace(conn.clone())
        };
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(o, &conn)) {
            old.close(Error::PeerUnreachable {
                peer: old.who(),
                reason: "replaced by a new connection to the peer".into(),
            });
        }
        Ok(conn)
    }

    /// Maps `[remote, remote+len)` of a peer's registered memory into this process, for the
    /// host (`device: None`: shared host memory of a same-host peer, over shm) or for our GPU
    /// `device` (a same-host peer's device memory over nvlink, a proven fabric peer's over
    /// mnnvl). The handle gives the address to use, the peer's liveness (and a flag kernels can
    /// poll), and keeps the mapping and an in-use mark on the peer's region until dropped.
    /// Memory only tcp reaches cannot be mapped: the error says why.
    pub fn map_peer(
        &self,
        peer: PeerId,
        remote: u64,
        len: u64,
        device: Option<u32>,
    ) -> Result<mapped::MappedPeer> {
        self.check_running()?;
        if len == 0 {
            return Err(Error::InvalidArgument { reason: "map_peer of zero bytes".into() });
        }
        let map_once = || {
            let probe = Request { op: Op::Read, local: 0, len, peer, remote };
            let (conn, region) = self.resolve_remote(&probe)?;
            let local = conn.same_engine;
            let me = &self.inner;
            let region = (*region).clone();
            let ends = mapped::Ends { conn, region, local, config: &me.config, gpu: &me.gpu_facts };
            mapped::map(ends, remote, len, device)
        };
        match map_once() {
            Err(e @ Error::RemoteAccessDenied { .. }) => {
                // The cached descriptor may name a region the peer has since replaced at the
                // same address (freed, then allocated again): re-read it once.
                let conn = self.peer(peer)?;
                let cached = conn.find(remote, len).map(|r| r.id);
                let fresh = self.fetch_descriptor(&conn.name)?;
                let current = fresh.find_region(remote, len).map(|r| r.id);
                if fresh.instance_id != conn.instance() || current.is_none() || current == cached {
                    return Err(e);
                }
                conn.set_descriptor(fresh);
                map_once()
            }
            other => other,
        }
    }

    /// The peer's current connection state as it stands (no reconnect).
    pub(crate) fn current_peer(&self, id: PeerId) -> Option<Arc<PeerConn>> {
        self.inner.peers.lock().slots.get(id.0 as usize).and_then(|s| s.conn.clone())
    }

    /// Every peer opened by name: whether it is usable and how many mappings of its memory
    /// this process holds.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.inner.peers()
    }

    /// The peer's descriptor as cached by this engine.
    pub fn peer_descriptor(&self, id: PeerId) -> Result<Arc<SegmentDescriptor>> {
        Ok(self.peer(id)?.descriptor())
    }

    /// Finds the remote region of a request, refreshing the peer's descriptor once on a miss.
    fn resolve_remote(&self, r: &Request) -> Result<(Arc<PeerConn>, RegionRef)> {
        for _ in 0..2 {
            let conn = self.peer(r.peer)?;
            if conn.take_stale() {
                // A region we named is gone: the address may belong to a new one now.
                let fresh = self.fetch_descriptor(&conn.name).map_err(|e| e.for_peer(r.peer))?;
                if fresh.instance_id == conn.instance() {
                    conn.set_descriptor(fresh);
                }
            }
            if let Some(region) = conn.find(r.remote, r.len) {
                return Ok((conn, region));
            }
            let fresh = self.fetch_descriptor(&conn.name).map_err(|e| e.for_peer(r.peer))?;
            if fresh.instance_id != conn.instance() {
                conn.mark_broken();
                continue;
            }
            conn.set_descriptor(fresh);
            if let Some(region) = conn.find(r.remote, r.len) {
                return Ok((conn, region));
            }
            return Err(Error::RemoteAccessDenied {
                peer: conn.who(),
                addr: r.remote,
                len: r.len,
                reason: "not inside any region the peer has registered".into(),
            });
        }
        let name = self.inner.peers.lock().slots.get(r.peer.0 as usize).map(|s| s.name.clone());
        Err(Error::PeerUnreachable {
            peer: PeerRef { id: Some(r.peer), name: name.unwrap_or_default() },
            reason: "the peer restarted twice while this request was being resolved".into(),
        })
    }

    pub(crate) fn plan(&self, r: &Request) -> Result<Step> {
        if r.len == 0 {
            return Err(Error::InvalidArgument {
                reason: format!("zero-length request at {:#x}", r.local),
            });
        }
        let local = self
            .inner
            .registry
            .find(r.local, r.len)
            .ok_or(Error::NotRegistered { addr: r.local, len: r.len })?;
        let (conn, region) = self.resolve_remote(r)?;
        let ends = Endpoints {
            local: local.location,
            remote: &region,
            same_engine: conn.same_engine,
            same_host: conn.same_host,
            gpu: &self.inner.gpu_facts,
            fabric: &self.inner.fabric_facts,
        };
        let opts = &self.inner.config.transports;
        // The choice alone (no reasons written); when nothing reaches, every refusal's reason.
        let transport = match select::choose(ends, opts) {
            Some(t) => t,
            None => {
                return Err(Error::NoTransport {
                    peer: conn.who(),
                    addr: r.remote,
                    len: r.len,
                    refusals: select::select(ends, opts).err().unwrap_or_default(),
                })
            }
        };
        let gpu = match transport {
            TransportKind::Nvlink | TransportKind::Mnnvl => {
                let reach = if transport == TransportKind::Nvlink {
                    nvlink_reach(&region, opts.prefer_ipc)
                } else {
                    region.reach.iter().find(|r| r.transport() == TransportKind::Mnnvl)
                };
                let reach = reach.ok_or(Error::Internal("GPU transport chosen without a reach"))?;
                let uuid = reach.device().unwrap_or_default();
                let exec =
                    executing_gpu(local.location, uuid, &self.inner.gpu_facts).map_err(|why| {
                        Error::NoTransport {
                            peer: conn.who(),
                            addr: r.remote,
                            len: r.len,
                            refusals: vec![Refusal { transport, reason: why }],
                        }
                    })?;
                Some(GpuRoute { reach: reach.clone(), exec })
            }
            _ => None,
        };
        Ok(Step {
            transport,
            gpu,
            local,
            conn,
            peer: r.peer,
            region: RemoteRegion { id: region.id, addr: region.addr, len: region.len },
            prepared: None,
            known_end: None,
        })
    }

    /// Submits a batch. Every request is checked and assigned a transport; a request that
    /// cannot be served fails the submission with the reason, and then nothing of the batch
    /// is in flight (GPU pages before it may have been copied while the rest was checked:
    /// the GPU starts on the first pages of a large batch before the last are checked, and
    /// the failed submission waits for them). Requests over `local` and `shm` are copied
    /// before this returns; `tcp` and GPU requests complete asynchronously. The batch
    /// finishes by its deadline.
    pub fn submit(&self, requests: &[Request], opts: BatchOptions) -> Result<BatchHandle> {
        let started = Instant::now();
        let submitted = self.check_batch(requests, &opts).and_then(|()| {
            let first = self.plan(&requests[0])?;
            self.dispatch(requests, opts, started, first, |i| self.plan(&requests[i]))
        });
        submitted.inspect_err(|e| self.count_refused(requests, e))
    }

    /// Counts a refused submission's requests as failures (transport `none`: none was
    /// chosen), when metrics are recorded.
    fn count_refused(&self, requests: &[Request], err: &Error) {
        let (Some(m), Some(first)) = (crate::metrics::get(), requests.first()) else { return };
        let name = self.inner.peers.lock().slots.get(first.peer.0 as usize).map(|s| s.name.clone());
        let labels = [
            ("kind", format!("{:?}", err.kind())),
            ("transport", "none".to_string()),
            ("peer", m.peer(name.as_deref().unwrap_or("unknown")).to_string()),
        ];
        m.failures.get_or_create(&labels).inc_by(requests.len() as u64);
    }

    /// What every batch must be, before anything of it is planned.
    pub(crate) fn check_batch(&self, requests: &[Request], opts: &BatchOptions) -> Result<()> {
        self.check_running()?;
        if requests.is_empty() {
            return Err(Error::InvalidArgument { reason: "empty batch".into() });
        }
        if opts.notify.is_some() && requests.iter().any(|r| r.peer != requests[0].peer) {
            return Err(Error::InvalidArgument {
                reason: "a batch with a notification must target one peer".into(),
            });
        }
        Ok(())
    }

    /// Runs a batch whose first run is planned (`first`): `step_at(i)` plans the run that
    /// starts at request `i` (or returns it from a prepared plan); each run goes to its
    /// transport as soon as it is planned.
    pub(crate) fn dispatch(
        &self,
        requests: &[Request],
        opts: BatchOptions,
        started: Instant,
        first: Step,
        mut step_at: impl FnMut(usize) -> Result<Step>,
    ) -> Result<BatchHandle> {
        let conn = first.conn.clone();
        let total: u64 = requests.iter().map(|r| r.len).sum();
        self.run_batch(requests.len(), total, &conn, opts, started, |feed| {
            let mut next = Some(first);
            let mut i = 0;
            while i < requests.len() {
                let step = match next.take() {
                    Some(step) => step,
                    None => step_at(i)?,
                };
                i = feed.add(step, requests, i)?;
            }
            Ok(std::borrow::Cow::Borrowed(requests))
        })
    }

    /// Runs a batch of `n` requests (`total` bytes) to `conn`'s peer: `feed` plans them and
    /// hands each run to its transport through the [`Feeder`], returning the requests the
    /// transports were given (those that take page transfers straight from their index arrays
    /// need none). An error from `feed` fails the submission; nothing of it stays in flight.
    pub(crate) fn run_batch<'r>(
        &self,
        n: usize,
        total: u64,
        conn: &Arc<PeerConn>,
        opts: BatchOptions,
        started: Instant,
        feed: impl FnOnce(&mut Feeder<'_>) -> Result<std::borrow::Cow<'r, [Request]>>,
    ) -> Result<BatchHandle> {
        let trailer = match opts.notify {
            None => None,
            Some((name, message)) => Some(if conn.same_engine {
                let n = Notification { from: self.inner.name.clone(), name, message };
                TrailerRoute::Local(self.inner.notifications.clone(), n)
            } else {
                let payload = encode_strings(&[&self.inner.name, &name, &message]);
                if payload.len() as u64 > tidewire_core::wire::MAX_NOTIFY_FRAME {
                    return Err(Error::InvalidArgument {
                        reason: "notification larger than 1 MiB".into(),
                    });
                }
                TrailerRoute::Tcp(conn.tcp(&self.inner.config, &self.inner.life)?, payload)
            }),
        };
        let cfg = &self.inner.config;
        let id = BatchId(self.inner.next_batch.fetch_add(1, Ordering::Relaxed));
        // The deadline grows with the batch's size, set once the batch is planned.
        let provisional = started + opts.timeout.unwrap_or_else(|| cfg.deadlines.for_batch(0));
        let batch = Batch::new(started, id, n, None, trailer, provisional);
        let _span = tracing::debug_span!("batch", id = id.0, requests = n, bytes = total).entered();
        // Plan, then hand each run (consecutive requests between the same two regions share one
        // decision) to its transport. GPU runs are enqueued while the rest of the batch is
        // checked (the GPU starts on the first pages before the last are checked); the others
        // move once every request is checked.
        let ctx = BatchCtx { after: opts.stream, complete_on: opts.complete_on };
        let (subs, fed) = {
            let transports = &self.inner.transports;
            let mut feeder = Feeder { transports, batch: &batch, ctx, subs: Vec::new() };
            let fed = feed(&mut feeder);
            (feeder.subs, fed)
        };
        let requests = match fed {
            Ok(requests) => requests,
            Err(e) => {
                for (_, sub) in subs {
                    sub.abort(provisional);
                }
                return Err(e);
            }
        };
        batch.mark(Mark::Planned);
        batch.seal();
        tracing::debug!(after_us = started.elapsed().as_micros() as u64, "planned");
        let timeout = opts.timeout.unwrap_or_else(|| cfg.deadlines.for_batch(total));
        batch.set_deadline(started + timeout);
        for (_, sub) in subs {
            sub.finish(&requests);
        }
        if !batch.is_finished() {
            self.inner.watch.deadline(&batch, started + timeout);
        }
        Ok(BatchHandle { batch })
    }

    /// Submits and waits.
    pub fn transfer_sync(&self, requests: &[Request], opts: BatchOptions) -> Result<()> {
        self.submit(requests, opts)?.wait()
    }

    /// Checks that a peer answers on its RPC port; returns the round-trip time.
    pub fn probe(&self, id: PeerId) -> Result<Duration> {
        let conn = self.peer(id)?;
        let desc = conn.descriptor();
        let start = Instant::now();
        let (stream, found) = tcp::handshake(
            &conn.who(),
            resolve(&desc.rpc_addr)?,
            Some(desc.instance_id),
            &self.inner.config.deadlines,
            &self.inner.creds(),
        )?;
        if found != desc.instance_id {
            conn.mark_broken();
            return Err(Error::PeerUnreachable {
                peer: conn.who(),
                reason: "the peer restarted".into(),
            });
        }
        let probe = Header::new(FrameKind::Probe, 1, 0, 0).encode();
        let (h, _) =
            tcp::exchange(&stream, &probe, self.inner.config.deadlines.handshake).map_err(|e| {
                Error::PeerUnreachable { peer: conn.who(), reason: format!("probe: {e}") }
            })?;
        if h.kind != FrameKind::ProbeAck {
            return Err(Error::Protocol {
                peer: conn.who(),
                reason: format!("probe answered with {:?}", h.kind),
            });
        }
        Ok(start.elapsed())
    }

    /// Takes the notifications received so far, oldest first.
    pub fn take_notifications(&self) -> Vec<Notification> {
        self.inner.notifications.take()
    }

    /// The transport that would serve each of a peer's regions from host memory, and why.
    pub fn explain(&self, id: PeerId) -> Result<PeerInfo> {
        self.explain_from(id, None)
    }

    /// As [`Engine::explain`], from the registered local memory at `local` (host pageable
    /// memory when `None`).
    pub fn explain_from(&self, id: PeerId, local: Option<u64>) -> Result<PeerInfo> {
        let conn = self.peer(id)?;
        let descriptor = conn.descriptor();
        let local = local
            .and_then(|a| self.inner.registry.find(a, 1))
            .map(|e| e.location)
            .unwrap_or(Location { kind: MemoryKind::HostPageable, device: None });
        let regions = descriptor
            .regions
            .iter()
            .map(|region| TransportReport {
                region: region.clone(),
                decision: select::select(
                    Endpoints {
                        local,
                        remote: region,
                        same_engine: conn.same_engine,
                        same_host: conn.same_host,
                        gpu: &self.inner.gpu_facts,
                        fabric: &self.inner.fabric_facts,
                    },
                    &self.inner.config.transports,
                ),
            })
            .collect();
        Ok(PeerInfo {
            descriptor,
            same_engine: conn.same_engine,
            same_host: conn.same_host,
            regions,
        })
    }

    /// Unpublishes, fails in-flight requests with `ShuttingDown`, closes every connection and
    /// joins every thread. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        let me = &self.inner;
        if me.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = me.metadata.unpublish(&me.name) {
            log::warn!("{}: unpublish failed: {e}", me.name);
        }
        me.metadata.release();
        me.life.begin_stop();
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&me.rpc_addr, Duration::from_millis(200));
        let conns: Vec<Arc<PeerConn>> =
            me.peers.lock().slots.iter_mut().filter_map(|s| s.conn.take()).collect();
        for c in conns {
            c.close(Error::ShuttingDown { who: format!("engine {}", me.name) });
        }
        me.life.join_all();
        let removed = me.registry.drain();
        // A region some peer may still map (its revocation timed out: a stopped peer) is not
        // freed: memory of `cuMemAlloc` shared by CUDA IPC could otherwise be handed out again
        // and written by that peer's late kernels or copies (a VMM allocation stays alive while
        // imported anyway). Left allocated for the process's life, and said so.
        let held: Vec<u64> = self.revoke_each(&removed).into_iter().map(|(a, _)| a).collect();
        drop(removed);
        for addr in std::mem::take(&mut *me.device_allocs.lock()) {
            if held.contains(&addr) {
                log::warn!(
                    "{}: device allocation {addr:#x} left allocated: a peer may still map it",
                    me.name
                );
                continue;
            }
            if let Err(e) = tidewire_gpu::alloc::free(addr) {
                log::warn!("{}: {e}", me.name);
            }
        }
        log::info!("{}: engine stopped", me.name);
    }
}

/// A submission failed at planning: nothing of the batch may stay in flight (GPU work already
/// enqueued is waited for, until `until`).
/// A batch being handed to its transports: one submission per transport, opened on first use.
pub(crate) struct Feeder<'b> {
    transports: &'b Transports,
    batch: &'b Arc<Batch>,
    ctx: BatchCtx,
    subs: Vec<(usize, Box<dyn Submission + 'b>)>,
}

impl<'b> Feeder<'b> {
    /// The submission of the transport serving `kind`, opened on first use; `None` when this
    /// engine did not build one.
    fn submission(&mut self, kind: TransportKind) -> Option<&mut Box<dyn Submission + 'b>> {
        let (slot, transport) = self.transports.serving(kind)?;
        let k = match self.subs.iter().position(|(s, _)| *s == slot) {
            Some(k) => k,
            None => {
                self.subs.push((slot, transport.begin(self.batch, self.ctx)));
                self.subs.len() - 1
            }
        };
        Some(&mut self.subs[k].1)
    }

    /// Hands the run of `requests` from `from` that `step` covers to its transport; returns
    /// where the run ends.
    pub(crate) fn add(&mut self, step: Step, requests: &[Request], from: usize) -> Result<usize> {
        let batch = self.batch;
        let (transport, conn) = (step.transport, step.conn.clone());
        let end = match self.submission(step.transport) {
            Some(sub) => sub.add(step, requests, from)?,
            None => {
                let end = step.run_end(requests, from + 1);
                batch.note_run(|m| run_meta(m, transport, &conn, &requests[from..end], from));
                batch.fail_runs(
                    std::slice::from_ref(&(from..end)),
                    not_built(&step, &requests[from]),
                );
                return Ok(end);
            }
        };
        batch.note_run(|m| run_meta(m, transport, &conn, &requests[from..end], from));
        tracing::trace!(%transport, peer = %conn.name, from, end, "run handed to its transport");
        Ok(end)
    }

    /// Hands a layer of a page transfer (requests `from..from + pages.runs`, every page
    /// inside `step`'s regions) to its transport as index arrays; `None` when the transport
    /// takes only requests; `Err` (an index outside its layout) fails the submission.
    pub(crate) fn add_pages(
        &mut self,
        step: &Step,
        pages: &LayerPages<'_>,
        from: usize,
    ) -> Option<Result<usize>> {
        let taken = self.submission(step.transport)?.add_pages(step, pages, from);
        if let Some(Ok(end)) = &taken {
            self.batch.note_run(|m| RunMeta {
                reqs: from..*end,
                transport: step.transport,
                bytes: pages.local_pages.len() as u64 * pages.page_size,
                counters: step.conn.run_counters(m, step.transport, run_op(pages.op)),
                peer: step.conn.metrics_label(m),
            });
        }
        taken
    }
}

/// A request's operation as the metrics label it.
fn run_op(op: Op) -> crate::metrics::RunOp {
    match op {
        Op::Write => crate::metrics::RunOp::Write,
        Op::Read => crate::metrics::RunOp::Read,
    }
}

/// What the metrics keep of the run `reqs` (starting at request `from`) on `transport`.
fn run_meta(
    m: &crate::metrics::Metrics,
    transport: TransportKind,
    conn: &PeerConn,
    reqs: &[Request],
    from: usize,
) -> RunMeta {
    // One pass for the operation and the bytes (a run may hold 16,384 pages).
    let first = reqs.first().map(|r| r.op);
    let (mut same, mut bytes) = (true, 0u64);
    for r in reqs {
        same &= Some(r.op) == first;
        bytes += r.len;
    }
    let op = match first {
        Some(first) if same => run_op(first),
        _ => crate::metrics::RunOp::Mixed,
    };
    RunMeta {
        reqs: from..from + reqs.len(),
        transport,
        bytes,
        counters: conn.run_counters(m, transport, op),
        peer: conn.metrics_label(m),
    }
}

/// A run whose chosen transport this engine did not build.
fn not_built(step: &Step, r: &Request) -> Error {
    let reason = "chosen, but not built in this engine".to_string();
    Error::NoTransport {
        peer: step.conn.who(),
        addr: r.remote,
        len: r.len,
        refusals: vec![Refusal { transport: step.transport, reason }],
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.inner.name)
            .field("instance", &self.inner.instance)
            .finish()
    }
}
