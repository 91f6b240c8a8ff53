//! The Redis backend: descriptors stored with `SET key value PX ttl`, kept alive by `PEXPIRE`
//! (key expiry stands in for leases). A small RESP client over one connection, re-opened
//! after any I/O error. `redis://[user:password@]host:port[/db]`; `MC_REDIS_PASSWORD`,
//! `MC_REDIS_USERNAME` and `MC_REDIS_DB` fill what the URL leaves out.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use parking_lot::Mutex;

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

#[derive(Debug)]
enum Reply {
    Simple,
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array,
}

struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    fn command(&mut self, args: &[&[u8]]) -> std::io::Result<std::result::Result<Reply, String>> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.r.get_mut().write_all(&out)?;
        self.reply()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_string())
    }

    fn reply(&mut self) -> std::io::Result<std::result::Result<Reply, String>> {
        let line = self.line()?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed RESP reply");
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Ok(Reply::Simple),
            "-" => Err(rest.to_string()),
            ":" => Ok(Reply::Int(rest.parse().map_err(|_| bad())?)),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    Ok(Reply::Bulk(None))
                } else if n > 64 << 20 {
                    return Err(bad());
                } else {
                    let mut buf = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut buf)?;
                    buf.truncate(n as usize);
                    Ok(Reply::Bulk(Some(buf)))
                }
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                for _ in 0..n.max(0) {
                    let _ = self.reply()?;
                }
                Ok(Reply::Array)
            }
            _ => return Err(bad()),
        })
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
        let mut c = Conn { r: BufReader::new(s) };
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
    fn run(&self, key: &str, args: &[&[u8]]) -> Result<Reply> {
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
                    reason: format!("{}: {e}", self.target.addr),
                })
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.run(key, &[b"GET", key.as_bytes()])? {
            Reply::Bulk(v) => Ok(v),
            other => Err(Error::Metadata {
                uri: self.uri.clone(),
                key: key.into(),
                reason: format!("unexpected reply {other:?}"),
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
            Reply::Int(1) => Ok(true),
            _ => Ok(false),
        }
    }

    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        self.run(key, &[b"DEL", key.as_bytes()]).map(|_| ())
    }

    pub(crate) fn ping(&self) -> Result<()> {
        match self.run("PING", &[b"PING"])? {
            Reply::Simple | Reply::Bulk(_) => Ok(()),
            other => Err(Error::Metadata {
                uri: self.uri.clone(),
                key: "PING".into(),
                reason: format!("unexpected reply {other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
