//! Open peer segments: the cached descriptor and the connections of each transport, replaced
//! as a whole when the peer restarts or a connection fails, and retired (every mapping of the
//! peer's memory released) when its process exits.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};
use tidewire_core::descriptor::{RegionDescriptor, SegmentDescriptor};
use tidewire_core::select::TransportKind;
use tidewire_core::{InstanceId, PeerId};

use crate::config::{Credentials, EngineConfig};
use crate::error::{Error, PeerRef, Result};
use crate::lifecycle::Lifecycle;
use crate::metadata::resolve;
use crate::transport::fabric::FabricPeer;
use crate::transport::lease::{self, LeaseConn};
use crate::transport::nvlink::NvlinkClient;
use crate::transport::shm::ShmClient;
use crate::transport::tcp::TcpConn;
use crate::watch::Watch;
use tidewire_gpu::alloc::HostFlag;

/// How many mappings of one peer instance's memory this process holds (shm mappings,
/// revocation pages, GPU imports), wherever they are held: by the peer's connection state or
/// by copies still in flight.
#[derive(Clone, Default)]
pub(crate) struct MapCount(Arc<AtomicUsize>);

impl MapCount {
    /// Counts one more mapping until the returned guard drops.
    pub(crate) fn hold(&self) -> Held {
        self.0.fetch_add(1, Ordering::Relaxed);
        Held(self.0.clone())
    }

    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One counted mapping; uncounted when dropped (with the mapping it sits next to).
pub(crate) struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The error of a request to a peer whose process exited; `seen` says how it was seen ("its
/// shm socket hung up").
pub(crate) fn exited(peer: &PeerRef, transport: TransportKind, seen: &str) -> Error {
    let reason = format!("the peer process exited ({seen})");
    Error::PeerFailed { peer: peer.clone(), transport, reason }
}

/// Whether a peer instance's process is alive, readable by whoever holds its memory mapped:
/// on the host, and (once asked for) as a word in pinned memory that kernels on any GPU can
/// poll (1 alive, 0 exited).
#[derive(Default)]
pub(crate) struct Liveness {
    error: OnceLock<Error>,
    flag: OnceLock<Option<HostFlag>>,
}

impl Liveness {
    /// Records the exit (the first reason wins) and clears the flag.
    pub(crate) fn set_dead(&self, err: Error) {
        let _ = self.error.set(err);
        if let Some(Some(f)) = self.flag.get() {
            f.store(0);
        }
    }

    /// Why the process is gone, if it is.
    pub(crate) fn error(&self) -> Option<&Error> {
        self.error.get()
    }

    /// The address of the device-visible flag, made on first use (`None` without GPUs).
    pub(crate) fn flag_addr(&self) -> Option<u64> {
        let flag = self.flag.get_or_init(|| match HostFlag::new(1) {
            Ok(f) => Some(f),
            Err(e) => {
                log::debug!("no device-visible liveness flag: {e}");
                None
            }
        });
        let flag = flag.as_ref()?;
        // An exit recorded while the flag was being made.
        if self.error.get().is_some() {
            flag.store(0);
        }
        Some(flag.addr())
    }
}

/// A region of a peer's cached descriptor: the descriptor held, not the region copied (a
/// request's planning looks one up; copying it cost an allocation of its reach list).
pub(crate) struct RegionRef {
    seg: Arc<SegmentDescriptor>,
    idx: usize,
}

impl std::ops::Deref for RegionRef {
    type Target = RegionDescriptor;

    fn deref(&self) -> &RegionDescriptor {
        &self.seg.regions[self.idx]
    }
}

pub(crate) struct PeerConn {
    /// The handle `open_segment` gave this peer.
    pub(crate) id: PeerId,
    /// Our own engine's instance (what our handshakes name as the initiator).
    mine: InstanceId,
    pub(crate) name: String,
    desc: RwLock<Arc<SegmentDescriptor>>,
    pub(crate) same_engine: bool,
    pub(crate) same_host: bool,
    tcp: Mutex<Option<Arc<TcpConn>>>,
    shm: Mutex<Option<Arc<ShmClient>>>,
    nvlink: Mutex<Option<Arc<NvlinkClient>>>,
    /// The fabric transport's view of this instance (its endpoints' addresses), made on
    /// first use.
    fabric: Mutex<Option<Arc<FabricPeer>>>,
    /// Its label in the metrics, once asked for.
    metrics_label: OnceLock<&'static str>,
    /// Its runs' counters per (transport, operation), once asked for (a batch finds them
    /// without a lock or a search).
    run_counters: [OnceLock<&'static crate::metrics::RunCounters>;
        TransportKind::ALL.len() * crate::metrics::RunOp::ALL.len()],
    broken: AtomicBool,
    /// The peer said a region of the cached descriptor is gone (it may have registered
    /// another at the same address): the next request re-reads the descriptor.
    stale: AtomicBool,
    /// Whether the peer instance is gone for good (its process exited), and why.
    pub(crate) liveness: Arc<Liveness>,
    /// Mappings of this instance's memory held in this process.
    pub(crate) mappings: MapCount,
    /// Where hang-ups of this peer's sockets are reported (`None` in unit tests).
    watch: Option<Arc<Watch>>,
    me: Weak<PeerConn>,
}

impl PeerConn {
    pub(crate) fn new(
        id: PeerId,
        name: String,
        desc: SegmentDescriptor,
        me: InstanceId,
        my_host: &tidewire_core::HostId,
        watch: Arc<Watch>,
    ) -> Arc<Self> {
        let (same_engine, same_host) = (desc.instance_id == me, &desc.host_id == my_host);
        Self::build(id, name, desc, me, same_engine, same_host, Some(watch))
    }

    /// What our handshakes with this peer prove, under `cfg`.
    fn creds(&self, cfg: &EngineConfig) -> Credentials {
        Credentials { secret: cfg.cluster_secret.clone(), me: self.mine }
    }

    /// The peer, as errors name it.
    pub(crate) fn who(&self) -> PeerRef {
        PeerRef { id: Some(self.id), name: self.name.clone() }
    }

    fn build(
        id: PeerId,
        name: String,
        desc: SegmentDescriptor,
        mine: InstanceId,
        same_engine: bool,
        same_host: bool,
        watch: Option<Arc<Watch>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak| Self {
            id,
            mine,
            name,
            same_engine,
            same_host,
            desc: RwLock::new(Arc::new(desc)),
            tcp: Mutex::new(None),
            shm: Mutex::new(None),
            nvlink: Mutex::new(None),
            fabric: Mutex::new(None),
            metrics_label: OnceLock::new(),
            run_counters: Default::default(),
            broken: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            liveness: Arc::default(),
            mappings: MapCount::default(),
            watch,
            me: weak.clone(),
        })
    }

    /// A same-host peer with an empty descriptor and no watcher.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str) -> Arc<Self> {
        let desc = SegmentDescriptor {
            version: tidewire_core::descriptor::DESCRIPTOR_VERSION,
            name: name.into(),
            instance_id: InstanceId(7),
            host_id: tidewire_core::HostId("test-host".into()),
            hostname: "test".into(),
            rpc_addr: "127.0.0.1:1".into(),
            shm_socket: None,
            generation: 1,
            regions: Vec::new(),
            layouts: Vec::new(),
        };
        Self::build(PeerId(0), name.into(), desc, InstanceId(1), false, true, None)
    }

    /// Reports a hang-up of `fd`, a socket to this peer's process, to the watcher.
    fn watch_socket(&self, fd: RawFd, channel: TransportKind) -> Result<()> {
        match &self.watch {
            Some(w) => w.peer_socket(fd, self.me.clone(), channel),
            None => Ok(()),
        }
    }

    /// Nothing new is connected to an instance whose process exited (the watcher may have
    /// closed this view's connections while a request was being planned on it).
    fn check_alive(&self) -> Result<()> {
        self.dead().map_or(Ok(()), |e| Err(e.clone()))
    }

    /// Records that the peer's process exited (the first reason wins) and breaks this view.
    pub(crate) fn mark_dead(&self, err: Error) {
        self.liveness.set_dead(err);
        self.mark_broken();
    }

    /// Why the peer instance is gone for good, if it is: recorded, or seen now by a copy's
    /// check (its liveness word, or its shm socket) before the watcher got to it.
    pub(crate) fn dead(&self) -> Option<&Error> {
        if self.liveness.error().is_none() {
            let seen = self.shm.lock().as_ref().filter(|s| s.hung_up()).map(|s| s.death_seen());
            if let Some(seen) = seen {
                let transport = self.gpu_transport().unwrap_or(TransportKind::Shm);
                self.mark_dead(exited(&self.who(), transport, seen));
            }
        }
        self.liveness.error()
    }

    /// The GPU transport this peer's memory is reached by, if any (for errors naming it).
    pub(crate) fn gpu_transport(&self) -> Option<TransportKind> {
        self.nvlink.lock().as_ref().map(|c| c.transport())
    }

    pub(crate) fn descriptor(&self) -> Arc<SegmentDescriptor> {
        self.desc.read().clone()
    }

    pub(crate) fn instance(&self) -> InstanceId {
        self.desc.read().instance_id
    }

    pub(crate) fn set_descriptor(&self, d: SegmentDescriptor) {
        *self.desc.write() = Arc::new(d);
    }

    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<RegionRef> {
        let seg = self.desc.read().clone();
        let idx = seg.region_index(addr, len)?;
        Some(RegionRef { seg, idx })
    }

    /// The peer said a region of the cached descriptor is no longer registered.
    pub(crate) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    /// Whether the cached descriptor must be re-read (and clears the mark).
    pub(crate) fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// True when this view of the peer must be replaced (restart, failed connection).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
            || self.liveness.error().is_some()
            || self.tcp.lock().as_ref().is_some_and(|t| t.is_dead())
            || self.shm.lock().as_ref().is_some_and(|s| s.is_broken())
    }

    /// The TCP lanes to this peer, connected on first use (bounded by the connect and
    /// handshake deadlines).
    pub(crate) fn tcp(&self, cfg: &EngineConfig, life: &Arc<Lifecycle>) -> Result<Arc<TcpConn>> {
        self.check_alive()?;
        let mut slot = self.tcp.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        let desc = self.descriptor();
        let addr = resolve(&desc.rpc_addr)?;
        let conn = TcpConn::connect(
            &self.who(),
            addr,
            desc.instance_id,
            cfg.tcp_lanes,
            &cfg.deadlines,
            &self.creds(cfg),
            life,
        )
        .inspect_err(|_| self.mark_broken())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Unmaps cached shm regions of this peer that it revoked and nothing uses.
    pub(crate) fn sweep_shm(&self) {
        if let Some(client) = self.shm.lock().as_ref() {
            client.sweep();
        }
    }

    /// How a copy learns this peer's process is gone, while an shm attachment is open.
    pub(crate) fn death_check(&self) -> Option<crate::engine::DeathCheck> {
        self.shm.lock().as_ref().map(|c| c.death_check())
    }

    /// The shm attachment to this peer, made on first use.
    pub(crate) fn shm(&self, cfg: &EngineConfig) -> Result<Arc<ShmClient>> {
        self.check_alive()?;
        let mut slot = self.shm.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let desc = self.descriptor();
        let socket = desc.shm_socket.as_deref().ok_or_else(|| Error::PeerUnreachable {
            peer: self.who(),
            reason: "the peer offers no shm socket".into(),
        })?;
        let client = Arc::new(ShmClient::connect(
            &self.who(),
            socket,
            cfg.deadlines.handshake,
            &self.creds(cfg),
            desc.instance_id,
            self.mappings.clone(),
            self.liveness.clone(),
        )?);
        self.watch_socket(client.raw_fd(), TransportKind::Shm)?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The GPU import state for this peer, over its shm attachment (made on first use).
    /// The GPU transports' client for this peer: the shm socket's revocation pages for a
    /// same-host peer, `Enter` / `Leave` over RPC for one on another host (or with
    /// `TIDEWIRE_NVLINK_LEASE=rpc`).
    pub(crate) fn nvlink(&self, cfg: &EngineConfig) -> Result<Arc<NvlinkClient>> {
        self.check_alive()?;
        let shm = if self.same_host { Some(self.shm(cfg)?) } else { None };
        let mut slot = self.nvlink.lock();
        if let Some(c) = slot.as_ref().filter(|c| c.usable(shm.as_ref())) {
            return Ok(c.clone());
        }
        let kind = if self.same_host { TransportKind::Nvlink } else { TransportKind::Mnnvl };
        let lease = if !self.same_host || lease::forced() {
            let desc = self.descriptor();
            let addr = resolve(&desc.rpc_addr)?;
            let creds = self.creds(cfg);
            let lease = LeaseConn::connect(
                &self.who(),
                kind,
                addr,
                desc.instance_id,
                &cfg.deadlines,
                &creds,
            )?;
            if let Some(fd) = lease.raw_fd() {
                self.watch_socket(fd, kind)?;
            }
            Some(lease)
        } else {
            None
        };
        let client =
            Arc::new(NvlinkClient::new(&self.who(), kind, shm, lease, self.mappings.clone())?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Closes the connections; requests in flight fail with `err`. Mappings go with the last
    /// user: copies in flight keep theirs until they complete.
    pub(crate) fn close(&self, err: Error) {
        let tcp = self.tcp.lock().take();
        if let Some(t) = tcp {
            t.close(Some(err.clone()));
        }
        self.shm.lock().take();
        self.nvlink.lock().take();
        if let Some(f) = self.fabric.lock().take() {
            f.close(err);
        }
    }

    /// This peer's label in the metrics (resolved once).
    pub(crate) fn metrics_label(&self, m: &crate::metrics::Metrics) -> &'static str {
        self.metrics_label.get_or_init(|| m.peer(&self.name))
    }

    /// The counters of this peer's runs of `op` on `transport` (resolved once per pair).
    pub(crate) fn run_counters(
        &self,
        m: &crate::metrics::Metrics,
        transport: TransportKind,
        op: crate::metrics::RunOp,
    ) -> &'static crate::metrics::RunCounters {
        self.run_counters[transport as usize * crate::metrics::RunOp::ALL.len() + op as usize]
            .get_or_init(|| m.run_counters(transport, op, self.metrics_label(m)))
    }

    /// The fabric transport's view of this instance.
    pub(crate) fn fabric(self: &Arc<Self>) -> Arc<FabricPeer> {
        self.fabric.lock().get_or_insert_with(|| FabricPeer::new(self)).clone()
    }
}
