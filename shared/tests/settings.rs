//! Layered configuration: precedence, environment mapping, validation and secret masking.
//! Pure: no NATS, no process environment (except the one clap test, on its own variable).
#![cfg(feature = "nats")]

use std::path::PathBuf;

use drover_shared::config::LogFormat;
use drover_shared::settings::{
    self, CwdPolicy, Events, FlagOverrides, MASK, Secret, Settings, SettingsError, Strategy, load,
    print_config,
};
use drover_shared::topology::Storage;

const NO_ENV: [(&str, &str); 0] = [];
const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn flags() -> FlagOverrides {
    FlagOverrides::default()
}

fn ok(toml: Option<&str>, env: &[(&str, &str)], flags: &FlagOverrides) -> Settings {
    load(toml, env.iter().copied(), flags).unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn err(toml: Option<&str>, env: &[(&str, &str)], flags: &FlagOverrides) -> SettingsError {
    match load(toml, env.iter().copied(), flags) {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => e,
    }
}

// ---- defaults -----------------------------------------------------------------------------------

#[test]
fn defaults_validate_and_match_the_spec() {
    let s = Settings::default();
    s.validate().unwrap();
    assert_eq!(ok(None, &[], &flags()), s, "no layers = defaults");
    assert_eq!(s.nats.url, ["nats://127.0.0.1:4222"]);
    assert_eq!(s.nats.prefix, "drover");
    assert_eq!(s.topology.lease_ms, 1500);
    assert_eq!(s.topology.worker_ttl_ms, 3000);
    assert_eq!(s.dispatcher.max_batch, 256);
    assert_eq!(s.dispatcher.max_batch_bytes, 256 * 1024);
    assert_eq!(s.dispatcher.linger_ms, 1);
    assert_eq!(s.dispatcher.events, Events::Terminal);
    assert_eq!(s.worker.queues, ["default"]);
    assert_eq!(s.worker.capacity, 1);
    assert_eq!(s.worker.heartbeat_ms, 1000);
    assert_eq!(s.worker.max_redeliveries, 5);
    assert_eq!(s.metrics.addr, "127.0.0.1:0");
    assert_eq!(s.log.format, LogFormat::Text);
    assert_eq!(s.log.level, "info");
    let q = s.queue("anything");
    assert_eq!(
        (q.partitions, q.strategy, q.timeout_ms, q.max_in_flight),
        (64, Strategy::RoundRobin, 300_000, 1)
    );

    let r = s.resolved();
    r.validate().unwrap();
    assert!(r.id.is_some());
    assert!(r.worker.concurrency.unwrap() >= 4);
}

#[test]
fn printed_config_parses_back_to_the_same_settings() {
    let s = Settings::default().resolved();
    let printed = print_config(&s);
    assert_eq!(ok(Some(&printed), &[], &flags()), s, "{printed}");
}

#[test]
fn no_keys_says_how_to_make_them() {
    let e = Settings::default().keyring().unwrap_err();
    assert_eq!(e, SettingsError::NoKeys);
    assert!(e.to_string().contains("drover keys gen"), "{e}");
}

// ---- precedence ---------------------------------------------------------------------------------

#[test]
fn each_layer_overrides_the_ones_below() {
    let file =
        "[nats]\nprefix = \"fromfile\"\n[worker]\nconcurrency = 2\n[dispatcher]\nmax_batch = 10\n";
    let env = [
        ("DROVER_PREFIX", "fromenv"),
        ("DROVER_CONCURRENCY", "3"),
        ("DROVER_DISPATCHER__MAX_BATCH", "20"),
    ];
    let cli = FlagOverrides {
        prefix: Some("fromflag".into()),
        concurrency: Some(4),
        ..flags()
    };

    let d = ok(None, &[], &flags());
    assert_eq!(
        (
            d.nats.prefix.as_str(),
            d.worker.concurrency,
            d.dispatcher.max_batch
        ),
        ("drover", None, 256)
    );

    let f = ok(Some(file), &[], &flags());
    assert_eq!(
        (
            f.nats.prefix.as_str(),
            f.worker.concurrency,
            f.dispatcher.max_batch
        ),
        ("fromfile", Some(2), 10)
    );

    let e = ok(Some(file), &env, &flags());
    assert_eq!(
        (
            e.nats.prefix.as_str(),
            e.worker.concurrency,
            e.dispatcher.max_batch
        ),
        ("fromenv", Some(3), 20)
    );

    let c = ok(Some(file), &env, &cli);
    assert_eq!(
        (
            c.nats.prefix.as_str(),
            c.worker.concurrency,
            c.dispatcher.max_batch
        ),
        ("fromflag", Some(4), 20)
    );

    // Skipping a layer: flags over the file, env over the defaults.
    let c = ok(Some(file), &[], &cli);
    assert_eq!(c.nats.prefix, "fromflag");
    let e = ok(None, &env, &flags());
    assert_eq!(e.nats.prefix, "fromenv");
}

#[test]
fn lower_layers_keep_what_higher_layers_do_not_set() {
    let file = "[nats]\nprefix = \"fromfile\"\nurl = \"nats://file:4222\"\n[queues.emails]\npartitions = 8\nstrategy = \"random\"\n";
    let s = ok(
        Some(file),
        &[
            ("DROVER_NATS_URL", "nats://env:4222"),
            ("DROVER_QUEUES__EMAILS__PAUSED", "true"),
        ],
        &flags(),
    );
    assert_eq!(s.nats.prefix, "fromfile");
    assert_eq!(s.nats.url, ["nats://env:4222"]);
    let q = &s.queues["emails"];
    assert_eq!(
        (q.partitions, q.strategy, q.paused),
        (8, Strategy::Random, true)
    );
}

#[test]
fn every_flag_reaches_its_field() {
    let cli = FlagOverrides {
        nats_url: Some("nats://a:1, nats://b:2".into()),
        creds: Some(PathBuf::from("/c.creds")),
        user: None,
        password: None,
        tls_ca: Some("/ca.pem".into()),
        tls_cert: Some("/cert.pem".into()),
        tls_key: Some("/key.pem".into()),
        prefix: Some("p".into()),
        id: Some("w-1".into()),
        metrics_addr: Some("0.0.0.0:9090".into()),
        log_format: Some(LogFormat::Json),
        queues: Some(vec!["a".into(), "b".into()]),
        concurrency: Some(7),
        capacity: Some(3),
    };
    let s = ok(None, &[], &cli);
    assert_eq!(s.nats.url, ["nats://a:1", "nats://b:2"]);
    assert_eq!(s.nats.creds.as_deref(), Some("/c.creds".as_ref()));
    assert_eq!(s.nats.tls_key.as_deref(), Some("/key.pem".as_ref()));
    assert_eq!(s.nats.prefix, "p");
    assert_eq!(s.id.as_deref(), Some("w-1"));
    assert_eq!(s.metrics.addr, "0.0.0.0:9090");
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.worker.queues, ["a", "b"]);
    assert_eq!((s.worker.concurrency, s.worker.capacity), (Some(7), 3));
}

#[test]
fn named_variables_reach_their_fields() {
    let env = [
        ("DROVER_NATS_URL", "nats://n1:4222,nats://n2:4222"),
        ("DROVER_USER", "1234"), // a number-looking user is still text
        ("DROVER_PASSWORD", "true"),
        ("DROVER_TLS_CA", "/ca.pem"),
        ("DROVER_PREFIX", "staging"),
        ("DROVER_ID", "worker-7"),
        ("DROVER_METRICS_ADDR", "[::]:9090"),
        ("DROVER_LOG_FORMAT", "json"),
        ("DROVER_LOG", "info,drover_worker=debug"),
        ("DROVER_KEYS", &*format!("k1:{KEY_A}")),
        ("DROVER_QUEUES", "emails, images"),
        ("DROVER_CONCURRENCY", "12"),
        ("DROVER_CAPACITY", "2"),
        ("DROVER_CONFIG", "/ignored/by/load.toml"),
        ("DROVER_NATS_SERVER", "/opt/nats-server"),
        ("HOME", "/root"),
    ];
    let s = ok(None, &env, &flags());
    assert_eq!(s.nats.url, ["nats://n1:4222", "nats://n2:4222"]);
    assert_eq!(s.nats.url_string(), "nats://n1:4222,nats://n2:4222");
    assert_eq!(s.nats.user.as_deref(), Some("1234"));
    assert_eq!(s.nats.password.as_ref().map(Secret::expose), Some("true"));
    assert_eq!(s.nats.prefix, "staging");
    assert_eq!(s.id.as_deref(), Some("worker-7"));
    assert_eq!(s.metrics.addr, "[::]:9090");
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.log.level, "info,drover_worker=debug");
    assert_eq!(s.worker.queues, ["emails", "images"]);
    assert_eq!((s.worker.concurrency, s.worker.capacity), (Some(12), 2));
    assert_eq!(s.keyring().unwrap().kids().collect::<Vec<_>>(), ["k1"]);
}

#[test]
fn drover_keys_replaces_a_key_file_and_the_reverse() {
    let file = "[keys]\nfile = \"/etc/drover/keys\"\n";
    let keys = format!("k2:{KEY_B},k1:{KEY_A}");
    let s = ok(Some(file), &[("DROVER_KEYS", &keys)], &flags());
    assert_eq!(s.keys.file, None);
    assert_eq!(s.keyring().unwrap().signing_key().kid(), "k2");

    let inline = format!("[keys]\ninline = \"k1:{KEY_A}\"\n");
    let s = ok(
        Some(&inline),
        &[("DROVER_KEYS__FILE", "/run/keys")],
        &flags(),
    );
    assert_eq!(
        (s.keys.inline, s.keys.file),
        (None, Some(PathBuf::from("/run/keys")))
    );

    // In one layer, both is an error.
    let both = format!("[keys]\ninline = \"k1:{KEY_A}\"\nfile = \"/k\"\n");
    let e = err(Some(&both), &[], &flags());
    assert!(
        e.to_string().contains("keys.inline excludes keys.file"),
        "{e}"
    );
}

#[test]
fn creds_flag_replaces_user_and_password_from_lower_layers() {
    let file = "[nats]\nuser = \"bob\"\npassword = \"pw\"\n";
    let cli = FlagOverrides {
        creds: Some("/w.creds".into()),
        ..flags()
    };
    let s = ok(Some(file), &[], &cli);
    assert_eq!((s.nats.user, s.nats.password), (None, None));
    assert_eq!(s.nats.creds, Some(PathBuf::from("/w.creds")));
    let e = err(
        Some("[nats]\ncreds = \"/c\"\nuser = \"bob\"\npassword = \"pw\"\n"),
        &[],
        &flags(),
    );
    assert!(
        e.to_string().contains("nats.creds excludes nats.user"),
        "{e}"
    );
}

#[test]
fn clap_values_count_only_when_typed() {
    use clap::{CommandFactory, FromArgMatches, Parser};
    use drover_shared::config::{ComponentArgs, ConnectArgs};

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(flatten)]
        component: ComponentArgs,
        #[arg(long, env = "DROVER_SETTINGS_TEST_CAPACITY", default_value_t = 1)]
        capacity: u32,
    }

    // A variable only this test uses (clap reads the process environment).
    // SAFETY: no other test reads or writes this variable, and nothing in this test binary
    // reads the environment through libc while tests run.
    unsafe { std::env::set_var("DROVER_SETTINGS_TEST_CAPACITY", "9") };

    let m = Args::command().get_matches_from(["x", "--prefix", "typed", "--log-format", "json"]);
    let args = Args::from_arg_matches(&m).unwrap();
    assert_eq!(args.capacity, 9, "clap saw the variable");
    let f = FlagOverrides::from_arg_matches(&m);
    assert_eq!(f.prefix.as_deref(), Some("typed"));
    assert_eq!(f.log_format, Some(LogFormat::Json));
    assert_eq!(f.nats_url, None, "a clap default is not a flag");
    assert_eq!(f.metrics_addr, None, "a clap default is not a flag");
    assert_eq!(f.capacity, None, "a clap env value is not a flag");
    assert_eq!(f.queues, None, "not an argument of this command");

    let m = Args::command().get_matches_from(["x", "--capacity", "4", "--password", "pw"]);
    let f = FlagOverrides::from_arg_matches(&m);
    assert_eq!(f.capacity, Some(4));
    assert_eq!(f.password.as_ref().map(Secret::expose), Some("pw"));
    assert!(!format!("{f:?}").contains("pw\""), "{f:?}");
}

// ---- the generic DROVER_<SECTION>__<FIELD> form -------------------------------------------------

#[test]
fn generic_variables_map_to_any_field_with_its_type() {
    let env = [
        ("DROVER_TOPOLOGY__REPLICAS", "3"),
        ("DROVER_TOPOLOGY__STORAGE", "memory"),
        ("DROVER_TOPOLOGY__LEASE_MS", "5000"),
        ("DROVER_DISPATCHER__MAX_BATCH", "512"),
        ("DROVER_DISPATCHER__ENCRYPT_RESULTS", "true"),
        ("DROVER_DISPATCHER__EVENTS", "all"),
        ("DROVER_CODEC__LEVEL", "-1"),
        ("DROVER_NATS__TLS_CA", "/ca.pem"),
        ("DROVER_WORKER__QUEUES", r#"["a", "b"]"#),
        ("DROVER_QUEUES__EMAILS__PARTITIONS", "8"),
        (
            "DROVER_QUEUES__IMAGES",
            r#"{ partitions = 4, strategy = "least_loaded" }"#,
        ),
        ("DROVER_QUEUES__IMAGES__PAUSED", "true"),
        (
            "DROVER_WORKER__EXEC__RESIZE__ARGV",
            r#"["/bin/resize", "-"]"#,
        ),
        ("DROVER_WORKER__EXEC__RESIZE__CWD", "/srv/work"),
        ("DROVER_WORKER__HTTP__HOOK__URL", "https://hooks.example/x"),
        ("DROVER_WORKER__HTTP__HOOK__BREAKER__FAILURES", "2"),
        (
            "DROVER_WORKER__HTTP__HOOK__HEADERS__AUTHORIZATION",
            "Bearer abc",
        ),
        ("DROVER_LOG__LEVEL", "debug"),
    ];
    let s = ok(None, &env, &flags());
    assert_eq!(
        (s.topology.replicas, s.topology.storage, s.topology.lease_ms),
        (3, Storage::Memory, 5000)
    );
    assert_eq!(s.dispatcher.max_batch, 512);
    assert!(s.dispatcher.encrypt_results);
    assert_eq!(s.dispatcher.events, Events::All);
    assert_eq!(s.codec.level, -1);
    assert_eq!(s.nats.tls_ca, Some(PathBuf::from("/ca.pem")));
    assert_eq!(s.worker.queues, ["a", "b"]);
    assert_eq!(s.queues["emails"].partitions, 8);
    let images = &s.queues["images"];
    assert_eq!(
        (images.partitions, images.strategy, images.paused),
        (4, Strategy::LeastLoaded, true)
    );
    let exec = &s.worker.exec["resize"];
    assert_eq!(exec.argv, ["/bin/resize", "-"]);
    assert_eq!(exec.cwd, CwdPolicy::Fixed("/srv/work".into()));
    let http = &s.worker.http["hook"];
    assert_eq!(http.breaker.failures, 2);
    assert_eq!(http.headers["authorization"].expose(), "Bearer abc");
    assert_eq!(s.log.level, "debug");
}

#[test]
fn empty_variables_count_as_unset() {
    let s = ok(
        Some("[nats]\nprefix = \"p\"\n"),
        &[("DROVER_PREFIX", ""), ("DROVER_CREDS", "")],
        &flags(),
    );
    assert_eq!((s.nats.prefix.as_str(), s.nats.creds), ("p", None));
}

#[test]
fn unknown_generic_variable_is_an_error_naming_it() {
    let e = err(None, &[("DROVER_DISPATCHER__MAX_BACH", "1")], &flags());
    let msg = e.to_string();
    assert!(
        matches!(&e, SettingsError::Env { var, .. } if var == "DROVER_DISPATCHER__MAX_BACH"),
        "{e:?}"
    );
    assert!(
        msg.contains("unknown field `max_bach`") && msg.contains("`max_batch`"),
        "{msg}"
    );

    let e = err(None, &[("DROVER_NOSUCH__THING", "1")], &flags());
    assert!(
        e.to_string()
            .starts_with("environment variable DROVER_NOSUCH__THING: unknown field `nosuch`"),
        "{e}"
    );

    let e = err(None, &[("DROVER_DISPATCHER____X", "1")], &flags());
    assert!(
        e.to_string()
            .contains("DROVER_DISPATCHER____X: empty path part"),
        "{e}"
    );
}

#[test]
fn bad_variable_value_is_an_error_naming_it() {
    let cases = [
        (
            "DROVER_DISPATCHER__MAX_BATCH",
            "lots",
            "invalid type: string \"lots\"",
        ),
        (
            "DROVER_DISPATCHER__MAX_BATCH",
            "-1",
            "invalid value: integer `-1`",
        ),
        (
            "DROVER_LOG_FORMAT",
            "yaml",
            "unknown log format `yaml`, expected `text` or `json`",
        ),
        ("DROVER_TOPOLOGY__STORAGE", "tape", "unknown variant `tape`"),
        ("DROVER_CAPACITY", "1.5", "expected u32"),
        (
            "DROVER_WORKER__EXEC__X__CWD",
            "relative/dir",
            "expected \"fresh\" or an absolute directory",
        ),
        (
            "DROVER_QUEUES__EMAILS",
            "8",
            "expected struct QueueSettings",
        ),
    ];
    for (var, value, want) in cases {
        let e = err(None, &[(var, value)], &flags());
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("environment variable {var}: ")),
            "{msg}"
        );
        assert!(msg.contains(want), "{var}={value}: {msg}");
    }
}

#[test]
fn a_variable_through_a_value_that_is_not_a_table_is_an_error() {
    let e = err(
        Some("[dispatcher]\nmax_batch = 4\n"),
        &[("DROVER_DISPATCHER__MAX_BATCH__X", "1")],
        &flags(),
    );
    assert_eq!(
        e.to_string(),
        "environment variable DROVER_DISPATCHER__MAX_BATCH__X: `dispatcher.max_batch` is an integer, not a table (setting `dispatcher.max_batch.x`)"
    );
}

#[test]
fn one_field_from_two_variables_is_an_error() {
    let e = err(
        None,
        &[
            ("DROVER_NATS_URL", "nats://a:1"),
            ("DROVER_NATS__URL", "nats://b:1"),
        ],
        &flags(),
    );
    let msg = e.to_string();
    assert!(
        msg.contains("DROVER_NATS_URL")
            && msg.contains("DROVER_NATS__URL")
            && msg.contains("nats.url"),
        "{msg}"
    );
}

#[test]
fn unrecognized_variables_are_listed_for_a_warning() {
    let env = [
        ("DROVER_NATS_ULR", "x"),
        ("DROVER_NATS_URL", "x"),
        ("DROVER_CONFIG", "x"),
        ("DROVER_A__B", "x"),
        ("PATH", "x"),
    ];
    assert_eq!(settings::unrecognized_env(env), ["DROVER_NATS_ULR"]);
    // Ignored by the loader itself.
    ok(None, &[("DROVER_NATS_ULR", "x")], &flags());
}

// ---- the file -----------------------------------------------------------------------------------

#[test]
fn unknown_file_field_is_an_error_naming_it_and_its_line() {
    let e = err(
        Some("[nats]\nprefix = \"p\"\nurls = \"nats://x\"\n"),
        &[],
        &flags(),
    );
    assert_eq!(
        e,
        SettingsError::File {
            origin: "config".into(),
            line: Some(3),
            column: Some(1),
            message: "unknown field `urls`, expected one of `url`, `creds`, `user`, `password`, `tls_ca`, `tls_cert`, `tls_key`, `prefix`".into(),
        }
    );
    assert!(
        e.to_string()
            .starts_with("config, line 3, column 1: unknown field `urls`"),
        "{e}"
    );

    let e = err(Some("[dispatchr]\nmax_batch = 1\n"), &[], &flags());
    assert!(e.to_string().contains("unknown field `dispatchr`"), "{e}");
    let e = err(Some("[topology]\nreplica = 3\n"), &[], &flags());
    assert!(e.to_string().contains("unknown field `replica`"), "{e}");
    let e = err(Some("[codec]\nlevle = 3\n"), &[], &flags());
    assert!(e.to_string().contains("unknown field `levle`"), "{e}");
}

#[test]
fn file_type_and_syntax_errors_carry_the_position() {
    let e = err(Some("[worker]\ncapacity = \"two\"\n"), &[], &flags());
    assert!(
        e.to_string()
            .starts_with("config, line 2, column 12: invalid type: string \"two\""),
        "{e}"
    );
    let e = err(Some("[worker\n"), &[], &flags());
    assert!(
        matches!(e, SettingsError::File { line: Some(1), .. }),
        "{e:?}"
    );
}

#[test]
fn settings_with_another_home_point_there() {
    let e = err(Some("[dispatcher]\nlease_ms = 5000\n"), &[], &flags());
    assert!(
        e.to_string()
            .contains("`dispatcher.lease_ms` is not a setting: the lease is `topology.lease_ms`"),
        "{e}"
    );
    let e = err(None, &[("DROVER_WORKER__TTL_MS", "5000")], &flags());
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "environment variable DROVER_WORKER__TTL_MS: `worker.ttl_ms` is not a setting"
        ),
        "{msg}"
    );
    assert!(msg.contains("topology.worker_ttl_ms"), "{msg}");
}

#[test]
fn every_toml_block_of_the_configuration_doc_loads() {
    let doc = include_str!("../../docs/configuration.md");
    let blocks = toml_blocks(doc);
    assert!(
        !blocks.is_empty(),
        "docs/configuration.md has no ```toml block"
    );
    for block in &blocks {
        let s = load(Some(block), NO_ENV, &flags()).unwrap_or_else(|e| panic!("{e}\n---\n{block}"));
        assert!(
            !print_config(&s).contains("change-me"),
            "header secret printed"
        );
    }
    // The main example, spot-checked.
    let example = blocks
        .iter()
        .find(|b| b.contains("[worker.exec."))
        .expect("the example file");
    let s = ok(Some(example), &[], &flags());
    assert_eq!(s.nats.url.len(), 3);
    assert_eq!((s.topology.replicas, s.topology.lease_ms), (3, 5000));
    assert_eq!(s.worker.exec["img.resize"].argv[0], "/usr/local/bin/resize");
    assert_eq!(
        s.worker.http["notify"].headers["Authorization"].expose(),
        "Bearer change-me"
    );
    assert_eq!(s.queues["emails"].partitions, 16);

    // …and the override shown under it.
    let keys = format!("k1:{KEY_A}");
    let env = [
        ("DROVER_KEYS", keys.as_str()),
        ("DROVER_QUEUES__EMAILS__PAUSED", "true"),
    ];
    let cli = FlagOverrides {
        queues: Some(vec!["emails".into()]),
        concurrency: Some(8),
        ..flags()
    };
    let s = ok(Some(example), &env, &cli);
    assert_eq!((s.keys.file, s.queues["emails"].paused), (None, true));
    assert_eq!(
        (s.worker.queues.as_slice(), s.worker.concurrency),
        (&["emails".to_owned()][..], Some(8))
    );
}

fn toml_blocks(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(_), "```") => out.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

// ---- validation ---------------------------------------------------------------------------------

fn violations(toml: &str) -> Vec<String> {
    match load(Some(toml), NO_ENV, &flags()) {
        Err(SettingsError::Invalid(v)) => v.iter().map(ToString::to_string).collect(),
        other => panic!("expected violations, got {other:?}"),
    }
}

#[test]
fn validation_names_the_field_the_rule_and_the_origin() {
    let e = err(None, &[("DROVER_DISPATCHER__MAX_BATCH", "0")], &flags());
    assert_eq!(
        e.to_string(),
        "invalid configuration: dispatcher.max_batch must be 1..=4096, got 0 (set by DROVER_DISPATCHER__MAX_BATCH)"
    );
    assert_eq!(e.violations()[0].path, "dispatcher.max_batch");

    let cli = FlagOverrides {
        capacity: Some(0),
        ..flags()
    };
    assert_eq!(
        err(None, &[], &cli).to_string(),
        "invalid configuration: worker.capacity must be 1..=1000, got 0 (set by --capacity)"
    );
    assert_eq!(
        violations("[queues.emails]\npartitions = 2000\n"),
        ["queues.emails.partitions must be 1..=1024, got 2000 (set by config)"]
    );
}

#[test]
fn validation_reports_every_problem_at_once() {
    let v = violations(
        "id = \"bad id\"\n[nats]\nprefix = \"Bad\"\nurl = \"http://x:1\"\n[dispatcher]\nmax_batch = 0\nlinger_ms = 5000\n\
         [worker]\nqueues = \"ok,Not-OK,ok\"\n[metrics]\naddr = \"nowhere\"\n[topology]\nreplicas = 7\n",
    );
    let want = [
        "id must match [A-Za-z0-9_-]{1,128}, got \"bad id\"",
        "nats.url server 1 has scheme \"http\"; use nats://, tls://, ws:// or wss://",
        "nats.prefix must be 1-32 characters",
        "topology.replicas must be 1..=5, got 7",
        "dispatcher.max_batch must be 1..=4096, got 0",
        "dispatcher.linger_ms must be 0..=1000, got 5000",
        "worker.queues queue 2 must match [a-z0-9][a-z0-9_-]{0,63}, got \"Not-OK\"",
        "worker.queues names \"ok\" twice",
        "metrics.addr must be host:port",
    ];
    for w in want {
        assert!(
            v.iter().any(|got| got.starts_with(w)),
            "missing {w:?} in {v:#?}"
        );
    }
    assert_eq!(v.len(), want.len(), "{v:#?}");
}

#[test]
fn cross_field_rules() {
    assert_eq!(
        violations("[topology]\nlease_ms = 1000\n[dispatcher]\nlease_margin_ms = 600\n"),
        [
            "dispatcher.lease_margin_ms must be at most half of topology.lease_ms (1000), got 600: the leader would step down before it could renew (set by config)"
        ]
    );
    assert_eq!(
        violations("[worker]\nheartbeat_ms = 1500\n"),
        [
            "worker.heartbeat_ms must be at least 1 and less than half of topology.worker_ttl_ms (3000), got 1500 (set by config)"
        ]
    );
    assert_eq!(
        violations("[worker]\nfence_margin_ms = 1500\n"),
        [
            "worker.fence_margin_ms must be at most topology.worker_ttl_ms − 2 × worker.heartbeat_ms (1000), got 1500: a worker would fence itself after a single late heartbeat (set by config)"
        ]
    );
    // Raising the TTL makes the same heartbeat valid.
    ok(
        Some("[worker]\nheartbeat_ms = 1500\n[topology]\nworker_ttl_ms = 5000\n"),
        &[],
        &flags(),
    );
    assert_eq!(
        violations("[codec]\nmax_decompressed = 131072\n"),
        [
            "dispatcher.max_batch_bytes must be 1024..=131072 (up to codec.max_decompressed, or workers could not open the batch), got 262144"
        ]
    );
    assert_eq!(
        violations("[topology]\nintake_max_ack_pending = 100\n"),
        [
            "dispatcher.intake_fetch must be 1..=100 (up to topology.intake_max_ack_pending), got 512"
        ]
    );
    let v = violations("[nats]\nuser = \"bob\"\ntls_cert = \"/c.pem\"\n");
    assert_eq!(
        v,
        [
            "nats.user needs nats.password (DROVER_PASSWORD) as well (set by config)",
            "nats.tls_cert needs both nats.tls_cert and nats.tls_key for mutual TLS (set by config)",
        ]
    );
}

#[test]
fn handler_rules() {
    let v = violations(
        "[worker.exec.a]\nargv = []\nenv_allow = [\"PATH\", \"DROVER_KEYS\", \"1BAD\"]\nmemory_mb = 1\n\
         env = { DROVER_PASSWORD = \"x\", \"2BAD\" = \"y\", OK = \"z\" }\n\
         [worker.http.b]\nurl = \"https://b\"\nmax_response_bytes = 0\n\
         [worker.http.a]\nurl = \"ftp://x\"\nheaders = { \"Bad Header\" = \"v\" }\nbreaker = { failures = 0 }\n\
         [worker.http.\"bad type!\"]\nurl = \"https://x\"\n",
    );
    let want = [
        "worker.exec.a.argv must name the program to run",
        "worker.exec.a.env_allow must not pass DROVER_KEYS: it is a secret of the worker",
        "worker.exec.a.env_allow \"1BAD\" is not a variable name",
        "worker.exec.a.env must not set DROVER_PASSWORD",
        "worker.exec.a.env \"2BAD\" is not a variable name",
        "worker.exec.a.memory_mb must be at least 16, got 1",
        "worker.http.b.max_response_bytes must be",
        "worker.http.a is also worker.exec.a: a type has one handler",
        "worker.http.a.url must be an http:// or https:// URL, got \"ftp://x\"",
        "worker.http.a.headers \"Bad Header\" is not a header name",
        "worker.http.a.breaker.failures must be at least 1, got 0",
        "worker.http.\"bad type!\" is not a task type",
    ];
    for w in want {
        assert!(
            v.iter().any(|got| got.starts_with(w)),
            "missing {w:?} in {v:#?}"
        );
    }
    assert_eq!(v.len(), want.len(), "{v:#?}");
}

#[test]
fn bad_inline_keys_are_a_violation_without_the_secret() {
    let short = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwd"; // 30 bytes
    let e = err(None, &[("DROVER_KEYS", &*format!("k1:{short}"))], &flags());
    let msg = e.to_string();
    assert!(
        msg.contains("keys.inline is not a valid keyring") && msg.contains("(set by DROVER_KEYS)"),
        "{msg}"
    );
    assert!(!msg.contains(short), "{msg}");
}

// ---- secrets ------------------------------------------------------------------------------------

const PASSWORD: &str = "pa55-w0rd-unique";
const HEADER: &str = "Bearer tok-unique-123";
const ENV_SECRET: &str = "env-t0ken-unique";
const FLAG_PASSWORD: &str = "flag-pa55-unique";

fn assert_hidden(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "secret {s:?} leaked in:\n{text}");
    }
}

#[test]
fn secrets_never_show_in_print_config_or_debug() {
    let file = format!(
        "[nats]\nuser = \"bob\"\npassword = \"{PASSWORD}\"\n[keys]\ninline = \"k1:{KEY_A}\"\n\
         [worker.http.hook]\nurl = \"https://h\"\nheaders = {{ Authorization = \"{HEADER}\" }}\n\
         [worker.exec.run]\nargv = [\"/bin/true\"]\nenv = {{ API_TOKEN = \"{ENV_SECRET}\" }}\n"
    );
    let s = ok(Some(&file), &[], &flags());
    assert_eq!(s.worker.exec["run"].env["API_TOKEN"].expose(), ENV_SECRET);
    assert_eq!(s.nats.password.as_ref().unwrap().expose(), PASSWORD);
    let printed = print_config(&s);
    let debug = format!("{s:?} {s:#?}");
    for text in [&printed, &debug] {
        assert_hidden(text, &[PASSWORD, KEY_A, HEADER, ENV_SECRET]);
        assert!(text.contains(MASK), "{text}");
    }
    assert!(printed.contains("password = \"***\""), "{printed}");
    assert!(printed.contains("inline = \"***\""), "{printed}");
    assert!(printed.contains("Authorization = \"***\""), "{printed}");
    assert!(printed.contains("API_TOKEN = \"***\""), "{printed}");

    // From DROVER_KEYS and a --password flag.
    let env_keys = format!("k2:{KEY_B}");
    let cli = FlagOverrides {
        password: Some(FLAG_PASSWORD.into()),
        ..flags()
    };
    let s = ok(Some(&file), &[("DROVER_KEYS", &env_keys)], &cli);
    assert_eq!(s.nats.password.as_ref().unwrap().expose(), FLAG_PASSWORD);
    let all = [PASSWORD, FLAG_PASSWORD, KEY_A, KEY_B, HEADER];
    assert_hidden(&print_config(&s), &all);
    assert_hidden(&format!("{s:?} {cli:?} {:?}", s.keyring().unwrap()), &all);
    assert_eq!(format!("{}", Secret::new(PASSWORD)), MASK);
}

type EnvList = Vec<(&'static str, String)>;

#[test]
fn secrets_never_show_in_error_messages() {
    let keys = format!("k1:{KEY_A}");
    let cases: Vec<(Option<String>, EnvList)> = vec![
        // Wrong types for secret fields.
        (
            Some(format!("[nats]\npassword = {{ x = \"{PASSWORD}\" }}\n")),
            vec![],
        ),
        (Some(format!("keys = \"{keys}\"\n")), vec![]),
        (Some(format!("[keys]\ninline = [\"{keys}\"]\n")), vec![]),
        (
            Some(format!(
                "[worker.http.h]\nurl = \"https://h\"\nheaders = \"{HEADER}\"\n"
            )),
            vec![],
        ),
        // A misspelled secret field (the line is not quoted).
        (Some(format!("[nats]\npasword = \"{PASSWORD}\"\n")), vec![]),
        (Some(format!("[keys]\nnline = \"{keys}\"\n")), vec![]),
        // A syntax error on a secret's line.
        (
            Some(format!("[nats]\npassword = \"{PASSWORD}\" trailing\n")),
            vec![],
        ),
        // Secrets in the environment.
        (
            None,
            vec![("DROVER_WORKER__HTTP__H__HEADERS", HEADER.to_owned())],
        ),
        (None, vec![("DROVER_KEYS__INLINE__X", keys.clone())]),
        (
            None,
            vec![("DROVER_KEYS", format!("k1:{KEY_A},k1:{KEY_B}"))],
        ),
        (None, vec![("DROVER_KEYS", format!("{KEY_A}:k1"))]),
        (
            None,
            vec![
                ("DROVER_KEYS", keys.clone()),
                ("DROVER_KEYS__FILE", "/k".into()),
            ],
        ),
        // A password next to an unrelated error.
        (
            None,
            vec![
                ("DROVER_PASSWORD", PASSWORD.into()),
                ("DROVER_USER", "u".into()),
                ("DROVER_CAPACITY", "0".into()),
            ],
        ),
        // Credentials in URLs.
        (
            None,
            vec![("DROVER_NATS_URL", format!("nats://bob:{PASSWORD}@h:4222"))],
        ),
        (
            Some(format!(
                "[worker.http.h]\nurl = \"https://bob:{PASSWORD}@h/x\"\n"
            )),
            vec![],
        ),
    ];
    for (file, env) in cases {
        let e = err(
            file.as_deref(),
            &env.iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            &flags(),
        );
        let text = format!("{e} {e:?}");
        assert_hidden(&text, &[PASSWORD, KEY_A, KEY_B, HEADER]);
    }
}

#[test]
fn secret_debug_display_and_serialize_mask() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s}"), "***");
    assert_eq!(format!("{s:?}"), "\"***\"");
    assert_eq!(s.expose(), "hunter2");
    #[derive(serde::Serialize)]
    struct W {
        s: Secret,
    }
    assert_eq!(toml::to_string(&W { s }).unwrap().trim(), "s = \"***\"");
}

// ---- the process convenience --------------------------------------------------------------------

#[test]
fn load_from_process_names_the_file_in_errors() {
    let dir = std::env::temp_dir().join(format!("drover-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[worker]\nqueus = [\"a\"]\n").unwrap();
    let e = settings::load_from_process(Some(&path), &flags()).unwrap_err();
    assert!(
        e.to_string().starts_with(&format!(
            "{}, line 2, column 1: unknown field `queus`",
            path.display()
        )),
        "{e}"
    );
    let missing = dir.join("missing.toml");
    let e = settings::load_from_process(Some(&missing), &flags()).unwrap_err();
    assert!(matches!(e, SettingsError::Read { .. }), "{e:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
