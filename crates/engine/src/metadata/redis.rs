//! The Redis backend: descriptors stored with `SET key value PX ttl`, kept alive by `PEXPIRE`
//! (key expiry stands in for leases). A small RESP client over one connection, re-opened
//! after any I/O error or malformed reply; replies are decoded by `tidewire_core::resp`
//! (total and bounded: bad bytes from the server are an error, never a panic). `redis://[user:password@]host:port[/db]`; `MC_REDIS_PASSWORD`,
//! `MC_REDIS_USERNAME` and `MC_REDIS_DB` fill what the URL leaves out.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewire_core::resp::{self, Limits, Value};

use crate::config::Deadlines;
use crate::error::{Error, Result};

/// Where and how to reach Redis, parsed from the URI and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedisTarget {
    pub(crate) addr: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: u32,
}

impl RedisTarget {
    /// Parses `redis://[user:password@]host:port[/db]`, filling gaps from `lookup` (env).
    pub(crate) fn parse(uri: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let bad = |why: &str| Error::Config { reason: format!("redis URI {uri:?}: {why}") };
        let rest = uri.strip_prefix("redis://").ok_or_else(|| bad("must start with redis://"))?;
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (addr, db) = match hostpart.split_once('/') {
            Some((a, d)) if !d.is_empty() => {
                (a, Some(d.parse::<u32>().map_err(|_| bad("db must be a number"))?))
            }
            Some((a, _)) => (a, None),
            None => (hostpart, None),
        };
        if addr.is_empty() {
            return Err(bad("no host"));
        }
        let (mut username, mut password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (None, Some(a.to_string())),
            },
            None => (None, None),
        };
        if password.is_none() {
            password = lookup("MC_REDIS_PASSWORD").filter(|p| !p.is_empty());
        }
        if username.is_none() {
            username = lookup("MC_REDIS_USERNAME").filter(|u| !u.is_empty());
        }
        let db = match db {
            Some(d) => d,
            None => lookup("MC_REDIS_DB")
                .map(|d| d.parse().map_err(|_| bad("MC_REDIS_DB must be a number")))
                .transpose()?
                .unwrap_or(0),
        };
        let addr = if addr.contains(':') { addr.to_string() } else { format!("{addr}:6379") };
        Ok(Self { addr, username, password, db })
    }
}

/// Bytes asked of the socket per read while a reply is incomplete.
const READ_CHUNK: usize = 64 << 10;

struct Conn {
    stream: TcpStream,
    /// Bytes received and not yet decoded: the start of the next reply.
    pending: Vec<u8>,
    /// A whole reply must arrive within this (a server that trickles bytes cannot stretch it).
    limit: Duration,
}

impl Conn {
    /// Sends one command and reads its reply; an error reply is `Ok(Err(text))`. A reply that
    /// is not RESP, or beyond the decoder's limits, is an `InvalidData` I/O error: the stream
    /// is out of step and the connection must be dropped.
    fn command(&mut self, args: &[&[u8]]) -> io::Result<std::result::Result<Value, String>> {
        self.stream.write_all(&resp::encode_command(args))?;
        Ok(match self.reply()? {
            Value::Error(text) => Err(String::from_utf8_lossy(&text).into_owned()),
            v => Ok(v),
        })
    }

    fn reply(&mut self) -> io::Result<Value> {
        let limits = Limits::default();
        let due = Instant::now() + self.limit;
        loop {
            match resp::decode(&self.pending, &limits) {
                Ok(Some((value, used))) => {
                    self.pending.drain(..used);
                    return Ok(value);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the reply did not end in time",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
            let filled = self.pending.len();
            self.pending.resize(filled + READ_CHUNK, 0);
            let read = self.stream.read(&mut self.pending[filled..]);
            self.pending.truncate(filled + read.as_ref().map_or(0, |n| *n));
            match read {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

pub(crate) struct Redis {
    target: RedisTarget,
    uri: String,
    conn: Mutex<Option<Conn>>,
    ttl: Duration,
    deadlines: Deadlines,
}

impl Redis {
    pub(crate) fn new(
        target: RedisTarget,
        uri: String,
        ttl: Duration,
        deadlines: &Deadlines,
    ) -> Self {
        Self { target, uri, conn: Mutex::new(None), ttl, deadlines: *deadlines }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    fn connect(&self) -> Result<Conn> {
        let unreachable =
            |reason: String| Error::MetadataUnreachable { uri: self.uri.clone(), reason };
        let addr =
            crate::metadata::resolve(&self.target.addr).map_err(|e| unreachable(e.to_string()))?;
        let s = TcpStream::connect_timeout(&addr, self.deadlines.connect)
            .map_err(|e| unreachable(format!("{}: {e}", self.target.addr)))?;
        s.set_read_timeout(Some(self.deadlines.handshake))
            .map_err(|e| unreachable(e.to_string()))?;
        s.set_write_timeout(Some(self.deadlines.handshake))
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let mut c = Conn { stream: s, pending: Vec::new(), limit: self.deadlines.handshake };
        let refused = |what: &str, e: String| Error::Metadata {
            uri: self.uri.clone(),
            key: what.into(),
            reason: e,
        };
        if let Some(p) = &self.target.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(u) = &self.target.username {
                args.push(u.as_bytes());
            }
            args.push(p.as_bytes());
            c.command(&args)
                .map_err(|e| unreachable(e.to_string()))?
                .map_err(|e| refused("AUTH", e))?;
        }
        if self.target.db != 0 {
            let db = self.target.db.to_string();
            c.command(&[b"SELECT", db.as_bytes()])
                .map_err(|e| unreachable(e.to_string()))?
                .map_err(|e| refused("SELECT", e))?;
        }
        Ok(c)
    }

    /// Runs one command, (re)connecting as needed; an I/O error drops the connection.
    fn run(&self, key: &str, args: &[&[u8]]) -> Result<Value> {
        let mut slot = self.conn.lock();
        if slot.is_none() {
            *slot = Some(self.connect()?);
        }
        let Some(c) = slot.as_mut() else {
            return Err(Error::Internal("redis connection vanished"));
        };
        match c.command(args) {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                Err(Error::Metadata { uri: self.uri.clone(), key: key.into(), reason: e })
            }
            Err(e) => {
                *slot = None;
                Err(Error::MetadataUnreachable {
                    uri: self.uri.clone(),
                    reason: format!("{} (key {key:?}): {e}", self.target.addr),
                })
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.run(key, &[b"GET", key.as_bytes()])? {
            Value::Bulk(v) => Ok(v),
            other => Err(Error::Metadata {
                uri: self.uri.clone(),
                key: key.into(),
                reason: format!("unexpected reply to GET: {}", other.describe()),
            }),
        }
    }

    fn ttl_ms(&self) -> String {
        self.ttl.as_millis().max(1000).to_string()
    }

    pub(crate) fn put_expiring(&self, key: &str, value: &[u8]) -> Result<()> {
        let ttl = self.ttl_ms();
        self.run(key, &[b"SET", key.as_bytes(), value, b"PX", ttl.as_bytes()]).map(|_| ())
    }

    /// Pushes the expiry back. `Ok(false)` when the key expired (publish again).
    pub(crate) fn keepalive(&self, key: &str) -> Result<bool> {
        let ttl = self.ttl_ms();
        match self.run(key, &[b"PEXPIRE", key.as_bytes(), ttl.as_bytes()])? {
            Value::Integer(1) => Ok(true),
            _ => Ok(false),
        }
    }

    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        self.run(key, &[b"DEL", key.as_bytes()]).map(|_| ())
    }

    pub(crate) fn ping(&self) -> Result<()> {
        match self.run("PING", &[b"PING"])? {
            Value::Simple(_) | Value::Bulk(_) => Ok(()),
            other => Err(Error::Metadata {
                uri: self.uri.clone(),
                key: "PING".into(),
                reason: format!("unexpected reply: {}", other.describe()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connection to a one-shot server that reads one command, then sends `reply` one byte
    /// per write (so the client sees it in pieces) and closes.
    fn conn_to(reply: Vec<u8>) -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else { return };
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            for b in reply {
                if s.write_all(&[b]).is_err() {
                    return;
                }
            }
        });
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{e}"));
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap_or_else(|e| panic!("{e}"));
        Conn { stream, pending: Vec::new(), limit: Duration::from_secs(10) }
    }

    #[test]
    fn replies_in_pieces_decode_and_error_replies_carry_their_text() {
        let mut c = conn_to(b"$5\r\nhello\r\n".to_vec());
        assert_eq!(c.command(&[b"GET", b"k"]).ok(), Some(Ok(Value::Bulk(Some(b"hello".to_vec())))));
        let mut c = conn_to("-ERR é\r\n".as_bytes().to_vec());
        assert_eq!(c.command(&[b"GET", b"k"]).ok(), Some(Err("ERR é".to_string())));
    }

    #[test]
    fn bad_bytes_from_the_server_are_errors_not_panics() {
        let deep = [b"*1\r\n".repeat(100_000), b":1\r\n".to_vec()].concat();
        let over = b"$99999999999\r\n".to_vec();
        for reply in ["é\r\n".as_bytes().to_vec(), deep, over, b"+OK\n".to_vec()] {
            let e = conn_to(reply).command(&[b"PING"]).err().map(|e| e.kind());
            assert_eq!(e, Some(io::ErrorKind::InvalidData));
        }
        let e = conn_to(b"$5\r\nhel".to_vec()).command(&[b"PING"]).err().map(|e| e.kind());
        assert_eq!(e, Some(io::ErrorKind::UnexpectedEof), "a reply cut short");
    }

    #[test]
    fn uris_parse_with_env_fallbacks() {
        let none = |_: &str| None;
        let t =
            RedisTarget::parse("redis://127.0.0.1:6380/2", &none).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.addr.as_str(), t.db, t.password), ("127.0.0.1:6380", 2, None));
        let t =
            RedisTarget::parse("redis://bob:s3cret@h:1", &none).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.username.as_deref(), t.password.as_deref()), (Some("bob"), Some("s3cret")));
        let env = |k: &str| (k == "MC_REDIS_PASSWORD").then(|| "pw".to_string());
        assert_eq!(
            RedisTarget::parse("redis://h", &env).map(|t| (t.addr, t.password)).ok(),
            Some(("h:6379".into(), Some("pw".into())))
        );
        assert!(RedisTarget::parse("redis://h:1/x", &none).is_err());
        assert!(RedisTarget::parse("http://h", &none).is_err());
    }
}
