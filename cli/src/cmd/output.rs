//! Pure presentation helpers: the `--output` format, hand-aligned tables that fit 80–120
//! columns, and compact renderings of durations, ages, timestamps and partition sets.

use chrono::{DateTime, Utc};
use std::fmt::Write as _;
use std::time::Duration;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns / `key  value` lines for people.
    #[default]
    Table,
    /// One JSON document on stdout, stable field names (see docs/cli.md).
    Json,
}

/// A table of text cells, printed with columns padded to their widest cell. Columns given a
/// maximum width are cut with `…` so a row stays within a terminal.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    max: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers and per-column maximum widths (0 = no limit).
    pub fn new(columns: &[(&'static str, usize)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            max: columns.iter().map(|(_, m)| *m).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// `true` when no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rendered table, one line per row after the header line, no trailing spaces.
    pub fn render(&self) -> String {
        let n = self.headers.len();
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                (0..n)
                    .map(|i| clip(r.get(i).map_or("", String::as_str), self.max[i]))
                    .collect()
            })
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&headers).chain(cells.iter()) {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    let pad = widths[i] - c.chars().count();
                    let _ = write!(line, "{c}{}  ", " ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `s` cut to `max` characters with a trailing `…` (no limit when `max` is 0).
pub fn clip(s: &str, max: usize) -> String {
    let s = one_line(s);
    if max == 0 || s.chars().count() <= max {
        return s;
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `s` with line breaks and tabs turned into spaces, so one value stays on one line.
pub fn one_line(s: &str) -> String {
    s.replace(['\r', '\n', '\t'], " ")
}

/// `key  value` lines with the keys padded to the longest.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let line = format!("{k:<w$}  {v}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration for people: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// How long ago `t` was, seen at `now` (`-` for the future beyond clock skew of 1 s).
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    match (now - t).to_std() {
        Ok(d) => format!("{} ago", human_duration(d)),
        Err(_) if (t - now).num_milliseconds() <= 1000 => "0ms ago".to_owned(),
        Err(_) => format!(
            "in {}",
            human_duration((t - now).to_std().unwrap_or_default())
        ),
    }
}

/// A timestamp as stored (RFC 3339, UTC, milliseconds) with its age: `2026-01-01T00:00:00.000Z (3.2s ago)`.
pub fn time_with_age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ({})", drover_shared::task::format_time(&t), age(t, now))
}

/// A sorted set of partitions as ranges: `[0,1,2,5,7,8]` → `0-2,5,7-8`.
pub fn ranges(partitions: &[u32]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// `value` or `-` when absent or empty.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value
        .map(|v| v.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_clip() {
        let mut t = Table::new(&[("ID", 6), ("STATE", 0), ("NOTE", 0)]);
        t.row(vec!["a".into(), "queued".into(), "".into()]);
        t.row(vec!["abcdefghij".into(), "failed".into(), "x\ny".into()]);
        assert_eq!(
            t.render(),
            "ID      STATE   NOTE\na       queued\nabcde…  failed  x y\n"
        );
        assert!(!t.is_empty());
    }

    #[test]
    fn durations_and_ages() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(
            human_duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d04h"
        );
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(age(t, now), "1m00s ago");
        assert_eq!(age(now, t), "in 1m00s");
        assert_eq!(
            time_with_age(t, now),
            "2026-01-01T00:00:00.000Z (1m00s ago)"
        );
    }

    #[test]
    fn partition_ranges() {
        assert_eq!(ranges(&[7, 0, 1, 2, 5, 8]), "0-2,5,7-8");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[3]), "3");
    }

    #[test]
    fn key_value_lines() {
        assert_eq!(
            key_values(&[
                ("id", "t1".into()),
                ("state", "queued".into()),
                ("key", String::new())
            ]),
            "id     t1\nstate  queued\nkey\n"
        );
        assert_eq!(or_dash(None::<u32>), "-");
        assert_eq!(or_dash(Some("")), "-");
        assert_eq!(or_dash(Some(3)), "3");
    }
}
