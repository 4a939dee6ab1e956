//! The bench report: one section per scenario with its rows (each throughput also as a ratio to
//! the run's raw JetStream figures), the machine it ran on, the table for people, the JSON for
//! scripts (`--output json`), and the SVG plots of throughput and latency (`--plot`).

use crate::cmd::output::Table;
use anyhow::Context as _;
use drover_shared::bench::RawBaseline;
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// What was measured.
    pub measure: String,
    /// The figure.
    pub value: f64,
    /// Its unit (`tasks/s`, `ms`, `MiB`).
    pub unit: &'static str,
    /// `value` ÷ raw async publish rate (rates only).
    pub x_raw_publish: Option<f64>,
    /// `value` ÷ raw publish + consume + ack rate (rates only).
    pub x_raw_publish_consume: Option<f64>,
    /// The target, in words.
    pub target: Option<String>,
    /// Whether the target holds.
    pub met: Option<bool>,
}

impl Row {
    /// A figure without a target.
    pub fn plain(measure: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Self {
            measure: measure.into(),
            value,
            unit,
            x_raw_publish: None,
            x_raw_publish_consume: None,
            target: None,
            met: None,
        }
    }

    /// A rate (tasks/s) with its ratios to the raw baseline.
    pub fn rate(measure: impl Into<String>, value: f64, raw: &RawBaseline) -> Self {
        Self {
            x_raw_publish: Some(value / raw.publish_rate),
            x_raw_publish_consume: Some(value / raw.publish_consume_rate),
            ..Self::plain(measure, value, "tasks/s")
        }
    }

    /// The same row with a target and whether it holds.
    pub fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Section {
    /// `throughput`, `latency`, ...
    pub scenario: String,
    /// Tasks submitted that never reached `succeeded` (0 when the scenario submits none).
    pub lost: usize,
    /// Scenario-specific numbers (sizes, summaries, trials).
    pub detail: serde_json::Value,
    /// The figures.
    pub rows: Vec<Row>,
    /// Sorted latency samples per series, for the plot.
    #[serde(skip)]
    pub curves: Vec<(String, Vec<f64>)>,
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// Physical memory, GiB.
    pub memory_gib: f64,
    /// 1-minute load average when the run started.
    pub load_at_start: f64,
    /// UTC time of the start.
    pub started_at: String,
}

impl Machine {
    /// Reads `/proc` (fields stay empty/zero where it is missing).
    pub fn current() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            load_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
            started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// The server: mode (`spawn` / `nats-url`), version, URL.
    pub target: serde_json::Value,
    /// The raw JetStream baseline of this run.
    pub raw: RawBaseline,
    /// One per scenario run.
    pub sections: Vec<Section>,
}

/// `1234567.8` → `1,234,568`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

/// A value in its unit, rounded for people.
fn show(value: f64, unit: &str) -> String {
    match unit {
        "tasks/s" | "msgs/s" => format!("{} {unit}", thousands(value)),
        "ms" if value < 10.0 => format!("{value:.2} ms"),
        "ms" => format!("{value:.0} ms"),
        "×" => format!("{value:.2} ×"),
        _ => format!("{value:.1} {unit}"),
    }
}

impl Report {
    /// An empty report for `target` with its baseline.
    pub fn new(target: serde_json::Value, raw: RawBaseline) -> Self {
        Self {
            machine: Machine::current(),
            target,
            raw,
            sections: Vec::new(),
        }
    }

    /// Tasks lost over every scenario.
    pub fn lost(&self) -> usize {
        self.sections.iter().map(|s| s.lost).sum()
    }

    /// The report for people: the machine, the baseline, one table of every row.
    pub fn render_table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "machine   {} × {}, {} GiB, Linux {}, load {:.1} at start ({})\nserver    nats-server {} ({})\nraw       publish {} msgs/s, publish+consume+ack {} msgs/s ({} × {} B)\nfloor     {} tasks/s: publish+consume+ack plus a record create and update per task, the least server work SPEC asks of a single submit\n\n",
            m.cpus,
            m.cpu,
            m.memory_gib,
            m.kernel,
            m.load_at_start,
            m.started_at,
            self.target["nats_server"].as_str().unwrap_or("?"),
            self.target["mode"].as_str().unwrap_or("?"),
            thousands(self.raw.publish_rate),
            thousands(self.raw.publish_consume_rate),
            self.raw.messages,
            self.raw.message_bytes,
            self.raw
                .record_floor_rate
                .map_or_else(|| "not measured".to_owned(), thousands),
        );
        if let Some(floor) = self.raw.array_floor_rate {
            out.insert_str(
                out.len() - 1,
                &format!(
                    "array floor {} tasks/s: the same for tasks submitted {} per message (one publish, delivery and ack per array; a create and an update per task)\n",
                    thousands(floor),
                    self.raw.array_size
                ),
            );
        }
        let mut table = Table::new(&[
            ("SCENARIO", 0),
            ("MEASURE", 48),
            ("VALUE", 0),
            ("×PUB", 0),
            ("×PUB+CONS", 0),
            ("TARGET", 36),
            ("MET", 0),
        ]);
        let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"));
        for s in &self.sections {
            for r in &s.rows {
                table.row(vec![
                    s.scenario.clone(),
                    r.measure.clone(),
                    show(r.value, r.unit),
                    ratio(r.x_raw_publish),
                    ratio(r.x_raw_publish_consume),
                    r.target.clone().unwrap_or_else(|| "-".into()),
                    r.met
                        .map_or("-", |m| if m { "yes" } else { "NO" })
                        .to_owned(),
                ]);
            }
            if s.lost > 0 {
                table.row(vec![
                    s.scenario.clone(),
                    "tasks lost".into(),
                    s.lost.to_string(),
                ]);
            }
        }
        out.push_str(&table.render());
        out
    }
}

/// Writes `throughput.svg` (every rate next to the raw ones) and, when latency was measured,
/// `latency.svg` (latency by percentile per series) into `dir`; returns the files written.
pub(crate) fn plot(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut bars = vec![
        ("raw JetStream publish".to_owned(), report.raw.publish_rate),
        (
            "raw JetStream publish+consume+ack".to_owned(),
            report.raw.publish_consume_rate,
        ),
    ];
    if let Some(floor) = report.raw.record_floor_rate {
        bars.push((
            "raw record floor (SPEC's server work per task)".to_owned(),
            floor,
        ));
    }
    if let Some(floor) = report.raw.array_floor_rate {
        bars.push((
            format!("raw record floor, arrays of {}", report.raw.array_size),
            floor,
        ));
    }
    for s in &report.sections {
        for r in s.rows.iter().filter(|r| r.unit == "tasks/s") {
            bars.push((r.measure.clone(), r.value));
        }
    }
    let path = dir.join("throughput.svg");
    throughput_svg(&path, &bars).map_err(|e| anyhow::anyhow!("plotting throughput: {e}"))?;
    written.push(path);
    let curves: Vec<&(String, Vec<f64>)> = report
        .sections
        .iter()
        .flat_map(|s| s.curves.iter())
        .collect();
    if !curves.is_empty() {
        let path = dir.join("latency.svg");
        latency_svg(&path, &curves).map_err(|e| anyhow::anyhow!("plotting latency: {e}"))?;
        written.push(path);
    }
    Ok(written)
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn throughput_svg(path: &Path, bars: &[(String, f64)]) -> PlotResult {
    let height = 80 + 36 * bars.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("drover bench: throughput (per second)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.clone()),
            _ => String::new(),
        })
        .x_label_formatter(&|v| thousands(*v))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
        let color = if name.starts_with("raw") {
            RGBColor(150, 150, 150)
        } else {
            RGBColor(40, 100, 180)
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (*v, SegmentValue::Exact(i + 1)),
            ],
            color.filled(),
        );
        bar.set_margin(5, 5, 0, 0);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            thousands(*v),
            (*v + max * 0.01, SegmentValue::CenterOf(i)),
            ("sans-serif", 13),
        )
    }))?;
    root.present()?;
    Ok(())
}

fn latency_svg(path: &Path, curves: &[&(String, Vec<f64>)]) -> PlotResult {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    // Up to p99.9: the last samples would flatten everything else.
    let at = |s: &[f64], p: f64| drover_shared::bench::percentile(s, p);
    let top = curves
        .iter()
        .filter(|c| !c.1.is_empty())
        .map(|c| at(&c.1, 0.999))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "drover bench: latency by percentile (ms)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..100.0, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .draw()?;
    let palette = [
        RGBColor(40, 100, 180),
        RGBColor(220, 110, 30),
        RGBColor(60, 160, 70),
        RGBColor(190, 40, 50),
        RGBColor(120, 80, 170),
        RGBColor(120, 120, 120),
    ];
    for (i, (name, samples)) in curves.iter().map(|c| (&c.0, &c.1)).enumerate() {
        if samples.is_empty() {
            continue;
        }
        let color = palette[i % palette.len()];
        let points = (0..=999).map(|k| {
            let p = f64::from(k) / 1000.0;
            (p * 100.0, at(samples, p.max(0.001)).min(top))
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(show(1.234, "ms"), "1.23 ms");
    }

    #[test]
    fn rates_carry_both_ratios() {
        let raw = RawBaseline {
            messages: 10,
            message_bytes: 200,
            publish_rate: 100.0,
            publish_consume_rate: 50.0,
            record_floor_rate: None,
            array_floor_rate: None,
            array_size: 0,
        };
        let r = Row::rate("x", 25.0, &raw);
        assert_eq!(
            (r.x_raw_publish, r.x_raw_publish_consume),
            (Some(0.25), Some(0.5))
        );
    }
}
