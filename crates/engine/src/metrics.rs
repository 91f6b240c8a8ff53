//! What operators see: Prometheus metrics of the engine, the EP buffer and the collectives,
//! one registry per process (`prometheus-client`, OpenMetrics text), served over HTTP when
//! asked for (`TIDEWIRE_METRICS_ADDR`, [`serve`]) and recorded only from then on ([`enable`]):
//! with metrics off, a batch pays one atomic load.
//!
//! Engine: bytes, requests and failures (by error kind) by transport, operation and peer;
//! batches by outcome; batch latency and submit → first byte (a GPU launch, a frame handed to a
//! tcp lane, an RMA post, a memory copy) by transport; open peers, mappings held per peer,
//! registered bytes by memory kind and the engines' threads, read when scraped. EP: dispatch
//! and combine calls, source ranks its kernels marked inactive, active ranks per buffer (read
//! from host-mapped counters the kernels add to, when scraped). Collectives: calls by operation
//! and algorithm, bytes, failures, the membership's epoch and size. Peer labels are bounded:
//! past `TIDEWIRE_METRICS_MAX_PEERS` (default 64) distinct peers, new ones fold into `other`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tidewire_core::select::TransportKind;

use crate::engine::Inner;
use crate::error::{Error, Result};

/// Label sets: (name, value) pairs.
pub type L1 = [(&'static str, String); 1];
pub type L2 = [(&'static str, String); 2];
pub type L3 = [(&'static str, String); 3];

/// A histogram family of latencies in seconds, 1 µs to ≈ 67 s.
type Latency = Family<L1, Histogram, fn() -> Histogram>;

/// Buckets of [`Histogram`]: upper bounds 1 µs × 2^i.
const BUCKETS: usize = 27;

/// A latency histogram whose observation is two relaxed atomic adds (the bucket found from
/// the value's leading zeros): `prometheus-client`'s takes a lock and scans its buckets, on
/// the completion thread inside the batch's lock (with this one the metrics' cost at 4 KiB × 1
/// over shm on the dev VM went from ≈ 7 % to ≈ 3 %: bench/NOTES.md §28). Buckets 1 µs to
/// ≈ 67 s, doubling; encoded as a Prometheus histogram in seconds.
#[derive(Clone, Default, Debug)]
pub(crate) struct Histogram(Arc<HistogramInner>);

#[derive(Default, Debug)]
pub(crate) struct HistogramInner {
    buckets: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records a latency of `ns` nanoseconds.
    pub(crate) fn observe_ns(&self, ns: u64) {
        use Ordering::Relaxed;
        // Bucket i holds (1 µs × 2^(i-1), 1 µs × 2^i]; bucket 0 everything up to 1 µs; the
        // last, past the largest bound (+Inf).
        let us = ns.div_ceil(1000);
        let i = if us <= 1 { 0 } else { (64 - (us - 1).leading_zeros()) as usize };
        self.0.buckets[i.min(BUCKETS)].fetch_add(1, Relaxed);
        self.0.sum_ns.fetch_add(ns, Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::result::Result<(), std::fmt::Error> {
        use Ordering::Relaxed;
        let counts: Vec<u64> = self.0.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let mut buckets: Vec<(f64, u64)> =
            (0..BUCKETS).map(|i| (1e-6 * f64::from(1u32 << i), counts[i])).collect();
        buckets.push((f64::MAX, counts[BUCKETS]));
        let count = counts.iter().sum();
        let sum = self.0.sum_ns.load(Relaxed) as f64 * 1e-9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Distinct peers that get their own label value.
const DEFAULT_MAX_PEERS: usize = 64;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Bytes moved by requests that completed: transport, op, peer.
    pub(crate) bytes: Family<L3, Counter>,
    /// Requests that completed: transport, op, peer.
    pub(crate) requests: Family<L3, Counter>,
    /// Requests that failed: kind (the error's), transport, peer.
    pub(crate) failures: Family<L3, Counter>,
    /// Batches by outcome (`ok`, `failed`).
    pub(crate) batches: Family<L1, Counter>,
    /// Submit to the batch's end, by the transport of its first run.
    pub(crate) batch_seconds: Latency,
    /// Submit to the first byte on its way, by transport.
    pub(crate) first_byte_seconds: Latency,
    open_peers: Gauge,
    mappings: Family<L1, Gauge>,
    registered_bytes: Family<L1, Gauge>,
    threads: Gauge,
    /// EP dispatch / combine calls (`op`).
    pub ep_calls: Family<L1, Counter>,
    /// Source ranks the EP kernels marked inactive (deadline passed, process died), by
    /// `source_rank`; read from the buffers' host-mapped counters when scraped.
    pub ep_rank_timeouts: Family<L1, Counter>,
    /// Per EP buffer (`rank`: its own): the ranks its kernels have not marked inactive since
    /// it was built or last re-exchanged.
    pub ep_active_ranks: Family<L1, Gauge>,
    /// Collective calls by operation and algorithm.
    pub coll_calls: Family<L2, Counter>,
    /// Collective bytes (of this rank's input) by operation.
    pub coll_bytes: Family<L1, Counter>,
    /// Collective calls that failed, by operation and error kind.
    pub coll_failures: Family<L2, Counter>,
    /// The membership's epoch and size as the last call saw them.
    pub coll_epoch: Gauge,
    pub coll_size: Gauge,
    peers: Mutex<PeerLabels>,
    /// Handles of the hot counters, so a batch pays atomic adds, not label hashing: the
    /// (transport, op, peer label) of a run → its requests and bytes counters. Handed out as
    /// `&'static` (leaked once per key, bounded with the peer labels), so a batch touches no
    /// reference count on the lines the completion thread adds to (the GPU host showed no
    /// difference either way within its noise: bench/NOTES.md §28).
    runs: RwLock<Vec<(RunKey, &'static RunCounters)>>,
    /// Per transport (indexed by `TransportKind as usize`): its batch latency and first-byte
    /// histograms, made at its first batch.
    latencies: [OnceLock<(Histogram, Histogram)>; TransportKind::ALL.len()],
    ok: Counter,
    failed: Counter,
    /// Batches that succeeded and whose counts are being added, in two halves: a batch is
    /// counted after its lock is released (its waiter does not wait for the counting), and
    /// announces itself first, before its outcome is visible, in the half `epoch` names. A
    /// scrape moves `epoch` on and waits for the other half to drain: every batch a caller
    /// saw finish before the scrape began is then counted, and batches announced meanwhile
    /// do not keep it waiting.
    counting: [AtomicUsize; 2],
    epoch: AtomicUsize,
}

type RunKey = (TransportKind, RunOp, &'static str);

/// What a run of requests does, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunOp {
    Write,
    Read,
    /// Writes and reads in one run.
    Mixed,
}

impl RunOp {
    /// Every operation (`RunOp as usize` indexes it).
    pub(crate) const ALL: [RunOp; 3] = [Self::Write, Self::Read, Self::Mixed];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Read => "read",
            Self::Mixed => "mixed",
        }
    }
}

// Arrays indexed by `TransportKind as usize` and `RunOp as usize` (the latency histograms, a
// peer's run counters) rely on `ALL` listing every variant in declaration order.
const _: () = {
    let mut i = 0;
    while i < TransportKind::ALL.len() {
        assert!(TransportKind::ALL[i] as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < RunOp::ALL.len() {
        assert!(RunOp::ALL[i] as usize == i);
        i += 1;
    }
};

/// The counters a run of a batch adds to.
pub(crate) struct RunCounters {
    pub(crate) requests: Counter,
    pub(crate) bytes: Counter,
}

/// State read when the metrics are scraped (an EP buffer's host-mapped counters).
pub trait Scrape: Send + Sync {
    /// Adds what changed since the last scrape to `m` (and sets its gauges).
    fn scrape(&self, m: &Metrics);
}

/// The sources read at every scrape (dropped ones are forgotten).
static SOURCES: Mutex<Vec<Weak<dyn Scrape>>> = Mutex::new(Vec::new());

/// Reads `source` at every scrape while it lives.
pub fn watch(source: Weak<dyn Scrape>) {
    let mut s = SOURCES.lock();
    s.retain(|w| w.strong_count() > 0);
    s.push(source);
}

/// The engines of this process, whose state the gauges read when scraped.
static ENGINES: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

/// Adds an engine to those the gauges read.
pub(crate) fn watch_engine(inner: &Arc<Inner>) {
    let mut e = ENGINES.lock();
    e.retain(|w| w.strong_count() > 0);
    e.push(Arc::downgrade(inner));
}

/// Peer names → label values, bounded (each value leaked once: at most `max` of them).
struct PeerLabels {
    max: usize,
    known: HashMap<String, &'static str>,
}

impl PeerLabels {
    fn label(&mut self, name: &str) -> &'static str {
        if let Some(l) = self.known.get(name) {
            return l;
        }
        if self.known.len() >= self.max {
            return "other";
        }
        let l: &'static str = Box::leak(name.to_string().into_boxed_str());
        self.known.insert(name.to_string(), l);
        l
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, when recording is on.
pub fn get() -> Option<&'static Metrics> {
    METRICS.get()
}

/// Turns recording on (idempotent) and returns the metrics.
pub fn enable() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let max = std::env::var("TIDEWIRE_METRICS_MAX_PEERS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_PEERS);
        Metrics::new(max)
    })
}

impl Metrics {
    /// A batch that succeeded announces its counting (under its lock, before its outcome is
    /// visible); returns the half to give back to [`Metrics::counted`].
    pub(crate) fn counting(&self) -> usize {
        use Ordering::SeqCst;
        loop {
            let epoch = self.epoch.load(SeqCst);
            let half = epoch & 1;
            self.counting[half].fetch_add(1, SeqCst);
            // Still the same epoch: a scrape that moves it on from here waits for this half.
            if self.epoch.load(SeqCst) == epoch {
                return half;
            }
            // A scrape moved on between the two loads and may have found this half drained
            // before our announcement: announce in the new half instead.
            self.counting[half].fetch_sub(1, SeqCst);
        }
    }

    /// The batch announced in `half` is counted.
    pub(crate) fn counted(&self, half: usize) {
        self.counting[half & 1].fetch_sub(1, Ordering::Release);
    }

    fn new(max_peers: usize) -> Self {
        let mut r = Registry::with_prefix("tidewire");
        let m = Self {
            bytes: Family::default(),
            requests: Family::default(),
            failures: Family::default(),
            batches: Family::default(),
            batch_seconds: Family::new_with_constructor(Histogram::default),
            first_byte_seconds: Family::new_with_constructor(Histogram::default),
            open_peers: Gauge::default(),
            mappings: Family::default(),
            registered_bytes: Family::default(),
            threads: Gauge::default(),
            ep_calls: Family::default(),
            ep_rank_timeouts: Family::default(),
            ep_active_ranks: Family::default(),
            coll_calls: Family::default(),
            coll_bytes: Family::default(),
            coll_failures: Family::default(),
            coll_epoch: Gauge::default(),
            coll_size: Gauge::default(),
            peers: Mutex::new(PeerLabels { max: max_peers, known: HashMap::new() }),
            runs: RwLock::default(),
            latencies: Default::default(),
            ok: Counter::default(),
            failed: Counter::default(),
            counting: Default::default(),
            epoch: AtomicUsize::new(0),
            registry: Registry::default(),
        };
        r.register("bytes", "Bytes of completed requests", m.bytes.clone());
        r.register("requests", "Completed requests", m.requests.clone());
        r.register("failures", "Failed requests, by error kind", m.failures.clone());
        r.register("batches", "Finished batches, by outcome", m.batches.clone());
        r.register("batch_seconds", "Submit to the end of a batch", m.batch_seconds.clone());
        r.register(
            "first_byte_seconds",
            "Submit to a batch's first byte on its way (GPU launch, tcp lane, RMA post, copy)",
            m.first_byte_seconds.clone(),
        );
        r.register("open_peers", "Peers opened and usable", m.open_peers.clone());
        r.register("mappings", "Mappings of a peer's memory held here", m.mappings.clone());
        r.register(
            "registered_bytes",
            "Registered memory, by memory kind",
            m.registered_bytes.clone(),
        );
        r.register("threads", "Threads the engines started", m.threads.clone());
        r.register("ep_calls", "EP dispatch and combine calls", m.ep_calls.clone());
        r.register(
            "ep_rank_timeouts",
            "Source ranks the EP kernels marked inactive (deadline passed or process died)",
            m.ep_rank_timeouts.clone(),
        );
        r.register(
            "ep_active_ranks",
            "Ranks an EP buffer's kernels still count as active",
            m.ep_active_ranks.clone(),
        );
        r.register(
            "coll_calls",
            "Collective calls, by operation and algorithm",
            m.coll_calls.clone(),
        );
        r.register("coll_bytes", "Collective input bytes, by operation", m.coll_bytes.clone());
        r.register("coll_failures", "Collective calls that failed", m.coll_failures.clone());
        r.register("coll_epoch", "The collective membership's epoch", m.coll_epoch.clone());
        r.register("coll_size", "Active ranks of the collective membership", m.coll_size.clone());
        let ok = m.batches.get_or_create(&[("outcome", "ok".into())]).clone();
        let failed = m.batches.get_or_create(&[("outcome", "failed".into())]).clone();
        Self { registry: r, ok, failed, ..m }
    }

    /// The label value of peer `name` (bounded: `other` past the limit).
    pub(crate) fn peer(&self, name: &str) -> &'static str {
        self.peers.lock().label(name)
    }

    /// The counters of runs on `transport` of `op` to the peer labelled `peer`.
    pub(crate) fn run_counters(
        &self,
        transport: TransportKind,
        op: RunOp,
        peer: &'static str,
    ) -> &'static RunCounters {
        let hit = |runs: &[(RunKey, &'static RunCounters)]| {
            runs.iter()
                .find(|((t, o, p), _)| *t == transport && *o == op && std::ptr::eq(*p, peer))
                .map(|(_, c)| *c)
        };
        if let Some(c) = hit(&self.runs.read()) {
            return c;
        }
        let mut runs = self.runs.write();
        if let Some(c) = hit(&runs) {
            return c;
        }
        let labels = [
            ("transport", transport.name().into()),
            ("op", op.name().into()),
            ("peer", peer.to_string()),
        ];
        let c: &'static RunCounters = Box::leak(Box::new(RunCounters {
            requests: self.requests.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
        }));
        runs.push(((transport, op, peer), c));
        c
    }

    /// Counts a finished batch: its outcome, its latency and its first byte's (`None`: not
    /// reached), under `transport`.
    pub(crate) fn batch_done(
        &self,
        transport: TransportKind,
        ok: bool,
        ns: u64,
        first_ns: Option<u64>,
    ) {
        if ok { &self.ok } else { &self.failed }.inc();
        let (total, first_byte) = self.latencies[transport as usize].get_or_init(|| {
            let label = [("transport", transport.name().to_string())];
            (
                self.batch_seconds.get_or_create(&label).clone(),
                self.first_byte_seconds.get_or_create(&label).clone(),
            )
        });
        total.observe_ns(ns);
        if let Some(f) = first_ns {
            first_byte.observe_ns(f);
        }
    }

    /// The gauges read now from every live engine, then every metric in OpenMetrics text.
    pub fn render(&self) -> String {
        // One render at a time: the gauges are rebuilt (cleared, then summed) in place.
        static RENDERING: Mutex<()> = Mutex::new(());
        let _one = RENDERING.lock();
        // Every batch whose outcome a caller has seen is in the counts (its counting ends
        // within a microsecond; the bound only keeps a scrape from waiting on a stalled thread).
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while self.counting[old].load(Ordering::SeqCst) != 0 && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
        let engines: Vec<Arc<Inner>> = ENGINES.lock().iter().filter_map(Weak::upgrade).collect();
        self.mappings.clear();
        self.registered_bytes.clear();
        let (mut open, mut threads) = (0i64, 0i64);
        let mut kinds: HashMap<String, i64> = HashMap::new();
        for inner in &engines {
            for p in inner.peers() {
                if p.state == crate::engine::PeerState::Open {
                    open += 1;
                }
                let label = self.peer(&p.name).to_string();
                self.mappings.get_or_create(&[("peer", label)]).inc_by(p.mappings as i64);
            }
            for r in inner.registry.snapshot().1 {
                *kinds.entry(r.location.kind.to_string()).or_default() += r.len as i64;
            }
            threads += inner.life.thread_count() as i64;
        }
        for (kind, bytes) in kinds {
            self.registered_bytes.get_or_create(&[("kind", kind)]).set(bytes);
        }
        self.open_peers.set(open);
        self.threads.set(threads);
        self.ep_active_ranks.clear();
        let sources: Vec<Arc<dyn Scrape>> =
            SOURCES.lock().iter().filter_map(Weak::upgrade).collect();
        for s in sources {
            s.scrape(self);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# encoding the metrics failed\n");
        }
        out
    }
}

/// Where the endpoint of this process listens, once started.
static SERVED: OnceLock<SocketAddr> = OnceLock::new();

/// Starts the metrics endpoint on `addr` (`host:port`; port 0 picks one) and turns recording
/// on; returns the bound address. Once per process: a later call with another address is an
/// error naming the one in use; a taken port is an error naming it.
pub fn serve(addr: &str) -> Result<SocketAddr> {
    static START: Mutex<()> = Mutex::new(());
    let _one = START.lock();
    if let Some(a) = SERVED.get() {
        let same = addr.parse::<SocketAddr>().is_ok_and(|w| w == *a || w.port() == 0);
        return if same {
            Ok(*a)
        } else {
            Err(Error::Config {
                reason: format!("the metrics endpoint already listens on {a} (asked for {addr})"),
            })
        };
    }
    let listener = std::net::TcpListener::bind(addr).map_err(|e| Error::Bind {
        addr: addr.to_string(),
        reason: format!("the metrics endpoint (TIDEWIRE_METRICS_ADDR): {e}"),
    })?;
    let bound = listener.local_addr().map_err(|e| Error::io("reading the metrics address", &e))?;
    let server = tiny_http::Server::from_listener(listener, None).map_err(|e| Error::Bind {
        addr: addr.to_string(),
        reason: format!("the metrics endpoint: {e}"),
    })?;
    let metrics = enable();
    std::thread::Builder::new()
        .name("tw-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (code, body) = match req.url() {
                    "/metrics" => (200, metrics.render()),
                    _ => (404, "metrics are at /metrics\n".to_string()),
                };
                let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
                if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", ct) {
                    resp = resp.with_header(h);
                }
                if let Err(e) = req.respond(resp) {
                    log::debug!("metrics: answering a scrape: {e}");
                }
            }
        })
        .map_err(|e| Error::io("starting the metrics thread", &e))?;
    let _ = SERVED.set(bound);
    log::info!("metrics served on http://{bound}/metrics");
    Ok(bound)
}

/// Where the endpoint listens, if it was started.
pub fn served() -> Option<SocketAddr> {
    SERVED.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test of this binary that starts the endpoint (it is the process's).
    #[test]
    fn a_taken_port_is_a_clear_error_then_the_endpoint_serves_and_stays_one() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let addr = taken.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let cfg = crate::EngineConfig {
            port: Some(0),
            metrics_addr: Some(addr.clone()),
            ..Default::default()
        };
        let err = crate::Engine::new(cfg).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(&addr) && err.contains("metrics endpoint"), "{err}");
        let bound = serve("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(served(), Some(bound));
        assert_eq!(serve("127.0.0.1:0").ok(), Some(bound), "port 0 reuses the one endpoint");
        let other = serve(&addr).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(other.contains("already listens on"), "{other}");
        let text = ureq::get(&format!("http://{bound}/metrics"))
            .call()
            .unwrap_or_else(|e| panic!("{e}"))
            .into_string()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.contains("# TYPE tidewire_bytes counter") && text.ends_with("# EOF\n"));
    }

    #[test]
    fn latencies_land_in_their_doubling_buckets_and_encode_cumulatively() {
        let h = Histogram::default();
        for ns in [500, 1000, 1001, 2000, 3_000_000, 200_000_000_000] {
            h.observe_ns(ns);
        }
        let mut r = Registry::default();
        r.register("lat", "test", h);
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        let line = |le: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("lat_bucket{{le=\"{le}\"}}")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        // ≤ 1 µs: 500 ns and 1 µs; ≤ 2 µs: + 1.001 µs, 2 µs; ≤ 4.096 ms: + 3 ms; +Inf: 200 s.
        assert_eq!(line("0.000001").as_deref(), Some("2"), "{text}");
        assert_eq!(line("0.000002").as_deref(), Some("4"), "{text}");
        assert_eq!(line("0.004096").as_deref(), Some("5"), "{text}");
        assert_eq!(line("+Inf").as_deref(), Some("6"), "{text}");
        assert!(text.contains("lat_count 6"), "{text}");
    }

    #[test]
    fn a_thousand_peers_fold_into_the_limit_and_other() {
        let mut p = PeerLabels { max: 64, known: HashMap::new() };
        let labels: std::collections::HashSet<&str> =
            (0..1000).map(|i| p.label(&format!("10.0.{}.{}:15000", i / 256, i % 256))).collect();
        assert_eq!(labels.len(), 65, "64 peers and `other`");
        assert!(labels.contains("other"));
        assert_eq!(p.label("10.0.0.0:15000"), "10.0.0.0:15000", "a known peer keeps its label");
    }
}
