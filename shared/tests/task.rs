//! Submission parsing and validation (SPEC §1.1), ids, workflows and the task record (§1.2).

use drover_shared::error::ErrorCode;
use drover_shared::task::*;
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn one(json: &str) -> Result<TaskSpec, drover_shared::error::ApiError> {
    parse_submission(json.as_bytes(), MAX).map(|mut s| s.tasks.remove(0))
}

fn err(json: &str) -> drover_shared::error::ApiError {
    parse_submission(json.as_bytes(), MAX).expect_err(json)
}

#[test]
fn minimal_task_takes_defaults() {
    let t = one(r#"{"type":"noop"}"#).unwrap();
    assert_eq!(t.task_type, "noop");
    assert_eq!(t.payload.get(), "null");
    assert_eq!(t.effective_max_attempts(), 3);
    assert!(t.id.is_none() && t.key.is_none() && t.depends_on.is_empty());
    assert_eq!(t.shards, Shards::One);
}

#[test]
fn every_field_parses_and_payload_passes_through_byte_for_byte() {
    let json = r#"{"type":"mail.send","payload":{"z":1,"a":[1, 2 ,3],"u":"\u00e9"},"id":"order-42",
        "key":"customer-7","max_attempts":5,"backoff":{"initial_ms":10},"timeout_ms":1000,
        "delay_ms":250,"depends_on":["a","b","a"],"shards":4,"unique_key":"k","unique_for_ms":1500,
        "meta":{"team":"billing"}}"#;
    let t = one(json).unwrap();
    assert_eq!(t.payload.get(), r#"{"z":1,"a":[1, 2 ,3],"u":"\u00e9"}"#);
    assert_eq!(t.id.as_deref(), Some("order-42"));
    assert_eq!(t.key.as_deref(), Some("customer-7"));
    assert_eq!(t.max_attempts, Some(5));
    assert_eq!(t.timeout_ms, Some(1000));
    assert_eq!(t.delay_ms, Some(250));
    assert_eq!(
        t.depends_on,
        vec!["a", "b"],
        "repeated dependencies are folded"
    );
    assert_eq!(t.shards, Shards::Count(4));
    assert_eq!(t.unique_for_ms, Some(1500));
    assert_eq!(t.meta["team"], "billing");
    // The wire form parses back to the same task.
    let again = TaskSpec::from_json(&serde_json::to_vec(&t).unwrap()).unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        serde_json::to_string(&t).unwrap()
    );
}

#[test]
fn run_at_is_parsed_to_utc_and_sets_not_before() {
    let t = one(r#"{"type":"x","run_at":"2030-01-01T01:00:00+01:00"}"#).unwrap();
    let at = t.run_at.unwrap();
    assert_eq!(format_time(&at), "2030-01-01T00:00:00.000Z");
    assert_eq!(t.not_before(chrono::Utc::now()), Some(at));
    let t = one(r#"{"type":"x","shards":"all"}"#).unwrap();
    assert_eq!(t.shards, Shards::All);
}

#[test]
fn unknown_fields_are_named() {
    let e = err(r#"{"type":"x","priority":3}"#);
    assert_eq!(e.code, ErrorCode::UnknownField);
    assert_eq!(e.field.as_deref(), Some("priority"));
    assert!(e.message.contains("`priority`"), "{}", e.message);
    assert!(e.message.contains("max_attempts"), "lists the known fields");
}

#[test]
fn each_rule_names_its_field() {
    let cases: &[(&str, &str, &str)] = &[
        (r#"{}"#, "type", "required"),
        (r#"{"type":""}"#, "type", "[A-Za-z0-9_.:-]{1,64}"),
        (r#"{"type":"a b"}"#, "type", "got \"a b\""),
        (r#"{"type":7}"#, "type", "got 7"),
        (r#"{"type":"x","id":"_mine"}"#, "id", "reserved"),
        (r#"{"type":"x","id":"a.b"}"#, "id", "[A-Za-z0-9]"),
        (r#"{"type":"x","key":""}"#, "key", "not be empty"),
        (
            r#"{"type":"x","max_attempts":0}"#,
            "max_attempts",
            "1 to 100",
        ),
        (
            r#"{"type":"x","max_attempts":101}"#,
            "max_attempts",
            "got 101",
        ),
        (
            r#"{"type":"x","max_attempts":"3"}"#,
            "max_attempts",
            "integer",
        ),
        (r#"{"type":"x","timeout_ms":0}"#, "timeout_ms", "at least 1"),
        (r#"{"type":"x","delay_ms":-1}"#, "delay_ms", "non-negative"),
        (r#"{"type":"x","run_at":"tomorrow"}"#, "run_at", "RFC 3339"),
        (
            r#"{"type":"x","run_at":"2030-01-01T00:00:00Z","delay_ms":5}"#,
            "delay_ms",
            "run_at",
        ),
        (r#"{"type":"x","depends_on":"a"}"#, "depends_on", "array"),
        (
            r#"{"type":"x","depends_on":["a b"]}"#,
            "depends_on",
            "not a task id",
        ),
        (r#"{"type":"x","shards":0}"#, "shards", "1 to 1024"),
        (r#"{"type":"x","shards":1025}"#, "shards", "1 to 1024"),
        (r#"{"type":"x","shards":"some"}"#, "shards", "\"all\""),
        (
            r#"{"type":"x","unique_key":"k"}"#,
            "unique_for_ms",
            "required",
        ),
        (
            r#"{"type":"x","unique_for_ms":5}"#,
            "unique_key",
            "required",
        ),
        (r#"{"type":"x","meta":{"a":1}}"#, "meta", "strings"),
        (
            r#"{"type":"x","backoff":{"initial":1}}"#,
            "backoff",
            "initial_ms",
        ),
        (r#"{"type":"x","type":"y"}"#, "type", "more than once"),
        (
            r#"{"type":"x","backoff":{"factor":0.5}}"#,
            "backoff.factor",
            ">= 1.0",
        ),
        (
            r#"{"type":"x","backoff":{"initial_ms":10,"max_ms":5}}"#,
            "backoff.max_ms",
            "initial_ms",
        ),
    ];
    for (json, field, needle) in cases {
        let e = err(json);
        assert_eq!(e.code, ErrorCode::InvalidField, "{json}: {e}");
        assert_eq!(e.field.as_deref(), Some(*field), "{json}: {e}");
        assert!(
            e.message.contains(field),
            "{json}: message names the field: {e}"
        );
        assert!(e.message.contains(needle), "{json}: {e} lacks {needle:?}");
    }
    let long = format!(r#"{{"type":"x","key":"{}"}}"#, "k".repeat(257));
    assert!(err(&long).message.contains("256 bytes"));
}

#[test]
fn shape_errors() {
    assert_eq!(err("{\"type\":").code, ErrorCode::InvalidJson);
    assert_eq!(err("").code, ErrorCode::InvalidJson);
    assert_eq!(err("nonsense").code, ErrorCode::InvalidJson);
    let e = err("42");
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.contains("object"));
    assert!(err("[]").message.contains("at least one task"));
    let big = format!(r#"{{"type":"x","payload":"{}"}}"#, "a".repeat(2000));
    let e = parse_submission(big.as_bytes(), 1000).unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge);
    assert!(e.message.contains("1000 bytes"), "{e}");
}

#[test]
fn arrays_are_all_or_nothing_and_locate_the_bad_element() {
    let ok = parse_submission(br#"[{"type":"a"},{"type":"b","key":"k"}]"#, MAX).unwrap();
    assert!(ok.is_array);
    assert_eq!(ok.tasks.len(), 2);
    let e = err(r#"[{"type":"a"},{"type":"b"},{"type":"c","nope":1}]"#);
    assert_eq!(e.code, ErrorCode::UnknownField);
    assert_eq!(e.index, Some(2));
    let e = err(r#"[{"type":"a"}, 7]"#);
    assert_eq!(e.index, Some(1));
}

#[test]
fn ids_follow_the_rules() {
    let mut s = parse_submission(br#"{"type":"a"}"#, MAX).unwrap();
    assign_ids(&mut s, None, 17).unwrap();
    assert_eq!(s.tasks[0].id.as_deref(), Some("_s17"));

    let mut s = parse_submission(br#"{"type":"a"}"#, MAX).unwrap();
    assign_ids(&mut s, Some("job-1"), 17).unwrap();
    assert_eq!(s.tasks[0].id.as_deref(), Some("job-1"));

    let mut s = parse_submission(br#"{"type":"a","id":"mine"}"#, MAX).unwrap();
    assign_ids(&mut s, Some("job-1"), 17).unwrap();
    assert_eq!(s.tasks[0].id.as_deref(), Some("mine"), "a client id wins");

    let mut s =
        parse_submission(br#"[{"type":"a"},{"type":"b","id":"x"},{"type":"c"}]"#, MAX).unwrap();
    assign_ids(&mut s, Some("wf"), 9).unwrap();
    let ids: Vec<_> = s.tasks.iter().map(|t| t.id.clone().unwrap()).collect();
    assert_eq!(ids, ["wf-0", "x", "wf-2"]);

    let mut s = parse_submission(br#"[{"type":"a"},{"type":"b"}]"#, MAX).unwrap();
    assign_ids(&mut s, None, 5).unwrap();
    assert_eq!(s.tasks[1].id.as_deref(), Some("_s5-1"));

    let mut s = parse_submission(br#"{"type":"a"}"#, MAX).unwrap();
    let e = assign_ids(&mut s, Some("bad id!"), 1).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.contains("Nats-Msg-Id"), "{e}");

    let mut s = parse_submission(br#"[{"type":"a","id":"d"},{"type":"b","id":"d"}]"#, MAX).unwrap();
    let e = assign_ids(&mut s, None, 1).unwrap_err();
    assert_eq!((e.code, e.index), (ErrorCode::Duplicate, Some(1)));
}

fn workflow(json: &str) -> Result<Vec<String>, drover_shared::error::ApiError> {
    let mut s = parse_submission(json.as_bytes(), MAX).unwrap();
    assign_ids(&mut s, None, 1).unwrap();
    check_workflow(&s.tasks)
}

#[test]
fn workflows_reject_cycles_and_report_external_dependencies() {
    let dag = r#"[{"type":"t","id":"a"},{"type":"t","id":"b","depends_on":["a"]},
        {"type":"t","id":"c","depends_on":["a"]},{"type":"t","id":"d","depends_on":["b","c","old"]}]"#;
    assert_eq!(workflow(dag).unwrap(), vec!["old"]);
    let cyc = r#"[{"type":"t","id":"a","depends_on":["c"]},{"type":"t","id":"b","depends_on":["a"]},
        {"type":"t","id":"c","depends_on":["b"]},{"type":"t","id":"z"}]"#;
    let e = workflow(cyc).unwrap_err();
    assert_eq!(e.code, ErrorCode::Cycle);
    assert!(e.index.unwrap() < 3);
    let e = workflow(r#"{"type":"t","id":"self","depends_on":["self"]}"#).unwrap_err();
    assert_eq!(e.code, ErrorCode::Cycle);
}

#[test]
fn normalized_task_and_record_wire_forms() {
    let mut s = parse_submission(
        br#"{"type":"echo","payload":[1],"key":"k","meta":{"a":"b"}}"#,
        MAX,
    )
    .unwrap();
    assign_ids(&mut s, Some("t1"), 1).unwrap();
    let task = Task::first_attempt(
        &s.tasks[0],
        "default",
        DEFAULT_TIMEOUT_MS,
        1_700_000_000_000,
    );
    assert_eq!(task.idempotency_key(), "t1:1");
    let json = serde_json::to_string(&task).unwrap();
    assert_eq!(
        json,
        r#"{"id":"t1","queue":"default","type":"echo","payload":[1],"attempt":1,"max_attempts":3,"timeout_ms":300000,"key":"k","submitted_ms":1700000000000,"meta":{"a":"b"}}"#
    );
    let back: Task = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), json);

    let at = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00.5Z")
        .unwrap()
        .to_utc();
    let mut rec = TaskRecord::new(&task, TaskState::Succeeded, at);
    rec.finished_at = Some(at);
    let v: serde_json::Value = serde_json::to_value(&rec).unwrap();
    for k in [
        "id",
        "queue",
        "type",
        "state",
        "attempt",
        "max_attempts",
        "key",
        "worker",
        "partition",
        "submitted_at",
        "started_at",
        "finished_at",
        "next_run_at",
        "duration_ms",
        "error",
        "result",
        "parent",
        "shard",
        "meta",
    ] {
        assert!(v.get(k).is_some(), "record lacks {k}: {v}");
    }
    assert_eq!(v["submitted_at"], "2026-11-24T10:00:00.500Z");
    assert_eq!(v["state"], "succeeded");
    let back: TaskRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back.finished_at, Some(at));
}

#[test]
fn states() {
    let terminal: Vec<_> = TaskState::ALL.iter().filter(|s| s.is_terminal()).collect();
    assert_eq!(
        terminal,
        [
            &TaskState::Succeeded,
            &TaskState::Failed,
            &TaskState::Cancelled,
            &TaskState::UpstreamFailed
        ]
    );
    assert_eq!(
        serde_json::to_string(&TaskState::UpstreamFailed).unwrap(),
        "\"upstream_failed\""
    );
    assert!(!ErrorKind::UnknownType.is_retryable());
    assert!(ErrorKind::Timeout.is_retryable());
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_submission(&bytes, MAX);
    }

    #[test]
    fn random_task_objects_never_panic(
        keys in proptest::collection::vec(prop::sample::select(TASK_FIELDS.to_vec()), 0..6),
        vals in proptest::collection::vec(prop_oneof![
            Just("null".to_string()), Just("\"all\"".to_string()), any::<i64>().prop_map(|n| n.to_string()),
            "[a-z_]{0,8}".prop_map(|s| format!("\"{s}\"")), Just("[\"a\"]".to_string()),
            Just("{\"a\":\"b\"}".to_string()), any::<f64>().prop_map(|f| format!("{f:?}")),
        ], 6),
    ) {
        let body: Vec<String> = keys.iter().zip(&vals).map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let json = format!("{{\"type\":\"t\",{}}}", body.join(","));
        let _ = parse_submission(json.as_bytes(), MAX);
    }
}
