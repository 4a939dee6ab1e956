//! `drover bench`: every scenario at a tiny size against a fleet the command spawns itself; the
//! JSON report has the documented shape and sane values (rates > 0, ratios to the raw baseline
//! present, nothing lost), and the plots are written. Speed is not asserted.

use std::process::Command;

fn drover() -> Command {
    let mut cmd = Command::new(drover_tests::drover_bin("drover"));
    cmd.current_dir(drover_tests::workspace_root())
        .env("DROVER_NATS_SERVER", drover_tests::nats_server_binary())
        .env_remove("DROVER_KEYS");
    cmd
}

#[test]
fn every_scenario_reports_sane_json() {
    let plots = tempfile::tempdir().unwrap();
    let out = drover()
        .args([
            "bench",
            "all",
            "--tasks",
            "2000",
            "--array",
            "50",
            "--rates",
            "100,400",
            "--duration",
            "1.5",
            "--trials",
            "1",
            "--kill-every",
            "1",
            "--failover-rate",
            "300",
            "--output",
            "json",
            "--plot",
        ])
        .arg(plots.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "drover bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));

    let raw = &report["raw"];
    assert!(raw["publish_rate"].as_f64().unwrap() > 0.0, "{raw}");
    assert!(raw["publish_consume_rate"].as_f64().unwrap() > 0.0, "{raw}");
    assert_eq!(raw["message_bytes"], 200, "{raw}");
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(report["target"]["mode"], "spawn");

    let sections = report["sections"].as_array().unwrap();
    let names: Vec<&str> = sections
        .iter()
        .map(|s| s["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "throughput-single",
            "throughput-array",
            "latency",
            "failover",
            "recovery",
            "memory"
        ]
    );
    for s in sections {
        assert_eq!(s["lost"], 0, "{s}");
        let rows = s["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{s}");
        for r in rows {
            let value = r["value"].as_f64().unwrap();
            assert!(value.is_finite() && value >= 0.0, "{r}");
            if r["unit"] == "tasks/s" {
                assert!(value > 0.0, "{r}");
                for ratio in ["x_raw_publish", "x_raw_publish_consume"] {
                    assert!(r[ratio].as_f64().is_some_and(|x| x > 0.0), "{r}");
                }
            }
            if r["target"].is_string() {
                assert!(r["met"].is_boolean(), "{r}");
            }
        }
    }
    let by = |name: &str| sections.iter().find(|s| s["scenario"] == name).unwrap();
    let single = &by("throughput-single")["detail"];
    assert_eq!(single["succeeded"], 2000, "{single}");
    assert_eq!(by("throughput-array")["detail"]["messages"], 40);
    let rates = by("latency")["detail"]["rates"].as_array().unwrap();
    assert_eq!(rates.len(), 2);
    for r in rates {
        assert!(
            r["submit_to_start_ms"]["count"].as_u64().unwrap() > 0,
            "{r}"
        );
        assert!(
            r["submit_to_succeeded_ms"]["p99"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    let failover = &by("failover")["detail"];
    for signal in ["sigkill", "sigterm"] {
        let trials = failover[signal]["trials_ms"].as_array().unwrap();
        assert_eq!(trials.len(), 1, "{failover}");
        assert!(trials[0].as_f64().unwrap() > 0.0, "{failover}");
    }
    assert!(failover["submitted"].as_u64().unwrap() > 0);
    let recovery = &by("recovery")["detail"];
    assert!(recovery["tasks_moved"].as_u64().unwrap() > 0, "{recovery}");
    assert!(
        recovery["restart_ms"]["count"].as_u64().unwrap() > 0,
        "{recovery}"
    );
    let memory = &by("memory")["detail"];
    for k in ["dispatcher_idle_mib", "worker_idle_mib", "worker_peak_mib"] {
        assert!(memory[k].as_f64().unwrap() > 1.0, "{memory}");
    }

    for plot in ["throughput.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(plots.path().join(plot)).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("drover bench"),
            "{plot}"
        );
    }
}

#[test]
fn process_scenarios_refuse_an_existing_fleet() {
    for scenario in ["failover", "recovery", "memory", "all"] {
        let out = drover()
            .args(["bench", scenario, "--nats-url", "nats://127.0.0.1:1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{scenario}: {stderr}");
        assert!(stderr.contains("--spawn"), "{scenario}: {stderr}");
    }
}
