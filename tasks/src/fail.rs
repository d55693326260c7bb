//! `fail`: always fails with a given message, to exercise failure paths in graphs.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::Value;

const DEFAULT_MESSAGE: &str = "failed on purpose";

/// Fails with the `message` option.
#[derive(Debug)]
pub struct FailJob {
    schema: OptionSchema,
}

impl Default for FailJob {
    fn default() -> Self {
        Self {
            schema: OptionSchema::new().optional(
                "message",
                OptionKind::String,
                Some(Value::from(DEFAULT_MESSAGE)),
                "the error message the task fails with",
            ),
        }
    }
}

impl Job for FailJob {
    fn name(&self) -> &'static str {
        "fail"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let message = ctx.str_opt("message").unwrap_or(DEFAULT_MESSAGE).to_owned();
        Box::pin(async move { Err(JobError::new(message)) })
    }
}
