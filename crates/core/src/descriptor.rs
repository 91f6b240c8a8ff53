//! Segment descriptors: what a peer needs to know to reach an engine's memory.
//!
//! A descriptor is versioned JSON, small and stable, published through the metadata backend
//! (or served from the engine's RPC port in peer-to-peer mode). Every region states its
//! *reach*: the transports that can serve it and what they need. Decoding validates the whole
//! document, because it arrives from the network.

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, InstanceId, RegionId};
use crate::memory::Location;
use crate::paged::LayoutDescriptor;
use crate::select::TransportKind;
use crate::CoreError;

/// The descriptor version this build writes and reads.
pub const DESCRIPTOR_VERSION: u32 = 1;

/// Largest descriptor document accepted from the network.
pub const MAX_DESCRIPTOR_BYTES: usize = 16 << 20;

/// One engine's published view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDescriptor {
    pub version: u32,
    /// The segment name (`host:port` in peer-to-peer mode).
    pub name: String,
    /// New on every engine start: a changed id means the peer restarted.
    pub instance_id: InstanceId,
    /// Same host id means same kernel and network namespace (shm and Unix sockets reach).
    pub host_id: HostId,
    /// The host's name, for messages.
    pub hostname: String,
    /// The RPC/data endpoint that is listening (what was bound, never what was asked for).
    pub rpc_addr: String,
    /// The abstract Unix socket that hands out shared-memory descriptors, when shm is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_socket: Option<String>,
    /// Bumped on every registration change.
    pub generation: u64,
    /// Registered regions, sorted by address, non-overlapping.
    pub regions: Vec<RegionDescriptor>,
    /// Paged layouts (KV caches) registered over those regions, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layouts: Vec<LayoutDescriptor>,
}

/// One registered region and how it can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDescriptor {
    pub id: RegionId,
    pub addr: u64,
    pub len: u64,
    pub location: Location,
    pub reach: Vec<Reach>,
}

impl RegionDescriptor {
    /// True when `[addr, addr+len)` lies inside this region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.addr.checked_add(self.len)) {
            (Some(end), Some(region_end)) => addr >= self.addr && end <= region_end,
            _ => false,
        }
    }

    /// True when the region advertises `transport`.
    pub fn reachable_by(&self, transport: TransportKind) -> bool {
        self.reach.iter().any(|r| r.transport() == transport)
    }
}

/// A way to reach a region, with what that transport needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reach {
    /// Served by the engine's RPC/data port: any host memory.
    Tcp,
    /// A shareable memfd handed out by the segment's `shm_socket` (same host only).
    Shm,
    /// `cudaMalloc` memory: the CUDA IPC handle (128 hex digits) of the allocation that
    /// starts at `base` and spans `size` bytes, on the GPU with UUID `device`.
    CudaIpc { handle: String, base: u64, size: u64, device: String },
    /// A VMM allocation mapped at `[base, base+size)` on `device`, whose POSIX file
    /// descriptor the segment's `shm_socket` hands out (same host only).
    VmmFd { base: u64, size: u64, device: String },
    /// A VMM allocation exportable as a FABRIC handle (128 hex digits), offered only when the
    /// owner's fabric probe passed; reachable from GPUs of the same cluster and clique.
    Fabric {
        handle: String,
        base: u64,
        size: u64,
        device: String,
        cluster_uuid: String,
        clique_id: u32,
    },
    /// Registered with a libfabric domain (an RDMA NIC, or the `tcp` provider) for one-sided
    /// RMA: the owner's endpoint on that NIC (`endpoint`, its address in hex), the key and the
    /// address that names the region's first byte in RMA calls. One per NIC the region is
    /// registered with.
    Rma { provider: String, nic: String, endpoint: String, key: u64, addr: u64 },
}

impl Reach {
    pub fn transport(&self) -> TransportKind {
        match self {
            Self::Tcp => TransportKind::Tcp,
            Self::Shm => TransportKind::Shm,
            Self::CudaIpc { .. } | Self::VmmFd { .. } => TransportKind::Nvlink,
            Self::Fabric { .. } => TransportKind::Mnnvl,
            Self::Rma { .. } => TransportKind::Fabric,
        }
    }

    /// The device UUID of a GPU reach.
    pub fn device(&self) -> Option<&str> {
        match self {
            Self::CudaIpc { device, .. }
            | Self::VmmFd { device, .. }
            | Self::Fabric { device, .. } => Some(device),
            Self::Tcp | Self::Shm | Self::Rma { .. } => None,
        }
    }

    /// The allocation a GPU reach maps: (base, size).
    pub fn allocation(&self) -> Option<(u64, u64)> {
        match self {
            Self::CudaIpc { base, size, .. }
            | Self::VmmFd { base, size, .. }
            | Self::Fabric { base, size, .. } => Some((*base, *size)),
            Self::Tcp | Self::Shm | Self::Rma { .. } => None,
        }
    }
}

/// Encodes bytes as lowercase hex digits.
pub fn bytes_to_hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex digits into bytes (`None` if malformed).
pub fn bytes_from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// Encodes a 64-byte handle as 128 lowercase hex digits.
pub fn handle_to_hex(h: &[u8; 64]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes 128 hex digits into a 64-byte handle.
pub fn handle_from_hex(text: &str) -> Option<[u8; 64]> {
    let bytes = text.as_bytes();
    if bytes.len() != 128 {
        return None;
    }
    let mut out = [0u8; 64];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

impl SegmentDescriptor {
    /// Encodes to JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and validates a descriptor from untrusted bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, CoreError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(CoreError::Descriptor {
                reason: format!("{} bytes, limit {MAX_DESCRIPTOR_BYTES}", bytes.len()),
            });
        }
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| CoreError::Descriptor { reason: e.to_string() })?;
        if probe.version != DESCRIPTOR_VERSION {
            return Err(CoreError::DescriptorVersion {
                found: probe.version,
                supported: DESCRIPTOR_VERSION,
            });
        }
        let desc: SegmentDescriptor = serde_json::from_slice(bytes)
            .map_err(|e| CoreError::Descriptor { reason: e.to_string() })?;
        desc.validate()?;
        Ok(desc)
    }

    fn validate(&self) -> Result<(), CoreError> {
        let bad = |reason: String| Err(CoreError::Descriptor { reason });
        if self.name.is_empty() {
            return bad("empty segment name".into());
        }
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            let Some(end) = r.addr.checked_add(r.len) else {
                return bad(format!("{} at {:#x}+{} wraps the address space", r.id, r.addr, r.len));
            };
            if r.len == 0 {
                return bad(format!("{} has zero length", r.id));
            }
            if i > 0 && r.addr < prev_end {
                return bad(format!("{} at {:#x} overlaps or is out of order", r.id, r.addr));
            }
            for reach in &r.reach {
                let needs_socket = matches!(reach, Reach::Shm | Reach::VmmFd { .. });
                if needs_socket && self.shm_socket.is_none() {
                    return bad(format!(
                        "{} offers {} but the segment has no shm socket",
                        r.id,
                        reach.transport()
                    ));
                }
                if let Reach::CudaIpc { handle, .. } | Reach::Fabric { handle, .. } = reach {
                    if handle_from_hex(handle).is_none() {
                        return bad(format!("{} has a malformed GPU handle", r.id));
                    }
                }
                if let Reach::Rma { endpoint, .. } = reach {
                    let hex = endpoint.len().is_multiple_of(2)
                        && endpoint.len() <= 1024
                        && endpoint.bytes().all(|b| b.is_ascii_hexdigit());
                    if endpoint.is_empty() || !hex {
                        return bad(format!("{} has a malformed fabric endpoint address", r.id));
                    }
                }
                if let Some((base, size)) = reach.allocation() {
                    let inside = r.addr >= base && base.checked_add(size).is_some_and(|e| end <= e);
                    if !inside {
                        return bad(format!(
                            "{} [{:#x}, +{}) lies outside its allocation [{base:#x}, +{size})",
                            r.id, r.addr, r.len
                        ));
                    }
                }
            }
            prev_end = end;
        }
        for (i, l) in self.layouts.iter().enumerate() {
            l.validate().map_err(|e| CoreError::Descriptor { reason: e.to_string() })?;
            if self.layouts[..i].iter().any(|o| o.name == l.name) {
                return bad(format!("layout {:?} is published twice", l.name));
            }
        }
        Ok(())
    }

    /// The layout named `name`, if the peer published one.
    pub fn layout(&self, name: &str) -> Option<&LayoutDescriptor> {
        self.layouts.iter().find(|l| l.name == name)
    }

    /// The region containing `[addr, addr+len)`, if any.
    pub fn find_region(&self, addr: u64, len: u64) -> Option<&RegionDescriptor> {
        self.region_index(addr, len).map(|i| &self.regions[i])
    }

    /// The index in `regions` of the region [`SegmentDescriptor::find_region`] finds.
    pub fn region_index(&self, addr: u64, len: u64) -> Option<usize> {
        let idx = self.regions.partition_point(|r| r.addr <= addr).checked_sub(1)?;
        self.regions.get(idx)?.contains(addr, len).then_some(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryKind;

    pub(crate) fn sample() -> SegmentDescriptor {
        let host = Location { kind: MemoryKind::HostPageable, device: None };
        SegmentDescriptor {
            version: DESCRIPTOR_VERSION,
            name: "127.0.0.1:15001".into(),
            instance_id: InstanceId(0xfeed_beef),
            host_id: HostId("boot-1/net-2".into()),
            hostname: "node0".into(),
            rpc_addr: "127.0.0.1:15001".into(),
            shm_socket: Some("tidewire-00ff".into()),
            generation: 3,
            layouts: Vec::new(),
            regions: vec![
                RegionDescriptor {
                    id: RegionId(1),
                    addr: 0x1000,
                    len: 0x1000,
                    location: host,
                    reach: vec![Reach::Tcp],
                },
                RegionDescriptor {
                    id: RegionId(2),
                    addr: 0x4000,
                    len: 0x2000,
                    location: Location { kind: MemoryKind::HostShared, device: None },
                    reach: vec![Reach::Shm, Reach::Tcp],
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_finds_regions() {
        let d = sample();
        let back = SegmentDescriptor::from_json(&d.to_json());
        assert_eq!(back.as_ref(), Ok(&d));
        assert_eq!(d.find_region(0x1000, 0x1000).map(|r| r.id), Some(RegionId(1)));
        assert_eq!(d.find_region(0x1800, 0x10).map(|r| r.id), Some(RegionId(1)));
        assert_eq!(d.find_region(0x1800, 0x801).map(|r| r.id), None);
        assert_eq!(d.find_region(0x3fff, 1).map(|r| r.id), None);
        assert_eq!(d.find_region(0x5fff, 1).map(|r| r.id), Some(RegionId(2)));
        assert_eq!(d.find_region(0x6000, 1).map(|r| r.id), None);
        assert_eq!(d.find_region(0, 1).map(|r| r.id), None);
        assert_eq!(d.find_region(u64::MAX, 2).map(|r| r.id), None);
    }

    #[test]
    fn gpu_reach_round_trips() {
        let mut d = sample();
        let h = [0xabu8; 64];
        d.regions[1].reach = vec![
            Reach::CudaIpc {
                handle: handle_to_hex(&h),
                base: 0x4000,
                size: 0x2000,
                device: "G".into(),
            },
            Reach::VmmFd { base: 0x3000, size: 0x4000, device: "G".into() },
        ];
        let back = SegmentDescriptor::from_json(&d.to_json());
        assert_eq!(back.as_ref(), Ok(&d));
        assert_eq!(handle_from_hex(&handle_to_hex(&h)), Some(h));
        assert_eq!(d.regions[1].reach[0].transport(), TransportKind::Nvlink);
    }

    #[test]
    fn rejects_bad_documents() {
        let mut d = sample();
        d.version = 9;
        assert!(matches!(
            SegmentDescriptor::from_json(&d.to_json()),
            Err(CoreError::DescriptorVersion { found: 9, .. })
        ));
        let mut d = sample();
        d.regions[1].addr = 0x1800;
        assert!(SegmentDescriptor::from_json(&d.to_json()).is_err());
        let mut d = sample();
        d.regions[0].addr = u64::MAX;
        assert!(SegmentDescriptor::from_json(&d.to_json()).is_err());
        let mut d = sample();
        d.shm_socket = None;
        assert!(SegmentDescriptor::from_json(&d.to_json()).is_err());
        let mut d = sample();
        d.regions[1].reach.push(Reach::CudaIpc {
            handle: "zz".into(),
            base: 0x4000,
            size: 0x2000,
            device: "GPU-0".into(),
        });
        assert!(SegmentDescriptor::from_json(&d.to_json()).is_err());
        let mut d = sample();
        d.regions[1].reach.push(Reach::VmmFd {
            base: 0x5000,
            size: 0x2000,
            device: "GPU-0".into(),
        });
        assert!(SegmentDescriptor::from_json(&d.to_json()).is_err(), "outside its allocation");
        assert!(SegmentDescriptor::from_json(b"{\"version\":1}").is_err());
        assert!(SegmentDescriptor::from_json(b"[1,2,3]").is_err());
        assert!(SegmentDescriptor::from_json(b"").is_err());
    }
}
