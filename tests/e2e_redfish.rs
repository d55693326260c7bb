//! End to end through the real binary against sushy-tools (fake driver): Redfish discovery,
//! power graphs on several nodes at once, an OS install from virtual media whose ISO
//! metalgraph serves itself with the installer's callback played by the test, and the same
//! paths over Basic auth and over TLS with a self-signed certificate.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::peers::{Sushy, SushyOptions, isoinfo, raw_client, system_mac, system_uuid};
use support::{Api, Server};
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(60);
const PASSWORD: &str = "sushy-Passw0rd";

/// A metalgraph with its node-facing API on, serving `files` and the repository's
/// templates.
struct Metalgraph {
    server: Server,
    api: Api,
    _data: TempDir,
}

fn metalgraph(files: Option<&Path>) -> Metalgraph {
    metalgraph_with(files, &[])
}

/// `metalgraph` with extra `serve` arguments.
fn metalgraph_with(files: Option<&Path>, extra: &[&str]) -> Metalgraph {
    let data = tempfile::tempdir().expect("a data dir");
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/templates");
    let mut args = vec!["--node-listen", "127.0.0.1:0", "--templates-dir", templates];
    if let Some(f) = files {
        args.extend(["--files-dir", f.to_str().expect("utf-8")]);
    }
    args.extend(extra);
    let server = Server::start(data.path(), "sled", &args);
    let api = server.api();
    Metalgraph {
        server,
        api,
        _data: data,
    }
}

/// Power tasks poll quickly: sushy runs with the delay patched out.
fn fast() -> Value {
    json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "20s"}})
}

/// Runs Graph.Redfish.Discovery and returns the node id of each sushy system by index.
async fn discover(api: &Api, options: Value) -> (Value, BTreeMap<usize, String>) {
    let wf = api
        .run_wait("Graph.Redfish.Discovery", None, options, LIMIT)
        .await;
    let (code, nodes) = api.get("/api/2.0/nodes").await;
    assert_eq!(code, 200);
    let mut ids = BTreeMap::new();
    for n in nodes.as_array().expect("a list") {
        let idents = n["identifiers"].to_string();
        if let Some(i) = (0..16).find(|i| idents.contains(&system_uuid(*i))) {
            ids.insert(i, n["id"].as_str().expect("an id").to_owned());
        }
    }
    (wf, ids)
}

/// Runs `graph` on every node at once and waits for all of them.
async fn run_everywhere(api: &Api, graph: &str, nodes: &[&String]) -> Vec<Value> {
    let mut ids = Vec::new();
    for node in nodes {
        ids.push(api.run(graph, Some(node), fast()).await);
    }
    let mut ends = Vec::new();
    for id in ids {
        let wf = api.wait(&id, LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{graph}: {wf:#}");
        ends.push(wf);
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_creates_each_system_once_with_its_obm_and_catalog() {
    let sushy = Sushy::start(SushyOptions {
        systems: 3,
        instant: true,
        ..SushyOptions::default()
    })
    .await;
    let mg = metalgraph(None);
    let options =
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": PASSWORD}});

    let (wf, ids) = discover(&mg.api, options.clone()).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(wf["options"]["defaults"]["password"], "<redacted>");
    assert_eq!(
        wf["context"]["discovery"]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for (i, id) in &ids {
        let (code, node) = mg.api.get(&format!("/api/2.0/nodes/{id}")).await;
        assert_eq!(code, 200);
        assert_eq!(node["name"], format!("node-{i}"));
        assert!(
            node["identifiers"].to_string().contains(&system_mac(*i)),
            "{node}"
        );
        let (_, obms) = mg.api.get(&format!("/api/2.0/nodes/{id}/obm")).await;
        let cfg = &obms[0]["config"];
        assert_eq!(obms[0]["service"], "redfish-obm-service", "{obms}");
        assert_eq!(cfg["host"], sushy.base, "{obms}");
        assert_eq!(cfg["user"], "admin");
        assert_eq!(cfg["passwordSet"], true, "{obms}");
        assert!(cfg.get("password").is_none(), "{obms}");
        let (code, catalog) = mg
            .api
            .get(&format!("/api/2.0/nodes/{id}/catalogs/redfish"))
            .await;
        assert_eq!(code, 200, "{catalog}");
        assert!(catalog["data"].to_string().contains(&system_uuid(*i)));
    }

    // Discovering again updates the same nodes.
    let (wf, again) = discover(&mg.api, options).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(again, ids);
    let (_, nodes) = mg.api.get("/api/2.0/nodes").await;
    assert_eq!(
        nodes.as_array().unwrap().len(),
        3,
        "no duplicates: {nodes:#}"
    );
    assert!(!nodes.to_string().contains(PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_graphs_run_on_several_nodes_in_parallel() {
    let sushy = Sushy::start(SushyOptions {
        systems: 3,
        instant: true,
        ..SushyOptions::default()
    })
    .await;
    let mg = metalgraph(None);
    // Graph.Redfish.Discovery asks for credentials; sushy without auth ignores them.
    let options =
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": PASSWORD}});
    let (_, ids) = discover(&mg.api, options).await;
    let nodes: Vec<&String> = ids.values().collect();
    assert_eq!(nodes.len(), 3);

    run_everywhere(&mg.api, "Graph.PowerOn.Node", &nodes).await;
    for i in 0..3 {
        assert_eq!(sushy.power_state(i).await, "On", "system {i}");
    }
    for wf in run_everywhere(&mg.api, "Graph.Reboot.Node", &nodes).await {
        let out = &wf["context"]["reboot"];
        assert_eq!(
            out["previousState"], "On",
            "a restart, not a power-on: {wf:#}"
        );
        assert_eq!(out["changed"], true);
    }
    for i in 0..3 {
        assert_eq!(sushy.power_state(i).await, "On", "system {i}");
    }
    run_everywhere(&mg.api, "Graph.PowerOff.Node", &nodes).await;
    for i in 0..3 {
        assert_eq!(sushy.power_state(i).await, "Off", "system {i}");
    }
}

/// `len` bytes that no compressor or cache would mistake for another file.
fn iso_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Files named `name` under `dir`, at any depth.
fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(find_files(&path, name));
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(path);
        }
    }
    out
}

/// A sushy with one system, and a files directory holding `images/install.iso`, `iso`.
async fn install_peer(iso: &[u8]) -> (Sushy, TempDir) {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        ..SushyOptions::default()
    })
    .await;
    let files = tempfile::tempdir().expect("a files dir");
    std::fs::create_dir_all(files.path().join("images")).unwrap();
    std::fs::write(files.path().join("images/install.iso"), iso).unwrap();
    (sushy, files)
}

/// Registers sushy's system 0 by hand, as an operator would; returns the node's id.
async fn install_target(api: &Api, sushy: &Sushy, name: &str) -> String {
    api.create_node(json!({
        "name": name,
        "identifiers": [system_mac(0)],
        "obms": [{"service": "redfish-obm-service",
                  "config": {"host": sushy.base, "systemId": system_uuid(0)}}],
    }))
    .await
}

/// Runs Graph.InstallOS.VirtualMedia on `node` until the installer is awaited; returns the
/// workflow's id and view.
async fn install_until_waiting(api: &Api, node: &str, options: Value) -> (String, Value) {
    let id = api
        .run("Graph.InstallOS.VirtualMedia", Some(node), options)
        .await;
    let waiting = api.wait_task(&id, "wait-installed", "running", LIMIT).await;
    (id, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_an_os_from_virtual_media_served_by_metalgraph() {
    let iso = iso_bytes(4 << 20);
    let (sushy, files) = install_peer(&iso).await;
    // The installer booted from the image has no capability to show and metalgraph runs no
    // DHCP here, so it could not prove it is the node: the operator opens the node-facing
    // listener's tokens (docs/security.md, "Node-facing listener").
    let mg = metalgraph_with(Some(files.path()), &["--node-tokens", "open"]);
    let image = mg.server.node_url("/files/images/install.iso");
    let http = raw_client();

    // The file endpoint answers ranges and HEAD.
    let r = http
        .get(&image)
        .header("Range", "bytes=1048576-1049599")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1048576-1049599/{}", iso.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), &iso[1048576..1049600]);
    let r = http.head(&image).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        iso.len().to_string().as_str()
    );
    let r = http
        .get(&image)
        .header("Range", "bytes=99999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    let node = install_target(&mg.api, &sushy, "install-target").await;
    let mut options = fast();
    options["defaults"]["imageUrl"] = json!(image);
    let (id, _) = install_until_waiting(&mg.api, &node, options).await;

    // The BMC holds the image metalgraph served, boots from CD and was restarted.
    let cd = sushy.cd(0).await;
    assert_eq!(cd["Image"], image, "{cd:#}");
    assert_eq!(cd["Inserted"], true, "{cd:#}");
    let system = sushy.get(&sushy.system_path(0)).await;
    assert_eq!(
        system["Boot"]["BootSourceOverrideTarget"], "Cd",
        "{system:#}"
    );
    assert_eq!(system["PowerState"], "On");
    let downloaded = find_files(&sushy.tmp_dir(), "install.iso");
    assert!(
        downloaded
            .iter()
            .any(|p| std::fs::read(p).is_ok_and(|b| b == iso)),
        "sushy downloaded the whole image: {downloaded:?}"
    );

    // The installer fetches its kickstart; the callback in it carries the task's token.
    let ks_url = mg.server.node_url(&format!(
        "/api/2.0/templates/kickstart-callback.ks?nodeId={node}"
    ));
    let r = http.get(&ks_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let kickstart = r.text().await.unwrap();
    let callback = kickstart
        .lines()
        .find_map(|l| {
            let start = l.find("'http")? + 1;
            Some(l[start..l.rfind('\'')?].to_owned())
        })
        .unwrap_or_else(|| panic!("no callback URL in:\n{kickstart}"));
    let token = callback
        .split("token=")
        .nth(1)
        .expect("a token in the callback URL");
    assert_eq!(token.len(), 32, "{callback}");
    assert!(callback.starts_with(&mg.server.node_url("/api/2.0/notification?nodeId=")));
    assert!(kickstart.contains(&format!("nodeId={node}&token={token}")));

    // A wrong token is answered as if nothing waited: the same 404.
    let wrong = callback.replace(token, "0123456789abcdef0123456789abcdef");
    let r = http.post(&wrong).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap());
    let r = http
        .post(&callback)
        .json(&json!({"status": "installed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let wf = mg.api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["wait-installed"]["status"], "installed");
    let cd = sushy.cd(0).await;
    assert_eq!(cd["Inserted"], false, "ejected at the end: {cd:#}");

    // Nothing waits any more: the callback cannot be rendered.
    let r = http.get(&ks_url).send().await.unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_discovery_and_power() {
    let sushy = Sushy::start(SushyOptions {
        systems: 2,
        instant: true,
        auth: Some(("admin".into(), PASSWORD.into())),
        ..SushyOptions::default()
    })
    .await;
    let mg = metalgraph(None);
    let wrong = "not-the-Passw0rd";
    let (wf, ids) = discover(
        &mg.api,
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": wrong}}),
    )
    .await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    assert!(ids.is_empty());
    let error = wf["tasks"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("Redfish authentication failed for user admin (HTTP 401"),
        "{error}"
    );
    assert!(!wf.to_string().contains(wrong), "{wf}");

    let (wf, ids) = discover(
        &mg.api,
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": PASSWORD}}),
    )
    .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let nodes: Vec<&String> = ids.values().collect();
    assert_eq!(nodes.len(), 2);
    run_everywhere(&mg.api, "Graph.PowerOn.Node", &nodes).await;
    for i in 0..2 {
        assert_eq!(sushy.power_state(i).await, "On");
    }
    run_everywhere(&mg.api, "Graph.PowerOff.Node", &nodes).await;
    for i in 0..2 {
        assert_eq!(sushy.power_state(i).await, "Off");
    }

    // A wrong password is corrected while the task retries: the retry reads the node
    // afresh and uses the corrected password.
    let node = nodes[0];
    let (code, obms) = mg.api.get(&format!("/api/2.0/nodes/{node}/obm")).await;
    assert_eq!(code, 200);
    let mut obm = obms[0].clone();
    obm["config"].as_object_mut().unwrap().remove("passwordSet");
    obm["config"]["password"] = json!(wrong);
    let (code, body) = mg
        .api
        .send(
            "PUT",
            &format!("/api/2.0/nodes/{node}/obm"),
            Some(obm.clone()),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let graph = r#"
injectableName: Retry.PowerOn
tasks:
  - {label: on, taskName: Task.Obm.Node.PowerOn, retries: {max: 30, backoff: 300ms}}
"#;
    let (code, body) = mg.api.put_yaml("/api/2.0/workflows/graphs", graph).await;
    assert_eq!(code, 201, "{body}");
    let id = mg.api.run("Retry.PowerOn", Some(node), fast()).await;
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (_, wf) = mg.api.get(&format!("/api/2.0/workflows/{id}")).await;
        let error = wf["tasks"][0]["error"].as_str().unwrap_or_default();
        if error.contains("authentication failed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{wf:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    obm["config"]["password"] = json!(PASSWORD);
    let (code, body) = mg
        .api
        .send("PUT", &format!("/api/2.0/nodes/{node}/obm"), Some(obm))
        .await;
    assert_eq!(code, 200, "{body}");
    let wf = mg.api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert!(wf["tasks"][0]["attempts"].as_u64().unwrap() >= 2, "{wf:#}");
    assert_eq!(sushy.power_state(0).await, "On");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verified_against_the_bmcs_own_ca_or_not_at_all() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        tls: true,
        auth: Some(("admin".into(), PASSWORD.into())),
        ..SushyOptions::default()
    })
    .await;
    assert!(sushy.base.starts_with("https://"));
    let mg = metalgraph(None);
    let mut options =
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": PASSWORD}});

    // The certificate is verified against the system's CAs unless the OBM says otherwise;
    // a private CA's is refused, and the error says what to do.
    let (wf, _) = discover(&mg.api, options.clone()).await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let error = wf["tasks"][0]["error"].as_str().unwrap();
    assert!(
        error.to_lowercase().contains("certificate") && error.contains("caCert"),
        "{error}"
    );

    // With the BMC's CA the certificate is verified and accepted; the nodes keep it.
    options["defaults"]["caCert"] = json!(sushy.ca_pem());
    let (wf, ids) = discover(&mg.api, options.clone()).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let node = &ids[&0];
    let (_, obms) = mg.api.get(&format!("/api/2.0/nodes/{node}/obm")).await;
    assert_eq!(obms[0]["config"]["caCert"], json!(sushy.ca_pem()), "{obms}");
    run_everywhere(&mg.api, "Graph.PowerOn.Node", &[node]).await;
    assert_eq!(sushy.power_state(0).await, "On");
    run_everywhere(&mg.api, "Graph.PowerOff.Node", &[node]).await;
    assert_eq!(sushy.power_state(0).await, "Off");

    // Another CA does not vouch for it.
    let other_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    };
    let (code, body) = mg
        .api
        .send(
            "PUT",
            &format!("/api/2.0/nodes/{node}/obm"),
            Some(json!({"service": "redfish-obm-service", "config": {
                "host": sushy.base, "user": "admin", "password": PASSWORD,
                "systemId": system_uuid(0), "caCert": other_ca}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let id = mg
        .api
        .run("Graph.PowerOn.Node", Some(node), json!({}))
        .await;
    let wf = mg.api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    // Something that is not PEM is refused when stored, naming the field.
    let (code, body) = mg
        .api
        .send(
            "PUT",
            &format!("/api/2.0/nodes/{node}/obm"),
            Some(json!({"service": "redfish-obm-service", "config": {
                "host": sushy.base, "caCert": "not a certificate"}})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("caCert"), "{body}");

    options["defaults"]
        .as_object_mut()
        .unwrap()
        .remove("caCert");
    options["defaults"]["verifySSL"] = json!(false);
    let (wf, ids) = discover(&mg.api, options).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let node = &ids[&0];
    let (_, obms) = mg.api.get(&format!("/api/2.0/nodes/{node}/obm")).await;
    assert_eq!(obms[0]["config"]["verifySSL"], false, "{obms}");
    run_everywhere(&mg.api, "Graph.PowerOn.Node", &[node]).await;
    assert_eq!(sushy.power_state(0).await, "On");
    run_everywhere(&mg.api, "Graph.PowerOff.Node", &[node]).await;
    assert_eq!(sushy.power_state(0).await, "Off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rackhd_obm_actions_drive_a_real_redfish_bmc() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        auth: Some(("admin".into(), PASSWORD.into())),
        ..SushyOptions::default()
    })
    .await;
    let mg = metalgraph(None);
    let (wf, ids) = discover(
        &mg.api,
        json!({"defaults": {"uri": sushy.base, "username": "admin", "password": PASSWORD}}),
    )
    .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let node = &ids[&0];
    // RackHD's own shape: Task.Base.Obm.Node with RackHD's action names, naming the IPMI
    // service as RackHD's shipped tasks do; the node's Redfish OBM drives it.
    for (action, name) in [
        ("powerOff", "Task.Rackhd.PowerOff"),
        ("forceBootPxe", "Task.Rackhd.ForcePxe"),
        ("powerStatus", "Task.Rackhd.Status"),
    ] {
        let (code, body) = mg
            .api
            .send(
                "PUT",
                "/api/2.0/workflows/tasks",
                Some(
                    json!({"injectableName": name, "implementsTask": "Task.Base.Obm.Node",
                            "options": {"action": action, "obmServiceName": "ipmi-obm-service"},
                            "properties": {"power": {}}}),
                ),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = mg
            .api
            .send(
                "PUT",
                "/api/2.0/workflows/graphs",
                Some(json!({"injectableName": format!("Graph.{name}"),
                            "tasks": [{"label": "obm", "taskName": name}]})),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    run_everywhere(&mg.api, "Graph.Task.Rackhd.PowerOff", &[node]).await;
    assert_eq!(sushy.power_state(0).await, "Off");
    // forceBootPxe: PXE on the next boot, then a reset (from off, that powers on).
    run_everywhere(&mg.api, "Graph.Task.Rackhd.ForcePxe", &[node]).await;
    let system = sushy.get(&sushy.system_path(0)).await;
    assert_eq!(
        system["Boot"]["BootSourceOverrideTarget"], "Pxe",
        "{system:#}"
    );
    assert_eq!(system["PowerState"], "On");
    let ends = run_everywhere(&mg.api, "Graph.Task.Rackhd.Status", &[node]).await;
    assert_eq!(
        ends[0]["context"]["obm"]["powerState"], "On",
        "{:#}",
        ends[0]
    );
    // clearSEL and mcResetCold are IPMI's (sushy-tools has neither ClearLog nor a Manager
    // reset): RackHD's graphs fail on a Redfish node, saying so.
    for (graph, label, op) in [
        ("Graph.ClearSEL.Node", "clearsel", "clear SEL"),
        ("Graph.McReset", "mc-reset", "cold reset"),
    ] {
        let wf = mg.api.run_wait(graph, Some(node), fast(), LIMIT).await;
        assert_eq!(wf["status"], "failed", "{graph}: {wf:#}");
        let task = wf["tasks"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["label"] == label))
            .unwrap_or_else(|| panic!("{graph}: no task {label}: {wf:#}"));
        let error = task["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("{op} on BMC {}", sushy.base))
                && error.contains("not supported")
                && error.contains("only over IPMI"),
            "{graph}: {error}"
        );
    }
    assert_eq!(sushy.power_state(0).await, "On", "the node was not touched");
}

/// The files in the configuration media folder of a files directory.
fn config_media_files(files: &Path) -> Vec<String> {
    std::fs::read_dir(files.join("config-media"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_with_a_nocloud_configuration_medium_in_the_second_slot() {
    let (sushy, files) = install_peer(&iso_bytes(1 << 20)).await;
    // An image left by a workflow that ended while the server was down (here: one that no
    // longer exists) is deleted when the server starts.
    std::fs::create_dir_all(files.path().join("config-media")).unwrap();
    let stale = "0a1b2c3d-0000-4000-8000-000000000000.4.00112233445566778899aabbccddeeff.iso";
    std::fs::write(files.path().join("config-media").join(stale), b"old").unwrap();
    // The medium carries the installer's callback: the node-facing tokens stay closed.
    let mg = metalgraph(Some(files.path()));
    let deadline = std::time::Instant::now() + LIMIT;
    while !config_media_files(files.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale image stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let node = install_target(&mg.api, &sushy, "cloud-target").await;
    let image = mg.server.node_url("/files/images/install.iso");
    let mut options = fast();
    options["defaults"]["imageUrl"] = json!(image);
    options["defaults"]["configMedia"] = json!("nocloud");
    options["build-config"] = json!({"vars": {"sshKeys": ["ssh-ed25519 AAAAC3Nz test@e2e"]}});
    let (id, waiting) = install_until_waiting(&mg.api, &node, options).await;

    // While the installer runs, the BMC holds the OS image in its CD drive and the
    // configuration medium metalgraph built in its second device.
    let built = &waiting["context"]["build-config"];
    let url = built["url"].as_str().expect("the medium's URL").to_owned();
    assert!(
        url.starts_with(&mg.server.node_url("/files/config-media/")),
        "{built:#}"
    );
    assert_eq!(built["label"], "cidata", "{built:#}");
    let cd = sushy.cd(0).await;
    assert_eq!(cd["Image"], image, "{cd:#}");
    let floppy = sushy.floppy(0).await;
    assert_eq!(floppy["Image"], url, "{floppy:#}");
    assert_eq!(floppy["Inserted"], true, "{floppy:#}");
    assert_eq!(waiting["context"]["insert-config"]["slot"], "secondary");

    // The medium, as the BMC fetches it from /files/, read back with isoinfo.
    let r = raw_client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let fetched = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(fetched.path(), r.bytes().await.unwrap()).unwrap();
    let info = isoinfo(fetched.path(), &["-d"]);
    assert!(info.contains("Volume id: cidata"), "{info}");
    // What cloud-init's ds-identify asks: blkid's label and type.
    let blkid = std::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(fetched.path())
        .output()
        .expect("blkid runs");
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(
        blkid.contains("\nLABEL=cidata\n") && blkid.contains("\nTYPE=iso9660\n"),
        "{blkid}"
    );
    let listing = isoinfo(fetched.path(), &["-J", "-f"]);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort_unstable();
    assert_eq!(names, ["/meta-data", "/network-config", "/user-data"]);
    let read = |name: &str| isoinfo(fetched.path(), &["-R", "-x", name]);
    let user_data = read("/user-data");
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert!(
        user_data.contains("hostname: \"cloud-target\""),
        "{user_data}"
    );
    assert!(
        user_data.contains(r#"ssh_authorized_keys: ["ssh-ed25519 AAAAC3Nz test@e2e"]"#),
        "{user_data}"
    );
    let meta_data = read("/meta-data");
    assert!(
        meta_data.contains(&format!("instance-id: \"{id}\"")),
        "{meta_data}"
    );
    let network = read("/network-config");
    assert!(
        network.contains(&format!("macaddress: \"{}\"", system_mac(0))),
        "{network}"
    );

    // The installer reports the end with the callback the medium carries (cloud-init's
    // runcmd, a JSON string in YAML); both media are ejected and the image is deleted.
    let callback: String = user_data
        .lines()
        .find_map(|l| {
            let start = l.find("\"http")?;
            let end = start + 1 + l[start + 1..].find('"')?;
            serde_json::from_str(&l[start..=end]).ok()
        })
        .unwrap_or_else(|| panic!("no callback in:\n{user_data}"));
    assert!(
        callback.starts_with(
            &mg.server
                .node_url(&format!("/api/2.0/notification?nodeId={node}&token="))
        ),
        "{callback}"
    );
    let token = callback.rsplit("token=").next().unwrap();
    assert!(!waiting.to_string().contains(token), "{waiting}");
    let r = raw_client()
        .post(&callback)
        .json(&json!({"status": "installed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wf = mg.api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["wait-installed"]["status"], "installed");
    assert!(!wf.to_string().contains(token), "{wf}");
    assert_eq!(sushy.cd(0).await["Inserted"], false);
    let floppy = sushy.floppy(0).await;
    assert_eq!(floppy["Inserted"], false, "ejected at the end: {floppy:#}");
    let deadline = std::time::Instant::now() + LIMIT;
    while !config_media_files(files.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the image outlives its workflow: {:?}",
            config_media_files(files.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = raw_client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Without configMedia the graph skips the second medium.
    let mut options = fast();
    options["defaults"]["imageUrl"] = json!(image);
    let (id, waiting) = install_until_waiting(&mg.api, &node, options).await;
    let states = support::states(&waiting);
    assert!(
        states.contains("build-config=skipped") && states.contains("insert-config=skipped"),
        "{states}"
    );
    assert_eq!(sushy.floppy(0).await["Inserted"], false);
    let (code, body) = mg
        .api
        .send(
            "PUT",
            &format!("/api/2.0/workflows/{id}/action"),
            Some(json!({"command": "cancel"})),
        )
        .await;
    assert_eq!(
        (code, &body["status"]),
        (202, &json!("cancelled")),
        "{body}"
    );
}
