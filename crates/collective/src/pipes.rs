//! Pipes between two processes of one host, for the all-to-all's large pairs.
//!
//! A rank makes one pipe for each peer of its host that sends to it (its `Made`); the peer
//! takes both ends into its own process (`pidfd_getfd`, the same leave `process_vm_readv`
//! needs) and sends its blocks with `vmsplice`: the kernel takes references to the sender's
//! own pages (a lock-free walk of its own page tables) instead of copying them, and the
//! receiver's `read` is the one copy. `process_vm_readv` pins the *owner's* pages from the
//! reader's side, under the owner's page-table locks, so that three ranks reading one rank's
//! input wait for each other; through pipes, 4 ranks on a 16-CPU host moved a 1 MiB
//! all-to-all in 54–59 µs against 116–174 µs (bench `a2a_bench.c`, NOTES §70).
//!
//! What crosses a pipe in a call: a 32-byte header written with `write` (the collective's
//! header word: call number and operation; the length of the block), then the block,
//! `vmsplice`d. The sender may return only once the receiver has taken every byte (its pages
//! are referenced, not copied, until then): it waits until the pipe is empty (`FIONREAD`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::Error;

/// Bytes a pipe is grown to once its pair set it up, in the call that first sends through it
/// (`F_SETPIPE_SZ`; where the kernel refuses, it keeps what it had). Pipes are made at the
/// kernel's default size, which counts against the per-user limit on pipe pages
/// (`/proc/sys/fs/pipe-user-pages-soft`) as any pipe does, and grown only once both ends
/// took theirs.
const PIPE_BYTES: libc::c_int = 256 << 10;
/// The least a pipe must hold to be used: past the per-user limit the kernel makes pipes of
/// two pages, through which a block would crawl.
const PIPE_MIN_BYTES: libc::c_int = 64 << 10;

/// Bytes of the header before each block.
const HEAD: usize = 32;

fn os_error() -> io::Error {
    io::Error::last_os_error()
}

/// A pipe a rank made for one peer to send into: it reads `read`; the peer takes both ends.
pub(crate) struct Made {
    read: OwnedFd,
    write: OwnedFd,
}

impl Made {
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` holds the two descriptors the kernel writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(os_error());
        }
        // SAFETY: both descriptors were just opened for us and belong to nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `fcntl` on a descriptor we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if size < 0 {
            return Err(os_error());
        }
        if size < PIPE_MIN_BYTES {
            return Err(io::Error::other(format!(
                "the kernel made it of {size} bytes: this user's pipes reached the limit of \
                 /proc/sys/fs/pipe-user-pages-soft"
            )));
        }
        Ok(Self { read, write })
    }

    /// The two descriptors' numbers in this process (for the peer to take them).
    pub(crate) fn fds(&self) -> (i32, i32) {
        (self.read.as_raw_fd(), self.write.as_raw_fd())
    }

    /// The pair's pipes, once the peer took this pipe's ends and we took `theirs` (the pipe
    /// it made for us to send into, grown here to `PIPE_BYTES`). Our copy of the write end is
    /// closed here, so that the peer's process exiting ends our reads (`read` returns 0)
    /// instead of leaving them to wait for the deadline.
    pub(crate) fn pair(self, theirs: Taken) -> Pipes {
        drop(self.write);
        // SAFETY: `fcntl` on a descriptor we own.
        if unsafe { libc::fcntl(theirs.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) } < 0 {
            log::debug!("a pipe of the all_to_all keeps its size: {}", os_error());
        }
        Pipes { from: self.read, to: theirs.write, _reader: theirs.read }
    }
}

/// The ends of a peer's pipe, taken into this process: `write` to send; `read` only held,
/// never read, so that the pipe always has a reader (a write into a pipe without one raises
/// `SIGPIPE`, which ends a process that does not ignore it).
pub(crate) struct Taken {
    read: OwnedFd,
    write: OwnedFd,
}

/// A descriptor of process `pidfd`, duplicated into ours.
fn take_fd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd reads no memory of ours; it returns a new descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(os_error());
    }
    // SAFETY: the descriptor was just opened for us (close-on-exec) and belongs to nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// The identity of the pipe behind `fd` (device and inode), or an error if it is no pipe.
fn pipe_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is ours and large enough; `fd` is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return Err(io::Error::other("the descriptor is not a pipe"));
    }
    Ok((st.st_dev, st.st_ino))
}

/// Takes the pipe process `pid` made for us (its ends `read` and `write` in that process).
pub(crate) fn take(pid: u32, read: i32, write: i32) -> io::Result<Taken> {
    // SAFETY: pidfd_open reads no memory of ours; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(os_error());
    }
    // SAFETY: the descriptor was just opened for us and belongs to nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    let (read, write) = (take_fd(&pidfd, read)?, take_fd(&pidfd, write)?);
    if pipe_id(&read)? != pipe_id(&write)? {
        return Err(io::Error::other("the two descriptors are not the ends of one pipe"));
    }
    Ok(Taken { read, write })
}

/// A pair's pipes: `from` carries the peer's blocks to us, `to` ours to it.
pub(crate) struct Pipes {
    from: OwnedFd,
    to: OwnedFd,
    _reader: OwnedFd,
}

/// One pair's part of an all-to-all: our block `src` out, the peer's into `dst`.
pub(crate) struct Flow<'a> {
    pub(crate) peer: usize,
    from: RawFd,
    to: RawFd,
    head_out: [u8; HEAD],
    head_sent: usize,
    src: &'a [u8],
    sent: usize,
    /// The header word the peer's block must come with (its call and operation).
    expect: [u8; 16],
    head_in: [u8; HEAD],
    head_got: usize,
    dst: &'a mut [u8],
    got: usize,
    done: bool,
}

impl<'a> Flow<'a> {
    /// `word`: the collective's header for this call (the same on both ranks of a pair).
    pub(crate) fn new(
        peer: usize,
        pipes: &Pipes,
        word: [u8; 16],
        src: &'a [u8],
        dst: &'a mut [u8],
    ) -> Self {
        let mut head_out = [0u8; HEAD];
        head_out[..16].copy_from_slice(&word);
        head_out[16..24].copy_from_slice(&(src.len() as u64).to_le_bytes());
        Flow {
            peer,
            from: pipes.from.as_raw_fd(),
            to: pipes.to.as_raw_fd(),
            head_out,
            head_sent: 0,
            src,
            sent: 0,
            expect: word,
            head_in: [0u8; HEAD],
            head_got: 0,
            dst,
            got: 0,
            done: false,
        }
    }

    /// Moves what the pipes let through without waiting; whether anything moved.
    fn step(&mut self, op: &str) -> Result<bool, Error> {
        let sent = self.send(op)?;
        let received = self.receive(op)?;
        Ok(sent || received)
    }

    /// Whether every byte of ours (header and block) is in the pipe.
    fn all_sent(&self) -> bool {
        self.head_sent == HEAD && self.sent == self.src.len()
    }

    /// Sends what the pipe takes of our header and block without waiting; whether anything
    /// moved.
    fn send(&mut self, op: &str) -> Result<bool, Error> {
        let mut moved = false;
        let peer = self.peer;
        let failed = |what: &str, e: io::Error| local_failure(op, what, peer, e);
        if self.head_sent < HEAD {
            // SAFETY: the rest of `head_out`, ours, is read by the kernel (HEAD ≤ PIPE_BUF: the
            // write is whole or refused).
            let n = unsafe {
                libc::write(
                    self.to,
                    self.head_out[self.head_sent..].as_ptr().cast(),
                    HEAD - self.head_sent,
                )
            };
            moved |= advance(n, &mut self.head_sent).map_err(|e| failed("writing into", e))?;
        }
        if self.head_sent == HEAD && self.sent < self.src.len() {
            let rest = &self.src[self.sent..];
            let iov =
                libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
            // SAFETY: `iov` covers the rest of `src`, ours and readable. The pipe takes
            // references to its pages, which keep them alive whatever the caller does with
            // `src` later: memory safety never rests on it. Correct bytes do: the sender waits
            // until the pipe is empty before it returns, and a peer that reads after we gave
            // up fails on our abort word (see `Comm::all_to_all_mixed`).
            let n = unsafe { libc::vmsplice(self.to, &iov, 1, libc::SPLICE_F_NONBLOCK) };
            moved |=
                advance(n, &mut self.sent).map_err(|e| failed("splicing our block into", e))?;
        }
        Ok(moved)
    }

    /// Takes what the pipe holds of the peer's header and block without waiting, then sees
    /// whether the peer took all of ours; whether anything moved.
    fn receive(&mut self, op: &str) -> Result<bool, Error> {
        let mut moved = false;
        let peer = self.peer;
        let failed = |what: &str, e: io::Error| local_failure(op, what, peer, e);
        if self.head_got < HEAD {
            // SAFETY: the rest of `head_in`, ours and writable.
            let n = unsafe {
                libc::read(
                    self.from,
                    self.head_in[self.head_got..].as_mut_ptr().cast(),
                    HEAD - self.head_got,
                )
            };
            if n == 0 {
                return Err(self.closed(op));
            }
            moved |= advance(n, &mut self.head_got).map_err(|e| failed("reading", e))?;
            if self.head_got == HEAD {
                self.check_head(op)?;
            }
        }
        if self.head_got == HEAD && self.got < self.dst.len() {
            let rest = &mut self.dst[self.got..];
            // SAFETY: `rest` is ours and writable, `rest.len()` bytes.
            let n = unsafe { libc::read(self.from, rest.as_mut_ptr().cast(), rest.len()) };
            if n == 0 {
                return Err(self.closed(op));
            }
            moved |= advance(n, &mut self.got).map_err(|e| failed("reading", e))?;
        }
        if self.head_got == HEAD && self.got == self.dst.len() && self.all_sent() {
            // Ours may go only once the peer took every byte of it.
            let mut left: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int, ours.
            if unsafe { libc::ioctl(self.to, libc::FIONREAD, &mut left) } != 0 {
                return Err(failed("asking how much is left in", os_error()));
            }
            self.done = left == 0;
        }
        Ok(moved)
    }

    /// The peer's header: this call's, and the length we expect.
    fn check_head(&self, op: &str) -> Result<(), Error> {
        let word: [u8; 16] = self.head_in[..16].try_into().unwrap_or([0; 16]);
        if word != self.expect {
            return Err(Error::invalid(format!(
                "{op}: rank {}'s pipe carries {}, and this rank is in {}: the ranks called \
                 different collectives, or not in the same order",
                self.peer,
                crate::comm::describe_header(&word),
                crate::comm::describe_header(&self.expect)
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&self.head_in[16..24]);
        let len = u64::from_le_bytes(len);
        if len != self.dst.len() as u64 {
            return Err(Error::invalid(format!(
                "{op}: rank {} sends {len} bytes for a block of {} here (the ranks' splits \
                 differ)",
                self.peer,
                self.dst.len()
            )));
        }
        Ok(())
    }

    /// The peer's end of its pipe closed: its process exited, or it dropped the group (which
    /// a rank does after a failure: `run` asks `watch` first, so that the rank that failure
    /// blamed is named, not this one).
    fn closed(&self, op: &str) -> Error {
        Error::RankFailed {
            op: op.to_string(),
            rank: self.peer,
            reason: "it closed its end of the pipe (its process exited or left the group)"
                .to_string(),
        }
    }

    /// The descriptors a wait for this flow polls: `from` while bytes are to come, `to` while
    /// bytes are to go (none: only the drain is left).
    fn wants(&self, fds: &mut Vec<libc::pollfd>) {
        if self.head_got < HEAD || self.got < self.dst.len() {
            fds.push(libc::pollfd { fd: self.from, events: libc::POLLIN, revents: 0 });
        }
        if self.head_sent < HEAD || self.sent < self.src.len() {
            fds.push(libc::pollfd { fd: self.to, events: libc::POLLOUT, revents: 0 });
        }
    }
}

/// A system call on our own memory and descriptors failed (a peer's exit or silence shows
/// otherwise): no rank is blamed.
fn local_failure(op: &str, what: &str, peer: usize, e: io::Error) -> Error {
    Error::invalid(format!("{op}: {what} the pipe with rank {peer}: {e}"))
}

/// A nonblocking call's result `n` added to `done`: whether it moved any byte (none where
/// it would have waited or was interrupted).
fn advance(n: isize, done: &mut usize) -> io::Result<bool> {
    if n >= 0 {
        *done += n as usize;
        return Ok(n > 0);
    }
    let e = os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
        _ => Err(e),
    }
}

/// Runs `flows` until every one is done, the deadline passes (a timeout naming the peers not
/// done) or `watch` reports a failure (a rank that failed, or a peer's process gone). Never
/// blocks on one peer: every flow advances as its pipes allow, so any number of pairs on any
/// number of threads completes. A flow's own error gives way to what `watch` reports (a rank
/// that failed first and dropped the group closes its pipes: the rank it blamed is the cause).
/// `cancel`: set when another part of the call failed; this one then stops at its next wait,
/// returning `Ok` (the call's error is that part's). `pause`: for tests, a pause once every
/// flow sent all it has, before it reads the rest (a rank stopped in the middle).
pub(crate) fn run(
    op: &str,
    flows: &mut [Flow<'_>],
    deadline: Instant,
    watch: &(dyn Fn(&[usize]) -> Option<Error> + Sync),
    cancel: &AtomicBool,
    pause: Option<Duration>,
) -> Result<(), Error> {
    let outcome = run_flows(op, flows, deadline, watch, cancel, pause);
    if outcome.is_err() {
        cancel.store(true, Ordering::Relaxed);
    }
    outcome.map_err(|e| watch(&[]).unwrap_or(e))
}

fn run_flows(
    op: &str,
    flows: &mut [Flow<'_>],
    deadline: Instant,
    watch: &(dyn Fn(&[usize]) -> Option<Error> + Sync),
    cancel: &AtomicBool,
    mut pause: Option<Duration>,
) -> Result<(), Error> {
    let start = Instant::now();
    let mut idle = 0u32;
    loop {
        let mut moved = false;
        if let Some(p) = pause {
            for f in flows.iter_mut() {
                moved |= f.send(op)?;
            }
            if flows.iter().all(Flow::all_sent) {
                std::thread::sleep(p);
                pause = None;
            }
        } else {
            for f in flows.iter_mut().filter(|f| !f.done) {
                moved |= f.step(op)?;
            }
        }
        if flows.iter().all(|f| f.done) {
            return Ok(());
        }
        if moved {
            idle = 0;
            continue;
        }
        idle = idle.saturating_add(1);
        if idle < 64 {
            std::hint::spin_loop();
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let waiting: Vec<usize> = flows.iter().filter(|f| !f.done).map(|f| f.peer).collect();
        if let Some(e) = watch(&waiting) {
            return Err(e);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout { op: op.to_string(), ranks: waiting, after: now - start });
        }
        if idle < 512 {
            std::thread::yield_now();
            continue;
        }
        // Long idle: sleep in poll until a pipe moves, at most 1 ms (the failure checks above
        // run again after it).
        let mut fds = Vec::with_capacity(2 * flows.len());
        for f in flows.iter().filter(|f| !f.done) {
            f.wants(&mut fds);
        }
        let ms = deadline.saturating_duration_since(now).min(Duration::from_millis(1));
        if fds.is_empty() {
            std::thread::sleep(ms.min(Duration::from_micros(100)));
        } else {
            // SAFETY: `fds` is ours, `fds.len()` entries.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    ms.as_millis().max(1) as i32,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Two ends of a pair in this process: `a` receives through the pipe it made, `b` likewise.
    fn pair() -> (Pipes, Pipes) {
        let (made_a, made_b) = (Made::new().unwrap(), Made::new().unwrap());
        let pid = std::process::id();
        let (ra, wa) = made_a.fds();
        let (rb, wb) = made_b.fds();
        let (a_takes, b_takes) = (take(pid, rb, wb).unwrap(), take(pid, ra, wa).unwrap());
        (made_a.pair(a_takes), made_b.pair(b_takes))
    }

    const WORD: [u8; 16] = [7; 16];

    fn no_failure(_: &[usize]) -> Option<Error> {
        None
    }

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn blocks_larger_than_the_pipe_cross_both_ways_at_odd_offsets() {
        let (a, b) = pair();
        let (from_a, from_b) = (bytes(3_000_001, 1), bytes(777_777, 2));
        let soon = Instant::now() + Duration::from_secs(20);
        let mut got_b = vec![0xA5u8; from_a.len() - 1];
        let mut got_a = vec![0xA5u8; from_b.len() - 3];
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut f = [Flow::new(0, &b, WORD, &from_b[3..], &mut got_b)];
                run("all_to_all", &mut f, soon, &no_failure, &AtomicBool::new(false), None)
                    .unwrap();
            });
            let mut f = [Flow::new(1, &a, WORD, &from_a[1..], &mut got_a)];
            run("all_to_all", &mut f, soon, &no_failure, &AtomicBool::new(false), None).unwrap();
        });
        assert!(got_b == from_a[1..], "a's block at b");
        assert!(got_a == from_b[3..], "b's block at a");
    }

    #[test]
    fn a_sender_waits_until_its_peer_took_every_byte() {
        // b sends an empty block (its header, written here) and never reads a's: a has sent
        // and received everything, but its pages are still in the pipe, so it must not return.
        let (a, b) = pair();
        let mut head = [0u8; HEAD];
        head[..16].copy_from_slice(&WORD);
        // SAFETY: `head` is ours, HEAD bytes.
        let n = unsafe { libc::write(b.to.as_raw_fd(), head.as_ptr().cast(), HEAD) };
        assert_eq!(n, HEAD as isize);
        let block = bytes(10_000, 3);
        let mut f = [Flow::new(1, &a, WORD, &block, &mut [])];
        let soon = Instant::now() + Duration::from_millis(200);
        match run("all_to_all", &mut f, soon, &no_failure, &AtomicBool::new(false), None) {
            Err(Error::Timeout { ranks, .. }) => assert_eq!(ranks, vec![1]),
            other => panic!("a returned while its block sat in the pipe: {other:?}"),
        }
        let mut taken = vec![0u8; HEAD + block.len()];
        // SAFETY: `taken` is ours, its length in bytes.
        let n = unsafe { libc::read(b.from.as_raw_fd(), taken.as_mut_ptr().cast(), taken.len()) };
        assert_eq!(n, taken.len() as isize);
        assert!(taken[HEAD..] == block[..], "the block in the pipe");
    }

    #[test]
    fn a_peer_whose_process_is_gone_fails_the_flow_naming_it() {
        let (a, b) = pair();
        drop(b); // every descriptor of b's side closed, as when its process exits
        let block = bytes(1000, 4);
        let mut got = vec![0u8; 1000];
        let mut f = [Flow::new(1, &a, WORD, &block, &mut got)];
        let soon = Instant::now() + Duration::from_secs(20);
        match run("all_to_all", &mut f, soon, &no_failure, &AtomicBool::new(false), None) {
            Err(Error::RankFailed { rank, reason, .. }) => {
                assert_eq!(rank, 1);
                assert!(reason.contains("closed its end of the pipe"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_closed_end_gives_way_to_the_failure_the_peers_report() {
        // b "dropped the group" after a failure that blamed rank 5: a's read finds b's end
        // closed at once, but the failure reported (the abort words) is the cause.
        let (a, b) = pair();
        drop(b);
        let mut got = vec![0u8; 10];
        let mut f = [Flow::new(1, &a, WORD, &[], &mut got)];
        let blamed = |_: &[usize]| {
            Some(Error::RankFailed { op: "all_to_all".into(), rank: 5, reason: "blamed".into() })
        };
        let soon = Instant::now() + Duration::from_secs(20);
        match run("all_to_all", &mut f, soon, &blamed, &AtomicBool::new(false), None) {
            Err(Error::RankFailed { rank: 5, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_block_of_another_call_or_length_is_refused_naming_the_peer() {
        for (word, len, want) in [([8u8; 16], 100, "the ranks called"), (WORD, 99, "splits differ")]
        {
            let (a, b) = pair();
            let block = bytes(len, 5);
            let mut sink = vec![0u8; 100];
            let mut ours = vec![0u8; 100];
            let soon = Instant::now() + Duration::from_secs(20);
            let mut fb = [Flow::new(0, &b, word, &block, &mut sink)];
            // b's side moves what it can once (its header and block into the pipe).
            fb[0].step("all_to_all").unwrap();
            let mut fa = [Flow::new(1, &a, WORD, &[], &mut ours)];
            let err = run("all_to_all", &mut fa, soon, &no_failure, &AtomicBool::new(false), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains("rank 1") && err.contains(want), "{err}");
        }
    }
}
