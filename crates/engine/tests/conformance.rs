//! One conformance suite, the same test bodies run against every CPU transport (`local`, `shm`,
//! `fabric` over libfabric's tcp provider, `tcp`; the GPU transports run theirs in gpu.rs on a
//! GPU host): round trips with poisoned
//! destinations, scattered batches with per-request statuses, notifications after the data,
//! refusals, prepared plans. Peer death and restart per transport are in liveness.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{peek, poke, random_bytes, registered};
use tidewire::core::select::TransportKind;
use tidewire::{BatchOptions, Engine, Error, Op, PeerId, Request, RequestStatus};

const POISON: u8 = 0xA5;

/// A transport under test: an initiator, a target (the same engine for `local`) and the
/// target's memory that this transport reaches.
struct Setup {
    initiator: Engine,
    /// `None` for `local`: the target is the initiator.
    target: Option<Engine>,
    peer: PeerId,
    remote: u64,
    len: usize,
    _keep: Vec<tidewire::HostBuffer>,
}

impl Setup {
    fn new(via: TransportKind, len: usize) -> Self {
        let cfg = match via {
            TransportKind::Tcp => common::tcp_config(),
            TransportKind::Fabric => common::fabric_config(),
            _ => common::config(),
        };
        let initiator = Engine::new(cfg).unwrap();
        let mut keep = Vec::new();
        let (target, remote) = match via {
            TransportKind::Local => {
                let b = registered(&initiator, len, &[]);
                let a = b.addr();
                keep.push(b);
                (None, a)
            }
            TransportKind::Shm => {
                let t = common::engine();
                let a = t.allocate_shared(len as u64).unwrap();
                (Some(t), a)
            }
            _ => {
                let t = match via {
                    TransportKind::Fabric => Engine::new(common::fabric_config()).unwrap(),
                    _ => common::engine(),
                };
                let b = registered(&t, len, &[]);
                let a = b.addr();
                keep.push(b);
                (Some(t), a)
            }
        };
        let name = target.as_ref().map_or(initiator.name(), |t| t.name()).to_string();
        let peer = initiator.open_segment(&name).unwrap();
        Self { initiator, target, peer, remote, len, _keep: keep }
    }

    fn target_engine(&self) -> &Engine {
        self.target.as_ref().unwrap_or(&self.initiator)
    }

    /// Local registered memory of `len` bytes filled with `fill`.
    fn local(&mut self, fill: &[u8]) -> u64 {
        let b = registered(&self.initiator, self.len, fill);
        let a = b.addr();
        self._keep.push(b);
        a
    }
}

fn transport_of(s: &Setup, local: u64) -> Option<TransportKind> {
    let info = s.initiator.explain_from(s.peer, Some(local)).unwrap();
    let region = info
        .regions
        .iter()
        .find(|r| r.region.addr <= s.remote && s.remote < r.region.addr + r.region.len)?;
    region.decision.as_ref().ok().map(|c| c.transport)
}

fn round_trip(via: TransportKind) {
    let sizes = [1usize, 4096, 65536 + 3, 5 << 20];
    let total: usize = sizes.iter().sum();
    let mut s = Setup::new(via, total);
    let data = random_bytes(total, 7);
    let src = s.local(&data);
    let back = s.local(&vec![POISON; total]);
    poke(s.remote, &vec![POISON; total]);
    assert_eq!(transport_of(&s, src), Some(via), "the suite runs on the transport it names");
    let (mut writes, mut reads, mut off) = (Vec::new(), Vec::new(), 0u64);
    for n in sizes {
        let n = n as u64;
        writes.push(Request {
            op: Op::Write,
            local: src + off,
            len: n,
            peer: s.peer,
            remote: s.remote + off,
        });
        reads.push(Request {
            op: Op::Read,
            local: back + off,
            len: n,
            peer: s.peer,
            remote: s.remote + off,
        });
        off += n;
    }
    s.initiator.transfer_sync(&writes, BatchOptions::default()).unwrap();
    assert!(peek(s.remote, total) == data, "{via}: the target holds exactly the written bytes");
    s.initiator.transfer_sync(&reads, BatchOptions::default()).unwrap();
    assert!(peek(back, total) == data, "{via}: every byte read back");
}

fn scattered_batch_statuses(via: TransportKind) {
    let (pages, page) = (256usize, 4096usize);
    let mut s = Setup::new(via, pages * page);
    let data = random_bytes(pages * page, 8);
    let src = s.local(&data);
    poke(s.remote, &vec![POISON; pages * page]);
    let reqs: Vec<Request> = (0..pages)
        .map(|i| Request {
            op: Op::Write,
            local: src + (i * page) as u64,
            len: page as u64,
            peer: s.peer,
            remote: s.remote + (((i * 97) % pages) * page) as u64,
        })
        .collect();
    let h = s.initiator.submit(&reqs, BatchOptions::default()).unwrap();
    h.wait().unwrap();
    assert!(h.statuses().iter().all(|st| *st == RequestStatus::Done));
    let there = peek(s.remote, pages * page);
    for i in 0..pages {
        let j = (i * 97) % pages;
        assert!(
            there[j * page..(j + 1) * page] == data[i * page..(i + 1) * page],
            "{via}: page {i}"
        );
    }
}

fn notification_after_the_data(via: TransportKind) {
    let mut s = Setup::new(via, 1 << 20);
    let data = random_bytes(1 << 20, 9);
    let src = s.local(&data);
    let req = Request { op: Op::Write, local: src, len: 1 << 20, peer: s.peer, remote: s.remote };
    let opts = BatchOptions { notify: Some(("kv".into(), "layer-0".into())), ..Default::default() };
    s.initiator.transfer_sync(&[req], opts).unwrap();
    let target = s.target_engine();
    let got = common::eventually(std::time::Duration::from_secs(5), || {
        target.take_notifications().iter().any(|n| n.name == "kv" && n.message == "layer-0")
    });
    assert!(got, "{via}: the notification arrived");
    assert!(peek(s.remote, 1 << 20) == data, "{via}: with the data visible");
}

fn refusals_name_the_range(via: TransportKind) {
    let mut s = Setup::new(via, 8192);
    let src = s.local(&[1; 8192]);
    // Past the end of the peer's region: refused at submit (nothing moved).
    let outside =
        Request { op: Op::Write, local: src, len: 8192, peer: s.peer, remote: s.remote + 4096 };
    let err = s.initiator.submit(&[outside], BatchOptions::default()).unwrap_err();
    assert!(matches!(err, Error::RemoteAccessDenied { .. }), "{via}: {err}");
    let range = format!("[{:#x}, +8192)", s.remote + 4096);
    assert!(err.to_string().contains(&range), "{via}: {err} names {range}");
    // A local range that is not registered.
    let unregistered =
        Request { op: Op::Write, local: 0x1000, len: 16, peer: s.peer, remote: s.remote };
    let err = s.initiator.submit(&[unregistered], BatchOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NotRegistered { .. }), "{via}: {err}");
    assert!(err.to_string().contains("[0x1000, +16)"), "{via}: {err}");
    let empty = s.initiator.submit(&[], BatchOptions::default()).unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument { .. }), "{via}: {empty}");
}

/// The target unregisters its region while the initiator still holds its descriptor (and
/// its connections): the next write is refused with the range named, and nothing lands.
/// (Over the fabric the target's NIC refuses the key; libfabric's tcp provider sometimes
/// drops the connection instead of answering, a `PeerFailed` that makes the initiator re-read
/// the descriptor: the write after it is refused at submit.)
fn refused_after_unregister(via: TransportKind) {
    let len = 64 << 10;
    let mut s = Setup::new(via, len);
    let src = s.local(&random_bytes(len, 11));
    let write =
        Request { op: Op::Write, local: src, len: len as u64, peer: s.peer, remote: s.remote };
    s.initiator.transfer_sync(&[write], BatchOptions::default()).unwrap();
    s.target_engine().unregister(s.remote).unwrap();
    poke(s.remote, &vec![POISON; len]);
    let mut err = s.initiator.transfer_sync(&[write], BatchOptions::default()).unwrap_err();
    if via == TransportKind::Fabric && matches!(err, Error::PeerFailed { .. }) {
        err = s.initiator.transfer_sync(&[write], BatchOptions::default()).unwrap_err();
    }
    assert!(matches!(err, Error::RemoteAccessDenied { .. }), "{via}: {err}");
    assert!(err.to_string().contains(&format!("{:#x}", s.remote)), "{via}: {err}");
    assert!(peek(s.remote, len) == vec![POISON; len], "{via}: nothing landed");
}

/// A READ cancelled while in flight: once `cancel` returns, no byte lands in its buffer (the
/// fabric's NICs write straight into registered memory: the cancel stops them first), and the
/// next READ of the same range moves every byte.
fn cancelled_read_lands_nothing_after(via: TransportKind) {
    let len = 32 << 20;
    let mut s = Setup::new(via, len);
    let data = random_bytes(len, 21);
    poke(s.remote, &data);
    let back = s.local(&vec![POISON; len]);
    let read =
        Request { op: Op::Read, local: back, len: len as u64, peer: s.peer, remote: s.remote };
    let batch = s.initiator.submit(&[read], BatchOptions::default()).unwrap();
    batch.cancel();
    let after_cancel = peek(back, len);
    let outcome = batch.wait();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(peek(back, len) == after_cancel, "{via}: bytes landed after cancel ({outcome:?})");
    if let Err(e) = &outcome {
        assert!(matches!(e, Error::Cancelled { .. }), "{via}: {e}");
    }
    poke(back, &vec![POISON; len]);
    s.initiator.transfer_sync(&[read], BatchOptions::default()).unwrap();
    assert!(peek(back, len) == data, "{via}: every byte of the next READ");
}

/// A WRITE plan and a READ plan, each prepared once and executed 1,000 times with fresh data,
/// every byte checked every time.
fn prepared_plan_many_times(via: TransportKind) {
    let len = 64 * 4096;
    let mut s = Setup::new(via, len);
    let src = s.local(&[]);
    let back = s.local(&[]);
    let scattered = |op: Op, local: u64| -> Vec<Request> {
        (0..64u64)
            .map(|i| Request {
                op,
                local: local + i * 4096,
                len: 4096,
                peer: s.peer,
                remote: s.remote + ((i * 13) % 64) * 4096,
            })
            .collect()
    };
    assert_eq!(transport_of(&s, src), Some(via));
    let writes = s.initiator.prepare(&scattered(Op::Write, src)).unwrap();
    let reads = s.initiator.prepare(&scattered(Op::Read, back)).unwrap();
    for round in 0..1000u64 {
        let data = random_bytes(len, round);
        poke(src, &data);
        poke(back, &vec![POISON; len]);
        s.initiator.execute(&writes, BatchOptions::default()).unwrap().wait().unwrap();
        for r in writes.requests() {
            let off = (r.local - src) as usize;
            assert!(peek(r.remote, 4096) == data[off..off + 4096], "{via}: round {round}");
        }
        s.initiator.execute(&reads, BatchOptions::default()).unwrap().wait().unwrap();
        assert!(peek(back, len) == data, "{via}: round {round}: every byte read back");
    }
}

/// Whether `via` cannot run here (said on stderr, never counted as a pass by the runner's
/// output: the test body did not run).
fn skipped(via: TransportKind) -> bool {
    if via != TransportKind::Fabric {
        return false;
    }
    common::fabric_missing().inspect(|why| eprintln!("skipped: {why}")).is_some()
}

macro_rules! conformance {
    ($($module:ident => $via:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[test]
            fn round_trip() {
                if !super::skipped($via) {
                    super::round_trip($via)
                }
            }

            #[test]
            fn scattered_batch_statuses() {
                if !super::skipped($via) {
                    super::scattered_batch_statuses($via)
                }
            }

            #[test]
            fn notification_after_the_data() {
                if !super::skipped($via) {
                    super::notification_after_the_data($via)
                }
            }

            #[test]
            fn refusals_name_the_range() {
                if !super::skipped($via) {
                    super::refusals_name_the_range($via)
                }
            }

            #[test]
            fn refused_after_unregister() {
                if !super::skipped($via) {
                    super::refused_after_unregister($via)
                }
            }

            #[test]
            fn cancelled_read_lands_nothing_after() {
                if !super::skipped($via) {
                    super::cancelled_read_lands_nothing_after($via)
                }
            }

            #[test]
            fn prepared_plan_many_times() {
                if !super::skipped($via) {
                    super::prepared_plan_many_times($via)
                }
            }
        }
    )*};
}

conformance! {
    local => TransportKind::Local,
    shm => TransportKind::Shm,
    fabric => TransportKind::Fabric,
    tcp => TransportKind::Tcp,
}

/// Two NICs on each side (libfabric's tcp provider on two interfaces of this host, named by
/// `fabric_nics` as `TIDEWIRE_FABRIC_NICS` does): a region is registered with both (one `Rma`
/// reach each), a 64 MiB batch is cut into 4 MiB chunks spread over both, and every byte
/// arrives and comes back.
#[test]
fn fabric_spreads_a_batch_over_two_nics() {
    if skipped(TransportKind::Fabric) {
        return;
    }
    let probe = tidewire::fabric::probe();
    let mut nics: Vec<String> =
        probe.providers.iter().filter(|p| p.core() == "tcp").map(|p| p.domain.clone()).collect();
    nics.dedup();
    if nics.len() < 2 {
        eprintln!("skipped: the tcp provider offers one interface here ({nics:?})");
        return;
    }
    nics.truncate(2);
    let cfg = || tidewire::EngineConfig { fabric_nics: nics.clone(), ..common::fabric_config() };
    let (initiator, target) = (Engine::new(cfg()).unwrap(), Engine::new(cfg()).unwrap());
    let len = 64usize << 20;
    let remote = registered(&target, len, &vec![POISON; len]);
    let data = random_bytes(len, 12);
    let src = registered(&initiator, len, &data);
    let back = registered(&initiator, len, &vec![POISON; len]);
    let peer = initiator.open_segment(target.name()).unwrap();
    let region = initiator.peer_descriptor(peer).unwrap().regions[0].clone();
    let rma = region.reach.iter().filter(|r| r.transport() == TransportKind::Fabric).count();
    assert_eq!(rma, 2, "registered with both NICs: {:?}", region.reach);
    let req = |op, local| Request { op, local, len: len as u64, peer, remote: remote.addr() };
    initiator.transfer_sync(&[req(Op::Write, src.addr())], BatchOptions::default()).unwrap();
    assert!(peek(remote.addr(), len) == data, "every byte written");
    initiator.transfer_sync(&[req(Op::Read, back.addr())], BatchOptions::default()).unwrap();
    assert!(peek(back.addr(), len) == data, "every byte read back");
    let map = initiator.fabric_map().unwrap();
    assert_eq!(map.nics.len(), 2, "{map:?}");
    assert!(map.posted.iter().all(|n| *n >= 8), "32 chunks spread over both NICs: {map:?}");
}

/// A local region unregistered while batches from it are being posted over the fabric (many
/// 4 MiB chunks each): every submission ends (done, or refused because the region is gone),
/// the unregistration returns, and none of them waits on the other.
#[test]
fn fabric_unregister_racing_submissions_ends() {
    if skipped(TransportKind::Fabric) {
        return;
    }
    let (initiator, target) = (
        Engine::new(common::fabric_config()).unwrap(),
        Engine::new(common::fabric_config()).unwrap(),
    );
    let len = 64usize << 20;
    let remote = registered(&target, len, &[]);
    let peer = initiator.open_segment(target.name()).unwrap();
    let initiator = std::sync::Arc::new(initiator);
    for round in 0..10 {
        let src = registered(&initiator, len, &random_bytes(len, round));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (eng, addr, to) = (initiator.clone(), src.addr(), remote.addr());
        let submitter = std::thread::spawn(move || {
            for _ in 0..4 {
                let w = Request { op: Op::Write, local: addr, len: len as u64, peer, remote: to };
                let out = eng.transfer_sync(&[w], BatchOptions::default());
                if let Err(e) = &out {
                    assert!(matches!(e, Error::NotRegistered { .. }), "round {round}: {e}");
                }
            }
            let _ = done_tx.send(());
        });
        std::thread::sleep(std::time::Duration::from_millis(round));
        initiator.unregister(src.addr()).unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("round {round}: a submission never ended"));
        submitter.join().unwrap();
    }
}
