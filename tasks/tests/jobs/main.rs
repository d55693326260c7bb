//! Tests of the basic jobs, each run through `Job::run` with a hand-built `JobContext`,
//! and of the shipped task definitions that name them.

mod basic;
mod definitions;
mod http;

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, Callback, JobContext, JobServices, Options};
use metalgraph_engine::nodes::Nodes;
use metalgraph_engine::{Job, JobError, JobResult};
use metalgraph_store::MemStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Engine services for jobs that need none: subgraphs and notifications are refused, nodes
/// live in memory, and checkpoints are kept in a list.
struct TestServices {
    nodes: Nodes,
    checkpoints: std::sync::Mutex<Vec<Value>>,
    /// Follows tokio's (possibly paused) time, as the engine's clock does in tests.
    clock: Arc<metalgraph_engine::clock::TokioClock>,
}

impl TestServices {
    fn new() -> Self {
        TestServices {
            nodes: Nodes::new(Arc::new(MemStore::new())),
            checkpoints: Default::default(),
            clock: metalgraph_engine::clock::TokioClock::new(1_800_000_000_000),
        }
    }
}

impl JobServices for TestServices {
    fn run_subgraph(
        &self,
        _ctx: &JobContext,
        graph_name: &str,
        options: Options,
    ) -> BoxFuture<'static, JobResult> {
        // Echoes the request, so a test can see what `graph.run` asked for.
        let out = json!({ "graphName": graph_name, "options": options });
        Box::pin(async move { Ok(out) })
    }

    fn wait_notification(&self, _ctx: &JobContext) -> BoxFuture<'static, JobResult> {
        Box::pin(async { Err(JobError::new("no notifications in tests")) })
    }

    fn checkpoint(
        &self,
        _ctx: &JobContext,
        value: Value,
    ) -> BoxFuture<'static, Result<(), JobError>> {
        self.checkpoints.lock().unwrap().push(value);
        Box::pin(async { Ok(()) })
    }

    fn now_ms(&self) -> u64 {
        metalgraph_engine::clock::Clock::now_ms(self.clock.as_ref())
    }

    fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    fn callback(
        &self,
        _ctx: &JobContext,
        _label: &str,
    ) -> BoxFuture<'static, Result<Callback, JobError>> {
        Box::pin(async { Err(JobError::new("no callbacks in tests")) })
    }
}

/// A context holding exactly `options`, bypassing the schema, for testing how a job
/// treats options the engine would have refused.
fn raw_ctx(options: Value, cancel: CancellationToken) -> JobContext {
    let Value::Object(options) = options else {
        panic!("options must be an object, got {options}");
    };
    JobContext {
        options,
        node: None,
        workflow_id: "wf-1".to_owned(),
        task_id: "task-1".to_owned(),
        label: "under-test".to_owned(),
        attempt: 1,
        retry: 0,
        token: "token-1".to_owned(),
        checkpoint: None,
        cancel,
        services: Arc::new(TestServices::new()),
    }
}

/// A context as the engine would build it: the job's defaults under `options`, rendered
/// strings coerced to their declared kinds, and the result checked against the schema.
fn ctx_for(job: &dyn Job, options: Value, cancel: CancellationToken) -> JobContext {
    let schema = job.schema();
    let mut merged = schema.defaults();
    let Value::Object(given) = options else {
        panic!("options must be an object, got {options}");
    };
    merged.extend(given);
    schema.coerce(&mut merged);
    if let Err((field, msg)) = schema.check(&merged, true) {
        panic!("{}: option {field} {msg}", job.name());
    }
    raw_ctx(Value::Object(merged), cancel)
}

/// Runs `job` once with `options` (checked as the engine would) and no cancellation.
async fn run(job: &dyn Job, options: Value) -> JobResult {
    job.run(ctx_for(job, options, CancellationToken::new()))
        .await
}
