//! `noop`: does nothing and succeeds, for graph scaffolding and joins.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, OptionSchema};
use serde_json::json;

/// Succeeds at once with an empty output.
#[derive(Debug, Default)]
pub struct NoopJob {
    schema: OptionSchema,
}

impl Job for NoopJob {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, JobResult> {
        Box::pin(async { Ok(json!({})) })
    }
}
