//! The shm transport: host memory the engine allocates as a memfd is handed to same-host
//! peers over an abstract Unix socket (SCM_RIGHTS); the initiator maps it once and copies
//! directly. Arbitrary user memory (malloc, numpy arrays) cannot be shared this way and is
//! served by tcp; allocate with `Engine::allocate_shared` to get the shm path.
//!
//! Revocation. Each memfd starts with a 4 KiB header: a `revoked` word and one in-flight
//! counter per attached initiator (a *slot*, assigned when its Unix connection opens). An
//! initiator increments its counter, checks `revoked`, copies (a run of requests, up to
//! 16 MiB), decrements. Unregistration
//! sets `revoked`, then waits until every slot whose connection is still open reads zero:
//! either the initiator saw `revoked` and did not copy, or unregistration waited for its copy
//! (both sides use sequentially consistent operations). A dead initiator's slot is ignored
//! and reset before it is given to another.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidewire_core::handshake::{Handshake, HandshakeEvent};
use tidewire_core::ids::IdMap;
use tidewire_core::shmwire::{ShmAnswer, ShmFetch, ShmRequest, SHM_MESSAGE_LEN};
use tidewire_core::wire::{FrameKind, Header, HEADER_LEN};
use tidewire_core::{InstanceId, RegionId};

use crate::config::Credentials;
use crate::engine::DeathCheck;
use crate::error::{Error, PeerRef, Result};
use crate::guard::{Guard, Step};
use crate::lifecycle::Lifecycle;
use crate::mem::{self, Mapping, PAGE};
use crate::peer::{Held, Liveness, MapCount};
use crate::reactor::{Flow, Source};
use crate::registry::{Pinned, Registry};
use crate::transport::alive::{AlivePage, AliveWord};
use crate::transport::tcp;

const HEADER: usize = PAGE;
/// Initiators that can attach to one engine's shared memory at once.
pub(crate) const SLOTS: usize = 63;
const NO_SLOT: u32 = u32::MAX;

#[repr(C, align(64))]
struct Slot {
    inflight: AtomicU64,
}

#[repr(C)]
struct ShmHeader {
    revoked: AtomicU32,
    _pad0: u32,
    /// In-flight marks taken over RPC by peers on other hosts (`Enter` frames); only the
    /// owner's process touches it.
    remote: AtomicU64,
    _pad: [u8; 48],
    slots: [Slot; SLOTS],
}

const _: () = assert!(size_of::<ShmHeader>() == HEADER);

/// A mapping of a shareable region (ours or a peer's) with its header.
pub(crate) struct ShmMap {
    map: Mapping,
    /// Counts a peer's mapping among those held for it (`None` for our own regions).
    _held: Option<Held>,
}

impl ShmMap {
    fn header(&self) -> &ShmHeader {
        // SAFETY: the mapping is at least HEADER bytes, page-aligned, lives as long as `self`,
        // and the header holds only atomics, which are sound to share between processes.
        unsafe { &*(self.map.addr() as *const ShmHeader) }
    }

    pub(crate) fn data_addr(&self) -> u64 {
        self.map.addr() + HEADER as u64
    }

    pub(crate) fn data_len(&self) -> u64 {
        (self.map.len() - HEADER) as u64
    }
}

/// Engine-allocated shareable memory (the target side).
pub(crate) struct SharedRegion {
    fd: OwnedFd,
    map: ShmMap,
}

impl SharedRegion {
    pub(crate) fn allocate(len: u64) -> Result<Self> {
        let data = usize::try_from(len).ok().and_then(|l| l.checked_next_multiple_of(PAGE)).ok_or(
            Error::InvalidArgument { reason: format!("shared allocation of {len} bytes") },
        )?;
        let fd = mem::memfd("tidewire-shm", HEADER + data)?;
        let map = Mapping::map_shared(&fd, HEADER + data, "a new shared region")?;
        let map = ShmMap { map, _held: None };
        Ok(Self { fd, map })
    }

    /// A revocation page alone (for exported device memory, whose data travels by NVLink).
    pub(crate) fn control() -> Result<Self> {
        let fd = mem::memfd("tidewire-ctl", HEADER)?;
        let map =
            ShmMap { map: Mapping::map_shared(&fd, HEADER, "a revocation page")?, _held: None };
        Ok(Self { fd, map })
    }

    pub(crate) fn data_addr(&self) -> u64 {
        self.map.data_addr()
    }

    /// Marks an in-flight access by a peer on another host, unless revoked (then false and no
    /// mark). Balance a `true` with [`SharedRegion::leave_remote`].
    pub(crate) fn enter_remote(&self) -> bool {
        let h = self.map.header();
        h.remote.fetch_add(1, Ordering::SeqCst);
        if h.revoked.load(Ordering::SeqCst) != 0 {
            h.remote.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn leave_remote(&self) {
        self.map.header().remote.fetch_sub(1, Ordering::SeqCst);
    }

    /// Stops new accesses and waits for in-flight ones of attached initiators and of peers
    /// on other hosts. `attached` is asked again at every turn: an initiator whose process
    /// ends meanwhile (its slot detached) holds the wait up no longer — its marks stay until
    /// the slot is taken again, so a snapshot would wait for them the whole deadline.
    pub(crate) fn revoke(
        &self,
        attached: &dyn Fn() -> [bool; SLOTS],
        deadline: Duration,
    ) -> Result<()> {
        let h = self.map.header();
        h.revoked.store(1, Ordering::SeqCst);
        let until = Instant::now() + deadline;
        while h.remote.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= until {
                return Err(Error::Timeout {
                    what: "waiting for peers on other hosts to finish copying".into(),
                    after: deadline,
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        for (i, slot) in h.slots.iter().enumerate() {
            while slot.inflight.load(Ordering::SeqCst) != 0 && attached()[i] {
                if Instant::now() >= until {
                    return Err(Error::Timeout {
                        what: format!("waiting for shm initiator slot {i} to finish copying"),
                        after: deadline,
                    });
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn reset_slot(&self, slot: usize) {
        if let Some(s) = self.map.header().slots.get(slot) {
            s.inflight.store(0, Ordering::SeqCst);
        }
    }
}

/// The abstract socket name of an engine instance.
pub(crate) fn socket_name(instance: InstanceId) -> String {
    format!("tidewire-{instance}")
}

/// Hands memfds of shareable regions to same-host peers.
pub(crate) struct ShmServer {
    attached: Mutex<[bool; SLOTS]>,
    /// The liveness word initiators read after their copies, held by the accept thread;
    /// `None` when it could not be made (initiators then peek at the socket).
    alive: Option<AlivePage>,
}

impl ShmServer {
    /// Binds the abstract socket and starts the accept thread.
    pub(crate) fn start(
        name: &str,
        registry: Arc<Registry>,
        guard: Arc<Guard>,
        life: &Arc<Lifecycle>,
        offer_word: bool,
    ) -> Result<Arc<Self>> {
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| Error::io(format!("abstract socket name {name}"), &e))?;
        let listener = UnixListener::bind_addr(&addr)
            .map_err(|e| Error::Bind { addr: format!("@{name}"), reason: e.to_string() })?;
        listener.set_nonblocking(true).map_err(|e| Error::io("shm listener", &e))?;
        let alive = if offer_word { AlivePage::new().inspect_err(no_word).ok() } else { None };
        let server = Arc::new(Self { attached: Mutex::new([false; SLOTS]), alive });
        let (srv, life2, socket) = (server.clone(), life.clone(), name.to_string());
        life.spawn("tw-shm-accept".into(), move || {
            // Held by this thread, which lives as long as the engine: before the first
            // connection is accepted, so every initiator finds it published.
            let _held = srv.alive.as_ref().and_then(|page| page.hold().inspect_err(no_word).ok());
            srv.accept_loop(&listener, &registry, &guard, &life2, &socket);
        })?;
        Ok(server)
    }

    fn accept_loop(
        self: &Arc<Self>,
        listener: &UnixListener,
        registry: &Arc<Registry>,
        guard: &Arc<Guard>,
        life: &Lifecycle,
        socket: &str,
    ) {
        loop {
            if life.stopping() {
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    // Only processes of our own uid, unless configured otherwise: the socket
                    // is reachable by every process of the host (network namespace).
                    if let Err(why) = peer_uid_allowed(&stream, guard.any_uid) {
                        guard.refuse(&format!("shm @{socket}"), "a local process", &why);
                        continue;
                    }
                    // Served on the engine's I/O loops: no thread per same-host peer.
                    let attached = life.reactor().and_then(|r| {
                        let source =
                            ShmConn::new(self.clone(), stream, registry.clone(), guard.clone())?;
                        r.slot().attach(Box::new(source))
                    });
                    if let Err(e) = attached {
                        log::warn!("shm: serving a connection on @{socket}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    log::warn!("shm accept on @{socket}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Snapshot of which slots have a live initiator.
    pub(crate) fn attached(&self) -> [bool; SLOTS] {
        *self.attached.lock()
    }

    /// Takes a free initiator slot (its marks reset in every revocation page), if any.
    fn take_slot(&self, registry: &Registry) -> Option<usize> {
        let mut a = self.attached.lock();
        let free = a.iter().position(|used| !used)?;
        a[free] = true;
        for e in registry.controlled() {
            if let Some(c) = e.control() {
                c.reset_slot(free);
            }
        }
        Some(free)
    }
}

/// Questions an shm connection answers before it lets its loop serve others.
const ANSWERS_PER_CALL: usize = 64;

/// One same-host initiator's connection to the shm socket, served on an I/O loop: it opens
/// with the handshake of the RPC port (`Hello`, and the cluster secret's challenge and proof
/// when one is in force: no descriptor is sent before), is told its slot, then asks for
/// descriptors of regions (9-byte requests) and gets each with its file descriptor (9-byte
/// answers over SCM_RIGHTS). The initiator asks one at a time, so at most a few answers ever
/// wait for room in the socket.
struct ShmConn {
    server: Arc<ShmServer>,
    registry: Arc<Registry>,
    guard: Arc<Guard>,
    stream: UnixStream,
    phase: Phase,
    /// A connection still in its handshake by then is closed.
    prove_by: Instant,
    /// A handshake frame being read.
    frame: Vec<u8>,
    slot: Option<usize>,
    /// A request being read.
    req: [u8; SHM_MESSAGE_LEN],
    got: usize,
    /// Answers not yet sent (the socket was full), with the descriptor each carries.
    out: std::collections::VecDeque<([u8; SHM_MESSAGE_LEN], Option<OwnedFd>)>,
    /// Bytes still to send before any descriptor (handshake answers, the slot number), and
    /// how many of them went.
    hello: (Vec<u8>, usize),
}

/// Where an shm connection stands.
enum Phase {
    /// Waiting for the initiator's `Hello`.
    Hello,
    /// Waiting for its proof of the cluster secret, for this handshake.
    Proof(tidewire_core::auth::Transcript),
    /// Told its slot: serving requests.
    Serving,
    /// Refused (or no slot free): closes once what is queued went out.
    Closing,
}

impl ShmConn {
    fn new(
        server: Arc<ShmServer>,
        stream: UnixStream,
        registry: Arc<Registry>,
        guard: Arc<Guard>,
    ) -> Result<Self> {
        stream.set_nonblocking(true).map_err(|e| Error::io("an shm connection", &e))?;
        let prove_by = Instant::now() + guard.handshake;
        Ok(Self {
            server,
            registry,
            guard,
            stream,
            phase: Phase::Hello,
            prove_by,
            frame: Vec::with_capacity(HEADER_LEN),
            slot: None,
            req: [0; SHM_MESSAGE_LEN],
            got: 0,
            out: Default::default(),
            hello: (Vec::new(), 0),
        })
    }

    /// Reads handshake frames and answers them until the connection is served, refused, or
    /// the socket has nothing more for now.
    fn handshake(&mut self) -> io::Result<Option<Flow>> {
        loop {
            if !matches!(self.phase, Phase::Hello | Phase::Proof(_)) {
                return Ok(None);
            }
            let (want, header) = if self.frame.len() < HEADER_LEN {
                (HEADER_LEN, None)
            } else {
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&self.frame[..HEADER_LEN]);
                match Header::decode(&raw) {
                    // Only the handshake's own frames (small payloads) are read before it ends.
                    Ok(h) if !matches!(h.kind, FrameKind::Hello | FrameKind::Auth) => {
                        let why = format!("a {:?} frame before the handshake", h.kind);
                        self.guard.refuse("shm", "a local process", &why);
                        // Counted once: the connection's end does not count it again.
                        self.phase = Phase::Closing;
                        return Ok(Some(Flow::Close));
                    }
                    Ok(h) => (HEADER_LEN + h.payload_len() as usize, Some(h)),
                    Err(e) => {
                        self.guard.refuse(
                            "shm",
                            "a local process",
                            &format!("a malformed handshake: {e}"),
                        );
                        self.phase = Phase::Closing;
                        return Ok(Some(Flow::Close));
                    }
                }
            };
            if self.frame.len() < want {
                let mut buf = [0u8; 256];
                let n = want - self.frame.len();
                match (&self.stream).read(&mut buf[..n.min(256)]) {
                    Ok(0) => return Ok(Some(Flow::Close)),
                    Ok(got) => self.frame.extend_from_slice(&buf[..got]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Some(Flow::Continue))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            // The whole frame is here (`want` bytes, at least a header's: decoded above).
            let Some(h) = header else { continue };
            let payload = std::mem::take(&mut self.frame);
            let payload = &payload[HEADER_LEN..];
            let step = match (std::mem::replace(&mut self.phase, Phase::Closing), h.kind) {
                (Phase::Hello, FrameKind::Hello) => {
                    self.guard.hello("shm", "a local process", &h, payload)
                }
                (Phase::Proof(t), FrameKind::Auth) => {
                    self.guard.auth("shm", "a local process", &h, payload, &t)
                }
                (_, kind) => {
                    let why = format!("a {kind:?} frame before the handshake");
                    self.guard.refuse("shm", "a local process", &why);
                    return Ok(Some(Flow::Close));
                }
            };
            match step {
                Step::Open(answer) => {
                    self.hello.0.extend_from_slice(&answer);
                    self.slot = self.server.take_slot(&self.registry);
                    let slot = self.slot.map_or(NO_SLOT, |i| i as u32);
                    self.hello.0.extend_from_slice(&slot.to_le_bytes());
                    // No slot free: the initiator is told (NO_SLOT), then the connection closes.
                    self.phase = if self.slot.is_some() { Phase::Serving } else { Phase::Closing };
                }
                Step::Wait(answer, t) => {
                    self.hello.0.extend_from_slice(&answer);
                    self.phase = Phase::Proof(t);
                }
                Step::Refuse(answer) => {
                    self.hello.0.extend_from_slice(&answer);
                    self.phase = Phase::Closing;
                }
            }
        }
    }

    /// The answer to one request, with a descriptor of its own (dup'd: it may wait in `out`).
    fn answer(&self) -> ([u8; SHM_MESSAGE_LEN], Option<OwnedFd>) {
        // An unknown kind is refused like an unknown region: the initiator gets a reason.
        let Ok(req) = ShmRequest::decode(&self.req) else { return grant(None, "an unknown kind") };
        if req.what == ShmFetch::Alive {
            let page = self.server.alive.as_ref().and_then(|p| p.fd()).map(|fd| (0, fd));
            return grant(page, "the liveness page");
        }
        let Some(entry) = self.registry.by_id(req.region).filter(|e| e.access().is_some()) else {
            return grant(None, req.region);
        };
        let found = match req.what {
            ShmFetch::Data => entry.shared.as_ref().map(|s| (s.map.data_len(), &s.fd)),
            ShmFetch::Control => entry.control().map(|c| (0, &c.fd)),
            ShmFetch::VmmFd => {
                entry.gpu.as_ref().and_then(|g| g.vmm_fd.as_ref().map(|(size, fd)| (*size, fd)))
            }
            ShmFetch::Alive => None,
        };
        grant(found, req.region)
    }

    /// Sends what is queued; false when the connection failed.
    fn flush(&mut self) -> io::Result<()> {
        while self.hello.1 < self.hello.0.len() {
            match (&self.stream).write(&self.hello.0[self.hello.1..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.hello.1 += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        while let Some((msg, fd)) = self.out.front() {
            match send_with_fd(&self.stream, msg, fd.as_ref()) {
                Ok(()) => {
                    self.out.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn serve(&mut self) -> io::Result<Flow> {
        if let Some(flow) = self.handshake()? {
            self.flush()?;
            return Ok(flow);
        }
        self.flush()?;
        if matches!(self.phase, Phase::Closing) {
            // Refused, or all slots taken (the initiator was told NO_SLOT): close once that
            // is sent.
            return Ok(if self.hello.1 == self.hello.0.len() {
                Flow::Close
            } else {
                Flow::Continue
            });
        }
        // The initiator asks one question at a time: while an answer waits for room in the
        // socket nothing more is read (a client that never reads cannot make us hold
        // descriptors without bound), and a burst of questions yields the loop after a few.
        for _ in 0..ANSWERS_PER_CALL {
            if !self.out.is_empty() {
                return Ok(Flow::Continue);
            }
            match (&self.stream).read(&mut self.req[self.got..]) {
                Ok(0) => return Ok(Flow::Close),
                Ok(n) => {
                    self.got += n;
                    if self.got == SHM_MESSAGE_LEN {
                        self.got = 0;
                        let answer = self.answer();
                        self.out.push_back(answer);
                        self.flush()?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flow::Continue),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Flow::Again)
    }
}

impl Source for ShmConn {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn on_ready(&mut self, _now: Instant) -> Flow {
        match self.serve() {
            Ok(flow) => flow,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    log::debug!("shm connection ended: {e}");
                }
                Flow::Close
            }
        }
    }

    fn poll_timeout(&mut self, _now: Instant) -> Option<Instant> {
        matches!(self.phase, Phase::Hello | Phase::Proof(_)).then_some(self.prove_by)
    }

    fn on_timeout(&mut self, now: Instant) -> Flow {
        if matches!(self.phase, Phase::Hello | Phase::Proof(_)) && now >= self.prove_by {
            let why = "it did not complete the handshake within the handshake deadline";
            self.guard.refuse("shm", "a local process", why);
            self.phase = Phase::Closing;
            return Flow::Close;
        }
        Flow::Continue
    }

    fn on_stop(&mut self) {}
}

impl Drop for ShmConn {
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Proof(_)) {
            let why = "it left without proving the cluster secret (another secret, or it found \
                       this engine restarted)";
            self.guard.refuse("shm", "a local process", why);
        }
        // The initiator's end is closed with ours: its slot is free again.
        if let Some(i) = self.slot {
            self.server.attached.lock()[i] = false;
        }
    }
}

/// The initiator side: one attachment per peer instance, mappings cached per region.
/// Drops the revoked mappings only the cache holds.
fn sweep(maps: &mut IdMap<RegionId, Arc<ShmMap>>) {
    maps.retain(|_, m| Arc::strong_count(m) > 1 || m.header().revoked.load(Ordering::SeqCst) == 0);
}

pub(crate) struct ShmClient {
    peer: PeerRef,
    stream: Mutex<UnixStream>,
    slot: usize,
    maps: Mutex<IdMap<RegionId, Arc<ShmMap>>>,
    broken: AtomicBool,
    /// The peer's end of the socket closed: its process exited (or its engine stopped).
    hung_up: AtomicBool,
    /// The stream's descriptor, for liveness peeks without its lock.
    fd: i32,
    /// The peer engine's liveness word, when it offers one: read instead of peeking.
    alive: Option<AliveWord>,
    /// The peer's death as the watcher saw it (its socket hung up): consulted with the word,
    /// for the one death the word can miss (see `alive.rs`).
    liveness: Arc<Liveness>,
    /// Counts the mappings of this peer's memory.
    mappings: MapCount,
}

impl ShmClient {
    pub(crate) fn connect(
        peer: &PeerRef,
        socket: &str,
        timeout: Duration,
        creds: &Credentials,
        expect: InstanceId,
        mappings: MapCount,
        liveness: Arc<Liveness>,
    ) -> Result<Self> {
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::PeerUnreachable {
            peer: peer.clone(),
            reason: format!("shm: {what} @{socket}: {e}"),
        };
        let addr =
            SocketAddr::from_abstract_name(socket.as_bytes()).map_err(|e| fail("name", &e))?;
        let stream = UnixStream::connect_addr(&addr).map_err(|e| fail("connect to", &e))?;
        stream.set_read_timeout(Some(timeout)).map_err(|e| fail("configure", &e))?;
        stream.set_write_timeout(Some(timeout)).map_err(|e| fail("configure", &e))?;
        // The handshake of the RPC port (the cluster secret proven both ways when in force),
        // all of it by its deadline.
        let hs = Handshake::new(Instant::now(), timeout, Some(expect), creds.client());
        let outcome = tcp::run_handshake(&stream, hs).map_err(|e| fail("handshake with", &e))?;
        if let HandshakeEvent::Failed(f) = outcome {
            return Err(fail("handshake with", &f));
        }
        stream.set_read_timeout(Some(timeout)).map_err(|e| fail("configure", &e))?;
        let mut slot = [0u8; 4];
        (&stream).read_exact(&mut slot).map_err(|e| fail("attach to", &e))?;
        let slot = u32::from_le_bytes(slot);
        if slot == NO_SLOT || slot as usize >= SLOTS {
            return Err(fail("attach to", &format!("all {SLOTS} initiator slots are in use")));
        }
        let mut client = Self {
            peer: peer.clone(),
            fd: stream.as_raw_fd(),
            stream: Mutex::new(stream),
            slot: slot as usize,
            maps: Mutex::new(IdMap::default()),
            broken: AtomicBool::new(false),
            hung_up: AtomicBool::new(false),
            alive: None,
            liveness,
            mappings,
        };
        client.alive = match client.fetch(ShmFetch::Alive, RegionId(0)) {
            Ok((_, fd)) => AliveWord::map(&fd).unwrap_or_else(|e| {
                log::info!("shm: {}'s liveness word: {e}", client.peer);
                None
            }),
            // A target without a word (it could not make one): the socket tells instead.
            Err(Error::RemoteAccessDenied { .. }) => None,
            Err(e) => return Err(e),
        };
        if client.alive.is_none() {
            log::debug!("shm: {} offers no liveness word; its socket is peeked", client.peer);
        }
        Ok(client)
    }

    /// How a death this initiator saw was seen (for the error that reports it).
    pub(crate) fn death_seen(&self) -> &'static str {
        match self.death_check() {
            DeathCheck::Word => "its liveness word lost its owner, or its shm socket hung up",
            DeathCheck::SocketPeek => "its shm socket hung up",
        }
    }

    /// How this initiator learns, after a copy, that the peer's process is gone.
    pub(crate) fn death_check(&self) -> DeathCheck {
        if self.alive.is_some() {
            DeathCheck::Word
        } else {
            DeathCheck::SocketPeek
        }
    }

    /// The socket's descriptor (for the peer watcher).
    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Asks the peer for a file descriptor of region `id`; returns it with the length the
    /// peer states.
    pub(crate) fn fetch(&self, what: ShmFetch, id: RegionId) -> Result<(u64, OwnedFd)> {
        let req = ShmRequest { what, region: id }.encode();
        let fetched = {
            let stream = self.stream.lock();
            (&*stream).write_all(&req).and_then(|()| recv_with_fd(&stream))
        };
        let (msg, fd) = fetched.map_err(|e| {
            self.broken.store(true, Ordering::Release);
            Error::PeerFailed {
                peer: self.peer.clone(),
                transport: tidewire_core::select::TransportKind::Shm,
                reason: format!("fetching a descriptor of {id}: {e}"),
            }
        })?;
        let (ShmAnswer::Granted { len }, Some(fd)) = (ShmAnswer::decode(&msg), fd) else {
            return Err(Error::RemoteAccessDenied {
                peer: self.peer.clone(),
                addr: 0,
                len: 0,
                reason: format!("{id} is no longer registered (or not shareable)"),
            });
        };
        Ok((len, fd))
    }

    /// The mapping of the peer's region `id` (fetched and mapped on first use).
    pub(crate) fn region(&self, id: RegionId) -> Result<Arc<ShmMap>> {
        if let Some(m) = self.maps.lock().get(&id) {
            return Ok(m.clone());
        }
        let (len, fd) = self.fetch(ShmFetch::Data, id)?;
        let total = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(HEADER))
            .ok_or(Error::Internal("shm region length overflows"))?;
        let map = Mapping::map_shared(&fd, total, "a peer's shared region")?;
        let map = Arc::new(ShmMap { map, _held: Some(self.mappings.hold()) });
        let mut maps = self.maps.lock();
        sweep(&mut maps);
        maps.insert(id, map.clone());
        Ok(map)
    }

    /// Unmaps the cached regions the peer has revoked (unregistered) that nothing uses any
    /// more, so a peer that allocates and frees regions again and again (a collective group
    /// created and destroyed) does not keep its freed memory mapped here.
    pub(crate) fn sweep(&self) {
        sweep(&mut self.maps.lock());
    }

    /// Maps the revocation page of the peer's exported device region `id`.
    pub(crate) fn control(&self, id: RegionId) -> Result<ShmMap> {
        let (_, fd) = self.fetch(ShmFetch::Control, id)?;
        let map = Mapping::map_shared(&fd, HEADER, "a peer's revocation page")?;
        Ok(ShmMap { map, _held: Some(self.mappings.hold()) })
    }

    /// Marks this initiator as using `map`'s region unless it was revoked; returns false
    /// (and leaves no mark) when revoked. Balance a `true` with [`ShmClient::leave`].
    pub(crate) fn enter(&self, map: &ShmMap) -> bool {
        let h = map.header();
        h.slots[self.slot].inflight.fetch_add(1, Ordering::SeqCst);
        if h.revoked.load(Ordering::SeqCst) != 0 {
            h.slots[self.slot].inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn leave(&self, map: &ShmMap) {
        map.header().slots[self.slot].inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// False once the peer's process is gone (its liveness word says so, or without one, its
    /// end of the attachment closed). Copies made before the call are ordered before it.
    pub(crate) fn peer_alive(&self) -> bool {
        let alive = match &self.alive {
            Some(word) => word.alive() && self.liveness.error().is_none(),
            None => self.peek(),
        };
        if !alive {
            self.hung_up.store(true, Ordering::Release);
            self.broken.store(true, Ordering::Release);
        }
        alive
    }

    /// Whether the peer's end of the socket is still open (a system call).
    fn peek(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local on our own socket; it consumes nothing.
        let n = unsafe {
            libc::recv(
                self.fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0 || (n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock)
    }

    /// True once [`ShmClient::peer_alive`] saw the peer gone.
    pub(crate) fn hung_up(&self) -> bool {
        self.hung_up.load(Ordering::Acquire)
    }

    /// Marks this initiator in `map`'s region for a run of copies, unless the peer revoked
    /// it (`None`, no mark). The peer's unregistration waits for the mark: hold it for a
    /// bounded amount of copying.
    pub(crate) fn enter_run<'a>(&'a self, map: &'a ShmMap) -> Option<RunMark<'a>> {
        self.enter(map).then_some(RunMark { client: self, map })
    }
}

/// An initiator's in-flight mark in a peer's region, held for a run of copies; left on drop.
pub(crate) struct RunMark<'a> {
    client: &'a ShmClient,
    map: &'a ShmMap,
}

impl RunMark<'_> {
    /// Copies between the pinned local range and `[offset, offset+len)` of the peer's region.
    pub(crate) fn copy(&self, offset: u64, local: &Pinned<'_>, write: bool) -> Result<()> {
        let len = local.len();
        if offset.checked_add(len).is_none_or(|end| end > self.map.data_len()) {
            return Err(Error::Protocol {
                peer: self.client.peer.clone(),
                reason: format!(
                    "[{offset}, +{len}) exceeds the shared region ({} bytes)",
                    self.map.data_len()
                ),
            });
        }
        let remote = self.map.data_addr() + offset;
        let (dst, src) = if write { (remote, local.addr()) } else { (local.addr(), remote) };
        // SAFETY: the local range is pinned in a live registered region; the remote range
        // is inside our mapping of the peer's memfd (checked above), which lives as long as
        // `self.map`, and our in-flight mark (held by `self`) keeps the peer from revoking
        // it; the two are distinct mappings, so they do not overlap.
        unsafe { mem::copy(dst, src, len) };
        Ok(())
    }
}

impl Drop for RunMark<'_> {
    fn drop(&mut self) {
        self.client.leave(self.map);
    }
}

/// The answer granting `found` (a descriptor of its own, dup'd: it may wait for room in the
/// socket), or refusing when there is nothing to grant.
fn grant(
    found: Option<(u64, &OwnedFd)>,
    of: impl std::fmt::Display,
) -> ([u8; SHM_MESSAGE_LEN], Option<OwnedFd>) {
    let refused = (ShmAnswer::Refused.encode(), None);
    match found.map(|(len, fd)| (len, fd.try_clone())) {
        Some((len, Ok(fd))) => (ShmAnswer::Granted { len }.encode(), Some(fd)),
        Some((_, Err(e))) => {
            log::warn!("shm: duplicating a descriptor of {of}: {e}");
            refused
        }
        None => refused,
    }
}

/// Logs why this engine offers no liveness word (its initiators peek at the socket instead).
fn no_word(e: &Error) {
    log::info!("shm: no liveness word (initiators will peek): {e}");
}

/// Whether the process at the other end of `stream` may use the socket: the same uid as
/// ours, or any with `any_uid`. `Err` says why not.
fn peer_uid_allowed(stream: &UnixStream, any_uid: bool) -> std::result::Result<(), String> {
    if any_uid {
        return Ok(());
    }
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a `ucred` of at most `len` bytes into `cred`, both ours.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!("its credentials could not be read: {}", io::Error::last_os_error()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid == me {
        Ok(())
    } else {
        Err(format!(
            "process {} runs as uid {}, this engine as uid {me} (TIDEWIRE_SHM_ANY_UID=1 allows it)",
            cred.pid, cred.uid
        ))
    }
}

fn send_with_fd(
    stream: &UnixStream,
    msg: &[u8; SHM_MESSAGE_LEN],
    fd: Option<&OwnedFd>,
) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut libc::c_void, iov_len: msg.len() };
    // Room for one file descriptor's control message, 8-byte aligned.
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain old data; zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
        let (space, clen) = unsafe { (libc::CMSG_SPACE(4) as usize, libc::CMSG_LEN(4) as usize) };
        hdr.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
        hdr.msg_controllen = space;
        // SAFETY: msg_control points at a buffer of at least CMSG_SPACE(4) bytes, so the
        // first header and its 4-byte payload lie inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = clen;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd.as_raw_fd());
        }
    }
    // SAFETY: `hdr` points at live buffers (msg, iov, cmsg_buf) for the duration of the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != msg.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"));
    }
    Ok(())
}

fn recv_with_fd(stream: &UnixStream) -> io::Result<([u8; SHM_MESSAGE_LEN], Option<OwnedFd>)> {
    let mut msg = [0u8; SHM_MESSAGE_LEN];
    let mut iov =
        libc::iovec { iov_base: msg.as_mut_ptr() as *mut libc::c_void, iov_len: msg.len() };
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain old data; zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = size_of_val(&cmsg_buf);
    // SAFETY: `hdr` points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != msg.len() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short shm answer"));
    }
    let mut fd = None;
    // SAFETY: the kernel filled `hdr.msg_control`; CMSG_FIRSTHDR/NXTHDR walk only within
    // `msg_controllen`, and SCM_RIGHTS payloads are file descriptors we now own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32);
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    Ok((msg, fd))
}
