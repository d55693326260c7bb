//! `sleep`: waits for a duration, to pace graphs and to give hardware time to settle.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult, value_to_duration};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::{Value, json};

/// Sleeps for the `duration` option and reports how long it slept.
///
/// After a restart the whole duration is slept again: the task's persisted deadline, not
/// this job, bounds how long a task may take in total.
#[derive(Debug)]
pub struct SleepJob {
    schema: OptionSchema,
}

impl Default for SleepJob {
    fn default() -> Self {
        Self {
            schema: OptionSchema::new().required(
                "duration",
                OptionKind::Duration,
                "how long to sleep: \"250ms\", \"2s\", \"5m\" or whole milliseconds",
            ),
        }
    }
}

impl Job for SleepJob {
    fn name(&self) -> &'static str {
        "sleep"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let duration = match ctx.options.get("duration") {
            None | Some(Value::Null) => Err(JobError::new("option 'duration' is required")),
            Some(v) => {
                value_to_duration(v).map_err(|e| JobError::new(format!("option 'duration': {e}")))
            }
        };
        Box::pin(async move {
            let duration = duration?;
            let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            tokio::select! {
                // Cancellation wins a tie, so a cancelled task never reports success.
                biased;
                _ = ctx.cancel.cancelled() => {
                    Err(JobError::new(format!("sleep of {ms}ms cancelled")))
                }
                _ = tokio::time::sleep(duration) => Ok(json!({ "slept_ms": ms })),
            }
        })
    }
}
