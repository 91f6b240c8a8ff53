//! A word that says, to a plain load in another process, whether this engine's process is
//! alive: a process-shared robust mutex that a thread of the engine holds for as long as the
//! engine runs, in a page same-host initiators map (fetched over the shm socket).
//!
//! Why it holds. When a thread exits — the process killed, crashed, or the thread ended — the
//! kernel walks the thread's robust list and, for every robust futex it still owns, replaces
//! the owner's thread id in the word by `FUTEX_OWNER_DIED` (`do_exit`: `exit_mm` →
//! `futex_exit_release`, before `exit_files` drops the thread's share of the process's
//! sockets; `execve` does the same through `futex_exec_release`). So the word's owner bits are
//! non-zero exactly while the holder lives: a process whose shm socket the kernel has closed
//! shows zero owner bits already. An engine that stops unlocks the mutex (zero). The
//! initiator's check after a copy is then a fence and a load instead of a `recv(MSG_PEEK)` on
//! the socket (a third of a small batch's time), with the same guarantee: the copy was visible
//! to a live process, or the initiator learns the process is gone.
//!
//! The one death the word can miss: the robust list's head lives in the thread's private
//! memory, and the kernel's OOM reaper may free that memory of a victim that has not exited
//! two seconds after the OOM kill, before the exit walks the list; the word then keeps the
//! dead owner's id. The process's sockets still close when it exits, so the initiator reads
//! the word *and* the peer watcher's verdict (its epoll set sees the hang-up): such a death
//! is seen as soon as the watcher wakes, not at once.
//!
//! Where the futex word sits inside `pthread_mutex_t` is the C library's business, so the
//! holder asks the kernel: after locking, the head of its robust list (`get_robust_list`)
//! points at the mutex's list entry, and the head's `futex_offset` leads from the entry to
//! the word. The word's offset in the page is written next to a magic number; an initiator
//! that finds no valid word (or a target without the page) falls back to the peek.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::mem::{self, Mapping, PAGE};

/// Written (after the word's offset) once the mutex is held and its word found.
const MAGIC: u32 = 0x7477_616c; // "twal"
/// Where the mutex lives in the page (a cache line of its own, away from the header).
const MUTEX_AT: usize = 64;
/// The owner's thread id in a robust futex word (the kernel ABI's `FUTEX_TID_MASK`).
const TID_MASK: u32 = 0x3fff_ffff;

const _: () = assert!(MUTEX_AT + size_of::<libc::pthread_mutex_t>() <= PAGE);

#[repr(C)]
struct PageHeader {
    magic: AtomicU32,
    /// Byte offset of the futex word in the page.
    word: AtomicU32,
}

/// The kernel's `struct robust_list_head`.
#[repr(C)]
struct RobustListHead {
    next: *mut libc::c_void,
    futex_offset: libc::c_long,
    pending: *mut libc::c_void,
}

/// The target side: the page, held by one thread of the engine (see [`AlivePage::hold`]).
pub(crate) struct AlivePage {
    fd: OwnedFd,
    map: Mapping,
}

impl AlivePage {
    pub(crate) fn new() -> Result<Self> {
        let fd = mem::memfd("tidewire-alive", PAGE)?;
        let map = Mapping::map_shared(&fd, PAGE, "the liveness page")?;
        Ok(Self { fd, map })
    }

    fn header(&self) -> &PageHeader {
        // SAFETY: the mapping is a page, page-aligned, lives as long as `self`, and the
        // header holds only atomics, sound to share between processes.
        unsafe { &*(self.map.addr() as *const PageHeader) }
    }

    fn mutex(&self) -> *mut libc::pthread_mutex_t {
        (self.map.addr() as usize + MUTEX_AT) as *mut libc::pthread_mutex_t
    }

    /// The descriptor initiators map, once the word is held (before: none, and initiators
    /// fall back to peeking at the socket).
    pub(crate) fn fd(&self) -> Option<&OwnedFd> {
        (self.header().magic.load(Ordering::Acquire) == MAGIC).then_some(&self.fd)
    }

    /// Initialises the robust mutex, locks it on the calling thread and publishes where its
    /// word is. The mutex is held until the returned guard drops (on the same thread: the
    /// guard is not `Send`) or the thread ends. Call once per page.
    pub(crate) fn hold(&self) -> Result<Held<'_>> {
        let m = self.mutex();
        let fail = |what: &str, rc: i32| {
            Error::io(format!("the liveness word: {what}"), &std::io::Error::from_raw_os_error(rc))
        };
        // SAFETY: `attr` is a local initialised by pthread_mutexattr_init before use and
        // destroyed after; `m` points into our shared mapping, which outlives the mutex's
        // use, is suitably aligned (page + 64), and no other thread touches it before the
        // magic is published below.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            let rc = libc::pthread_mutexattr_init(&mut attr);
            if rc != 0 {
                return Err(fail("pthread_mutexattr_init", rc));
            }
            let mut rc =
                libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            if rc == 0 {
                rc = libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            }
            if rc == 0 {
                rc = libc::pthread_mutex_init(m, &attr);
            }
            libc::pthread_mutexattr_destroy(&mut attr);
            if rc != 0 {
                return Err(fail("a process-shared robust mutex", rc));
            }
            let rc = libc::pthread_mutex_lock(m);
            if rc != 0 {
                return Err(fail("locking it", rc));
            }
        }
        let held = Held { page: self, _thread: PhantomData };
        let word = self.find_word()?;
        self.header().word.store(word as u32, Ordering::Relaxed);
        self.header().magic.store(MAGIC, Ordering::Release);
        Ok(held)
    }

    /// The offset in the page of the futex word of the mutex this thread just locked.
    fn find_word(&self) -> Result<usize> {
        let mut head: *mut RobustListHead = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: get_robust_list(0, ..) writes this thread's list head pointer and its
        // length into the two locals.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0 as libc::c_long,
                &mut head as *mut *mut RobustListHead,
                &mut len as *mut libc::size_t,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                "the liveness word: get_robust_list",
                &std::io::Error::last_os_error(),
            ));
        }
        if head.is_null() || len != size_of::<RobustListHead>() {
            return Err(Error::Internal("the liveness word: this thread has no robust list"));
        }
        // SAFETY: the C library registered `head` for this thread (its own thread-local
        // memory, live while the thread runs); we only read it.
        let (entry, offset) = unsafe { ((*head).next as usize & !1, (*head).futex_offset) };
        let word = (entry as isize).wrapping_add(offset as isize) as usize;
        let (start, end) =
            (self.mutex() as usize, self.mutex() as usize + size_of::<libc::pthread_mutex_t>());
        if word < start || word + 4 > end || !word.is_multiple_of(4) {
            return Err(Error::Internal("the robust list's head is not the liveness mutex"));
        }
        // SAFETY: `word` is 4-aligned inside the mutex, inside our mapping (checked above).
        let value = unsafe { (*(word as *const AtomicU32)).load(Ordering::Relaxed) };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        if value & TID_MASK != tid {
            return Err(Error::Internal("the liveness mutex's word does not hold this thread"));
        }
        Ok(word - self.map.addr() as usize)
    }
}

/// The liveness mutex held by this thread; unlocked on drop (the engine stopped: initiators
/// read zero owner bits, as for a dead process).
pub(crate) struct Held<'a> {
    page: &'a AlivePage,
    _thread: PhantomData<*const ()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread locked the mutex in `hold` (the guard cannot leave the thread).
        unsafe { libc::pthread_mutex_unlock(self.page.mutex()) };
    }
}

/// The initiator side: a peer engine's liveness word, mapped.
pub(crate) struct AliveWord {
    map: Mapping,
    word: usize,
}

impl AliveWord {
    /// Maps a peer's liveness page; `None` if it holds no valid word (then peek instead).
    pub(crate) fn map(fd: &OwnedFd) -> Result<Option<Self>> {
        let map = Mapping::map_shared_read(fd, PAGE, "a peer's liveness page")?;
        // SAFETY: the mapping is a page, page-aligned, and the header holds only atomics.
        let header = unsafe { &*(map.addr() as *const PageHeader) };
        if header.magic.load(Ordering::Acquire) != MAGIC {
            return Ok(None);
        }
        let word = header.word.load(Ordering::Relaxed) as usize;
        let valid = word >= MUTEX_AT && word + 4 <= PAGE && word.is_multiple_of(4);
        Ok(valid.then_some(Self { map, word }))
    }

    /// Whether the thread holding the peer's word is alive. Every copy this thread made
    /// before the call is ordered before the load (a full fence: a store may otherwise
    /// still sit in this CPU's buffer when the load reads "alive").
    pub(crate) fn alive(&self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: `word` was checked to be 4-aligned inside the mapped page, which lives as
        // long as `self`; the word is only accessed atomically.
        let w = unsafe { &*((self.map.addr() as usize + self.word) as *const AtomicU32) };
        w.load(Ordering::SeqCst) & TID_MASK != 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A thread holds the word; a reader (as another process would, through its own
    /// mapping of the page) sees it alive, then dead when the holder unlocks, and when a
    /// holder thread ends without unlocking (the kernel marks the owner dead).
    #[test]
    fn the_word_is_alive_while_its_thread_holds_it_and_dead_after() {
        for unlock in [true, false] {
            let page = std::sync::Arc::new(AlivePage::new().unwrap());
            let (held_tx, held_rx) = mpsc::channel();
            let (end_tx, end_rx) = mpsc::channel::<()>();
            let p = page.clone();
            let holder = std::thread::spawn(move || {
                let held = p.hold().unwrap();
                held_tx.send(()).unwrap();
                end_rx.recv().unwrap();
                if unlock {
                    drop(held);
                } else {
                    // The thread ends holding the mutex, as a killed process's would.
                    std::mem::forget(held);
                }
            });
            held_rx.recv().unwrap();
            let word = AliveWord::map(page.fd().expect("published")).unwrap().expect("valid");
            assert!(word.alive(), "alive while held");
            end_tx.send(()).unwrap();
            holder.join().unwrap();
            assert!(
                !word.alive(),
                "dead once the holder {}",
                if unlock { "unlocked" } else { "ended" }
            );
        }
    }

    #[test]
    fn a_page_nobody_holds_offers_no_word() {
        let page = AlivePage::new().unwrap();
        assert!(page.fd().is_none());
    }
}
