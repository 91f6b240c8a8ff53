//! `tidewire bench-metadata`: how long opening a segment takes with many engines published.
//!
//! Publishes `--segments` simulated engines' descriptors (one region each, distinct instance
//! ids) through a metadata client, then a real engine opens each once: one lookup per open.
//! Prints p50 / p99 / mean open latency, and removes what it published.

use std::time::{Duration, Instant};

use anyhow::Context;
use tidewire::core::descriptor::{Reach, RegionDescriptor, SegmentDescriptor, DESCRIPTOR_VERSION};
use tidewire::core::memory::{Location, MemoryKind};
use tidewire::core::{HostId, InstanceId, RegionId};
use tidewire::{Deadlines, Engine, EngineConfig, MetadataClient, MetadataUri};

#[derive(clap::Args)]
pub(crate) struct BenchMetadataArgs {
    /// `etcd://host:port[,...]`, `redis://host:port` or `http://host:port/metadata`.
    #[arg(long)]
    metadata: String,
    /// Simulated engines to publish.
    #[arg(long, default_value_t = 1000)]
    segments: usize,
    /// One JSON line instead of a table.
    #[arg(long)]
    json: bool,
}

fn simulated(i: usize) -> SegmentDescriptor {
    SegmentDescriptor {
        version: DESCRIPTOR_VERSION,
        name: format!("sim-{i:05}"),
        instance_id: InstanceId(0x5151_0000_0000_0000 + i as u128),
        host_id: HostId(format!("sim-host-{}", i % 64)),
        hostname: format!("node{}", i % 64),
        rpc_addr: format!("10.0.{}.{}:{}", (i / 250) % 250, i % 250 + 1, 15000 + i % 2000),
        shm_socket: None,
        generation: 1,
        regions: vec![RegionDescriptor {
            id: RegionId(1),
            addr: 0x7f00_0000_0000 + (i as u64) * (1 << 30),
            len: 1 << 30,
            location: Location { kind: MemoryKind::HostPageable, device: None },
            reach: vec![Reach::Tcp],
        }],
        layouts: Vec::new(),
    }
}

pub(crate) fn run(args: &BenchMetadataArgs) -> anyhow::Result<()> {
    let uri = MetadataUri::parse(&args.metadata)?;
    let cfg = EngineConfig {
        port: Some(0),
        metadata: uri.clone(),
        name: Some("bench-metadata-reader".into()),
        ..EngineConfig::default()
    }
    .from_env()?;
    let client = MetadataClient::connect(
        &uri,
        &cfg.cluster_id,
        Duration::from_secs(120),
        &Deadlines::default(),
    )?;
    let t0 = Instant::now();
    for i in 0..args.segments {
        client
            .publish(&simulated(i))
            .with_context(|| format!("publishing simulated segment {i}"))?;
    }
    let publish = t0.elapsed();
    let engine = Engine::new(cfg)?;
    let mut lat = Vec::with_capacity(args.segments);
    for i in 0..args.segments {
        let name = format!("sim-{i:05}");
        let t = Instant::now();
        let id = engine.open_segment(&name).with_context(|| format!("opening {name}"))?;
        lat.push(t.elapsed());
        let d = engine.peer_descriptor(id)?;
        anyhow::ensure!(d.instance_id == simulated(i).instance_id, "{name}: wrong descriptor");
    }
    engine.shutdown();
    for i in 0..args.segments {
        let _ = client.unpublish(&format!("sim-{i:05}"));
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    let mean = lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len() as f64 * 1e6;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"metadata": args.metadata, "segments": args.segments, "open_p50_us": pct(0.5),
                "open_p99_us": pct(0.99), "open_mean_us": mean, "publish_s": publish.as_secs_f64()})
        );
    } else {
        println!(
            "metadata {}: {} segments published in {:.2} s",
            args.metadata,
            args.segments,
            publish.as_secs_f64()
        );
        println!(
            "open_segment (one lookup each): p50 {:.0} us, p99 {:.0} us, mean {:.0} us",
            pct(0.5),
            pct(0.99),
            mean
        );
    }
    Ok(())
}
