//! Metadata backends: where segment descriptors are published and found.
//!
//! - `p2p` (default): nothing is published; a peer named `host:port` is asked for its
//!   descriptor on its RPC port.
//! - `http`: a key/value HTTP server (`tidewire metadata-server`, or any server speaking the
//!   `GET/PUT/DELETE <url>?key=K` protocol Mooncake clients use). Descriptors live under
//!   `tidewire/segments/<name>`.

use std::net::{SocketAddr, ToSocketAddrs};

use tidewire_core::descriptor::SegmentDescriptor;
use tidewire_core::wire::{FrameKind, Header, Status};

use crate::config::{Deadlines, MetadataUri};
use crate::error::{Error, Result};
use crate::transport::tcp;

/// The key a segment's descriptor is stored under.
pub fn segment_key(name: &str) -> String {
    format!("tidewire/segments/{name}")
}

pub(crate) enum Metadata {
    P2p,
    Http { url: String, agent: ureq::Agent },
}

/// Resolves a `host:port` name (IPv4, `[v6]:port`, or a host name) to a socket address.
pub(crate) fn resolve(name: &str) -> Result<SocketAddr> {
    let mut addrs = name.to_socket_addrs().map_err(|e| Error::PeerUnreachable {
        peer: name.into(),
        reason: format!("cannot resolve {name:?} as host:port: {e}"),
    })?;
    addrs.next().ok_or_else(|| Error::PeerUnreachable {
        peer: name.into(),
        reason: "no address".into(),
    })
}

/// Asks the engine at `addr` for its descriptor (one connection, bounded by the deadlines).
pub(crate) fn fetch_from_rpc(
    peer: &str,
    addr: SocketAddr,
    deadlines: &Deadlines,
) -> Result<SegmentDescriptor> {
    let (stream, _) = tcp::handshake(peer, addr, None, deadlines)?;
    stream
        .set_read_timeout(Some(deadlines.handshake))
        .map_err(|e| Error::io("configure", &e))?;
    let frame = Header::new(FrameKind::GetDescriptor, 1, 0, 0).encode();
    let (h, payload) = tcp::exchange(&stream, &frame).map_err(|e| Error::PeerUnreachable {
        peer: peer.into(),
        reason: format!("descriptor request to {addr}: {e}"),
    })?;
    if h.kind != FrameKind::Descriptor || h.status != Status::Ok {
        return Err(Error::Protocol {
            peer: peer.into(),
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

impl Metadata {
    pub(crate) fn new(uri: &MetadataUri, deadlines: &Deadlines) -> Self {
        match uri {
            MetadataUri::P2p => Self::P2p,
            MetadataUri::Http(url) => {
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(deadlines.connect)
                    .timeout(deadlines.connect + deadlines.handshake)
                    .build();
                Self::Http {
                    url: url.clone(),
                    agent,
                }
            }
        }
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
            ureq::Error::Transport(t) => Error::MetadataUnreachable {
                uri: url.into(),
                reason: t.to_string(),
            },
        }
    }

    /// Reads a raw value; `Ok(None)` when the key is absent.
    pub(crate) fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Self::Http { url, agent } = self else {
            return Ok(None);
        };
        match agent.get(&Self::key_url(url, key)).call() {
            Ok(resp) => {
                let mut body = Vec::new();
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(
                        resp.into_reader(),
                        tidewire_core::descriptor::MAX_DESCRIPTOR_BYTES as u64 + 1,
                    ),
                    &mut body,
                )
                .map_err(|e| Error::MetadataUnreachable {
                    uri: url.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Some(body))
            }
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(Self::http_error(url, key, e)),
        }
    }

    pub(crate) fn publish(&self, desc: &SegmentDescriptor) -> Result<()> {
        let Self::Http { url, agent } = self else {
            return Ok(());
        };
        let key = segment_key(&desc.name);
        agent
            .put(&Self::key_url(url, &key))
            .send_bytes(&desc.to_json())
            .map(|_| ())
            .map_err(|e| Self::http_error(url, &key, e))
    }

    pub(crate) fn unpublish(&self, name: &str) -> Result<()> {
        let Self::Http { url, agent } = self else {
            return Ok(());
        };
        let key = segment_key(name);
        match agent.delete(&Self::key_url(url, &key)).call() {
            Ok(_) | Err(ureq::Error::Status(404, _)) => Ok(()),
            Err(e) => Err(Self::http_error(url, &key, e)),
        }
    }

    /// Finds the descriptor of segment `name`.
    pub(crate) fn fetch(&self, name: &str, deadlines: &Deadlines) -> Result<SegmentDescriptor> {
        match self {
            Self::P2p => fetch_from_rpc(name, resolve(name)?, deadlines),
            Self::Http { url, .. } => {
                let key = segment_key(name);
                let body = self
                    .get_raw(&key)?
                    .ok_or_else(|| Error::SegmentNotFound { name: name.into() })?;
                SegmentDescriptor::from_json(&body).map_err(|e| Error::Metadata {
                    uri: url.clone(),
                    key,
                    reason: format!("not a tidewire descriptor: {e}"),
                })
            }
        }
    }

    /// Checks the metadata server answers (used at engine start).
    pub(crate) fn check_reachable(&self) -> Result<()> {
        self.get_raw("tidewire/ping").map(|_| ())
    }
}
