//! [`Metered`]: a [`Bmc`] that times every operation of the driver it wraps and counts its
//! errors, by driver and operation (`metalgraph_bmc_request_duration_seconds`,
//! `metalgraph_bmc_request_errors_total`). [`Drivers`](super::Drivers) wraps every driver it
//! hands out, so no driver measures itself.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use metalgraph_engine::job::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::{
    Bmc, BootDevice, BootOverride, MediaSlot, MediaStatus, PowerAction, PowerState, Result,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    driver: &'static str,
    operation: &'static str,
}

struct Metrics {
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    errors: Family<Labels, Counter>,
}

/// BMC operations take from a millisecond (the simulator) to minutes (a virtual media
/// insert that downloads the image): 1 ms to ~9 min.
fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    duration: Family::new_with_constructor(buckets),
    errors: Family::default(),
});

/// Registers the BMC metrics (names without the registry's prefix).
pub fn register(registry: &mut Registry) {
    registry.register(
        "bmc_request_duration_seconds",
        "How long BMC operations took, by driver and operation (errors included)",
        METRICS.duration.clone(),
    );
    registry.register(
        "bmc_request_errors",
        "BMC operations that failed, by driver and operation",
        METRICS.errors.clone(),
    );
}

/// A driver whose every operation is measured.
pub(crate) struct Metered {
    driver: &'static str,
    inner: Arc<dyn Bmc>,
}

impl Metered {
    pub(crate) fn wrap(driver: &'static str, inner: Arc<dyn Bmc>) -> Arc<dyn Bmc> {
        Arc::new(Metered { driver, inner })
    }

    fn measure<'a, T: Send + 'a>(
        &self,
        operation: &'static str,
        op: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        let labels = Labels {
            driver: self.driver,
            operation,
        };
        Box::pin(async move {
            let started = Instant::now();
            let res = op.await;
            METRICS
                .duration
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            if res.is_err() {
                METRICS.errors.get_or_create(&labels).inc();
            }
            res
        })
    }
}

impl Bmc for Metered {
    fn endpoint(&self) -> String {
        self.inner.endpoint()
    }

    fn power_state(&self) -> BoxFuture<'_, Result<PowerState>> {
        self.measure("power_state", self.inner.power_state())
    }

    fn power_action(&self, action: PowerAction) -> BoxFuture<'_, Result<()>> {
        self.measure("power_action", self.inner.power_action(action))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> BoxFuture<'_, Result<()>> {
        self.measure(
            "set_boot_device",
            self.inner.set_boot_device(device, persistent, uefi),
        )
    }

    fn boot_override(&self) -> BoxFuture<'_, Result<BootOverride>> {
        self.measure("boot_override", self.inner.boot_override())
    }

    fn virtual_media_insert(&self, slot: MediaSlot, image: String) -> BoxFuture<'_, Result<()>> {
        self.measure(
            "virtual_media_insert",
            self.inner.virtual_media_insert(slot, image),
        )
    }

    fn virtual_media_eject(&self, slot: MediaSlot) -> BoxFuture<'_, Result<()>> {
        self.measure("virtual_media_eject", self.inner.virtual_media_eject(slot))
    }

    fn virtual_media_status(&self, slot: MediaSlot) -> BoxFuture<'_, Result<MediaStatus>> {
        self.measure(
            "virtual_media_status",
            self.inner.virtual_media_status(slot),
        )
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Value>> {
        self.measure("inventory", self.inner.inventory())
    }

    fn clear_sel(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        self.measure("clear_sel", self.inner.clear_sel())
    }

    fn reset_controller_cold(&self) -> BoxFuture<'_, Result<()>> {
        self.measure("reset_controller_cold", self.inner.reset_controller_cold())
    }
}
