//! Envelope codec benchmarks: seal, and parse headers + verify + open, for batches of typical
//! tasks (SPEC §3). Criterion reports tasks/s; a table of MB/s and compression ratio per batch
//! size is printed once before the runs.
//!
//! `cargo bench -p drover-shared --bench envelope -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use drover_shared::envelope::{self, BatchMeta, CodecConfig, Opened, Sealed};
use drover_shared::keyring::Keyring;
use drover_shared::names::Names;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ulid::Ulid;

const SIZES: [usize; 4] = [1, 64, 256, 1024];

/// A task as the dispatcher would seal it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchTask {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    queue: String,
    attempt: u32,
    max_attempts: u32,
    payload: Value,
    meta: serde_json::Map<String, Value>,
}

/// `n` tasks, each with a ULID id and a 200-byte payload of random-ish printable text.
fn tasks(n: usize) -> Vec<BenchTask> {
    const ALPHABET: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:;-_/+=()[]";
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        // xorshift64*: deterministic, so every run benches the same bytes.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..n)
        .map(|_| {
            let payload: String = (0..200)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize] as char)
                .collect();
            BenchTask {
                id: Ulid::generate().to_string(),
                kind: "noop".into(),
                queue: "default".into(),
                attempt: 1,
                max_attempts: 3,
                payload: Value::String(payload),
                meta: serde_json::Map::new(),
            }
        })
        .collect()
}

struct Fixture {
    ring: Keyring,
    config: CodecConfig,
    names: Names,
    subject: String,
}

impl Fixture {
    fn new() -> Self {
        let names = Names::default();
        Self {
            ring: Keyring::new([("bench", [7u8; 32])]).unwrap(),
            config: CodecConfig::default(),
            subject: names.work_subject("default", 3),
            names,
        }
    }

    fn seal(&self, tasks: &[BenchTask]) -> Sealed {
        let meta = BatchMeta {
            batch: Ulid::generate(),
            queue: "default".into(),
            partition: 3,
            epoch: 1,
            ts_ms: envelope::now_ms(),
        };
        envelope::seal(&self.ring, &self.config, meta, tasks).unwrap()
    }

    /// The worker's path: headers from the message, verify, decrypt, decompress, parse.
    fn open(&self, pairs: &[(&'static str, String)], body: &[u8]) -> Opened<BenchTask> {
        let lookup = |name: &'static str| pairs.iter().find(|p| p.0 == name).map(|p| p.1.as_str());
        let (_, opened) = envelope::open_message(
            &self.ring,
            &self.config,
            &self.names,
            &self.subject,
            lookup,
            body,
        )
        .unwrap();
        opened
    }
}

/// Mean time of `f` over about `budget`.
fn time(budget: Duration, mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    start.elapsed() / n.max(1)
}

fn print_table(fx: &Fixture) {
    println!();
    println!("envelope codec, plaintext MB/s (1 MB = 10^6 bytes), zstd level 3");
    println!(
        "{:>6} {:>11} {:>11} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "tasks", "plain B", "zstd B", "ratio", "seal µs", "open µs", "seal MB/s", "open MB/s"
    );
    for n in SIZES {
        let batch = tasks(n);
        let sealed = fx.seal(&batch);
        let pairs = sealed.headers.to_pairs();
        let budget = Duration::from_millis(300);
        let seal = time(budget, || {
            black_box(fx.seal(black_box(&batch)));
        });
        let open = time(budget, || {
            black_box(fx.open(&pairs, black_box(&sealed.body)));
        });
        let mbps = |d: Duration| sealed.stats.plaintext_bytes as f64 / d.as_secs_f64() / 1e6;
        println!(
            "{:>6} {:>11} {:>11} {:>6.2} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            n,
            sealed.stats.plaintext_bytes,
            sealed.stats.compressed_bytes,
            sealed.stats.ratio(),
            seal.as_secs_f64() * 1e6,
            open.as_secs_f64() * 1e6,
            mbps(seal),
            mbps(open),
        );
    }
    println!();
}

fn bench_envelope(c: &mut Criterion) {
    let fx = Fixture::new();
    print_table(&fx);

    let mut group = c.benchmark_group("envelope/seal");
    for n in SIZES {
        let batch = tasks(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &batch, |b, batch| {
            b.iter(|| fx.seal(black_box(batch)));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("envelope/open");
    for n in SIZES {
        let sealed = fx.seal(&tasks(n));
        let pairs = sealed.headers.to_pairs();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &sealed.body, |b, body| {
            b.iter(|| fx.open(&pairs, black_box(body)));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_envelope);
criterion_main!(benches);
