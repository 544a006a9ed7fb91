//! `changecast-bench`: runs the benchmark suite and writes BENCHMARKS.md and its plots; exits 1 when any run lost events or failed. `plot` and `check-plots` redraw and check the plots of a written report.

use std::path::{Path, PathBuf};
use std::time::Duration;

use changecast_bench::plot;
use changecast_bench::suite::{self, SuiteConfig, Target};
use clap::{Parser, Subcommand};

// The load tool and the raw limit share the machine with the server under test; a fast
// allocator keeps the tool's share small and gives the raw limit the same allocator
// changecast uses, so the comparison is between servers, not allocators.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fan-out benchmarks: changecast (/ws and Socket.IO) against the Node reference and the raw limit.
#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Args,
}

#[derive(Subcommand)]
enum Command {
    /// Redraws a report's plots from its tables (the figures as printed) beside it,
    /// embeds them in it, then checks them.
    Plot {
        /// The report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
    },
    /// Checks a report's plots: embedded with relative links, well-formed SVG, one bar
    /// per table row under its server's series, holding the table's value.
    CheckPlots {
        /// The report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        report: PathBuf,
    },
}

/// The benchmark run (no subcommand).
#[derive(clap::Args)]
struct Args {
    /// Directory with the `changecast`, `mongo-sim` and `changecast-bench-raw` binaries.
    #[arg(long, required = true)]
    bin_dir: Option<PathBuf>,
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
    /// Changes written in workload `follow` (no clients, CPU per change); 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    follow_changes: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Plot { report }) => redraw(&report),
        Some(Command::CheckPlots { report }) => check(&report),
        None => return run(cli.run).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn redraw(report: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let md =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let points = plot::points_from_markdown(&md)?;
    anyhow::ensure!(!points.is_empty(), "{} has no table rows", report.display());
    for path in plot::write_all(report, &points)? {
        eprintln!("bench: wrote {}", path.display());
    }
    let embedded = plot::embed(&md, &plot::section(report))?;
    if embedded != md {
        std::fs::write(report, embedded)
            .with_context(|| format!("writing {}", report.display()))?;
        eprintln!("bench: embedded the plots in {}", report.display());
    }
    check(report)
}

fn check(report: &Path) -> anyhow::Result<()> {
    for line in plot::check(report)? {
        eprintln!("bench: plots ok: {line}");
    }
    Ok(())
}

async fn run(args: Args) -> std::process::ExitCode {
    let Some(bin_dir) = args.bin_dir else {
        eprintln!("bench: --bin-dir is required");
        return std::process::ExitCode::from(64);
    };
    let cfg = SuiteConfig {
        bin_dir,
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
        follow_changes: args.follow_changes,
    };
    match suite::run(&cfg).await {
        Ok(all) => {
            let results = &all.runs;
            let mut failed_follow = false;
            for f in all.follow.iter().filter(|f| f.failures() > 0) {
                failed_follow = true;
                eprintln!(
                    "bench: FAILED follow {}: {} of {} changes read; {}",
                    f.label,
                    f.seen,
                    f.changes,
                    f.errors.join("; ")
                );
            }
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
            if failed.is_empty() && !failed_follow {
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
