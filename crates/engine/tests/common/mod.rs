//! Helpers shared by the engine's integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use rand::{Rng, SeedableRng};
use tidewire::{Engine, EngineConfig, HostBuffer};

/// A peer-to-peer engine on loopback with an OS-chosen port.
pub fn engine() -> Engine {
    Engine::new(config()).expect("engine starts")
}

pub fn config() -> EngineConfig {
    EngineConfig {
        port: Some(0),
        ..EngineConfig::default()
    }
}

/// `len` random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A registered buffer filled with `fill`.
pub fn registered(engine: &Engine, len: usize, fill: &[u8]) -> HostBuffer {
    let mut b = HostBuffer::new(len).unwrap();
    b.fill_from(fill);
    // SAFETY: the buffer lives until the test ends; engines are shut down (or the region
    // unregistered) before it drops, as every test keeps engines declared after buffers.
    unsafe { engine.register(b.addr(), len as u64, "cpu").unwrap() };
    b
}

/// Reads `len` bytes of raw memory at `addr` (a region the test owns).
pub fn peek(addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: tests only peek at buffers they allocated and that are alive.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), len) };
    out
}

/// Writes `data` at `addr` (a region the test owns).
pub fn poke(addr: u64, data: &[u8]) {
    // SAFETY: as for `peek`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidewire::core::descriptor::{Reach, RegionDescriptor, SegmentDescriptor, DESCRIPTOR_VERSION};
use tidewire::core::memory::{Location, MemoryKind};
use tidewire::core::wire::{FrameKind, Header, HEADER_LEN, INSTANCE_LEN};
use tidewire::core::{HostId, InstanceId, RegionId};

/// A peer that completes the handshake and serves a descriptor with one region at
/// `region_addr`, but never answers a READ or WRITE: transfers to it stay pending until
/// cancelled, timed out, or the connection dies.
pub struct FakePeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<parking_lot::Mutex<Vec<TcpStream>>>,
}

impl FakePeer {
    pub fn start(region_addr: u64, region_len: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let desc = SegmentDescriptor {
            version: DESCRIPTOR_VERSION,
            name: addr.to_string(),
            instance_id: InstanceId(42),
            host_id: HostId("a-fake-host".into()),
            hostname: "fake".into(),
            rpc_addr: addr.to_string(),
            shm_socket: None,
            generation: 1,
            regions: vec![RegionDescriptor {
                id: RegionId(1),
                addr: region_addr,
                len: region_len,
                location: Location {
                    kind: MemoryKind::HostPageable,
                    device: None,
                },
                reach: vec![Reach::Tcp],
            }],
        };
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<parking_lot::Mutex<Vec<TcpStream>>> = Arc::default();
        let (s2, c2) = (stop.clone(), conns.clone());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !s2.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        c2.lock().push(s.try_clone().unwrap());
                        let json = desc.to_json();
                        std::thread::spawn(move || fake_conn(s, &json));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { addr, stop, conns }
    }

    /// Closes every connection, as a crashed peer's kernel would.
    pub fn kill_connections(&self) {
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.kill_connections();
    }
}

fn fake_conn(mut s: TcpStream, desc: &[u8]) {
    loop {
        let mut raw = [0u8; HEADER_LEN];
        if s.read_exact(&mut raw).is_err() {
            return;
        }
        let Ok(h) = Header::decode(&raw) else { return };
        let mut payload = vec![0u8; h.payload_len() as usize];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        let reply = match h.kind {
            FrameKind::Hello => {
                let mut f = Header::new(FrameKind::HelloAck, h.tag, 0, INSTANCE_LEN)
                    .encode()
                    .to_vec();
                f.extend_from_slice(&42u128.to_le_bytes());
                f
            }
            FrameKind::GetDescriptor => {
                let mut f = Header::new(FrameKind::Descriptor, h.tag, 0, desc.len() as u64)
                    .encode()
                    .to_vec();
                f.extend_from_slice(desc);
                f
            }
            _ => continue,
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// A target engine in a child process (this test binary re-executed with `TW_CHILD_PORT`).
pub struct ChildTarget {
    pub child: Child,
    pub name: String,
    pub addr: u64,
}

impl ChildTarget {
    /// Starts the child on `port` (0: any) with a shared region of `len` bytes filled with
    /// `fill_seed`-random bytes, and waits (bounded) until it prints READY.
    pub fn spawn(test_binary_entry: &str, port: u16, len: u64, fill_seed: u64) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                test_binary_entry,
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TW_CHILD_PORT", port.to_string())
            .env("TW_CHILD_LEN", len.to_string())
            .env("TW_CHILD_SEED", fill_seed.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split_once("READY ").map(|(_, r)| r) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("child target ready in time");
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap().to_string();
        let addr = parts.next().unwrap().parse().unwrap();
        Self { child, name, addr }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the child (SIGSTOP): its sockets stay open but nothing is answered.
    pub fn freeze(&self) {
        // Sending a signal to our own child by pid.
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for ChildTarget {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of the child process: serve a shared region until stdin closes.
pub fn child_main() {
    let Ok(port) = std::env::var("TW_CHILD_PORT") else {
        return;
    };
    let len: u64 = std::env::var("TW_CHILD_LEN").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("TW_CHILD_SEED").unwrap().parse().unwrap();
    let e = Engine::new(EngineConfig {
        port: Some(port.parse().unwrap()),
        ..Default::default()
    })
    .unwrap();
    let addr = e.allocate_shared(len).unwrap();
    poke(addr, &random_bytes(len as usize, seed));
    println!("READY {} {}", e.name(), addr);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::exit(0);
}

/// Waits until `f` returns true, up to `limit`.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
