//! Liveness of the published descriptor and of cached peers, for metadata backends whose
//! entries expire (etcd, redis): a keeper thread keeps this engine's entry alive and publishes
//! it again after an outage; a watcher refreshes or drops cached peers when their descriptor
//! changes or disappears.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Inner;
use crate::error::Error;
use crate::peer::PeerConn;

impl Inner {
    /// The peers this engine has open, by name, with their current connection state.
    fn open_peers(&self) -> Vec<(String, Arc<PeerConn>)> {
        let peers = self.peers.lock();
        peers.slots.iter().filter_map(|s| s.conn.clone().map(|c| (s.name.clone(), c))).collect()
    }

    /// A peer's descriptor changed (`Some`) or disappeared (`None`) in the metadata store:
    /// refresh the cache, or drop it (connections and mappings included) when the peer is
    /// gone or restarted, before the next request uses it.
    pub(crate) fn on_descriptor_event(&self, name: &str, raw: Option<&[u8]>) {
        let Some((_, conn)) = self.open_peers().into_iter().find(|(n, _)| n == name) else {
            return;
        };
        let key = self.metadata.key(name);
        match raw.map(|r| self.metadata.parse(&key, r)) {
            None => {
                let reason = "it left the metadata store".into();
                self.retire(&conn, Error::PeerUnreachable { peer: conn.who(), reason }, false);
            }
            Some(Err(e)) => {
                log::warn!("{}: {e}", self.name);
                conn.mark_broken();
            }
            Some(Ok(d)) if d.instance_id != conn.instance() => {
                let reason = format!("it restarted as instance {}", d.instance_id);
                // The old instance is gone for good: a descriptor naming it is stale.
                self.retire(&conn, Error::PeerUnreachable { peer: conn.who(), reason }, true);
            }
            Some(Ok(d)) => conn.set_descriptor(d),
        }
    }

    /// Re-reads every open peer's descriptor (after a watch reconnects, and for Redis).
    pub(crate) fn resync_open_peers(&self) {
        for (name, _) in self.open_peers() {
            match self.metadata.get_raw(&self.metadata.key(&name)) {
                Ok(raw) => self.on_descriptor_event(&name, raw.as_deref()),
                Err(e) => log::debug!("{}: resync of {name}: {e}", self.name),
            }
        }
    }
}

/// Sleeps up to `d` in slices, returning false as soon as the engine stops.
fn pause(inner: &Inner, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if inner.life.stopping() {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
    !inner.life.stopping()
}

/// Keeps this engine's publication alive (etcd lease, redis expiry). While the metadata
/// server is lost, transfers to open peers go on; when it returns, the descriptor is
/// published again.
pub(crate) fn keeper_loop(inner: &Inner) {
    let period = (inner.config.metadata_ttl / 3).max(Duration::from_millis(200));
    let mut healthy = true;
    while pause(inner, period) {
        let outcome = inner.metadata.keepalive(&inner.name).and_then(|alive| {
            if alive && healthy {
                return Ok(false);
            }
            inner.metadata.publish(&inner.descriptor()).map(|()| true)
        });
        match outcome {
            Ok(republished) => {
                if republished {
                    log::info!("{}: descriptor published again", inner.name);
                }
                healthy = true;
            }
            Err(e) => {
                if healthy {
                    log::warn!(
                        "{}: metadata server lost ({e}); open peers keep working, publication resumes when it returns",
                        inner.name
                    );
                }
                healthy = false;
            }
        }
    }
}

/// Follows changes of peers' descriptors: an etcd watch (the open peers read again once each
/// watch is confirmed: what changed before it started, a peer opened before this thread ran
/// included, is not streamed), or for redis a poll of the open peers every second.
pub(crate) fn watch_loop(inner: &Inner) {
    while !inner.life.stopping() {
        if inner.metadata.is_etcd() {
            let keep_going = || !inner.life.stopping();
            let mut created = || inner.resync_open_peers();
            let result = inner.metadata.watch(&keep_going, &mut created, &mut |name, value| {
                inner.on_descriptor_event(&name, value.as_deref());
            });
            if let Err(e) = result {
                log::debug!("{}: watch ended: {e}", inner.name);
            }
            if !pause(inner, Duration::from_millis(500)) {
                return;
            }
        } else {
            inner.resync_open_peers();
            if !pause(inner, Duration::from_secs(1)) {
                return;
            }
        }
    }
}
