//! `tidewire`: benchmark the engine, explain its transport choices, run a metadata server.
#![forbid(unsafe_code)]

mod bench;
mod bench_metadata;
mod info;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tidewire", version, about = "tidewire transfer engine tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure transfers between two engines (two processes), with a baseline.
    Bench(Box<bench::BenchArgs>),
    /// Open-segment latency with many engines published in a metadata store.
    BenchMetadata(bench_metadata::BenchMetadataArgs),
    /// Show this host, its transports, and for --peer the transport chosen and why.
    Info(info::InfoArgs),
    /// Run the HTTP metadata server (GET/PUT/DELETE <url>?key=K).
    MetadataServer(MetadataServerArgs),
}

#[derive(clap::Args)]
struct MetadataServerArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(*args),
        Command::BenchMetadata(args) => bench_metadata::run(&args),
        Command::Info(args) => info::run(&args),
        Command::MetadataServer(args) => metadata_server(&args),
    };
    if let Err(e) = result {
        eprintln!("tidewire: {e:#}");
        std::process::exit(1);
    }
}

fn metadata_server(args: &MetadataServerArgs) -> anyhow::Result<()> {
    let host = if args.host.contains(':') { format!("[{}]", args.host) } else { args.host.clone() };
    let server = tidewire::MetadataServer::start(&format!("{host}:{}", args.port))?;
    println!(
        "tidewire metadata server listening on {} (engines use --metadata {})",
        server.addr(),
        server.url()
    );
    loop {
        std::thread::park();
    }
}
