//! `obm.boot-device`: sets the boot override and reads it back, so a BMC that accepts the
//! request but ignores it is caught here rather than by a node that boots the wrong way.

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::{Value, json};

use super::{bmc_error, describe, node_bmc, until_cancelled};
use crate::bmc::{BootDevice, Drivers};

const DEVICES: &[&str] = &["pxe", "cd", "hdd", "bios"];

/// Sets the node's boot device, once or persistently, UEFI or legacy.
pub struct BootDeviceJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for BootDeviceJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootDeviceJob")
    }
}

impl BootDeviceJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new()
                .required("device", OptionKind::Enum(DEVICES), "pxe, cd, hdd or bios")
                .optional(
                    "persistent",
                    OptionKind::Bool,
                    Some(Value::Bool(false)),
                    "every boot (true) or only the next one (false)",
                )
                .optional(
                    "uefi",
                    OptionKind::Bool,
                    None,
                    "force UEFI (true) or legacy (false) boot; unset leaves the mode alone",
                ),
            drivers,
        }
    }
}

impl Job for BootDeviceJob {
    fn name(&self) -> &'static str {
        "obm.boot-device"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = (|| {
            let (node, bmc) = node_bmc(&self.drivers, &ctx, "obm.boot-device")?;
            let name = ctx.str_required("device")?;
            let device = BootDevice::parse(name).ok_or_else(|| {
                JobError::new(format!(
                    "option 'device' must be one of {}, got {name}",
                    DEVICES.join(", ")
                ))
            })?;
            let persistent = ctx.bool_or("persistent", false);
            let uefi = ctx.options.get("uefi").and_then(Value::as_bool);
            Ok::<_, JobError>((describe(&node), bmc, device, persistent, uefi))
        })();
        Box::pin(async move {
            let (node, bmc, device, persistent, uefi) = prepared?;
            let what = format!("{node}: set boot device {device}");
            let work = async {
                bmc.set_boot_device(device, persistent, uefi)
                    .await
                    .map_err(bmc_error)?;
                let readback = bmc.boot_override().await.map_err(bmc_error)?;
                if readback.device != Some(device) {
                    return Err(JobError::new(format!(
                        "{node}: the BMC {} accepted boot device {device} but reports '{}'",
                        bmc.endpoint(),
                        readback.raw
                    )));
                }
                Ok(json!({
                    "device": device,
                    "persistent": persistent,
                    "uefi": uefi,
                    "readback": readback,
                }))
            };
            until_cancelled(&ctx.cancel, || what.clone(), work).await
        })
    }
}
