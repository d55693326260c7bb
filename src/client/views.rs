//! What the client prints for each kind of answer: a table for people (the default), or the
//! API's own object as JSON or YAML for machines. Pure functions of the answer and the
//! current time, so every view is tested without a server.

use std::collections::BTreeMap;

use anyhow::Context as _;
use metalgraph_engine::WorkflowView;
use metalgraph_engine::clock::parse_rfc3339;
use metalgraph_engine::model::TaskState;
use serde_json::Value;

use super::draw;
use super::table::{Table, fields};

/// How answers are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people; long fields are cut with `…`.
    #[default]
    Table,
    /// The API's objects as pretty JSON.
    Json,
    /// The API's objects as YAML.
    Yaml,
}

/// What an answer holds, which decides its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Graphs,
    Graph,
    Tasks,
    Task,
    Nodes,
    Node,
    Workflows,
    Workflow,
    Tokens,
    NewToken,
    Endpoints,
    Endpoint,
    Systems,
    Batches,
    Batch,
}

/// The most characters an error shows in a table; the whole text is in `-o yaml`.
const ERROR_WIDTH: usize = 60;
/// The most characters a name, tag list and the like show in a table.
const TEXT_WIDTH: usize = 48;
/// Descriptions are a last column, so they may run longer.
const DESCRIPTION_WIDTH: usize = 72;
/// Ids are never cut: they are what the next command needs.
const ID_WIDTH: usize = 64;

/// Renders an answer of the given shape; `now_ms` (epoch milliseconds) times what is still
/// running.
pub fn render(output: Output, shape: Shape, answer: &Value, now_ms: u64) -> anyhow::Result<String> {
    match output {
        Output::Json => Ok(serde_json::to_string_pretty(answer)? + "\n"),
        Output::Yaml => serde_yaml::to_string(answer).context("cannot write the answer as YAML"),
        Output::Table => Ok(match shape {
            Shape::Graphs => graphs(answer),
            Shape::Graph => graph(answer),
            Shape::Tasks => tasks(answer),
            Shape::Task => task(answer),
            Shape::Nodes => nodes(answer),
            Shape::Node => node(answer),
            Shape::Workflows => {
                let list: Vec<WorkflowView> = serde_json::from_value(answer.clone())
                    .context("the server answered with something that is not a workflow list")?;
                workflows(&list, now_ms)
            }
            Shape::Workflow => {
                let view: WorkflowView = serde_json::from_value(answer.clone())
                    .context("the server answered with something that is not a workflow")?;
                workflow(&view, now_ms)
            }
            Shape::Tokens => tokens(answer),
            Shape::NewToken => new_token(answer),
            Shape::Endpoints => endpoints(answer),
            Shape::Endpoint => endpoint(answer),
            Shape::Systems => systems(answer),
            Shape::Batches => batches(answer),
            Shape::Batch => batch(answer),
        }),
    }
}

/// `endpoints list`: each endpoint with what uses it.
pub fn endpoints(list: &Value) -> String {
    let mut t = Table::new(&[
        ("ID", ID_WIDTH),
        ("NAME", TEXT_WIDTH),
        ("SERVICE", 7),
        ("URL", TEXT_WIDTH),
        ("SYSTEMS", 7),
        ("NODES", 5),
        ("ACTIVE", 6),
        ("LAST CONTACT", 24),
        ("LAST ERROR", ERROR_WIDTH),
    ]);
    for e in items(list) {
        t.row(&[
            text(e, "id"),
            text(e, "name"),
            text(e, "service"),
            text(e, "url"),
            text(e, "systemsSeen"),
            text(e, "nodes"),
            text(e, "activeWorkflows"),
            text(e, "lastContact"),
            text(e, "lastError"),
        ]);
    }
    t.render()
}

/// `endpoints get`: one endpoint; never a password (the server has none to show).
pub fn endpoint(e: &Value) -> String {
    fields(&[
        ("Endpoint", text(e, "id")),
        ("Name", text(e, "name")),
        ("Service", text(e, "service")),
        ("URL", text(e, "url")),
        ("User", text(e, "user")),
        ("Password set", text(e, "passwordSet")),
        ("Verify TLS", text(e, "verifySSL")),
        ("Systems seen", text(e, "systemsSeen")),
        ("Nodes", text(e, "nodes")),
        ("Active workflows", text(e, "activeWorkflows")),
        ("Last contact", text(e, "lastContact")),
        ("Last error", text(e, "lastError")),
    ])
}

/// `endpoints systems`: the systems behind endpoints, and the node each is; endpoints
/// that could not be read follow.
pub fn systems(answer: &Value) -> String {
    let (list, errors) = match answer.get("systems") {
        Some(list) => (list, answer.get("errors").unwrap_or(&Value::Null)),
        None => (answer, &Value::Null),
    };
    let mut t = Table::new(&[
        ("ENDPOINT", TEXT_WIDTH),
        ("SYSTEM", TEXT_WIDTH),
        ("NAME", TEXT_WIDTH),
        ("POWER", 8),
        ("MANUFACTURER", TEXT_WIDTH),
        ("MODEL", TEXT_WIDTH),
        ("NODE", ID_WIDTH),
    ]);
    for s in items(list) {
        t.row(&[
            text(s.get("endpoint").unwrap_or(&Value::Null), "name"),
            text(s, "systemId"),
            text(s, "name"),
            text(s, "powerState"),
            text(s, "manufacturer"),
            text(s, "model"),
            text(s, "node"),
        ]);
    }
    let mut out = t.render();
    for e in items(errors) {
        out.push_str(&format!(
            "endpoint {}: {}\n",
            text(e.get("endpoint").unwrap_or(&Value::Null), "name"),
            super::table::clean(&text(e, "error"))
        ));
    }
    out
}

/// `batches list`.
pub fn batches(list: &Value) -> String {
    let mut t = Table::new(&[
        ("ID", ID_WIDTH),
        ("GRAPH", TEXT_WIDTH),
        ("STATE", 10),
        ("DONE", 9),
        ("FAILED", 6),
        ("RUNNING", 7),
        ("CREATED", 24),
    ]);
    for b in items(list) {
        let count = |k: &str| {
            b.pointer(&format!("/counts/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        t.row(&[
            text(b, "id"),
            text(b, "name"),
            text(b, "state"),
            format!("{}/{}", count("succeeded"), text(b, "total")),
            count("failed").to_string(),
            (count("running") + count("starting")).to_string(),
            text(b, "createdAt"),
        ]);
    }
    t.render()
}

/// `batches get`: the batch, its counts, and a row per node.
pub fn batch(b: &Value) -> String {
    let counts = b
        .get("counts")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let mut out = fields(&[
        ("Batch", text(b, "id")),
        ("Graph", text(b, "name")),
        ("State", text(b, "state")),
        ("Nodes", text(b, "total")),
        ("Counts", counts),
        ("At once", text(b, "maxConcurrent")),
        ("Stopped", text(b, "stopped")),
        ("Created", text(b, "createdAt")),
        ("Finished", text(b, "finishedAt")),
    ]);
    let mut t = Table::new(&[
        ("NODE", ID_WIDTH),
        ("STATUS", 10),
        ("WORKFLOW", ID_WIDTH),
        ("REASON", ERROR_WIDTH),
    ]);
    for e in items(b.get("entries").unwrap_or(&Value::Null)) {
        t.row(&[
            text(e, "node"),
            text(e, "status"),
            text(e, "workflow"),
            text(e, "reason"),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

/// `tokens list`: names and roles, never a secret (the server has none to give).
pub fn tokens(list: &Value) -> String {
    let mut t = Table::new(&[
        ("NAME", ID_WIDTH),
        ("ROLE", 8),
        ("CREATED", 24),
        ("LAST USED", 24),
    ]);
    for k in items(list) {
        t.row(&[
            text(k, "name"),
            text(k, "role"),
            text(k, "createdAt"),
            text(k, "lastUsed"),
        ]);
    }
    t.render()
}

/// `tokens create`: the token, which is shown this once.
pub fn new_token(k: &Value) -> String {
    let mut out = fields(&[
        ("Token", text(k, "name")),
        ("Role", text(k, "role")),
        ("Secret", text(k, "token")),
    ]);
    out.push_str("\nThe secret is shown only now; the server keeps only its hash.\n");
    out
}

/// `graphs list`.
pub fn graphs(list: &Value) -> String {
    let mut t = Table::new(&[
        ("NAME", TEXT_WIDTH),
        ("TASKS", 5),
        ("SOURCE", 7),
        ("DESCRIPTION", DESCRIPTION_WIDTH),
    ]);
    for g in items(list) {
        let count = g.get("tasks").and_then(Value::as_array).map_or(0, Vec::len);
        t.row(&[
            text(g, "injectableName"),
            count.to_string(),
            text(g, "source"),
            text(g, "friendlyName"),
        ]);
    }
    t.render()
}

/// `graphs get`: the graph, its tasks with what they wait on, and its option layers.
pub fn graph(g: &Value) -> String {
    let mut out = fields(&[
        ("Graph", text(g, "injectableName")),
        ("Description", text(g, "friendlyName")),
        ("Source", text(g, "source")),
        ("Timeout", text(g, "timeout")),
    ]);
    let mut t = Table::new(&[
        ("LABEL", TEXT_WIDTH),
        ("TASK", TEXT_WIDTH),
        ("WAITS ON", TEXT_WIDTH),
        ("NOTES", TEXT_WIDTH),
    ]);
    for task in items(g.get("tasks").unwrap_or(&Value::Null)) {
        let waits: Vec<String> = draw::waits(task)
            .iter()
            .map(|w| format!("{}: {}", w.label, w.describe()))
            .collect();
        let mut notes = Vec::new();
        if task.get("ignoreFailure").and_then(Value::as_bool) == Some(true) {
            notes.push("ignoreFailure".to_owned());
        }
        if let Some(r) = task.get("retries") {
            let max = r.get("max").map(scalar).unwrap_or_default();
            match r.get("backoff") {
                Some(b) => notes.push(format!("retries {max} (backoff {})", scalar(b))),
                None => notes.push(format!("retries {max}")),
            }
        }
        if let Some(timeout) = task.get("timeout") {
            notes.push(format!("timeout {}", scalar(timeout)));
        }
        t.row(&[
            text(task, "label"),
            draw::task_of(task),
            waits.join(", "),
            notes.join(", "),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    let options = option_rows(g.get("options"));
    if !options.is_empty() {
        let mut t = Table::new(&[
            ("SCOPE", TEXT_WIDTH),
            ("OPTION", TEXT_WIDTH),
            ("VALUE", TEXT_WIDTH),
        ]);
        for (scope, key, value) in options {
            t.row(&[scope, key, value]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

/// `tasks list`.
pub fn tasks(list: &Value) -> String {
    let mut t = Table::new(&[
        ("NAME", TEXT_WIDTH),
        ("JOB", TEXT_WIDTH),
        ("SOURCE", 7),
        ("DESCRIPTION", DESCRIPTION_WIDTH),
    ]);
    for d in items(list) {
        t.row(&[
            text(d, "injectableName"),
            text(d, "implementsTask"),
            text(d, "source"),
            text(d, "friendlyName"),
        ]);
    }
    t.render()
}

/// `tasks get`: the definition and its default options.
pub fn task(d: &Value) -> String {
    let mut out = fields(&[
        ("Task", text(d, "injectableName")),
        ("Description", text(d, "friendlyName")),
        ("Job", text(d, "implementsTask")),
        ("Source", text(d, "source")),
    ]);
    if let Some(options) = d.get("options").and_then(Value::as_object) {
        let mut t = Table::new(&[("OPTION", TEXT_WIDTH), ("DEFAULT", TEXT_WIDTH)]);
        for (k, v) in options {
            t.row(&[k.clone(), scalar(v)]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

/// `nodes list`.
pub fn nodes(list: &Value) -> String {
    let mut t = Table::new(&[
        ("ID", ID_WIDTH),
        ("NAME", TEXT_WIDTH),
        ("TYPE", 16),
        ("OBM", TEXT_WIDTH),
        ("IDENTIFIERS", TEXT_WIDTH),
        ("TAGS", TEXT_WIDTH),
    ]);
    for n in items(list) {
        let obm = items(n.get("obms").unwrap_or(&Value::Null))
            .first()
            .map(obm_summary)
            .unwrap_or_default();
        t.row(&[
            text(n, "id"),
            text(n, "name"),
            text(n, "type"),
            obm,
            list_text(n, "identifiers"),
            list_text(n, "tags"),
        ]);
    }
    t.render()
}

/// `nodes get` and `nodes create`.
pub fn node(n: &Value) -> String {
    let mut pairs = vec![
        ("Node", text(n, "id")),
        ("Name", text(n, "name")),
        ("Type", text(n, "type")),
        ("Identifiers", list_text(n, "identifiers")),
        ("Tags", list_text(n, "tags")),
    ];
    for o in items(n.get("obms").unwrap_or(&Value::Null)) {
        let config = o.get("config").unwrap_or(&Value::Null);
        let mut parts = vec![obm_summary(o)];
        if let Some(user) = config.get("user").and_then(Value::as_str) {
            parts.push(format!("user {user}"));
        }
        if config.get("passwordSet").and_then(Value::as_bool) == Some(true) {
            parts.push("password set".to_owned());
        }
        pairs.push(("OBM", parts.join(", ")));
    }
    pairs.push(("Created", when(&text(n, "createdAt"))));
    pairs.push(("Updated", when(&text(n, "updatedAt"))));
    fields(&pairs)
}

/// `workflows list`, newest first as the server orders it.
pub fn workflows(list: &[WorkflowView], now_ms: u64) -> String {
    let mut t = Table::new(&[
        ("ID", ID_WIDTH),
        ("GRAPH", TEXT_WIDTH),
        ("NODE", TEXT_WIDTH),
        ("STATUS", 9),
        ("CREATED", 19),
        ("DURATION", 10),
    ]);
    for w in list {
        t.row(&[
            w.instance_id.clone(),
            w.name.clone(),
            w.node.clone().unwrap_or_default(),
            w.status.to_string(),
            when(&w.created_at),
            span(Some(&w.created_at), w.finished_at.as_deref(), now_ms),
        ]);
    }
    t.render()
}

/// `workflows get` (and `run` without `--wait`): the workflow, then a row per task with
/// its start (after the workflow's) and duration.
pub fn workflow(w: &WorkflowView, now_ms: u64) -> String {
    let mut pairs = vec![
        ("Workflow", w.instance_id.clone()),
        ("Graph", w.name.clone()),
        ("Node", w.node.clone().unwrap_or_default()),
        ("Status", w.status.to_string()),
        ("Created", when(&w.created_at)),
        (
            "Finished",
            w.finished_at.as_deref().map(when).unwrap_or_default(),
        ),
        (
            "Duration",
            span(Some(&w.created_at), w.finished_at.as_deref(), now_ms),
        ),
    ];
    if let Some(p) = &w.parent {
        pairs.push(("Parent", format!("{} (task {})", p.workflow_id, p.task_id)));
    }
    if let Some(old) = &w.rerun_of {
        pairs.push(("Rerun of", old.clone()));
    }
    if let Some(e) = &w.error {
        pairs.push(("Error", e.clone()));
    }
    let mut out = fields(&pairs);
    let created = parse_rfc3339(&w.created_at);
    let mut t = Table::new(&[
        ("LABEL", TEXT_WIDTH),
        ("TASK", TEXT_WIDTH),
        ("STATE", 9),
        ("ATTEMPTS", 8),
        ("START", 10),
        ("DURATION", 10),
        ("ERROR", ERROR_WIDTH),
    ]);
    for task in &w.tasks {
        let start = match (created, task.started_at.as_deref().and_then(parse_rfc3339)) {
            (Some(c), Some(s)) if s >= c => format!("+{}", duration(s - c)),
            // A task a rerun took over ran in the workflow it reruns.
            (Some(_), Some(_)) => "earlier".to_owned(),
            _ => String::new(),
        };
        t.row(&[
            task.label.clone(),
            task.task_name.clone(),
            task.state.to_string(),
            task.attempts.to_string(),
            start,
            span(
                task.started_at.as_deref(),
                task.finished_at.as_deref(),
                now_ms,
            ),
            task.error.clone().unwrap_or_default(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

/// The closing lines of `run --wait`: the final status with the workflow's duration and
/// error, the count of tasks per end state, and each failed task's whole error.
pub fn summary(w: &WorkflowView) -> Vec<String> {
    let took = match (
        parse_rfc3339(&w.created_at),
        w.finished_at.as_deref().and_then(parse_rfc3339),
    ) {
        (Some(a), Some(b)) => format!(" in {}", duration(b.saturating_sub(a))),
        _ => String::new(),
    };
    let mut lines = vec![match &w.error {
        Some(e) => format!(
            "workflow {} {}{took}: {}",
            w.instance_id,
            w.status,
            super::table::clean(e)
        ),
        None => format!("workflow {} {}{took}", w.instance_id, w.status),
    }];
    let count = |s: TaskState| w.tasks.iter().filter(|t| t.state == s).count();
    let mut counts = format!(
        "tasks: {} succeeded, {} failed, {} timed out, {} skipped, {} cancelled",
        count(TaskState::Succeeded),
        count(TaskState::Failed),
        count(TaskState::Timeout),
        count(TaskState::Skipped),
        count(TaskState::Cancelled),
    );
    // A finished workflow has no unfinished task; say so if the server ever disagrees.
    let unfinished = count(TaskState::Pending) + count(TaskState::Running);
    if unfinished > 0 {
        counts.push_str(&format!(", {unfinished} unfinished"));
    }
    lines.push(counts);
    for t in w.tasks.iter().filter(|t| t.state.is_failure()) {
        let attempts = if t.attempts == 1 {
            "1 attempt".to_owned()
        } else {
            format!("{} attempts", t.attempts)
        };
        lines.push(format!(
            "  {} {} after {attempts}: {}",
            t.label,
            t.state,
            super::table::clean(t.error.as_deref().unwrap_or("no error recorded"))
        ));
    }
    lines
}

/// An RFC 3339 instant from the API as `2026-11-21 16:02:03` (UTC, to the second); text
/// that is no such instant is shown as it is.
pub fn when(rfc3339: &str) -> String {
    match parse_rfc3339(rfc3339) {
        Some(_) => rfc3339[..19].replacen('T', " ", 1),
        None => rfc3339.to_owned(),
    }
}

/// The time from `from` to `to`, or to `now_ms` when `to` is absent (still running); empty
/// when it never started.
pub fn span(from: Option<&str>, to: Option<&str>, now_ms: u64) -> String {
    let Some(start) = from.and_then(parse_rfc3339) else {
        return String::new();
    };
    let end = match to {
        Some(t) => match parse_rfc3339(t) {
            Some(end) => end,
            None => return String::new(),
        },
        None => now_ms,
    };
    duration(end.saturating_sub(start))
}

/// A duration for people: `350ms`, `4.2s`, `2m05s`, `1h07m`, `3d04h`. Cut, never rounded
/// up, so `59.99s` never reads `60.0s`.
pub fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0 => format!("{ms}ms"),
        1..60 => format!("{secs}.{}s", (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

/// The elements of an array answer (nothing for anything else).
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A field as text: strings as they are, other values as JSON, absent or null as empty.
fn text(v: &Value, key: &str) -> String {
    v.get(key).map(scalar).unwrap_or_default()
}

/// A value as text: strings without quotes, null as empty, the rest as compact JSON.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An array field as `a,b,c`.
fn list_text(v: &Value, key: &str) -> String {
    items(v.get(key).unwrap_or(&Value::Null))
        .iter()
        .map(scalar)
        .collect::<Vec<_>>()
        .join(",")
}

/// An OBM as `redfish https://10.0.0.8`: the service without its `-obm-service` suffix,
/// then the host (and port when one is set apart).
fn obm_summary(o: &Value) -> String {
    let service = text(o, "service");
    let service = service.strip_suffix("-obm-service").unwrap_or(&service);
    let config = o.get("config").unwrap_or(&Value::Null);
    if let Some(endpoint) = config.get("endpoint").and_then(Value::as_str) {
        return format!("{service} endpoint {endpoint}");
    }
    let mut host = text(config, "host");
    if let Some(port) = config.get("port").and_then(Value::as_u64) {
        host = format!("{host}:{port}");
    }
    if host.is_empty() {
        service.to_owned()
    } else {
        format!("{service} {host}")
    }
}

/// A graph's option layers as (scope, option, value) rows, `defaults` first; a null value
/// is one the run must give.
fn option_rows(options: Option<&Value>) -> Vec<(String, String, String)> {
    let Some(layers) = options.and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut ordered: BTreeMap<(bool, &str), &Value> = BTreeMap::new();
    for (scope, layer) in layers {
        ordered.insert((scope != "defaults", scope), layer);
    }
    let mut rows = Vec::new();
    for ((_, scope), layer) in ordered {
        match layer.as_object() {
            Some(layer) => {
                for (k, v) in layer {
                    let value = if v.is_null() {
                        "(required)".to_owned()
                    } else {
                        scalar(v)
                    };
                    rows.push((scope.to_owned(), k.clone(), value));
                }
            }
            None => rows.push((scope.to_owned(), String::new(), scalar(layer))),
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// 2026-11-21T16:02:03.456Z
    const T0: u64 = 1_795_276_923_456;

    fn workflow_value(status: &str, finished: Option<&str>) -> Value {
        json!({
            "instanceId": "w-1", "name": "Graph.Demo", "node": "n1", "status": status,
            "createdAt": "2026-11-21T16:02:03.456Z", "finishedAt": finished,
            "error": if status == "failed" { json!("task 'b' failed: the BMC said no") } else { Value::Null },
            "tasks": [
                {"id": "w-1.0", "label": "a", "taskName": "Task.Noop", "job": "noop",
                 "state": "succeeded", "attempts": 1,
                 "startedAt": "2026-11-21T16:02:03.556Z", "finishedAt": "2026-11-21T16:02:03.806Z"},
                {"id": "w-1.1", "label": "b", "taskName": "Task.Fail", "job": "fail",
                 "state": if status == "failed" { "failed" } else { "running" }, "attempts": 2,
                 "error": if status == "failed" { json!("the BMC said no: ".repeat(5)) } else { Value::Null },
                 "startedAt": "2026-11-21T16:02:04.456Z",
                 "finishedAt": if status == "failed" { json!("2026-11-21T16:04:10.456Z") } else { Value::Null }},
                {"id": "w-1.2", "label": "c", "taskName": "Task.Noop", "job": "noop",
                 "state": if status == "failed" { "skipped" } else { "pending" }, "attempts": 0},
            ]
        })
    }

    #[test]
    fn durations_read_like_a_person_would_write_them() {
        for (ms, shown) in [
            (0, "0ms"),
            (999, "999ms"),
            (1_000, "1.0s"),
            (59_999, "59.9s"),
            (60_000, "1m00s"),
            (125_000, "2m05s"),
            (3_600_000, "1h00m"),
            (4_020_000, "1h07m"),
            (273_600_000, "3d04h"),
        ] {
            assert_eq!(duration(ms), shown, "{ms}");
        }
        assert_eq!(when("2026-11-21T16:02:03.456Z"), "2026-11-21 16:02:03");
        assert_eq!(when("yesterday"), "yesterday");
        assert_eq!(
            span(Some("2026-11-21T16:02:03.456Z"), None, T0 + 4_200),
            "4.2s"
        );
        assert_eq!(span(None, None, T0), "");
    }

    #[test]
    fn a_failed_workflow_shows_its_tasks_with_errors_cut() {
        let shown = render(
            Output::Table,
            Shape::Workflow,
            &workflow_value("failed", Some("2026-11-21T16:04:10.456Z")),
            T0,
        )
        .expect("a workflow");
        assert_eq!(
            shown,
            "Workflow:  w-1\n\
             Graph:     Graph.Demo\n\
             Node:      n1\n\
             Status:    failed\n\
             Created:   2026-11-21 16:02:03\n\
             Finished:  2026-11-21 16:04:10\n\
             Duration:  2m07s\n\
             Error:     task 'b' failed: the BMC said no\n\
             \n\
             LABEL  TASK       STATE      ATTEMPTS  START   DURATION  ERROR\n\
             a      Task.Noop  succeeded  1         +100ms  250ms     -\n\
             b      Task.Fail  failed     2         +1.0s   2m06s     the BMC said no: the BMC said no: the BMC said no: the BMC…\n\
             c      Task.Noop  skipped    0         -       -         -\n"
        );
    }

    #[test]
    fn a_rerun_names_the_workflow_it_reruns_and_what_ran_there() {
        let mut v = workflow_value("running", None);
        v["rerunOf"] = json!("w-0");
        v["tasks"][0]["startedAt"] = json!("2026-11-21T15:00:00.000Z");
        v["tasks"][0]["finishedAt"] = json!("2026-11-21T15:00:01.500Z");
        let shown = render(Output::Table, Shape::Workflow, &v, T0 + 1_000).expect("a workflow");
        assert!(shown.contains("Rerun of:  w-0\n"), "{shown}");
        assert!(
            shown.contains("a      Task.Noop  succeeded  1         earlier  1.5s "),
            "{shown}"
        );
    }

    #[test]
    fn a_running_workflow_is_timed_until_now() {
        let list = json!([workflow_value("running", None)]);
        let shown = render(Output::Table, Shape::Workflows, &list, T0 + 61_000).expect("a list");
        assert_eq!(
            shown,
            "ID   GRAPH       NODE  STATUS   CREATED              DURATION\n\
             w-1  Graph.Demo  n1    running  2026-11-21 16:02:03  1m01s\n"
        );
    }

    #[test]
    fn the_summary_counts_tasks_and_shows_whole_errors() {
        let view: WorkflowView =
            serde_json::from_value(workflow_value("failed", Some("2026-11-21T16:04:10.456Z")))
                .expect("a view");
        assert_eq!(
            summary(&view),
            vec![
                "workflow w-1 failed in 2m07s: task 'b' failed: the BMC said no".to_owned(),
                "tasks: 1 succeeded, 1 failed, 0 timed out, 1 skipped, 0 cancelled".to_owned(),
                format!(
                    "  b failed after 2 attempts: {}",
                    "the BMC said no: ".repeat(5).trim_end()
                ),
            ]
        );
    }

    #[test]
    fn a_graph_shows_waits_notes_and_options() {
        let g = json!({
            "injectableName": "Graph.X", "friendlyName": "X", "source": "user",
            "options": {"second": {"duration": "2s"}, "defaults": {"pause": null, "n": 3}},
            "tasks": [
                {"label": "first", "taskName": "Task.Noop", "ignoreFailure": true},
                {"label": "second", "taskName": "Task.Wait", "waitOn": {"first": "finished"},
                 "retries": {"max": 3, "backoff": "2s"}, "timeout": "10m"},
            ]
        });
        assert_eq!(
            graph(&g),
            "Graph:        Graph.X\n\
             Description:  X\n\
             Source:       user\n\
             Timeout:      -\n\
             \n\
             LABEL   TASK       WAITS ON         NOTES\n\
             first   Task.Noop  -                ignoreFailure\n\
             second  Task.Wait  first: finished  retries 3 (backoff 2s), timeout 10m\n\
             \n\
             SCOPE     OPTION    VALUE\n\
             defaults  pause     (required)\n\
             defaults  n         3\n\
             second    duration  2s\n"
        );
    }

    #[test]
    fn nodes_show_their_obm_without_secrets() {
        let list = json!([{
            "id": "n1", "name": "rack1-u08", "type": "compute",
            "identifiers": ["52:54:00:12:34:08", "52:54:00:12:34:09"], "tags": ["rack1"],
            "obms": [{"service": "redfish-obm-service",
                      "config": {"host": "https://10.0.0.8", "user": "root", "passwordSet": true}}],
            "createdAt": "2026-11-21T16:02:03.456Z", "updatedAt": "2026-11-21T16:02:03.456Z"
        }]);
        assert_eq!(
            nodes(&list),
            "ID  NAME       TYPE     OBM                       IDENTIFIERS                          TAGS\n\
             n1  rack1-u08  compute  redfish https://10.0.0.8  52:54:00:12:34:08,52:54:00:12:34:09  rack1\n"
        );
        assert_eq!(
            node(&list[0]),
            "Node:         n1\n\
             Name:         rack1-u08\n\
             Type:         compute\n\
             Identifiers:  52:54:00:12:34:08,52:54:00:12:34:09\n\
             Tags:         rack1\n\
             OBM:          redfish https://10.0.0.8, user root, password set\n\
             Created:      2026-11-21 16:02:03\n\
             Updated:      2026-11-21 16:02:03\n"
        );
    }

    #[test]
    fn json_and_yaml_are_the_answer_itself() {
        let v = json!([{"injectableName": "G", "tasks": []}]);
        let json = render(Output::Json, Shape::Graphs, &v, 0).expect("json");
        assert_eq!(serde_json::from_str::<Value>(&json).expect("parses"), v);
        let yaml = render(Output::Yaml, Shape::Graphs, &v, 0).expect("yaml");
        assert_eq!(serde_yaml::from_str::<Value>(&yaml).expect("parses"), v);
    }
}
