//! `tidewire info`: this host, its transports, and per peer region the transport and why.

use anyhow::Context;
use tidewire::core::select::describe_refusals;
use tidewire::{Engine, EngineConfig, MetadataUri};

#[derive(clap::Args)]
pub(crate) struct InfoArgs {
    /// A peer segment to explain (`host:port` in p2p mode, or a name with --metadata).
    #[arg(long)]
    peer: Option<String>,
    /// Metadata backend: `p2p` (default) or `http://host:port/metadata`.
    #[arg(long, default_value = "p2p")]
    metadata: String,
    /// Address to bind this probe engine to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
}

pub(crate) fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let cfg = EngineConfig {
        host: args.host.clone(),
        port: Some(0),
        metadata: MetadataUri::parse(&args.metadata)?,
        name: Some(format!("tidewire-info-{}", std::process::id())),
        ..EngineConfig::default()
    }
    .from_env()?;
    let engine = Engine::new(cfg).context("starting a probe engine")?;
    let me = engine.descriptor();
    println!("host        {} (host id {})", me.hostname, me.host_id);
    println!("engine      {} rpc {} instance {}", me.name, me.rpc_addr, me.instance_id);
    let opts = &engine.config().transports;
    let enabled: Vec<&str> = opts.enabled.iter().map(|t| t.name()).collect();
    println!(
        "transports  enabled: {}{}",
        enabled.join(", "),
        if opts.force_tcp { " (MC_FORCE_TCP set)" } else { "" }
    );
    println!("  local     yes — same-engine copies");
    match engine.shm_status() {
        Ok(()) => println!(
            "  shm       yes — memfd regions served on @{}",
            me.shm_socket.unwrap_or_default()
        ),
        Err(reason) => println!("  shm       no — {reason}"),
    }
    println!("  tcp       yes — {}", me.rpc_addr);
    match tidewire_gpu::probe() {
        Ok(r) => println!("  gpu       {} device(s)", r.devices),
        Err(u) => println!("  nvlink    no — GPU {u}\n  mnnvl     no — GPU {u}"),
    }
    let Some(peer) = &args.peer else {
        return Ok(());
    };
    let id = engine.open_segment(peer).with_context(|| format!("opening peer {peer}"))?;
    let info = engine.explain(id)?;
    let d = &info.descriptor;
    println!(
        "\npeer        {} rpc {} instance {} host {}",
        d.name, d.rpc_addr, d.instance_id, d.hostname
    );
    println!("            same host: {}, same engine: {}", info.same_host, info.same_engine);
    if info.regions.is_empty() {
        println!("            no registered regions");
    }
    for r in &info.regions {
        let reg = &r.region;
        print!("  {} [{:#x}, +{}) {}: ", reg.id, reg.addr, reg.len, reg.location);
        match &r.decision {
            Ok(c) => println!("{} — {}", c.transport, c.reason),
            Err(refusals) => println!("unreachable — {}", describe_refusals(refusals)),
        }
    }
    Ok(())
}
