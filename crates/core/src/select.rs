//! Transport selection: a pure function from (local memory, remote region, topology, options)
//! to a transport and the reason it was chosen, or to the list of transports considered and
//! why each refused. `tidewire info` prints these same reasons.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::descriptor::{Reach, RegionDescriptor};
use crate::memory::{Location, MemoryKind};
use crate::CoreError;

/// The transports, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransportKind {
    /// Same engine: a copy within the process.
    Local,
    /// Same host, GPU memory with peer access: CUDA IPC or VMM POSIX-FD handles.
    Nvlink,
    /// Same proven NVLink fabric clique: VMM FABRIC handles.
    Mnnvl,
    /// Same host, shareable host memory (memfd).
    Shm,
    /// Memory registered with a libfabric domain (RDMA NICs: verbs, efa; or a provider
    /// asked for by name): one-sided RMA.
    Fabric,
    /// Any host memory, through the engine's RPC/data port.
    Tcp,
}

impl TransportKind {
    /// Every transport, in order of preference.
    pub const ALL: [TransportKind; 6] =
        [Self::Local, Self::Nvlink, Self::Mnnvl, Self::Shm, Self::Fabric, Self::Tcp];
    /// The transports this build implements.
    pub const IMPLEMENTED: [TransportKind; 6] = Self::ALL;

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Nvlink => "nvlink",
            Self::Mnnvl => "mnnvl",
            Self::Shm => "shm",
            Self::Fabric => "fabric",
            Self::Tcp => "tcp",
        }
    }

    /// Parses a transport name (`tcp`, `fabric`, `shm`, `local`, `nvlink`, `mnnvl`).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(text.trim()))
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of the selection policy, from configuration and the `MC_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectionOptions {
    /// Transports this engine may use.
    pub enabled: BTreeSet<TransportKind>,
    /// `MC_FORCE_TCP`: every request goes over TCP.
    pub force_tcp: bool,
    /// `MC_USE_NVLINK_IPC`: between CUDA IPC and VMM handles, prefer CUDA IPC.
    pub prefer_ipc: bool,
    /// `MC_FORCE_MNNVL`: GPU memory goes over the fabric (mnnvl), even within a host.
    pub force_mnnvl: bool,
}

impl Default for SelectionOptions {
    fn default() -> Self {
        Self {
            enabled: TransportKind::IMPLEMENTED.into_iter().collect(),
            force_tcp: false,
            prefer_ipc: false,
            force_mnnvl: false,
        }
    }
}

/// What this process knows about its GPUs, for the GPU transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    /// `Err(reason)` when this process cannot run GPU copies (no driver, no GPU).
    pub available: Result<(), String>,
    /// UUID of each visible GPU, by CUDA ordinal.
    pub uuids: Vec<String>,
    /// `peer_access[i][j]`: GPU i can map GPU j's memory.
    pub peer_access: Vec<Vec<bool>>,
    /// This host's fabric identity (cluster UUID, clique id) when the fabric is proven, else
    /// why not.
    pub fabric: Result<(String, u32), String>,
}

impl GpuFacts {
    /// A process without GPUs.
    pub fn none(reason: &str) -> Self {
        Self {
            available: Err(reason.to_string()),
            uuids: Vec::new(),
            peer_access: Vec::new(),
            fabric: Err(reason.to_string()),
        }
    }

    fn ordinal(&self, uuid: &str) -> Option<u32> {
        self.uuids.iter().position(|u| u == uuid).map(|i| i as u32)
    }

    fn can_access(&self, a: u32, b: u32) -> bool {
        a == b
            || self.peer_access.get(a as usize).and_then(|r| r.get(b as usize)).copied()
                == Some(true)
    }
}

/// This engine's fabric endpoint, for the fabric transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricFacts {
    /// The libfabric provider this engine's endpoints run (`efa`, `verbs`, `tcp`, ...), or why
    /// it has none.
    pub provider: Result<String, String>,
    /// Whether its endpoints may register GPU memory (`FI_HMEM`).
    pub hmem: bool,
}

impl FabricFacts {
    /// An engine without a fabric endpoint.
    pub fn none(reason: &str) -> Self {
        Self { provider: Err(reason.to_string()), hmem: false }
    }
}

/// The reach the nvlink transport uses for `region`: VMM POSIX-FD first, CUDA IPC first when
/// `prefer_ipc` (`MC_USE_NVLINK_IPC`).
pub fn nvlink_reach(region: &RegionDescriptor, prefer_ipc: bool) -> Option<&Reach> {
    let ipc = region.reach.iter().find(|r| matches!(r, Reach::CudaIpc { .. }));
    let fd = region.reach.iter().find(|r| matches!(r, Reach::VmmFd { .. }));
    if prefer_ipc {
        ipc.or(fd)
    } else {
        fd.or(ipc)
    }
}

/// The GPU that runs a copy between local memory at `local` and a remote GPU reach: the
/// local GPU for device memory, the remote GPU for pinned host memory. Also checks that it
/// can map the remote GPU's memory.
pub fn executing_gpu(local: Location, remote_uuid: &str, gpu: &GpuFacts) -> Result<u32, String> {
    let remote = gpu
        .ordinal(remote_uuid)
        .ok_or_else(|| format!("the remote GPU {remote_uuid} is not visible to this process"))?;
    let exec = match (local.kind, local.device) {
        (MemoryKind::Device | MemoryKind::DeviceVmm, Some(d)) => d,
        (MemoryKind::HostPinned, _) => remote,
        (kind, _) => {
            return Err(format!(
                "local memory is {kind}: GPUs copy only device or pinned host memory"
            ))
        }
    };
    if !gpu.can_access(exec, remote) {
        return Err(format!("cuda:{exec} has no peer access to cuda:{remote}"));
    }
    Ok(exec)
}

/// Reads a boolean environment value the way Mooncake does (`1`, `true`, `yes`, `on`).
pub fn env_flag(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

impl SelectionOptions {
    /// Applies the `MC_*` environment, read through `lookup` (so tests pass a map).
    /// Contradictory settings are a configuration error.
    pub fn apply_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self, CoreError> {
        let flag = |k: &str| env_flag(lookup(k).as_deref());
        if flag("MC_INTRANODE_NVLINK") && flag("MC_FORCE_MNNVL") {
            return Err(CoreError::Config {
                reason: "MC_INTRANODE_NVLINK and MC_FORCE_MNNVL are both set; they select \
                         different NVLink paths and must not be combined"
                    .into(),
            });
        }
        self.prefer_ipc = flag("MC_USE_NVLINK_IPC");
        self.force_mnnvl = flag("MC_FORCE_MNNVL");
        if flag("MC_FORCE_TCP") {
            if !self.enabled.contains(&TransportKind::Tcp) {
                return Err(CoreError::Config {
                    reason: "MC_FORCE_TCP is set but the tcp transport is disabled".into(),
                });
            }
            self.force_tcp = true;
        }
        Ok(self)
    }
}

/// What is known about the two ends of a request.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints<'a> {
    /// The local memory the request reads from or writes into.
    pub local: Location,
    /// The remote region it targets.
    pub remote: &'a RegionDescriptor,
    /// The peer is this very engine.
    pub same_engine: bool,
    /// The peer's host id equals ours.
    pub same_host: bool,
    /// This process's GPUs.
    pub gpu: &'a GpuFacts,
    /// This engine's fabric endpoint.
    pub fabric: &'a FabricFacts,
}

/// The transport chosen and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub transport: TransportKind,
    pub reason: String,
}

/// A transport that was considered and refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub transport: TransportKind,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: no — {}", self.transport, self.reason)
    }
}

/// Formats a list of refusals as one line (for error messages).
pub fn describe_refusals(refusals: &[Refusal]) -> String {
    refusals.iter().map(Refusal::to_string).collect::<Vec<_>>().join("; ")
}

/// Chooses the transport for one request. Pure: same inputs, same answer.
pub fn select(ends: Endpoints<'_>, opts: &SelectionOptions) -> Result<Choice, Vec<Refusal>> {
    let mut refusals = Vec::new();
    for transport in TransportKind::ALL {
        match judge::<String>(transport, ends, opts) {
            Ok(reason) => return Ok(Choice { transport, reason }),
            Err(reason) => refusals.push(Refusal { transport, reason }),
        }
    }
    Err(refusals)
}

/// The transport [`select`] chooses, without its reasons (none is written: the planning of
/// every request takes this; [`select`] says why when it is `None`).
pub fn choose(ends: Endpoints<'_>, opts: &SelectionOptions) -> Option<TransportKind> {
    TransportKind::ALL.into_iter().find(|t| judge::<()>(*t, ends, opts).is_ok())
}

/// A reason as [`judge`] gives it: written out (`String`), or not at all (`()`), so that
/// choosing costs no formatting.
trait Why: Sized {
    fn why(reason: impl FnOnce() -> String) -> Self;
}

impl Why for String {
    fn why(reason: impl FnOnce() -> String) -> Self {
        reason()
    }
}

impl Why for () {
    fn why(_: impl FnOnce() -> String) -> Self {}
}

fn judge<W: Why>(t: TransportKind, e: Endpoints<'_>, opts: &SelectionOptions) -> Result<W, W> {
    let no = |why: &'static str| -> Result<W, W> { Err(W::why(|| why.into())) };
    if !opts.enabled.contains(&t) {
        return no("not enabled in this engine's configuration");
    }
    if opts.force_tcp && t != TransportKind::Tcp {
        return no("MC_FORCE_TCP is set");
    }
    let host_local = e.local.kind.is_host();
    let yes = |why: &'static str| -> Result<W, W> { Ok(W::why(|| why.into())) };
    match t {
        TransportKind::Local => {
            if !e.same_engine {
                return no("the peer is another engine");
            }
            if !host_local || !e.remote.location.kind.is_host() {
                return no("device memory is not copied by the local transport yet");
            }
            yes("the peer is this engine: a copy within the process")
        }
        TransportKind::Nvlink => {
            if opts.force_mnnvl {
                return no("MC_FORCE_MNNVL is set");
            }
            if !e.same_host {
                return no("the peer is on another host");
            }
            let Some(reach) = nvlink_reach(e.remote, opts.prefer_ipc) else {
                return Err(W::why(|| {
                    format!(
                        "remote {} is {}, not exported device memory",
                        e.remote.id, e.remote.location
                    )
                }));
            };
            e.gpu.available.as_ref().map_err(|why| W::why(|| why.clone()))?;
            let uuid = reach.device().unwrap_or_default();
            let exec = executing_gpu(e.local, uuid, e.gpu).map_err(|why| W::why(|| why))?;
            let how = match reach {
                Reach::CudaIpc { .. } => "CUDA IPC handle",
                _ => "VMM POSIX-FD handle",
            };
            Ok(W::why(|| {
                format!("same host; cuda:{exec} maps the remote GPU's memory ({how}, peer access)")
            }))
        }
        TransportKind::Mnnvl => {
            let Some(Reach::Fabric { cluster_uuid, clique_id, .. }) =
                e.remote.reach.iter().find(|r| matches!(r, Reach::Fabric { .. }))
            else {
                return Err(W::why(|| {
                    format!(
                        "remote {} offers no FABRIC handle (its owner found no proven fabric)",
                        e.remote.id
                    )
                }));
            };
            e.gpu.available.as_ref().map_err(|why| W::why(|| why.clone()))?;
            let (cluster, clique) =
                e.gpu.fabric.as_ref().map_err(|r| W::why(|| format!("this host: {r}")))?;
            if cluster != cluster_uuid || clique != clique_id {
                return Err(W::why(|| {
                    format!(
                        "different NVLink domains: ours {cluster}/clique {clique}, the peer's \
                         {cluster_uuid}/clique {clique_id}"
                    )
                }));
            }
            match (e.local.kind, e.local.device) {
                (MemoryKind::Device | MemoryKind::DeviceVmm, Some(_)) => {}
                (kind, _) => {
                    return Err(W::why(|| format!("local memory is {kind}, not device memory")))
                }
            }
            Ok(W::why(|| {
                format!("same NVLink fabric (cluster {cluster}, clique {clique}); FABRIC handle")
            }))
        }
        TransportKind::Shm => {
            if !e.same_host {
                return no("the peer is on another host");
            }
            if !e.remote.reachable_by(TransportKind::Shm) {
                return Err(W::why(|| {
                    format!(
                        "remote {} is {}, not engine-allocated shareable memory",
                        e.remote.id, e.remote.location.kind
                    )
                }));
            }
            if !host_local {
                return Err(W::why(|| format!("local memory is {}", e.local.kind)));
            }
            yes("same host and the remote region is a shareable memfd")
        }
        TransportKind::Fabric => {
            let ours = e
                .fabric
                .provider
                .as_ref()
                .map_err(|why| W::why(|| format!("this engine: {why}")))?;
            let mut theirs = e.remote.reach.iter().filter_map(|r| match r {
                Reach::Rma { provider, .. } => Some(provider.as_str()),
                _ => None,
            });
            let Some(first) = theirs.next() else {
                return Err(W::why(|| {
                    format!(
                        "remote {} is not registered with a fabric NIC (its engine runs no \
                         libfabric provider, or the registration failed)",
                        e.remote.id
                    )
                }));
            };
            if first != ours && theirs.all(|p| p != ours) {
                return Err(W::why(|| {
                    format!(
                        "remote {} is registered with provider {first}, this engine runs {ours}",
                        e.remote.id
                    )
                }));
            }
            if !host_local && !e.fabric.hmem {
                return Err(W::why(|| {
                    format!(
                        "local memory is {}: this engine's {ours} endpoint registers host memory \
                         only (no FI_HMEM)",
                        e.local.kind
                    )
                }));
            }
            Ok(W::why(|| {
                if e.same_host {
                    format!("one-sided RMA through {ours} (the peer is on this host)")
                } else {
                    format!("the peer is on another host; one-sided RMA through {ours}")
                }
            }))
        }
        TransportKind::Tcp => {
            if !e.remote.reachable_by(TransportKind::Tcp) {
                return Err(W::why(|| format!("remote {} does not offer tcp", e.remote.id)));
            }
            if !host_local {
                return Err(W::why(|| format!("local memory is {}", e.local.kind)));
            }
            if opts.force_tcp {
                yes("MC_FORCE_TCP is set")
            } else if e.same_host {
                yes("no faster transport reaches the remote region")
            } else {
                yes("the peer is on another host and no fabric (RDMA) path reaches the region")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RegionId;

    fn region(kind: MemoryKind, reach: Vec<Reach>) -> RegionDescriptor {
        RegionDescriptor {
            id: RegionId(7),
            addr: 0x1000,
            len: 4096,
            location: Location { kind, device: None },
            reach,
        }
    }
    const HOST: Location = Location { kind: MemoryKind::HostPageable, device: None };

    /// [`super::select`], checking on every call of these tests that [`choose`] (what the
    /// planning of requests takes) picks the same transport.
    fn select(ends: Endpoints<'_>, o: &SelectionOptions) -> Result<Choice, Vec<Refusal>> {
        let full = super::select(ends, o);
        assert_eq!(
            choose(ends, o),
            full.as_ref().ok().map(|c| c.transport),
            "choose and select disagree"
        );
        full
    }

    fn pick(
        remote: &RegionDescriptor,
        same_engine: bool,
        same_host: bool,
        o: &SelectionOptions,
    ) -> Result<TransportKind, Vec<Refusal>> {
        let gpu = GpuFacts::none("no GPU in this test");
        let fabric = FabricFacts::none("no fabric in this test");
        select(
            Endpoints { local: HOST, remote, same_engine, same_host, gpu: &gpu, fabric: &fabric },
            o,
        )
        .map(|c| c.transport)
    }

    #[test]
    fn prefers_local_then_shm_then_tcp() {
        let o = SelectionOptions::default();
        let shared = region(MemoryKind::HostShared, vec![Reach::Shm, Reach::Tcp]);
        let plain = region(MemoryKind::HostPageable, vec![Reach::Tcp]);
        assert_eq!(pick(&shared, true, true, &o), Ok(TransportKind::Local));
        assert_eq!(pick(&shared, false, true, &o), Ok(TransportKind::Shm));
        assert_eq!(pick(&shared, false, false, &o), Ok(TransportKind::Tcp));
        assert_eq!(pick(&plain, false, true, &o), Ok(TransportKind::Tcp));
    }

    #[test]
    fn fabric_before_tcp_when_both_ends_run_the_same_provider() {
        let o = SelectionOptions::default();
        let gpu = GpuFacts::none("no GPU in this test");
        let rma = |p: &str| Reach::Rma {
            provider: p.into(),
            nic: "mlx5_0".into(),
            endpoint: "0a0b".into(),
            key: 7,
            addr: 0x1000,
        };
        let plain = region(MemoryKind::HostPageable, vec![rma("verbs"), Reach::Tcp]);
        let shared = region(MemoryKind::HostShared, vec![Reach::Shm, rma("verbs"), Reach::Tcp]);
        let verbs = FabricFacts { provider: Ok("verbs".into()), hmem: false };
        let efa = FabricFacts { provider: Ok("efa".into()), hmem: false };
        let none = FabricFacts::none("libfabric is not installed");
        let ends = |remote, local, same_host, fabric| Endpoints {
            local,
            remote,
            same_engine: false,
            same_host,
            gpu: &gpu,
            fabric,
        };
        let c = select(ends(&plain, HOST, false, &verbs), &o).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(c.transport, TransportKind::Fabric);
        assert!(c.reason.contains("another host") && c.reason.contains("verbs"), "{}", c.reason);
        // Shared memory on the same host stays on shm; the same region from another host
        // goes over the fabric.
        let pick = |e| select(e, &o).map(|c| c.transport);
        assert_eq!(pick(ends(&shared, HOST, true, &verbs)), Ok(TransportKind::Shm));
        assert_eq!(pick(ends(&shared, HOST, false, &verbs)), Ok(TransportKind::Fabric));
        // MC_FORCE_TCP still forces tcp.
        let forced =
            SelectionOptions::default().apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into()));
        let forced = forced.unwrap_or_default();
        let c = select(ends(&plain, HOST, false, &verbs), &forced).map(|c| c.transport);
        assert_eq!(c, Ok(TransportKind::Tcp));
        // Another provider, or none here: tcp, and the fabric's refusal says why.
        for (facts, why) in [
            (&efa, "registered with provider verbs, this engine runs efa"),
            (&none, "this engine: libfabric is not installed"),
        ] {
            assert_eq!(pick(ends(&plain, HOST, false, facts)), Ok(TransportKind::Tcp));
            let refused =
                judge::<String>(TransportKind::Fabric, ends(&plain, HOST, false, facts), &o);
            assert!(refused.as_ref().is_err_and(|r| r.contains(why)), "{refused:?}");
        }
        let tcp_only = region(MemoryKind::HostPageable, vec![Reach::Tcp]);
        let refused =
            judge::<String>(TransportKind::Fabric, ends(&tcp_only, HOST, false, &verbs), &o);
        assert!(refused.is_err_and(|r| r.contains("not registered with a fabric NIC")));
        // GPU memory: only with FI_HMEM.
        let dev = Location { kind: MemoryKind::Device, device: Some(0) };
        let refused = judge::<String>(TransportKind::Fabric, ends(&plain, dev, false, &verbs), &o);
        assert!(refused.is_err_and(|r| r.contains("no FI_HMEM")));
        let hmem = FabricFacts { provider: Ok("verbs".into()), hmem: true };
        assert_eq!(pick(ends(&plain, dev, false, &hmem)), Ok(TransportKind::Fabric));
    }

    #[test]
    fn force_tcp_and_disabled_transports_are_reasons() {
        let shared = region(MemoryKind::HostShared, vec![Reach::Shm, Reach::Tcp]);
        let o =
            SelectionOptions::default().apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into()));
        let o = o.unwrap_or_default();
        assert!(o.force_tcp);
        let gpu = GpuFacts::none("no GPU in this test");
        let c = select(
            Endpoints {
                local: HOST,
                remote: &shared,
                same_engine: false,
                same_host: true,
                gpu: &gpu,
                fabric: &FabricFacts::none("no fabric in this test"),
            },
            &o,
        );
        assert_eq!(c.map(|c| c.reason), Ok("MC_FORCE_TCP is set".to_string()));

        let mut o = SelectionOptions::default();
        o.enabled.remove(&TransportKind::Tcp);
        let refusals = pick(&shared, false, false, &o).err().unwrap_or_default();
        let text = describe_refusals(&refusals);
        assert!(text.contains("shm: no — the peer is on another host"), "{text}");
        assert!(text.contains("tcp: no — not enabled"), "{text}");
        assert_eq!(refusals.len(), TransportKind::ALL.len());
    }

    #[test]
    fn contradictory_env_is_a_config_error() {
        let env = |k: &str| {
            matches!(k, "MC_INTRANODE_NVLINK" | "MC_FORCE_MNNVL").then(|| "true".to_string())
        };
        assert!(matches!(
            SelectionOptions::default().apply_env(env),
            Err(CoreError::Config { .. })
        ));
        assert!(env_flag(Some("ON")) && !env_flag(Some("0")) && !env_flag(None));
    }

    fn gpu_region(device: &str, reach: Vec<Reach>) -> RegionDescriptor {
        RegionDescriptor {
            id: RegionId(9),
            addr: 0x10_0000,
            len: 1 << 20,
            location: Location { kind: MemoryKind::Device, device: Some(1) },
            reach: reach
                .into_iter()
                .map(|r| match r {
                    Reach::VmmFd { base, size, .. } => {
                        Reach::VmmFd { base, size, device: device.into() }
                    }
                    other => other,
                })
                .collect(),
        }
    }

    /// Two H200s of one host: NV18, peer access both ways, FABRIC not permitted.
    fn h200_pair() -> GpuFacts {
        GpuFacts {
            available: Ok(()),
            uuids: vec!["GPU-a".into(), "GPU-b".into()],
            peer_access: vec![vec![true, true], vec![true, true]],
            fabric: Err("cuMemCreate(FABRIC) returned CUDA_ERROR_NOT_PERMITTED".into()),
        }
    }

    fn ends<'a>(
        local: Location,
        remote: &'a RegionDescriptor,
        same_host: bool,
        gpu: &'a GpuFacts,
    ) -> Endpoints<'a> {
        static NO_FABRIC: std::sync::OnceLock<FabricFacts> = std::sync::OnceLock::new();
        let fabric = NO_FABRIC.get_or_init(|| FabricFacts::none("no fabric in this test"));
        Endpoints { local, remote, same_engine: false, same_host, gpu, fabric }
    }

    const DEV0: Location = Location { kind: MemoryKind::Device, device: Some(0) };

    #[test]
    fn nvlink_on_an_h200_pair_and_its_reasons_elsewhere() {
        let fd = Reach::VmmFd { base: 0x10_0000, size: 1 << 20, device: String::new() };
        let ipc = Reach::CudaIpc {
            handle: "00".repeat(64),
            base: 0x10_0000,
            size: 1 << 20,
            device: "GPU-b".into(),
        };
        let remote = gpu_region("GPU-b", vec![fd.clone(), ipc.clone()]);
        let topo = h200_pair();
        let o = SelectionOptions::default();
        let c = select(ends(DEV0, &remote, true, &topo), &o);
        assert_eq!(c.as_ref().map(|c| c.transport), Ok(TransportKind::Nvlink));
        assert!(c.map(|c| c.reason).unwrap_or_default().contains("VMM POSIX-FD"));
        // MC_USE_NVLINK_IPC prefers the IPC handle.
        let o_ipc = SelectionOptions::default()
            .apply_env(|k| (k == "MC_USE_NVLINK_IPC").then(|| "1".into()))
            .unwrap_or_default();
        assert!(matches!(nvlink_reach(&remote, true), Some(Reach::CudaIpc { .. })));
        let c = select(ends(DEV0, &remote, true, &topo), &o_ipc);
        assert!(c.map(|c| c.reason).unwrap_or_default().contains("CUDA IPC"));
        // Pinned host memory runs on the remote GPU.
        let pinned = Location { kind: MemoryKind::HostPinned, device: None };
        assert_eq!(executing_gpu(pinned, "GPU-b", &topo), Ok(1));
        // Pageable host memory cannot: tcp does not reach device memory either.
        let refusals = select(ends(HOST, &remote, true, &topo), &o).err().unwrap_or_default();
        let text = describe_refusals(&refusals);
        assert!(text.contains("nvlink: no — local memory is host pageable"), "{text}");
        assert!(text.contains("tcp: no — remote region#9 does not offer tcp"), "{text}");
        // No peer access.
        let mut no_p2p = h200_pair();
        no_p2p.peer_access = vec![vec![true, false], vec![false, true]];
        let text = describe_refusals(
            &select(ends(DEV0, &remote, true, &no_p2p), &o).err().unwrap_or_default(),
        );
        assert!(text.contains("cuda:0 has no peer access to cuda:1"), "{text}");
        // Cross-host: neither nvlink nor mnnvl without a fabric.
        let text = describe_refusals(
            &select(ends(DEV0, &remote, false, &topo), &o).err().unwrap_or_default(),
        );
        assert!(text.contains("nvlink: no — the peer is on another host"), "{text}");
        assert!(text.contains("mnnvl: no — remote region#9 offers no FABRIC handle"), "{text}");
        // No driver here.
        let none = GpuFacts::none("libcuda.so.1 not loadable");
        let text = describe_refusals(
            &select(ends(DEV0, &remote, true, &none), &o).err().unwrap_or_default(),
        );
        assert!(text.contains("nvlink: no — libcuda.so.1 not loadable"), "{text}");
        // MC_FORCE_MNNVL refuses nvlink with that reason.
        let o_mnnvl = SelectionOptions { force_mnnvl: true, ..SelectionOptions::default() };
        let text = describe_refusals(
            &select(ends(DEV0, &remote, true, &topo), &o_mnnvl).err().unwrap_or_default(),
        );
        assert!(text.contains("nvlink: no — MC_FORCE_MNNVL is set"), "{text}");
    }

    #[test]
    fn mnnvl_within_a_gb200_clique_only() {
        let fabric = |cluster: &str, clique| Reach::Fabric {
            handle: "11".repeat(64),
            base: 0x10_0000,
            size: 1 << 20,
            device: "GPU-far".into(),
            cluster_uuid: cluster.into(),
            clique_id: clique,
        };
        let gb200 = GpuFacts {
            available: Ok(()),
            uuids: vec!["GPU-near".into()],
            peer_access: vec![vec![true]],
            fabric: Ok(("c0ffee".into(), 7)),
        };
        let o = SelectionOptions::default();
        let remote = gpu_region("GPU-far", vec![fabric("c0ffee", 7)]);
        let c = select(ends(DEV0, &remote, false, &gb200), &o);
        assert_eq!(c.map(|c| c.transport), Ok(TransportKind::Mnnvl));
        let other = gpu_region("GPU-far", vec![fabric("c0ffee", 8)]);
        let text = describe_refusals(
            &select(ends(DEV0, &other, false, &gb200), &o).err().unwrap_or_default(),
        );
        assert!(text.contains("mnnvl: no — different NVLink domains"), "{text}");
        // The fabric attribute is present but the probe was refused: the reason is the probe's.
        let text = describe_refusals(
            &select(ends(DEV0, &remote, false, &h200_pair()), &o).err().unwrap_or_default(),
        );
        assert!(
            text.contains(
                "mnnvl: no — this host: cuMemCreate(FABRIC) returned CUDA_ERROR_NOT_PERMITTED"
            ),
            "{text}"
        );
    }
}
