//! Provisioning jobs: they drive a node's BMC through [`crate::bmc`] (`obm.power`,
//! `obm.boot-device`, `obm.bmc`, `virtual-media.insert`, `virtual-media.eject`,
//! `catalog.redfish`),
//! discover nodes behind a Redfish service (`discovery.redfish`) and wait for a node's
//! callback (`wait.notification`).
//!
//! Each job checks the BMC's state before acting, so a run repeated after a crash reaches
//! the same end state without repeating work that is already done, and each stops
//! promptly when its task is cancelled (dropping the BMC call aborts the HTTP request or
//! kills ipmitool).

mod boot;
mod catalog;
mod controller;
mod discovery;
mod media;
mod power;
mod wait;

use std::future::Future;
use std::sync::Arc;

use metalgraph_engine::nodes::Node;
use metalgraph_engine::{JobContext, JobError, JobResult};
use tokio_util::sync::CancellationToken;

pub use boot::BootDeviceJob;
pub use catalog::CatalogRedfishJob;
pub use controller::BmcJob;
pub use discovery::{DiscoveryEndpointJob, DiscoveryRedfishJob};
pub use media::{VirtualMediaEjectJob, VirtualMediaInsertJob};
pub use power::PowerJob;
pub use wait::WaitNotificationJob;

use crate::bmc::{Bmc, Drivers, node_label};

/// The node a job runs on, or an error saying that the job needs one.
pub(crate) fn require_node(ctx: &JobContext, job: &str) -> Result<Node, JobError> {
    ctx.node.clone().ok_or_else(|| {
        JobError::new(format!(
            "task {}: {job} needs a node; run the graph on a node \
             (POST /api/2.0/nodes/{{id}}/workflows)",
            ctx.label
        ))
    })
}

/// The node and its BMC driver.
fn node_bmc(
    drivers: &Drivers,
    ctx: &JobContext,
    job: &str,
) -> Result<(Node, Arc<dyn Bmc>), JobError> {
    let node = require_node(ctx, job)?;
    let bmc = drivers.for_node(&node).map_err(bmc_error)?;
    Ok((node, bmc))
}

fn bmc_error(e: crate::bmc::Error) -> JobError {
    JobError::new(e.to_string())
}

/// Runs `work` until it finishes or the task is cancelled; cancellation wins a tie, so a
/// cancelled task never reports success, and dropping `work` abandons the BMC call.
async fn until_cancelled(
    cancel: &CancellationToken,
    what: impl FnOnce() -> String,
    work: impl Future<Output = JobResult>,
) -> JobResult {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(JobError::new(format!("{}: cancelled", what()))),
        result = work => result,
    }
}

/// A short description of the node for job messages.
fn describe(node: &Node) -> String {
    format!("node {}", node_label(node))
}
