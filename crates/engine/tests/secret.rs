//! The cluster secret: engines with the same secret work on every transport; with another
//! secret, or none, every entry point refuses (tcp data, the RPC descriptor fetch, the
//! revocation channel, the shm socket), the target's memory is untouched and no descriptor
//! is sent; a replayed handshake is refused; a process of another uid is refused by the shm
//! socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{peek, random_bytes, registered};
use tidewire::core::handshake::{ClientAuth, Handshake, HandshakeEvent};
use tidewire::core::wire::{FrameKind, Header, Status, HEADER_LEN};
use tidewire::{
    BatchOptions, ClusterSecret, Engine, EngineConfig, MetadataServer, MetadataUri, Op, Request,
};

fn with_secret(cfg: EngineConfig, secret: Option<&str>) -> EngineConfig {
    EngineConfig {
        cluster_secret: secret.map(|s| ClusterSecret::new(s.as_bytes()).unwrap()),
        ..cfg
    }
}

/// Named engines publishing through an HTTP metadata server: an initiator gets the target's
/// descriptor without asking the target, so the data path's own refusal is what is tested.
fn named(server: &MetadataServer, name: &str, secret: Option<&str>, tcp: bool) -> Engine {
    let base = if tcp { common::tcp_config() } else { common::config() };
    let cfg = EngineConfig {
        name: Some(name.into()),
        metadata: MetadataUri::parse(&server.url()).unwrap(),
        ..base
    };
    Engine::new(with_secret(cfg, secret)).unwrap()
}

fn write(from: &Engine, to: &str, remote: u64, data: &[u8]) -> tidewire::Result<()> {
    let local = registered(from, data.len(), data);
    let peer = from.open_segment(to)?;
    let r = from.transfer_sync(
        &[Request { op: Op::Write, local: local.addr(), len: data.len() as u64, peer, remote }],
        BatchOptions::default(),
    );
    drop(local);
    r
}

#[test]
fn the_same_secret_works_over_tcp_and_shm() {
    let server = MetadataServer::start("127.0.0.1:0").unwrap();
    for tcp in [true, false] {
        let t = named(&server, &format!("target-{tcp}"), Some("s3cret"), tcp);
        let i = named(&server, &format!("initiator-{tcp}"), Some("s3cret"), tcp);
        let remote = t.allocate_shared(1 << 20).unwrap();
        let data = random_bytes(1 << 20, 1);
        write(&i, &format!("target-{tcp}"), remote, &data).unwrap();
        assert!(peek(remote, 1 << 20) == data, "tcp {tcp}: every byte arrived");
        assert_eq!(t.refused_connections(), 0);
        assert_eq!(t.cluster_secret_fingerprint(), i.cluster_secret_fingerprint());
    }
    // Peer-to-peer mode (the descriptor from the target's RPC port) too.
    let t = Engine::new(with_secret(common::config(), Some("s3cret"))).unwrap();
    let i = Engine::new(with_secret(common::tcp_config(), Some("s3cret"))).unwrap();
    let remote = t.allocate_shared(65536).unwrap();
    let data = random_bytes(65536, 2);
    write(&i, t.name(), remote, &data).unwrap();
    assert!(peek(remote, 65536) == data);
}

#[test]
fn another_secret_or_none_is_refused_at_every_entry_point_and_memory_is_untouched() {
    let server = MetadataServer::start("127.0.0.1:0").unwrap();
    let cases = [(Some("right"), Some("wrong")), (Some("right"), None), (None, Some("right"))];
    for (k, (target_secret, initiator_secret)) in cases.into_iter().enumerate() {
        for tcp in [true, false] {
            let tn = format!("t{k}-{tcp}");
            let t = named(&server, &tn, target_secret, tcp);
            let i = named(&server, &format!("i{k}-{tcp}"), initiator_secret, tcp);
            let remote = t.allocate_shared(65536).unwrap();
            let poison = vec![0xA5u8; 65536];
            common::poke(remote, &poison);
            let before = t.refused_connections();
            let start = Instant::now();
            let err = write(&i, &tn, remote, &random_bytes(65536, 3)).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("secret") || msg.contains("refused") || msg.contains("trusted"),
                "case {k} tcp {tcp}: a clear reason: {msg}"
            );
            assert!(start.elapsed() < Duration::from_secs(20), "bounded: {:?}", start.elapsed());
            assert!(peek(remote, 65536) == poison, "case {k} tcp {tcp}: memory untouched");
            if target_secret.is_some() {
                // Counted when the target sees the initiator leave (on its I/O loop).
                let counted =
                    common::eventually(Duration::from_secs(5), || t.refused_connections() > before);
                assert!(counted, "case {k} tcp {tcp}: counted");
            }
        }
        // The descriptor endpoint (peer-to-peer mode): refused, with the reason.
        let t = Engine::new(with_secret(common::config(), target_secret)).unwrap();
        let i = Engine::new(with_secret(common::config(), initiator_secret)).unwrap();
        let err = i.open_segment(t.name()).unwrap_err().to_string();
        assert!(err.contains("secret") || err.contains("trusted"), "case {k}: {err}");
    }
}

/// Reads one frame (blocking, 5 s), or `None` when the connection closed.
fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw).ok()?;
    let h = Header::decode(&raw).unwrap();
    let mut payload = vec![0u8; h.payload_len() as usize];
    s.read_exact(&mut payload).ok()?;
    Some((h, payload))
}

#[test]
fn a_replayed_handshake_and_a_request_before_the_handshake_are_refused() {
    let t = Engine::new(with_secret(common::config(), Some("s3cret"))).unwrap();
    let auth = ClientAuth {
        secret: ClusterSecret::new(b"s3cret").unwrap(),
        me: tidewire::core::InstanceId(42),
        nonce: [7; 32],
    };
    // A genuine handshake, recorded.
    let mut s = TcpStream::connect(t.rpc_addr()).unwrap();
    let mut hs = Handshake::new(Instant::now(), Duration::from_secs(5), None, Some(auth));
    let mut recorded = Vec::new();
    let event = loop {
        while let Some(f) = hs.poll_transmit() {
            s.write_all(&f).unwrap();
            recorded.push(f);
        }
        if let Some(e) = hs.poll_event() {
            break e;
        }
        let (h, p) = read_frame(&mut s).unwrap();
        hs.handle_frame(Instant::now(), &h, &p);
    };
    assert!(matches!(event, HandshakeEvent::Established(_)), "{event:?}");
    drop(s);
    // Replayed byte for byte on a new connection: the target's challenge is new, the old
    // proof does not answer it.
    let mut s = TcpStream::connect(t.rpc_addr()).unwrap();
    s.write_all(&recorded[0]).unwrap();
    let (h, _) = read_frame(&mut s).unwrap();
    assert_eq!((h.kind, h.status), (FrameKind::HelloAck, Status::Ok));
    s.write_all(&recorded[1]).unwrap();
    let (h, _) = read_frame(&mut s).unwrap();
    assert_eq!((h.kind, h.status), (FrameKind::AuthAck, Status::AccessDenied));
    s.write_all(&Header::new(FrameKind::GetDescriptor, 1, 0, 0).encode()).ok();
    assert!(read_frame(&mut s).is_none(), "no descriptor: the connection is closed");
    // A request before any handshake: no answer, closed.
    let mut s = TcpStream::connect(t.rpc_addr()).unwrap();
    s.write_all(&Header::new(FrameKind::GetDescriptor, 1, 0, 0).encode()).unwrap();
    assert!(read_frame(&mut s).is_none(), "no descriptor before the handshake");
    assert!(t.refused_connections() >= 2, "{}", t.refused_connections());
}

#[test]
fn a_connection_that_never_proves_the_secret_is_closed_at_the_handshake_deadline() {
    let mut cfg = with_secret(common::config(), Some("s3cret"));
    cfg.deadlines.handshake = Duration::from_millis(300);
    let t = Engine::new(cfg).unwrap();
    let mut s = TcpStream::connect(t.rpc_addr()).unwrap();
    let start = Instant::now();
    assert!(read_frame(&mut s).is_none(), "closed without an answer");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "bounded by the deadline: {took:?}");
    assert!(t.refused_connections() >= 1);
}

#[test]
fn the_shm_socket_refuses_another_uid() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_shm_socket_refuses_another_uid: needs root to run a client as another \
             user (what was not run: the SO_PEERCRED refusal)"
        );
        return;
    }
    let t = Engine::new(common::config()).unwrap();
    let socket = t.descriptor().shm_socket.expect("the engine has an shm socket");
    // A child that becomes `nobody`, connects to the abstract socket and sends a hello.
    let mut hello = Header::new(FrameKind::Hello, 0, 0, 16).encode().to_vec();
    hello.extend_from_slice(&[0u8; 16]);
    let child = std::thread::spawn(move || {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixStream};
        // SAFETY: a fork of this test process; the child only makes async-signal-safe calls
        // on memory prepared before the fork, then exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| -> i32 {
                // SAFETY: setuid in the child only.
                if unsafe { libc::setgid(65534) } != 0 || unsafe { libc::setuid(65534) } != 0 {
                    return 3;
                }
                let Ok(addr) = SocketAddr::from_abstract_name(socket.as_bytes()) else { return 4 };
                let Ok(mut s) = UnixStream::connect_addr(&addr) else { return 5 };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(&hello);
                let mut buf = [0u8; 64];
                match s.read(&mut buf) {
                    // Closed (or reset) without an answer: refused.
                    Ok(0) => 0,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                    Ok(_) => 1, // answered: not refused
                    Err(_) => 2,
                }
            })();
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        libc::WEXITSTATUS(status)
    });
    let code = child.join().unwrap();
    assert_eq!(code, 0, "the child of another uid was answered (code {code})");
    assert!(t.refused_connections() >= 1);
}
