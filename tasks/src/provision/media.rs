//! `virtual-media.insert` and `virtual-media.eject`: the BMC's virtual CD/DVD drive, both
//! idempotent (the wanted image already inserted, or nothing to eject, succeeds at once).

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::json;

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::Drivers;

/// Inserts an image into the node's virtual CD/DVD drive, ejecting a different one first.
pub struct VirtualMediaInsertJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for VirtualMediaInsertJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VirtualMediaInsertJob")
    }
}

impl VirtualMediaInsertJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new().required(
                "image",
                OptionKind::String,
                "the image URL (http:// or https://) the BMC mounts",
            ),
            drivers,
        }
    }
}

impl Job for VirtualMediaInsertJob {
    fn name(&self) -> &'static str {
        "virtual-media.insert"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = (|| {
            let (node, bmc) = node_bmc(&self.drivers, &ctx, "virtual-media.insert")?;
            let image = ctx.str_required("image")?.trim().to_owned();
            if image.is_empty() {
                return Err(JobError::new("option 'image' is empty"));
            }
            Ok((describe(&node), bmc, image))
        })();
        Box::pin(async move {
            let (node, bmc, image) = prepared?;
            let what = format!("{node}: insert virtual media");
            let work = async {
                let before = bmc.virtual_media_status().await.map_err(bmc_error)?;
                if before.inserted && before.image.as_deref() == Some(image.as_str()) {
                    return Ok(json!({ "image": image, "inserted": true, "changed": false }));
                }
                if before.inserted {
                    // Some BMCs refuse an insert while a medium is in; eject first.
                    bmc.virtual_media_eject().await.map_err(bmc_error)?;
                }
                bmc.virtual_media_insert(image.clone())
                    .await
                    .map_err(bmc_error)?;
                let after = bmc.virtual_media_status().await.map_err(bmc_error)?;
                let matches = after.image.as_deref().is_none_or(|i| i == image);
                if !after.inserted || !matches {
                    return Err(JobError::new(format!(
                        "{node}: the BMC {} accepted the image but reports {}",
                        bmc.endpoint(),
                        match &after.image {
                            Some(other) if after.inserted => format!("'{other}' inserted"),
                            _ => "no medium inserted".to_owned(),
                        }
                    )));
                }
                Ok(json!({
                    "image": image,
                    "inserted": true,
                    "changed": true,
                    "replaced": before.image,
                }))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}

/// Ejects whatever is in the node's virtual CD/DVD drive.
pub struct VirtualMediaEjectJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for VirtualMediaEjectJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VirtualMediaEjectJob")
    }
}

impl VirtualMediaEjectJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new(),
            drivers,
        }
    }
}

impl Job for VirtualMediaEjectJob {
    fn name(&self) -> &'static str {
        "virtual-media.eject"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = node_bmc(&self.drivers, &ctx, "virtual-media.eject");
        Box::pin(async move {
            let (node, bmc) = prepared?;
            let node = describe(&node);
            let what = format!("{node}: eject virtual media");
            let work = async {
                let before = bmc.virtual_media_status().await.map_err(bmc_error)?;
                if !before.inserted {
                    return Ok(json!({ "inserted": false, "changed": false }));
                }
                bmc.virtual_media_eject().await.map_err(bmc_error)?;
                let after = bmc.virtual_media_status().await.map_err(bmc_error)?;
                if after.inserted {
                    return Err(JobError::new(format!(
                        "{node}: the BMC {} accepted the eject but still reports a medium",
                        bmc.endpoint()
                    )));
                }
                Ok(json!({ "inserted": false, "changed": true, "ejected": before.image }))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}
