//! `GET /metrics` against the real binary (and a real Redfish BMC, sushy-tools), parsed by
//! the reference Python parser
//! (prometheus_client's OpenMetrics parser): the series move as workflows run — started,
//! active, finished, task durations, failures and retries by job, BMC operations of the
//! simulated driver, store commits — on the management listener and on a metrics listener of
//! its own.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use support::Server;
use support::peers::{Sushy, SushyOptions, system_uuid};
use tokio::io::AsyncWriteExt;

/// Every sample of one scrape: name, labels, value.
struct Scrape(Vec<(String, serde_json::Map<String, Value>, f64)>);

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; none when absent.
    /// Panics when more than one sample matches, so that a test names its series exactly.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(matching.len() <= 1, "{name} {labels:?} is not one series");
        matching.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

/// Scrapes `url` with `http` (the management listener needs a token and its CA; the
/// metrics listener is plain and open).
async fn scrape_with(http: &reqwest::Client, url: &str) -> Scrape {
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    let mut child = tokio::process::Command::new(metalgraph_testkit::venv_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/parse_metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the venv's python runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    Scrape(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_workflows_tasks_bmcs_and_the_store() {
    let data = tempfile::tempdir().unwrap();
    let port = metalgraph_testkit::free_tcp_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(
        data.path(),
        "sled",
        &["--demo", "--metrics-listen", &listen],
    );
    let api = server.api();
    let separate = format!("http://{listen}/metrics");
    for g in [
        "{injectableName: Mx.G, tasks: [
            {label: a, taskName: Task.Noop},
            {label: b, taskDefinition: {injectableName: Mx.Fail, implementsTask: fail, options: {message: no}},
             retries: {max: 1, backoff: 100ms}, waitOn: {a: succeeded}},
            {label: c, taskName: Task.Noop, waitOn: {b: failed}}]}",
        "{injectableName: Mx.Slow, tasks: [{label: nap, taskName: Task.Wait, optionOverrides: {duration: 3s}}]}",
    ] {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert_eq!(code, 201, "{body}");
    }

    let plain = reqwest::Client::new();
    let before = scrape_with(&plain, &separate).await;
    assert_eq!(
        before.value(
            "metalgraph_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(before.value("metalgraph_job_slots", &[]), 256.0);
    assert_eq!(
        before.get("metalgraph_workflows_started_total", &[("graph", "Mx.G")]),
        None
    );
    // Network boot is off: its counters are there, at zero.
    assert_eq!(before.value("metalgraph_dhcp_malformed_total", &[]), 0.0);
    assert_eq!(before.value("metalgraph_tftp_sent_bytes_total", &[]), 0.0);

    // While a workflow runs, it is active and its job holds a slot.
    let slow = api.run("Mx.Slow", None, json!({})).await;
    api.wait_task(&slow, "nap", "running", Duration::from_secs(10))
        .await;
    // The gauges are set once the step that started the job has been performed, a moment
    // after the API shows the task running.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let during = loop {
        let s = scrape_with(&server.http(), &format!("{}/metrics", server.base)).await;
        if s.value("metalgraph_job_slots_in_use", &[]) > 0.0 || std::time::Instant::now() > deadline
        {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(during.value("metalgraph_workflows_active", &[]), 1.0);
    assert_eq!(during.value("metalgraph_job_slots_in_use", &[]), 1.0);
    api.wait(&slow, Duration::from_secs(30)).await;

    let done = api
        .run_wait("Mx.G", None, json!({}), Duration::from_secs(30))
        .await;
    let status = done["status"].as_str().unwrap().to_owned();
    let reboot = api
        .run_wait(
            "Graph.Reboot.Node",
            Some("demo-node-01"),
            json!({}),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(reboot["status"], "succeeded", "{reboot:#}");

    let after = scrape_with(&plain, &separate).await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.get(name, labels).unwrap_or(0.0)
    };
    assert_eq!(
        after.value("metalgraph_workflows_started_total", &[("graph", "Mx.G")]),
        1.0
    );
    assert_eq!(
        after.value(
            "metalgraph_workflows_finished_total",
            &[("graph", "Mx.G"), ("status", &status)]
        ),
        1.0
    );
    assert_eq!(
        after.value(
            "metalgraph_workflows_finished_total",
            &[("graph", "Graph.Reboot.Node"), ("status", "succeeded")]
        ),
        1.0
    );
    assert_eq!(after.value("metalgraph_workflows_active", &[]), 0.0);
    assert_eq!(after.value("metalgraph_job_slots_in_use", &[]), 0.0);
    // a and c ran once each; b failed twice (one retry), by the job's own error.
    assert_eq!(
        grew(
            "metalgraph_task_duration_seconds_count",
            &[("job", "noop"), ("outcome", "succeeded")]
        ),
        2.0
    );
    assert_eq!(
        after.value(
            "metalgraph_task_duration_seconds_count",
            &[("job", "fail"), ("outcome", "failed")]
        ),
        2.0
    );
    assert_eq!(
        after.value(
            "metalgraph_task_failures_total",
            &[("job", "fail"), ("reason", "error")]
        ),
        2.0
    );
    assert_eq!(
        after.value("metalgraph_task_retries_total", &[("job", "fail")]),
        1.0
    );
    assert_eq!(
        after.value(
            "metalgraph_task_duration_seconds_count",
            &[("job", "sleep"), ("outcome", "succeeded")]
        ),
        1.0
    );
    // The reboot went through the simulated BMC: a power action, then power-state reads.
    assert!(
        grew(
            "metalgraph_bmc_request_duration_seconds_count",
            &[("driver", "sim"), ("operation", "power_action")]
        ) >= 1.0
    );
    assert_eq!(
        after.get(
            "metalgraph_bmc_request_errors_total",
            &[("driver", "sim"), ("operation", "power_action")]
        ),
        None
    );
    assert!(grew("metalgraph_store_commit_duration_seconds_count", &[]) > 0.0);
    assert!(grew("metalgraph_store_commit_ops_sum", &[]) > 0.0);
    assert!(grew("metalgraph_events_total", &[]) >= 11.0);
    assert_eq!(
        after.value("metalgraph_store_commit_errors_total", &[]),
        0.0
    );

    // The metrics listener serves nothing else.
    let resp = reqwest::get(format!("http://{listen}/api/2.0/nodes"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redfish_operations_and_their_failures_are_measured_against_a_real_bmc() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        auth: Some(("admin".into(), "Metrics-pw".into())),
        ..SushyOptions::default()
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    let node = |password: &str| {
        json!({"name": format!("redfish-{password}"), "obms": [{"service": "redfish-obm-service",
            "config": {"host": sushy.base, "systemId": system_uuid(0), "user": "admin",
                       "password": password}}]})
    };
    let good = api.create_node(node("Metrics-pw")).await;
    let bad = api.create_node(node("wrong-pw")).await;
    let url = format!("{}/metrics", server.base);
    let before = scrape_with(&server.http(), &url).await;
    let limit = Duration::from_secs(60);
    let ok = api
        .run_wait("Graph.PowerOff.Node", Some(&good), json!({}), limit)
        .await;
    assert_eq!(ok["status"], "succeeded", "{ok:#}");
    let failed = api
        .run_wait("Graph.PowerOff.Node", Some(&bad), json!({}), limit)
        .await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    let after = scrape_with(&server.http(), &url).await;
    let redfish = |s: &Scrape, name: &str| -> f64 {
        s.0.iter()
            .filter(|(n, l, _)| {
                n == name && l.get("driver").and_then(Value::as_str) == Some("redfish")
            })
            .map(|(_, _, v)| v)
            .sum()
    };
    // The good node's power was read (and switched); the bad node's password was refused,
    // each refusal counted as an error of the operation that met it.
    let calls = "metalgraph_bmc_request_duration_seconds_count";
    let errors = "metalgraph_bmc_request_errors_total";
    assert!(redfish(&after, calls) - redfish(&before, calls) >= 2.0);
    assert!(
        after
            .get(
                calls,
                &[("driver", "redfish"), ("operation", "power_state")]
            )
            .is_some()
    );
    assert!(redfish(&after, errors) - redfish(&before, errors) >= 1.0);
    server.terminate();
}
