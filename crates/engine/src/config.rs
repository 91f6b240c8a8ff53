//! Engine configuration: plain data with defaults, and the `MC_*` environment applied on top.

use std::time::Duration;
use tidewire_core::auth::ClusterSecret;

use tidewire_core::select::SelectionOptions;

use crate::error::{Error, Result};

/// Deadlines for every wait the engine does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// TCP connect to a peer or a metadata server.
    pub connect: Duration,
    /// A request/response exchange on a fresh connection (hello, descriptor, probe).
    pub handshake: Duration,
    /// Base deadline of a batch; `per_byte` is added for every byte it moves.
    pub transfer: Duration,
    /// Added to a batch's deadline per byte.
    pub per_byte: Duration,
    /// How long a connection may stall in the middle of a frame before it is dropped.
    pub stall: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(5),
            transfer: Duration::from_secs(30),
            per_byte: Duration::from_nanos(1),
            stall: Duration::from_secs(10),
        }
    }
}

impl Deadlines {
    /// The deadline of a batch moving `bytes`.
    pub fn for_batch(&self, bytes: u64) -> Duration {
        let per_byte = u64::try_from(self.per_byte.as_nanos()).unwrap_or(u64::MAX);
        self.transfer.saturating_add(Duration::from_nanos(per_byte.saturating_mul(bytes)))
    }
}

/// How the engine finds peers' descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataUri {
    /// Embedded: descriptors are served by each engine's RPC port; names are `host:port`.
    P2p,
    /// A `tidewire metadata-server` (or any server of the same key/value HTTP protocol).
    Http(String),
    /// etcd members, `host:port` each (failover in order).
    Etcd(Vec<String>),
    /// `redis://[user:password@]host:port[/db]`.
    Redis(String),
}

impl MetadataUri {
    /// Parses `p2p`, `P2PHANDSHAKE` or an `http://` URL.
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("p2p") || t.eq_ignore_ascii_case("P2PHANDSHAKE") {
            return Ok(Self::P2p);
        }
        if t.starts_with("http://") {
            return Ok(Self::Http(t.to_string()));
        }
        if let Some(rest) = t.strip_prefix("etcd://") {
            let endpoints: Vec<String> = rest
                .trim_end_matches('/')
                .split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty() {
                return Err(Error::Config {
                    reason: format!("metadata backend {t:?} names no etcd endpoint"),
                });
            }
            return Ok(Self::Etcd(endpoints));
        }
        if t.starts_with("redis://") {
            return Ok(Self::Redis(t.to_string()));
        }
        let scheme = t.split("://").next().unwrap_or(t);
        Err(Error::Config {
            reason: format!(
                "metadata backend {t:?}: scheme {scheme:?} is not supported (use \"p2p\", \
                 \"http://host:port/metadata\", \"etcd://host:port[,host:port]\" or \
                 \"redis://[user:password@]host:port[/db]\")"
            ),
        })
    }
}

impl std::fmt::Display for MetadataUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::P2p => f.write_str("p2p"),
            Self::Http(u) | Self::Redis(u) => f.write_str(u),
            Self::Etcd(e) => write!(f, "etcd://{}", e.join(",")),
        }
    }
}

/// Engine configuration. `Default` gives a peer-to-peer engine on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Segment name. `None` in peer-to-peer mode: the name is `host:port` once bound.
    pub name: Option<String>,
    /// The IP address (v4 or v6) or host name to bind and advertise.
    pub host: String,
    /// `None`: a random port in `port_range`, retried on conflict. `Some(0)`: any free port.
    pub port: Option<u16>,
    /// `MC_MIN_RPC_PORT..=MC_MAX_RPC_PORT`.
    pub port_range: (u16, u16),
    pub metadata: MetadataUri,
    pub transports: SelectionOptions,
    pub deadlines: Deadlines,
    /// TCP connections per peer.
    pub tcp_lanes: usize,
    /// Serve shareable host memory to same-host peers.
    pub enable_shm: bool,
    /// How long a published descriptor outlives a dead engine (etcd lease TTL, redis expiry);
    /// the engine refreshes it every third of this.
    pub metadata_ttl: Duration,
    /// Key prefix of this cluster in the metadata store (`MC_METADATA_CLUSTER_ID`).
    pub cluster_id: String,
    /// When set, every connection to and from this engine (tcp lanes, the RPC/descriptor
    /// endpoint, the revocation channel, the shm socket) proves knowledge of it before
    /// anything is served (`TIDEWIRE_CLUSTER_SECRET`, `TIDEWIRE_CLUSTER_SECRET_FILE`).
    pub cluster_secret: Option<ClusterSecret>,
    /// Let processes of other users fetch shareable memory through the shm socket (by
    /// default only this process's uid may: `TIDEWIRE_SHM_ANY_UID=1`).
    pub shm_any_uid: bool,
    /// Offer same-host initiators a liveness word (a robust mutex this engine's process
    /// holds), so that a copy's check that the process is still alive is a load instead of a
    /// system call on the shm socket. `TIDEWIRE_SHM_LIVENESS_WORD=0` offers none (initiators
    /// peek at the socket): to compare the two, or for a C library without robust mutexes.
    pub shm_liveness_word: bool,
    /// The libfabric provider the fabric transport uses (`TIDEWIRE_FABRIC_PROVIDER`, else the
    /// first name of `FI_PROVIDER`); `None`: `efa`, then `verbs`, else no fabric transport.
    pub fabric_provider: Option<String>,
    /// The provider's domains (NICs) the fabric transport opens (`TIDEWIRE_FABRIC_NICS`,
    /// comma-separated); empty: every NIC of an RDMA provider, the first interface of `tcp`.
    pub fabric_nics: Vec<String>,
    /// Serve Prometheus metrics on this `host:port` (`TIDEWIRE_METRICS_ADDR`; one endpoint per
    /// process). Off by default.
    pub metrics_addr: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            name: None,
            host: "127.0.0.1".into(),
            port: None,
            port_range: (15000, 17000),
            metadata: MetadataUri::P2p,
            transports: SelectionOptions::default(),
            deadlines: Deadlines::default(),
            tcp_lanes: 4,
            enable_shm: true,
            metadata_ttl: Duration::from_secs(10),
            cluster_id: "default".into(),
            cluster_secret: None,
            shm_any_uid: false,
            shm_liveness_word: true,
            fabric_provider: None,
            fabric_nics: Vec::new(),
            metrics_addr: None,
        }
    }
}

impl EngineConfig {
    /// Applies `MC_FORCE_TCP`, `MC_INTRANODE_NVLINK`/`MC_FORCE_MNNVL` (contradiction checked),
    /// `MC_MIN_RPC_PORT`, `MC_MAX_RPC_PORT` and `MC_TRANSFER_TIMEOUT` (seconds, minimum 5)
    /// read through `lookup`.
    pub fn apply_env(mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        self.transports = self.transports.apply_env(&lookup)?;
        let port = |key: &str, default: u16| -> Result<u16> {
            match lookup(key) {
                None => Ok(default),
                Some(v) => v.trim().parse().map_err(|_| Error::Config {
                    reason: format!("{key}={v:?} is not a port number"),
                }),
            }
        };
        self.port_range = (
            port("MC_MIN_RPC_PORT", self.port_range.0)?,
            port("MC_MAX_RPC_PORT", self.port_range.1)?,
        );
        if self.port_range.0 == 0 || self.port_range.0 > self.port_range.1 {
            return Err(Error::Config {
                reason: format!(
                    "RPC port range {}..={} is empty",
                    self.port_range.0, self.port_range.1
                ),
            });
        }
        if let Some(id) = lookup("MC_METADATA_CLUSTER_ID").filter(|v| !v.trim().is_empty()) {
            self.cluster_id = id.trim().to_string();
        }
        if let Some(secret) = secret_from_env(&lookup)? {
            self.cluster_secret = Some(secret);
        }
        if let Some(v) = lookup("TIDEWIRE_SHM_ANY_UID") {
            self.shm_any_uid = tidewire_core::select::env_flag(Some(&v));
        }
        if let Some(v) = lookup("TIDEWIRE_SHM_LIVENESS_WORD") {
            self.shm_liveness_word = tidewire_core::select::env_flag(Some(&v));
        }
        if let Some(a) = lookup("TIDEWIRE_METRICS_ADDR").filter(|v| !v.trim().is_empty()) {
            self.metrics_addr = Some(a.trim().to_string());
        }
        if let Some(p) = crate::fabric::wanted(&lookup) {
            self.fabric_provider = Some(p);
        }
        if let Some(v) = lookup("TIDEWIRE_FABRIC_NICS") {
            self.fabric_nics =
                v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(v) = lookup("MC_TRANSFER_TIMEOUT") {
            let secs: u64 = v.trim().parse().map_err(|_| Error::Config {
                reason: format!("MC_TRANSFER_TIMEOUT={v:?} is not a number of seconds"),
            })?;
            self.deadlines.transfer = Duration::from_secs(secs.max(5));
        }
        Ok(self)
    }

    /// Applies the process environment.
    pub fn from_env(self) -> Result<Self> {
        self.apply_env(|k| std::env::var(k).ok())
    }
}

/// Who this engine is when it dials a peer: its instance and the cluster secret, if any.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub(crate) secret: Option<ClusterSecret>,
    pub(crate) me: tidewire_core::InstanceId,
}

impl Credentials {
    /// What a handshake proves with (a fresh nonce each time), when a secret is in force.
    pub(crate) fn client(&self) -> Option<tidewire_core::handshake::ClientAuth> {
        self.secret.clone().map(|secret| tidewire_core::handshake::ClientAuth {
            secret,
            me: self.me,
            nonce: rand::random(),
        })
    }
}

fn secret_of(bytes: &[u8], what: &str) -> Result<ClusterSecret> {
    ClusterSecret::new(bytes).map_err(|e| Error::Config { reason: format!("{what}: {e}") })
}

/// The cluster secret the environment names, read through `lookup`:
/// `TIDEWIRE_CLUSTER_SECRET` or `TIDEWIRE_CLUSTER_SECRET_FILE` (not both); `None` when neither
/// is set. Set but empty is an error, not "no secret": an unset template variable must not turn
/// the check off without a word.
pub(crate) fn secret_from_env(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<ClusterSecret>> {
    match (lookup("TIDEWIRE_CLUSTER_SECRET"), lookup("TIDEWIRE_CLUSTER_SECRET_FILE")) {
        (Some(_), Some(_)) => Err(Error::Config {
            reason: "both TIDEWIRE_CLUSTER_SECRET and TIDEWIRE_CLUSTER_SECRET_FILE are set: \
                     choose one"
                .into(),
        }),
        (Some(v), None) => secret_of(v.as_bytes(), "TIDEWIRE_CLUSTER_SECRET").map(Some),
        (None, Some(path)) => secret_from_file(&path).map(Some),
        (None, None) => Ok(None),
    }
}

/// The cluster secret in the file at `path` (its whole content, surrounding whitespace
/// ignored).
pub fn secret_from_file(path: &str) -> Result<ClusterSecret> {
    let bytes = std::fs::read(path).map_err(|e| Error::Config {
        reason: format!("reading the cluster secret file {path}: {e}"),
    })?;
    secret_of(&bytes, &format!("the cluster secret file {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_secret_comes_from_the_environment_or_a_file() {
        let env = |k: &str| (k == "TIDEWIRE_CLUSTER_SECRET").then(|| "hunter2".to_string());
        let c = EngineConfig::default().apply_env(env).unwrap_or_default();
        let want = ClusterSecret::new(b"hunter2").ok().map(|s| s.fingerprint());
        assert_eq!(c.cluster_secret.map(|s| s.fingerprint()), want);
        let path = std::env::temp_dir().join(format!("tw-secret-{}", std::process::id()));
        std::fs::write(&path, b"hunter2\n").unwrap_or_default();
        let p = path.display().to_string();
        let file = |k: &str| (k == "TIDEWIRE_CLUSTER_SECRET_FILE").then(|| p.clone());
        let c = EngineConfig::default().apply_env(file).unwrap_or_default();
        assert_eq!(
            c.cluster_secret.map(|s| s.fingerprint()),
            want,
            "the file's newline is ignored"
        );
        let both = |k: &str| k.starts_with("TIDEWIRE_CLUSTER_SECRET").then(|| p.clone());
        assert!(EngineConfig::default().apply_env(both).is_err());
        let empty = |k: &str| (k == "TIDEWIRE_CLUSTER_SECRET").then(String::new);
        assert!(EngineConfig::default().apply_env(empty).is_err(), "set but empty is an error");
        let missing =
            |k: &str| (k == "TIDEWIRE_CLUSTER_SECRET_FILE").then(|| "/nonexistent/x".to_string());
        assert!(EngineConfig::default().apply_env(missing).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn env_is_applied_and_checked() {
        let env = |k: &str| match k {
            "MC_MIN_RPC_PORT" => Some("20000".to_string()),
            "MC_MAX_RPC_PORT" => Some("20010".to_string()),
            "MC_TRANSFER_TIMEOUT" => Some("2".to_string()),
            _ => None,
        };
        let c = EngineConfig::default().apply_env(env).unwrap_or_default();
        assert_eq!(c.port_range, (20000, 20010));
        assert_eq!(c.deadlines.transfer, Duration::from_secs(5), "minimum 5 s");
        let bad = |k: &str| (k == "MC_MIN_RPC_PORT").then(|| "x".to_string());
        assert!(EngineConfig::default().apply_env(bad).is_err());
        let both = |k: &str| {
            matches!(k, "MC_INTRANODE_NVLINK" | "MC_FORCE_MNNVL").then(|| "1".to_string())
        };
        assert!(EngineConfig::default().apply_env(both).is_err());
    }

    #[test]
    fn metadata_uris() {
        assert_eq!(MetadataUri::parse("P2PHANDSHAKE").ok(), Some(MetadataUri::P2p));
        assert!(matches!(MetadataUri::parse("http://h:1/metadata"), Ok(MetadataUri::Http(_))));
        assert_eq!(
            MetadataUri::parse("etcd://a:1,b:2").ok(),
            Some(MetadataUri::Etcd(vec!["a:1".into(), "b:2".into()]))
        );
        assert!(matches!(MetadataUri::parse("redis://h:6379/1"), Ok(MetadataUri::Redis(_))));
        assert!(MetadataUri::parse("etcd://").is_err());
        assert!(MetadataUri::parse("zk://h:1").is_err());
    }

    #[test]
    fn batch_deadline_grows_per_byte() {
        let d = Deadlines::default();
        assert_eq!(d.for_batch(0), Duration::from_secs(30));
        assert_eq!(d.for_batch(1_000_000_000), Duration::from_secs(31));
        assert_eq!(d.for_batch(10_000_000_000), Duration::from_secs(40));
    }
}
