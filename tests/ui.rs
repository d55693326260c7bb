//! The web view (`/ui/`) against the real binary: its pages and files with their headers,
//! and the pages themselves in Debian's headless Chromium, driven by Playwright from the
//! peers' venv (tests/clients/ui_driver.py). One browser for the whole binary: the driver
//! runs every browser check in order — the demo nodes listed, a workflow followed live
//! from running to succeeded without a reload, a task's details, the filters, and a node
//! name and an error made of markup shown as text.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::Server;
use support::peers::peers_dir;

/// The files the pages load, with the type each must be served as.
const FILES: &[(&str, &str)] = &[
    ("/ui/", "text/html; charset=utf-8"),
    ("/ui/workflows", "text/html; charset=utf-8"),
    ("/ui/workflows/any-id", "text/html; charset=utf-8"),
    ("/ui/assets/common.js", "text/javascript; charset=utf-8"),
    ("/ui/assets/dag.js", "text/javascript; charset=utf-8"),
    ("/ui/assets/nodes.js", "text/javascript; charset=utf-8"),
    ("/ui/assets/workflows.js", "text/javascript; charset=utf-8"),
    ("/ui/assets/workflow.js", "text/javascript; charset=utf-8"),
    ("/ui/assets/style.css", "text/css; charset=utf-8"),
    ("/ui/assets/favicon.svg", "image/svg+xml"),
];

fn demo_server(dir: &Path) -> Server {
    // Ports of our own: --demo would take 8090 and 50051.
    Server::start(
        dir,
        "sled",
        &[
            "--demo",
            "--node-listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ],
    )
}

#[tokio::test]
async fn pages_and_files_are_served_with_their_type_and_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = demo_server(dir.path());
    let http = server
        .client_builder(server.token.as_deref())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(server.url(path)).send();

    for (path, status) in [("/", 307), ("/ui", 308)] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "GET {path}");
        assert_eq!(r.headers()["location"], "/ui/", "GET {path}");
    }
    for (path, content_type) in FILES {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        let h = r.headers();
        assert_eq!(h["content-type"], *content_type, "GET {path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'self'",
            "connect-src 'self'",
            "script-src 'self'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "GET {path}: {directive} in {csp}");
        }
        assert!(!csp.contains("unsafe"), "GET {path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "GET {path}");
        assert_eq!(h["cache-control"], "no-cache", "GET {path}");
        let etag = h["etag"].clone();
        let again = http
            .get(server.url(path))
            .header("if-none-match", etag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            again.status(),
            304,
            "GET {path} with If-None-Match {etag:?}"
        );
        let body = r.text().await.unwrap();
        assert!(!body.is_empty(), "GET {path}");
        // Nothing is loaded from elsewhere: no URL with a host in any page or file (the
        // SVG namespace is a name, not a place).
        let body = body.replace("http://www.w3.org/2000/svg", "");
        for foreign in ["http://", "https://", "@import"] {
            assert!(!body.contains(foreign), "{path} names {foreign}");
        }
    }
    let r = get("/ui/assets/missing.js").await.unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // The API is unchanged beside it.
    let r = get("/api/2.0/health").await.unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn the_web_view_in_headless_chromium() {
    let chromium =
        std::env::var("METALGRAPH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}; run scripts/install-peers.sh (as root), which installs \
         Debian's chromium"
    );
    let python = peers_dir().join("venv/bin/python");
    let has_playwright = Command::new(&python)
        .args(["-c", "import playwright.sync_api"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_playwright,
        "Playwright is not installed in {}; run scripts/install-peers.sh (as root)",
        python.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let server = demo_server(dir.path());
    let out = dir.path().join("driver.log");
    let log = std::fs::File::create(&out).unwrap();
    let started = Instant::now();
    let mut child = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/ui_driver.py"
        ))
        .args(["check", "--base", &server.base, "--chromium", &chromium])
        .arg("--token-file")
        .arg(server.data_dir.join("admin.token"))
        .arg("--ca")
        .arg(server.data_dir.join("tls/ca.pem"))
        // Playwright must use the system's Chromium and download nothing.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .env("PLAYWRIGHT_BROWSERS_PATH", dir.path().join("no-browsers"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group: the browser and Playwright's driver are stopped with it.
        .process_group(0)
        .spawn()
        .expect("the venv's python starts");
    let group = format!("-{}", child.id());
    let limit = Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Whatever happened, nothing the driver started outlives it.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    eprintln!(
        "{report}ui driver took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    match status {
        None => panic!("the UI driver did not finish within {limit:?}:\n{report}"),
        Some(s) if !s.success() => {
            let failure = report
                .lines()
                .find(|l| l.starts_with("FAIL:"))
                .unwrap_or("the driver failed before its checks (see its output)");
            panic!(
                "{failure}\n--- driver output ---\n{report}\n--- server logs ---\n{}",
                server.logs()
            );
        }
        Some(_) => assert!(
            report.contains("ok: no page logged an error"),
            "the driver exited 0 without finishing its checks:\n{report}"
        ),
    }
}
