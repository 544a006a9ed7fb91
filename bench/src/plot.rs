//! Plots of a benchmark run as SVG files beside BENCHMARKS.md, and their check; knows nothing of how the figures were measured.
//!
//! The plots draw exactly the figures of the report's tables (rounded as printed), so
//! `changecast-bench plot` can redraw them from a BENCHMARKS.md alone and gets the same
//! files `bench/run` wrote. Hand-made SVG: grouped bars (one group per C, one bar per
//! server) with the value written on each bar, because an SVG embedded as an image shows
//! no tooltips.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::load::RunResult;

/// The phases of a run, in report order.
pub const PHASES: [&str; 3] = ["T fixed", "T saturation", "B saturation"];

/// The heading of the report's plot section.
const SECTION: &str = "## Plots";

/// One server at one C in one phase: the figures the plots draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// One of [`PHASES`].
    pub phase: String,
    /// The server's label in the report.
    pub server: String,
    /// Connection count C.
    pub c: u32,
    /// Deliveries per second.
    pub deliveries_per_sec: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Server CPU seconds per million deliveries, i.e. CPU microseconds per delivery.
    pub cpu_us_per_delivery: f64,
}

/// What a figure draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Deliveries per second.
    Deliveries,
    /// p99 latency.
    P99,
    /// CPU per delivery.
    Cpu,
}

impl Measure {
    /// This measure of `p`.
    pub fn of(self, p: &Point) -> f64 {
        match self {
            Measure::Deliveries => p.deliveries_per_sec,
            Measure::P99 => p.p99_ms,
            Measure::Cpu => p.cpu_us_per_delivery,
        }
    }
}

/// One SVG file: a panel per phase, bars per C and server.
#[derive(Debug, Clone, Copy)]
pub struct Figure {
    /// File name suffix: `{report stem}-{name}.svg`.
    pub name: &'static str,
    /// Heading inside the SVG and the image's alt text.
    pub title: &'static str,
    /// What one bar's value is, for its label in the legend line.
    pub unit: &'static str,
    /// The phases drawn, one panel each.
    pub phases: &'static [&'static str],
    /// The figure drawn.
    pub measure: Measure,
}

/// Every plot a report gets.
pub const FIGURES: [Figure; 3] = [
    // T fixed delivers its fixed rate by construction (the table shows it); only the
    // saturation phases say anything about throughput.
    Figure {
        name: "deliveries",
        title: "Deliveries per second at saturation (higher is better)",
        unit: "deliveries/s",
        phases: &["T saturation", "B saturation"],
        measure: Measure::Deliveries,
    },
    Figure {
        name: "p99",
        title: "p99 latency, write acknowledged to client receipt (lower is better)",
        unit: "ms",
        phases: &PHASES,
        measure: Measure::P99,
    },
    Figure {
        name: "cpu",
        title: "Server CPU per delivery (lower is better)",
        unit: "µs CPU per delivery",
        phases: &PHASES,
        measure: Measure::Cpu,
    },
];

/// The points of `results`, rounded as the report's tables print them, so a redraw
/// from the tables gives the same files.
pub fn points_from_results(results: &[RunResult]) -> Vec<Point> {
    let printed = |v: f64| crate::report::num(v).parse().unwrap_or(v);
    results
        .iter()
        .flat_map(|r| {
            r.phases.iter().map(|p| Point {
                phase: p.name.clone(),
                server: r.label.clone(),
                c: r.customers,
                deliveries_per_sec: printed(p.summary.deliveries_per_sec),
                p99_ms: printed(p.summary.latency.p99_ms),
                cpu_us_per_delivery: printed(p.cpu_secs_per_million),
            })
        })
        .collect()
}

/// The points of a BENCHMARKS.md: its three phase tables, read by column name. Rows of
/// runs that did not run are skipped, as the plots leave them out.
pub fn points_from_markdown(md: &str) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for phase in PHASES {
        let heading = format!("## {phase}\n");
        let Some(start) = md.find(&heading) else {
            bail!("no `## {phase}` table");
        };
        let mut rows = md[start + heading.len()..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'));
        let header = cells(rows.next().context("empty table")?);
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .with_context(|| format!("`## {phase}` has no column {name:?}"))
        };
        let (c, server, deliveries, p99, cpu) = (
            column("C")?,
            column("server")?,
            column("deliveries/s")?,
            column("p99 ms")?,
            column("CPU s / M deliveries")?,
        );
        for row in rows.skip(1) {
            let cells = cells(row);
            let number = |i: usize| cells.get(i).and_then(|v| v.parse::<f64>().ok());
            let (Some(d), Some(p), Some(u)) = (number(deliveries), number(p99), number(cpu)) else {
                continue;
            };
            points.push(Point {
                phase: phase.to_owned(),
                server: cells.get(server).context("short row")?.to_string(),
                c: cells
                    .get(c)
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("bad C in {row:?}"))?,
                deliveries_per_sec: d,
                p99_ms: p,
                cpu_us_per_delivery: u,
            });
        }
    }
    Ok(points)
}

fn cells(row: &str) -> Vec<&str> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// Where `figure` goes for the report at `report`: beside it, named after it.
pub fn path_for(report: &Path, figure: &Figure) -> PathBuf {
    report.with_file_name(format!("{}-{}.svg", stem(report), figure.name))
}

fn stem(report: &Path) -> String {
    report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "BENCHMARKS".into())
}

/// The report's plot section, with links relative to the report.
pub fn section(report: &Path) -> String {
    let mut s = format!(
        "{SECTION}\n\nThe figures of the tables below, drawn by `bench/run` (redraw them from this \
         file with `changecast-bench plot --report {}`): one group of bars per C, one bar per server.\n\n",
        report.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    );
    for f in &FIGURES {
        let file = path_for(report, f);
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let _ = writeln!(s, "![{}]({name})\n", f.title);
    }
    s
}

/// `md` with its plot section replaced by `section`, or inserted before the first
/// phase table when it has none.
pub fn embed(md: &str, section: &str) -> anyhow::Result<String> {
    let heading = format!("{SECTION}\n");
    if let Some(start) = md.find(&heading) {
        let end = md[start + heading.len()..]
            .find("\n## ")
            .map_or(md.len(), |i| start + heading.len() + i + 1);
        return Ok(format!("{}{section}{}", &md[..start], &md[end..]));
    }
    let anchor = format!("## {}\n", PHASES[0]);
    let at = md
        .find(&anchor)
        .with_context(|| format!("no `{}` to put the plots before", anchor.trim()))?;
    Ok(format!("{}{section}{}", &md[..at], &md[at..]))
}

/// Writes every figure of `points` beside `report`; returns the files written.
pub fn write_all(report: &Path, points: &[Point]) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for f in &FIGURES {
        let path = path_for(report, f);
        std::fs::write(&path, render(f, points))
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Servers in the order they first appear (the report's order), and the sizes ascending.
fn axes(points: &[Point]) -> (Vec<String>, Vec<u32>) {
    let mut servers: Vec<String> = Vec::new();
    for p in points {
        if !servers.contains(&p.server) {
            servers.push(p.server.clone());
        }
    }
    let sizes: BTreeSet<u32> = points.iter().map(|p| p.c).collect();
    (servers, sizes.into_iter().collect())
}

/// A fixed colour per known server so every figure and every run reads alike.
fn colour(server: &str, index: usize) -> &'static str {
    match server {
        "raw limit" => "#6b7280",
        "changecast /ws" => "#4f46e5",
        "changecast Socket.IO" => "#0d9488",
        "Node Socket.IO" => "#d97706",
        _ => ["#db2777", "#65a30d", "#0284c7", "#7c3aed"][index % 4],
    }
}

/// A value as the bar's label: three significant figures, `k` above ten thousand.
pub fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 10_000.0 {
        format!("{}k", crate::report::num(v / 1000.0))
    } else {
        crate::report::num(v)
    }
}

/// An axis tick: whole numbers without decimals (`50`, not `50.0`), else as a bar's label.
fn tick_label(t: f64) -> String {
    if t >= 10_000.0 || (t - t.round()).abs() > 1e-9 {
        label(t)
    } else {
        format!("{t:.0}")
    }
}

/// Axis top and tick step: the smallest 1-2-2.5-5 step giving at most five ticks.
fn ticks(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.25);
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| s * 5.0 >= max)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PANEL_W: f64 = 330.0;
const PANEL_H: f64 = 250.0;
const PLOT_LEFT: f64 = 52.0;
const PLOT_TOP: f64 = 28.0;
const PLOT_BOTTOM: f64 = 40.0;
const GAP: f64 = 20.0;
const HEAD: f64 = 80.0;
/// Room above the tallest bar for its label, as a share of the largest value.
const HEADROOM: f64 = 1.2;

/// One figure as an SVG document. Panels, series and bars carry `data-` attributes
/// (phase, server, C, value) so [`check`] can read back what was drawn.
pub fn render(figure: &Figure, points: &[Point]) -> String {
    let (servers, sizes) = axes(points);
    let phases: Vec<&str> = figure
        .phases
        .iter()
        .copied()
        .filter(|ph| points.iter().any(|p| p.phase == *ph))
        .collect();
    let width = GAP + phases.len().max(1) as f64 * (PANEL_W + GAP);
    let height = HEAD + PANEL_H + GAP;
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="11" data-figure="{}">"#,
        figure.name
    );
    let _ = writeln!(w, "<title>{}</title>", escape(figure.title));
    let _ = writeln!(
        w,
        r##"<rect width="{width:.0}" height="{height:.0}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        w,
        r##"<text x="{GAP:.0}" y="24" font-size="15" font-weight="700" fill="#1d2330">{}</text>"##,
        escape(figure.title)
    );
    // Legend: one swatch per server, then the unit.
    let _ = writeln!(w, r#"<g class="legend">"#);
    let mut x = GAP;
    for (i, server) in servers.iter().enumerate() {
        let _ = writeln!(
            w,
            r##"<rect x="{x:.1}" y="38" width="12" height="12" fill="{}"/><text x="{:.1}" y="48" fill="#1d2330">{}</text>"##,
            colour(server, i),
            x + 16.0,
            escape(server)
        );
        x += 16.0 + 7.0 * server.chars().count() as f64 + 18.0;
    }
    let _ = writeln!(
        w,
        r##"<text x="{GAP:.0}" y="68" fill="#6b7280">bars: {}; groups: connection count C; one panel per phase (see Method)</text>"##,
        escape(figure.unit)
    );
    let _ = writeln!(w, "</g>");

    for (pi, phase) in phases.iter().enumerate() {
        let ox = GAP + pi as f64 * (PANEL_W + GAP);
        let here: Vec<&Point> = points.iter().filter(|p| p.phase == *phase).collect();
        let max = here
            .iter()
            .map(|p| figure.measure.of(p))
            .fold(0.0, f64::max);
        let (top, step) = ticks(max * HEADROOM);
        let plot_w = PANEL_W - PLOT_LEFT - 8.0;
        let plot_h = PANEL_H - PLOT_TOP - PLOT_BOTTOM;
        let y_of = |v: f64| PLOT_TOP + plot_h - (v / top) * plot_h;
        let _ = writeln!(
            w,
            r#"<g class="panel" data-phase="{}" transform="translate({ox:.1},{HEAD:.1})">"#,
            escape(phase)
        );
        let _ = writeln!(
            w,
            r##"<rect x="0" y="0" width="{PANEL_W:.0}" height="{PANEL_H:.0}" fill="#f8fafc" stroke="#e3e6eb" rx="6"/>"##
        );
        let _ = writeln!(
            w,
            r##"<text x="{:.1}" y="18" font-size="13" font-weight="700" text-anchor="middle" fill="#1d2330">{}</text>"##,
            PANEL_W / 2.0,
            escape(phase)
        );
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            let y = y_of(t);
            let _ = writeln!(
                w,
                r##"<line x1="{PLOT_LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e7eb"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#6b7280">{}</text>"##,
                PLOT_LEFT + plot_w,
                PLOT_LEFT - 4.0,
                y + 4.0,
                tick_label(t)
            );
            t += step;
        }
        let group_w = plot_w / sizes.len().max(1) as f64;
        let bar_w = group_w * 0.84 / servers.len().max(1) as f64;
        for (gi, c) in sizes.iter().enumerate() {
            let _ = writeln!(
                w,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#1d2330">C = {c}</text>"##,
                PLOT_LEFT + group_w * (gi as f64 + 0.5),
                PANEL_H - PLOT_BOTTOM + 16.0
            );
        }
        for (si, server) in servers.iter().enumerate() {
            // By C, so the file is the same whichever order the points came in.
            let mut mine: Vec<&&Point> = here.iter().filter(|p| p.server == *server).collect();
            mine.sort_by_key(|p| p.c);
            if mine.is_empty() {
                continue;
            }
            let _ = writeln!(
                w,
                r#"<g class="series" data-series="{}" fill="{}">"#,
                escape(server),
                colour(server, si)
            );
            for p in mine {
                let Some(gi) = sizes.iter().position(|c| *c == p.c) else {
                    continue;
                };
                let v = figure.measure.of(p);
                let x = PLOT_LEFT + group_w * gi as f64 + group_w * 0.08 + bar_w * si as f64;
                let y = y_of(v);
                let h = (PLOT_TOP + plot_h - y).max(0.0);
                let text = label(v);
                let _ = writeln!(
                    w,
                    r##"<rect class="bar" data-c="{}" data-value="{v}" x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}"><title>{}, C = {}: {text} {}</title></rect><text x="{:.1}" y="{:.1}" transform="rotate(-90 {:.1} {:.1})" font-size="9" fill="#1d2330">{text}</text>"##,
                    p.c,
                    (bar_w - 1.0).max(1.0),
                    escape(server),
                    p.c,
                    escape(figure.unit),
                    x + bar_w / 2.0 + 3.0,
                    y - 3.0,
                    x + bar_w / 2.0 + 3.0,
                    y - 3.0,
                );
            }
            let _ = writeln!(w, "</g>");
        }
        let _ = writeln!(w, "</g>");
    }
    let _ = writeln!(w, "</svg>");
    s
}

/// What [`check`] found, one line per figure.
pub type CheckReport = Vec<String>;

/// Checks the plots of the report at `report`: the report embeds every figure with a
/// relative link, each file is well-formed XML with an `<svg>` root, and each draws one
/// panel per phase and, in it, one series per server of that phase's table with one bar
/// per row holding the table's value.
pub fn check(report: &Path) -> anyhow::Result<CheckReport> {
    let md =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let points = points_from_markdown(&md)?;
    anyhow::ensure!(!points.is_empty(), "the report's tables have no rows");
    let mut lines = Vec::new();
    for f in &FIGURES {
        let path = path_for(report, f);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        anyhow::ensure!(
            md.contains(&format!("]({name})")),
            "{} does not embed {name}",
            report.display()
        );
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let svg = xml::parse(&text).map_err(|e| anyhow::anyhow!("{name}: not well-formed: {e}"))?;
        check_figure(f, &svg, &points).with_context(|| name.clone())?;
        let bars = svg.find_all("rect", "bar").len();
        lines.push(format!("{name}: well-formed, {bars} bars as in the tables"));
    }
    Ok(lines)
}

fn check_figure(f: &Figure, svg: &xml::Element, points: &[Point]) -> anyhow::Result<()> {
    anyhow::ensure!(svg.name == "svg", "root is <{}>, not <svg>", svg.name);
    anyhow::ensure!(
        svg.attr("xmlns") == Some("http://www.w3.org/2000/svg"),
        "no SVG namespace"
    );
    let panels = svg.find_all("g", "panel");
    let want: Vec<&str> = f
        .phases
        .iter()
        .copied()
        .filter(|ph| points.iter().any(|p| p.phase == *ph))
        .collect();
    let got: Vec<&str> = panels.iter().filter_map(|p| p.attr("data-phase")).collect();
    anyhow::ensure!(got == want, "panels {got:?}, want {want:?}");
    for panel in panels {
        let phase = panel.attr("data-phase").unwrap_or_default();
        let here: Vec<&Point> = points.iter().filter(|p| p.phase == phase).collect();
        let (servers, _) = axes(&here.iter().map(|p| (*p).clone()).collect::<Vec<_>>());
        let series = panel.find_all("g", "series");
        let names: Vec<&str> = series
            .iter()
            .filter_map(|s| s.attr("data-series"))
            .collect();
        anyhow::ensure!(
            names == servers.iter().map(String::as_str).collect::<Vec<_>>(),
            "{phase}: series {names:?}, want {servers:?}"
        );
        for s in series {
            let server = s.attr("data-series").unwrap_or_default();
            let rows: Vec<&&Point> = here.iter().filter(|p| p.server == server).collect();
            let bars = s.find_all("rect", "bar");
            anyhow::ensure!(
                bars.len() == rows.len(),
                "{phase} / {server}: {} bars for {} rows",
                bars.len(),
                rows.len()
            );
            for p in rows {
                let c = p.c.to_string();
                let bar = bars
                    .iter()
                    .find(|b| b.attr("data-c") == Some(c.as_str()))
                    .with_context(|| format!("{phase} / {server}: no bar for C = {c}"))?;
                let value: f64 = bar
                    .attr("data-value")
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{phase} / {server} C = {c}: no value"))?;
                let want = f.measure.of(p);
                anyhow::ensure!(
                    (value - want).abs() <= want.abs() * 1e-9,
                    "{phase} / {server} C = {c}: bar {value}, table {want}"
                );
                let height: f64 = bar
                    .attr("height")
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{phase} / {server} C = {c}: no height"))?;
                anyhow::ensure!(
                    height.is_finite() && height >= 0.0,
                    "{phase} / {server} C = {c}: height {height}"
                );
            }
        }
    }
    Ok(())
}

/// A strict reader of the XML subset SVG files use (elements, attributes, text,
/// comments, a prolog, character and the five predefined entity references), so the
/// check needs no XML dependency. Anything else is refused rather than skipped.
pub mod xml {
    /// An element with its attributes and child elements (text is checked, not kept).
    #[derive(Debug)]
    pub struct Element {
        /// Tag name.
        pub name: String,
        /// Attributes in document order, values unescaped.
        pub attrs: Vec<(String, String)>,
        /// Child elements in document order.
        pub children: Vec<Element>,
    }

    impl Element {
        /// The value of attribute `name`.
        pub fn attr(&self, name: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        /// Every descendant `<name class="class">`, in document order.
        pub fn find_all(&self, name: &str, class: &str) -> Vec<&Element> {
            let mut out = Vec::new();
            for c in &self.children {
                if c.name == name && c.attr("class") == Some(class) {
                    out.push(c);
                }
                out.extend(c.find_all(name, class));
            }
            out
        }
    }

    struct Reader<'a> {
        s: &'a str,
        i: usize,
    }

    impl Reader<'_> {
        fn rest(&self) -> &str {
            &self.s[self.i..]
        }

        fn err<T>(&self, what: &str) -> Result<T, String> {
            let line = self.s[..self.i].matches('\n').count() + 1;
            Err(format!("line {line}: {what}"))
        }

        fn skip_ws(&mut self) {
            let n = self.rest().len() - self.rest().trim_start().len();
            self.i += n;
        }

        fn name(&mut self) -> Result<String, String> {
            let n = self
                .rest()
                .find(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')))
                .unwrap_or(self.rest().len());
            let first = self.rest().chars().next();
            if n == 0 || first.is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '.') {
                return self.err("expected a name");
            }
            let name = self.rest()[..n].to_owned();
            self.i += n;
            Ok(name)
        }

        /// Text up to `end`, with references resolved; `<` is refused.
        fn chars_until(&mut self, end: char) -> Result<String, String> {
            let mut out = String::new();
            loop {
                let Some(c) = self.rest().chars().next() else {
                    return self.err("unexpected end");
                };
                if c == end {
                    return Ok(out);
                }
                match c {
                    '<' => return self.err("'<' in text or attribute value"),
                    '&' => {
                        let Some(semi) = self.rest().find(';') else {
                            return self.err("unterminated reference");
                        };
                        let entity = &self.rest()[1..semi];
                        let ch = match entity {
                            "amp" => Some('&'),
                            "lt" => Some('<'),
                            "gt" => Some('>'),
                            "quot" => Some('"'),
                            "apos" => Some('\''),
                            _ => entity
                                .strip_prefix("#x")
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                                .and_then(char::from_u32),
                        };
                        let Some(ch) = ch else {
                            return self.err(&format!("unknown reference &{entity};"));
                        };
                        out.push(ch);
                        self.i += semi + 1;
                    }
                    _ => {
                        out.push(c);
                        self.i += c.len_utf8();
                    }
                }
            }
        }

        fn misc(&mut self) -> Result<(), String> {
            loop {
                self.skip_ws();
                if self.rest().starts_with("<!--") {
                    let Some(end) = self.rest().find("-->") else {
                        return self.err("unterminated comment");
                    };
                    self.i += end + 3;
                } else if self.rest().starts_with("<?") {
                    let Some(end) = self.rest().find("?>") else {
                        return self.err("unterminated processing instruction");
                    };
                    self.i += end + 2;
                } else {
                    return Ok(());
                }
            }
        }

        fn element(&mut self) -> Result<Element, String> {
            if !self.rest().starts_with('<') {
                return self.err("expected '<'");
            }
            self.i += 1;
            let name = self.name()?;
            let mut attrs: Vec<(String, String)> = Vec::new();
            loop {
                let before = self.i;
                self.skip_ws();
                if self.rest().starts_with("/>") {
                    self.i += 2;
                    return Ok(Element {
                        name,
                        attrs,
                        children: Vec::new(),
                    });
                }
                if self.rest().starts_with('>') {
                    self.i += 1;
                    break;
                }
                if self.i == before {
                    return self.err("expected whitespace before an attribute");
                }
                let key = self.name()?;
                self.skip_ws();
                if !self.rest().starts_with('=') {
                    return self.err(&format!("attribute {key} has no value"));
                }
                self.i += 1;
                self.skip_ws();
                let Some(quote) = self
                    .rest()
                    .chars()
                    .next()
                    .filter(|c| *c == '"' || *c == '\'')
                else {
                    return self.err(&format!("attribute {key} is not quoted"));
                };
                self.i += 1;
                let value = self.chars_until(quote)?;
                self.i += 1;
                if attrs.iter().any(|(k, _)| *k == key) {
                    return self.err(&format!("duplicate attribute {key}"));
                }
                attrs.push((key, value));
            }
            let mut children = Vec::new();
            loop {
                if self.rest().starts_with("</") {
                    self.i += 2;
                    let end = self.name()?;
                    if end != name {
                        return self.err(&format!("</{end}> closes <{name}>"));
                    }
                    self.skip_ws();
                    if !self.rest().starts_with('>') {
                        return self.err("expected '>'");
                    }
                    self.i += 1;
                    return Ok(Element {
                        name,
                        attrs,
                        children,
                    });
                }
                if self.rest().starts_with("<!--") {
                    self.misc()?;
                } else if self.rest().starts_with('<') {
                    children.push(self.element()?);
                } else if self.rest().is_empty() {
                    return self.err(&format!("<{name}> is never closed"));
                } else {
                    self.chars_until('<')?;
                }
            }
        }
    }

    /// Parses a whole document: optional prolog and comments, one root element, nothing after.
    pub fn parse(s: &str) -> Result<Element, String> {
        let mut r = Reader { s, i: 0 };
        r.misc()?;
        let root = r.element()?;
        r.misc()?;
        if !r.rest().is_empty() {
            return r.err("content after the root element");
        }
        Ok(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(phase: &str, server: &str, c: u32, d: f64, p99: f64, cpu: f64) -> Point {
        Point {
            phase: phase.into(),
            server: server.into(),
            c,
            deliveries_per_sec: d,
            p99_ms: p99,
            cpu_us_per_delivery: cpu,
        }
    }

    fn sample() -> Vec<Point> {
        let mut v = Vec::new();
        for (i, phase) in PHASES.iter().enumerate() {
            for c in [60, 600] {
                v.push(point(
                    phase,
                    "raw limit",
                    c,
                    1000.0 * (i + 1) as f64,
                    0.5,
                    3.0,
                ));
                v.push(point(phase, "changecast /ws", c, 800.0, 12.5, 40.1));
                // A server with only one size: its missing bar must not be invented.
                if c == 60 {
                    v.push(point(phase, "Node <peer> & co", c, 90.0, 2437.0, 71.5));
                }
            }
        }
        v
    }

    #[test]
    fn figures_draw_one_bar_per_row_under_the_right_series() {
        let points = sample();
        for f in &FIGURES {
            let svg = xml::parse(&render(f, &points)).unwrap();
            check_figure(f, &svg, &points).unwrap();
            let series: Vec<_> = svg
                .find_all("g", "series")
                .iter()
                .filter_map(|s| s.attr("data-series"))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(
                series,
                ["Node <peer> & co", "changecast /ws", "raw limit"],
                "{}",
                f.name
            );
            let bars_per_phase = 5;
            assert_eq!(
                svg.find_all("rect", "bar").len(),
                bars_per_phase * f.phases.len(),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn the_check_refuses_wrong_or_broken_figures() {
        let points = sample();
        let f = &FIGURES[1];
        let good = render(f, &points);
        // A series missing.
        let fewer: Vec<_> = points
            .iter()
            .filter(|p| p.server != "raw limit")
            .cloned()
            .collect();
        let svg = xml::parse(&render(f, &fewer)).unwrap();
        assert!(check_figure(f, &svg, &points).is_err());
        // A value that is not the table's.
        let svg = xml::parse(&good.replace(r#"data-value="12.5""#, r#"data-value="13""#)).unwrap();
        let e = check_figure(f, &svg, &points).unwrap_err();
        assert!(e.to_string().contains("table 12.5"), "{e}");
        // Not well-formed.
        for broken in [
            good.replacen("</g>", "", 1),
            good.replacen("<title>", "<title>a < b", 1),
            good.replacen("&amp;", "&", 1),
            good.replacen(r#"class="bar""#, r#"class="bar" class="x""#, 1),
            format!("{good}<svg/>"),
        ] {
            assert!(xml::parse(&broken).is_err(), "accepted a broken document");
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(0.0), (1.0, 0.25));
        assert_eq!(ticks(2437.0), (2500.0, 500.0));
        let (top, step) = ticks(0.19);
        assert!(
            (top - 0.2).abs() < 1e-9 && (step - 0.05).abs() < 1e-9,
            "{top} {step}"
        );
        let (top, step) = ticks(509_663.0);
        assert!(top >= 509_663.0 && top / step <= 5.0, "{top} {step}");
        assert_eq!(label(409_942.0), "410k");
        assert_eq!(label(17_818.0), "17.8k");
        assert_eq!(label(0.16), "0.16");
        assert_eq!(label(0.0), "0");
        assert_eq!(tick_label(50.0), "50");
        assert_eq!(tick_label(125_000.0), "125k");
        assert_eq!(tick_label(0.25), "0.25");
    }

    #[test]
    fn the_section_is_embedded_once_before_the_tables() {
        let md = "# x\n\n## Method\n\ntext\n\n## T fixed\n\n| a |\n";
        let section = section(Path::new("out/BENCHMARKS.md"));
        assert!(
            section.contains("](BENCHMARKS-deliveries.svg)"),
            "{section}"
        );
        assert!(section.contains("](BENCHMARKS-p99.svg)"));
        assert!(section.contains("](BENCHMARKS-cpu.svg)"));
        let once = embed(md, &section).unwrap();
        assert!(once.find("## Plots") < once.find("## T fixed"), "{once}");
        assert_eq!(embed(&once, &section).unwrap(), once);
        assert!(embed("# no tables\n", &section).is_err());
    }
}
