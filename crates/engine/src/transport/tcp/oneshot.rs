//! One-shot exchanges on a fresh blocking connection to a peer's RPC/data port (descriptor
//! fetches, probes, name claims), with the handshake machine driven on the calling thread
//! within the deadlines.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tidewire_core::handshake::{Handshake, HandshakeEvent, HandshakeFailure};
use tidewire_core::wire::{Header, HEADER_LEN};
use tidewire_core::InstanceId;

use crate::config::{Credentials, Deadlines};
use crate::error::{Error, PeerRef, Result};
use crate::frames::{would_block, POLL};

pub(super) fn unreachable(
    peer: &PeerRef,
    what: &str,
    addr: SocketAddr,
    e: &dyn std::fmt::Display,
) -> Error {
    Error::PeerUnreachable { peer: peer.clone(), reason: format!("{what} {addr}: {e}") }
}

/// The error a failed handshake is reported as.
pub(super) fn handshake_error(peer: &PeerRef, addr: SocketAddr, f: HandshakeFailure) -> Error {
    match f {
        HandshakeFailure::BadAnswer { .. } => {
            Error::Protocol { peer: peer.clone(), reason: f.to_string() }
        }
        HandshakeFailure::Restarted { .. } => {
            Error::PeerUnreachable { peer: peer.clone(), reason: f.to_string() }
        }
        _ => unreachable(peer, "handshake with", addr, &f),
    }
}

/// A blocking stream whose reads can be bounded (TCP, and the shm socket's Unix stream).
pub(crate) trait Timed {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timed for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
}

impl Timed for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, t)
    }
}

/// Reads one frame on a blocking stream, all of it by `due` (a peer that trickles bytes
/// cannot stretch the wait: the socket's timeout is the time left before each read).
pub(crate) fn read_frame<S: Timed>(stream: &S, due: Instant) -> io::Result<(Header, Vec<u8>)>
where
    for<'a> &'a S: Read,
{
    let mut raw = [0u8; HEADER_LEN];
    read_exact_by(stream, &mut raw, due)?;
    let h = Header::decode(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; h.payload_len() as usize];
    read_exact_by(stream, &mut payload, due)?;
    Ok((h, payload))
}

fn read_exact_by<S: Timed>(stream: &S, mut buf: &mut [u8], due: Instant) -> io::Result<()>
where
    for<'a> &'a S: Read,
{
    let mut s = stream;
    while !buf.is_empty() {
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match s.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects to `addr` and runs the handshake machine on this thread, within the deadlines
/// (for one-shot calls: descriptor fetches, probes, name claims). Returns the stream (read
/// timeout set to [`POLL`]) and the peer's instance id; an instance other than `expect` is
/// returned for the caller to judge, not failed.
pub(crate) fn handshake(
    peer: &PeerRef,
    addr: SocketAddr,
    expect: Option<InstanceId>,
    deadlines: &Deadlines,
    creds: &Credentials,
) -> Result<(TcpStream, InstanceId)> {
    let fail = |what: &str, e: &io::Error| unreachable(peer, what, addr, e);
    let stream =
        TcpStream::connect_timeout(&addr, deadlines.connect).map_err(|e| fail("connect to", &e))?;
    stream.set_nodelay(true).map_err(|e| fail("set_nodelay on", &e))?;
    stream.set_write_timeout(Some(deadlines.stall)).map_err(|e| fail("configure", &e))?;
    let hs = Handshake::new(Instant::now(), deadlines.handshake, expect, creds.client());
    let outcome = match run_handshake(&stream, hs) {
        Ok(event) => event,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(Error::Protocol { peer: peer.clone(), reason: e.to_string() });
        }
        Err(e) => return Err(fail("handshake with", &e)),
    };
    let id = match outcome {
        HandshakeEvent::Established(id) => id,
        HandshakeEvent::Failed(HandshakeFailure::Restarted { found, .. }) => found,
        HandshakeEvent::Failed(f) => return Err(handshake_error(peer, addr, f)),
    };
    stream.set_read_timeout(Some(POLL)).map_err(|e| fail("configure", &e))?;
    Ok((stream, id))
}

/// Drives handshake `hs` on a blocking stream to its outcome: what it sends is written, what
/// arrives is read by its deadline (a frame that cannot be decoded is `InvalidData`).
pub(crate) fn run_handshake<S: Timed>(stream: &S, mut hs: Handshake) -> io::Result<HandshakeEvent>
where
    for<'a> &'a S: Read + Write,
{
    loop {
        while let Some(frame) = hs.poll_transmit() {
            let mut s = stream;
            s.write_all(&frame)?;
        }
        if let Some(event) = hs.poll_event() {
            return Ok(event);
        }
        let Some(due) = hs.poll_timeout() else {
            return Err(io::Error::other("a handshake ended without an outcome"));
        };
        let due = due.max(Instant::now() + Duration::from_millis(1));
        match read_frame(stream, due) {
            Ok((h, payload)) => hs.handle_frame(Instant::now(), &h, &payload),
            // The socket waited at least until `due`.
            Err(e) if would_block(&e) => hs.handle_timeout(Instant::now().max(due)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => hs.handle_closed(),
            Err(e) => return Err(e),
        }
    }
}

/// Sends one frame and reads one answer within `limit` (the write within the stream's write
/// timeout).
pub(crate) fn exchange(
    stream: &TcpStream,
    frame: &[u8],
    limit: Duration,
) -> io::Result<(Header, Vec<u8>)> {
    let due = Instant::now() + limit;
    let mut s = stream;
    s.write_all(frame)?;
    read_frame(stream, due)
}
