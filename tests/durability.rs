//! The real binary at the edges of its promises: a node's callback answered 200 and the
//! server SIGKILLed at once (the callback must survive, on sled and on file), and a store
//! that fails under the running service (a full disk: health says why, gRPC health turns
//! NOT_SERVING, and the process exits non-zero so that a supervisor restarts it).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Launch, Server};

const LIMIT: Duration = Duration::from_secs(60);

const CALLBACK_GRAPH: &str = r#"
injectableName: Callback.Wait
tasks:
  - {label: wait, taskName: Task.Wait.Notification}
  - {label: after, taskName: Task.Noop, waitOn: {wait: succeeded}}
"#;

fn serve(data: &Path, store: &str, templates: &Path) -> Server {
    Server::start(
        data,
        store,
        &[
            "--node-listen",
            "127.0.0.1:0",
            "--templates-dir",
            templates.to_str().expect("utf-8"),
            // The simulated installer fetches its callback without a capability
            // (tests/pxe_profiles.rs covers the guard this opens).
            "--node-tokens",
            "open",
        ],
    )
}

/// The callback URL (with its token) the node would be given, once its task waits.
async fn callback_url(server: &Server) -> String {
    let http = reqwest::Client::new();
    let url = server.node_url("/api/2.0/templates/callback.txt?nodeId=n1");
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = http.get(&url).send().await.unwrap();
        if r.status() == 200 {
            return r.text().await.unwrap().trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the task never waited: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn callback_survives_sigkill(store: &str, rounds: usize) {
    let data = tempfile::tempdir().unwrap();
    let templates = tempfile::tempdir().unwrap();
    std::fs::write(
        templates.path().join("callback.txt"),
        "{{ notification.url }}\n",
    )
    .unwrap();
    let mut server = serve(data.path(), store, templates.path());
    let api = server.api();
    let (code, body) = api
        .put_yaml("/api/2.0/workflows/graphs", CALLBACK_GRAPH)
        .await;
    assert_eq!(code, 201, "{body}");
    api.create_node(json!({"id": "n1", "name": "n1"})).await;
    for round in 0..rounds {
        let api = server.api();
        let id = api.run("Callback.Wait", Some("n1"), json!({})).await;
        let url = callback_url(&server).await;
        let r = reqwest::Client::new()
            .post(&url)
            .json(&json!({"round": round, "status": "installed"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        // The installer got its 200; the server dies that instant.
        server.kill9();
        server = serve(data.path(), store, templates.path());
        let api = server.api();
        let wf = api.wait(&id, LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{store} round {round}: {wf:#}");
        assert_eq!(wf["context"]["wait"]["round"], round, "{wf:#}");
        assert_eq!(wf["context"]["wait"]["status"], "installed");
    }
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_callback_survives_an_immediate_sigkill_on_sled() {
    callback_survives_sigkill("sled", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_callback_survives_an_immediate_sigkill_on_file() {
    callback_survives_sigkill("file", 10).await;
}

/// A small tmpfs of our own, unmounted when dropped, so that the disk can really fill.
struct TinyDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (the README's test command runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { path, _dir: dir }
    }

    /// Writes a file until the disk is full.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_service_with_health_saying_why() {
    let disk = TinyDisk::mount("8m");
    let grpc_port = metalgraph_testkit::free_tcp_port();
    let grpc = format!("127.0.0.1:{grpc_port}");
    let logs = tempfile::tempdir().unwrap();
    let mut server = Server::launch(
        &disk.path,
        "file",
        Launch {
            args: vec!["--grpc-listen".into(), grpc.clone()],
            rust_log: Some("error".into()),
            log: Some(logs.path().join("stderr.log")),
        },
    );
    let api = server.api();
    let (code, body) = api.get("/api/2.0/health").await;
    assert_eq!(code, 200, "{body}");
    let graph = r#"
injectableName: Fill.Wait
tasks:
  - {label: a, taskName: Task.Wait, optionOverrides: {duration: 1500ms}}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
"#;
    let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", graph).await;
    assert_eq!(code, 201, "{body}");
    api.run("Fill.Wait", None, json!({})).await;
    disk.fill();

    // When the wait ends, the scheduler's commit finds the disk full and the engine stops:
    // health answers 503 naming why, and gRPC health turns NOT_SERVING. The journal's last
    // page may still have room for a small commit or two, so more work is asked for until
    // one does not fit (a run's creation may fail first, answered 500 and never scheduled).
    let deadline = Instant::now() + LIMIT;
    let body = loop {
        let (code, body) = api.get("/api/2.0/health").await;
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "health stayed {code}: {body}");
        let _ = api
            .send(
                "POST",
                "/api/2.0/workflows",
                Some(json!({"name": "Fill.Wait"})),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("store failure") && message.contains("No space left on device"),
        "{body}"
    );
    // Health needs no token; the channel speaks TLS like every client.
    let channel = support::grpc_channel_tls(grpc_port, server.ca_pem.as_deref()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // Then the process drains and exits non-zero, for its supervisor to restart it.
    let status = server.wait_exit(LIMIT);
    assert!(!status.success(), "{status:?}");
    assert!(
        server.logs().contains("the engine stopped"),
        "{}",
        server.logs()
    );
}
