//! The command-line client: `metalgraph graphs|tasks|nodes|workflows|run ...` talk to a
//! server's management API over HTTP and print what it answers: tables for people by
//! default (`views`, drawn with `table`), the API's objects as JSON or YAML on request, and
//! graphs as DOT or Mermaid (`draw`). Everything goes to stdout through `out`.

pub mod draw;
pub mod fleet;
pub mod out;
pub mod table;
pub mod views;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_engine::clock::{Clock as _, SystemClock};
use metalgraph_engine::definitions;
use metalgraph_engine::model::{Definition, TaskState};
use metalgraph_engine::{Problem, WorkflowStatus, WorkflowView};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

use self::draw::Drawing;
use self::out::line;
use self::views::{Output, Shape};

/// How often `run --wait` polls the workflow.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// A management API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The server's URL, without a trailing slash.
    server: String,
}

/// How the client reaches a server: its token and the CA its certificate is signed by.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer token sent with every call.
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust besides the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl Access {
    /// The token and CA the flags give, else the ones `serve` keeps in `data_dir`
    /// (`admin.token`, `tls/ca.pem`) when they are there.
    pub fn resolve(
        token: Option<String>,
        ca_cert: Option<&std::path::Path>,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Access> {
        let token = match token.filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(t.trim().to_owned()),
            None => match std::fs::read_to_string(data_dir.join("admin.token")) {
                Ok(t) => Some(t.trim().to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot read the token file {}",
                        data_dir.join("admin.token").display()
                    )));
                }
            },
        };
        let ca_pem =
            match ca_cert {
                Some(path) => Some(std::fs::read(path).with_context(|| {
                    format!("cannot read the CA certificate {}", path.display())
                })?),
                None => std::fs::read(crate::tls::ca_file(data_dir)).ok(),
            };
        Ok(Access { token, ca_pem })
    }
}

impl Client {
    pub fn new(server: &str, access: &Access) -> anyhow::Result<Self> {
        let server = server.trim_end_matches('/').to_owned();
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            bail!("server URL {server:?} must start with http:// or https://");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &access.token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token holds characters a header cannot")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .default_headers(headers);
        if let Some(pem) = &access.ca_pem {
            let ca =
                reqwest::Certificate::from_pem(pem).context("the CA certificate is not PEM")?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Self { http, server })
    }

    /// Calls `method /api/2.0{path}` and returns the status and JSON body (`null` when
    /// empty). A non-success answer is an error carrying the server's message and details.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let url = format!("{}/api/2.0{path}", self.server);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("cannot read the answer to {method} {url}"))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_success() {
            Ok((status, value))
        } else {
            Err(anyhow::anyhow!(describe_error(status, &value)))
        }
    }

    /// Why the server could not be reached, with a hint when TLS is the likely cause.
    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let chain = format!("{:#}", anyhow::Error::new(e));
        let hint = if chain.contains("certificate") || chain.contains("UnknownIssuer") {
            "; the server's certificate is not trusted: pass --ca-cert (the server's <data-dir>/tls/ca.pem) or --data-dir"
        } else if self.server.starts_with("https://")
            && (chain.contains("InvalidContentType") || chain.contains("corrupt message"))
        {
            "; the server may speak plain HTTP (serve --no-tls): use an http:// --server"
        } else {
            ""
        };
        anyhow::anyhow!("cannot reach metalgraph at {}: {chain}{hint}", self.server)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.call(Method::GET, path, None).await?.1)
    }

    /// GETs `path` and prints the answer, an answer of the given shape, as `output` says.
    pub async fn show(&self, path: &str, shape: Shape, output: Output) -> anyhow::Result<ExitCode> {
        print_as(output, shape, &self.get(path).await?)?;
        Ok(ExitCode::SUCCESS)
    }

    /// GETs a list at `path` and prints it as `output` says: the first page, or with `all`
    /// every page (following `Link: rel="next"`). When a page is left unread, says so on
    /// stderr, so that a reader knows the table is not everything.
    pub async fn show_list(
        &self,
        path: &str,
        all: bool,
        shape: Shape,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let mut items = Vec::new();
        let mut url = format!("{}/api/2.0{path}", self.server);
        loop {
            let resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = resp.status();
            let next = next_link(resp.headers()).map(|p| format!("{}{p}", self.server));
            let value: Value = resp
                .json()
                .await
                .with_context(|| format!("cannot read the answer to GET {url}"))?;
            if !status.is_success() {
                bail!(describe_error(status, &value));
            }
            items.extend(value.as_array().cloned().unwrap_or_default());
            match next {
                Some(n) if all => url = n,
                Some(_) => {
                    print_as(output, shape, &Value::Array(items))?;
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "(one page of a longer list: --all shows every page, --top N more at once)"
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                None => break,
            }
        }
        print_as(output, shape, &Value::Array(items))?;
        Ok(ExitCode::SUCCESS)
    }

    /// `graphs get NAME --format dot|mermaid`: draws the graph's tasks and `waitOn` edges.
    pub async fn draw_graph(&self, name: &str, how: Drawing) -> anyhow::Result<ExitCode> {
        let graph = self
            .get(&format!("/workflows/graphs/{}", seg(name)))
            .await?;
        out::print(&draw::draw(&graph, how))?;
        Ok(ExitCode::SUCCESS)
    }

    /// DELETEs `path` and says what was deleted.
    pub async fn delete(&self, path: &str, what: &str) -> anyhow::Result<ExitCode> {
        self.call(Method::DELETE, path, None).await?;
        line(&format!("deleted {what}"))?;
        Ok(ExitCode::SUCCESS)
    }

    /// `graphs put` and `tasks put`: stores every definition of the given kind found in the
    /// files (a file may hold several), saying for each whether it was created or replaced.
    pub async fn put_definitions(
        &self,
        files: &[PathBuf],
        graphs: bool,
    ) -> anyhow::Result<ExitCode> {
        let (kind, path) = if graphs {
            ("graph", "/workflows/graphs")
        } else {
            ("task", "/workflows/tasks")
        };
        for file in files {
            let shown = file.display().to_string();
            let text =
                std::fs::read_to_string(file).with_context(|| format!("cannot read {shown}"))?;
            let defs = definitions::parse(&text, &shown).map_err(|p| anyhow::anyhow!("{p}"))?;
            for def in defs {
                let (name, value) = match (&def, graphs) {
                    (Definition::Graph(g), true) => {
                        (g.injectable_name.clone(), serde_json::to_value(g)?)
                    }
                    (Definition::Task(t), false) => {
                        (t.injectable_name.clone(), serde_json::to_value(t)?)
                    }
                    (Definition::Graph(g), false) => bail!(
                        "{shown}: {} is a graph; store it with `metalgraph graphs put`",
                        g.injectable_name
                    ),
                    (Definition::Task(t), true) => bail!(
                        "{shown}: {} is a task definition; store it with `metalgraph tasks put`",
                        t.injectable_name
                    ),
                };
                let (status, _) = self.call(Method::PUT, path, Some(&value)).await?;
                let verb = if status == StatusCode::CREATED {
                    "created"
                } else {
                    "replaced"
                };
                line(&format!("{verb} {kind} {name}"))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `import-rackhd DIR`: stores every RackHD definition found under `dir` (JSON or YAML
    /// files, each holding one definition or a list; RackHD's `.js` modules exported to
    /// JSON), task definitions first so that graphs find them, and reports each one loaded
    /// or refused with the server's reason, then the counts. Fails (exit 1) when anything
    /// was refused, after trying everything.
    pub async fn import_rackhd(&self, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            let entries =
                std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
            for e in entries {
                let path = e?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| matches!(x, "json" | "yaml" | "yml"))
                {
                    files.push(path);
                }
            }
        }
        files.sort();
        let (mut tasks, mut graphs, mut refused) = (Vec::new(), Vec::new(), 0usize);
        for file in &files {
            let shown = file.display().to_string();
            let parsed = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read it: {e}"))
                .and_then(|text| definitions::parse(&text, &shown).map_err(|p| p.to_string()));
            match parsed {
                Ok(defs) => {
                    for def in defs {
                        match def {
                            Definition::Task(t) => tasks.push((
                                shown.clone(),
                                t.injectable_name.clone(),
                                serde_json::to_value(&t)?,
                            )),
                            Definition::Graph(g) => graphs.push((
                                shown.clone(),
                                g.injectable_name.clone(),
                                serde_json::to_value(&g)?,
                            )),
                        }
                    }
                }
                Err(why) => {
                    refused += 1;
                    line(&format!("refused {shown}: {why}"))?;
                }
            }
        }
        let mut counts = Vec::new();
        for (kind, path, defs) in [
            ("task definitions", "/workflows/tasks", &tasks),
            ("graphs", "/workflows/graphs", &graphs),
        ] {
            let mut loaded = 0;
            for (file, name, value) in defs {
                match self.call(Method::PUT, path, Some(value)).await {
                    Ok(_) => {
                        loaded += 1;
                        line(&format!("loaded {name} ({file})"))?;
                    }
                    Err(e) => {
                        refused += 1;
                        line(&format!("refused {name} ({file}): {e:#}"))?;
                    }
                }
            }
            counts.push(format!("{loaded} of {} {kind}", defs.len()));
        }
        line(&format!(
            "loaded {}; {refused} refused{}",
            counts.join(" and "),
            if refused > 0 {
                " (each with its reason above; docs/rackhd.md says what is not supported)"
            } else {
                ""
            }
        ))?;
        Ok(if refused == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// `nodes create`.
    pub async fn create_node(&self, spec: NodeSpec, output: Output) -> anyhow::Result<ExitCode> {
        let mut node = json!({
            "name": spec.name,
            "identifiers": spec.macs,
            "tags": spec.tags,
        });
        if let Some(id) = spec.id {
            node["id"] = json!(id);
        }
        if let Some(service) = spec.obm_service {
            let mut config = Map::new();
            config.insert("host".into(), json!(spec.obm_host.unwrap_or_default()));
            if let Some(user) = spec.obm_user {
                config.insert("user".into(), json!(user));
            }
            if let Some(var) = spec.obm_password_env {
                // The password comes from the environment so that it never shows in `ps`.
                let password = std::env::var(&var).with_context(|| {
                    format!("environment variable {var} (the OBM password) is not set")
                })?;
                config.insert("password".into(), json!(password));
            }
            node["obms"] = json!([{ "service": service, "config": config }]);
        } else if spec.obm_host.is_some()
            || spec.obm_user.is_some()
            || spec.obm_password_env.is_some()
        {
            bail!("--obm-host, --obm-user and --obm-password-env need --obm-service");
        }
        let (_, created) = self.call(Method::POST, "/nodes", Some(&node)).await?;
        print_as(output, Shape::Node, &created)?;
        Ok(ExitCode::SUCCESS)
    }

    /// `workflows cancel`: the answer comes once the workflow has ended, and is shown.
    pub async fn cancel(&self, id: &str, output: Output) -> anyhow::Result<ExitCode> {
        let (_, view) = self
            .call(
                Method::PUT,
                &format!("/workflows/{}/action", seg(id)),
                Some(&json!({"command": "cancel"})),
            )
            .await?;
        print_as(output, Shape::Workflow, &view)?;
        Ok(ExitCode::SUCCESS)
    }

    /// `run GRAPH`: starts a workflow and shows it; with `wait`, follows it to its end and
    /// exits 0 only when it succeeded. As a table, following prints a line per task change
    /// and a closing summary; as JSON or YAML, it prints only the finished workflow.
    pub async fn run(
        &self,
        graph: &str,
        node: Option<&str>,
        options: &[String],
        wait: bool,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let mut body = json!({ "name": graph, "options": run_options(options)? });
        if let Some(n) = node {
            body["node"] = json!(n);
        }
        let (_, created) = self.call(Method::POST, "/workflows", Some(&body)).await?;
        self.started(created, wait, output).await
    }

    /// `rerun ID`: reruns a failed or cancelled workflow from where it stopped, with
    /// `options` (`{defaults: {...}, <label>: {...}}`) over the old run's, and shows the new
    /// workflow or, with `wait`, follows it as `run` does.
    pub async fn rerun(
        &self,
        id: &str,
        options: Value,
        wait: bool,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let body = json!({"command": "rerun", "options": options});
        let (_, created) = self
            .call(
                Method::PUT,
                &format!("/workflows/{}/action", seg(id)),
                Some(&body),
            )
            .await?;
        self.started(created, wait, output).await
    }

    /// Shows a workflow just created, or with `wait` follows it to its end.
    async fn started(
        &self,
        created: Value,
        wait: bool,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        if !wait {
            print_as(output, Shape::Workflow, &created)?;
            return Ok(ExitCode::SUCCESS);
        }
        let view: WorkflowView = serde_json::from_value(created)
            .context("the server answered with something that is not a workflow")?;
        let (id, graph) = (&view.instance_id, &view.name);
        if output == Output::Table {
            let on = view
                .node
                .as_ref()
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default();
            let of = view
                .rerun_of
                .as_ref()
                .map(|old| format!(", rerunning {old}"))
                .unwrap_or_default();
            line(&format!("workflow {id} ({graph}{on}{of}) created"))?;
            let kept: Vec<&str> = view
                .tasks
                .iter()
                .filter(|t| t.state == TaskState::Succeeded)
                .map(|t| t.label.as_str())
                .collect();
            if let (Some(old), false) = (&view.rerun_of, kept.is_empty()) {
                line(&format!("kept from {old}: {}", kept.join(", ")))?;
            }
        }
        self.follow(&view, output).await
    }

    /// Polls a workflow until it ends. As a table: a line per task state change since
    /// `created` (so a rerun's kept tasks are not shown as news), then the summary;
    /// otherwise only the finished workflow.
    async fn follow(&self, created: &WorkflowView, output: Output) -> anyhow::Result<ExitCode> {
        let start = Instant::now();
        let id = &created.instance_id;
        let mut seen: HashMap<String, (TaskState, u32)> = created
            .tasks
            .iter()
            .map(|t| (t.label.clone(), (t.state, t.attempts)))
            .collect();
        loop {
            let value = self.get(&format!("/workflows/{}", seg(id))).await?;
            let view: WorkflowView = serde_json::from_value(value.clone())
                .context("the server answered with something that is not a workflow")?;
            if output == Output::Table {
                for l in progress_lines(&view, &mut seen, start.elapsed()) {
                    line(&l)?;
                }
            }
            if view.status.is_terminal() {
                if output == Output::Table {
                    out::print(&(views::summary(&view).join("\n") + "\n"))?;
                } else {
                    print_as(output, Shape::Workflow, &value)?;
                }
                return Ok(if view.status == WorkflowStatus::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The path and query of a list's next page, from its `Link: <...>; rel="next"` header.
pub fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    let (path, _) = link.strip_prefix('<')?.split_once(">; rel=\"next\"")?;
    Some(path.to_owned())
}

/// What `nodes create` was given.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    pub id: Option<String>,
    pub name: String,
    pub macs: Vec<String>,
    pub tags: Vec<String>,
    pub obm_service: Option<String>,
    pub obm_host: Option<String>,
    pub obm_user: Option<String>,
    /// The environment variable holding the OBM password.
    pub obm_password_env: Option<String>,
}

/// Percent-encodes a path segment (graph names and ids are plain, but a name may hold a
/// character URLs reserve).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds run options from `k=v` (into `defaults`) and `label.k=v` (into that task's
/// layer). A value that parses as JSON (`3`, `true`, `{"a":1}`) is taken as such; anything
/// else is a string.
pub fn run_options(options: &[String]) -> anyhow::Result<Value> {
    let mut layers: Map<String, Value> = Map::new();
    for opt in options {
        let Some((key, raw)) = opt.split_once('=') else {
            bail!("--option {opt:?} must be KEY=VALUE or LABEL.KEY=VALUE");
        };
        let (layer, key) = key.split_once('.').unwrap_or(("defaults", key));
        if layer.is_empty() || key.is_empty() {
            bail!("--option {opt:?} must be KEY=VALUE or LABEL.KEY=VALUE");
        }
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        layers
            .entry(layer.to_owned())
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("layers are objects")
            .insert(key.to_owned(), value);
    }
    Ok(Value::Object(layers))
}

/// `rerun --options`: JSON run options (`{defaults: {...}, <label>: {...}}`), or `@FILE`
/// holding them as JSON or YAML; then each `--option` over them, as `run` takes it.
pub fn rerun_options(options: Option<&str>, each: &[String]) -> anyhow::Result<Value> {
    let mut layers = match options {
        None => Map::new(),
        Some(arg) => {
            let parsed = match arg.strip_prefix('@') {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read --options file {path}"))?;
                    metalgraph_engine::text::parse_yaml(&text)
                        .map_err(|e| anyhow::anyhow!("--options file {path}: {e}"))?
                }
                None => metalgraph_engine::text::parse_json(arg.as_bytes())
                    .map_err(|e| anyhow::anyhow!("--options is not JSON: {e}"))?,
            };
            match parsed {
                Value::Object(m) => m,
                other => bail!(
                    "--options must be an object {{\"defaults\": {{...}}, \"<label>\": {{...}}}}, got {}",
                    metalgraph_engine::job::json_kind(&other)
                ),
            }
        }
    };
    if let Value::Object(more) = run_options(each)? {
        for (layer, values) in more {
            match (layers.get_mut(&layer), values) {
                (Some(Value::Object(into)), Value::Object(values)) => into.extend(values),
                (_, values) => {
                    layers.insert(layer, values);
                }
            }
        }
    }
    Ok(Value::Object(layers))
}

/// The progress lines for tasks whose state or attempt changed since `seen`; a task not
/// seen before counts as pending.
pub fn progress_lines(
    view: &WorkflowView,
    seen: &mut HashMap<String, (TaskState, u32)>,
    elapsed: Duration,
) -> Vec<String> {
    let mut lines = Vec::new();
    for t in &view.tasks {
        let now = (t.state, t.attempts);
        let before = seen
            .insert(t.label.clone(), now)
            .unwrap_or((TaskState::Pending, 0));
        if before == now {
            continue;
        }
        let detail = match t.state {
            TaskState::Running => format!(" (attempt {})", t.attempts),
            _ => t
                .error
                .as_ref()
                .map(|e| format!(": {}", table::clean(e)))
                .unwrap_or_default(),
        };
        lines.push(format!(
            "[{:>5.1}s] {:<16} {}{detail}",
            elapsed.as_secs_f64(),
            t.label,
            t.state
        ));
    }
    lines
}

/// Renders an error answer: status, code, message, and one line per detail.
fn describe_error(status: StatusCode, body: &Value) -> String {
    let err = body.get("error");
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| match body {
            Value::Null => status.canonical_reason().unwrap_or("error").to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("error");
    let details = err
        .and_then(|e| e.get("details"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // A single problem is the message itself; several are listed one per line instead.
    let mut out = if details.len() > 1 {
        format!("{} ({code}): {} problems", status.as_u16(), details.len())
    } else {
        format!("{} ({code}): {message}", status.as_u16())
    };
    if details.len() > 1 {
        for d in details {
            let line = serde_json::from_value::<Problem>(d.clone())
                .map(|p| p.to_string())
                .unwrap_or_else(|_| d.to_string());
            out.push_str(&format!("\n  - {line}"));
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        out.push_str(
            "\n  (the client sends --token, else $METALGRAPH_TOKEN, else the admin.token the server wrote in --data-dir / $METALGRAPH_DATA_DIR, default ./metalgraph-data)",
        );
    }
    out
}

/// Prints an answer of the given shape as `output` says.
fn print_as(output: Output, shape: Shape, answer: &Value) -> anyhow::Result<()> {
    out::print(&views::render(output, shape, answer, SystemClock.now_ms())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_to_defaults_or_a_label() {
        let opts: Vec<String> = [
            "imageUrl=http://x/a.iso",
            "count=3",
            "reboot.force=true",
            "flag=yes",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            run_options(&opts).expect("valid"),
            json!({
                "defaults": {"imageUrl": "http://x/a.iso", "count": 3, "flag": "yes"},
                "reboot": {"force": true},
            })
        );
        assert!(run_options(&["novalue".to_owned()]).is_err());
        assert!(run_options(&[".k=v".to_owned()]).is_err());
    }

    #[test]
    fn progress_prints_only_changes() {
        let mut view: WorkflowView = serde_json::from_value(json!({
            "instanceId": "w", "name": "G", "status": "running", "createdAt": "t",
            "tasks": [
                {"id": "w.0", "label": "reboot", "taskName": "T", "job": "noop", "state": "running", "attempts": 1},
                {"id": "w.1", "label": "after", "taskName": "T", "job": "noop", "state": "pending", "attempts": 0},
            ]
        }))
        .expect("a view");
        let mut seen = HashMap::new();
        let lines = progress_lines(&view, &mut seen, Duration::from_millis(1200));
        assert_eq!(lines, vec!["[  1.2s] reboot           running (attempt 1)"]);
        assert!(progress_lines(&view, &mut seen, Duration::from_secs(2)).is_empty());
        view.tasks[0].state = TaskState::Failed;
        view.tasks[0].error = Some("boom".into());
        let lines = progress_lines(&view, &mut seen, Duration::from_secs(3));
        assert_eq!(lines, vec!["[  3.0s] reboot           failed: boom"]);
    }

    #[test]
    fn errors_show_code_message_and_details() {
        let body = json!({"error": {"code": "invalid_definition", "message": "two problems", "details": [
            {"graph": "G", "label": "a", "field": "waitOn.x", "message": "waits on unknown label 'x'"},
            {"graph": "G", "label": "b", "field": "taskName", "message": "unknown task T"},
        ]}});
        assert_eq!(
            describe_error(StatusCode::UNPROCESSABLE_ENTITY, &body),
            "422 (invalid_definition): 2 problems\n  - graph G, task 'a', field 'waitOn.x': waits on unknown label 'x'\n  - graph G, task 'b', field 'taskName': unknown task T"
        );
        assert_eq!(seg("Graph.A b/c"), "Graph.A%20b%2Fc");
    }
}
