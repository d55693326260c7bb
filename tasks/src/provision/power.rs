//! `obm.power`: powers a node on, off or through a restart and waits until its BMC reports
//! the state the action leads to; `status` only reports.

use std::sync::Arc;
use std::time::Duration;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::{Bmc, Drivers, PowerAction, PowerState, show_duration};

const ACTIONS: &[&str] = &["on", "off", "soft-off", "reboot", "reset", "status"];

/// Runs a power action and polls the BMC until it reports the target state.
pub struct PowerJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for PowerJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerJob")
    }
}

impl PowerJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "action",
                    OptionKind::Enum(ACTIONS),
                    "on, off, soft-off, reboot, reset or status",
                )
                .optional(
                    "waitTimeout",
                    OptionKind::Duration,
                    Some(Value::from("5m")),
                    "how long to wait for the BMC to report the target power state",
                )
                .optional(
                    "pollInterval",
                    OptionKind::Duration,
                    Some(Value::from("1s")),
                    "how often to read the power state while waiting",
                ),
            drivers,
        }
    }
}

impl Job for PowerJob {
    fn name(&self) -> &'static str {
        "obm.power"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = prepare(&self.drivers, &ctx);
        Box::pin(async move {
            let (what, work) = prepared?;
            until_cancelled(&ctx.cancel, || what, work.run()).await
        })
    }
}

struct Work {
    ctx: JobContext,
    bmc: Arc<dyn Bmc>,
    node: String,
    action: &'static str,
    wait: Duration,
    interval: Duration,
}

fn prepare(drivers: &Drivers, ctx: &JobContext) -> Result<(String, Work), JobError> {
    let (node, bmc) = node_bmc(drivers, ctx, "obm.power")?;
    let action = ctx.str_required("action")?;
    let action = ACTIONS
        .iter()
        .copied()
        .find(|a| *a == action)
        .ok_or_else(|| {
            JobError::new(format!(
                "option 'action' must be one of {}, got {action}",
                ACTIONS.join(", ")
            ))
        })?;
    let wait = ctx.duration_or("waitTimeout", Duration::from_secs(300))?;
    let interval = ctx
        .duration_or("pollInterval", Duration::from_secs(1))?
        .max(Duration::from_millis(10));
    let what = format!("{}: power {action}", describe(&node));
    Ok((
        what,
        Work {
            ctx: ctx.clone(),
            bmc,
            node: describe(&node),
            action,
            wait,
            interval,
        },
    ))
}

impl Work {
    async fn run(self) -> JobResult {
        // A restart issued by an earlier run of this attempt (the engine restarted while
        // waiting) is not issued again: the machine would reboot twice and a one-shot boot
        // override would be used up by the first. Only the wait is repeated.
        if let Some(issued) = self.ctx.checkpoint.as_ref().and_then(|c| c.get("issued")) {
            tracing::info!(node = %self.node, action = %issued, "power action already issued; waiting");
            self.wait_for(&PowerState::On).await?;
            return Ok(json!({
                "powerState": PowerState::On.to_string(),
                "previousState": self.ctx.checkpoint.as_ref().and_then(|c| c.get("previousState")).cloned(),
                "changed": true,
            }));
        }
        let before = self.bmc.power_state().await.map_err(bmc_error)?;
        let (act, target) = match (self.action, &before) {
            ("status", _) => return Ok(json!({ "powerState": before.to_string() })),
            // Already there: acting again would be harmless for most BMCs, but some refuse
            // "On" when on, and an idempotent job should not depend on that.
            ("on", PowerState::On) | ("off" | "soft-off", PowerState::Off) => {
                return Ok(json!({ "powerState": before.to_string(), "changed": false }));
            }
            ("on", _) => (PowerAction::On, PowerState::On),
            ("off", _) => (PowerAction::Off, PowerState::Off),
            ("soft-off", _) => (PowerAction::SoftOff, PowerState::Off),
            // Restarting a node that is off means powering it on; many BMCs refuse a
            // restart of a powered-off system.
            ("reboot" | "reset", PowerState::Off) => (PowerAction::On, PowerState::On),
            ("reboot", _) => (PowerAction::Reboot, PowerState::On),
            _ => (PowerAction::Reset, PowerState::On),
        };
        if matches!(act, PowerAction::Reboot | PowerAction::Reset) {
            let services = self.ctx.services.clone();
            let at = services.now_ms();
            let mark =
                json!({"issued": act.to_string(), "at": at, "previousState": before.to_string()});
            services.checkpoint(&self.ctx, mark).await?;
        }
        tracing::info!(node = %self.node, action = %act, "power action");
        self.bmc.power_action(act).await.map_err(bmc_error)?;
        // A restart is complete when the BMC reports On again after the action: sushy goes
        // Off at once and On after a delay, real BMCs may never show Off at all.
        self.wait_for(&target).await?;
        Ok(json!({
            "powerState": target.to_string(),
            "previousState": before.to_string(),
            "changed": true,
        }))
    }

    /// Polls until the BMC reports `target`, tolerating transient errors (a BMC busy
    /// with a reset may not answer for a while) until the deadline.
    async fn wait_for(&self, target: &PowerState) -> Result<(), JobError> {
        let deadline = Instant::now() + self.wait;
        let mut last: String;
        loop {
            match self.bmc.power_state().await {
                Ok(state) if &state == target => return Ok(()),
                Ok(state) => last = format!("last reported {state}"),
                Err(e) if e.is_transient() => last = format!("last error: {e}"),
                Err(e) => return Err(bmc_error(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(JobError::new(format!(
                    "{}: the BMC {} did not report power {target} within {} after {} ({last})",
                    self.node,
                    self.bmc.endpoint(),
                    show_duration(self.wait),
                    self.action_text(),
                )));
            }
            tokio::time::sleep(self.interval.min(deadline - now)).await;
        }
    }

    fn action_text(&self) -> String {
        format!("power {}", self.action)
    }
}
