//! Raw memory: the few places the engine touches bytes behind addresses it was given.
//!
//! Registered memory is shared with peers and with the caller's own threads, so the engine
//! never builds Rust references (`&[u8]` / `&mut [u8]`) over it: data moves with raw-pointer
//! copies and with `read(2)` / `write(2)` on raw pointers, as DMA would. Callers guarantee,
//! by registering, that the range stays mapped until unregistration returns; the registry's
//! per-region guard makes unregistration wait for in-flight accesses.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::registry::Pinned;

pub(crate) const PAGE: usize = 4096;

/// Copies `len` bytes between two registered ranges.
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable for the duration of the call
/// (both inside live registered regions whose guards the caller holds), and they must not
/// overlap.
pub(crate) unsafe fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: the caller guarantees both ranges are mapped and disjoint for the whole call.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize) }
}

/// Reads up to `len` bytes from `fd` into `addr`, returning how many arrived (0 at EOF).
///
/// # Safety
/// `[addr, addr+len)` must stay writable for the duration of the call.
pub(crate) unsafe fn read_raw(fd: &impl AsRawFd, addr: u64, len: u64) -> io::Result<usize> {
    loop {
        // SAFETY: the caller vouches that [addr, addr+len) is writable.
        let n = unsafe { libc::read(fd.as_raw_fd(), addr as *mut libc::c_void, len as usize) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copies between two pinned ranges of equal length (they may overlap).
pub(crate) fn copy_pinned(dst: &Pinned<'_>, src: &Pinned<'_>) {
    let len = dst.len().min(src.len());
    // SAFETY: both ranges are pinned inside live registered regions (see `Pinned`); `copy`
    // tolerates overlap.
    unsafe { std::ptr::copy(src.addr() as *const u8, dst.addr() as *mut u8, len as usize) }
}

/// Copies `data` into a pinned range (up to the shorter of the two).
pub(crate) fn copy_from_slice(dst: &Pinned<'_>, data: &[u8]) {
    let n = dst.len().min(data.len() as u64);
    // SAFETY: the destination is pinned in a live registered region; `data` is a distinct
    // Rust slice of at least `n` bytes.
    unsafe { copy(dst.addr(), data.as_ptr() as u64, n) }
}

/// Copies a pinned range into a new vector.
pub(crate) fn copy_to_vec(src: &Pinned<'_>) -> Vec<u8> {
    let mut out = vec![0u8; src.len() as usize];
    // SAFETY: the source is pinned in a live registered region; `out` is a fresh allocation
    // of the same length.
    unsafe { copy(out.as_mut_ptr() as u64, src.addr(), src.len()) };
    out
}

/// A page-aligned, zeroed host buffer owned by Rust: what tests, benches and bindings
/// register when they need plain host memory.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain heap memory owned by this value; moving it between threads is
// fine, and shared access goes through raw addresses only.
unsafe impl Send for HostBuffer {}
// SAFETY: `&HostBuffer` exposes only the address and copies through `&mut self`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocates `len` zeroed bytes (at least one page), page-aligned.
    pub fn new(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size (at least one page).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(Error::Io {
            context: format!("allocating a {len}-byte host buffer"),
            kind: io::ErrorKind::OutOfMemory,
            message: "out of memory".into(),
        })?;
        Ok(Self { ptr, len })
    }

    fn layout(len: usize) -> Result<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len.max(PAGE), PAGE).map_err(|_| {
            Error::InvalidArgument { reason: format!("buffer length {len} too large") }
        })
    }

    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the contents out. Only meaningful when no transfer into it is in flight.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // SAFETY: the buffer owns `len` readable bytes; `out` is a distinct allocation.
        unsafe { copy(out.as_mut_ptr() as u64, self.addr(), self.len as u64) };
        out
    }

    /// Overwrites the start of the buffer with `data`.
    pub fn fill_from(&mut self, data: &[u8]) {
        let n = data.len().min(self.len);
        // SAFETY: `n` bytes fit in both; `&mut self` excludes other Rust access.
        unsafe { copy(self.addr(), data.as_ptr() as u64, n as u64) };
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: `ptr` came from `alloc_zeroed` with this same layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// A shared mapping of a memfd (or any fd): munmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process-wide memory; it is accessed only through raw addresses.
unsafe impl Send for Mapping {}
// SAFETY: as above; no Rust references to its bytes are handed out.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` read-write and shared.
    pub(crate) fn map_shared(fd: &OwnedFd, len: usize, what: &str) -> Result<Self> {
        Self::map(fd, len, libc::PROT_READ | libc::PROT_WRITE, what)
    }

    /// Maps `len` bytes of `fd` read-only and shared (a peer's page we only read).
    pub(crate) fn map_shared_read(fd: &OwnedFd, len: usize, what: &str) -> Result<Self> {
        Self::map(fd, len, libc::PROT_READ, what)
    }

    fn map(fd: &OwnedFd, len: usize, prot: i32, what: &str) -> Result<Self> {
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(format!("mmap of {what}"), &io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p as *mut u8).ok_or(Error::Internal("mmap returned null"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and nobody else unmaps.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// Creates an anonymous memfd of `len` bytes.
pub(crate) fn memfd(name: &str, len: usize) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| Error::Internal("memfd name has NUL"))?;
    // SAFETY: `cname` is a valid C string; the flags are constants.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", &io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `fd` is a valid memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(Error::io(format!("ftruncate of memfd to {len}"), &io::Error::last_os_error()));
    }
    Ok(fd)
}
