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

/// libfabric's providers for RMA across hosts, which one the fabric transport uses, its NICs
/// and which NICs each GPU's and NUMA node's buffers use.
fn print_fabric(engine: &Engine) {
    let probe = tidewire::fabric::probe();
    let (major, minor) = match &probe.library {
        Ok(v) => *v,
        Err(why) => {
            println!("  fabric    no — {why}");
            return;
        }
    };
    // Each provider with its domains (NICs / interfaces), in the order libfabric ranks them.
    let mut by_provider: Vec<(String, Vec<String>)> = Vec::new();
    for p in &probe.providers {
        match by_provider.iter_mut().find(|(n, _)| *n == p.name) {
            Some((_, domains)) if !domains.contains(&p.domain) => domains.push(p.domain.clone()),
            Some(_) => {}
            None => by_provider.push((p.name.clone(), vec![p.domain.clone()])),
        }
    }
    let offered: Vec<String> =
        by_provider.iter().map(|(n, d)| format!("{n} ({})", d.join(", "))).collect();
    println!(
        "  fabric    libfabric {major}.{minor}, RMA providers: {}",
        if offered.is_empty() { "none".to_string() } else { offered.join("; ") }
    );
    match engine.fabric_map() {
        Ok(m) => {
            let gpu = if m.hmem { "host and GPU memory (FI_HMEM)" } else { "host memory" };
            println!("            yes — {} for {gpu}, across hosts before tcp", m.provider);
            for (nic, place) in &m.nics {
                println!("            nic {nic} at {place}");
            }
            if m.nics.len() > 1 {
                println!(
                    "            (TIDEWIRE_FABRIC_NICS names the NICs to use; by default every NIC of an RDMA provider)"
                );
            }
            for (buffer, nics) in &m.buffers {
                println!("            {buffer} → {}", nics.join(", "));
            }
        }
        Err(why) => println!("            not used — {why}"),
    }
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
    match engine.cluster_secret_fingerprint() {
        Some(f) => println!(
            "security    cluster secret in force (fingerprint {f}): every connection proves it"
        ),
        None => println!(
            "security    no cluster secret: whoever reaches the RPC port can use registered \
             memory (TIDEWIRE_CLUSTER_SECRET or TIDEWIRE_CLUSTER_SECRET_FILE sets one)"
        ),
    }
    println!(
        "            shm socket: {}",
        if engine.config().shm_any_uid {
            "processes of any uid (TIDEWIRE_SHM_ANY_UID=1)"
        } else {
            "processes of this uid only"
        }
    );
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
    print_fabric(&engine);
    print_gpus();
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

/// GPUs, their links and fabric evidence, and per GPU pair the NVLink decision and why.
fn print_gpus() {
    let topo = match tidewire_gpu::topology() {
        Ok(t) => t,
        Err(u) => {
            println!("  nvlink    no — GPU {u}");
            println!("  mnnvl     no — GPU {u}");
            return;
        }
    };
    let v = topo.driver_version;
    println!("gpus        {} (CUDA driver {}.{})", topo.gpus.len(), v / 1000, v % 1000 / 10);
    if let Some(e) = &topo.nvml_error {
        println!("            NVML unavailable: {e}");
    }
    for g in &topo.gpus {
        let numa = g.numa_node.map_or("?".into(), |n| n.to_string());
        let links = g.nvlinks.map_or("?".into(), |n| n.to_string());
        println!(
            "  gpu {}     {} {} pci {} numa {numa} nvlinks {links}",
            g.index, g.name, g.uuid, g.pci_bus_id
        );
        println!(
            "            vmm {} posix-fd {} fabric-attr {} gdr {}",
            g.vmm, g.posix_fd, g.fabric_attr, g.gpu_direct_rdma
        );
        let f = &g.fabric;
        let uuid: String = f.cluster_uuid.iter().map(|b| format!("{b:02x}")).collect();
        println!(
            "            nvml fabric state {:?} status {} cluster {uuid} clique {} imex-channels {}",
            f.state, f.status, f.clique_id, f.imex_channels
        );
        match f.local_verdict() {
            Ok(()) => println!(
                "            mnnvl: yes — fabric proven (NVML completed, FABRIC handle exported)"
            ),
            Err(why) => println!("            mnnvl: no — {why}"),
        }
    }
    for (i, row) in topo.peer_access.iter().enumerate() {
        for (j, &can) in row.iter().enumerate() {
            if i != j {
                if can {
                    println!(
                        "  gpu {i} -> gpu {j}: nvlink: yes — peer access; CUDA IPC and VMM \
                         POSIX-FD memory of a same-host peer on gpu {j} is mapped by gpu {i}"
                    );
                } else {
                    println!("  gpu {i} -> gpu {j}: nvlink: no — no peer access");
                }
            }
        }
    }
    match tidewire::gpu::Gpu::get(0) {
        Ok(g) => match tidewire::gpu::copy::kernel_status(g) {
            Ok(()) => println!(
                "  gather kernel: ready (NVRTC) — batches of small or scattered runs take one launch"
            ),
            Err(why) => println!(
                "  gather kernel: no — {why}; the copy engine serves every run (one copy per run)"
            ),
        },
        Err(e) => println!("  gather kernel: no — {e}"),
    }
}
