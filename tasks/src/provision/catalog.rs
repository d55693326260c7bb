//! `catalog.redfish`: reads one node's inventory from its BMC and stores it as the node's
//! `redfish` catalog.

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionSchema};
use serde_json::{Value, json};

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::Drivers;

/// The catalog source this job writes.
pub const SOURCE: &str = "redfish";

/// Stores the node's BMC inventory as its `redfish` catalog.
pub struct CatalogRedfishJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for CatalogRedfishJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CatalogRedfishJob")
    }
}

impl CatalogRedfishJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new(),
            drivers,
        }
    }
}

impl Job for CatalogRedfishJob {
    fn name(&self) -> &'static str {
        "catalog.redfish"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = node_bmc(&self.drivers, &ctx, "catalog.redfish");
        Box::pin(async move {
            let (node, bmc) = prepared?;
            let label = describe(&node);
            let what = format!("{label}: catalog");
            let work = async {
                let inventory = bmc.inventory().await.map_err(bmc_error)?;
                ctx.services
                    .nodes()
                    .put_catalog(&node.id, SOURCE, &inventory)
                    .await
                    .map_err(|e| {
                        JobError::new(format!("{label}: cannot store the catalog: {e}"))
                    })?;
                Ok(summary(&inventory))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}

/// What a catalog run reports as its output: the catalog itself is in the store, and a
/// task output is persisted with its workflow, so it stays small.
pub(super) fn summary(inventory: &Value) -> Value {
    json!({
        "source": SOURCE,
        "systemId": inventory.get("id"),
        "uuid": inventory.get("uuid"),
        "macs": inventory.get("macs"),
        "errors": inventory.get("errors"),
    })
}
