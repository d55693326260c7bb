//! The command-line client end to end: the real binary against a real server. Tables for
//! people (exact rows and columns, long errors cut), `-o json|yaml` equal to the API's own
//! answers, `graphs get --format dot|mermaid` parsed back, the `run --wait` summary, and a
//! reader that closes stdout early (`| head -1`) ending the command quietly with success.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metalgraph::client::views::duration;
use metalgraph_engine::clock::parse_rfc3339;
use serde_json::{Value, json};
use support::{Api, Server};

/// What one run of the client did.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `metalgraph ARGS` against `server`.
fn mg(server: &Server, args: &[&str]) -> Ran {
    let out = client(server, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("the client runs");
    Ran {
        code: out
            .status
            .code()
            .expect("the client exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    }
}

fn client(server: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalgraph"));
    // The token and CA come from the server's data directory, as on the server's machine.
    cmd.args(args)
        .env("METALGRAPH_SERVER", &server.base)
        .env("METALGRAPH_DATA_DIR", &server.data_dir)
        .stdin(Stdio::null());
    cmd
}

/// `mg` that must exit 0 with nothing on stderr; returns stdout.
fn ok(server: &Server, args: &[&str]) -> String {
    let r = mg(server, args);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (0, ""),
        "metalgraph {args:?}: {r:?}"
    );
    r.stdout
}

/// An API instant as the tables show it: `2026-11-21 16:02:03`.
fn when(rfc3339: &str) -> String {
    assert_eq!(rfc3339.len(), 24, "an instant with milliseconds: {rfc3339}");
    rfc3339[..19].replace('T', " ")
}

/// The time between two API instants as the tables show it.
fn took(from: &Value, to: &Value) -> String {
    let ms = |v: &Value| parse_rfc3339(v.as_str().expect("an instant")).expect("RFC 3339");
    duration(ms(to) - ms(from))
}

/// Pads every cell of a column to the column's widest cell, two spaces apart, the last
/// column unpadded: how the expected tables below line up their timing columns, whose
/// widths depend on how fast this machine ran the tasks.
fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap())
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const GRAPHS: &str = r#"
- injectableName: Graph.Cli.Ok
  tasks:
    - { label: first, taskName: Task.Noop }
    - { label: second, taskName: Task.Noop, waitOn: { first: succeeded } }
- injectableName: Graph.Cli.Fails
  tasks:
    - { label: first, taskName: Task.Noop }
    - label: boom
      taskName: Task.Fail
      optionOverrides:
        message: "the BMC refused the request because the virtual media slot is locked by another session"
      waitOn: { first: succeeded }
    - { label: after, taskName: Task.Noop, waitOn: { boom: succeeded } }
"#;

const BMC_ERROR: &str =
    "the BMC refused the request because the virtual media slot is locked by another session";

/// A server with two nodes and the two graphs above stored.
async fn setup(dir: &std::path::Path) -> (Server, Api) {
    let server = Server::start(dir, "sled", &[]);
    let api = server.api();
    api.create_node(json!({
        "id": "node-a", "name": "rack1-u07", "identifiers": ["52:54:00:12:34:07"],
        "tags": ["rack1", "gpu"],
        "obms": [{"service": "ipmi-obm-service",
                  "config": {"host": "10.0.0.7", "port": 623, "user": "admin", "password": "s3cret"}}]
    }))
    .await;
    api.create_node(json!({"id": "node-b", "name": "spare"}))
        .await;
    let graphs: Vec<Value> = serde_yaml::from_str(GRAPHS).expect("the test graphs");
    for g in graphs {
        let (code, v) = api.send("PUT", "/api/2.0/workflows/graphs", Some(g)).await;
        assert_eq!(code, 201, "{v}");
    }
    (server, api)
}

#[tokio::test]
async fn nodes_and_workflows_are_tables_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = setup(dir.path()).await;
    let limit = Duration::from_secs(30);
    let good = api
        .run_wait("Graph.Cli.Ok", Some("node-a"), json!({}), limit)
        .await;
    let bad = api
        .run_wait("Graph.Cli.Fails", None, json!({}), limit)
        .await;
    assert_eq!(
        (good["status"].as_str(), bad["status"].as_str()),
        (Some("succeeded"), Some("failed"))
    );

    assert_eq!(
        ok(&server, &["nodes", "list"]),
        "ID      NAME       TYPE     OBM                IDENTIFIERS        TAGS\n\
         node-a  rack1-u07  compute  ipmi 10.0.0.7:623  52:54:00:12:34:07  rack1,gpu\n\
         node-b  spare      compute  -                  -                  -\n"
    );

    let (_, node) = api.get("/api/2.0/nodes/node-a").await;
    assert_eq!(
        ok(&server, &["nodes", "get", "node-a"]),
        format!(
            "Node:         node-a\n\
             Name:         rack1-u07\n\
             Type:         compute\n\
             Identifiers:  52:54:00:12:34:07\n\
             Tags:         rack1,gpu\n\
             OBM:          ipmi 10.0.0.7:623, user admin, password set\n\
             Created:      {}\n\
             Updated:      {}\n",
            when(node["createdAt"].as_str().unwrap()),
            when(node["updatedAt"].as_str().unwrap()),
        )
    );

    // Newest first, as the API lists them.
    let (gid, bid) = (
        good["instanceId"].as_str().unwrap(),
        bad["instanceId"].as_str().unwrap(),
    );
    assert_eq!(
        ok(&server, &["workflows", "list"]),
        format!(
            "ID                                    GRAPH            NODE    STATUS     CREATED              DURATION\n\
             {bid}  Graph.Cli.Fails  -       failed     {}  {}\n\
             {gid}  Graph.Cli.Ok     node-a  succeeded  {}  {}\n",
            when(bad["createdAt"].as_str().unwrap()),
            took(&bad["createdAt"], &bad["finishedAt"]),
            when(good["createdAt"].as_str().unwrap()),
            took(&good["createdAt"], &good["finishedAt"]),
        )
    );
    assert_eq!(
        ok(&server, &["workflows", "list", "--node", "node-a"])
            .lines()
            .skip(1)
            .map(|l| l.split("  ").next().unwrap().to_owned())
            .collect::<Vec<_>>(),
        vec![gid.to_owned()],
        "--node filters"
    );

    // The failed workflow: its header with the whole error, then its tasks, the long
    // error cut to 60 characters with an ellipsis.
    let t = bad["tasks"].as_array().unwrap();
    assert_eq!(
        (
            t[0]["state"].as_str(),
            t[1]["state"].as_str(),
            t[2]["state"].as_str()
        ),
        (Some("succeeded"), Some("failed"), Some("skipped"))
    );
    let start = |task: &Value| format!("+{}", took(&bad["createdAt"], &task["startedAt"]));
    // 59 characters of the error, the blank after them dropped, then the ellipsis.
    let cut = "the BMC refused the request because the virtual media slot…".to_owned();
    let table = aligned(&[
        [
            "LABEL", "TASK", "STATE", "ATTEMPTS", "START", "DURATION", "ERROR",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            "first".into(),
            "Task.Noop".into(),
            "succeeded".into(),
            "1".into(),
            start(&t[0]),
            took(&t[0]["startedAt"], &t[0]["finishedAt"]),
            "-".into(),
        ],
        vec![
            "boom".into(),
            "Task.Fail".into(),
            "failed".into(),
            "1".into(),
            start(&t[1]),
            took(&t[1]["startedAt"], &t[1]["finishedAt"]),
            cut,
        ],
        ["after", "Task.Noop", "skipped", "0", "-", "-", "-"]
            .map(String::from)
            .to_vec(),
    ]);
    assert_eq!(
        ok(&server, &["workflows", "get", bid]),
        format!(
            "Workflow:  {bid}\n\
             Graph:     Graph.Cli.Fails\n\
             Node:      -\n\
             Status:    failed\n\
             Created:   {}\n\
             Finished:  {}\n\
             Duration:  {}\n\
             Error:     task 'boom' failed: {BMC_ERROR}\n\
             \n\
             {table}",
            when(bad["createdAt"].as_str().unwrap()),
            when(bad["finishedAt"].as_str().unwrap()),
            took(&bad["createdAt"], &bad["finishedAt"]),
        )
    );

    // Definitions: the user's graphs among the library's, and one graph's tasks.
    let graphs = ok(&server, &["graphs", "list"]);
    let mine: Vec<&str> = graphs
        .lines()
        .filter(|l| l.starts_with("Graph.Cli."))
        .collect();
    assert_eq!(
        mine,
        vec![
            "Graph.Cli.Fails               3      user     -",
            "Graph.Cli.Ok                  2      user     -",
        ]
    );
    assert_eq!(
        graphs.lines().next(),
        Some("NAME                          TASKS  SOURCE   DESCRIPTION")
    );
    assert_eq!(
        ok(&server, &["graphs", "get", "Graph.Cli.Fails"]),
        "Graph:        Graph.Cli.Fails\n\
         Description:  -\n\
         Source:       user\n\
         Timeout:      -\n\
         \n\
         LABEL  TASK       WAITS ON          NOTES\n\
         first  Task.Noop  -                 -\n\
         boom   Task.Fail  first: succeeded  -\n\
         after  Task.Noop  boom: succeeded   -\n"
    );
    assert_eq!(
        ok(&server, &["tasks", "get", "Task.Fail"]),
        "Task:         Task.Fail\n\
         Description:  Fail on purpose\n\
         Job:          fail\n\
         Source:       library\n\
         \n\
         OPTION   DEFAULT\n\
         message  failed on purpose\n"
    );
}

#[tokio::test]
async fn json_and_yaml_are_the_api_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = setup(dir.path()).await;
    let id = api
        .run_wait(
            "Graph.Cli.Ok",
            Some("node-a"),
            json!({}),
            Duration::from_secs(30),
        )
        .await["instanceId"]
        .as_str()
        .unwrap()
        .to_owned();
    let reads: Vec<(Vec<String>, String)> = [
        ("nodes list", "/nodes"),
        ("nodes get node-a", "/nodes/node-a"),
        ("workflows list", "/workflows"),
        ("workflows get ID", "/workflows/ID"),
        ("graphs list", "/workflows/graphs"),
        (
            "graphs get Graph.Cli.Fails",
            "/workflows/graphs/Graph.Cli.Fails",
        ),
        ("tasks list", "/workflows/tasks"),
        ("tasks get Task.Fail", "/workflows/tasks/Task.Fail"),
    ]
    .iter()
    .map(|(args, path)| {
        (
            args.replace("ID", &id)
                .split(' ')
                .map(String::from)
                .collect(),
            format!("/api/2.0{}", path.replace("ID", &id)),
        )
    })
    .collect();
    for (args, path) in reads {
        let (code, body) = api.get(&path).await;
        assert_eq!(code, 200, "{path}: {body}");
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        // `-o` goes after the subcommand and, being global, also before it.
        args.extend(["-o", "json"]);
        let json: Value = serde_json::from_str(&ok(&server, &args)).expect("JSON");
        assert_eq!(json, body, "metalgraph {args:?}");
        args.truncate(args.len() - 2);
        args.insert(1, "--output=yaml");
        let yaml: Value = serde_yaml::from_str(&ok(&server, &args)).expect("YAML");
        assert_eq!(yaml, body, "metalgraph {args:?}");
    }

    // `run --wait --output json` prints only the finished workflow.
    let r = mg(
        &server,
        &["run", "Graph.Cli.Fails", "--wait", "--output", "json"],
    );
    assert_eq!((r.code, r.stderr.as_str()), (1, ""), "{r:?}");
    let finished: Value = serde_json::from_str(&r.stdout).expect("one JSON workflow");
    let (_, body) = api
        .get(&format!(
            "/api/2.0/workflows/{}",
            finished["instanceId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(finished, body);

    // A drawing is not an answer: --format and --output do not mix.
    let r = mg(
        &server,
        &[
            "graphs",
            "get",
            "Graph.Cli.Ok",
            "--format",
            "dot",
            "-o",
            "json",
        ],
    );
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (
            1,
            "",
            "error: --format draws the graph and cannot be combined with --output\n"
        )
    );
}

/// The lines of a `run --wait` after its first (`workflow ... created`) line: progress
/// lines, each naming a task of the graph and a state, then the summary.
fn progress_then_summary<'a>(stdout: &'a str, labels: &[&str]) -> (String, Vec<&'a str>) {
    let mut lines = stdout.lines();
    let first = lines.next().expect("a first line");
    let id = first
        .strip_prefix("workflow ")
        .and_then(|rest| rest.split(' ').next())
        .expect("workflow ID ...")
        .to_owned();
    let rest: Vec<&str> = lines.collect();
    let split = rest
        .iter()
        .position(|l| l.starts_with("workflow "))
        .expect("a summary");
    for l in &rest[..split] {
        let (time, what) = l.split_once("] ").expect("[ time] label state");
        assert!(time.starts_with('[') && time.ends_with('s'), "{l}");
        let label = what.split_whitespace().next().unwrap();
        assert!(labels.contains(&label), "{l}");
    }
    (id, rest[split..].to_vec())
}

#[tokio::test]
async fn run_wait_ends_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = setup(dir.path()).await;

    let r = mg(
        &server,
        &["run", "Graph.Cli.Ok", "--node", "node-b", "--wait"],
    );
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let (id, summary) = progress_then_summary(&r.stdout, &["first", "second"]);
    assert!(
        r.stdout.starts_with(&format!(
            "workflow {id} (Graph.Cli.Ok on node node-b) created\n"
        )),
        "{}",
        r.stdout
    );
    for label in ["first", "second"] {
        let done = r.stdout.lines().filter(|l| {
            l.split_once("] ").is_some_and(|(_, rest)| {
                rest.split_whitespace().collect::<Vec<_>>() == [label, "succeeded"]
            })
        });
        assert_eq!(
            done.count(),
            1,
            "one line for {label} succeeding: {}",
            r.stdout
        );
    }
    let (_, w) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(
        summary,
        vec![
            format!(
                "workflow {id} succeeded in {}",
                took(&w["createdAt"], &w["finishedAt"])
            ),
            "tasks: 2 succeeded, 0 failed, 0 timed out, 0 skipped, 0 cancelled".to_owned(),
        ]
    );

    let r = mg(&server, &["run", "Graph.Cli.Fails", "--wait"]);
    assert_eq!((r.code, r.stderr.as_str()), (1, ""), "{r:?}");
    let (id, summary) = progress_then_summary(&r.stdout, &["first", "boom", "after"]);
    assert!(
        r.stdout
            .starts_with(&format!("workflow {id} (Graph.Cli.Fails) created\n")),
        "{}",
        r.stdout
    );
    let (_, w) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(
        summary,
        vec![
            format!(
                "workflow {id} failed in {}: task 'boom' failed: {BMC_ERROR}",
                took(&w["createdAt"], &w["finishedAt"])
            ),
            "tasks: 1 succeeded, 1 failed, 0 timed out, 1 skipped, 0 cancelled".to_owned(),
            format!("  boom failed after 1 attempt: {BMC_ERROR}"),
        ]
    );
}

/// A graph whose labels try to break out of DOT's and Mermaid's quoting.
const HOSTILE: &str = r#"
injectableName: Graph.Cli.Hostile
tasks:
  - { label: 'a "quoted" [label]', taskName: Task.Noop }
  - label: 'b\"]; x -> y; #quot; <b>'
    taskName: Task.Noop
    waitOn: { 'a "quoted" [label]': [failed, timeout] }
  - label: c
    taskDefinition: { implementsTask: noop }
    waitOn: { anyOf: { 'a "quoted" [label]': finished, 'b\"]; x -> y; #quot; <b>': succeeded } }
"#;

/// Reads a DOT quoted string at the start of `s`: its unescaped text and what follows it.
fn dot_string(s: &str) -> (String, &str) {
    let body = s.strip_prefix('"').expect("a quoted string");
    let mut text = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (text, &body[i + 1..]),
            '\\' => match chars.next().expect("an escape").1 {
                'n' => text.push('\n'),
                other => text.push(other),
            },
            c => text.push(c),
        }
    }
    panic!("unterminated string in {s}");
}

#[tokio::test]
async fn graphs_are_drawn_as_dot_and_mermaid() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "sled", &[]);
    let api = server.api();
    let (code, v) = api.put_yaml("/api/2.0/workflows/graphs", HOSTILE).await;
    assert_eq!(code, 201, "{v}");
    let (a, b) = (r#"a "quoted" [label]"#, r#"b\"]; x -> y; #quot; <b>"#);

    let dot = ok(
        &server,
        &["graphs", "show", "Graph.Cli.Hostile", "--format", "dot"],
    );
    assert_eq!(
        dot,
        r#"digraph {
    0 [ label = "a \"quoted\" [label]\nTask.Noop" shape = box ]
    1 [ label = "b\\\"]; x -> y; #quot; <b>\nTask.Noop" shape = box ]
    2 [ label = "c\ninline noop" shape = box ]
    0 -> 1 [ label = "failed or timeout" ]
    0 -> 2 [ label = "finished (any of)" style = dashed ]
    1 -> 2 [ label = "succeeded (any of)" style = dashed ]
}
"#
    );
    // Parsed back, every label is whole and inside its quotes, and nothing else is on
    // its line.
    let (mut nodes, mut edges) = (Vec::new(), Vec::new());
    let body = dot
        .strip_prefix("digraph {\n")
        .and_then(|d| d.strip_suffix("}\n"))
        .expect("digraph { ... }");
    for line in body.lines() {
        let line = line.strip_prefix("    ").expect("indented");
        let (head, attrs) = line.split_once(" [ label = ").expect("... [ label = ");
        let (label, rest) = dot_string(attrs);
        match head.split_once(" -> ") {
            Some((from, to)) => {
                assert!(rest == " ]" || rest == " style = dashed ]", "{line}");
                edges.push((from.to_owned(), to.to_owned(), label));
            }
            None => {
                assert_eq!(rest, " shape = box ]", "{line}");
                nodes.push((head.to_owned(), label));
            }
        }
    }
    assert_eq!(
        nodes,
        vec![
            ("0".to_owned(), format!("{a}\nTask.Noop")),
            ("1".to_owned(), format!("{b}\nTask.Noop")),
            ("2".to_owned(), "c\ninline noop".to_owned()),
        ]
    );
    assert_eq!(edges.len(), 3);

    let mermaid = ok(
        &server,
        &["graphs", "show", "Graph.Cli.Hostile", "--format", "mermaid"],
    );
    assert_eq!(
        mermaid,
        r#"flowchart TD
    t0["a #quot;quoted#quot; [label]<br/>Task.Noop"]
    t1["b\#quot;]; x -#gt; y; #35;quot; #lt;b#gt;<br/>Task.Noop"]
    t2["c<br/>inline noop"]
    t0 -->|"failed or timeout"| t1
    t0 -.->|"finished (any of)"| t2
    t1 -.->|"succeeded (any of)"| t2
"#
    );
    // Mermaid reads a label up to the next `"`: each label holds none, and decoding the
    // entity codes gives the task's label back.
    let decode = |s: &str| {
        s.replace("#quot;", "\"")
            .replace("#lt;", "<")
            .replace("#gt;", ">")
            .replace("#amp;", "&")
            .replace("#96;", "`")
            .replace("#35;", "#")
    };
    let labels: Vec<String> = mermaid
        .lines()
        .filter_map(|l| l.strip_suffix("\"]"))
        .map(|l| {
            let (_, text) = l.split_once("[\"").expect("tN[\"...\"]");
            assert!(!text.contains('"'), "{l}");
            decode(text.split("<br/>").next().unwrap())
        })
        .collect();
    assert_eq!(labels, vec![a, b, "c"]);

    // Without --format, `show` is `get`.
    assert_eq!(
        ok(&server, &["graphs", "show", "Graph.Cli.Hostile"]),
        ok(&server, &["graphs", "get", "Graph.Cli.Hostile"])
    );
}

#[tokio::test]
async fn a_reader_that_closes_early_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _api) = setup(dir.path()).await;

    // stdout is a pipe whose reading end is already closed, so the first write fails
    // with EPIPE, deterministically.
    for args in [
        &["graphs", "list"][..],
        &["graphs", "list", "-o", "json"],
        &["workflows", "list"],
        &["graphs", "get", "Graph.Cli.Ok", "--format", "dot"],
        &["run", "Graph.Cli.Ok", "--wait"],
        &[
            "validate",
            concat!(env!("CARGO_MANIFEST_DIR"), "/graphs/Graph.Reboot.Node.yaml"),
        ],
    ] {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let out = client(&server, args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("the client runs");
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).as_ref()
            ),
            (Some(0), ""),
            "metalgraph {args:?}"
        );
    }

    // And through a real `head`, with the pipeline's status checked.
    let out = Command::new("bash")
        .args([
            "-c",
            r#"set -o pipefail; "$0" graphs list | head -1"#,
            env!("CARGO_BIN_EXE_metalgraph"),
        ])
        .env("METALGRAPH_SERVER", &server.base)
        .env("METALGRAPH_DATA_DIR", &server.data_dir)
        .output()
        .expect("bash runs");
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (
            Some(0),
            "NAME                          TASKS  SOURCE   DESCRIPTION\n",
            ""
        )
    );
}

#[tokio::test]
async fn serve_with_a_closed_stdout_keeps_serving() {
    // The client's quiet exit on a closed stdout must not reach `serve`: its announcement
    // line goes nowhere and it keeps answering.
    let dir = tempfile::tempdir().unwrap();
    let port = metalgraph_testkit::free_tcp_port();
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut child = Command::new(env!("CARGO_BIN_EXE_metalgraph"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::null())
        .spawn()
        .expect("serve starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    // The server writes its token and CA before it listens.
    let api = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with a closed stdout: {status}");
        }
        if dir.path().join("admin.token").exists() && dir.path().join("tls/ca.pem").exists() {
            break Api::from_data_dir(&format!("https://127.0.0.1:{port}"), dir.path());
        }
        assert!(Instant::now() < deadline, "serve never wrote its token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with a closed stdout: {status}");
        }
        if api
            .http
            .get(format!("{}/api/2.0/health", api.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _) = api.get("/api/2.0/workflows/graphs").await;
    assert_eq!(code, 200);
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "serve is still running"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn lists_show_one_page_or_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let (server, api) = setup(dir.path()).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        let v = api
            .run_wait("Graph.Cli.Ok", None, json!({}), Duration::from_secs(30))
            .await;
        made.push(v["instanceId"].as_str().unwrap().to_owned());
    }
    made.reverse(); // newest first
    let ids = |stdout: &str| -> Vec<String> {
        serde_json::from_str::<Vec<Value>>(stdout)
            .unwrap()
            .iter()
            .map(|w| w["instanceId"].as_str().unwrap().to_owned())
            .collect()
    };
    let page = mg(
        &server,
        &[
            "workflows",
            "list",
            "--graph",
            "Graph.Cli.Ok",
            "--top",
            "2",
            "-o",
            "json",
        ],
    );
    assert_eq!(page.code, 0, "{page:?}");
    assert_eq!(ids(&page.stdout), made[..2]);
    assert_eq!(
        page.stderr,
        "(one page of a longer list: --all shows every page, --top N more at once)\n"
    );
    // --all follows the pages: two at a time, every workflow once, in order.
    let all = ok(
        &server,
        &[
            "workflows",
            "list",
            "--graph",
            "Graph.Cli.Ok",
            "--all",
            "--top",
            "2",
            "-o",
            "json",
        ],
    );
    assert_eq!(ids(&all), made);
    let failed = ok(
        &server,
        &["workflows", "list", "--status", "failed", "-o", "json"],
    );
    assert!(ids(&failed).iter().all(|id| !made.contains(id)));
    let gpu = ok(&server, &["nodes", "list", "--tag", "gpu", "-o", "json"]);
    let nodes: Vec<Value> = serde_json::from_str(&gpu).unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["id"], "node-a");
}

#[tokio::test]
async fn run_on_a_tag_is_a_batch_with_progress_and_a_failure_table() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "sled", &["--demo"]);
    let api = server.api();
    let out = ok(
        &server,
        &[
            "run",
            "Graph.PowerOn.Node",
            "--tag",
            "demo",
            "--max-concurrent",
            "3",
            "--wait",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("batch ")
            && lines[0].ends_with(": Graph.PowerOn.Node on 8 nodes, at most 3 at once"),
        "{out}"
    );
    // Not a terminal: a progress line each time the counts change, never more than three
    // running, the last one complete.
    let progress: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with('['))
        .collect();
    assert!(!progress.is_empty(), "{out}");
    for l in &progress {
        let running: u32 = l
            .split(" · ")
            .nth(2)
            .and_then(|r| r.strip_suffix(" running"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a progress line: {l}"));
        assert!(running <= 3, "{l}");
    }
    let last = progress.last().unwrap();
    assert!(
        last.starts_with("[########################] 8/8 · 8 done, 0 failed · 0 running"),
        "{last}"
    );
    assert!(last.ends_with("· done"), "{last}");
    assert_eq!(lines.last(), Some(&"every node succeeded"), "{out}");

    // A node without a BMC fails; the closing table names it and why, and the exit is 1.
    api.create_node(json!({"id": "no-bmc", "name": "no-bmc"}))
        .await;
    let r = mg(
        &server,
        &[
            "run",
            "Graph.PowerOff.Node",
            "--node",
            "demo-node-01",
            "--node",
            "no-bmc",
            "--wait",
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    let table = r
        .stdout
        .split("1 nodes did not succeed:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("a failure table: {}", r.stdout));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("NODE"), "{table}");
    assert!(
        rows[1].starts_with("no-bmc") && rows[1].contains("failed") && rows[1].contains("no OBM"),
        "{table}"
    );

    // The batches are listed, newest first.
    let list = ok(&server, &["batches", "list"]);
    let rows: Vec<&str> = list.lines().collect();
    assert_eq!(rows.len(), 3, "{list}");
    assert!(
        rows[1].contains("Graph.PowerOff.Node") && rows[1].contains("1/2"),
        "{list}"
    );
    assert!(
        rows[2].contains("Graph.PowerOn.Node") && rows[2].contains("8/8"),
        "{list}"
    );
}
