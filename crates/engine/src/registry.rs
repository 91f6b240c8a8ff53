//! The local memory registry: which ranges peers may touch, and the guards that make
//! unregistration wait for in-flight accesses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::lock_api::ArcRwLockReadGuard;
use parking_lot::{RawRwLock, RwLock, RwLockReadGuard};
use tidewire_core::descriptor::{Reach, RegionDescriptor};
use tidewire_core::memory::Location;
use tidewire_core::RegionId;

use crate::error::{Error, Result};
use crate::transport::fabric::FabricRegion;
use crate::transport::nvlink::GpuRegion;
use crate::transport::shm::SharedRegion;

/// One registered region.
pub(crate) struct RegionEntry {
    pub(crate) id: RegionId,
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) location: Location,
    /// Set for engine-allocated shareable memory (served to same-host peers).
    pub(crate) shared: Option<Arc<SharedRegion>>,
    /// Set for exported device memory (served to same-host peers over NVLink).
    pub(crate) gpu: Option<Arc<GpuRegion>>,
    /// Set when the region is registered with the engine's fabric NICs.
    pub(crate) fabric: Option<Arc<FabricRegion>>,
    /// Memory the engine keeps alive while the region is registered (safe registrations).
    pub(crate) _owner: Option<Arc<dyn Send + Sync>>,
    /// `true` while registered. Accesses hold a read guard; unregistration takes the write
    /// lock, so it returns only after every in-flight access has finished.
    live: Arc<RwLock<bool>>,
}

/// A pin that can outlive the call that took it (held by GPU copies until their event
/// completes, on another thread).
pub(crate) type OwnedAccess = ArcRwLockReadGuard<RawRwLock, bool>;

/// Proof that a region stays registered while the guard lives.
pub(crate) type Access<'a> = RwLockReadGuard<'a, bool>;

/// A range inside a live registered region, pinned there while this value lives. Only
/// [`RegionEntry::pin`] and [`RunAccess::pin`] make one, so holding it proves the bytes are
/// mapped: by registering, the caller promised they stay valid until unregistration, which
/// waits for the guard (this value's own, or the run's it borrows).
pub(crate) struct Pinned<'a> {
    addr: u64,
    len: u64,
    /// `None`: the guard is a [`RunAccess`]'s, borrowed for `'a`.
    _guard: Option<Access<'a>>,
}

/// One access guard of a region for a run of ranges (one lock for all of them, instead of
/// one per range): ranges pinned through it borrow it.
pub(crate) struct RunAccess<'a> {
    entry: &'a RegionEntry,
    _guard: Access<'a>,
}

impl RunAccess<'_> {
    /// Pins `[addr, addr+len)` under this run's guard: `None` unless it lies in the region.
    pub(crate) fn pin(&self, addr: u64, len: u64) -> Option<Pinned<'_>> {
        self.entry.contains(addr, len).then_some(Pinned { addr, len, _guard: None })
    }
}

impl Pinned<'_> {
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// A range pinned by an owned guard: unlike [`Pinned`] it can be held across calls and moved
/// between threads (an I/O loop holds one while a payload streams in or out of the range).
pub(crate) struct OwnedPinned {
    addr: u64,
    len: u64,
    _guard: OwnedAccess,
}

impl OwnedPinned {
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

impl RegionEntry {
    /// As [`RegionEntry::pin`], owned, and without waiting: `None` also while an
    /// unregistration of the region is under way (it would refuse the access a moment later).
    /// A thread serving many connections never waits here behind an unregistration that
    /// waits for a pin the same thread holds.
    pub(crate) fn try_pin_owned(&self, addr: u64, len: u64) -> Option<OwnedPinned> {
        if !self.contains(addr, len) {
            return None;
        }
        let guard = self.live.try_read_arc()?;
        (*guard).then_some(OwnedPinned { addr, len, _guard: guard })
    }

    /// A guard if the region is still registered.
    pub(crate) fn access(&self) -> Option<Access<'_>> {
        let g = self.live.read();
        (*g).then_some(g)
    }

    /// An owned guard if the region is still registered.
    pub(crate) fn access_owned(&self) -> Option<OwnedAccess> {
        let g = self.live.read_arc();
        (*g).then_some(g)
    }

    /// As [`RegionEntry::access_owned`], without waiting: `None` also while an
    /// unregistration waits for the region's accesses to end (a caller already holding an
    /// access of this region must not queue behind it).
    pub(crate) fn try_access_owned(&self) -> Option<OwnedAccess> {
        let g = self.live.try_read_arc()?;
        (*g).then_some(g)
    }

    /// The revocation page of shared host memory or exported device memory.
    pub(crate) fn control(&self) -> Option<&SharedRegion> {
        self.shared.as_deref().or(self.gpu.as_ref().map(|g| &g.control))
    }

    /// Pins `[addr, addr+len)` for an access: `None` unless it lies inside this region and
    /// the region is still registered.
    pub(crate) fn pin(&self, addr: u64, len: u64) -> Option<Pinned<'_>> {
        if !self.contains(addr, len) {
            return None;
        }
        self.access().map(|guard| Pinned { addr, len, _guard: Some(guard) })
    }

    /// An access guard for a run of ranges, if the region is still registered.
    pub(crate) fn run_access(&self) -> Option<RunAccess<'_>> {
        self.access().map(|guard| RunAccess { entry: self, _guard: guard })
    }

    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.addr + self.len)
    }

    pub(crate) fn descriptor(&self) -> RegionDescriptor {
        let mut reach = Vec::new();
        if self.shared.is_some() {
            reach.push(Reach::Shm);
        }
        if let Some(g) = &self.gpu {
            reach.extend(g.reach.iter().cloned());
        }
        if let Some(f) = &self.fabric {
            reach.extend(f.reach.iter().cloned());
        }
        if self.location.kind.is_host() {
            reach.push(Reach::Tcp);
        }
        RegionDescriptor {
            id: self.id,
            addr: self.addr,
            len: self.len,
            location: self.location,
            reach,
        }
    }
}

/// A registration request.
pub(crate) struct NewRegion {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) location: Location,
    pub(crate) shared: Option<Arc<SharedRegion>>,
    pub(crate) gpu: Option<Arc<GpuRegion>>,
    pub(crate) fabric: Option<Arc<FabricRegion>>,
    pub(crate) owner: Option<Arc<dyn Send + Sync>>,
}

impl NewRegion {
    /// Memory the caller registers (not engine-allocated shareable memory), exported to the
    /// GPU transports when `gpu` is set; the fabric registration is added by the engine.
    pub(crate) fn user(
        addr: u64,
        len: u64,
        location: Location,
        gpu: Option<Arc<GpuRegion>>,
        owner: Option<Arc<dyn Send + Sync>>,
    ) -> Self {
        Self { addr, len, location, shared: None, gpu, fabric: None, owner }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    regions: RwLock<BTreeMap<u64, Arc<RegionEntry>>>,
    next_id: AtomicU64,
    generation: AtomicU64,
}

impl Registry {
    /// Registers all of `news` or none of them.
    pub(crate) fn register(&self, news: Vec<NewRegion>) -> Result<Vec<RegionId>> {
        let mut map = self.regions.write();
        let mut sorted: Vec<&NewRegion> = news.iter().collect();
        sorted.sort_by_key(|n| n.addr);
        for (i, n) in sorted.iter().enumerate() {
            if n.len == 0 {
                return Err(Error::InvalidArgument {
                    reason: format!("zero-length registration at {:#x}", n.addr),
                });
            }
            let Some(end) = n.addr.checked_add(n.len) else {
                return Err(Error::InvalidArgument {
                    reason: format!("[{:#x}, +{}) wraps the address space", n.addr, n.len),
                });
            };
            let clash = map
                .range(..end)
                .next_back()
                .map(|(_, e)| (e.addr, e.len))
                .filter(|(a, l)| a + l > n.addr)
                .or_else(|| {
                    sorted
                        .get(i + 1)
                        .filter(|next| next.addr < end)
                        .map(|next| (next.addr, next.len))
                });
            if let Some((existing_addr, existing_len)) = clash {
                return Err(Error::Overlap {
                    addr: n.addr,
                    len: n.len,
                    existing_addr,
                    existing_len,
                });
            }
        }
        let mut ids = Vec::with_capacity(news.len());
        for n in news {
            let id = RegionId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
            let entry = RegionEntry {
                id,
                addr: n.addr,
                len: n.len,
                location: n.location,
                shared: n.shared,
                gpu: n.gpu,
                fabric: n.fabric,
                _owner: n.owner,
                live: Arc::new(RwLock::new(true)),
            };
            map.insert(n.addr, Arc::new(entry));
            ids.push(id);
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(ids)
    }

    /// Unregisters the regions starting at `addrs` (all must exist), waiting for in-flight
    /// accesses to each to finish. Returns the removed entries.
    pub(crate) fn unregister(&self, addrs: &[u64]) -> Result<Vec<Arc<RegionEntry>>> {
        let removed = {
            let mut map = self.regions.write();
            if let Some(&addr) = addrs.iter().find(|a| !map.contains_key(a)) {
                return Err(Error::NotRegistered { addr, len: 0 });
            }
            let removed: Vec<_> = addrs.iter().filter_map(|a| map.remove(a)).collect();
            self.generation.fetch_add(1, Ordering::Relaxed);
            removed
        };
        for entry in &removed {
            // Waits for every access guard; afterwards no access can start.
            *entry.live.write() = false;
            // Then peers' NIC accesses are refused too.
            if let Some(f) = &entry.fabric {
                f.close();
            }
        }
        Ok(removed)
    }

    /// The live region containing `[addr, addr+len)`.
    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<Arc<RegionEntry>> {
        let map = self.regions.read();
        let (_, e) = map.range(..=addr).next_back()?;
        e.contains(addr, len).then(|| e.clone())
    }

    pub(crate) fn by_id(&self, id: RegionId) -> Option<Arc<RegionEntry>> {
        self.regions.read().values().find(|e| e.id == id).cloned()
    }

    /// Every registered region with a revocation page.
    pub(crate) fn controlled(&self) -> Vec<Arc<RegionEntry>> {
        self.regions.read().values().filter(|e| e.control().is_some()).cloned().collect()
    }

    /// The generation and descriptors of every region, sorted by address.
    pub(crate) fn snapshot(&self) -> (u64, Vec<RegionDescriptor>) {
        let map = self.regions.read();
        (self.generation.load(Ordering::Relaxed), map.values().map(|e| e.descriptor()).collect())
    }

    pub(crate) fn drain(&self) -> Vec<Arc<RegionEntry>> {
        let addrs: Vec<u64> = self.regions.read().keys().copied().collect();
        self.unregister(&addrs).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidewire_core::memory::MemoryKind;

    fn host(addr: u64, len: u64) -> NewRegion {
        NewRegion {
            addr,
            len,
            location: Location { kind: MemoryKind::HostPageable, device: None },
            shared: None,
            gpu: None,
            fabric: None,
            owner: None,
        }
    }

    #[test]
    fn overlaps_zero_length_and_unknown_addresses_are_typed_errors() {
        let r = Registry::default();
        r.register(vec![host(0x1000, 0x1000)]).unwrap();
        assert!(matches!(r.register(vec![host(0x1800, 0x10)]), Err(Error::Overlap { .. })));
        assert!(matches!(r.register(vec![host(0x800, 0x801)]), Err(Error::Overlap { .. })));
        assert!(matches!(r.register(vec![host(0x3000, 0)]), Err(Error::InvalidArgument { .. })));
        assert!(matches!(
            r.register(vec![host(0x3000, 0x100), host(0x30f0, 0x100)]),
            Err(Error::Overlap { .. })
        ));
        assert!(r.find(0x3000, 1).is_none(), "a failed batch registers nothing");
        r.register(vec![host(0x2000, 0x1000)]).unwrap();
        assert!(r.find(0x1fff, 2).is_none(), "a range spanning two regions is not inside one");
        assert!(matches!(r.unregister(&[0x1234]), Err(Error::NotRegistered { .. })));
        let e = r.find(0x1000, 0x1000).unwrap();
        r.unregister(&[0x1000]).unwrap();
        assert!(e.access().is_none(), "unregistered regions refuse access");
        assert!(r.find(0x1000, 1).is_none());
    }
}
