//! Transport selection: a pure function from (local memory, remote region, topology, options)
//! to a transport and the reason it was chosen, or to the list of transports considered and
//! why each refused. `tidewire info` prints these same reasons.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::descriptor::RegionDescriptor;
use crate::memory::Location;
use crate::CoreError;

/// The transports, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransportKind {
    /// Same engine: a copy within the process.
    Local,
    /// Same host, both GPU memory with peer access (comes with the GPU issue).
    Nvlink,
    /// Same proven NVLink fabric clique (comes with the GPU issue).
    Mnnvl,
    /// Same host, shareable host memory (memfd).
    Shm,
    /// Any host memory, through the engine's RPC/data port.
    Tcp,
}

impl TransportKind {
    /// Every transport, in order of preference.
    pub const ALL: [TransportKind; 5] =
        [Self::Local, Self::Nvlink, Self::Mnnvl, Self::Shm, Self::Tcp];
    /// The transports this build implements.
    pub const IMPLEMENTED: [TransportKind; 3] = [Self::Local, Self::Shm, Self::Tcp];

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Nvlink => "nvlink",
            Self::Mnnvl => "mnnvl",
            Self::Shm => "shm",
            Self::Tcp => "tcp",
        }
    }

    /// Parses a transport name (`tcp`, `shm`, `local`, `nvlink`, `mnnvl`).
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
}

impl Default for SelectionOptions {
    fn default() -> Self {
        Self { enabled: TransportKind::IMPLEMENTED.into_iter().collect(), force_tcp: false }
    }
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
        match judge(transport, ends, opts) {
            Ok(reason) => return Ok(Choice { transport, reason }),
            Err(reason) => refusals.push(Refusal { transport, reason }),
        }
    }
    Err(refusals)
}

fn judge(t: TransportKind, e: Endpoints<'_>, opts: &SelectionOptions) -> Result<String, String> {
    if !opts.enabled.contains(&t) {
        return Err("not enabled in this engine's configuration".into());
    }
    if opts.force_tcp && t != TransportKind::Tcp {
        return Err("MC_FORCE_TCP is set".into());
    }
    let host_local = e.local.kind.is_host();
    match t {
        TransportKind::Local => {
            if !e.same_engine {
                return Err("the peer is another engine".into());
            }
            if !host_local || !e.remote.location.kind.is_host() {
                return Err("device memory is not copied by the local transport yet".into());
            }
            Ok("the peer is this engine: a copy within the process".into())
        }
        TransportKind::Nvlink | TransportKind::Mnnvl => {
            Err("GPU transports are not built yet (no GPU support in this build)".into())
        }
        TransportKind::Shm => {
            if !e.same_host {
                return Err("the peer is on another host".into());
            }
            if !e.remote.reachable_by(TransportKind::Shm) {
                return Err(format!(
                    "remote {} is {}, not engine-allocated shareable memory",
                    e.remote.id, e.remote.location.kind
                ));
            }
            if !host_local {
                return Err(format!("local memory is {}", e.local.kind));
            }
            Ok("same host and the remote region is a shareable memfd".into())
        }
        TransportKind::Tcp => {
            if !e.remote.reachable_by(TransportKind::Tcp) {
                return Err(format!("remote {} does not offer tcp", e.remote.id));
            }
            if !host_local {
                return Err(format!("local memory is {}", e.local.kind));
            }
            if opts.force_tcp {
                Ok("MC_FORCE_TCP is set".into())
            } else if e.same_host {
                Ok("no faster transport reaches the remote region".into())
            } else {
                Ok("the peer is on another host and no RDMA transport is built".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::Reach;
    use crate::ids::RegionId;
    use crate::memory::MemoryKind;

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

    fn pick(
        remote: &RegionDescriptor,
        same_engine: bool,
        same_host: bool,
        o: &SelectionOptions,
    ) -> Result<TransportKind, Vec<Refusal>> {
        select(Endpoints { local: HOST, remote, same_engine, same_host }, o).map(|c| c.transport)
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
    fn force_tcp_and_disabled_transports_are_reasons() {
        let shared = region(MemoryKind::HostShared, vec![Reach::Shm, Reach::Tcp]);
        let o =
            SelectionOptions::default().apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into()));
        let o = o.unwrap_or_default();
        assert!(o.force_tcp);
        let c = select(
            Endpoints { local: HOST, remote: &shared, same_engine: false, same_host: true },
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
}
