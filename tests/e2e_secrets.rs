//! BMC passwords are write-only, end to end: the binary runs at `RUST_LOG=debug` with its
//! output captured while nodes with passwords are registered (Redfish with Basic auth,
//! IPMI), discovery runs with a password option (a wrong one too), power graphs run and a
//! template is rendered; then no API response, log line or rendered template may contain
//! any of the passwords. Likewise a configuration medium's secret option: it reaches the
//! image and nothing else.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::peers::{
    IPMI_PASSWORD, IpmiSim, Sushy, SushyOptions, isoinfo, raw_client, system_uuid,
};
use support::{Api, Launch, Server};

const LIMIT: Duration = Duration::from_secs(60);
const REDFISH_PASSWORD: &str = "Redfish-s3cret-pw";
const WRONG_PASSWORD: &str = "Wr0ng-but-still-s3cret";
const OPTION_PASSWORD: &str = "Opt10n-s3cret-pw";

const CALLBACK: &str = r#"
injectableName: Test.E2E.Callback
tasks:
  - label: wait-installed
    taskName: Task.Wait.Notification
"#;

/// Every response body the test saw, for the final check.
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, what: impl Into<String>, body: &Value) -> Value {
        self.0.push((what.into(), body.to_string()));
        body.clone()
    }

    async fn get(&mut self, api: &Api, path: &str) -> Value {
        let (code, v) = api.get(path).await;
        assert_eq!(code, 200, "GET {path}: {v}");
        self.add(format!("GET {path}"), &v)
    }
}

fn fast() -> Value {
    json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "20s"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_appear_in_no_response_log_or_template() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        auth: Some(("admin".into(), REDFISH_PASSWORD.into())),
        ..SushyOptions::default()
    })
    .await;
    let sim = IpmiSim::start();
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = dir.path().join("metalgraph.log");
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/templates");
    let server = Server::launch(
        &dir.path().join("data"),
        "sled",
        Launch {
            // The simulated installer fetches its kickstart without a capability (a
            // virtual-media install without metalgraph's DHCP): tokens are open to it.
            args: [
                "--node-listen",
                "127.0.0.1:0",
                "--templates-dir",
                templates,
                "--node-tokens",
                "open",
            ]
            .map(str::to_owned)
            .to_vec(),
            rust_log: Some("debug".into()),
            log: Some(log.clone()),
        },
    );
    let api = server.api();
    let mut seen = Seen(Vec::new());

    // Discovery, first with a wrong password, then with the right one.
    for (password, want) in [(WRONG_PASSWORD, "failed"), (REDFISH_PASSWORD, "succeeded")] {
        let options =
            json!({"defaults": {"uri": sushy.base, "username": "admin", "password": password}});
        let (code, v) = api
            .send(
                "POST",
                "/api/2.0/workflows",
                Some(json!({"name": "Graph.Redfish.Discovery", "options": options})),
            )
            .await;
        assert_eq!(code, 201, "{v}");
        seen.add("POST discovery", &v);
        let wf = api.wait(v["instanceId"].as_str().unwrap(), LIMIT).await;
        assert_eq!(wf["status"], want, "{wf:#}");
        seen.add("discovery", &wf);
    }
    let (_, nodes) = api.get("/api/2.0/nodes").await;
    let redfish = nodes[0]["id"]
        .as_str()
        .expect("a discovered node")
        .to_owned();

    // An IPMI node, and a Redfish OBM set again through PUT .../obm.
    let node = json!({
        "name": "ipmi-node",
        "obms": [{"service": "ipmi-obm-service", "config": {
            "host": "127.0.0.1", "port": sim.port, "user": "admin", "password": IPMI_PASSWORD}}],
    });
    let (code, v) = api.send("POST", "/api/2.0/nodes", Some(node)).await;
    assert_eq!(code, 201, "{v}");
    let ipmi = seen.add("POST node", &v)["id"].as_str().unwrap().to_owned();
    let obm = json!({"service": "redfish-obm-service", "config": {
        "host": sushy.base, "systemId": system_uuid(0), "user": "admin",
        "password": REDFISH_PASSWORD}});
    let (code, v) = api
        .send("PUT", &format!("/api/2.0/nodes/{redfish}/obm"), Some(obm))
        .await;
    assert_eq!(code, 200, "{v}");
    seen.add("PUT obm", &v);

    for node in [&redfish, &ipmi] {
        for graph in ["Graph.PowerOn.Node", "Graph.PowerOff.Node"] {
            let wf = api.run_wait(graph, Some(node), fast(), LIMIT).await;
            assert_eq!(wf["status"], "succeeded", "{graph} on {node}: {wf:#}");
            seen.add(graph, &wf);
        }
    }
    assert_eq!(sim.state("power"), "0");

    // A template rendered for a node, while a task with a password option waits.
    let (code, v) = api.put_yaml("/api/2.0/workflows/graphs", CALLBACK).await;
    assert_eq!(code, 201, "{v}");
    let options = json!({"defaults": {"password": OPTION_PASSWORD}});
    let id = api.run("Test.E2E.Callback", Some(&ipmi), options).await;
    let waiting = api.wait_task(&id, "wait-installed", "running", LIMIT).await;
    seen.add("waiting workflow", &waiting);
    let url = server.node_url(&format!(
        "/api/2.0/templates/kickstart-callback.ks?nodeId={ipmi}"
    ));
    let r = raw_client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let kickstart = r.text().await.unwrap();
    assert!(kickstart.contains("token="), "{kickstart}");
    let callback = kickstart
        .lines()
        .find_map(|l| Some(l[l.find("'http")? + 1..l.rfind('\'')?].to_owned()))
        .expect("a callback URL");
    let r = raw_client()
        .post(&callback)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["options"]["defaults"]["password"], "<redacted>");

    // Everything the API shows.
    seen.get(&api, "/api/2.0/nodes").await;
    for node in [&redfish, &ipmi] {
        for path in ["", "/obm", "/catalogs", "/workflows"] {
            seen.get(&api, &format!("/api/2.0/nodes/{node}{path}"))
                .await;
        }
    }
    let all = seen.get(&api, "/api/2.0/workflows").await;
    for wf in all.as_array().unwrap() {
        let id = wf["instanceId"].as_str().unwrap();
        seen.get(&api, &format!("/api/2.0/workflows/{id}")).await;
    }
    seen.get(&api, "/api/2.0/workflows/graphs").await;
    seen.get(&api, "/api/2.0/workflows/tasks").await;

    let logs = server.logs();
    assert!(
        logs.contains("DEBUG") && logs.contains("path=/api/2.0/nodes"),
        "the log level is debug:\n{logs}"
    );
    for secret in [
        REDFISH_PASSWORD,
        WRONG_PASSWORD,
        IPMI_PASSWORD,
        OPTION_PASSWORD,
    ] {
        for (what, body) in &seen.0 {
            assert!(!body.contains(secret), "{what} shows {secret}: {body}");
        }
        assert!(!kickstart.contains(secret), "the template shows {secret}");
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("the log shows {secret}: {line}");
        }
    }
}

const MEDIA_SECRET: &str = "Med1a-r00t-s3cret";

/// Reads the event stream from its start until `until` appears in it (or a minute passes).
async fn events_until(server: &Server, until: &str) -> String {
    // An id of another log replays every retained event.
    let mut r = server
        .http()
        .get(server.url("/api/2.0/events"))
        .header("Last-Event-ID", "another-log-0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !text.contains(until) {
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {until} in the events:\n{text}"))
            .unwrap_or_else(|e| panic!("{e}; no {until} in the events:\n{text}"))
            .expect("the stream goes on");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_media_secret_reaches_the_image_and_nothing_else() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (files, templates) = (dir.path().join("files"), dir.path().join("templates"));
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(
        templates.join("secret.ks"),
        "rootpw --iscrypted {{ secrets.rootPasswordHash }}\nnetwork --hostname={{ node.name }}\n\
         # {{ notification.url }}\n",
    )
    .unwrap();
    let log = dir.path().join("metalgraph.log");
    let args = [
        "--node-listen",
        "127.0.0.1:0",
        "--files-dir",
        files.to_str().unwrap(),
        "--templates-dir",
        templates.to_str().unwrap(),
    ];
    let server = Server::launch(
        &dir.path().join("data"),
        "sled",
        Launch {
            args: args.map(str::to_owned).to_vec(),
            rust_log: Some("debug".into()),
            log: Some(log),
        },
    );
    let api = server.api();
    let graph = r#"
injectableName: Test.E2E.ConfigMedia
tasks:
  - label: build
    taskName: Task.ConfigMedia.Build
    optionOverrides: { kind: kickstart, files: { ks.cfg: secret.ks }, notify: wait-installed }
  - label: wait-installed
    taskName: Task.Wait.Notification
    waitOn: { build: succeeded }
"#;
    let (code, v) = api.put_yaml("/api/2.0/workflows/graphs", graph).await;
    assert_eq!(code, 201, "{v}");
    let node = api.create_node(json!({"name": "media-node"})).await;
    let mut seen = Seen(Vec::new());
    let mut tokens = Vec::new();

    // The secret is given in the task's own layer and in the defaults: both are redacted.
    for options in [
        json!({"build": {"secrets": {"rootPasswordHash": MEDIA_SECRET}}}),
        json!({"defaults": {"secrets": {"rootPasswordHash": MEDIA_SECRET}}}),
    ] {
        let (code, v) = api
            .send(
                "POST",
                &format!("/api/2.0/nodes/{node}/workflows"),
                Some(json!({"name": "Test.E2E.ConfigMedia", "options": options})),
            )
            .await;
        assert_eq!(code, 201, "{v}");
        let id = seen.add("POST run", &v)["instanceId"]
            .as_str()
            .unwrap()
            .to_owned();
        let waiting = api.wait_task(&id, "wait-installed", "running", LIMIT).await;
        seen.add("waiting workflow", &waiting);
        assert!(
            waiting["options"].to_string().contains("<redacted>"),
            "{waiting:#}"
        );

        // The image holds the secret: the template rendered it (under volume OEMDRV).
        let url = waiting["context"]["build"]["url"].as_str().unwrap();
        let r = raw_client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let iso = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(iso.path(), r.bytes().await.unwrap()).unwrap();
        assert!(isoinfo(iso.path(), &["-d"]).contains("Volume id: OEMDRV"));
        let ks = isoinfo(iso.path(), &["-J", "-x", "/ks.cfg"]);
        let callback = server.node_url(&format!("/api/2.0/notification?nodeId={node}&token="));
        let token = ks
            .split(&callback)
            .nth(1)
            .and_then(|rest| rest.lines().next())
            .unwrap_or_else(|| panic!("no callback in:\n{ks}"))
            .to_owned();
        assert_eq!(token.len(), 32, "{ks}");
        assert_eq!(
            ks,
            format!(
                "rootpw --iscrypted {MEDIA_SECRET}\nnetwork --hostname=media-node\n\
                 # {callback}{token}\n"
            )
        );
        tokens.push(token);
        let (code, v) = api
            .send(
                "PUT",
                &format!("/api/2.0/workflows/{id}/action"),
                Some(json!({"command": "cancel"})),
            )
            .await;
        assert_eq!((code, &v["status"]), (202, &json!("cancelled")), "{v}");
        seen.add("cancelled", &v);
    }

    // A secret that cannot be printed fails the task without being quoted.
    let bad = format!("{MEDIA_SECRET}\nroot::0:0::/:/bin/sh");
    let options = json!({"build": {"secrets": {"rootPasswordHash": bad}}});
    let wf = api
        .run_wait("Test.E2E.ConfigMedia", Some(&node), options, LIMIT)
        .await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let error = wf["tasks"][0]["error"].as_str().unwrap();
    assert!(error.contains("control character"), "{error}");
    seen.add("failed workflow", &wf);

    let all = seen.get(&api, "/api/2.0/workflows").await;
    for wf in all.as_array().unwrap() {
        let id = wf["instanceId"].as_str().unwrap();
        seen.get(&api, &format!("/api/2.0/workflows/{id}")).await;
    }
    let last = all[0]["instanceId"].as_str().unwrap().to_owned();
    let events = events_until(&server, &format!("\"workflowId\":\"{last}\",\"graph\":\"Test.E2E.ConfigMedia\",\"node\":\"{node}\",\"status\":\"failed\"")).await;
    seen.0.push(("events".into(), events));
    let logs = server.logs();
    assert!(logs.contains("DEBUG"), "the log level is debug:\n{logs}");
    // Neither the secret nor the callback tokens the media carried show anywhere else.
    for secret in tokens.iter().map(String::as_str).chain([MEDIA_SECRET]) {
        for (what, body) in &seen.0 {
            assert!(!body.contains(secret), "{what} shows {secret}: {body}");
        }
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!("the log shows {secret}: {line}");
        }
    }
    // Every workflow ended, so every image is gone.
    let deadline = std::time::Instant::now() + LIMIT;
    while std::fs::read_dir(files.join("config-media")).is_ok_and(|mut d| d.next().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "images outlive their workflows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
