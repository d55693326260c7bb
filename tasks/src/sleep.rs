//! `sleep`: waits for a duration, to pace graphs and to give hardware time to settle.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult, value_to_duration};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use std::time::Duration;

use serde_json::{Value, json};

/// Sleeps for the `duration` option and reports how long it slept.
///
/// The end of the sleep is persisted (a checkpoint) before the sleep begins, so after a
/// restart only what is left of it is slept, as with every other timer of the engine.
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
            let services = ctx.services.clone();
            let ends_at = match ctx.checkpoint.as_ref().and_then(|c| c.get("endsAt")) {
                Some(at) => at.as_u64().unwrap_or_default(),
                None => {
                    let at = services.now_ms().saturating_add(ms);
                    services.checkpoint(&ctx, json!({ "endsAt": at })).await?;
                    at
                }
            };
            let left = Duration::from_millis(ends_at.saturating_sub(services.now_ms()));
            tokio::select! {
                // Cancellation wins a tie, so a cancelled task never reports success.
                biased;
                _ = ctx.cancel.cancelled() => {
                    Err(JobError::new(format!("sleep of {ms}ms cancelled")))
                }
                _ = tokio::time::sleep(left) => Ok(json!({ "slept_ms": ms })),
            }
        })
    }
}
