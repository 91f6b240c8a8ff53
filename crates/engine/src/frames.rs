//! Non-blocking frame I/O over TCP for the readiness loop (`reactor.rs`): a receive buffer
//! that moves large payloads straight from the socket into registered memory, and a send
//! queue that gathers many frames into one `writev`, payloads straight from registered memory
//! (no intermediate copy for either). Nothing here waits: every call does what the
//! socket allows now and says whether it would block.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tidewire_core::wire::HEADER_LEN;

use crate::mem;
use crate::registry::{OwnedPinned, RegionEntry};

/// Blocking sockets elsewhere in the engine (metadata clients, the shm socket) wake at this
/// interval so that their loops notice shutdown.
pub(crate) const POLL: Duration = Duration::from_millis(500);

/// Bytes of the receive buffer, and what a flush gathers at least into one `writev`.
pub(crate) const IO_BUFFER: usize = 64 << 10;

pub(crate) fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// What one receive step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Got {
    /// This many bytes (at least one) were received or moved.
    Bytes(usize),
    /// Nothing is available now.
    Blocked,
    /// The peer closed the connection.
    Eof,
}

/// Received bytes not yet consumed.
pub(crate) struct RecvBuf {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The last read took less than it asked for: the socket was drained then. Any byte that
    /// arrives later raises a new edge-triggered event, so no read is tried until
    /// [`RecvBuf::on_event`] (one `EAGAIN` read saved per wake-up).
    drained: bool,
}

impl RecvBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { buf: vec![0u8; capacity].into_boxed_slice(), pos: 0, end: 0, drained: false }
    }

    /// The socket reported readiness (or may have): reads are tried again.
    pub(crate) fn on_event(&mut self) {
        self.drained = false;
    }

    pub(crate) fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// One read from the socket into the buffer (non-blocking socket).
    pub(crate) fn fill(&mut self, s: &TcpStream) -> io::Result<Got> {
        if self.drained {
            return Ok(Got::Blocked);
        }
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        loop {
            let space = self.buf.len() - self.end;
            match (&mut &*s).read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(Got::Eof),
                Ok(n) => {
                    self.end += n;
                    self.drained = n < space;
                    return Ok(Got::Bytes(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => {
                    self.drained = true;
                    return Ok(Got::Blocked);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next header's bytes if all of them are buffered (consumed).
    pub(crate) fn header(&mut self) -> Option<[u8; HEADER_LEN]> {
        if self.buffered() < HEADER_LEN {
            return None;
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.pos..self.pos + HEADER_LEN]);
        self.pos += HEADER_LEN;
        Some(h)
    }

    /// Makes sure some bytes are buffered: `Bytes` when there are.
    fn some(&mut self, s: &TcpStream) -> io::Result<Got> {
        if self.buffered() > 0 {
            return Ok(Got::Bytes(self.buffered()));
        }
        self.fill(s)
    }

    /// Moves up to `want` payload bytes onto the end of `out`.
    pub(crate) fn recv_vec(
        &mut self,
        s: &TcpStream,
        out: &mut Vec<u8>,
        want: usize,
    ) -> io::Result<Got> {
        match self.some(s)? {
            Got::Bytes(_) => {
                let n = self.buffered().min(want);
                out.extend_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                Ok(Got::Bytes(n))
            }
            other => Ok(other),
        }
    }

    /// Skips up to `left` payload bytes.
    pub(crate) fn discard(&mut self, s: &TcpStream, left: u64) -> io::Result<Got> {
        match self.some(s)? {
            Got::Bytes(_) => {
                let n = (self.buffered() as u64).min(left) as usize;
                self.pos += n;
                Ok(Got::Bytes(n))
            }
            other => Ok(other),
        }
    }

    /// Moves up to `dst.len() - done` payload bytes into the pinned range at offset `done`:
    /// buffered bytes first, then straight from the socket when the rest is large.
    pub(crate) fn recv_into(
        &mut self,
        s: &TcpStream,
        dst: &OwnedPinned,
        done: u64,
    ) -> io::Result<Got> {
        let left = dst.len().saturating_sub(done);
        if left == 0 {
            return Ok(Got::Bytes(0));
        }
        let at = dst.addr() + done;
        if self.buffered() == 0 && left >= (self.buf.len() / 2) as u64 {
            if self.drained {
                return Ok(Got::Blocked);
            }
            // SAFETY: `[at, at+left)` lies inside the pinned range, which stays registered and
            // writable while `dst` lives.
            return match unsafe { mem::read_raw(s, at, left) } {
                Ok(0) => Ok(Got::Eof),
                Ok(n) => {
                    self.drained = (n as u64) < left;
                    Ok(Got::Bytes(n))
                }
                Err(e) if would_block(&e) => {
                    self.drained = true;
                    Ok(Got::Blocked)
                }
                Err(e) => Err(e),
            };
        }
        match self.some(s)? {
            Got::Bytes(_) => {
                let n = (self.buffered() as u64).min(left);
                // SAFETY: the buffer holds `n` bytes at `pos`; the destination lies inside the
                // pinned range (see above).
                unsafe { mem::copy(at, self.buf.as_ptr() as u64 + self.pos as u64, n) };
                self.pos += n as usize;
                Ok(Got::Bytes(n as usize))
            }
            other => Ok(other),
        }
    }
}

/// One thing to send.
pub(crate) enum Item {
    /// A frame with a small payload (possibly none).
    Frame { header: [u8; HEADER_LEN], payload: Vec<u8> },
    /// A frame whose payload is `len` bytes of registered memory at `addr`, pinned when the
    /// item is sent. If the region is no longer registered by then, `refusal` is sent instead
    /// (when given) and `tag` is reported refused.
    Memory {
        header: [u8; HEADER_LEN],
        entry: Arc<RegionEntry>,
        addr: u64,
        len: u64,
        refusal: Option<[u8; HEADER_LEN]>,
        tag: u64,
    },
}

impl Item {
    /// A whole encoded frame (its header and a small payload; shorter than a header: none).
    pub(crate) fn from_frame(frame: &[u8]) -> Option<Self> {
        let (header, payload) = frame.split_first_chunk::<HEADER_LEN>()?;
        Some(Item::Frame { header: *header, payload: payload.to_vec() })
    }
}

impl Item {
    pub(crate) fn bytes(&self) -> u64 {
        HEADER_LEN as u64
            + match self {
                Item::Frame { payload, .. } => payload.len() as u64,
                Item::Memory { len, .. } => *len,
            }
    }
}

/// What a flush did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Flushed {
    /// Bytes the socket took.
    pub(crate) wrote: u64,
    /// The socket is full: the rest waits for it to become writable.
    pub(crate) blocked: bool,
}

/// The payload of a frame ready to be written.
enum Body {
    None,
    Bytes(Vec<u8>),
    /// Registered memory, pinned until the frame is written.
    Memory(OwnedPinned),
}

/// A frame ready to be written (its memory pinned), and how much of it was.
struct Ready {
    header: [u8; HEADER_LEN],
    body: Body,
    sent: usize,
}

impl Ready {
    fn len(&self) -> usize {
        HEADER_LEN
            + match &self.body {
                Body::None => 0,
                Body::Bytes(b) => b.len(),
                Body::Memory(p) => p.len() as usize,
            }
    }
}

/// `iovec`s per `writev` (Linux allows 1,024).
const IOV_CAP: usize = 256;

/// Frames waiting to be written, in order. Each `flush` gathers the frames at the head into
/// one `writev`: headers from the queue, payloads straight from registered memory, nothing
/// copied in user space.
#[derive(Default)]
pub(crate) struct SendQueue {
    items: VecDeque<Item>,
    /// Bytes of `items`.
    items_bytes: u64,
    /// The head of the queue, pinned; the first may be partly written.
    ready: VecDeque<Ready>,
    /// Bytes of `ready` still to be written.
    ready_bytes: u64,
}

impl SendQueue {
    pub(crate) fn push(&mut self, item: Item) {
        self.items_bytes += item.bytes();
        self.items.push_back(item);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty() && self.ready.is_empty()
    }

    /// Bytes still to be written.
    pub(crate) fn queued_bytes(&self) -> u64 {
        self.items_bytes + self.ready_bytes
    }

    /// Drops everything queued (and the pins it holds).
    pub(crate) fn clear(&mut self) {
        self.items.clear();
        self.items_bytes = 0;
        self.ready.clear();
        self.ready_bytes = 0;
    }

    /// Moves items to `ready`, pinning their memory, until about `bytes` are ready or the
    /// `iovec`s are used up. An item whose region is no longer registered is replaced by its
    /// refusal (if any) and its tag pushed onto `refused`.
    fn top_up(&mut self, bytes: u64, refused: &mut Vec<u64>) {
        while self.ready.len() < IOV_CAP / 2 && self.ready_bytes < bytes {
            let Some(item) = self.items.pop_front() else { return };
            self.items_bytes -= item.bytes();
            let ready = match item {
                Item::Frame { header, payload } if payload.is_empty() => {
                    Ready { header, body: Body::None, sent: 0 }
                }
                Item::Frame { header, payload } => {
                    Ready { header, body: Body::Bytes(payload), sent: 0 }
                }
                Item::Memory { header, entry, addr, len, refusal, tag } => {
                    match entry.try_pin_owned(addr, len) {
                        Some(pin) => Ready { header, body: Body::Memory(pin), sent: 0 },
                        None => {
                            refused.push(tag);
                            let Some(header) = refusal else { continue };
                            Ready { header, body: Body::None, sent: 0 }
                        }
                    }
                }
            };
            self.ready_bytes += ready.len() as u64;
            self.ready.push_back(ready);
        }
    }

    /// Writes until the queue is empty, the socket is full, or about `budget` bytes went.
    /// Items whose memory is no longer registered are skipped (their refusal sent instead)
    /// and their tags pushed onto `refused`.
    pub(crate) fn flush(
        &mut self,
        s: &TcpStream,
        refused: &mut Vec<u64>,
        budget: u64,
    ) -> io::Result<Flushed> {
        let mut out = Flushed::default();
        while out.wrote < budget {
            self.top_up((budget - out.wrote).max(IO_BUFFER as u64), refused);
            if self.ready.is_empty() {
                break;
            }
            let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
            let mut iov = [empty; IOV_CAP];
            let mut used = 0;
            let mut push = |used: &mut usize, base: *const u8, len: usize| {
                iov[*used] = libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len };
                *used += 1;
            };
            for r in &self.ready {
                if used + 2 > IOV_CAP {
                    break;
                }
                let body: (*const u8, usize) = match &r.body {
                    Body::None => (std::ptr::null(), 0),
                    Body::Bytes(b) => (b.as_ptr(), b.len()),
                    Body::Memory(p) => (p.addr() as *const u8, p.len() as usize),
                };
                if r.sent < HEADER_LEN {
                    let head = &r.header[r.sent..];
                    push(&mut used, head.as_ptr(), head.len());
                    if body.1 > 0 {
                        push(&mut used, body.0, body.1);
                    }
                } else {
                    // A partly written payload: `skip < body.1` (the frame is not done).
                    let skip = r.sent - HEADER_LEN;
                    push(&mut used, body.0.wrapping_add(skip), body.1 - skip);
                }
            }
            // sendmsg, not writev: MSG_NOSIGNAL turns a write to a reset connection into
            // EPIPE instead of a SIGPIPE that would kill a host process not ignoring it.
            // SAFETY: msghdr is plain old data; zero is a valid empty header.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_iov = iov.as_ptr() as *mut libc::iovec;
            hdr.msg_iovlen = used as _;
            // SAFETY: every iovec points into memory that stays valid and unchanged for the
            // call: headers and byte payloads owned by `self.ready` (not touched until the call
            // returns), and registered memory pinned by the `OwnedPinned`s it holds; `hdr`
            // points at the live `iov` array.
            let rc = unsafe { libc::sendmsg(s.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if would_block(&e) {
                    out.blocked = true;
                    break;
                }
                return Err(e);
            }
            if rc == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut n = rc as usize;
            out.wrote += n as u64;
            self.ready_bytes -= n as u64;
            while n > 0 {
                let Some(r) = self.ready.front_mut() else { break };
                let left = r.len() - r.sent;
                if n >= left {
                    n -= left;
                    self.ready.pop_front();
                } else {
                    r.sent += n;
                    n = 0;
                }
            }
        }
        Ok(out)
    }
}
