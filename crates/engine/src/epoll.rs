//! One epoll set: what the I/O loops (`reactor.rs`) and the peer watcher (`watch.rs`) wait on.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// An owned epoll set.
pub(crate) struct Epoll {
    fd: OwnedFd,
    /// Whose set this is, for errors and logs.
    what: &'static str,
}

impl Epoll {
    pub(crate) fn new(what: &'static str) -> Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(Error::io(format!("creating {what}'s epoll set"), &e));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, what })
    }

    /// Adds `fd` with `events`, reported with `token`.
    pub(crate) fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid event for the call's duration; `fd` is a descriptor the
        // caller keeps open (the kernel validates it).
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `fd` (an error is the caller's to ignore: a closed descriptor left the set).
    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until `until` (at most `max` from now) for events; returns how many were written
    /// into `events`. A failure other than an interruption is logged and paced by `max`, so a
    /// broken set never makes its caller spin.
    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        until: Option<Instant>,
        max: Duration,
    ) -> usize {
        let now = Instant::now();
        let d = until.map_or(max, |u| u.saturating_duration_since(now).min(max));
        // Rounded up, so a deadline 0.3 ms away does not spin.
        let ms = i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let cap = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: `events` is a writable array of at least `cap` entries for the call.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), cap, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("{}: epoll_wait failed: {e}", self.what);
                std::thread::sleep(max);
            }
            return 0;
        }
        n as usize
    }
}
