//! metalgraph's built-in jobs: the basic ones every graph library leans on (`noop`,
//! `sleep`, `fail`, `evaluate.condition`, `http.request`, `graph.run`).
//!
//! Every job here keeps the contract of [`metalgraph_engine::Job`]: it is idempotent, it
//! stops promptly when its task's cancellation token fires, it returns an output or an
//! error and never writes workflow state, and neither its output nor its errors carry a
//! secret. Options reach a job merged, rendered, coerced and checked against its schema,
//! so the jobs only re-check what the schema cannot express.

pub mod bmc;
mod condition;
pub mod config_media;
mod fail;
pub mod files;
mod http;
mod noop;
mod provision;
pub mod rackhd;
mod sleep;

pub use condition::EvaluateConditionJob;
pub use config_media::{ConfigMediaBuildJob, ConfigMediaSite};
pub use fail::FailJob;
pub use http::{HttpRequestJob, MAX_RESPONSE_BYTES};
pub use noop::NoopJob;
pub use provision::{
    BmcJob, BootDeviceJob, CatalogRedfishJob, DiscoveryEndpointJob, DiscoveryRedfishJob, PowerJob,
    VirtualMediaEjectJob, VirtualMediaInsertJob, WaitNotificationJob,
};
pub use sleep::SleepJob;

use std::sync::Arc;

use metalgraph_engine::{GraphRunJob, JobRegistry};

/// Registers the basic jobs, `graph.run` (which lives in the engine, since it needs the
/// scheduler) among them.
pub fn register_basic(reg: &mut JobRegistry) {
    reg.register(NoopJob::default())
        .register(SleepJob::default())
        .register(FailJob::default())
        .register(EvaluateConditionJob::default())
        .register(HttpRequestJob::default())
        .register(GraphRunJob::default());
}

/// Registers the provisioning jobs (`obm.power`, `obm.boot-device`, `obm.bmc`,
/// `virtual-media.insert`, `virtual-media.eject`, `catalog.redfish`, `discovery.redfish`,
/// `discovery.endpoint`, `wait.notification`), which share `drivers` and with it one connection pool and
/// concurrency limit per BMC.
pub fn register_provisioning(reg: &mut JobRegistry, drivers: Arc<bmc::Drivers>) {
    reg.register(PowerJob::new(drivers.clone()))
        .register(BootDeviceJob::new(drivers.clone()))
        .register(BmcJob::new(drivers.clone()))
        .register(VirtualMediaInsertJob::new(drivers.clone()))
        .register(VirtualMediaEjectJob::new(drivers.clone()))
        .register(CatalogRedfishJob::new(drivers.clone()))
        .register(DiscoveryRedfishJob::new(drivers.clone()))
        .register(DiscoveryEndpointJob::new(drivers))
        .register(WaitNotificationJob::default());
}

/// Registers `config-media.build`, which writes images into `site`'s files directory and
/// renders its templates.
pub fn register_config_media(reg: &mut JobRegistry, site: Arc<ConfigMediaSite>) {
    reg.register(ConfigMediaBuildJob::new(site));
}
