//! Open peer segments: the cached descriptor and the connections of each transport, replaced
//! as a whole when the peer restarts or a connection fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tidewire_core::descriptor::{RegionDescriptor, SegmentDescriptor};
use tidewire_core::select::TransportKind;
use tidewire_core::InstanceId;

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::metadata::resolve;
use crate::transport::lease::{self, LeaseConn};
use crate::transport::nvlink::NvlinkClient;
use crate::transport::shm::ShmClient;
use crate::transport::tcp::TcpConn;

pub(crate) struct PeerConn {
    pub(crate) name: String,
    desc: RwLock<Arc<SegmentDescriptor>>,
    pub(crate) same_engine: bool,
    pub(crate) same_host: bool,
    tcp: Mutex<Option<Arc<TcpConn>>>,
    shm: Mutex<Option<Arc<ShmClient>>>,
    nvlink: Mutex<Option<Arc<NvlinkClient>>>,
    broken: AtomicBool,
}

impl PeerConn {
    pub(crate) fn new(
        name: String,
        desc: SegmentDescriptor,
        me: InstanceId,
        my_host: &tidewire_core::HostId,
    ) -> Self {
        Self {
            name,
            same_engine: desc.instance_id == me,
            same_host: &desc.host_id == my_host,
            desc: RwLock::new(Arc::new(desc)),
            tcp: Mutex::new(None),
            shm: Mutex::new(None),
            nvlink: Mutex::new(None),
            broken: AtomicBool::new(false),
        }
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

    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<RegionDescriptor> {
        self.desc.read().find_region(addr, len).cloned()
    }

    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// True when this view of the peer must be replaced (restart, failed connection).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
            || self.tcp.lock().as_ref().is_some_and(|t| t.is_dead())
            || self.shm.lock().as_ref().is_some_and(|s| s.is_broken())
    }

    /// The TCP lanes to this peer, connected on first use (bounded by the connect and
    /// handshake deadlines).
    pub(crate) fn tcp(&self, cfg: &EngineConfig, life: &Arc<Lifecycle>) -> Result<Arc<TcpConn>> {
        let mut slot = self.tcp.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        let desc = self.descriptor();
        let addr = resolve(&desc.rpc_addr)?;
        let conn = TcpConn::connect(
            &self.name,
            addr,
            desc.instance_id,
            cfg.tcp_lanes,
            &cfg.deadlines,
            life,
        )
        .inspect_err(|_| self.mark_broken())?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// The shm attachment to this peer, made on first use.
    pub(crate) fn shm(&self, cfg: &EngineConfig) -> Result<Arc<ShmClient>> {
        let mut slot = self.shm.lock();
        if let Some(c) = slot.as_ref().filter(|c| !c.is_broken()) {
            return Ok(c.clone());
        }
        let desc = self.descriptor();
        let socket = desc.shm_socket.as_deref().ok_or_else(|| Error::PeerUnreachable {
            peer: self.name.clone(),
            reason: "the peer offers no shm socket".into(),
        })?;
        let client = Arc::new(ShmClient::connect(&self.name, socket, cfg.deadlines.handshake)?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The GPU import state for this peer, over its shm attachment (made on first use).
    /// The GPU transports' client for this peer: the shm socket's revocation pages for a
    /// same-host peer, `Enter` / `Leave` over RPC for one on another host (or with
    /// `TIDEWIRE_NVLINK_LEASE=rpc`).
    pub(crate) fn nvlink(&self, cfg: &EngineConfig) -> Result<Arc<NvlinkClient>> {
        let shm = if self.same_host { Some(self.shm(cfg)?) } else { None };
        let mut slot = self.nvlink.lock();
        if let Some(c) = slot.as_ref().filter(|c| c.usable(shm.as_ref())) {
            return Ok(c.clone());
        }
        let kind = if self.same_host { TransportKind::Nvlink } else { TransportKind::Mnnvl };
        let lease = if !self.same_host || lease::forced() {
            let desc = self.descriptor();
            let addr = resolve(&desc.rpc_addr)?;
            Some(LeaseConn::connect(&self.name, kind, addr, desc.instance_id, &cfg.deadlines)?)
        } else {
            None
        };
        let client = Arc::new(NvlinkClient::new(&self.name, kind, shm, lease)?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Closes the connections; requests in flight fail with `err`.
    pub(crate) fn close(&self, err: Error) {
        let tcp = self.tcp.lock().take();
        if let Some(t) = tcp {
            t.close(Some(err));
        }
        self.shm.lock().take();
        self.nvlink.lock().take();
    }
}
