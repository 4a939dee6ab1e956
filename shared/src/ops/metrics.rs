//! [`Metrics`]: the registry a component's metrics live in, metric declarations as constants
//! ([`MetricDef`]), and the standard histogram buckets.

use super::process::{self, ProcessCollector};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::hash::Hash;

/// Latency buckets in seconds: 50 µs to 30 s in 1–2.5–5 steps (a factor of 2 to 2.5 each), fine
/// enough for an in-process decision (tens of µs) and for a batch that waits on a slow handler.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Size buckets in bytes: 64 B to 64 MiB in powers of 4 (a payload, a sealed envelope, a NATS
/// message; NATS' own maximum payload is 1 MiB by default, 64 MiB at most).
pub const BYTES_BUCKETS: [f64; 11] = [
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Count buckets: 1 to 10 000 in 1–2–5 steps (tasks in a batch, messages in a fetch).
pub const COUNT_BUCKETS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
];

/// A new histogram with [`LATENCY_BUCKETS`] (seconds). A `fn` so it can build the histograms of a
/// [`Family`]: see [`Metrics::histogram_family`].
pub fn new_latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// A new histogram with [`BYTES_BUCKETS`].
pub fn new_bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

/// A new histogram with [`COUNT_BUCKETS`].
pub fn new_count_histogram() -> Histogram {
    Histogram::new(COUNT_BUCKETS)
}

/// The base unit of a metric (OpenMetrics). The exposed name gets `_<unit>` appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds (`_seconds`): every duration. Observe `Duration::as_secs_f64()`.
    Seconds,
    /// Bytes (`_bytes`).
    Bytes,
    /// A ratio between 0 and 1 (`_ratios`).
    Ratios,
}

impl Unit {
    /// The suffix the unit adds to a metric's name, without the underscore.
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Seconds => "seconds",
            Unit::Bytes => "bytes",
            Unit::Ratios => "ratios",
        }
    }

    pub(super) fn to_prometheus(self) -> prometheus_client::registry::Unit {
        use prometheus_client::registry::Unit as P;
        match self {
            Unit::Seconds => P::Seconds,
            Unit::Bytes => P::Bytes,
            Unit::Ratios => P::Ratios,
        }
    }
}

/// One metric's declaration: its name, help text and unit. Components declare these as
/// constants in their `metrics.rs` (STYLE 7), so every name is greppable and documented once.
///
/// The name is the full `drover_…` name *without* the suffixes the exposition adds: the unit
/// (`_seconds`, `_bytes`, `_ratios`, from [`with_unit`](Self::with_unit)) and, for counters,
/// `_total`. So `MetricDef::new("drover_tasks_dispatched", …)` registered as a counter is scraped
/// as `drover_tasks_dispatched_total`, and `MetricDef::new("drover_dispatch_latency", …)
/// .with_unit(Unit::Seconds)` as `drover_dispatch_latency_seconds`.
///
/// ```
/// use drover_shared::ops::{MetricDef, Unit};
///
/// /// Tasks sent to workers, counted when their batch is published.
/// pub const TASKS_DISPATCHED: MetricDef =
///     MetricDef::new("drover_tasks_dispatched", "Tasks sent to workers in a sealed batch");
/// /// From intake to the batch's publish ack.
/// pub const DISPATCH_LATENCY: MetricDef =
///     MetricDef::new("drover_dispatch_latency", "Time from intake to the batch's publish ack")
///         .with_unit(Unit::Seconds);
/// assert_eq!(DISPATCH_LATENCY.exposed_name(), "drover_dispatch_latency_seconds");
/// ```
///
/// A bad name in a `const` is a compile error:
///
/// ```compile_fail
/// use drover_shared::ops::MetricDef;
/// const BAD: MetricDef = MetricDef::new("tasks_dispatched_total", "No prefix, and a suffix");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The name, `drover_` and then `[a-z0-9_]`, without the unit or `_total` suffix.
    pub name: &'static str,
    /// One sentence for `# HELP` (a final full stop is added when missing).
    pub help: &'static str,
    /// The unit, if the metric has one.
    pub unit: Option<Unit>,
}

/// Suffixes a declared name must not end with: the exposition adds or reserves them.
const RESERVED_SUFFIXES: [&str; 8] = [
    "_total", "_seconds", "_bytes", "_ratios", "_count", "_sum", "_bucket", "_created",
];

impl MetricDef {
    /// Declares a metric without a unit.
    ///
    /// # Panics
    ///
    /// When `name` does not start with `drover_`, holds anything but `[a-z0-9_]`, or ends with a
    /// suffix the exposition adds (`_total`, a unit) or reserves (`_count`, `_sum`, `_bucket`,
    /// `_created`). In a `const` that is a compile error, which is the intended use.
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        let bytes = name.as_bytes();
        assert!(
            starts_with(bytes, b"drover_") && bytes.len() > b"drover_".len(),
            "a Drover metric name starts with `drover_`"
        );
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            assert!(
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_',
                "a Drover metric name holds only [a-z0-9_]"
            );
            i += 1;
        }
        let mut s = 0;
        while s < RESERVED_SUFFIXES.len() {
            assert!(
                !ends_with(bytes, RESERVED_SUFFIXES[s].as_bytes()),
                "leave `_total`, the unit and `_count`/`_sum`/`_bucket`/`_created` out of a metric \
                 name: the exposition adds them (declare the unit with `with_unit`)"
            );
            s += 1;
        }
        Self {
            name,
            help,
            unit: None,
        }
    }

    /// The same declaration with a unit; the exposed name gets `_<unit>` appended.
    pub const fn with_unit(self, unit: Unit) -> Self {
        Self {
            unit: Some(unit),
            ..self
        }
    }

    /// The name a scrape shows for the family: `name`, then `_<unit>` if any. Counter samples
    /// add `_total`, histogram samples `_bucket`/`_sum`/`_count`.
    pub fn exposed_name(&self) -> String {
        match self.unit {
            Some(unit) => format!("{}_{}", self.name, unit.as_str()),
            None => self.name.to_owned(),
        }
    }

    /// The help text without a final full stop (prometheus-client adds one when registering).
    pub(super) fn help_without_stop(&self) -> &'static str {
        self.help.trim_end_matches('.')
    }
}

const fn starts_with(s: &[u8], prefix: &[u8]) -> bool {
    if prefix.len() > s.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if s[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn ends_with(s: &[u8], suffix: &[u8]) -> bool {
    if suffix.len() > s.len() {
        return false;
    }
    let offset = s.len() - suffix.len();
    let mut i = 0;
    while i < suffix.len() {
        if s[offset + i] != suffix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// A component's metric registry: a `prometheus_client` [`Registry`] that already holds the
/// process metrics ([`process`](super#process-metrics)), plus helpers that register a metric
/// from its [`MetricDef`] and return the handle.
///
/// Build it mutably at start — each component's `metrics.rs` has a struct of typed handles with a
/// `register(&mut Metrics) -> Self` — then put it in an `Arc` for [`serve`](super::serve). The
/// handles are cheap clones (an `Arc` each) that update the registered metric.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry for `component` (`dispatcher`, `worker`, …) at `version` (pass
    /// `env!("CARGO_PKG_VERSION")`), with the process metrics registered: `drover_build_info`,
    /// `drover_up`, `drover_process_uptime_seconds`, and from `/proc/self` at scrape time
    /// `drover_process_cpu_seconds_total`, `drover_process_resident_memory_bytes` and
    /// `drover_process_open_fds`.
    pub fn new(component: &str, version: &str) -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
        };
        let build_info: Family<[(&'static str, String); 2], Gauge> =
            metrics.family(&process::BUILD_INFO);
        build_info
            .get_or_create(&[
                ("version", version.to_owned()),
                ("component", component.to_owned()),
            ])
            .set(1);
        metrics.gauge(&process::UP).set(1);
        metrics.register_collector(ProcessCollector::new());
        metrics
    }

    /// Registers any `prometheus_client` metric under `def`. The other helpers call this.
    pub fn register(&mut self, def: &MetricDef, metric: impl Metric) {
        match def.unit {
            Some(unit) => self.registry.register_with_unit(
                def.name,
                def.help_without_stop(),
                unit.to_prometheus(),
                metric,
            ),
            None => self
                .registry
                .register(def.name, def.help_without_stop(), metric),
        }
    }

    /// Registers and returns a counter (`u64`; exposed with `_total`).
    pub fn counter(&mut self, def: &MetricDef) -> Counter {
        let counter = Counter::default();
        self.register(def, counter.clone());
        counter
    }

    /// Registers and returns a gauge (`i64`).
    pub fn gauge(&mut self, def: &MetricDef) -> Gauge {
        let gauge = Gauge::default();
        self.register(def, gauge.clone());
        gauge
    }

    /// Registers and returns a histogram with the given bucket upper bounds (`+Inf` is implicit).
    pub fn histogram(&mut self, def: &MetricDef, buckets: &[f64]) -> Histogram {
        let histogram = Histogram::new(buckets.iter().copied());
        self.register(def, histogram.clone());
        histogram
    }

    /// Registers and returns a histogram with [`LATENCY_BUCKETS`]; declare `def` with
    /// `.with_unit(Unit::Seconds)` and observe seconds.
    pub fn latency_histogram(&mut self, def: &MetricDef) -> Histogram {
        self.histogram(def, &LATENCY_BUCKETS)
    }

    /// Registers and returns a histogram with [`BYTES_BUCKETS`]; declare `def` with
    /// `.with_unit(Unit::Bytes)`.
    pub fn bytes_histogram(&mut self, def: &MetricDef) -> Histogram {
        self.histogram(def, &BYTES_BUCKETS)
    }

    /// Registers and returns a histogram with [`COUNT_BUCKETS`].
    pub fn count_histogram(&mut self, def: &MetricDef) -> Histogram {
        self.histogram(def, &COUNT_BUCKETS)
    }

    /// Registers and returns a family of metrics keyed by a label set `L`: a struct deriving
    /// `EncodeLabelSet` (with `prometheus-client` as a direct dependency, which the derive
    /// needs) or an array of `(&'static str, String)` pairs. `M` is `Counter`, `Gauge`, … — for
    /// histograms use [`histogram_family`](Self::histogram_family).
    pub fn family<L, M>(&mut self, def: &MetricDef) -> Family<L, M>
    where
        L: Clone + Hash + Eq,
        M: Default,
        Family<L, M>: Metric,
    {
        let family = Family::<L, M>::default();
        self.register(def, family.clone());
        family
    }

    /// Registers and returns a family of histograms keyed by `L`, each made by `new` (for example
    /// [`new_latency_histogram`]).
    pub fn histogram_family<L>(
        &mut self,
        def: &MetricDef,
        new: fn() -> Histogram,
    ) -> Family<L, Histogram, fn() -> Histogram>
    where
        L: Clone + Hash + Eq,
        Family<L, Histogram, fn() -> Histogram>: Metric,
    {
        let family = Family::new_with_constructor(new);
        self.register(def, family.clone());
        family
    }

    /// Registers a collector, which encodes its metrics itself at each scrape (for values read
    /// from elsewhere at scrape time, like the process metrics).
    pub fn register_collector(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// The underlying registry, for what the helpers do not cover. Register `drover_` names.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every metric in the OpenMetrics text format (ending in `# EOF`), as served on `/metrics`
    /// with [`CONTENT_TYPE`](super::CONTENT_TYPE). Collectors run now.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail; only a collector can refuse, and ours never do.
        if let Err(e) = text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "a metrics collector failed; the scrape is incomplete");
        }
        out
    }
}
