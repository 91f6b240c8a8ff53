//! Buffered frame I/O over TCP that moves payloads straight between the socket and
//! registered memory (no intermediate copy for large payloads).
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tidewire_core::wire::{Header, HEADER_LEN};

use crate::mem;
use crate::registry::Pinned;

/// Sockets wake at this interval so idle loops can notice shutdown.
pub(crate) const POLL: Duration = Duration::from_millis(500);

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

pub(crate) struct FrameReader {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// How long the peer may stall in the middle of a frame.
    stall: Duration,
}

impl FrameReader {
    /// `stream` must have a read timeout of [`POLL`].
    pub(crate) fn new(stream: TcpStream, capacity: usize, stall: Duration) -> Self {
        Self { stream, buf: vec![0u8; capacity].into_boxed_slice(), pos: 0, end: 0, stall }
    }

    pub(crate) fn has_buffered(&self) -> bool {
        self.pos < self.end
    }

    fn buffered(&self) -> usize {
        self.end - self.pos
    }

    fn stalled(&self, waited: &mut Duration) -> io::Result<()> {
        *waited += POLL;
        if *waited >= self.stall {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stalled in the middle of a frame",
            ));
        }
        Ok(())
    }

    /// Reads more bytes into the buffer. `Ok(false)` at EOF. At a frame boundary,
    /// `idle()` is asked on every poll tick whether to keep waiting.
    fn fill(&mut self, mid_frame: bool, idle: &mut dyn FnMut() -> bool) -> io::Result<bool> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let mut waited = Duration::ZERO;
        loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if mid_frame {
                        self.stalled(&mut waited)?;
                    } else if !idle() {
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "stopping"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame header's bytes; `Ok(None)` on a clean EOF between frames.
    pub(crate) fn next_header(
        &mut self,
        idle: &mut dyn FnMut() -> bool,
    ) -> io::Result<Option<[u8; HEADER_LEN]>> {
        while self.buffered() < HEADER_LEN {
            let mid = self.buffered() > 0;
            if !self.fill(mid, idle)? {
                return if mid { Err(io::ErrorKind::UnexpectedEof.into()) } else { Ok(None) };
            }
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[self.pos..self.pos + HEADER_LEN]);
        self.pos += HEADER_LEN;
        Ok(Some(h))
    }

    /// Reads a payload into a new vector (control frames; `len` is already bounded).
    pub(crate) fn read_vec(&mut self, len: u64) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let mut done = 0;
        while done < out.len() {
            if self.buffered() == 0 && !self.fill(true, &mut || true)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = self.buffered().min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
        Ok(out)
    }

    /// Reads a payload of `dst.len()` bytes straight into the pinned range.
    pub(crate) fn read_into(&mut self, dst: &Pinned<'_>) -> io::Result<()> {
        // SAFETY: a pinned range is mapped and writable while the pin lives.
        unsafe { self.read_raw(dst.addr(), dst.len()) }
    }

    /// # Safety
    /// `[addr, addr+len)` must stay writable for the duration of the call.
    unsafe fn read_raw(&mut self, addr: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        let mut waited = Duration::ZERO;
        while done < len {
            let left = len - done;
            if self.buffered() > 0 {
                let n = (self.buffered() as u64).min(left);
                // SAFETY: the buffer holds `n` bytes at `pos`; the destination is writable
                // per this function's contract.
                unsafe { mem::copy(addr + done, self.buf.as_ptr() as u64 + self.pos as u64, n) };
                self.pos += n as usize;
                done += n;
            } else if left >= (self.buf.len() / 2) as u64 {
                // SAFETY: the destination range is writable per this function's contract.
                match unsafe { mem::read_raw(&self.stream, addr + done, left) } {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        done += n as u64;
                        waited = Duration::ZERO;
                    }
                    Err(e) if is_timeout(&e) => self.stalled(&mut waited)?,
                    Err(e) => return Err(e),
                }
            } else if !self.fill(true, &mut || true)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Skips `len` payload bytes.
    pub(crate) fn discard(&mut self, len: u64) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            if self.buffered() == 0 && !self.fill(true, &mut || true)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = (self.buffered() as u64).min(left);
            self.pos += n as usize;
            left -= n;
        }
        Ok(())
    }
}

/// Coalesces small frames into one buffer; large payloads go straight from memory to the
/// socket.
pub(crate) struct FrameWriter {
    stream: TcpStream,
    buf: Vec<u8>,
    cap: usize,
}

/// Payloads up to this size are copied into the coalescing buffer.
const SMALL_PAYLOAD: u64 = 64 << 10;

impl FrameWriter {
    pub(crate) fn new(stream: TcpStream, capacity: usize) -> Self {
        Self { stream, buf: Vec::with_capacity(capacity), cap: capacity }
    }

    pub(crate) fn header(&mut self, h: &Header) -> io::Result<()> {
        if self.buf.len() + HEADER_LEN > self.cap {
            self.flush()?;
        }
        self.buf.extend_from_slice(&h.encode());
        Ok(())
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        if self.buf.len() + b.len() > self.cap {
            self.flush()?;
        }
        if b.len() > self.cap {
            return self.stream.write_all(b);
        }
        self.buf.extend_from_slice(b);
        Ok(())
    }

    /// Writes the bytes of a pinned range.
    pub(crate) fn pinned(&mut self, src: &Pinned<'_>) -> io::Result<()> {
        // SAFETY: a pinned range is mapped and readable while the pin lives.
        unsafe { self.raw(src.addr(), src.len()) }
    }

    /// # Safety
    /// `[addr, addr+len)` must stay readable for the duration of the call.
    unsafe fn raw(&mut self, addr: u64, len: u64) -> io::Result<()> {
        if len <= SMALL_PAYLOAD && self.buf.len() as u64 + len <= self.cap as u64 {
            let at = self.buf.len();
            self.buf.resize(at + len as usize, 0);
            // SAFETY: the source is readable per this function's contract; the buffer was
            // just resized to hold `len` more bytes.
            unsafe { mem::copy(self.buf.as_mut_ptr() as u64 + at as u64, addr, len) };
            return Ok(());
        }
        self.flush()?;
        // SAFETY: the source is readable per this function's contract.
        unsafe { mem::write_all_raw(&self.stream, addr, len) }
    }

    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.stream.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}
