//! `tidewire bench`: throughput and latency of batched one-sided transfers between two
//! engines in two processes, next to a baseline measured in the same run.
//!
//! `--pair` starts the target as a child process on loopback; `--role target` and
//! `--role initiator` run the two sides by hand (two terminals or two hosts). Each initiator
//! thread repeatedly submits a batch of `--batch-size` requests of `--block-size` bytes and
//! waits for it; latency percentiles are per batch (submit to completion seen).
//!
//! Each result is compared with a baseline measured in the same run. By default
//! (`--baseline auto`) that is the ceiling of the transport the engine chose: a `memcpy` of
//! the same blocks for `shm` and `local`, a plain TCP stream between the two processes for
//! `tcp`; GPU runs get none here (their ceiling, a peer copy, is `bench/ref/peer_copy.cu`,
//! which `scripts/gpu-bench.sh` runs in the same command). Every ratio is printed with what it
//! compares, in the table and in `--json` (`baseline`, `baseline_note`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tidewire::core::select::TransportKind;
use tidewire::core::size::{format_size, parse_size};
use tidewire::{BatchOptions, Engine, EngineConfig, HostBuffer, MetadataUri, Op, Request, Timings};

#[derive(clap::Args, Clone)]
pub(crate) struct BenchArgs {
    /// Start the target as a second process on loopback and run the initiator here.
    #[arg(long, conflicts_with = "role")]
    pair: bool,
    /// Run one side only: `target` serves memory, `initiator` drives transfers.
    #[arg(long, value_parser = ["target", "initiator"])]
    role: Option<String>,
    /// The target segment (initiator role): `host:port`, or a name with --metadata.
    #[arg(long)]
    peer: Option<String>,
    /// The target's raw-TCP baseline address (initiator role, --baseline raw-tcp).
    #[arg(long)]
    raw_addr: Option<SocketAddr>,
    /// `tcp`, `shm`, `fabric` or `auto` (the engine's own choice). `fabric` needs a provider
    /// (an RDMA NIC's, or one named by `TIDEWIRE_FABRIC_PROVIDER`, which the target inherits).
    #[arg(long, default_value = "auto")]
    transport: String,
    /// `write` or `read`.
    #[arg(long, default_value = "write", value_parser = ["write", "read"])]
    op: String,
    /// Bytes per request; a comma-separated list sweeps (e.g. `4KiB,64KiB,1MiB`).
    #[arg(long, default_value = "4KiB,64KiB,1MiB", value_delimiter = ',')]
    block_size: Vec<String>,
    /// Requests per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Initiator threads, each with its own batches and buffers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measured time per configuration (e.g. `5s`, `500ms`).
    #[arg(long, default_value = "3s")]
    duration: String,
    /// What each result is compared with: `auto` (the chosen transport's own ceiling: memcpy
    /// for shm and local, raw-tcp for tcp, none for GPU runs), `raw-tcp` (a plain TCP stream
    /// between the two processes), `memcpy` (copies of the same blocks in this process, on as
    /// many threads), or `none`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "raw-tcp", "memcpy", "none"])]
    baseline: String,
    /// One JSON object per result line instead of a table.
    #[arg(long)]
    json: bool,
    /// Record the engine's metrics and print the counters this run produced after the table
    /// (bytes, requests, batches, failures: to check against the table's figures).
    #[arg(long)]
    metrics: bool,
    /// Serve the initiator's metrics on this `host:port` while the run lasts (as
    /// `TIDEWIRE_METRICS_ADDR` does).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Address engines bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// RPC port of the target (default: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Metadata backend (`p2p` or `http://host:port/metadata`).
    #[arg(long, default_value = "p2p")]
    metadata: String,
    /// TCP connections per peer.
    #[arg(long, default_value_t = 4)]
    lanes: usize,
    /// Bytes each thread's requests cover: a batch's requests wrap around within this
    /// footprint (default: batch size × block size, no reuse). A small footprint with a large
    /// batch measures per-request cost without the cache and TLB misses of a large one.
    #[arg(long)]
    footprint: Option<String>,
    /// Target buffer size (target role; default fits the largest sweep point).
    #[arg(long)]
    buffer_size: Option<String>,
    /// Initiator buffers in GPU memory on this CUDA device (default: host memory).
    #[arg(long)]
    gpu: Option<u32>,
    /// Target buffer in GPU memory on this CUDA device (default: shared host memory).
    #[arg(long)]
    target_gpu: Option<u32>,
    /// GPU memory kind: `auto` (the best reach the topology proves), `vmm`, `malloc`, or
    /// `pinned` (page-locked host memory; initiator only).
    #[arg(long, default_value = "auto", value_parser = ["auto", "vmm", "malloc", "pinned"])]
    gpu_mem: String,
    /// Scatter a batch's requests over the buffers (seeded permutation, different on the two
    /// sides) instead of laying them out in order.
    #[arg(long)]
    scatter: bool,
    /// How each round is issued: `submit` (the requests planned every batch), `prepared`
    /// (planned once with `prepare`, then `execute` every batch), `paged` (page index arrays
    /// against layouts registered on both sides, `transfer_pages`).
    #[arg(long, default_value = "submit", value_parser = ["submit", "prepared", "paged"])]
    api: String,
}

fn gpu_kind(name: &str) -> Option<tidewire::gpu::alloc::AllocKind> {
    use tidewire::gpu::alloc::AllocKind;
    match name {
        "vmm" => Some(AllocKind::VmmPosixFd),
        "malloc" => Some(AllocKind::Malloc),
        "pinned" => Some(AllocKind::HostPinned),
        _ => None,
    }
}

/// Allocates `len` bytes of GPU (or pinned) memory on `device` and registers it.
fn gpu_buffer(engine: &Engine, len: u64, device: u32, kind: &str) -> anyhow::Result<u64> {
    let a = engine.allocate_device(len, device, gpu_kind(kind))?;
    eprintln!("cuda:{device}: {} of {} ({})", format_size(len), a.kind.name(), a.reason);
    Ok(a.ptr)
}

fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let (num, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = t.strip_suffix('s') {
        (s, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().with_context(|| format!("duration {text:?}"))?;
    Ok(Duration::from_secs_f64(v * scale))
}

struct Plan {
    footprint: Option<u64>,
    blocks: Vec<u64>,
    batch: usize,
    threads: usize,
    duration: Duration,
    op: Op,
    scatter: bool,
}

impl Plan {
    fn from(args: &BenchArgs) -> anyhow::Result<Self> {
        let blocks =
            args.block_size.iter().map(|b| parse_size(b)).collect::<Result<Vec<_>, _>>()?;
        if blocks.is_empty() || blocks.contains(&0) || args.batch_size == 0 || args.threads == 0 {
            bail!("block sizes, batch size and threads must be positive");
        }
        let op = if args.op == "read" { Op::Read } else { Op::Write };
        let footprint = args.footprint.as_deref().map(parse_size).transpose()?;
        if footprint.is_some_and(|f| blocks.iter().any(|&b| f < b)) {
            bail!("--footprint must hold at least one block");
        }
        Ok(Self {
            footprint,
            blocks,
            batch: args.batch_size,
            threads: args.threads,
            duration: parse_duration(&args.duration)?,
            op,
            scatter: args.scatter,
        })
    }

    /// Bytes one thread's batches span (largest block).
    fn span(&self) -> u64 {
        let full = self.blocks.iter().max().copied().unwrap_or(0) * self.batch as u64;
        self.footprint.map_or(full, |f| f.min(full))
    }

    /// Offset of request `i` of a batch of `block`-byte requests.
    fn offset(&self, i: u64, block: u64) -> u64 {
        let slots = (self.span() / block).max(1);
        (i % slots) * block
    }

    /// Offsets of a batch's requests on the local and remote sides.
    fn offsets(&self, block: u64) -> Vec<(u64, u64)> {
        let n = self.batch as u64;
        if !self.scatter {
            return (0..n).map(|i| (self.offset(i, block), self.offset(i, block))).collect();
        }
        let slots = (self.span() / block).max(1);
        let mut perm: Vec<u64> = (0..slots).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..perm.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            perm.swap(i, (x % (i as u64 + 1)) as usize);
        }
        (0..n)
            .map(|i| {
                let a = perm[(i % slots) as usize];
                let b = perm[(slots - 1 - i % slots) as usize];
                (a * block, b * block)
            })
            .collect()
    }

    fn buffer(&self) -> u64 {
        self.span() * self.threads as u64
    }
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.role.as_deref() {
        Some("target") => run_target(&args),
        Some(_) => run_initiator(&args, None),
        None if args.pair => run_pair(&args),
        None => bail!("choose --pair, or --role target / --role initiator"),
    }
}

fn engine_config(args: &BenchArgs, port: u16, transport: &str) -> anyhow::Result<EngineConfig> {
    let mut cfg = EngineConfig {
        host: args.host.clone(),
        port: Some(port),
        metadata: MetadataUri::parse(&args.metadata)?,
        tcp_lanes: args.lanes,
        ..EngineConfig::default()
    }
    .from_env()?;
    match transport {
        "auto" => {}
        "tcp" => cfg.transports.force_tcp = true,
        "shm" => cfg.transports.enabled = [TransportKind::Shm].into_iter().collect(),
        "fabric" => {
            // The target's buffer is shareable memory: without shm here, the fabric serves it.
            cfg.transports.enabled.remove(&TransportKind::Shm);
            if cfg.fabric_provider.is_none() {
                if let Err(why) = &tidewire::fabric::probe().chosen {
                    bail!("--transport fabric: {why}");
                }
            }
        }
        other => bail!("unknown transport {other:?} (tcp, shm, fabric or auto)"),
    }
    Ok(cfg)
}

/// The target side: a shared buffer, the raw-TCP baseline server, and a READY line.
fn run_target(args: &BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::from(args)?;
    let len = match &args.buffer_size {
        Some(s) => parse_size(s)?,
        None => plan.buffer(),
    };
    let mut cfg = engine_config(args, args.port, "auto")?;
    if MetadataUri::parse(&args.metadata)? != MetadataUri::P2p {
        cfg.name = Some(format!("bench-target-{}", std::process::id()));
    }
    let engine = Engine::new(cfg)?;
    let addr = match args.target_gpu {
        Some(d) => gpu_buffer(&engine, len, d, &args.gpu_mem)?,
        None => engine.allocate_shared(len).context("allocating the target buffer")?,
    };
    // One layout per block size over the whole buffer, for `--api paged`.
    for &block in &plan.blocks {
        if len / block > 0 {
            let name = format!("bench-{block}");
            engine
                .register_layout(&name, &[addr], len / block, block)
                .with_context(|| format!("registering the target's layout {name}"))?;
        }
    }
    let raw =
        TcpListener::bind((args.host.as_str(), 0)).context("binding the raw-tcp baseline port")?;
    let raw_addr = raw.local_addr()?;
    std::thread::spawn(move || raw_server(&raw));
    println!("READY {} {} {} {}", engine.name(), addr, len, raw_addr);
    eprintln!(
        "target {} serving {} at {addr:#x}; run:\n  tidewire bench --role initiator --peer {} --raw-addr {raw_addr}\n(stop with Ctrl-D or Ctrl-C)",
        engine.name(),
        format_size(len),
        engine.name()
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        line.clear();
    }
    Ok(())
}

/// Starts the target as a child process and runs the initiator against it.
fn run_pair(args: &BenchArgs) -> anyhow::Result<()> {
    Plan::from(args)?;
    let exe = std::env::current_exe()?;
    let mut child_args: Vec<String> = vec!["bench".into(), "--role".into(), "target".into()];
    for (flag, value) in [
        ("--host", args.host.clone()),
        ("--port", args.port.to_string()),
        ("--metadata", args.metadata.clone()),
        ("--block-size", args.block_size.join(",")),
        ("--batch-size", args.batch_size.to_string()),
        ("--threads", args.threads.to_string()),
    ] {
        child_args.push(flag.into());
        child_args.push(value);
    }
    if let Some(f) = &args.footprint {
        child_args.extend(["--footprint".into(), f.clone()]);
    }
    if let Some(d) = args.target_gpu {
        child_args.extend(["--target-gpu".into(), d.to_string()]);
        let kind = if args.gpu_mem == "pinned" { "auto" } else { args.gpu_mem.as_str() };
        child_args.extend(["--gpu-mem".into(), kind.into()]);
    }
    let mut child = Command::new(exe)
        .args(&child_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the target process")?;
    let result = (|| {
        let ready = read_ready(&mut child)?;
        run_initiator(args, Some(ready))
    })();
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    result
}

struct Ready {
    name: String,
    addr: u64,
    len: u64,
    raw: SocketAddr,
}

fn read_ready(child: &mut Child) -> anyhow::Result<Ready> {
    let stdout = child.stdout.take().context("no stdout from the target")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("the target did not start within 30 s")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            bail!("the target process exited before it was ready ({status}): {}", err.trim());
        }
    };
    if let Some(err) = child.stderr.take() {
        // Keep draining the target's stderr so it never blocks; pass on its warnings.
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if l.contains("WARN") || l.contains("ERROR") {
                    eprintln!("[target] {l}");
                }
            }
        });
    }
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [_, name, addr, len, raw] = parts.as_slice() else {
        bail!("unexpected target output {line:?}")
    };
    Ok(Ready { name: name.to_string(), addr: addr.parse()?, len: len.parse()?, raw: raw.parse()? })
}

#[derive(Default, Clone)]
struct Measure {
    bytes: u64,
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Per round: the time until `submit` returned (planning and enqueueing; for baselines,
    /// the whole round).
    submits: Vec<Duration>,
    /// Per engine round: where the batch's time went.
    phases: Vec<Timings>,
}

/// What one round reports besides its latency.
struct Stamp {
    submitted: Duration,
    phases: Option<Timings>,
}

impl Measure {
    fn merge(&mut self, other: Measure) {
        self.bytes += other.bytes;
        self.requests += other.requests;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.latencies.extend(other.latencies);
        self.submits.extend(other.submits);
        self.phases.extend(other.phases);
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }

    fn percentile_us(&mut self, p: f64) -> f64 {
        percentile_us(&mut self.latencies, p)
    }
}

fn percentile_us(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

/// Runs `round` repeatedly on `threads` threads for `duration` (after a short warm-up).
fn measure<'a, F>(
    threads: usize,
    duration: Duration,
    bytes_per_round: u64,
    reqs_per_round: u64,
    label: &str,
    make: F,
) -> anyhow::Result<Measure>
where
    F: Fn(usize) -> anyhow::Result<Round<'a>>,
{
    let rounds: Vec<_> = (0..threads).map(&make).collect::<anyhow::Result<_>>()?;
    let bar = (duration >= Duration::from_secs(2)).then(|| {
        let b = indicatif::ProgressBar::new(duration.as_millis() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg:>40} [{bar:30}] {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(label.to_string());
        b
    });
    let start_gate = Arc::new(std::sync::Barrier::new(threads));
    let results: Vec<anyhow::Result<Measure>> = std::thread::scope(|s| {
        let handles: Vec<_> = rounds
            .into_iter()
            .enumerate()
            .map(|(t, mut round)| {
                let gate = start_gate.clone();
                let bar = bar.clone();
                s.spawn(move || -> anyhow::Result<Measure> {
                    let warm = Instant::now();
                    while warm.elapsed() < Duration::from_millis(200) {
                        round()?;
                    }
                    gate.wait();
                    let mut m = Measure::default();
                    let start = Instant::now();
                    while start.elapsed() < duration {
                        let t0 = Instant::now();
                        let stamp = round()?;
                        m.latencies.push(t0.elapsed());
                        m.submits.push(stamp.submitted);
                        m.phases.extend(stamp.phases);
                        m.bytes += bytes_per_round;
                        m.requests += reqs_per_round;
                        if t == 0 {
                            if let Some(b) = &bar {
                                b.set_position(start.elapsed().as_millis() as u64);
                            }
                        }
                    }
                    m.elapsed = start.elapsed();
                    Ok(m)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a bench thread panicked"))))
            .collect()
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut total = Measure::default();
    for r in results {
        total.merge(r?);
    }
    Ok(total)
}

fn run_initiator(args: &BenchArgs, ready: Option<Ready>) -> anyhow::Result<()> {
    let plan = Plan::from(args)?;
    if args.metrics {
        tidewire::metrics::enable();
    }
    let mut cfg = engine_config(args, 0, &args.transport)?;
    if let Some(a) = &args.metrics_addr {
        cfg.metrics_addr = Some(a.clone());
    }
    let engine = Engine::new(cfg)?;
    let (peer_name, remote_base, remote_len, raw) = match ready {
        Some(r) => (r.name, Some(r.addr), Some(r.len), Some(r.raw)),
        None => {
            (args.peer.clone().context("--role initiator needs --peer")?, None, None, args.raw_addr)
        }
    };
    let peer = engine.open_segment(&peer_name)?;
    let (remote_base, remote_len) = match (remote_base, remote_len) {
        (Some(a), Some(l)) => (a, l),
        _ => {
            let d = engine.peer_descriptor(peer)?;
            let r = d.regions.first().context("the target has no registered region")?;
            (r.addr, r.len)
        }
    };
    if remote_len < plan.buffer() {
        bail!(
            "the target buffer ({}) is smaller than this run needs ({})",
            format_size(remote_len),
            format_size(plan.buffer())
        );
    }
    let span = plan.span();
    let mut hosts: Vec<Arc<HostBuffer>> = Vec::new();
    let mut local_addrs: Vec<u64> = Vec::new();
    for _ in 0..plan.threads {
        match args.gpu {
            Some(d) => local_addrs.push(gpu_buffer(&engine, span, d, &args.gpu_mem)?),
            None => {
                let b = Arc::new(HostBuffer::new(span as usize)?);
                engine.register_buffer(b.clone(), "cpu")?;
                local_addrs.push(b.addr());
                hosts.push(b);
            }
        }
    }
    if !args.json {
        println!(
            "{:<6} {:<5} {:>7} {:>6} {:>4} {:>9} {:>11} {:>9} {:>9} {:>9}  {:>9} {:>9} {:>9} {:>6}",
            "trans",
            "op",
            "block",
            "batch",
            "thr",
            "GB/s",
            "req/s",
            "p50_us",
            "p99_us",
            "sub_p50",
            "base_GB/s",
            "b_p50_us",
            "b_p99_us",
            "ratio"
        );
    }
    for &block in &plan.blocks {
        let reqs_per_round = plan.batch as u64;
        let bytes_per_round = block * reqs_per_round;
        let label = format!("{} {} x{}", format_size(block), args.op, plan.batch);
        let engine_ref = &engine;
        let locals_ref = &local_addrs;
        let transport_used = {
            let req = Request {
                op: plan.op,
                local: local_addrs[0],
                len: block,
                peer,
                remote: remote_base,
            };
            engine.submit(&[req], BatchOptions::default())?.wait()?;
            chosen_transport(&engine, peer, remote_base, local_addrs[0])
        };
        let gpu_run = args.gpu.is_some() || args.target_gpu.is_some();
        let baseline = Baseline::choose(&args.baseline, transport_used, gpu_run, raw.is_some());
        let mut m =
            measure(plan.threads, plan.duration, bytes_per_round, reqs_per_round, &label, |t| {
                let local = locals_ref[t];
                let remote = remote_base + t as u64 * span;
                let reqs: Vec<Request> = plan
                    .offsets(block)
                    .into_iter()
                    .map(|(l, r)| Request {
                        op: plan.op,
                        local: local + l,
                        len: block,
                        peer,
                        remote: remote + r,
                    })
                    .collect();
                let mine = (local, span);
                let issue = Issue::new(engine_ref, &args.api, peer, plan.op, block, t, mine, reqs)?;
                let round: Round<'_> = Box::new(move || -> anyhow::Result<Stamp> {
                    let t0 = Instant::now();
                    let batch = issue.run(engine_ref)?;
                    let submitted = t0.elapsed();
                    batch.wait()?;
                    Ok(Stamp { submitted, phases: Some(batch.timings()) })
                });
                Ok(round)
            })?;
        let base = match baseline.kind {
            Some(BaselineKind::RawTcp) => {
                let raw =
                    raw.context("--baseline raw-tcp needs the target's raw address (--raw-addr)")?;
                Some(measure(
                    plan.threads,
                    plan.duration,
                    bytes_per_round,
                    reqs_per_round,
                    "raw-tcp",
                    |_| raw_client(raw, plan.op, block, plan.batch, plan.span()),
                )?)
            }
            Some(BaselineKind::Memcpy) => Some(measure(
                plan.threads,
                plan.duration,
                bytes_per_round,
                reqs_per_round,
                "memcpy",
                |_| memcpy_round(plan.offsets(block), block, plan.span()),
            )?),
            None => None,
        };
        let name = transport_used.map_or("?", TransportKind::name);
        report(args, name, block, &plan, &mut m, &baseline, base);
    }
    if let (true, Some(m)) = (args.metrics, tidewire::metrics::get()) {
        // The counters (and histogram counts) of the run, with the warm-up batch of each
        // block size included: one request more per size than the table's rounds.
        println!("# metrics of this run (each block size's warm-up request included)");
        for line in m.render().lines() {
            let counter =
                ["tidewire_bytes_total", "tidewire_requests_total", "tidewire_batches_total"]
                    .iter()
                    .chain(&[
                        "tidewire_failures_total",
                        "tidewire_batch_seconds_count",
                        "tidewire_batch_seconds_sum",
                    ])
                    .any(|p| line.starts_with(p));
            if counter {
                println!("{line}");
            }
        }
    }
    engine.shutdown();
    drop(hosts);
    Ok(())
}

/// The transport the engine chose for requests from `local` to the remote region at `remote`.
fn chosen_transport(
    engine: &Engine,
    peer: tidewire::PeerId,
    remote: u64,
    local: u64,
) -> Option<TransportKind> {
    let info = engine.explain_from(peer, Some(local)).ok()?;
    let r = info.regions.iter().find(|r| r.region.contains(remote, 1))?;
    r.decision.as_ref().ok().map(|c| c.transport)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaselineKind {
    RawTcp,
    Memcpy,
}

impl BaselineKind {
    fn name(self) -> &'static str {
        match self {
            Self::RawTcp => "raw-tcp",
            Self::Memcpy => "memcpy",
        }
    }
}

/// Where a GPU run's ceiling is measured: no peer copy is run by this (safe-code-only) binary.
const GPU_CEILING: &str = "its ceiling, cudaMemcpyPeer, is bench/ref/peer_copy.cu, \
     which scripts/gpu-bench.sh runs in the same command";

/// What a run's ratio compares with, and why: printed next to every ratio.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Baseline {
    /// `None`: no baseline is measured.
    kind: Option<BaselineKind>,
    /// For the reader: why this baseline (or why none).
    note: String,
}

impl Baseline {
    /// The transport's own ceiling: what a perfect transport of that kind could do.
    /// The transport's own ceiling, and its name (also when this run cannot measure it).
    fn ceiling(
        transport: Option<TransportKind>,
        gpu_run: bool,
        have_raw: bool,
    ) -> (Self, &'static str) {
        const PEER_COPY: &str = "a GPU peer copy";
        let (kind, note, own) = match transport {
            _ if gpu_run => (None, format!("GPU run; {GPU_CEILING}"), PEER_COPY),
            Some(t @ (TransportKind::Nvlink | TransportKind::Mnnvl)) => {
                (None, format!("{t} is a GPU transport; {GPU_CEILING}"), PEER_COPY)
            }
            Some(TransportKind::Shm) => {
                (Some(BaselineKind::Memcpy), "same-host ceiling for shm".to_string(), "memcpy")
            }
            Some(TransportKind::Local) => {
                (Some(BaselineKind::Memcpy), "in-process ceiling for local".to_string(), "memcpy")
            }
            Some(TransportKind::Fabric) if have_raw => (
                Some(BaselineKind::RawTcp),
                "a plain TCP stream between the two processes (the ceiling of libfabric's tcp \
                 provider; an RDMA NIC's is its line rate)"
                    .to_string(),
                "raw-tcp",
            ),
            Some(TransportKind::Tcp) if have_raw => (
                Some(BaselineKind::RawTcp),
                "a plain TCP stream, the ceiling for tcp".to_string(),
                "raw-tcp",
            ),
            Some(TransportKind::Tcp) => (
                None,
                "tcp's ceiling is a raw TCP stream: give the target's --raw-addr to measure it"
                    .to_string(),
                "raw-tcp",
            ),
            Some(t) => (None, format!("no ceiling known to this bench for {t}"), "not known here"),
            None => (
                None,
                "the engine did not say which transport it chose".to_string(),
                "not known here",
            ),
        };
        (Self { kind, note }, own)
    }

    /// The baseline for `requested` (`auto`, `raw-tcp`, `memcpy` or `none`). A forced baseline
    /// that is not the transport's own ceiling says so.
    fn choose(
        requested: &str,
        transport: Option<TransportKind>,
        gpu_run: bool,
        have_raw: bool,
    ) -> Self {
        let (ceiling, own) = Self::ceiling(transport, gpu_run, have_raw);
        let forced = match requested {
            "raw-tcp" => BaselineKind::RawTcp,
            "memcpy" => BaselineKind::Memcpy,
            "none" => return Self { kind: None, note: "--baseline none".into() },
            _ => return ceiling,
        };
        if ceiling.kind == Some(forced) {
            return ceiling;
        }
        let name = transport.map_or("?", TransportKind::name);
        Self {
            kind: Some(forced),
            note: format!("chosen by --baseline, not {name}'s own ceiling, which is {own}"),
        }
    }

    /// `vs memcpy (same-host ceiling for shm)`, or `no baseline (why)`.
    fn describe(&self) -> String {
        match self.kind {
            Some(k) => format!("vs {} ({})", k.name(), self.note),
            None => format!("no baseline ({})", self.note),
        }
    }
}

/// How a thread issues its rounds (`--api`).
enum Issue {
    Submit(Vec<Request>),
    Prepared(tidewire::Plan),
    Paged {
        peer: tidewire::PeerId,
        op: Op,
        local: String,
        remote: String,
        lp: Vec<u64>,
        rp: Vec<u64>,
    },
}

impl Issue {
    /// Thread `t`'s way of issuing `reqs` (its batch of `block`-byte requests; its local
    /// buffer is `span` bytes at `base`).
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: &Engine,
        api: &str,
        peer: tidewire::PeerId,
        op: Op,
        block: u64,
        t: usize,
        (base, span): (u64, u64),
        reqs: Vec<Request>,
    ) -> anyhow::Result<Self> {
        match api {
            "prepared" => Ok(Self::Prepared(
                engine.prepare(&reqs).with_context(|| format!("preparing thread {t}'s plan"))?,
            )),
            "paged" => {
                let remote_base = engine
                    .peer_descriptor(peer)?
                    .layout(&format!("bench-{block}"))
                    .and_then(|l| l.layers.first().copied())
                    .context("the target published no bench layout for this block size")?;
                let local = format!("bench-{block}-t{t}");
                engine
                    .register_layout(&local, &[base], span / block, block)
                    .with_context(|| format!("registering thread {t}'s layout {local}"))?;
                let lp = reqs.iter().map(|r| (r.local - base) / block).collect();
                let rp = reqs.iter().map(|r| (r.remote - remote_base) / block).collect();
                Ok(Self::Paged { peer, op, local, remote: format!("bench-{block}"), lp, rp })
            }
            _ => Ok(Self::Submit(reqs)),
        }
    }

    fn run(&self, engine: &Engine) -> tidewire::Result<tidewire::BatchHandle> {
        let opts = BatchOptions::default();
        match self {
            Self::Submit(reqs) => engine.submit(reqs, opts),
            Self::Prepared(plan) => engine.execute(plan, opts),
            Self::Paged { peer, op, local, remote, lp, rp } => {
                let pages = tidewire::PageTransfer {
                    peer: *peer,
                    op: *op,
                    local,
                    remote,
                    local_pages: lp,
                    remote_pages: rp,
                };
                engine.transfer_pages(&pages, opts)
            }
        }
    }
}

fn report(
    args: &BenchArgs,
    transport: &str,
    block: u64,
    plan: &Plan,
    m: &mut Measure,
    baseline: &Baseline,
    base: Option<Measure>,
) {
    let (p50, p99) = (m.percentile_us(0.50), m.percentile_us(0.99));
    let sub_p50 = percentile_us(&mut m.submits, 0.50);
    let req_s = m.requests as f64 / m.elapsed.as_secs_f64().max(1e-9);
    let mut line = serde_json::json!({
        "transport": transport,
        "op": args.op,
        "block_size": block,
        "batch_size": plan.batch,
        "threads": plan.threads,
        "duration_s": m.elapsed.as_secs_f64(),
        "bytes": m.bytes,
        "gbps": m.gbps(),
        "req_per_s": req_s,
        "p50_us": p50,
        "p99_us": p99,
        "submit_p50_us": sub_p50,
        "api": args.api,
    });
    // Where the time of a GPU batch went (p50 of each point, from submit).
    let mut phase_cols = String::new();
    type Pick = fn(&Timings) -> Option<Duration>;
    let picks: [(&str, Pick); 4] = [
        ("planned", |t| t.planned),
        ("first_launch", |t| t.first_launch),
        ("gpu_done", |t| t.gpu_done),
        ("finished", |t| t.finished),
    ];
    for (name, pick) in picks {
        let mut v: Vec<Duration> = m.phases.iter().filter_map(pick).collect();
        if !v.is_empty() && m.phases.iter().any(|t| t.gpu_done.is_some()) {
            let p = percentile_us(&mut v, 0.50);
            line[format!("{name}_p50_us")] = p.into();
            phase_cols.push_str(&format!(" {name} {p:.1}"));
        }
    }
    line["baseline"] = baseline.kind.map_or("none", BaselineKind::name).into();
    line["baseline_note"] = baseline.note.clone().into();
    let mut base_cols = format!("  {:>9} {:>9} {:>9} {:>6}", "-", "-", "-", "-");
    if let Some(mut b) = base {
        let (bp50, bp99) = (b.percentile_us(0.50), b.percentile_us(0.99));
        let ratio = m.gbps() / b.gbps().max(1e-12);
        line["baseline_gbps"] = b.gbps().into();
        line["baseline_p50_us"] = bp50.into();
        line["baseline_p99_us"] = bp99.into();
        line["ratio"] = ratio.into();
        base_cols = format!("  {:>9.3} {:>9.1} {:>9.1} {:>6.2}", b.gbps(), bp50, bp99, ratio);
    }
    base_cols.push(' ');
    base_cols.push_str(&baseline.describe());
    if args.api != "submit" {
        base_cols.push_str(&format!("; api {}", args.api));
    }
    if args.json {
        println!("{line}");
    } else {
        println!(
            "{:<6} {:<5} {:>7} {:>6} {:>4} {:>9.3} {:>11.0} {:>9.1} {:>9.1} {:>9.1}{base_cols}",
            transport,
            args.op,
            format_size(block),
            plan.batch,
            plan.threads,
            m.gbps(),
            req_s,
            p50,
            p99,
            sub_p50
        );
        if !phase_cols.is_empty() {
            println!("    p50 µs from submit:{phase_cols}, done {p50:.1}");
        }
    }
}

/// The raw-TCP baseline server: per connection, a 16-byte header (op, bytes per round), then
/// rounds: WRITE reads the round's bytes and answers one byte; READ answers a one-byte request
/// with the round's bytes.
fn raw_server(listener: &TcpListener) {
    for stream in listener.incoming().map_while(Result::ok) {
        std::thread::spawn(move || {
            let _ = raw_serve(stream);
        });
    }
}

fn raw_serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr)?;
    let write = hdr[0] == 0;
    let mut n = [0u8; 8];
    n.copy_from_slice(&hdr[8..16]);
    let round = u64::from_le_bytes(n) as usize;
    let mut buf = vec![0u8; round.min(64 << 20)];
    loop {
        if write {
            let mut left = round;
            while left > 0 {
                let k = left.min(buf.len());
                s.read_exact(&mut buf[..k])?;
                left -= k;
            }
            s.write_all(&[1])?;
        } else {
            let mut one = [0u8; 1];
            s.read_exact(&mut one)?;
            let mut left = round;
            while left > 0 {
                let k = left.min(buf.len());
                s.write_all(&buf[..k])?;
                left -= k;
            }
        }
    }
}

/// One round of a benchmark; returns the time until its work was submitted.
type Round<'a> = Box<dyn FnMut() -> anyhow::Result<Stamp> + Send + 'a>;

/// One thread of the raw-TCP baseline. It moves the same bytes as the engine does, from and
/// into the same footprint (a distinct block of a `span`-byte buffer per request), so neither
/// side gains from a cache-hot buffer the other does not have.
fn raw_client(
    addr: SocketAddr,
    op: Op,
    block: u64,
    batch: usize,
    span: u64,
) -> anyhow::Result<Round<'static>> {
    let mut s = TcpStream::connect(addr)
        .with_context(|| format!("connecting to the raw-tcp baseline at {addr}"))?;
    s.set_nodelay(true)?;
    let round = block * batch as u64;
    let mut hdr = [0u8; 16];
    hdr[0] = u8::from(op == Op::Read);
    hdr[8..16].copy_from_slice(&round.to_le_bytes());
    s.write_all(&hdr)?;
    let block = block as usize;
    let slots = (span as usize / block).max(1);
    let mut buf = vec![7u8; slots * block];
    Ok(Box::new(move || {
        let t0 = Instant::now();
        match op {
            Op::Write => {
                for i in 0..batch {
                    let at = (i % slots) * block;
                    s.write_all(&buf[at..at + block])?;
                }
                let mut one = [0u8; 1];
                s.read_exact(&mut one)?;
            }
            Op::Read => {
                s.write_all(&[1])?;
                for i in 0..batch {
                    let at = (i % slots) * block;
                    s.read_exact(&mut buf[at..at + block])?;
                }
            }
        }
        Ok(Stamp { submitted: t0.elapsed(), phases: None })
    }))
}

/// One thread of the memcpy baseline: the batch's blocks copied between two buffers of this
/// process, at the same offsets as the engine's requests (`(source, destination)` pairs).
fn memcpy_round(offsets: Vec<(u64, u64)>, block: u64, span: u64) -> anyhow::Result<Round<'static>> {
    let block = usize::try_from(block)?;
    let span = usize::try_from(span)?;
    let mut at = Vec::with_capacity(offsets.len());
    for (s, d) in offsets {
        let (s, d) = (usize::try_from(s)?, usize::try_from(d)?);
        if !matches!(s.max(d).checked_add(block), Some(end) if end <= span) {
            bail!("memcpy baseline: block at {s:#x}/{d:#x} outside the {span}-byte footprint");
        }
        at.push((s, d));
    }
    let src = vec![3u8; span];
    let mut dst = vec![0u8; span];
    Ok(Box::new(move || {
        let t0 = Instant::now();
        for &(s, d) in &at {
            dst[d..d + block].copy_from_slice(&src[s..s + block]);
        }
        std::hint::black_box(&dst);
        Ok(Stamp { submitted: t0.elapsed(), phases: None })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_baseline_is_the_transports_own_ceiling() {
        let shm = Baseline::choose("auto", Some(TransportKind::Shm), false, true);
        assert_eq!(shm.kind, Some(BaselineKind::Memcpy));
        assert_eq!(shm.describe(), "vs memcpy (same-host ceiling for shm)");
        let tcp = Baseline::choose("auto", Some(TransportKind::Tcp), false, true);
        assert_eq!(tcp.kind, Some(BaselineKind::RawTcp));
        let no_raw = Baseline::choose("auto", Some(TransportKind::Tcp), false, false);
        assert_eq!(no_raw.kind, None);
        assert!(no_raw.describe().contains("--raw-addr"), "{no_raw:?}");
        for gpu in [
            Baseline::choose("auto", Some(TransportKind::Nvlink), true, true),
            Baseline::choose("auto", Some(TransportKind::Mnnvl), false, true),
        ] {
            assert_eq!(gpu.kind, None);
            assert!(gpu.describe().starts_with("no baseline ("), "{gpu:?}");
            assert!(gpu.note.contains("bench/ref/peer_copy.cu"), "{gpu:?}");
        }
    }

    #[test]
    fn a_forced_baseline_says_when_it_is_not_the_ceiling() {
        let b = Baseline::choose("raw-tcp", Some(TransportKind::Shm), false, true);
        assert_eq!(b.kind, Some(BaselineKind::RawTcp));
        assert_eq!(
            b.describe(),
            "vs raw-tcp (chosen by --baseline, not shm's own ceiling, which is memcpy)"
        );
        let same = Baseline::choose("memcpy", Some(TransportKind::Shm), false, true);
        assert_eq!(same, Baseline::choose("auto", Some(TransportKind::Shm), false, true));
        let none = Baseline::choose("none", Some(TransportKind::Tcp), false, true);
        assert_eq!(none.kind, None);
    }

    #[test]
    fn memcpy_rounds_stay_inside_the_footprint() {
        assert!(memcpy_round(vec![(0, 4096)], 4096, 8192).is_ok());
        assert!(memcpy_round(vec![(0, 4097)], 4096, 8192).is_err());
        assert!(memcpy_round(vec![(u64::MAX, 0)], 4096, 8192).is_err());
    }
}
