//! The process metrics every component exposes, read from `/proc/self` at scrape time.
//!
//! A value that cannot be read (no `/proc`, a format this parser does not know) is left out of the
//! scrape rather than reported as zero; nothing here panics.

use super::metrics::{MetricDef, Unit};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::time::Instant;

/// `drover_build_info{version,component}`: always 1; the labels say what runs.
pub const BUILD_INFO: MetricDef = MetricDef::new(
    "drover_build_info",
    "Always 1; the labels give the component and its version",
);
/// `drover_up`: always 1 while the process serves metrics.
pub const UP: MetricDef =
    MetricDef::new("drover_up", "Always 1 while the component serves metrics");
/// `drover_process_uptime_seconds`: seconds since the component created its metrics registry
/// (at start); drops to 0 on a restart.
pub const PROCESS_UPTIME: MetricDef = MetricDef::new(
    "drover_process_uptime",
    "Time since the component started (its metrics registry was created)",
)
.with_unit(Unit::Seconds);
/// `drover_process_cpu_seconds_total`: user + system CPU time of all the process' threads.
pub const PROCESS_CPU: MetricDef = MetricDef::new(
    "drover_process_cpu",
    "User and system CPU time spent by the process, from /proc/self/stat",
)
.with_unit(Unit::Seconds);
/// `drover_process_resident_memory_bytes`: resident set size.
pub const PROCESS_RESIDENT_MEMORY: MetricDef = MetricDef::new(
    "drover_process_resident_memory",
    "Resident memory size of the process, from VmRSS in /proc/self/status",
)
.with_unit(Unit::Bytes);
/// `drover_process_open_fds`: open file descriptors (sockets included).
pub const PROCESS_OPEN_FDS: MetricDef = MetricDef::new(
    "drover_process_open_fds",
    "Open file descriptors of the process, from /proc/self/fd",
);

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`). The kernel fixes it at 100 for
/// user space on every architecture Drover builds for; Prometheus' own `procfs` assumes the same.
const USER_HZ: f64 = 100.0;

/// Encodes the `/proc/self` metrics and the uptime at each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector {
    started: Instant,
}

impl ProcessCollector {
    pub(super) fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            &PROCESS_UPTIME,
            self.started.elapsed().as_secs_f64(),
        )?;
        if let Some(seconds) = read("/proc/self/stat").as_deref().and_then(cpu_seconds) {
            let def = &PROCESS_CPU;
            let unit = def.unit.map(Unit::to_prometheus);
            let counter = ConstCounter::new(seconds);
            let help = help_with_stop(def);
            let metric =
                encoder.encode_descriptor(def.name, &help, unit.as_ref(), counter.metric_type())?;
            counter.encode(metric)?;
        }
        if let Some(bytes) = read("/proc/self/status")
            .as_deref()
            .and_then(resident_bytes)
        {
            gauge(&mut encoder, &PROCESS_RESIDENT_MEMORY, bytes)?;
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // The count includes the descriptor `read_dir` holds open; so does every exporter's.
            gauge(&mut encoder, &PROCESS_OPEN_FDS, entries.count() as u64)?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    def: &MetricDef,
    value: impl EncodeGaugeValue,
) -> std::fmt::Result {
    let unit = def.unit.map(Unit::to_prometheus);
    let gauge = ConstGauge::new(value);
    let help = help_with_stop(def);
    let metric = encoder.encode_descriptor(def.name, &help, unit.as_ref(), gauge.metric_type())?;
    gauge.encode(metric)
}

/// Registered metrics get a full stop from prometheus-client; collectors write help verbatim.
fn help_with_stop(def: &MetricDef) -> String {
    format!("{}.", def.help_without_stop())
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`, in seconds. The second field, the
/// command name, is in parentheses and may itself hold spaces and parentheses, so fields are
/// counted from the last `)`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command come field 3 (state) onwards: utime is field 14, stime field 15.
    let mut fields = after_comm.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// `VmRSS:   1234 kB` of `/proc/<pid>/status`, in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next()? {
        "kB" => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_counts_fields_after_the_last_parenthesis() {
        // A command name with spaces and a ')' of its own; utime 250, stime 50 ticks.
        let stat = "4242 (drover (x) w) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 \
                    12345 100000000 2500 18446744073709551615";
        assert_eq!(cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn cpu_seconds_of_garbage_is_none() {
        assert_eq!(cpu_seconds(""), None);
        assert_eq!(cpu_seconds("1 (a) S 1 2"), None);
        assert_eq!(cpu_seconds("1 (a) S 1 2 3 4 5 6 7 8 9 10 x y"), None);
    }

    #[test]
    fn resident_bytes_reads_vm_rss_in_kib() {
        let status = "Name:\tdrover\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes(status), Some(1234 * 1024));
        assert_eq!(resident_bytes("Name:\tdrover\n"), None);
        assert_eq!(resident_bytes("VmRSS:\tlots kB\n"), None);
        assert_eq!(resident_bytes("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn this_process_can_be_read_on_linux() {
        if cfg!(target_os = "linux") {
            let stat = read("/proc/self/stat").expect("/proc/self/stat");
            assert!(cpu_seconds(&stat).is_some(), "{stat}");
            let status = read("/proc/self/status").expect("/proc/self/status");
            assert!(resident_bytes(&status).unwrap() > 0);
        }
    }
}
