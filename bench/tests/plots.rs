//! The plots beside BENCHMARKS.md: a written report's tables read back as the points plotted, and the checked-in plots are those of the checked-in tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use changecast_bench::load::{PhaseResult, RunResult};
use changecast_bench::plot::{self, FIGURES, PHASES};
use changecast_bench::report::{self, MachineFacts};
use changecast_bench::suite::{SuiteConfig, Target};
use changecast_bench::tracker::{Percentiles, Summary};

fn phase(name: &str, deliveries: f64, p99: f64, cpu: f64) -> PhaseResult {
    PhaseResult {
        name: name.into(),
        summary: Summary {
            deliveries_per_sec: deliveries,
            latency: Percentiles {
                p99_ms: p99,
                ..Percentiles::default()
            },
            ..Summary::default()
        },
        rss_peak_kib: 1024,
        cpu_secs: 1.0,
        cpu_secs_per_million: cpu,
        stalled: false,
        write_errors: 0,
        wall_secs: 1.0,
        machine_cpu_secs: 1.0,
        loadtool_cpu_secs: 0.0,
        db_cpu_secs: 0.0,
        load_1m_end: 0.0,
    }
}

fn run(target: Target, c: u32, scale: f64) -> RunResult {
    RunResult {
        label: target.label().into(),
        customers: c,
        connections: u64::from(c),
        failed_connections: 0,
        dropped_connections: 0,
        connect_secs: 0.1,
        rss_baseline_kib: 1,
        rss_idle_kib: 2,
        rss_per_idle_connection_bytes: 1.0,
        // Unrounded figures: the plots must hold them as the tables print them.
        phases: PHASES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                phase(
                    name,
                    12_345.678 * scale * (i + 1) as f64,
                    0.123_456 * scale,
                    3.456_78 * scale,
                )
            })
            .collect(),
        misrouted: 0,
        unknown: 0,
        other_frames: 0,
        other_samples: Vec::new(),
        errors: Vec::new(),
    }
}

fn config(out: PathBuf, targets: Vec<Target>, sizes: Vec<u32>) -> SuiteConfig {
    SuiteConfig {
        bin_dir: PathBuf::new(),
        node_dir: PathBuf::new(),
        changecast_config: PathBuf::new(),
        sizes,
        targets,
        phase: Duration::from_secs(1),
        fixed_rate: 50,
        work_dir: PathBuf::new(),
        out,
        command: "test".into(),
        smoke: true,
        notes: Vec::new(),
        appendix: None,
        follow_changes: 0,
    }
}

fn facts() -> MachineFacts {
    MachineFacts {
        cpu: "test".into(),
        nproc: 2,
        free: String::new(),
        kernel: String::new(),
        loadavg: String::new(),
        date: String::new(),
        nofile: String::new(),
        revision: String::new(),
    }
}

/// What `bench/run` writes, read back by `check-plots` and redrawn by `plot`: the tables
/// give back the plotted points, the check passes, and a redraw changes nothing.
#[test]
fn a_written_report_embeds_plots_that_match_its_tables() {
    let dir = std::env::temp_dir().join(format!("changecast-bench-plots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("BENCHMARKS.md");
    let targets = vec![Target::Raw, Target::Native, Target::Socketio, Target::Node];
    let mut results = Vec::new();
    for (ci, c) in [60u32, 600].into_iter().enumerate() {
        for (ti, &t) in targets.iter().enumerate() {
            // Node did not run at the larger size: its row says so and it gets no bar.
            if t == Target::Node && c == 600 {
                let mut r = run(t, c, 1.0);
                r.phases.clear();
                r.errors.push("did not start".into());
                results.push(r);
                continue;
            }
            results.push(run(t, c, 1.0 + ti as f64 + 10.0 * ci as f64));
        }
    }
    let cfg = config(out.clone(), targets, vec![60, 600]);
    let md = report::render(&cfg, &facts(), &results, &[], Duration::from_secs(1));
    std::fs::write(&out, &md).unwrap();
    let points = plot::points_from_results(&results);
    plot::write_all(&out, &points).unwrap();

    // The same points; the tables list them phase by phase, the results run by run.
    let sorted = |mut v: Vec<plot::Point>| {
        v.sort_by(|a, b| (&a.phase, a.c, &a.server).cmp(&(&b.phase, b.c, &b.server)));
        v
    };
    assert_eq!(
        sorted(plot::points_from_markdown(&md).unwrap()),
        sorted(points.clone())
    );
    assert_eq!(points.len(), 7 * PHASES.len());
    let lines = plot::check(&out).unwrap();
    assert_eq!(lines.len(), FIGURES.len(), "{lines:?}");
    for f in &FIGURES {
        let svg = std::fs::read_to_string(plot::path_for(&out, f)).unwrap();
        assert!(
            md.contains(&format!("](BENCHMARKS-{}.svg)", f.name)),
            "{md}"
        );
        for server in [
            "raw limit",
            "changecast /ws",
            "changecast Socket.IO",
            "Node Socket.IO",
        ] {
            assert!(
                svg.contains(&format!("data-series=\"{server}\"")),
                "{}: {server}",
                f.name
            );
        }
        assert_eq!(
            svg,
            plot::render(f, &plot::points_from_markdown(&md).unwrap())
        );
    }
    let embedded = plot::embed(&md, &plot::section(&out)).unwrap();
    assert_eq!(
        embedded, md,
        "a report bench/run wrote already has its plot section"
    );

    // A plot file that does not match its report fails the check.
    let cpu = plot::path_for(&out, &FIGURES[2]);
    let svg = std::fs::read_to_string(&cpu).unwrap();
    std::fs::write(
        &cpu,
        svg.replacen("data-series=\"raw limit\"", "data-series=\"other\"", 1),
    )
    .unwrap();
    let e = plot::check(&out).unwrap_err();
    assert!(format!("{e:#}").contains("series"), "{e:#}");
    std::fs::remove_file(&cpu).unwrap();
    assert!(plot::check(&out).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The checked-in BENCHMARKS.md embeds its plots, and they are exactly what
/// `changecast-bench plot` draws from its tables: figures and pictures cannot drift apart.
#[test]
fn the_checked_in_plots_are_those_of_the_checked_in_tables() {
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let md = std::fs::read_to_string(&report).unwrap();
    let points = plot::points_from_markdown(&md).unwrap();
    assert!(points.len() >= 12, "{} rows", points.len());
    for f in &FIGURES {
        let path = plot::path_for(&report, f);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `changecast-bench plot`)", path.display()));
        assert!(
            on_disk == plot::render(f, &points),
            "{} is not the plot of BENCHMARKS.md's tables: run `cargo run -p changecast-bench -- plot`",
            path.display()
        );
    }
    plot::check(&report).unwrap();
}
