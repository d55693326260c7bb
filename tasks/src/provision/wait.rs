//! `wait.notification`: ends when the node calls back (an installer's completion
//! callback), with the callback's body as output.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, OptionSchema};

use super::{describe, require_node, until_cancelled};

/// Waits for the node's callback for this task.
#[derive(Debug, Default)]
pub struct WaitNotificationJob {
    schema: OptionSchema,
}

impl Job for WaitNotificationJob {
    fn name(&self) -> &'static str {
        "wait.notification"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let node = require_node(&ctx, "wait.notification");
        Box::pin(async move {
            let node = node?;
            let wait = ctx.services.wait_notification(&ctx);
            until_cancelled(
                &ctx.cancel,
                || format!("{}: wait for notification", describe(&node)),
                wait,
            )
            .await
        })
    }

    /// Waiting for a node is not work: it must never hold a slot that the work it waits
    /// for (another node's install, say) needs.
    fn occupies_slot(&self) -> bool {
        false
    }
}
