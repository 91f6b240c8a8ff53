//! The HTTP metadata server (`tidewire metadata-server`): an in-memory key/value store
//! speaking `GET/PUT/DELETE <path>?key=K`, like the HTTP metadata server Mooncake clients use.
//! GET answers 200 with the value or 404; PUT stores the body; DELETE removes the key.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Largest value accepted.
const MAX_VALUE: u64 = 64 << 20;

/// A running metadata server. Stops when dropped.
pub struct MetadataServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

fn key_of(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|kv| kv.strip_prefix("key=")).map(decode)
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MetadataServer {
    /// Binds `addr` (port 0: any free port) and serves until dropped.
    pub fn start(addr: &str) -> Result<Self> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| Error::Bind { addr: addr.into(), reason: e.to_string() })?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or(Error::Internal("metadata server bound a non-IP address"))?;
        let server = Arc::new(server);
        let store: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let s2 = server.clone();
        let thread = std::thread::Builder::new()
            .name("tw-metadata-server".into())
            .spawn(move || {
                for req in s2.incoming_requests() {
                    handle(req, &store);
                }
            })
            .map_err(|e| Error::io("spawning the metadata server thread", &e))?;
        Ok(Self { server, addr: bound, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL engines pass as their metadata URI.
    pub fn url(&self) -> String {
        format!("http://{}/metadata", self.addr)
    }
}

fn handle(mut req: tiny_http::Request, store: &Mutex<HashMap<String, Vec<u8>>>) {
    use tiny_http::{Method, Response};
    let Some(key) = key_of(req.url()) else {
        let _ = req.respond(Response::from_string("missing ?key=").with_status_code(400));
        return;
    };
    let resp = match req.method() {
        Method::Get => match store.lock().get(&key) {
            Some(v) => Response::from_data(v.clone()),
            None => Response::from_string("metadata not found").with_status_code(404),
        },
        Method::Put | Method::Post => {
            let mut body = Vec::new();
            match req.as_reader().take(MAX_VALUE + 1).read_to_end(&mut body) {
                Ok(n) if n as u64 <= MAX_VALUE => {
                    store.lock().insert(key, body);
                    Response::from_string("metadata updated")
                }
                Ok(_) => Response::from_string("value too large").with_status_code(413),
                Err(_) => Response::from_string("bad body").with_status_code(400),
            }
        }
        Method::Delete => match store.lock().remove(&key) {
            Some(_) => Response::from_string("metadata deleted"),
            None => Response::from_string("metadata not found").with_status_code(404),
        },
        _ => Response::from_string("method not allowed").with_status_code(405),
    };
    let _ = req.respond(resp);
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_decode() {
        assert_eq!(
            key_of("/metadata?key=tidewire%2Fsegments%2F127.0.0.1%3A1"),
            Some("tidewire/segments/127.0.0.1:1".into())
        );
        assert_eq!(key_of("/metadata?x=1&key=a+b"), Some("a b".into()));
        assert_eq!(key_of("/metadata"), None);
    }
}
