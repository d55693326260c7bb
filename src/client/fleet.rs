//! The client's fleet commands: `endpoints ...`, and `run GRAPH --tag ... --max-concurrent N`
//! (a batch), followed with a live progress line and closed with a table of the failures.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::out::{line, print};
use super::views::{Output, Shape};
use super::{Client, print_as, run_options, seg};
use metalgraph_engine::WorkflowView;

/// How often a batch is polled while it is followed.
const POLL: Duration = Duration::from_millis(500);

/// `endpoints create` / `endpoints update`: the fields to send. The password comes from an
/// environment variable, never the command line, where `ps` would show it.
#[derive(Debug, Default)]
pub struct EndpointSpec {
    pub name: Option<String>,
    pub service: Option<String>,
    pub url: Option<String>,
    pub user: Option<String>,
    pub password_env: Option<String>,
    pub insecure: bool,
    pub ca_cert: Option<std::path::PathBuf>,
}

impl EndpointSpec {
    fn body(self) -> anyhow::Result<Value> {
        let mut body = Map::new();
        for (key, value) in [
            ("name", self.name),
            ("service", self.service),
            ("url", self.url),
            ("user", self.user),
        ] {
            if let Some(v) = value {
                body.insert(key.into(), json!(v));
            }
        }
        if let Some(var) = self.password_env {
            let password = std::env::var(&var).with_context(|| {
                format!("environment variable {var} (the endpoint's password) is not set")
            })?;
            body.insert("password".into(), json!(password));
        }
        if self.insecure {
            body.insert("verifySSL".into(), json!(false));
        }
        if let Some(path) = self.ca_cert {
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            body.insert("caCert".into(), json!(pem));
        }
        Ok(Value::Object(body))
    }
}

/// What `run` runs on many nodes.
#[derive(Debug)]
pub struct BatchSpec<'a> {
    pub graph: &'a str,
    pub nodes: &'a [String],
    pub tags: &'a [String],
    pub options: &'a [String],
    pub max_concurrent: usize,
    pub stop_after_failures: Option<usize>,
}

impl Client {
    /// `endpoints create`.
    pub async fn create_endpoint(
        &self,
        spec: EndpointSpec,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let (_, created) = self
            .call(Method::POST, "/endpoints", Some(&spec.body()?))
            .await?;
        print_as(output, Shape::Endpoint, &created)?;
        Ok(ExitCode::SUCCESS)
    }

    /// `endpoints update`: the fields given replace the stored ones.
    pub async fn update_endpoint(
        &self,
        id: &str,
        spec: EndpointSpec,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let path = format!("/endpoints/{}", seg(id));
        let (_, changed) = self.call(Method::PATCH, &path, Some(&spec.body()?)).await?;
        print_as(output, Shape::Endpoint, &changed)?;
        Ok(ExitCode::SUCCESS)
    }

    /// `endpoints delete`: says which nodes went with it and which lost its OBM.
    pub async fn delete_endpoint(&self, id: &str, with_nodes: bool) -> anyhow::Result<ExitCode> {
        let mut path = format!("/endpoints/{}", seg(id));
        if with_nodes {
            path.push_str("?nodes=delete");
        }
        let (_, gone) = self.call(Method::DELETE, &path, None).await?;
        let count = |k: &str| gone.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        line(&format!(
            "deleted endpoint {id} ({} nodes deleted, {} nodes kept without its OBM)",
            count("nodesDeleted"),
            count("nodesDetached")
        ))?;
        Ok(ExitCode::SUCCESS)
    }

    /// `endpoints discover`: runs discovery; with `wait`, follows it to its end.
    pub async fn discover_endpoint(
        &self,
        id: &str,
        wait: bool,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let path = format!("/endpoints/{}/discover", seg(id));
        let (_, created) = self.call(Method::POST, &path, None).await?;
        if !wait {
            print_as(output, Shape::Workflow, &created)?;
            return Ok(ExitCode::SUCCESS);
        }
        let view: WorkflowView = serde_json::from_value(created)
            .context("the server answered with something that is not a workflow")?;
        if output == Output::Table {
            line(&format!("discovery workflow {} created", view.instance_id))?;
        }
        self.follow(&view, output).await
    }

    /// `batches cancel`: nothing more starts; the batch finishes once its running
    /// workflows have been cancelled.
    pub async fn cancel_batch(&self, id: &str, output: Output) -> anyhow::Result<ExitCode> {
        let path = format!("/batches/{}/action", seg(id));
        let (_, batch) = self
            .call(Method::PUT, &path, Some(&json!({"command": "cancel"})))
            .await?;
        print_as(output, Shape::Batch, &batch)?;
        Ok(ExitCode::SUCCESS)
    }

    /// `run GRAPH` on many nodes: creates a batch and, with `wait`, follows it with a
    /// progress line and closes with a table of what failed. Exits 0 only when every node
    /// succeeded.
    pub async fn run_batch(
        &self,
        spec: BatchSpec<'_>,
        wait: bool,
        output: Output,
    ) -> anyhow::Result<ExitCode> {
        let mut body = json!({
            "name": spec.graph,
            "options": run_options(spec.options)?,
            "maxConcurrent": spec.max_concurrent,
        });
        if spec.tags.is_empty() {
            body["nodes"] = json!(spec.nodes);
        } else {
            body["tags"] = json!(spec.tags);
        }
        if let Some(m) = spec.stop_after_failures {
            body["stopAfterFailures"] = json!(m);
        }
        let (_, created) = self.call(Method::POST, "/batches", Some(&body)).await?;
        if !wait {
            print_as(output, Shape::Batch, &created)?;
            return Ok(ExitCode::SUCCESS);
        }
        let id = created
            .get("id")
            .and_then(Value::as_str)
            .context("the server answered with something that is not a batch")?
            .to_owned();
        let table = output == Output::Table;
        if table {
            line(&format!(
                "batch {id}: {} on {} nodes, at most {} at once",
                spec.graph,
                created
                    .get("total")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                spec.max_concurrent
            ))?;
        }
        let start = Instant::now();
        let tty = std::io::stdout().is_terminal();
        let mut last = String::new();
        loop {
            let batch = self.get(&format!("/batches/{}", seg(&id))).await?;
            let finished = batch.get("state").and_then(Value::as_str) == Some("finished");
            if table {
                let bar = progress(&batch, start.elapsed());
                if tty {
                    print(&format!("\r{bar}\x1b[K"))?;
                } else if bar_counts(&bar) != bar_counts(&last) {
                    line(&bar)?;
                }
                last = bar;
            }
            if finished {
                if table {
                    if tty {
                        print("\n")?;
                    }
                    print(&failures(&batch))?;
                } else {
                    print_as(output, Shape::Batch, &batch)?;
                }
                let counts = |k: &str| {
                    batch
                        .pointer(&format!("/counts/{k}"))
                        .and_then(Value::as_u64)
                };
                let total = batch.get("total").and_then(Value::as_u64);
                return Ok(if counts("succeeded") == total {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The part of a progress line that says where the batch stands (without rate and time),
/// so that a non-terminal output prints a line only when that changes.
fn bar_counts(bar: &str) -> &str {
    match bar.match_indices(" · ").nth(2) {
        Some((at, _)) => &bar[..at],
        None => bar,
    }
}

/// A batch's progress as one line: a bar, done/failed/running of the total, the rate and
/// the time left at that rate.
pub fn progress(batch: &Value, elapsed: Duration) -> String {
    let count = |k: &str| {
        batch
            .pointer(&format!("/counts/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let total = batch.get("total").and_then(Value::as_u64).unwrap_or(0);
    let failed = count("failed") + count("cancelled") + count("skipped") + count("notStarted");
    let done = count("succeeded");
    let ended = done + failed;
    let running = count("running") + count("starting");
    const WIDTH: u64 = 24;
    let filled = (ended * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
    let bar = format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    );
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { ended as f64 / secs } else { 0.0 };
    let eta = if ended == total {
        "done".to_owned()
    } else if rate > 0.0 {
        format!(
            "ETA {}",
            super::views::duration(((total - ended) as f64 / rate * 1000.0) as u64)
        )
    } else {
        "ETA -".to_owned()
    };
    format!(
        "{bar} {ended}/{total} · {done} done, {failed} failed · {running} running · {rate:.1}/s · {eta}"
    )
}

/// The closing table of a batch: every node that did not succeed, with its workflow and
/// why; or a line saying all succeeded.
pub fn failures(batch: &Value) -> String {
    let entries: Vec<&Value> = batch
        .get("entries")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter(|e| e.get("status").and_then(Value::as_str) != Some("succeeded"))
                .collect()
        })
        .unwrap_or_default();
    if entries.is_empty() {
        return "every node succeeded\n".to_owned();
    }
    let failed = json!({
        "entries": entries,
    });
    let mut table =
        super::views::render(Output::Table, Shape::Batch, &failed, 0).unwrap_or_default();
    // The batch view's header fields are empty here: keep the node rows only.
    if let Some(at) = table.find("NODE") {
        table = table.split_off(at);
    }
    format!("{} nodes did not succeed:\n{table}", entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_counts_rate_and_eta() {
        let batch = json!({"total": 10, "counts": {"succeeded": 3, "failed": 1, "running": 2}});
        let line = progress(&batch, Duration::from_secs(2));
        assert_eq!(
            line,
            "[#########...............] 4/10 · 3 done, 1 failed · 2 running · 2.0/s · ETA 3.0s"
        );
        let done = json!({"total": 2, "counts": {"succeeded": 2}});
        assert!(progress(&done, Duration::from_secs(1)).ends_with("· done"));
        assert_eq!(
            bar_counts(&line),
            "[#########...............] 4/10 · 3 done, 1 failed · 2 running"
        );
    }

    #[test]
    fn failures_table_lists_only_what_did_not_succeed() {
        let batch = json!({"entries": [
            {"node": "n1", "status": "succeeded", "workflow": "w1"},
            {"node": "n2", "status": "failed", "workflow": "w2", "reason": "BMC unreachable"},
            {"node": "n3", "status": "skipped", "reason": "node n3 is busy"},
        ]});
        let out = failures(&batch);
        assert!(out.starts_with("2 nodes did not succeed:\nNODE"), "{out}");
        assert!(out.contains("n2") && out.contains("BMC unreachable") && out.contains("n3"));
        assert!(!out.contains("n1"), "{out}");
    }
}
