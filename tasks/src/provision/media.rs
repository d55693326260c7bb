//! `virtual-media.insert` and `virtual-media.eject`: one of the BMC's virtual media
//! devices (`slot`: the CD/DVD drive an OS boots from, or a second device for
//! configuration media), both idempotent (the wanted image already inserted, or nothing to
//! eject, succeeds at once).

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::json;

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::{Drivers, MediaSlot};

/// The `slot` option both jobs declare.
fn with_slot(schema: OptionSchema) -> OptionSchema {
    schema.optional(
        "slot",
        OptionKind::Enum(&["primary", "secondary"]),
        Some(json!("primary")),
        "which virtual media device: primary (the CD/DVD drive the OS boots from) or \
         secondary (another device that takes an ISO image, for configuration media)",
    )
}

/// The device the `slot` option names.
fn slot(ctx: &JobContext) -> MediaSlot {
    ctx.str_opt("slot")
        .and_then(MediaSlot::parse)
        .unwrap_or(MediaSlot::Primary)
}

/// Inserts an image into one of the node's virtual media devices, ejecting a different one
/// first.
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
            schema: with_slot(OptionSchema::new().required(
                "image",
                OptionKind::String,
                "the image URL (http:// or https://) the BMC mounts",
            )),
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
        let slot = slot(&ctx);
        Box::pin(async move {
            let (node, bmc, image) = prepared?;
            let what = format!("{node}: insert virtual media ({slot})");
            let work = async {
                let before = bmc.virtual_media_status(slot).await.map_err(bmc_error)?;
                if before.inserted && before.image.as_deref() == Some(image.as_str()) {
                    return Ok(json!({
                        "image": image, "slot": slot, "inserted": true, "changed": false,
                    }));
                }
                if before.inserted {
                    // Some BMCs refuse an insert while a medium is in; eject first.
                    bmc.virtual_media_eject(slot).await.map_err(bmc_error)?;
                }
                bmc.virtual_media_insert(slot, image.clone())
                    .await
                    .map_err(bmc_error)?;
                let after = bmc.virtual_media_status(slot).await.map_err(bmc_error)?;
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
                    "slot": slot,
                    "inserted": true,
                    "changed": true,
                    "replaced": before.image,
                }))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}

/// Ejects whatever is in one of the node's virtual media devices.
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
            schema: with_slot(OptionSchema::new()),
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
        let slot = slot(&ctx);
        Box::pin(async move {
            let (node, bmc) = prepared?;
            let node = describe(&node);
            let what = format!("{node}: eject virtual media ({slot})");
            let work = async {
                let before = match bmc.virtual_media_status(slot).await {
                    Ok(before) => before,
                    // A BMC without a second device has nothing in it to eject.
                    Err(crate::bmc::Error::Unsupported { .. }) if slot == MediaSlot::Secondary => {
                        return Ok(json!({
                            "slot": slot, "inserted": false, "changed": false, "device": false,
                        }));
                    }
                    Err(e) => return Err(bmc_error(e)),
                };
                if !before.inserted {
                    return Ok(json!({ "slot": slot, "inserted": false, "changed": false }));
                }
                bmc.virtual_media_eject(slot).await.map_err(bmc_error)?;
                let after = bmc.virtual_media_status(slot).await.map_err(bmc_error)?;
                if after.inserted {
                    return Err(JobError::new(format!(
                        "{node}: the BMC {} accepted the eject but still reports a medium",
                        bmc.endpoint()
                    )));
                }
                Ok(json!({
                    "slot": slot, "inserted": false, "changed": true, "ejected": before.image,
                }))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}
