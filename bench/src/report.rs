//! BENCHMARKS.md: tables, ratios, the scaling curve and the target check, from the runs' results; the plots it embeds are `plot`'s.

use std::fmt::Write as _;
use std::time::Duration;

use crate::follow::FollowResult;
use crate::load::{PhaseResult, RunResult};
use crate::suite::{SuiteConfig, Target};

/// Facts about the machine, taken before the first run.
#[derive(Debug, Clone)]
pub struct MachineFacts {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// `nproc`.
    pub nproc: usize,
    /// `free -m` verbatim.
    pub free: String,
    /// `uname -sr`.
    pub kernel: String,
    /// /proc/loadavg before the first run.
    pub loadavg: String,
    /// UTC start time.
    pub date: String,
    /// Open-files limit (soft/hard) the servers inherit.
    pub nofile: String,
    /// `git describe` of the checkout measured, with a note when its sources differ from it.
    pub revision: String,
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        // Only newlines: `free -m`'s header is aligned with leading spaces.
        .map(|s| s.trim_matches('\n').to_owned())
        .unwrap_or_else(|| "unknown".into())
}

impl MachineFacts {
    /// Reads them now.
    pub fn collect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let nofile = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!(
                    "{} soft / {} hard",
                    f.get(3).unwrap_or(&"?"),
                    f.get(4).unwrap_or(&"?")
                )
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cpu,
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            free: command_output("free", &["-m"]),
            kernel: command_output("uname", &["-sr"]),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
            nofile,
            revision: revision(),
        }
    }
}

/// The commit measured; uncommitted changes to the code under test are called out,
/// since the binaries were built from the working tree.
fn revision() -> String {
    let head = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = command_output(
        "git",
        &[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "src",
            "crates",
            "bench/src",
            "bench/peers",
            "Cargo.lock",
        ],
    );
    if dirty.trim().is_empty() || dirty == "unknown" {
        head
    } else {
        let files = dirty.lines().count();
        format!("{head} plus uncommitted changes in {files} source file(s) (built from the working tree)")
    }
}

/// One line per run for the console.
pub fn one_line(r: &RunResult) -> String {
    let mut s = format!(
        "{} C={} conns={} failed={} dropped={} idle={:.0} B/conn",
        r.label,
        r.customers,
        r.connections,
        r.failed_connections,
        r.dropped_connections,
        r.rss_per_idle_connection_bytes
    );
    for p in &r.phases {
        let _ = write!(
            s,
            " | {}: {:.0} deliv/s p99 {:.1} ms lost {}",
            p.name, p.summary.deliveries_per_sec, p.summary.latency.p99_ms, p.summary.lost
        );
    }
    if !r.errors.is_empty() {
        let _ = write!(s, " | errors: {}", r.errors.join("; "));
    }
    s
}

fn phase<'a>(r: &'a RunResult, name: &str) -> Option<&'a PhaseResult> {
    r.phases.iter().find(|p| p.name == name)
}

fn find(results: &[RunResult], target: Target, c: u32) -> Option<&RunResult> {
    results
        .iter()
        .find(|r| r.label == target.label() && r.customers == c)
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// A figure as the tables print it: three significant digits, at most two decimals.
pub(crate) fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The whole document.
pub fn render(
    cfg: &SuiteConfig,
    facts: &MachineFacts,
    results: &[RunResult],
    follow: &[FollowResult],
    took: Duration,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# changecast benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `{}` on {} (took {:.1} min). Regenerate with the same command; \
         `bench/run --smoke` is the seconds-long version the test command runs.\n",
        cfg.command,
        facts.date,
        took.as_secs_f64() / 60.0
    );
    if cfg.smoke {
        let _ = writeln!(
            w,
            "> **Smoke run**: tiny sizes, figures are not meaningful.\n"
        );
    }
    for note in &cfg.notes {
        let _ = writeln!(w, "> {note}\n");
    }
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "- CPU: {} × {} (nproc)", facts.cpu, facts.nproc);
    let _ = writeln!(w, "- Kernel: {}", facts.kernel);
    let _ = writeln!(w, "- Code measured: {}", facts.revision);
    let _ = writeln!(w, "- Load average before the run: {}", facts.loadavg);
    let _ = writeln!(
        w,
        "- Load average after the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(w, "- Open files limit: {}", facts.nofile);
    let _ = writeln!(w, "- Memory (`free -m`):\n\n```\n{}\n```\n", facts.free);
    let _ = writeln!(
        w,
        "Everything — mongo-sim, the server under test and the load tool — runs on this one \
         machine, so the load tool and mongo-sim compete with the server for the same cores.\n"
    );

    let _ = writeln!(w, "## Method\n");
    let _ = writeln!(
        w,
        "- C customers connect, each authenticated with its own HS256 token and auto-joined to \
         `customer:{{id}}`; 1% more connections are store dashboards (`store:{{id}}`, one per \
         store, each store owning C/100 orders). All connections then join `storefront:sf`.\n\
         - **T fixed**: the writer moves orders through the legacy statuses (`new → accepted → \
         packing → ready → out_for_delivery → completed`) at {} writes/s for {} s; each write is \
         owed to 2 clients (customer and store dashboard).\n\
         - **T saturation**: the same writes, closed-loop: at most 4096 deliveries owed at once, \
         64 writes in flight; the rate found is the highest sustained without queues growing.\n\
         - **B saturation**: updates of the public `storeBanner` of `sf`, owed to every \
         connection; at most 4 writes owed at once.\n\
         - No write rewrites a document (an order; one of 16 storefront settings documents) \
         while an earlier write to it is undelivered: `updateLookup` shows a document as it is \
         when the server reads the change, so a later write would be delivered twice and the \
         earlier one not at all.\n\
         - Writes go through the official Rust `mongodb` driver to mongo-sim (a fresh one per \
         run); the raw limit gets the same writes as pre-encoded frames over its control channel \
         and acknowledges before fanning out.\n\
         - Latency = receipt at the client − the writer's acknowledgement, same process clock. \
         A receipt can beat the driver's reply (counted as *early*, latency 0).\n\
         - Lost = owed − received after a drain ({} s without progress ends it). Server RSS from \
         `/proc/PID/status`, CPU from `/proc/PID/stat` (server process only; mongo-sim and the \
         load tool are not counted).\n\
         - **Follow** (no clients): K changes, half inserts of ~600-byte orders (items, address), \
         half one `updateMany` of their status; CPU per change = server CPU from the first write \
         until the server reports the K-th change read (changecast: `changes_read` on /metrics; \
         the Node peer: its `/changes` count; polled every 20 ms over one kept-alive \
         connection) ÷ K. Every replica reads every change, so this is \
         the cost that bounds the write rate one replica can follow.\n",
        cfg.fixed_rate,
        cfg.phase.as_secs(),
        crate::suite::DRAIN_TIMEOUT.as_secs()
    );

    let _ = write!(w, "{}", crate::plot::section(&cfg.out));

    let sizes = &cfg.sizes;
    for name in crate::plot::PHASES {
        let _ = writeln!(w, "## {name}\n");
        let _ = writeln!(
            w,
            "| C | server | writes/s | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | early | CPU s / M deliveries | peak RSS MiB |"
        );
        let _ = writeln!(
            w,
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for &c in sizes {
            for &t in &cfg.targets {
                let Some(r) = find(results, t, c) else {
                    continue;
                };
                match phase(r, name) {
                    Some(p) => {
                        let s = &p.summary;
                        let _ = writeln!(
                            w,
                            "| {c} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {:.0} |",
                            t.label(),
                            num(s.writes_per_sec),
                            num(s.deliveries_per_sec),
                            num(s.latency.p50_ms),
                            num(s.latency.p99_ms),
                            num(s.latency.p999_ms),
                            num(s.latency.max_ms),
                            s.lost,
                            if p.stalled { " (stalled)" } else { "" },
                            s.duplicates,
                            s.early_receipts,
                            num(p.cpu_secs_per_million),
                            p.rss_peak_kib as f64 / 1024.0
                        );
                    }
                    None => {
                        let _ = writeln!(
                            w,
                            "| {c} | {} | did not run: {} |||||||||||",
                            t.label(),
                            r.errors.first().map(String::as_str).unwrap_or("no phase")
                        );
                    }
                }
            }
        }
        let _ = writeln!(w);
    }

    follow_table(w, follow);

    let _ = writeln!(w, "## Ratios\n");
    let _ = writeln!(
        w,
        "changecast ÷ peer for each figure (deliveries/s: higher is better; latency, CPU and \
         RSS: lower is better).\n"
    );
    let _ = writeln!(
        w,
        "| C | phase | changecast | vs | deliveries/s | p99 | CPU / M | peak RSS |"
    );
    let _ = writeln!(w, "|---:|---|---|---|---:|---:|---:|---:|");
    for &c in sizes {
        for name in ["T fixed", "T saturation", "B saturation"] {
            for cc in [Target::Native, Target::Socketio] {
                for peer in [Target::Node, Target::Raw] {
                    let (Some(a), Some(b)) = (find(results, cc, c), find(results, peer, c)) else {
                        continue;
                    };
                    let (Some(pa), Some(pb)) = (phase(a, name), phase(b, name)) else {
                        continue;
                    };
                    let _ = writeln!(
                        w,
                        "| {c} | {name} | {} | {} | {} | {} | {} | {} |",
                        cc.label(),
                        peer.label(),
                        ratio(pa.summary.deliveries_per_sec, pb.summary.deliveries_per_sec),
                        ratio(pa.summary.latency.p99_ms, pb.summary.latency.p99_ms),
                        ratio(pa.cpu_secs_per_million, pb.cpu_secs_per_million),
                        ratio(pa.rss_peak_kib as f64, pb.rss_peak_kib as f64)
                    );
                }
            }
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Connections and idle memory\n");
    let _ = writeln!(
        w,
        "| C | server | connections | failed | dropped | connect s | RSS before MiB | RSS idle MiB | RSS per idle connection KiB |"
    );
    let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &c in sizes {
        for &t in &cfg.targets {
            let Some(r) = find(results, t, c) else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {c} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                t.label(),
                r.connections,
                r.failed_connections,
                r.dropped_connections,
                r.connect_secs,
                r.rss_baseline_kib as f64 / 1024.0,
                r.rss_idle_kib as f64 / 1024.0,
                r.rss_per_idle_connection_bytes / 1024.0
            );
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## How busy the machine was\n");
    let _ = writeln!(
        w,
        "The machine is shared: CPU seconds of each phase (drain included) for the whole \
         machine, the server under test, mongo-sim and the load tool; *rest* is everything \
         else — other work on the machine that has nothing to do with the benchmark. With {} \
         cores, a phase of *wall* seconds has at most {} × *wall* CPU seconds to give. \
         *mongo-sim µs per write* is mongo-sim's CPU per write in the phase: it does the \
         same work per write whatever server follows its stream, so it shows how fast the \
         machine was during that phase (the raw limit has no mongo-sim, so no such figure), \
         and a server's CPU per delivery moves with it.\n",
        facts.nproc, facts.nproc
    );
    let _ = writeln!(
        w,
        "| C | server | phase | wall s | machine CPU s | server CPU s | mongo-sim CPU s | mongo-sim µs per write | load tool CPU s | rest CPU s | load avg (1 min) at end |"
    );
    let _ = writeln!(w, "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in sizes {
        for &t in &cfg.targets {
            let Some(r) = find(results, t, c) else {
                continue;
            };
            for p in &r.phases {
                let rest = (p.machine_cpu_secs - p.cpu_secs - p.db_cpu_secs - p.loadtool_cpu_secs)
                    .max(0.0);
                let per_write = if p.db_cpu_secs > 0.0 && p.summary.writes > 0 {
                    format!("{:.1}", p.db_cpu_secs * 1e6 / p.summary.writes as f64)
                } else {
                    "-".to_owned()
                };
                let _ = writeln!(
                    w,
                    "| {c} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {per_write} | {:.1} | {:.1} | {:.2} |",
                    t.label(),
                    p.name,
                    p.wall_secs,
                    p.machine_cpu_secs,
                    p.cpu_secs,
                    p.db_cpu_secs,
                    p.loadtool_cpu_secs,
                    rest,
                    p.load_1m_end
                );
            }
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Scaling\n");
    let _ = writeln!(w, "Saturation deliveries/s and idle RSS against C.\n");
    let mut header = String::from("| server | figure |");
    let mut rule = String::from("|---|---|");
    for c in sizes {
        let _ = write!(header, " C = {c} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(w, "{header}\n{rule}");
    for &t in &cfg.targets {
        for (figure, get) in [
            ("T deliveries/s", scaling_t as fn(&RunResult) -> String),
            ("B deliveries/s", scaling_b),
            ("idle RSS MiB", scaling_rss),
        ] {
            let mut row = format!("| {} | {figure} |", t.label());
            for &c in sizes {
                let cell = find(results, t, c).map(get).unwrap_or_else(|| "–".into());
                let _ = write!(row, " {cell} |");
            }
            let _ = writeln!(w, "{row}");
        }
    }
    let _ = writeln!(w);

    let _ = writeln!(w, "## Targets (issue 8)\n");
    targets(w, cfg, results);
    let _ = writeln!(w, "## Targets (issue 16)\n");
    targets_16(w, cfg, results, follow);

    let problems: Vec<String> = results
        .iter()
        .filter(|r| !r.errors.is_empty() || r.misrouted > 0 || r.unknown > 0)
        .map(|r| {
            format!(
                "- {} C={}: misrouted {}, unknown {}, errors: {}",
                r.label,
                r.customers,
                r.misrouted,
                r.unknown,
                r.errors.join("; ")
            )
        })
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(w, "## Errors seen\n\n{}\n", problems.join("\n"));
    }
    // Informational: greetings are expected; anything else here explains a loss.
    let uncounted: Vec<String> = results
        .iter()
        .filter(|r| r.other_frames > 0)
        .map(|r| {
            format!(
                "- {} C={}: {} frames, kinds: {}",
                r.label,
                r.customers,
                r.other_frames,
                r.other_samples
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    if !uncounted.is_empty() {
        let _ = writeln!(
            w,
            "## Frames that were not deliveries\n\nText frames the clients received besides the \
             counted events (greetings, acks); listed so a renamed or reshaped event cannot hide.\n\n{}\n",
            uncounted.join("\n")
        );
    }
    md
}

fn scaling_t(r: &RunResult) -> String {
    phase(r, "T saturation")
        .map(|p| num(p.summary.deliveries_per_sec))
        .unwrap_or_else(|| "–".into())
}

fn scaling_b(r: &RunResult) -> String {
    phase(r, "B saturation")
        .map(|p| num(p.summary.deliveries_per_sec))
        .unwrap_or_else(|| "–".into())
}

fn scaling_rss(r: &RunResult) -> String {
    format!("{:.1}", r.rss_idle_kib as f64 / 1024.0)
}

/// The largest C of the run not above `limit` (the targets name C = 10000), 0 if none.
fn largest_size_up_to(cfg: &SuiteConfig, limit: u32) -> u32 {
    cfg.sizes
        .iter()
        .copied()
        .filter(|&c| c <= limit)
        .max()
        .unwrap_or(0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn targets(w: &mut String, cfg: &SuiteConfig, results: &[RunResult]) {
    let c10k = largest_size_up_to(cfg, 10_000);
    let _ = writeln!(
        w,
        "| target | server | figure | verdict |\n|---|---|---|---|"
    );
    for cc in [Target::Native, Target::Socketio] {
        for name in ["T saturation", "B saturation"] {
            for &c in &cfg.sizes {
                let get = |t| {
                    find(results, t, c)
                        .and_then(|r| phase(r, name))
                        .map(|p| p.summary.deliveries_per_sec)
                };
                let (Some(a), Some(node), Some(raw)) =
                    (get(cc), get(Target::Node), get(Target::Raw))
                else {
                    continue;
                };
                let vs_node = if node > 0.0 { a / node } else { 0.0 };
                let vs_raw = if raw > 0.0 { a / raw } else { 0.0 };
                let _ = writeln!(
                    w,
                    "| {name} ≥ 10× Node, C={c} | {} | {vs_node:.1}× | {} |",
                    cc.label(),
                    verdict(vs_node >= 10.0)
                );
                let _ = writeln!(
                    w,
                    "| {name} ≥ 60% of raw, C={c} | {} | {:.0}% | {} |",
                    cc.label(),
                    vs_raw * 100.0,
                    verdict(vs_raw >= 0.6)
                );
            }
        }
        let fixed = |t| {
            find(results, t, c10k)
                .and_then(|r| phase(r, "T fixed"))
                .map(|p| p.summary.latency.p99_ms)
        };
        if let Some(p99) = fixed(cc) {
            let _ = writeln!(
                w,
                "| T fixed p99 ≤ 25 ms, C={c10k} | {} | {p99:.1} ms | {} |",
                cc.label(),
                verdict(p99 <= 25.0)
            );
            if let Some(raw) = fixed(Target::Raw) {
                let _ = writeln!(
                    w,
                    "| T fixed p99 ≤ 2× raw, C={c10k} | {} | {} of raw ({raw:.1} ms) | {} |",
                    cc.label(),
                    ratio(p99, raw),
                    verdict(p99 <= 2.0 * raw)
                );
            }
        }
        if let Some(r) = find(results, cc, c10k) {
            let kib = r.rss_per_idle_connection_bytes / 1024.0;
            let _ = writeln!(
                w,
                "| RSS per idle connection ≤ 16 KiB, C={c10k} | {} | {kib:.1} KiB | {} |",
                cc.label(),
                verdict(kib > 0.0 && kib <= 16.0)
            );
        }
    }
    for r in results {
        let lost: u64 = r.phases.iter().map(|p| p.summary.lost).sum();
        let _ = writeln!(
            w,
            "| 0 events lost | {} | C={}: {lost} lost, {} misrouted, {} failed + {} dropped connections | {} |",
            r.label,
            r.customers,
            r.misrouted,
            r.failed_connections,
            r.dropped_connections,
            verdict(r.failures() == 0 && !r.phases.is_empty())
        );
    }
    let _ = writeln!(w);
}

fn follow_table(w: &mut String, follow: &[FollowResult]) {
    if follow.is_empty() {
        return;
    }
    let _ = writeln!(w, "## Follow\n");
    let _ = writeln!(
        w,
        "| server | changes | read | CPU s | µs CPU per change | wall s | changes/s | errors |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---|");
    for f in follow {
        let rate = if f.wall_secs > 0.0 {
            f.seen as f64 / f.wall_secs
        } else {
            0.0
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            f.label,
            f.changes,
            f.seen,
            num(f.cpu_secs),
            num(f.cpu_us_per_change),
            num(f.wall_secs),
            num(rate),
            if f.errors.is_empty() {
                "-".to_owned()
            } else {
                f.errors.join("; ")
            }
        );
    }
    let _ = writeln!(w);
}

/// Issue 16's acceptance, as ratios of one run.
fn targets_16(w: &mut String, cfg: &SuiteConfig, results: &[RunResult], follow: &[FollowResult]) {
    let _ = writeln!(
        w,
        "| target | server | figure | verdict |\n|---|---|---|---|"
    );
    let per_change = |label: &str| {
        follow
            .iter()
            .find(|f| f.label == label && f.seen > 0)
            .map(|f| f.cpu_us_per_change)
    };
    if let (Some(cc), Some(node)) = (
        per_change(crate::follow::label(Target::Native)),
        per_change(Target::Node.label()),
    ) {
        let share = cc / node;
        let _ = writeln!(
            w,
            "| follow: CPU per change ≤ 1/8 of Node's | changecast | {cc:.1} µs vs {node:.1} µs = 1/{:.1} | {} |",
            1.0 / share,
            verdict(share <= 0.125)
        );
    }
    for &c in &cfg.sizes {
        for cc in [Target::Native, Target::Socketio] {
            let cpu = |t| {
                find(results, t, c)
                    .and_then(|r| phase(r, "T saturation"))
                    .map(|p| p.cpu_secs_per_million)
            };
            if let (Some(a), Some(raw)) = (cpu(cc), cpu(Target::Raw)) {
                let _ = writeln!(
                    w,
                    "| T saturation: CPU per delivery ≤ 2× raw, C={c} | {} | {} of raw | {} |",
                    cc.label(),
                    ratio(a, raw),
                    verdict(raw > 0.0 && a <= 2.0 * raw)
                );
            }
        }
    }
    let c10k = largest_size_up_to(cfg, 10_000);
    for (cc, limit) in [(Target::Socketio, 12.0), (Target::Native, 10.0)] {
        if let Some(r) = find(results, cc, c10k) {
            let kib = r.rss_per_idle_connection_bytes / 1024.0;
            let _ = writeln!(
                w,
                "| RSS per idle connection ≤ {limit} KiB, C={c10k} | {} | {kib:.1} KiB | {} |",
                cc.label(),
                verdict(kib > 0.0 && kib <= limit)
            );
        }
    }
    let _ = writeln!(w);
}
