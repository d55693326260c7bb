//! metalgraph on PostgreSQL through the real binary, in a throwaway cluster this test
//! process starts: `--store postgres` serves, a workflow killed with SIGKILL mid-way resumes
//! on the next start, a database restart (`pg_ctl restart -m immediate`) under a running
//! workflow is ridden out (the store reconnects by itself and nothing acknowledged is lost),
//! a second process with the same data directory is refused, and endpoint passwords in the
//! database are sealed. Replicas sharing the database are tested in `replicas.rs`.

mod support;

use std::time::Duration;

use metalgraph_testkit::postgres;
use serde_json::json;
use support::{Api, Server};

const LIMIT: Duration = Duration::from_secs(60);

const NAP: &str = r#"
injectableName: Nap
tasks:
  - {label: first, taskName: Task.Wait, optionOverrides: {duration: 1500ms}}
  - {label: second, taskName: Task.Wait, optionOverrides: {duration: 1500ms}, waitOn: {first: succeeded}}
"#;

fn serve(data: &std::path::Path, url: &str) -> (Server, Api) {
    let server = Server::start(data, "postgres", &["--database-url", url, "--demo"]);
    let api = server.api();
    (server, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_postgres_through_a_kill_and_a_database_restart() {
    let pg = postgres();
    let url = pg.store_url();
    let data = tempfile::tempdir().expect("a data dir");
    let (server, api) = serve(data.path(), &url);
    let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", NAP).await;
    assert_eq!(code, 201, "{body}");
    let (code, health) = api.get("/api/2.0/health").await;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["store"], "postgres", "{health}");

    // A second process with the same data directory is refused while the first serves:
    // each replica of the database has a data directory (and a replica id) of its own.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_metalgraph"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "postgres",
            "--database-url",
            &url,
        ])
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("serve runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("another metalgraph process serves with the data directory"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("postgresql://"),
        "the URL is not shown: {stderr}"
    );
    // Nor may the key be rotated under a serving replica.
    let (ok, stderr) = rekey(data.path(), &url);
    assert!(!ok);
    assert!(stderr.contains("replicas serve this database"), "{stderr}");

    // Killed mid-way, resumed on the next start.
    let id = api.run("Nap", Some("demo-node-01"), json!({})).await;
    api.wait_task(&id, "first", "running", LIMIT).await;
    server.kill9();
    let (server, api) = serve(data.path(), &url);
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");

    // The database restarts under a running workflow: the commits wait for it, and the
    // workflow ends as it would have.
    let id = api.run("Nap", Some("demo-node-02"), json!({})).await;
    api.wait_task(&id, "first", "running", LIMIT).await;
    pg.restart_immediate();
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let again = api
        .run_wait("Graph.PowerOn.Node", Some("demo-node-03"), json!({}), LIMIT)
        .await;
    assert_eq!(again["status"], "succeeded", "{again:#}");
    let (code, health) = api.get("/api/2.0/health").await;
    assert_eq!(code, 200, "{health}");

    // Secrets in the database are sealed, as on disk.
    let (code, ep) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(
                json!({"name": "rack1", "service": "ipmi", "url": "10.0.0.7",
                        "password": "Pg-endpoint-s3cret"}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{ep}");
    let schema = url
        .rsplit("search_path%3D")
        .next()
        .expect("the schema in the URL");
    let plain = pg.sql(
        "metalgraph",
        &format!(
            "SELECT count(*) FROM {schema}.metalgraph_kv \
             WHERE position('Pg-endpoint-s3cret'::bytea in value) > 0"
        ),
    );
    assert_eq!(plain, "0", "the password is readable in the database");
    // A clean stop hands the database over at once: the key can be rotated now.
    assert!(server.terminate().success());
    let (ok, stderr) = rekey(data.path(), &url);
    assert!(ok, "{stderr}");
}

/// `metalgraph rekey` on the database: whether it succeeded, and its stderr.
fn rekey(data: &std::path::Path, url: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metalgraph"))
        .args(["rekey", "--store", "postgres", "--database-url", url])
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("rekey runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
