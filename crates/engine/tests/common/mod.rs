//! Helpers shared by the engine's integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::{Rng, SeedableRng};
use tidewire::{Engine, EngineConfig, HostBuffer};

/// A peer-to-peer engine on loopback with an OS-chosen port.
pub fn engine() -> Engine {
    Engine::new(config()).expect("engine starts")
}

pub fn config() -> EngineConfig {
    EngineConfig { port: Some(0), ..EngineConfig::default() }
}

/// As [`config`], with tcp forced the way users force it (`MC_FORCE_TCP`).
pub fn tcp_config() -> EngineConfig {
    config().apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into())).unwrap()
}

/// As [`config`], with the fabric transport on libfabric's `tcp` provider (asked for by name,
/// as `TIDEWIRE_FABRIC_PROVIDER=tcp` does).
pub fn fabric_config() -> EngineConfig {
    EngineConfig { fabric_provider: Some("tcp".into()), ..config() }
}

/// `None` when libfabric (with its tcp provider) is here; else why the fabric tests are
/// skipped. Where `scripts/test.sh` says libfabric must be there
/// (`TIDEWIRE_REQUIRE_LIBFABRIC=1`), its absence fails the test instead.
pub fn fabric_missing() -> Option<String> {
    let probe = tidewire::fabric::probe();
    let why = match &probe.library {
        Err(why) => why.clone(),
        Ok(_) if !probe.providers.iter().any(|p| p.core() == "tcp") => {
            "libfabric has no tcp provider here".into()
        }
        Ok(_) => return None,
    };
    let required = std::env::var("TIDEWIRE_REQUIRE_LIBFABRIC").is_ok_and(|v| v == "1");
    assert!(!required, "TIDEWIRE_REQUIRE_LIBFABRIC=1 but: {why}");
    Some(why)
}

/// What `engine.peers()` says of `peer`.
pub fn status(engine: &Engine, peer: tidewire::PeerId) -> tidewire::PeerStatus {
    engine.peers().into_iter().find(|p| p.id == peer).unwrap()
}

/// The port of a peer-to-peer segment name (`host:port`), to restart a peer under it.
pub fn port_of(name: &str) -> u16 {
    name.rsplit(':').next().unwrap().parse().unwrap()
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
                location: Location { kind: MemoryKind::HostPageable, device: None },
                reach: vec![Reach::Tcp],
            }],
            layouts: Vec::new(),
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
                let mut f =
                    Header::new(FrameKind::HelloAck, h.tag, 0, INSTANCE_LEN).encode().to_vec();
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

/// Re-executes this test binary running only `entry` (an ignored helper test) with `env`, and
/// waits up to `limit` for the line `READY <rest>`. Returns the child, its further stdout lines
/// and `<rest>`.
pub fn spawn_child(
    entry: &str,
    env: &[(&str, String)],
    limit: Duration,
) -> (Child, std::sync::mpsc::Receiver<String>, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["--exact", entry, "--ignored", "--nocapture", "--test-threads=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child {entry} not ready in {limit:?}: {e}");
            }
        };
        if let Some(rest) = line.split_once("READY ").map(|(_, r)| r.to_string()) {
            return (child, rx, rest);
        }
    }
}

/// A target engine in a child process (this test binary re-executed with `TW_CHILD_PORT`).
pub struct ChildTarget {
    pub child: Child,
    pub name: String,
    pub addr: u64,
    /// The engine instance id, as printed.
    pub instance: String,
}

impl ChildTarget {
    /// Starts the child on `port` (0: any) with a shared region of `len` bytes filled with
    /// `fill_seed`-random bytes, and waits (bounded) until it prints READY.
    pub fn spawn(test_binary_entry: &str, port: u16, len: u64, fill_seed: u64) -> Self {
        Self::spawn_with(test_binary_entry, port, len, fill_seed, &[])
    }

    /// As `spawn`, with extra environment (`TW_CHILD_METADATA`, `TW_CHILD_NAME`, ...).
    pub fn spawn_with(
        test_binary_entry: &str,
        port: u16,
        len: u64,
        fill_seed: u64,
        env: &[(&str, String)],
    ) -> Self {
        let mut env: Vec<(&str, String)> = env.to_vec();
        env.push(("TW_CHILD_PORT", port.to_string()));
        env.push(("TW_CHILD_LEN", len.to_string()));
        env.push(("TW_CHILD_SEED", fill_seed.to_string()));
        let (child, _lines, line) = spawn_child(test_binary_entry, &env, Duration::from_secs(20));
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap().to_string();
        let addr = parts.next().unwrap().parse().unwrap();
        let instance = parts.next().unwrap().to_string();
        Self { child, name, addr, instance }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the child (SIGSTOP): its sockets stay open but nothing is answered.
    pub fn freeze(&self) {
        // Sending a signal to our own child by pid.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
        // The signal is delivered as the child's threads next run: wait until the kernel
        // reports it stopped (state `T` in /proc/PID/stat), bounded.
        let stopped = eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().starts_with('T')))
                .unwrap_or(false)
        });
        assert!(stopped, "child {pid} did not stop within 5 s of SIGSTOP");
    }
}

impl Drop for ChildTarget {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of the child process: serve a shared region until stdin closes. Optional
/// `TW_CHILD_METADATA` (URI), `TW_CHILD_NAME` and `TW_CHILD_TTL_MS` select a metadata server.
pub fn child_main() {
    if let Ok(what) = std::env::var("TW_CHILD_MAP") {
        return child_mapping(&what);
    }
    let Ok(port) = std::env::var("TW_CHILD_PORT") else { return };
    let len: u64 = std::env::var("TW_CHILD_LEN").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("TW_CHILD_SEED").unwrap().parse().unwrap();
    let mut cfg = EngineConfig { port: Some(port.parse().unwrap()), ..Default::default() };
    if let Ok(uri) = std::env::var("TW_CHILD_METADATA") {
        cfg.metadata = tidewire::MetadataUri::parse(&uri).unwrap();
        cfg.name = std::env::var("TW_CHILD_NAME").ok();
    }
    if let Ok(ttl) = std::env::var("TW_CHILD_TTL_MS") {
        cfg.metadata_ttl = Duration::from_millis(ttl.parse().unwrap());
    }
    cfg.fabric_provider = std::env::var("TW_CHILD_FABRIC").ok();
    // `TW_CHILD_NO_WORD=1`: no liveness word offered (initiators peek at the shm socket).
    cfg.shm_liveness_word = std::env::var("TW_CHILD_NO_WORD").is_err();
    let e = Engine::new(cfg).unwrap();
    let addr = e.allocate_shared(len).unwrap();
    poke(addr, &random_bytes(len as usize, seed));
    println!("READY {} {} {}", e.name(), addr, e.instance_id());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::exit(0);
}

/// The body of a child that maps a region of another engine (`TW_CHILD_MAP` = "NAME ADDR
/// LEN") and holds the mapping (with its in-use mark) until stdin closes.
fn child_mapping(what: &str) {
    let mut parts = what.split_whitespace();
    let (name, addr, len) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let e = Engine::new(config()).unwrap();
    let peer = e.open_segment(name).unwrap();
    let m = e.map_peer(peer, addr.parse().unwrap(), len.parse().unwrap(), None).unwrap();
    println!("READY {} {} {}", e.name(), m.addr(), e.instance_id());
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

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Finds a server binary: `$env` (when set and not empty) or `name` on the PATH; `Err` says
/// why there is none.
pub fn server_bin(env: &str, name: &str) -> Result<String, String> {
    if let Some(p) = std::env::var(env).ok().filter(|p| !p.is_empty()) {
        return if std::path::Path::new(&p).is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={p} is not a file"))
        };
    }
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map_err(|e| format!("looking for {name} on the PATH: {e}"))?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if p.is_empty() {
        return Err(format!("{name} is not installed (neither {env} nor the PATH has it)"));
    }
    Ok(p)
}

/// A server a test needs is missing (`why`). With `TIDEWIRE_REQUIRE_SERVERS=1` (scripts/test.sh
/// and CI set it) that fails the test. Otherwise the test skips what needs the server and says
/// so on stderr past the test harness's capture, so that the skip shows in a passing run.
pub fn server_missing(why: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    if std::env::var("TIDEWIRE_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: {why}, and TIDEWIRE_REQUIRE_SERVERS=1 requires it \
             (scripts/test.sh installs it)"
        );
    }
    // Written to the stream directly: `eprintln!` output of passing tests is captured.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED in {test}: {why}; what needs it did not run (scripts/test.sh installs it; \
         TIDEWIRE_REQUIRE_SERVERS=1 makes this a failure)"
    );
}

fn wait_port(port: u16) {
    assert!(port_up(port), "server on port {port} did not start");
}

fn port_up(port: u16) -> bool {
    eventually(Duration::from_secs(15), || TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// A real server process (etcd member or redis) on loopback, stopped on drop.
pub struct Server {
    bin: String,
    args: Vec<String>,
    child: Option<Child>,
    pub port: u16,
    _dir: Option<tempdir::Dir>,
}

pub mod tempdir {
    /// A temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "tidewire-{tag}-{}-{}",
                std::process::id(),
                super::free_port()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Server {
    fn spawn(bin: String, args: Vec<String>, port: u16, dir: Option<tempdir::Dir>) -> Self {
        let mut s = Self { bin, args, child: None, port, _dir: dir };
        s.start();
        s
    }

    pub fn start(&mut self) {
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_port(self.port);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// etcd members on loopback: one (`n = 1`) or a cluster. `None` when etcd is not installed
/// and `TIDEWIRE_REQUIRE_SERVERS` is not 1 (see `server_missing`).
pub fn etcd_cluster(n: usize) -> Option<Vec<Server>> {
    let bin = match server_bin("TIDEWIRE_ETCD_BIN", "etcd") {
        Ok(bin) => bin,
        Err(why) => {
            server_missing(&why);
            return None;
        }
    };
    // A port found free may be taken by another test before etcd binds it: a cluster whose
    // members do not all come up is started again on other ports.
    for attempt in 1..=3 {
        let servers = etcd_members(&bin, n);
        if servers.iter().all(|s| port_up(s.port)) {
            return Some(etcd_ready(servers));
        }
        let _ =
            writeln!(std::io::stderr(), "etcd cluster attempt {attempt}: a member did not start");
    }
    panic!("an etcd cluster of {n} did not start in three attempts");
}

fn etcd_members(bin: &str, n: usize) -> Vec<Server> {
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}")).collect();
    ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            let dir = tempdir::Dir::new("etcd");
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.0.display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
            ];
            let child = Command::new(bin)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            Server {
                bin: bin.to_string(),
                args,
                child: Some(child),
                port: *client,
                _dir: Some(dir),
            }
        })
        .collect()
}

fn etcd_ready(servers: Vec<Server>) -> Vec<Server> {
    // Wait until the cluster serves requests (a leader is elected).
    let ok = eventually(Duration::from_secs(20), || {
        etcd_put(&servers[0].endpoint(), "tidewire-test/ready", b"1").is_ok()
    });
    assert!(ok, "etcd cluster did not become ready");
    servers
}

/// A redis server on loopback without persistence. `None` when redis is not installed and
/// `TIDEWIRE_REQUIRE_SERVERS` is not 1 (see `server_missing`).
pub fn redis() -> Option<Server> {
    let bin = match server_bin("TIDEWIRE_REDIS_BIN", "redis-server") {
        Ok(bin) => bin,
        Err(why) => {
            server_missing(&why);
            return None;
        }
    };
    let port = free_port();
    let marker = format!("tidewire-redis-{port}.rdb");
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dbfilename",
        &marker,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Some(Server::spawn(bin, args, port, None))
}

fn http10(endpoint: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(endpoint)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(out));
    }
    Ok(out)
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Writes a raw value into etcd (no lease), as a foreign program would.
pub fn etcd_put(endpoint: &str, key: &str, value: &[u8]) -> std::io::Result<()> {
    http10(
        endpoint,
        "/v3/kv/put",
        &format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", b64(key.as_bytes()), b64(value)),
    )
    .map(|_| ())
}

/// Sends one RESP command to redis and returns the raw reply.
pub fn redis_cmd(endpoint: &str, args: &[&[u8]]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(endpoint)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    s.write_all(&out)?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
