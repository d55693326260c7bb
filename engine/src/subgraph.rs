//! `graph.run`: a task that runs another graph as a child workflow and ends as it ends.
//!
//! The child is created under `children/{task id}/{retry}` with an `Absent` precondition, so
//! a restarted parent task finds and awaits the child it already started instead of starting
//! a second one. A child that no longer exists (it cannot be deleted while its parent is
//! live, but a store may have lost it) fails the parent task rather than leaving it waiting.

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::engine::{Engine, Origin, RunRequest};
use crate::error::Error;
use crate::job::{BoxFuture, Job, JobContext, JobError, JobResult, OptionKind, OptionSchema};
use crate::model::{RunOptions, WorkflowStatus};
use crate::workflow::ParentRef;

/// `graph.run`: runs another graph as a subgraph; its outcome is the task's outcome.
pub struct GraphRunJob {
    schema: OptionSchema,
}

impl Default for GraphRunJob {
    fn default() -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "graphName",
                    OptionKind::String,
                    "the graph to run as a subgraph",
                )
                .optional(
                    "graphOptions",
                    OptionKind::Object,
                    Some(Value::Object(Map::new())),
                    "options for the subgraph ({defaults: {...}, label: {...}})",
                ),
        }
    }
}

impl Job for GraphRunJob {
    fn name(&self) -> &'static str {
        "graph.run"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        Box::pin(async move {
            let graph = ctx.str_required("graphName")?.to_owned();
            let options = ctx
                .options
                .get("graphOptions")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let services = ctx.services.clone();
            services.run_subgraph(&ctx, &graph, options).await
        })
    }

    fn occupies_slot(&self) -> bool {
        false
    }
}

/// Subgraph options in run-request form: `{defaults: {...}, label: {...}}` as given, or a
/// flat object taken as the defaults.
fn run_options(options: &Map<String, Value>) -> RunOptions {
    let mut run = RunOptions::new();
    if let Some(Value::Object(d)) = options.get("defaults") {
        run.insert("defaults".into(), d.clone());
        for (k, v) in options {
            if let (false, Value::Object(m)) = (k == "defaults", v) {
                run.insert(k.clone(), m.clone());
            }
        }
    } else if !options.is_empty() {
        run.insert("defaults".into(), options.clone());
    }
    run
}

pub(crate) async fn run_subgraph(
    engine: Engine,
    ctx: JobContext,
    graph: String,
    options: Map<String, Value>,
) -> JobResult {
    let err = |e: Error| JobError::new(e.to_string());
    let child_key = format!("{}/{}", ctx.task_id, ctx.retry);
    // Subscribe before reading, so that the child's end cannot slip between the two.
    let mut events = engine.subscribe();
    let child_id = match engine.child(&child_key).await.map_err(err)? {
        Some(id) => id,
        None => {
            // The options were rendered in this task; what they carry (a callback body, a
            // BMC's answer) is data for the child (`Engine::create` marks it so).
            let req = RunRequest {
                graph: graph.clone(),
                node: ctx.node.as_ref().map(|n| n.id.clone()),
                options: run_options(&options),
            };
            let parent = ParentRef {
                workflow_id: ctx.workflow_id.clone(),
                task_id: ctx.task_id.clone(),
            };
            match engine
                .create(req, Origin::Child(parent, child_key.clone()))
                .await
            {
                Ok(v) => v.instance_id,
                Err(Error::Conflict(_)) => engine
                    .child(&child_key)
                    .await
                    .map_err(err)?
                    .ok_or_else(|| JobError::new("subgraph vanished"))?,
                Err(e) => return Err(JobError::new(format!("subgraph {graph}: {e}"))),
            }
        }
    };
    loop {
        let Some(view) = engine.get(&child_id).await.map_err(err)? else {
            return Err(JobError::new(format!(
                "subgraph {graph} ({child_id}) no longer exists"
            )));
        };
        if view.status.is_terminal() {
            return match view.status {
                WorkflowStatus::Succeeded => Ok(json!({
                    "workflowId": child_id,
                    "status": view.status,
                    "context": Value::Object(view.context),
                })),
                s => Err(JobError::new(format!(
                    "subgraph {graph} ({child_id}) ended {s}: {}",
                    view.error.unwrap_or_default()
                ))),
            };
        }
        // Wait for the child's own end (or a lag, after which its state is read again);
        // other workflows' events are skipped without reading anything.
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok((_, ev)) if ev.workflow_id() == child_id && ev.ended().is_some() => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(JobError::new("engine stopped"));
                    }
                },
                _ = ctx.cancel.cancelled() => {
                    let _ = engine.cancel(&child_id).await;
                    return Err(JobError::new(format!(
                        "cancelled; subgraph {child_id} cancelled too"
                    )));
                }
            }
        }
    }
}
