//! A set of equal GPU buffers, one per rank of a group, each mapped for this rank's GPU: what
//! the EP buffer and the collectives' NVLink path both stand on. This rank's buffer is a
//! transferable allocation (zeroed); every other rank's is mapped with
//! [`Engine::map_peer`](crate::Engine::map_peer) from what that rank published (its engine's
//! name, the buffer's address and length), or recorded as unreached with the engine's reason.

use std::sync::Arc;

use crate::{Engine, Error, MappedPeer};

/// What a rank publishes to the others: its engine's segment name and its buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBuffer {
    pub name: String,
    pub addr: u64,
    pub len: u64,
}

impl PeerBuffer {
    /// The entry of a rank that takes no part (outside an elastic group's view): no buffer.
    pub fn absent() -> Self {
        Self { name: String::new(), addr: 0, len: 0 }
    }

    pub fn is_absent(&self) -> bool {
        self.name.is_empty() && self.addr == 0
    }
}

/// A failure of the set, with what was being done (which rank, which buffer).
#[derive(Debug, Clone)]
pub struct PeersError {
    pub context: String,
    pub source: Error,
}

/// How a rank's buffer is reached.
enum BufferReach {
    /// Ours.
    Local,
    /// Mapped for our GPU.
    Mapped(MappedPeer),
    /// No GPU path reaches it (why).
    Unreached(String),
    /// Takes no part: outside the group's view when the buffers were exchanged (nothing is
    /// mapped; the kernels neither write to it nor wait for it).
    Absent,
}

/// Every rank's buffer of one group, as this rank's GPU addresses them.
pub struct PeerBuffers {
    engine: Arc<Engine>,
    /// What the buffers are for (`EP`, `collective`): in logs and errors.
    what: &'static str,
    rank: usize,
    device: u32,
    addr: u64,
    len: u64,
    maps: Vec<BufferReach>,
}

impl PeerBuffers {
    /// Allocates `bytes` of transferable memory on GPU `device` (the best reach the topology
    /// proves), zeroed; returns `(address, length)`.
    pub fn allocate(
        engine: &Engine,
        what: &str,
        device: u32,
        bytes: u64,
    ) -> Result<(u64, u64), PeersError> {
        let context = format!("allocating the {bytes}-byte {what} buffer on cuda:{device}");
        let a = engine
            .allocate_device(bytes, device, None)
            .map_err(|source| PeersError { context: context.clone(), source })?;
        log::info!(
            "{what} buffer: {} bytes on cuda:{device}, {} ({})",
            a.len,
            a.kind.name(),
            a.reason
        );
        // SAFETY: the allocation was just made, is `a.len` bytes on `device`, and nobody else
        // knows it yet.
        #[allow(unsafe_code)]
        let zeroed = unsafe { tidewire_gpu::alloc::zero_device(device, a.ptr, a.len) };
        if let Err(e) = zeroed {
            let _ = engine.free_device(a.ptr);
            return Err(PeersError { context, source: Error::gpu("zeroing it", e) });
        }
        // The registered range is what was asked for (the allocation may be rounded up).
        Ok((a.ptr, bytes))
    }

    /// Maps every other rank's buffer (`peers[r]`, ours included, allocated by
    /// [`PeerBuffers::allocate`]) for our GPU. A rank no GPU path reaches is recorded with the
    /// reason ([`PeerBuffers::unreached`]); any other failure (the rank's engine cannot be
    /// opened, its buffer is not what it published) is an error naming it. Our buffer belongs
    /// to the set from the call on: freed when the set is dropped, or now if connecting fails.
    pub fn connect(
        engine: Arc<Engine>,
        what: &'static str,
        rank: usize,
        device: u32,
        peers: &[PeerBuffer],
    ) -> Result<Self, PeersError> {
        let Some(mine) = peers.get(rank) else {
            return Err(PeersError {
                context: format!("{what} rank {rank}"),
                source: Error::InvalidArgument {
                    reason: format!("rank {rank} of {} ranks", peers.len()),
                },
            });
        };
        let mut set =
            Self { engine, what, rank, device, addr: mine.addr, len: mine.len, maps: Vec::new() };
        set.map_all(peers)?;
        Ok(set)
    }

    /// Maps every other rank's buffer (`peers` as for [`PeerBuffers::connect`]). A set lives
    /// for one membership: a new one gets new buffers (a process outside it may still write
    /// through its mappings of the old ones).
    fn map_all(&mut self, peers: &[PeerBuffer]) -> Result<(), PeersError> {
        let (what, rank, device) = (self.what, self.rank, self.device);
        let mut maps = Vec::with_capacity(peers.len());
        for (r, p) in peers.iter().enumerate() {
            if r == rank {
                maps.push(BufferReach::Local);
                continue;
            }
            if p.is_absent() {
                log::info!("{what} rank {rank}: rank {r} takes no part (outside the group's view)");
                maps.push(BufferReach::Absent);
                continue;
            }
            let failed = |doing: &str, source| PeersError {
                context: format!("{what} rank {rank}: {doing} rank {r}'s buffer ({})", p.name),
                source,
            };
            let id = self.engine.open_segment(&p.name).map_err(|e| failed("opening", e))?;
            match self.engine.map_peer(id, p.addr, p.len, Some(device)) {
                Ok(map) => {
                    log::info!("{what} rank {rank}: rank {r} over {}", map.transport());
                    maps.push(BufferReach::Mapped(map));
                }
                Err(e @ Error::NoTransport { .. }) => {
                    log::info!("{what} rank {rank}: no GPU path to rank {r}: {e}");
                    maps.push(BufferReach::Unreached(e.to_string()));
                }
                Err(e) => return Err(failed("mapping", e)),
            }
        }
        self.maps = maps;
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn ranks(&self) -> usize {
        self.maps.len()
    }

    /// The length of the smallest rank's buffer (ours and the mapped ones).
    pub fn smallest(&self) -> u64 {
        self.maps
            .iter()
            .filter_map(|m| match m {
                BufferReach::Local => Some(self.len),
                BufferReach::Mapped(m) => Some(m.len()),
                BufferReach::Unreached(_) | BufferReach::Absent => None,
            })
            .min()
            .unwrap_or(0)
    }

    /// The ranks no GPU path reaches, with the reason.
    pub fn unreached(&self) -> Vec<(usize, String)> {
        self.maps
            .iter()
            .enumerate()
            .filter_map(|(r, m)| match m {
                BufferReach::Unreached(why) => Some((r, why.clone())),
                _ => None,
            })
            .collect()
    }

    /// How each rank is reached (`local` for ourselves, `none` where no GPU path does).
    pub fn paths(&self) -> Vec<String> {
        self.maps
            .iter()
            .map(|m| match m {
                BufferReach::Local => "local".to_string(),
                BufferReach::Mapped(m) => m.transport().to_string(),
                BufferReach::Unreached(_) => "none".to_string(),
                BufferReach::Absent => "absent".to_string(),
            })
            .collect()
    }

    /// Each rank's buffer as our GPU addresses it and its liveness word (0 for ourselves; both
    /// 0 for an absent rank), in rank order, when every rank taking part is reached and its
    /// buffer holds `need` bytes; else why not.
    pub fn addresses(&self, need: u64) -> Result<Vec<(u64, u64)>, String> {
        let mut out = Vec::with_capacity(self.maps.len());
        for (r, m) in self.maps.iter().enumerate() {
            match m {
                BufferReach::Mapped(m) if m.len() < need => {
                    return Err(format!(
                        "the call needs {need} bytes of every rank's buffer; rank {r}'s has {}",
                        m.len()
                    ))
                }
                BufferReach::Mapped(m) => out.push((m.addr(), m.alive_flag().unwrap_or(0))),
                BufferReach::Local => out.push((self.addr, 0)),
                BufferReach::Absent => out.push((0, 0)),
                BufferReach::Unreached(why) => {
                    return Err(format!(
                        "rank {r} is reached by no GPU path ({why}): the kernels cannot run"
                    ))
                }
            }
        }
        Ok(out)
    }
}

impl Drop for PeerBuffers {
    fn drop(&mut self) {
        self.maps.clear();
        if let Err(e) = self.engine.free_device(self.addr) {
            log::warn!("{} rank {}: freeing the buffer: {e}", self.what, self.rank);
        }
    }
}
