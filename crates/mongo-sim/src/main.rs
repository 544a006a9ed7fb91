//! The `mongo-sim` binary: CLI, logging, signals; the server itself lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use mongo_sim::{MongoSim, SimConfig};

// Every command decodes, clones and re-encodes documents; with glibc's allocator, malloc and
// free were ~45% of mongo-sim's CPU in the benchmark's workload T, CPU the server under test
// shares on the same machine. Real mongod ships tcmalloc for the same reason.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// An in-memory MongoDB stand-in (single-node replica-set primary, wire version 21).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TCP port (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 27017)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Replica-set name.
    #[arg(long, default_value = "rs0")]
    repl_set: String,
    /// Oplog capacity in entries (one per write).
    #[arg(long, default_value_t = 100_000)]
    oplog_size: usize,
    /// Keep data, clock and oplog in this file across restarts.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Log format (logs go to stderr; RUST_LOG filters, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let cfg = SimConfig {
        port: args.port,
        host: args.host,
        repl_set: args.repl_set,
        oplog_size: args.oplog_size,
        data_file: args.data_file,
        ..SimConfig::default()
    };
    let host = cfg.host;
    let handle = match MongoSim::start(cfg).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mongo-sim: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    // The readiness line a parent process waits for.
    println!("mongo-sim listening on {host}:{}", handle.port());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    wait_for_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
