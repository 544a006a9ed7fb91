//! `changecast-bench`: runs the benchmark suite and writes BENCHMARKS.md; exits 1 when any run lost events or failed.

use std::path::PathBuf;
use std::time::Duration;

use changecast_bench::suite::{self, SuiteConfig, Target};
use clap::Parser;

// The load tool and the raw limit share the machine with the server under test; a fast
// allocator keeps the tool's share small and gives the raw limit the same allocator
// changecast uses, so the comparison is between servers, not allocators.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fan-out benchmarks: changecast (/ws and Socket.IO) against the Node reference and the raw limit.
#[derive(Parser)]
struct Args {
    /// Directory with the `changecast`, `mongo-sim` and `changecast-bench-raw` binaries.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The Node peer's directory (dependencies installed).
    #[arg(long, default_value = "bench/peers/node-socketio")]
    node_dir: PathBuf,
    /// changecast's bench config template.
    #[arg(long, default_value = "bench/changecast-bench.toml")]
    changecast_config: PathBuf,
    /// Connection counts C, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,19000")]
    sizes: Vec<u32>,
    /// Servers to run, comma-separated, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,native,socketio,node"
    )]
    targets: Vec<Target>,
    /// Seconds per writing phase.
    #[arg(long, default_value_t = 10)]
    phase_secs: u64,
    /// Writes per second in workload T's fixed-rate phase.
    #[arg(long, default_value_t = 1000)]
    fixed_rate: u32,
    /// Logs, generated configs and per-run JSON.
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// Report path.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Command line shown in the report.
    #[arg(long, default_value = "bench/run")]
    command: String,
    /// Tiny sizes: the harness works, the figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// A line for the report's notes (repeatable).
    #[arg(long)]
    note: Vec<String>,
    /// A hand-written Markdown file appended to the report (the analysis of a run).
    #[arg(long)]
    appendix: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let cfg = SuiteConfig {
        bin_dir: args.bin_dir,
        node_dir: args.node_dir,
        changecast_config: args.changecast_config,
        sizes: args.sizes,
        targets: args.targets,
        phase: Duration::from_secs(args.phase_secs),
        fixed_rate: args.fixed_rate,
        work_dir: args.work_dir,
        out: args.out,
        command: args.command,
        smoke: args.smoke,
        notes: args.note,
        appendix: args.appendix,
    };
    match suite::run(&cfg).await {
        Ok(results) => {
            let failed: Vec<_> = results.iter().filter(|r| r.failures() > 0).collect();
            for r in &failed {
                eprintln!(
                    "bench: FAILED {} C={}: {} events lost/misrouted/connections failed; {}",
                    r.label,
                    r.customers,
                    r.failures(),
                    r.errors.join("; ")
                );
            }
            eprintln!("bench: wrote {}", cfg.out.display());
            if failed.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
