//! `obm.bmc`: upkeep of a node's BMC itself rather than of the node — clear its System
//! Event Log (`clear-sel`), or cold-reset it (`reset-cold`) and wait until it answers again.

use std::sync::Arc;
use std::time::Duration;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::{Bmc, Drivers, Error, PowerState, show_duration};

const ACTIONS: &[&str] = &["clear-sel", "reset-cold"];

/// Clears a BMC's event log, or cold-resets the BMC and waits until it answers again.
pub struct BmcJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for BmcJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BmcJob")
    }
}

impl BmcJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "action",
                    OptionKind::Enum(ACTIONS),
                    "clear-sel (empty the BMC's System Event Log) or reset-cold (restart \
                     the BMC itself, then wait until it answers again)",
                )
                .optional(
                    "waitTimeout",
                    OptionKind::Duration,
                    Some(Value::from("5m")),
                    "reset-cold: how long the BMC may take to answer again, from the reset",
                )
                .optional(
                    "pollInterval",
                    OptionKind::Duration,
                    Some(Value::from("1s")),
                    "reset-cold: how often to try the BMC while waiting",
                )
                .optional(
                    "resetGrace",
                    OptionKind::Duration,
                    Some(Value::from("5s")),
                    "reset-cold: how long to leave the BMC alone after the reset before \
                     trying it, since a BMC may still answer for a moment before it goes down",
                ),
            drivers,
        }
    }
}

impl Job for BmcJob {
    fn name(&self) -> &'static str {
        "obm.bmc"
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    ClearSel,
    ResetCold,
}

struct Work {
    ctx: JobContext,
    bmc: Arc<dyn Bmc>,
    node: String,
    action: Action,
    wait: Duration,
    interval: Duration,
    grace: Duration,
}

fn prepare(drivers: &Drivers, ctx: &JobContext) -> Result<(String, Work), JobError> {
    let (node, bmc) = node_bmc(drivers, ctx, "obm.bmc")?;
    let action = match ctx.str_required("action")? {
        "clear-sel" => Action::ClearSel,
        "reset-cold" => Action::ResetCold,
        other => {
            return Err(JobError::new(format!(
                "option 'action' must be one of {}, got {other}",
                ACTIONS.join(", ")
            )));
        }
    };
    let wait = ctx.duration_or("waitTimeout", Duration::from_secs(300))?;
    let interval = ctx
        .duration_or("pollInterval", Duration::from_secs(1))?
        .max(Duration::from_millis(10));
    let grace = ctx.duration_or("resetGrace", Duration::from_secs(5))?;
    let what = match action {
        Action::ClearSel => format!("{}: clear SEL", describe(&node)),
        Action::ResetCold => format!("{}: cold reset of the BMC", describe(&node)),
    };
    Ok((
        what,
        Work {
            ctx: ctx.clone(),
            bmc,
            node: describe(&node),
            action,
            wait,
            interval,
            grace,
        },
    ))
}

impl Work {
    async fn run(self) -> JobResult {
        match self.action {
            Action::ClearSel => self.clear_sel().await,
            Action::ResetCold => self.reset_cold().await,
        }
    }

    /// Clearing twice is harmless, so a repeated run simply clears again.
    async fn clear_sel(&self) -> JobResult {
        tracing::info!(node = %self.node, "clearing the SEL");
        let before = self.bmc.clear_sel().await.map_err(bmc_error)?;
        Ok(json!({ "cleared": true, "entriesBefore": before }))
    }

    async fn reset_cold(&self) -> JobResult {
        // A reset issued by an earlier run of this attempt (the engine restarted while
        // waiting) is not issued again: the BMC would go down a second time. Only the wait
        // is repeated.
        let acknowledged = if self
            .ctx
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("issued"))
            .is_some()
        {
            tracing::info!(node = %self.node, "cold reset already issued; waiting for the BMC");
            None
        } else {
            Some(self.issue_reset().await?)
        };
        let state = self.wait_until_answering().await?;
        Ok(json!({
            "reset": "cold",
            "acknowledged": acknowledged,
            "powerState": state.to_string(),
        }))
    }

    /// Sends the reset; returns whether the BMC acknowledged it.
    async fn issue_reset(&self) -> Result<bool, JobError> {
        // The BMC must answer before it is reset, so that a wrong address or password fails
        // here, plainly, rather than as a BMC that never came back.
        self.bmc.power_state().await.map_err(bmc_error)?;
        let services = self.ctx.services.clone();
        let mark = json!({ "issued": "cold reset", "at": services.now_ms() });
        services.checkpoint(&self.ctx, mark).await?;
        tracing::info!(node = %self.node, "cold reset of the BMC");
        match self.bmc.reset_controller_cold().await {
            Ok(()) => Ok(true),
            // A BMC may restart before its answer leaves it. It answered a moment ago, so
            // silence now is most likely the reset taking effect; the wait decides.
            Err(e) if e.is_transient() => {
                tracing::warn!(node = %self.node, error = %e, "no answer to the cold reset; waiting for the BMC");
                Ok(false)
            }
            Err(e) => Err(bmc_error(e)),
        }
    }

    /// Leaves the BMC alone for the grace period, then reads its power state until it
    /// answers, within the wait. Every BMC error counts as "not back yet": a restarting BMC
    /// may refuse sessions or answer errors before it is ready, and its address and
    /// credentials were proven just before the reset. Only errors that do not come from the
    /// BMC (its OBM settings) end the wait early.
    async fn wait_until_answering(&self) -> Result<PowerState, JobError> {
        let deadline = Instant::now() + self.wait;
        tokio::time::sleep(self.grace.min(self.wait)).await;
        let mut last: String;
        loop {
            // Each try is bounded by what is left of the wait: an ipmitool run against a
            // silent BMC retries for seconds.
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.bmc.power_state()).await {
                Ok(Ok(state)) => return Ok(state),
                Ok(Err(e)) if !from_the_bmc(&e) => return Err(bmc_error(e)),
                Ok(Err(e)) => last = format!("last error: {e}"),
                Err(_) => last = "the last try was still waiting for an answer".to_owned(),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(JobError::new(format!(
                    "{}: the BMC {} did not answer within {} after its cold reset ({last})",
                    self.node,
                    self.bmc.endpoint(),
                    show_duration(self.wait),
                )));
            }
            tokio::time::sleep(self.interval.min(deadline - now)).await;
        }
    }
}

/// Whether an error came from talking to the BMC, as opposed to the node's OBM settings or
/// the driver, which waiting does not change.
fn from_the_bmc(e: &Error) -> bool {
    match e {
        Error::Auth { .. }
        | Error::Tls { .. }
        | Error::Unreachable { .. }
        | Error::Timeout { .. }
        | Error::Http { .. }
        | Error::Bmc { .. } => true,
        Error::NoObm { .. }
        | Error::UnknownService { .. }
        | Error::Config { .. }
        | Error::Unsupported { .. } => false,
    }
}
