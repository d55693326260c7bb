//! Security by default, through the real binary (docs/security.md): tokens and roles on
//! every management route and gRPC call, the first admin token, the audit log, TLS with the
//! generated CA (curl, plain HTTP refused, `--no-tls`, mutual TLS), and the CLI's tokens.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use metalgraph::api::grpc::pb;
use pb::definitions_client::DefinitionsClient;
use pb::workflows_client::WorkflowsClient;
use serde_json::{Value, json};
use support::{Launch, Server};
use tokio::io::AsyncReadExt as _;
use tonic::Code;

const NOOP: &str = "{injectableName: Sec.Noop, tasks: [{label: only, taskName: Task.Noop}]}";

/// Makes a token of `role` as the admin and returns its secret.
async fn token(server: &Server, name: &str, role: &str) -> String {
    let (code, body) = server
        .api()
        .send(
            "POST",
            "/api/2.0/tokens",
            Some(json!({"name": name, "role": role})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["role"], role);
    body["token"].as_str().unwrap().to_owned()
}

/// One call with `token` (or none): its status and JSON body, and the `WWW-Authenticate`
/// header.
async fn call(
    server: &Server,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let http = server.http_as(token);
    let mut req = http.request(method.parse().unwrap(), server.url(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, r.json().await.unwrap_or(Value::Null), www)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_route_family_and_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let grpc_port = metalgraph_testkit::free_tcp_port();
    let server = Server::start(
        dir.path(),
        "sled",
        &["--grpc-listen", &format!("127.0.0.1:{grpc_port}")],
    );
    let api = server.api();
    let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", NOOP).await;
    assert_eq!(code, 201, "{body}");
    api.create_node(json!({"id": "n1", "name": "n1"})).await;
    let viewer = token(&server, "ops-viewer", "viewer").await;
    let operator = token(&server, "ops-operator", "operator").await;

    // (method, path, body, the weakest role allowed).
    let graph =
        json!({"injectableName": "Sec.Other", "tasks": [{"label": "a", "taskName": "Task.Noop"}]});
    let families: Vec<(&str, &str, Option<Value>, &str)> = vec![
        ("GET", "/api/2.0/workflows/graphs", None, "viewer"),
        ("PUT", "/api/2.0/workflows/graphs", Some(graph), "operator"),
        ("GET", "/api/2.0/workflows/tasks", None, "viewer"),
        ("GET", "/api/2.0/workflows", None, "viewer"),
        (
            "POST",
            "/api/2.0/workflows",
            Some(json!({"name": "Sec.Noop"})),
            "operator",
        ),
        (
            "PUT",
            "/api/2.0/workflows/no-such-id/action",
            Some(json!({"command": "rerun"})),
            "operator",
        ),
        ("GET", "/api/2.0/nodes", None, "viewer"),
        (
            "POST",
            "/api/2.0/nodes",
            Some(json!({"name": "made"})),
            "operator",
        ),
        ("GET", "/api/2.0/nodes/n1/obm", None, "viewer"),
        (
            "PUT",
            "/api/2.0/nodes/n1/obm",
            Some(json!({"service": "sim-obm-service", "config": {"host": "sim"}})),
            "operator",
        ),
        ("GET", "/api/2.0/events", None, "viewer"),
        ("GET", "/metrics", None, "viewer"),
        ("GET", "/api/2.0/openapi.json", None, "viewer"),
        ("GET", "/api/2.0/hooks", None, "admin"),
        ("GET", "/api/2.0/tokens", None, "admin"),
        ("GET", "/api/2.0/audit", None, "admin"),
    ];
    let rank = |r: &str| ["viewer", "operator", "admin"].iter().position(|x| *x == r);
    let mut wrong = Vec::new();
    for (who, tok) in [
        ("viewer", viewer.as_str()),
        ("operator", operator.as_str()),
        ("admin", server.token.as_deref().unwrap()),
    ] {
        for (method, path, body, needed) in &families {
            if path.contains("/events") {
                // A stream: only its status matters, read from the head.
                let r = server
                    .http_as(Some(tok))
                    .get(server.url(path))
                    .send()
                    .await
                    .unwrap();
                if r.status() != 200 {
                    wrong.push(format!("{who} GET events: {}", r.status()));
                }
                continue;
            }
            let (status, got, _) = call(&server, Some(tok), method, path, body.clone()).await;
            let allowed = rank(who) >= rank(needed);
            let ok = if allowed {
                status != 401 && status != 403 && status < 500
            } else {
                status == 403
                    && got["error"]["code"] == "forbidden"
                    && got["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(&format!("needs role {needed}")))
            };
            if !ok {
                wrong.push(format!("{who} {method} {path}: {status} {got}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Missing, garbled and unknown tokens: 401 with WWW-Authenticate; health is open.
    for (what, header) in [
        ("none", None),
        ("garbled", Some("not-a-bearer")),
        (
            "unknown",
            Some("mgt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        ),
    ] {
        let http = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(server.ca_pem.as_ref().unwrap()).unwrap(),
            )
            .build()
            .unwrap();
        let mut req = http.get(server.url("/api/2.0/nodes"));
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{what}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
    let (status, _, _) = call(&server, None, "GET", "/api/2.0/health", None).await;
    assert_eq!(status, 200, "health needs no token");

    // Revoked: refused at once.
    let (status, _, _) = call(&server, Some(&operator), "GET", "/api/2.0/nodes", None).await;
    assert_eq!(status, 200);
    let (status, _) = api
        .send("DELETE", "/api/2.0/tokens/ops-operator", None)
        .await;
    assert_eq!(status, 204);
    let (status, body, www) = call(&server, Some(&operator), "GET", "/api/2.0/nodes", None).await;
    assert_eq!((status, www.is_some()), (401, true), "{body}");

    // The token list holds names and roles, never a secret or its hash.
    let (status, list) = api.get("/api/2.0/tokens").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "ops-viewer"], "{list}");
    let text = list.to_string();
    assert!(
        !text.contains(&viewer) && !text.contains("sha256"),
        "{text}"
    );

    // gRPC: no token and a revoked one are UNAUTHENTICATED, a viewer may read but not
    // run, health needs nothing.
    for tok in [None, Some(operator.as_str())] {
        let mut defs = DefinitionsClient::new(server.grpc_as(grpc_port, tok).await);
        let e = defs
            .list_graphs(pb::ListGraphsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    let ch = server.grpc_as(grpc_port, Some(&viewer)).await;
    DefinitionsClient::new(ch.clone())
        .list_graphs(pb::ListGraphsRequest::default())
        .await
        .expect("a viewer reads");
    let e = WorkflowsClient::new(ch)
        .run_graph(pb::RunGraphRequest {
            name: "Sec.Noop".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("needs role operator"), "{e:?}");
    let channel = support::grpc_channel_tls(grpc_port, server.ca_pem.as_deref()).await;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token");
    // An admin runs over gRPC.
    WorkflowsClient::new(server.grpc(grpc_port).await)
        .run_graph(pb::RunGraphRequest {
            name: "Sec.Noop".into(),
            ..Default::default()
        })
        .await
        .expect("the admin runs");

    // The audit log: the run, the refused attempts (with and without a token), gRPC too.
    let (status, entries) = api.get("/api/2.0/audit?$top=1000").await;
    assert_eq!(status, 200, "{entries}");
    let entries = entries.as_array().unwrap();
    let find = |pred: &dyn Fn(&Value) -> bool| entries.iter().any(pred);
    assert!(
        find(&|e| e["method"] == "POST"
            && e["target"] == "/api/2.0/workflows"
            && e["status"] == "201"
            && e["token"] == "ops-operator"
            && e["role"] == "operator"),
        "the operator's run: {entries:#?}"
    );
    assert!(
        find(&|e| e["method"] == "POST"
            && e["target"] == "/api/2.0/workflows"
            && e["status"] == "403"
            && e["token"] == "ops-viewer"),
        "the viewer's refused run: {entries:#?}"
    );
    assert!(
        find(&|e| e["protocol"] == "grpc"
            && e["target"] == "/metalgraph.v1.Workflows/RunGraph"
            && e["status"] == "PermissionDenied"
            && e["token"] == "ops-viewer"),
        "the viewer's refused gRPC run: {entries:#?}"
    );
    assert!(
        find(&|e| e["protocol"] == "grpc"
            && e["target"] == "/metalgraph.v1.Workflows/RunGraph"
            && e["status"] == "Ok"
            && e["token"] == "admin"),
        "the admin's gRPC run: {entries:#?}"
    );
    assert!(
        find(&|e| e["method"] == "DELETE"
            && e["target"] == "/api/2.0/tokens/ops-operator"
            && e["status"] == "204"),
        "the revocation: {entries:#?}"
    );
    // Newest first, numbered, and reads are not audited.
    let ids: Vec<u64> = entries.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    assert!(!find(&|e| e["method"] == "GET"), "reads are not audited");

    // No token appears in the logs or in the data directory (only in admin.token).
    let logs = server.logs();
    for secret in [&viewer, &operator, server.token.as_ref().unwrap()] {
        assert!(!logs.contains(secret.as_str()), "a token in the logs");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admin_token_is_made_once_and_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "file", &[]);
    let first = server.token.clone().unwrap();
    assert!(first.starts_with("mgt_") && first.len() >= 40, "{first}");
    let viewer = token(&server, "keeps", "viewer").await;
    let gone = token(&server, "gone", "viewer").await;
    server
        .api()
        .send("DELETE", "/api/2.0/tokens/gone", None)
        .await;
    server.kill9();

    let server = Server::start(dir.path(), "file", &[]);
    assert_eq!(
        server.token.as_deref(),
        Some(first.as_str()),
        "admin.token is kept"
    );
    let (status, _, _) = call(&server, Some(&first), "GET", "/api/2.0/nodes", None).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&server, Some(&viewer), "GET", "/api/2.0/nodes", None).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&server, Some(&gone), "GET", "/api/2.0/nodes", None).await;
    assert_eq!(status, 401, "a revoked token stays revoked");
    // A duplicate name and a bad role are refused, naming what is wrong.
    let (status, body, _) = call(
        &server,
        Some(&first),
        "POST",
        "/api/2.0/tokens",
        Some(json!({"name": "keeps", "role": "viewer"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, body, _) = call(
        &server,
        Some(&first),
        "POST",
        "/api/2.0/tokens",
        Some(json!({"name": "x", "role": "root"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("root"), "{body}");
    let (status, body, _) = call(
        &server,
        Some(&first),
        "POST",
        "/api/2.0/tokens",
        Some(json!({"name": "bad name\n", "role": "viewer"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    server.terminate();
}

/// Runs curl with `args`; returns its exit code, stdout and stderr.
fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_generated_ca_plain_http_refused_and_no_tls_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::launch(
        dir.path(),
        "sled",
        Launch {
            args: vec!["--header-read-timeout-ms".into(), "1000".into()],
            ..Launch::default()
        },
    );
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let ca = dir.path().join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    let auth = format!("Authorization: Bearer {}", server.token.as_ref().unwrap());
    let port = server.base.rsplit(':').next().unwrap().to_owned();

    // curl trusts the generated CA, by address and by `localhost`.
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}/api/2.0/nodes");
        let (code, out, err) = curl(&["--cacert", ca, "-H", &auth, &url]);
        assert_eq!((code, out.as_str()), (0, "[]"), "{host}: {err}");
    }
    // Without the CA, curl refuses the certificate.
    let (code, _, err) = curl(&[&server.url("/api/2.0/health")]);
    assert_ne!(code, 0, "an unknown CA is refused: {err}");
    // Plain HTTP on the TLS port: a clear 400 saying so, then the connection closes.
    let (code, out, err) = curl(&[&format!("http://127.0.0.1:{port}/api/2.0/health")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tls_required") && out.contains("https://"),
        "{out}"
    );
    // A socket that never starts its handshake is closed after the header-read timeout.
    let mut silent = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS client is closed: {closed:?}"
    );
    // The files are reused on the next start: the same CA.
    let before = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
    server.terminate();
    let server = Server::start(dir.path(), "sled", &[]);
    assert_eq!(
        std::fs::read(dir.path().join("tls/ca.pem")).unwrap(),
        before
    );
    server.terminate();

    // --no-tls: plain HTTP, a warning on start, the token still required.
    let plain = tempfile::tempdir().unwrap();
    let log = plain.path().join("serve.log");
    let server = Server::launch(
        &plain.path().join("data"),
        "sled",
        Launch {
            args: vec!["--no-tls".into()],
            log: Some(log.clone()),
            ..Launch::default()
        },
    );
    assert!(server.base.starts_with("http://"), "{}", server.base);
    assert!(!plain.path().join("data/tls").exists());
    let (status, _, _) = call(&server, None, "GET", "/api/2.0/nodes", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = call(
        &server,
        server.token.as_deref(),
        "GET",
        "/api/2.0/nodes",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        server.logs().contains("TLS is OFF"),
        "--no-tls is warned about: {}",
        server.logs()
    );
    server.terminate();
}

/// A CA and a client certificate it signs, as PEM files in `dir`: (ca, cert, key).
fn client_ca(dir: &std::path::Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test client CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator laptop");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    (
        write("client-ca.pem", ca_cert.pem()),
        write("client.pem", cert.pem()),
        write("client.key", key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (client_ca, cert, key) = client_ca(certs.path());
    let server = Server::start(dir.path(), "sled", &["--tls-client-ca", &client_ca]);
    let ca = dir.path().join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    let auth = format!("Authorization: Bearer {}", server.token.as_ref().unwrap());
    let url = server.url("/api/2.0/nodes");
    let (code, _, err) = curl(&["--cacert", ca, "-H", &auth, &url]);
    assert_ne!(code, 0, "no client certificate: refused ({err})");
    let (code, out, err) = curl(&[
        "--cacert", ca, "--cert", &cert, "--key", &key, "-H", &auth, &url,
    ]);
    assert_eq!((code, out.as_str()), (0, "[]"), "{err}");
    // The certificate does not replace the token.
    let (code, out, _) = curl(&["--cacert", ca, "--cert", &cert, "--key", &key, &url]);
    assert_eq!(code, 0);
    assert!(out.contains("unauthorized"), "{out}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_uses_the_data_dir_and_manages_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "sled", &[]);
    let mg = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_metalgraph"))
            .args(args)
            .env("METALGRAPH_SERVER", &server.base)
            .env_remove("METALGRAPH_TOKEN")
            .env_remove("METALGRAPH_CA_CERT")
            .env_remove("METALGRAPH_DATA_DIR")
            .envs(env.iter().copied())
            .current_dir(dir.path().parent().unwrap())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let data = dir.path().to_str().unwrap();
    // From the data directory: the token and the CA.
    let (code, out, err) = mg(
        &[
            "tokens",
            "--data-dir",
            data,
            "create",
            "ci",
            "--role",
            "operator",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("Secret:"))
        .unwrap()
        .trim()
        .to_owned();
    assert!(secret.starts_with("mgt_"), "{out}");
    let (code, out, err) = mg(
        &["tokens", "list", "-o", "json"],
        &[("METALGRAPH_DATA_DIR", data)],
    );
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(!out.contains(&secret));
    // The operator token through the environment: it may list nodes, not tokens.
    let ca = dir.path().join("tls/ca.pem");
    let ca = ca.to_str().unwrap();
    let env = [
        ("METALGRAPH_TOKEN", secret.as_str()),
        ("METALGRAPH_CA_CERT", ca),
    ];
    let (code, _, err) = mg(&["nodes", "list"], &env);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = mg(&["tokens", "list"], &env);
    assert_eq!(code, 1);
    assert!(
        err.contains("403") && err.contains("needs role admin"),
        "{err}"
    );
    // No token at all: the error says where one comes from.
    let (code, _, err) = mg(&["nodes", "list", "--ca-cert", ca], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("401") && err.contains("admin.token"), "{err}");
    // No CA: the error says which flag trusts the server.
    let (code, _, err) = mg(&["nodes", "list", "--token", &secret], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--ca-cert"), "{err}");
    // Revoked: refused from then on.
    let (code, _, err) = mg(&["tokens", "revoke", "ci", "--data-dir", data], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = mg(&["nodes", "list"], &env);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_facing_listener_is_plain_and_serves_no_management_route() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), "sled", &["--node-listen", "127.0.0.1:0"]);
    let node_base = server.node_base.clone().unwrap();
    assert!(node_base.starts_with("http://"), "{node_base}");
    let plain = reqwest::Client::new();
    let bearer = format!("Bearer {}", server.token.as_ref().unwrap());
    for path in [
        "/api/2.0/nodes",
        "/api/2.0/tokens",
        "/api/2.0/audit",
        "/api/2.0/workflows",
        "/api/current/nodes",
        "/metrics",
        "/ui/",
    ] {
        // Not even the admin token opens a management route there.
        let r = plain
            .get(server.node_url(path))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path} on the node-facing listener");
    }
    // Its own routes answer, without a token.
    let r = plain
        .get(server.node_url("/api/2.0/profiles?macs=52:54:00:aa:bb:cc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.terminate();
}
