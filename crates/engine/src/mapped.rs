//! Mapped peers: a peer's registered memory mapped into this process for the layers above the
//! engine (the EP buffer's kernels, collectives), with the peer's liveness readable from the
//! handle on the host and, for kernels, from a word in device-visible memory.
//!
//! A handle keeps its mapping, and an in-use mark on the peer's region, for as long as it
//! lives: the owner's `unregister` waits for it (bounded by the stall deadline), and nothing is
//! unmapped under a kernel that may still read it. When the peer's process exits, the handle's
//! liveness turns false and its flag 0 at once; the memory stays mapped (the copy of a dead
//! process's pages, visible to nobody) until the handle is dropped, and the engine's own
//! mappings of the peer are released as for any dead peer.

use std::sync::Arc;

use tidewire_core::descriptor::{Reach, RegionDescriptor};
use tidewire_core::memory::{Location, MemoryKind};
use tidewire_core::select::{executing_gpu, nvlink_reach, Refusal, TransportKind};

use crate::error::{Error, PeerRef, Result};
use crate::peer::{Liveness, PeerConn};
use crate::transport::nvlink::{NvlinkClient, RemoteGpu};
use crate::transport::shm::{ShmClient, ShmMap};

/// What keeps a mapping valid, and the mark to clear when it goes.
enum Hold {
    /// The peer is this engine: its own registered memory (the caller's to keep registered:
    /// a pin here would make our own `unregister` wait for the handle without a bound).
    Local,
    /// The peer's memfd, mapped; this initiator's in-flight mark held.
    Shm { client: Arc<ShmClient>, map: Arc<ShmMap> },
    /// The peer's device memory, imported for one of our GPUs; its revocation mark held.
    Gpu { client: Arc<NvlinkClient>, remote: Arc<RemoteGpu> },
}

/// A peer's memory mapped into this process, from [`crate::Engine::map_peer`].
pub struct MappedPeer {
    peer: PeerRef,
    addr: u64,
    len: u64,
    device: Option<u32>,
    transport: TransportKind,
    liveness: Arc<Liveness>,
    hold: Hold,
}

impl MappedPeer {
    /// Where the peer's range starts in this process: a host pointer (`device() == None`) or
    /// a device pointer valid on GPU `device()`.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GPU whose kernels may use [`MappedPeer::addr`] (`None`: host memory).
    pub fn device(&self) -> Option<u32> {
        self.device
    }

    /// How the memory is reached: `local`, `shm`, `nvlink` or `mnnvl`.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// The peer (its handle and name).
    pub fn peer(&self) -> &PeerRef {
        &self.peer
    }

    /// False once the peer's process exited: nothing written here will be read.
    pub fn is_alive(&self) -> bool {
        self.liveness.error().is_none()
    }

    /// Why the peer is gone, once it is.
    pub fn error(&self) -> Option<Error> {
        self.liveness.error().cloned()
    }

    /// The address of a 32-bit word that kernels on any GPU can poll with a system-scope load:
    /// 1 while the peer's process lives, 0 once it exited. `None` without GPUs.
    pub fn alive_flag(&self) -> Option<u64> {
        self.liveness.flag_addr()
    }
}

impl Drop for MappedPeer {
    fn drop(&mut self) {
        match &self.hold {
            Hold::Local => {}
            Hold::Shm { client, map } => client.leave(map),
            Hold::Gpu { client, remote } => {
                if let Err(e) = client.unmap(remote) {
                    // The owner released our mark when it saw the channel close.
                    log::debug!("{}: releasing a mapping: {e}", self.peer);
                }
            }
        }
    }
}

impl std::fmt::Debug for MappedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedPeer")
            .field("peer", &self.peer)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("device", &self.device)
            .field("transport", &self.transport)
            .field("alive", &self.is_alive())
            .finish()
    }
}

/// What [`map`] needs of the engine.
pub(crate) struct Ends<'a> {
    pub(crate) conn: Arc<PeerConn>,
    pub(crate) region: RegionDescriptor,
    /// The peer is this engine.
    pub(crate) local: bool,
    pub(crate) config: &'a crate::config::EngineConfig,
    pub(crate) gpu: &'a tidewire_core::select::GpuFacts,
}

/// Maps `[remote, remote+len)` of the peer's `region` for the host (`device: None`) or for
/// our GPU `device`.
pub(crate) fn map(
    ends: Ends<'_>,
    remote: u64,
    len: u64,
    device: Option<u32>,
) -> Result<MappedPeer> {
    let Ends { conn, region, local, config, gpu } = ends;
    let offset = remote - region.addr;
    let refuse = |transport: TransportKind, why: String| Error::NoTransport {
        peer: conn.who(),
        addr: remote,
        len,
        refusals: vec![Refusal { transport, reason: format!("map_peer: {why}") }],
    };
    let mapped = |addr: u64, device, transport, hold| MappedPeer {
        peer: conn.who(),
        addr,
        len,
        device,
        transport,
        liveness: conn.liveness.clone(),
        hold,
    };
    if local {
        return Ok(mapped(remote, region.location.device, TransportKind::Local, Hold::Local));
    }
    let shm = region.reach.iter().any(|r| matches!(r, Reach::Shm));
    if shm && conn.same_host {
        if device.is_some() {
            let why = "the region is host memory; map it for the host".into();
            return Err(refuse(TransportKind::Shm, why));
        }
        let client = conn.shm(config)?;
        let map = client.region(region.id)?;
        if offset.checked_add(len).is_none_or(|end| end > map.data_len()) {
            return Err(refuse(
                TransportKind::Shm,
                format!("the range exceeds {} ({} bytes)", region.id, map.data_len()),
            ));
        }
        if !client.enter(&map) {
            return Err(Error::RemoteAccessDenied {
                peer: conn.who(),
                addr: remote,
                len,
                reason: format!("the peer unregistered {}", region.id),
            });
        }
        let addr = map.data_addr() + offset;
        return Ok(mapped(addr, None, TransportKind::Shm, Hold::Shm { client, map }));
    }
    if !matches!(region.location.kind, MemoryKind::Device | MemoryKind::DeviceVmm) {
        return Err(refuse(
            TransportKind::Tcp,
            format!(
                "{} memory of a peer {} cannot be mapped (only tcp reaches it)",
                region.location,
                if conn.same_host { "on this host" } else { "on another host" }
            ),
        ));
    }
    let Some(exec) = device else {
        let why = "the region is device memory: name the GPU that will use it".into();
        return Err(refuse(TransportKind::Nvlink, why));
    };
    let (transport, reach) = if conn.same_host {
        (TransportKind::Nvlink, nvlink_reach(&region, config.transports.prefer_ipc))
    } else {
        let fabric = region.reach.iter().find(|r| r.transport() == TransportKind::Mnnvl);
        (TransportKind::Mnnvl, fabric)
    };
    let reach = reach
        .ok_or_else(|| refuse(transport, format!("the region offers no {transport} handle")))?;
    if conn.same_host {
        // Our GPU must reach the peer's GPU (peer access).
        let here = Location { kind: MemoryKind::Device, device: Some(exec) };
        let uuid = reach.device().unwrap_or_default();
        executing_gpu(here, uuid, gpu).map_err(|why| refuse(transport, why))?;
    } else if gpu.uuids.get(exec as usize).is_none() {
        return Err(refuse(transport, format!("cuda:{exec} is not a GPU of this process")));
    }
    let client = conn.nvlink(config)?;
    let (remote_gpu, shift) = client.map(region.id, reach, exec)?;
    let addr = remote.wrapping_add(shift);
    Ok(mapped(addr, Some(exec), transport, Hold::Gpu { client, remote: remote_gpu }))
}
