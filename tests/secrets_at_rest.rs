//! Secrets at rest: with the real binary on each store, a Redfish OBM password (sushy-tools
//! with Basic auth), a webhook secret and a secret run option are stored sealed — no file
//! under the data directory holds any of them — yet after a restart the workflow still
//! reads and the power graph still authenticates with the password; the key file is mode 0600, and a data directory opened with another key
//! fails its jobs with a clear error instead of using garbage.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::Server;
use support::peers::{Sushy, SushyOptions, system_uuid};

const PASSWORD: &str = "Redfish-at-rest-s3cret";
const HOOK_SECRET: &str = "Hook-at-rest-s3cret";
const OPTION_SECRET: &str = "Option-at-rest-s3cret";
const ENDPOINT_PASSWORD: &str = "Endpoint-at-rest-s3cret";
const LIMIT: Duration = Duration::from_secs(60);

/// Every file under `dir` that contains `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_hook_secrets_are_sealed_on_disk_and_still_work() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        auth: Some(("admin".into(), PASSWORD.into())),
        ..SushyOptions::default()
    })
    .await;
    for store in ["sled", "file"] {
        let data = tempfile::tempdir().unwrap();
        let server = Server::start(data.path(), store, &[]);
        let api = server.api();
        let node = api
            .create_node(json!({
                "name": "sealed",
                "obms": [{"service": "redfish-obm-service", "config": {
                    "host": sushy.base, "systemId": system_uuid(0),
                    "user": "admin", "password": PASSWORD}}],
            }))
            .await;
        let (code, hook) = api
            .send(
                "POST",
                "/api/2.0/hooks",
                Some(json!({"url": "http://127.0.0.1:9/hook", "secret": HOOK_SECRET})),
            )
            .await;
        assert_eq!(code, 201, "{hook}");
        let (code, endpoint) = api
            .send(
                "POST",
                "/api/2.0/endpoints",
                Some(
                    json!({"name": "rack1", "service": "redfish", "url": sushy.base,
                            "user": "admin", "password": ENDPOINT_PASSWORD}),
                ),
            )
            .await;
        assert_eq!(code, 201, "{endpoint}");
        // A run option holding a secret is kept in the workflow record: sealed too.
        let done = api
            .run_wait(
                "Graph.PowerOn.Node",
                Some(&node),
                json!({"defaults": {"adminPassword": OPTION_SECRET}}),
                LIMIT,
            )
            .await;
        assert_eq!(done["status"], "succeeded", "{store}: {done:#}");
        let first = done["instanceId"].as_str().unwrap().to_owned();
        server.terminate();

        let key = data.path().join("secret.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{store}");
        for secret in [PASSWORD, HOOK_SECRET, OPTION_SECRET, ENDPOINT_PASSWORD] {
            assert_eq!(
                files_holding(data.path(), secret),
                Vec::<String>::new(),
                "{store}: {secret} is readable in the data directory"
            );
        }

        // Restarted, the engine opens the password and the BMC accepts it.
        let server = Server::start(data.path(), store, &[]);
        let api = server.api();
        let done = api
            .run_wait("Graph.PowerOff.Node", Some(&node), json!({}), LIMIT)
            .await;
        assert_eq!(done["status"], "succeeded", "{store}: {done:#}");
        let (_, hook) = api
            .get(&format!("/api/2.0/hooks/{}", hook["id"].as_str().unwrap()))
            .await;
        let (code, earlier) = api.get(&format!("/api/2.0/workflows/{first}")).await;
        assert_eq!(code, 200, "{store}: {earlier}");
        assert_eq!(earlier["status"], "succeeded", "{store}: {earlier}");
        // The view redacts the secret option, as it always did.
        assert_eq!(
            earlier["options"]["defaults"]["adminPassword"], "<redacted>",
            "{store}"
        );
        assert_eq!(hook["signed"], true, "{store}: {hook}");
        server.terminate();

        // Another key cannot open them: serve refuses to start, naming the problem.
        let other = tempfile::tempdir().unwrap();
        let other_key = other.path().join("other.key");
        // `serve` with `key` (else the data directory's), which must refuse to start; its
        // stderr.
        let refused = |key: Option<&Path>, what: &str| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_metalgraph"));
            cmd.args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                store,
                "--data-dir",
            ])
            .arg(data.path())
            .env("RUST_LOG", "warn");
            if let Some(k) = key {
                cmd.arg("--secret-key-file").arg(k);
            }
            let out = cmd.output().unwrap();
            assert!(!out.status.success(), "{store}: serve started {what}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let stderr = refused(Some(&other_key), "with another key");
        assert!(
            stderr.contains(&format!(
                "secret key {}: the secret key does not open this store's secrets",
                other_key.display()
            )),
            "{store}: {stderr}"
        );

        // Rotating the key: `rekey` re-seals everything under a new key, which replaces
        // the old key file.
        let old_key = std::fs::read(&key).unwrap();
        let rekey = |what: &str| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_metalgraph"))
                .args(["rekey", "--store", store, "--data-dir"])
                .arg(data.path())
                .env_remove("METALGRAPH_SECRET_KEY_FILE")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && stdout.contains("re-sealed"),
                "{store} {what}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        rekey("rotation");
        assert_ne!(std::fs::read(&key).unwrap(), old_key, "{store}: a new key");
        assert!(!data.path().join("secret.key.new").exists());
        // The old key opens nothing any more.
        std::fs::write(&other_key, &old_key).unwrap();
        std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        refused(Some(&other_key), "with the old key");
        // A rekey cut short (its new key file left behind) keeps serve from starting until
        // it is run again.
        let pending = data.path().join("secret.key.new");
        metalgraph_engine::seal::Sealer::load_or_create(&pending).unwrap();
        let stderr = refused(None, "with a rekey unfinished");
        assert!(stderr.contains("metalgraph rekey"), "{store}: {stderr}");
        rekey("finishing");
        // Under the new key the BMC password, the webhook secret and the old workflow
        // still open, and none is readable on disk.
        let server = Server::start(data.path(), store, &[]);
        let api = server.api();
        let done = api
            .run_wait("Graph.PowerOn.Node", Some(&node), json!({}), LIMIT)
            .await;
        assert_eq!(done["status"], "succeeded", "{store} after rekey: {done:#}");
        let (code, earlier) = api.get(&format!("/api/2.0/workflows/{first}")).await;
        assert_eq!(code, 200, "{store} after rekey: {earlier}");
        let (code, hooks) = api.get("/api/2.0/hooks").await;
        assert_eq!(code, 200);
        assert_eq!(hooks[0]["signed"], true, "{store}: {hooks}");
        let (code, endpoints) = api.get("/api/2.0/endpoints").await;
        assert_eq!(code, 200, "{store} after rekey: {endpoints}");
        assert_eq!(endpoints[0]["passwordSet"], true, "{store}: {endpoints}");
        server.terminate();
        for secret in [PASSWORD, HOOK_SECRET, OPTION_SECRET, ENDPOINT_PASSWORD] {
            assert_eq!(
                files_holding(data.path(), secret),
                Vec::<String>::new(),
                "{store}: {secret} is readable after rekey"
            );
        }
    }
}
