//! The etcd backend, through etcd's v3 JSON gateway (`/v3/kv/*`, `/v3/lease/*`, `/v3/watch`):
//! no gRPC stack, one HTTP request per operation. Descriptors are published with a lease the
//! engine keeps alive, so a dead engine's descriptor disappears after the lease TTL. Several
//! endpoints: every request starts at the last one that answered and fails over in order.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::config::Deadlines;
use crate::error::{Error, Result};
use crate::frames::POLL;

pub(crate) struct Etcd {
    /// `host:port` of each member.
    endpoints: Vec<String>,
    uri: String,
    agent: ureq::Agent,
    current: AtomicUsize,
    lease: Mutex<Option<i64>>,
    ttl: Duration,
    deadlines: Deadlines,
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn as_i64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Etcd {
    pub(crate) fn new(
        endpoints: Vec<String>,
        uri: String,
        ttl: Duration,
        deadlines: &Deadlines,
    ) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(deadlines.connect)
            .timeout(deadlines.connect + deadlines.handshake)
            .build();
        Self {
            endpoints,
            uri,
            agent,
            current: AtomicUsize::new(0),
            lease: Mutex::new(None),
            ttl,
            deadlines: *deadlines,
        }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// POSTs to the first endpoint that answers, starting at the last good one. A member that
    /// answers 5xx (no leader during an election) is skipped; while any member is alive the
    /// round is retried until the handshake deadline. When none answers at all, fails at once.
    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let deadline = std::time::Instant::now() + self.deadlines.handshake;
        loop {
            let start = self.current.load(Ordering::Relaxed);
            let mut failures = Vec::new();
            let mut alive = false;
            for k in 0..self.endpoints.len() {
                let i = (start + k) % self.endpoints.len();
                let endpoint = &self.endpoints[i];
                match self.agent.post(&format!("http://{endpoint}{path}")).send_json(body) {
                    Ok(resp) => {
                        self.current.store(i, Ordering::Relaxed);
                        return resp.into_json::<Value>().map_err(|e| Error::Metadata {
                            uri: self.uri.clone(),
                            key: path.into(),
                            reason: format!("unreadable answer from {endpoint}: {e}"),
                        });
                    }
                    Err(ureq::Error::Status(code, resp)) if code >= 500 => {
                        alive = true;
                        let text = resp.into_string().unwrap_or_default();
                        failures.push(format!("{endpoint}: HTTP {code} {}", text.trim()));
                    }
                    Err(ureq::Error::Status(code, resp)) => {
                        let text = resp.into_string().unwrap_or_default();
                        return Err(Error::Metadata {
                            uri: self.uri.clone(),
                            key: path.into(),
                            reason: format!("HTTP {code} from {endpoint}: {}", text.trim()),
                        });
                    }
                    Err(ureq::Error::Transport(t)) => failures.push(format!("{endpoint}: {t}")),
                }
            }
            if !alive || std::time::Instant::now() >= deadline {
                return Err(Error::MetadataUnreachable {
                    uri: self.uri.clone(),
                    reason: failures.join("; "),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let v = self.post("/v3/kv/range", &json!({ "key": B64.encode(key) }))?;
        let Some(kv) = v.get("kvs").and_then(|k| k.get(0)) else { return Ok(None) };
        let value = kv.get("value").and_then(Value::as_str).unwrap_or("");
        B64.decode(value).map(Some).map_err(|e| Error::Metadata {
            uri: self.uri.clone(),
            key: key.into(),
            reason: format!("value is not base64: {e}"),
        })
    }

    /// Stores `value` under `key`, attached to this engine's lease (granted on first use).
    pub(crate) fn put_leased(&self, key: &str, value: &[u8]) -> Result<()> {
        let lease = self.lease()?;
        let body = json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() });
        match self.post("/v3/kv/put", &body) {
            Err(Error::Metadata { reason, .. }) if reason.contains("lease not found") => {
                *self.lease.lock() = None;
                let lease = self.lease()?;
                let body = json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() });
                self.post("/v3/kv/put", &body).map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    fn lease(&self) -> Result<i64> {
        let mut lease = self.lease.lock();
        if let Some(id) = *lease {
            return Ok(id);
        }
        let ttl = self.ttl.as_secs().max(1);
        let v = self.post("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))?;
        let id = v.get("ID").and_then(as_i64).ok_or_else(|| Error::Metadata {
            uri: self.uri.clone(),
            key: "/v3/lease/grant".into(),
            reason: format!("no lease id in {v}"),
        })?;
        *lease = Some(id);
        Ok(id)
    }

    /// Refreshes the lease. `Ok(false)` when it no longer exists (expired while the server
    /// was unreachable): the caller must publish again.
    pub(crate) fn keepalive(&self) -> Result<bool> {
        let Some(id) = *self.lease.lock() else { return Ok(false) };
        let v = self.post("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        let ttl = v.get("result").and_then(|r| r.get("TTL")).and_then(as_i64).unwrap_or(0);
        if ttl <= 0 {
            *self.lease.lock() = None;
            return Ok(false);
        }
        Ok(true)
    }

    /// Deletes `key`. An engine publishes one key, so its lease is revoked with it.
    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        self.post("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))?;
        Ok(())
    }

    /// Revokes this client's lease (every key under it disappears).
    pub(crate) fn revoke(&self) {
        if let Some(id) = self.lease.lock().take() {
            let _ = self.post("/v3/lease/revoke", &json!({ "ID": id.to_string() }));
        }
    }

    /// Streams changes under `prefix` to `on_event(key, Some(value) | None for a delete)`
    /// until `keep_going()` is false or the stream breaks (the caller reconnects).
    /// `on_created()` runs once the server confirms the watch: every change from then on is
    /// streamed, so what changed before is read then (a change between a read and the watch's
    /// creation would otherwise be missed for good).
    pub(crate) fn watch(
        &self,
        prefix: &str,
        keep_going: &dyn Fn() -> bool,
        on_created: &mut dyn FnMut(),
        on_event: &mut dyn FnMut(String, Option<Vec<u8>>),
    ) -> Result<()> {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        let endpoint = &self.endpoints[i];
        let fail = |reason: String| Error::MetadataUnreachable {
            uri: self.uri.clone(),
            reason: format!("watch on {endpoint}: {reason}"),
        };
        let addr = crate::metadata::resolve(endpoint).map_err(|e| fail(e.to_string()))?;
        let mut s = TcpStream::connect_timeout(&addr, self.deadlines.connect)
            .map_err(|e| fail(e.to_string()))?;
        s.set_read_timeout(Some(POLL)).map_err(|e| fail(e.to_string()))?;
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
        }})
        .to_string();
        // HTTP/1.0: the gateway streams the body unchunked until it closes the connection.
        let req = format!(
            "POST /v3/watch HTTP/1.0\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| fail(e.to_string()))?;
        let mut r = BufReader::new(s);
        let mut line = Vec::new();
        let mut in_body = false;
        loop {
            if !keep_going() {
                return Ok(());
            }
            match r.read_until(b'\n', &mut line) {
                Ok(0) => return Err(fail("the server closed the stream".into())),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            if !line.ends_with(b"\n") {
                continue;
            }
            let text = String::from_utf8_lossy(&line).trim().to_string();
            line.clear();
            if !in_body {
                if text.starts_with("HTTP/") && !text.contains(" 200") {
                    return Err(fail(format!("answered {text}")));
                }
                in_body = text.is_empty();
                continue;
            }
            let Ok(msg) = serde_json::from_str::<Value>(&text) else { continue };
            if msg.pointer("/result/created").and_then(Value::as_bool) == Some(true) {
                on_created();
            }
            let events = msg
                .pointer("/result/events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for ev in events {
                let key =
                    ev.pointer("/kv/key").and_then(Value::as_str).and_then(|k| B64.decode(k).ok());
                let Some(key) = key.map(|k| String::from_utf8_lossy(&k).into_owned()) else {
                    continue;
                };
                let deleted = ev.get("type").and_then(Value::as_str) == Some("DELETE");
                let value = if deleted {
                    None
                } else {
                    ev.pointer("/kv/value").and_then(Value::as_str).and_then(|v| B64.decode(v).ok())
                };
                on_event(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end("tidewire/c/segments/"), b"tidewire/c/segments0".to_vec());
    }
}
