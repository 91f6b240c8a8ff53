//! The RPC/data endpoint: one TCP port per engine serving handshakes, descriptors (the p2p
//! metadata backend), probes, notifications and one-sided READ/WRITE.
//!
//! Every remote access is checked against the registry: a range not inside one live
//! registered region is refused with `AccessDenied`, its payload skipped, the memory untouched.
//! A malformed, truncated or oversized frame drops that connection only; a connection that
//! stalls mid-frame longer than the stall deadline is dropped too.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;

use rand::Rng;
use tidewire_core::wire::{decode_strings, FrameKind, Header, Status, INSTANCE_LEN};
use tidewire_core::RegionId;

use crate::config::EngineConfig;
use crate::engine::Inner;
use crate::error::{Error, Result};
use crate::frames::{FrameReader, FrameWriter, POLL};
use crate::lifecycle::Wakeable;
use crate::notify::Notification;
use crate::registry::RegionEntry;

const IO_BUFFER: usize = 64 << 10;

/// Binds the RPC port: the configured port, or random ports of the range until one is free.
/// Only what this returns is ever published.
pub(crate) fn bind(cfg: &EngineConfig) -> Result<TcpListener> {
    let host = cfg.host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) => {
            (host, 0).to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip()).ok_or_else(
                || Error::Bind { addr: cfg.host.clone(), reason: "cannot resolve host".into() },
            )?
        }
    };
    let try_bind = |port: u16| TcpListener::bind(SocketAddr::new(ip, port));
    let fail = |port: u16, e: io::Error| Error::Bind {
        addr: SocketAddr::new(ip, port).to_string(),
        reason: e.to_string(),
    };
    if let Some(port) = cfg.port {
        return try_bind(port).map_err(|e| fail(port, e));
    }
    let (lo, hi) = cfg.port_range;
    let mut rng = rand::thread_rng();
    let attempts = 64.min(usize::from(hi - lo) + 1);
    let mut last = None;
    for _ in 0..attempts {
        let port = rng.gen_range(lo..=hi);
        match try_bind(port) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some((port, e)),
            Err(e) => return Err(fail(port, e)),
        }
    }
    let (port, e) = last.unwrap_or((lo, io::ErrorKind::AddrInUse.into()));
    Err(Error::Bind {
        addr: format!("{ip}:{lo}-{hi}"),
        reason: format!("{attempts} random ports in use (last {port}: {e})"),
    })
}

/// Accepts connections until the engine stops.
pub(crate) fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    for stream in listener.incoming() {
        if inner.life.stopping() {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("{}: accept failed: {e}", inner.name);
                std::thread::sleep(POLL / 10);
                continue;
            }
        };
        let i2 = inner.clone();
        if let Err(e) = inner.life.spawn("tw-rpc-conn".into(), move || serve(&i2, stream)) {
            log::warn!("{}: {e}", inner.name);
        }
    }
}

fn serve(inner: &Inner, stream: TcpStream) {
    let peer = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
    let setup = || -> io::Result<(FrameReader, FrameWriter, TcpStream)> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(inner.config.deadlines.stall))?;
        let r = FrameReader::new(stream.try_clone()?, IO_BUFFER, inner.config.deadlines.stall);
        Ok((r, FrameWriter::new(stream.try_clone()?, IO_BUFFER), stream.try_clone()?))
    };
    let (mut r, mut w, wake) = match setup() {
        Ok(x) => x,
        Err(e) => return log::warn!("{}: connection from {peer}: {e}", inner.name),
    };
    let _tracked = inner.life.track(Wakeable::Tcp(wake));
    match serve_frames(inner, &mut r, &mut w).and_then(|()| w.flush().map_err(ConnError::Io)) {
        Ok(()) => {}
        Err(ConnError::Io(e))
            if inner.life.stopping() || e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => log::warn!("{}: dropping connection from {peer}: {e}", inner.name),
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Decode(#[from] tidewire_core::CoreError),
    #[error("unexpected {0:?} frame from an initiator")]
    Unexpected(FrameKind),
}

/// In-flight marks a connection's peer took with `Enter`; the ones it did not `Leave` are
/// cleared when the connection ends (the peer died or gave up), so an `unregister` waiting for
/// them is never held by a peer that is gone.
#[derive(Default)]
struct Leases(Vec<Arc<RegionEntry>>);

impl Leases {
    fn enter(&mut self, inner: &Inner, id: u64) -> Status {
        let Some(entry) = inner.registry.by_id(RegionId(id)) else { return Status::AccessDenied };
        match entry.control() {
            Some(control) if control.enter_remote() => {
                self.0.push(entry);
                Status::Ok
            }
            _ => Status::AccessDenied,
        }
    }

    fn leave(&mut self, id: u64) -> Status {
        let Some(at) = self.0.iter().position(|e| e.id == RegionId(id)) else {
            return Status::BadRequest;
        };
        let entry = self.0.swap_remove(at);
        if let Some(control) = entry.control() {
            control.leave_remote();
        }
        Status::Ok
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        for entry in self.0.drain(..) {
            if let Some(control) = entry.control() {
                control.leave_remote();
            }
        }
    }
}

fn serve_frames(inner: &Inner, r: &mut FrameReader, w: &mut FrameWriter) -> Result<(), ConnError> {
    let mut leases = Leases::default();
    loop {
        if !r.has_buffered() {
            w.flush()?;
        }
        let Some(raw) = r.next_header(&mut || !inner.life.stopping())? else {
            return Ok(());
        };
        let h = Header::decode(&raw)?;
        let stopping = inner.life.stopping();
        match h.kind {
            FrameKind::Hello => {
                r.discard(INSTANCE_LEN)?;
                w.header(&Header::new(FrameKind::HelloAck, h.tag, 0, INSTANCE_LEN))?;
                w.bytes(&inner.instance.0.to_le_bytes())?;
            }
            FrameKind::GetDescriptor => {
                let json = inner.descriptor().to_json();
                w.header(&Header::new(FrameKind::Descriptor, h.tag, 0, json.len() as u64))?;
                w.bytes(&json)?;
            }
            FrameKind::Probe => w.header(&Header::new(FrameKind::ProbeAck, h.tag, 0, 0))?,
            FrameKind::Write => {
                let entry = inner.registry.find(h.addr, h.len);
                let status = match entry.as_ref().and_then(|e| e.pin(h.addr, h.len)) {
                    Some(_) if stopping => Status::ShuttingDown,
                    Some(dst) => {
                        r.read_into(&dst)?;
                        Status::Ok
                    }
                    None => Status::AccessDenied,
                };
                if status != Status::Ok {
                    r.discard(h.len)?;
                }
                w.header(
                    &Header::new(FrameKind::WriteAck, h.tag, h.addr, h.len).with_status(status),
                )?;
            }
            FrameKind::Read => {
                let entry = inner.registry.find(h.addr, h.len);
                let src = entry.as_ref().and_then(|e| e.pin(h.addr, h.len));
                let status = match src {
                    _ if stopping => Status::ShuttingDown,
                    _ if h.len > tidewire_core::wire::MAX_DATA_FRAME => Status::BadRequest,
                    Some(src) => {
                        w.header(&Header::new(FrameKind::ReadData, h.tag, h.addr, h.len))?;
                        w.pinned(&src)?;
                        Status::Ok
                    }
                    None => Status::AccessDenied,
                };
                if status != Status::Ok {
                    w.header(
                        &Header::new(FrameKind::ReadData, h.tag, h.addr, 0).with_status(status),
                    )?;
                }
            }
            FrameKind::Notify => {
                let payload = r.read_vec(h.len)?;
                let status = match decode_strings::<3>(&payload) {
                    Ok([from, name, message]) => {
                        inner.notifications.push(Notification { from, name, message });
                        Status::Ok
                    }
                    Err(e) => {
                        log::warn!("{}: malformed notification: {e}", inner.name);
                        Status::BadRequest
                    }
                };
                w.header(&Header::new(FrameKind::NotifyAck, h.tag, 0, 0).with_status(status))?;
            }
            FrameKind::Enter => {
                let status =
                    if stopping { Status::ShuttingDown } else { leases.enter(inner, h.addr) };
                w.header(&Header::new(FrameKind::EnterAck, h.tag, h.addr, 0).with_status(status))?;
            }
            FrameKind::Leave => {
                let status = leases.leave(h.addr);
                w.header(&Header::new(FrameKind::LeaveAck, h.tag, h.addr, 0).with_status(status))?;
            }
            kind => return Err(ConnError::Unexpected(kind)),
        }
    }
}
