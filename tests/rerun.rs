//! Rerunning a failed workflow from its failure, end to end through the real binary:
//! `PUT /api/2.0/workflows/{id}/action {"command": "rerun"}` with option overrides, a
//! restart in the middle of the rerun, and `metalgraph rerun` on the command line.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Server, states};

/// Five tasks; the third fails unless the run says `ready: true`. The first runs a
/// subgraph, whose id is in its output; the fourth checks that output (and the second's)
/// against what the rerun is told, so it succeeds only if the taken-over outputs reach its
/// rendered options. The fifth waits a moment, long enough to restart the server under it.
const FIVE: &str = r#"
injectableName: Rerun.Five
options:
  defaults: {ready: false, firstChild: none}
tasks:
  - {label: first, taskName: Task.Graph.Run, optionOverrides: {graphName: Rerun.Child}}
  - label: second
    taskName: Task.Evaluate.Condition
    optionOverrides: {when: "{{ context.first.status == 'succeeded' }}"}
    waitOn: {first: succeeded}
  - label: third
    taskName: Task.Evaluate.Condition
    optionOverrides: {when: "{{ options.ready }}"}
    waitOn: {second: succeeded}
  - label: fourth
    taskName: Task.Evaluate.Condition
    optionOverrides:
      when: "{{ context.first.workflowId == options.firstChild and context.second.result }}"
    waitOn: {third: succeeded}
  - label: fifth
    taskName: Task.Wait
    optionOverrides: {duration: 3s}
    waitOn: {fourth: succeeded}
"#;

const CHILD: &str = "{injectableName: Rerun.Child, tasks: [{label: x, taskName: Task.Noop}]}";

const LIMIT: Duration = Duration::from_secs(60);

fn task<'a>(v: &'a Value, label: &str) -> &'a Value {
    v["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["label"] == label))
        .unwrap_or_else(|| panic!("no task {label} in {v}"))
}

/// A server with the graphs above, and a failed run of `Rerun.Five`.
async fn failed_run(dir: &std::path::Path) -> (Server, Value) {
    let server = Server::start(dir, "sled", &[]);
    let api = server.api();
    for graph in [CHILD, FIVE] {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", graph).await;
        assert_eq!(code, 201, "{body}");
    }
    let old = api.run_wait("Rerun.Five", None, json!({}), LIMIT).await;
    assert_eq!(old["status"], "failed", "{old:#}");
    assert_eq!(
        states(&old),
        "first=succeeded second=succeeded third=failed fourth=skipped fifth=skipped"
    );
    (server, old)
}

async fn action(api: &Api, id: &str, body: Value) -> (u16, Value) {
    api.send(
        "PUT",
        &format!("/api/2.0/workflows/{id}/action"),
        Some(body),
    )
    .await
}

/// Checks that `body` on workflow `id` is refused with `code` and a message naming `what`.
async fn refused(api: &Api, id: &str, body: Value, code: u16, what: &str) {
    let (got, answer) = action(api, id, body).await;
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        got == code && message.contains(what),
        "expected {code} naming {what:?}, got {got} {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_runs_from_the_failure_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, old) = failed_run(dir.path()).await;
    let api = server.api();
    let id = old["instanceId"].as_str().unwrap();
    let child = old["context"]["first"]["workflowId"].as_str().unwrap();

    // Refusals: each names what is wrong.
    let rerun_with = |options: Value| json!({"command": "rerun", "options": options});
    refused(
        &api,
        "no-such-id",
        rerun_with(json!({})),
        404,
        "workflow no-such-id not found",
    )
    .await;
    refused(
        &api,
        child,
        rerun_with(json!({})),
        409,
        &format!("subgraph of workflow {id}"),
    )
    .await;
    refused(
        &api,
        id,
        rerun_with(json!([1])),
        400,
        "field 'options' must be an object",
    )
    .await;
    let refuses = rerun_with(json!({"third": {"when": 3}}));
    refused(&api, id, refuses, 400, "when").await;
    refused(
        &api,
        id,
        json!({"command": "redo"}),
        400,
        "expected cancel or rerun",
    )
    .await;
    // The refusals created nothing.
    let (_, all) = api.get("/api/2.0/workflows?graph=Rerun.Five").await;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");

    // The rerun: the third task is told it may succeed, the fourth what to expect.
    let (code, rerun) = action(
        &api,
        id,
        json!({"command": "rerun", "options": {"defaults": {"ready": true, "firstChild": child}}}),
    )
    .await;
    assert_eq!(code, 201, "{rerun}");
    let new = rerun["instanceId"].as_str().unwrap().to_owned();
    assert_ne!(new, id);
    assert_eq!(rerun["rerunOf"], id);
    assert_eq!(rerun["name"], "Rerun.Five");
    assert_eq!(
        rerun["options"],
        json!({"defaults": {"ready": true, "firstChild": child}})
    );
    for label in ["first", "second"] {
        assert_eq!(task(&rerun, label)["state"], "succeeded", "{rerun:#}");
        assert_eq!(rerun["context"][label], old["context"][label], "{label}");
    }
    // A workflow that is running is no workflow to rerun.
    refused(&api, &new, json!({"command": "rerun"}), 409, "is still").await;

    // Killed while the fifth task waits; the next start resumes the rerun.
    let v = api.wait_task(&new, "fifth", "running", LIMIT).await;
    assert_eq!(task(&v, "fourth")["state"], "succeeded");
    server.kill9();
    let server = Server::start(dir.path(), "sled", &[]);
    let api = server.api();
    let end = api.wait(&new, LIMIT).await;
    assert_eq!(end["status"], "succeeded", "{end:#}");
    assert_eq!(end["rerunOf"], id);
    assert_eq!(
        states(&end),
        "first=succeeded second=succeeded third=succeeded fourth=succeeded fifth=succeeded"
    );
    // The first two were taken over, not run: same attempts and times as before, outputs
    // in the context (the first's subgraph is the old one: no second child ran).
    for label in ["first", "second"] {
        let (was, now) = (task(&old, label), task(&end, label));
        for field in ["attempts", "startedAt", "finishedAt"] {
            assert_eq!(now[field], was[field], "{label}.{field}");
        }
        assert_eq!(end["context"][label], old["context"][label], "{label}");
    }
    let (_, children) = api.get("/api/2.0/workflows?graph=Rerun.Child").await;
    assert_eq!(children.as_array().unwrap().len(), 1, "{children}");
    // The rest ran in the rerun, the fifth twice (the restart).
    let created = end["createdAt"].as_str().unwrap();
    for (label, attempts) in [("third", 1), ("fourth", 1), ("fifth", 2)] {
        let t = task(&end, label);
        assert_eq!(t["attempts"], attempts, "{label}: {t}");
        assert!(t["startedAt"].as_str().unwrap() >= created, "{label}: {t}");
    }
    // The old workflow is left as it was.
    let (code, again) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!((code, &again), (200, &old));
    // And a rerun that succeeded is not rerun.
    refused(&api, &new, json!({"command": "rerun"}), 409, "succeeded").await;
}

/// Runs `metalgraph ARGS` against `server`, with the token and CA from its data directory.
fn mg(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_metalgraph"))
        .args(args)
        .env("METALGRAPH_SERVER", &server.base)
        .env("METALGRAPH_DATA_DIR", &server.data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("the client runs");
    (
        out.status.code().expect("the client exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metalgraph_rerun_follows_the_new_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let (server, old) = failed_run(dir.path()).await;
    let id = old["instanceId"].as_str().unwrap();
    let child = old["context"]["first"]["workflowId"].as_str().unwrap();

    // Without the override the third task fails again: exit 1, and the summary says so.
    let (code, stdout, stderr) = mg(&server, &["rerun", id, "--wait"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let first_line = stdout.lines().next().unwrap();
    assert!(
        first_line.starts_with("workflow ")
            && first_line.ends_with(&format!("(Rerun.Five, rerunning {id}) created")),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().nth(1),
        Some(format!("kept from {id}: first, second").as_str()),
        "{stdout}"
    );
    // Progress shows only what changed in the rerun, not the kept tasks.
    let progress: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(
        progress
            .iter()
            .any(|l| l.contains("] third            failed: condition")),
        "{stdout}"
    );
    assert!(
        !progress
            .iter()
            .any(|l| l.contains("] first ") || l.contains("] second ")),
        "{stdout}"
    );

    // Options from a file, one more from --option; -o json prints the finished workflow.
    let file = dir.path().join("rerun.yaml");
    std::fs::write(&file, "defaults:\n  ready: true\n").unwrap();
    let at_file = format!("@{}", file.display());
    let first_child = format!("firstChild={child}");
    let (code, stdout, stderr) = mg(
        &server,
        &[
            "rerun",
            id,
            "--options",
            &at_file,
            "-o",
            &first_child,
            "--wait",
            "--output",
            "json",
        ],
    );
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    let end: Value = serde_json::from_str(&stdout).expect("a workflow as JSON");
    assert_eq!(end["status"], "succeeded", "{end:#}");
    assert_eq!(end["rerunOf"], id);
    assert_eq!(
        end["options"]["defaults"],
        json!({"ready": true, "firstChild": child})
    );

    // Bad input is refused before anything is sent, or by the server, naming what is wrong.
    let (code, _, stderr) = mg(&server, &["rerun", id, "--options", "[1]"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--options must be an object"), "{stderr}");
    let (code, _, stderr) = mg(&server, &["rerun", id, "--options", "@/no/such/file"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/no/such/file"), "{stderr}");
    let (code, _, stderr) = mg(&server, &["rerun", "no-such-id"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("workflow no-such-id not found"), "{stderr}");
}
