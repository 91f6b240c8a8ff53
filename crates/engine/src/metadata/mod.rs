//! Metadata backends: where segment descriptors are published and found.
//!
//! - `p2p` (default): nothing is published; a peer named `host:port` is asked for its
//!   descriptor on its RPC port.
//! - `http`: a key/value HTTP server (`tidewire metadata-server`, or any server speaking the
//!   `GET/PUT/DELETE <url>?key=K` protocol Mooncake clients use).
//! - `etcd://host:port[,host:port...]`: descriptors under a lease the engine keeps alive; a
//!   watch invalidates cached peers when their descriptor changes or disappears.
//! - `redis://[user:password@]host:port[/db]`: descriptors with an expiry the engine refreshes.
//!
//! Key layout (http, etcd, redis): `tidewire/<cluster>/segments/<name>`, where the cluster id
//! is `MC_METADATA_CLUSTER_ID` (default `default`).

mod etcd;
mod redis;

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use tidewire_core::descriptor::SegmentDescriptor;
use tidewire_core::wire::{FrameKind, Header, Status};

pub(crate) use self::redis::RedisTarget;
use crate::config::{Credentials, Deadlines, MetadataUri};
use crate::error::{Error, PeerRef, Result};
use crate::transport::tcp;

/// The prefix every segment key of `cluster` starts with.
pub fn segments_prefix(cluster: &str) -> String {
    format!("tidewire/{cluster}/segments/")
}

/// The key a segment's descriptor is stored under.
pub fn segment_key(cluster: &str, name: &str) -> String {
    format!("{}{name}", segments_prefix(cluster))
}

enum Backend {
    P2p,
    Http { url: String, agent: ureq::Agent },
    Etcd(etcd::Etcd),
    Redis(redis::Redis),
}

pub(crate) struct Metadata {
    backend: Backend,
    cluster: String,
}

/// Resolves a `host:port` name (IPv4, `[v6]:port`, or a host name) to a socket address.
pub(crate) fn resolve(name: &str) -> Result<SocketAddr> {
    let mut addrs = name.to_socket_addrs().map_err(|e| Error::PeerUnreachable {
        peer: PeerRef::named(name),
        reason: format!("cannot resolve {name:?} as host:port: {e}"),
    })?;
    addrs.next().ok_or_else(|| Error::PeerUnreachable {
        peer: PeerRef::named(name),
        reason: "no address".into(),
    })
}

/// Asks the engine at `addr` for its descriptor (one connection, bounded by the deadlines).
pub(crate) fn fetch_from_rpc(
    peer: &PeerRef,
    addr: SocketAddr,
    deadlines: &Deadlines,
    creds: &Credentials,
) -> Result<SegmentDescriptor> {
    let (stream, _) = tcp::handshake(peer, addr, None, deadlines, creds)?;
    let frame = Header::new(FrameKind::GetDescriptor, 1, 0, 0).encode();
    let (h, payload) = tcp::exchange(&stream, &frame, deadlines.handshake).map_err(|e| {
        Error::PeerUnreachable {
            peer: peer.clone(),
            reason: format!("descriptor request to {addr}: {e}"),
        }
    })?;
    if h.kind != FrameKind::Descriptor || h.status != Status::Ok {
        return Err(Error::Protocol {
            peer: peer.clone(),
            reason: format!("bad descriptor answer {h:?}"),
        });
    }
    Ok(SegmentDescriptor::from_json(&payload)?)
}

fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn key_url(url: &str, key: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}key={}", encode_key(key))
}

fn http_error(url: &str, key: &str, e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, resp) => Error::Metadata {
            uri: url.into(),
            key: key.into(),
            reason: format!("HTTP {code} {}", resp.status_text()),
        },
        ureq::Error::Transport(t) => {
            Error::MetadataUnreachable { uri: url.into(), reason: t.to_string() }
        }
    }
}

impl Metadata {
    /// `ttl`: how long a published descriptor outlives its engine (etcd lease, redis expiry).
    pub(crate) fn new(
        uri: &MetadataUri,
        cluster: &str,
        ttl: Duration,
        deadlines: &Deadlines,
    ) -> Result<Self> {
        let backend = match uri {
            MetadataUri::P2p => Backend::P2p,
            MetadataUri::Http(url) => {
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(deadlines.connect)
                    .timeout(deadlines.connect + deadlines.handshake)
                    .build();
                Backend::Http { url: url.clone(), agent }
            }
            MetadataUri::Etcd(endpoints) => {
                Backend::Etcd(etcd::Etcd::new(endpoints.clone(), uri.to_string(), ttl, deadlines))
            }
            MetadataUri::Redis(text) => {
                let target = RedisTarget::parse(text, &|k| std::env::var(k).ok())?;
                Backend::Redis(redis::Redis::new(target, uri.to_string(), ttl, deadlines))
            }
        };
        Ok(Self { backend, cluster: cluster.to_string() })
    }

    pub(crate) fn key(&self, name: &str) -> String {
        segment_key(&self.cluster, name)
    }

    pub(crate) fn prefix(&self) -> String {
        segments_prefix(&self.cluster)
    }

    fn uri(&self) -> String {
        match &self.backend {
            Backend::P2p => "p2p".into(),
            Backend::Http { url, .. } => url.clone(),
            Backend::Etcd(e) => e.uri().into(),
            Backend::Redis(r) => r.uri().into(),
        }
    }

    /// True for backends whose entries expire unless the engine keeps them alive.
    pub(crate) fn is_leased(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_) | Backend::Redis(_))
    }

    pub(crate) fn is_etcd(&self) -> bool {
        matches!(self.backend, Backend::Etcd(_))
    }

    /// Reads a raw value; `Ok(None)` when the key is absent.
    pub(crate) fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match &self.backend {
            Backend::P2p => Ok(None),
            Backend::Http { url, agent } => match agent.get(&key_url(url, key)).call() {
                Ok(resp) => {
                    let mut body = Vec::new();
                    let limit = tidewire_core::descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1;
                    std::io::Read::read_to_end(
                        &mut std::io::Read::take(resp.into_reader(), limit),
                        &mut body,
                    )
                    .map_err(|e| Error::MetadataUnreachable {
                        uri: url.clone(),
                        reason: e.to_string(),
                    })?;
                    Ok(Some(body))
                }
                Err(ureq::Error::Status(404, _)) => Ok(None),
                Err(e) => Err(http_error(url, key, e)),
            },
            Backend::Etcd(e) => e.get(key),
            Backend::Redis(r) => r.get(key),
        }
    }

    pub(crate) fn publish(&self, desc: &SegmentDescriptor) -> Result<()> {
        let key = self.key(&desc.name);
        let json = desc.to_json();
        match &self.backend {
            Backend::P2p => Ok(()),
            Backend::Http { url, agent } => agent
                .put(&key_url(url, &key))
                .send_bytes(&json)
                .map(|_| ())
                .map_err(|e| http_error(url, &key, e)),
            Backend::Etcd(e) => e.put_leased(&key, &json),
            Backend::Redis(r) => r.put_expiring(&key, &json),
        }
    }

    pub(crate) fn unpublish(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        match &self.backend {
            Backend::P2p => Ok(()),
            Backend::Http { url, agent } => match agent.delete(&key_url(url, &key)).call() {
                Ok(_) | Err(ureq::Error::Status(404, _)) => Ok(()),
                Err(e) => Err(http_error(url, &key, e)),
            },
            Backend::Etcd(e) => e.delete(&key),
            Backend::Redis(r) => r.delete(&key),
        }
    }

    /// Drops this engine's lease (etcd) after its last unpublish.
    pub(crate) fn release(&self) {
        if let Backend::Etcd(e) = &self.backend {
            e.revoke();
        }
    }

    /// Keeps this engine's publication alive. `Ok(false)`: it expired; publish again.
    pub(crate) fn keepalive(&self, name: &str) -> Result<bool> {
        match &self.backend {
            Backend::P2p | Backend::Http { .. } => Ok(true),
            Backend::Etcd(e) => e.keepalive(),
            Backend::Redis(r) => r.keepalive(&self.key(name)),
        }
    }

    /// Parses a stored descriptor; a malformed or foreign value is an error naming the key.
    pub(crate) fn parse(&self, key: &str, raw: &[u8]) -> Result<SegmentDescriptor> {
        SegmentDescriptor::from_json(raw).map_err(|e| Error::Metadata {
            uri: self.uri(),
            key: key.into(),
            reason: format!("not a tidewire descriptor: {e}"),
        })
    }

    /// Finds the descriptor of segment `name`: one round trip.
    pub(crate) fn fetch(
        &self,
        name: &str,
        deadlines: &Deadlines,
        creds: &Credentials,
    ) -> Result<SegmentDescriptor> {
        if let Backend::P2p = self.backend {
            return fetch_from_rpc(&PeerRef::named(name), resolve(name)?, deadlines, creds);
        }
        let key = self.key(name);
        let raw =
            self.get_raw(&key)?.ok_or_else(|| Error::SegmentNotFound { name: name.into() })?;
        self.parse(&key, &raw)
    }

    /// Checks the metadata server answers (at engine start); the error names every endpoint.
    pub(crate) fn check_reachable(&self) -> Result<()> {
        match &self.backend {
            Backend::Redis(r) => r.ping(),
            _ => self.get_raw(&format!("tidewire/{}/ping", self.cluster)).map(|_| ()),
        }
    }

    /// Streams descriptor changes (etcd only): `on_event(segment name, new value or None)`,
    /// after `on_created()` once the server confirmed the watch.
    pub(crate) fn watch(
        &self,
        keep_going: &dyn Fn() -> bool,
        on_created: &mut dyn FnMut(),
        on_event: &mut dyn FnMut(String, Option<Vec<u8>>),
    ) -> Result<()> {
        let Backend::Etcd(e) = &self.backend else { return Ok(()) };
        let prefix = self.prefix();
        e.watch(&prefix, keep_going, on_created, &mut |key, value| {
            if let Some(name) = key.strip_prefix(&prefix) {
                on_event(name.to_string(), value);
            }
        })
    }
}

/// A metadata client on its own, for tools and benchmarks (for example publishing the
/// descriptors of simulated engines). Engines use the same code internally.
pub struct MetadataClient {
    inner: Metadata,
    deadlines: Deadlines,
    /// For peer-to-peer fetches: the cluster secret of the environment, if any.
    creds: Credentials,
}

impl MetadataClient {
    /// Connects (and checks the server answers, naming every endpoint if none does).
    pub fn connect(
        uri: &MetadataUri,
        cluster: &str,
        ttl: Duration,
        deadlines: &Deadlines,
    ) -> Result<Self> {
        let inner = Metadata::new(uri, cluster, ttl, deadlines)?;
        inner.check_reachable()?;
        // Only the secret's variables: other settings of the environment are the engine's.
        let secret = crate::config::secret_from_env(|k| std::env::var(k).ok())?;
        let creds =
            Credentials { secret, me: tidewire_core::InstanceId(rand::random::<u128>() | 1) };
        Ok(Self { inner, deadlines: *deadlines, creds })
    }

    /// Uses `secret` (instead of the environment's) for peer-to-peer descriptor fetches.
    pub fn with_cluster_secret(
        mut self,
        secret: Option<tidewire_core::auth::ClusterSecret>,
    ) -> Self {
        self.creds.secret = secret;
        self
    }

    /// Publishes a descriptor (etcd: under this client's lease; redis: with the TTL).
    pub fn publish(&self, desc: &SegmentDescriptor) -> Result<()> {
        self.inner.publish(desc)
    }

    pub fn unpublish(&self, name: &str) -> Result<()> {
        self.inner.unpublish(name)
    }

    /// Fetches a segment's descriptor: one round trip.
    pub fn fetch(&self, name: &str) -> Result<SegmentDescriptor> {
        self.inner.fetch(name, &self.deadlines, &self.creds)
    }
}
