//! The simulated BMC (`sim-obm-service`): power, boot override, virtual media, a small
//! inventory and a System Event Log kept in process memory, for the demo, benchmarks and
//! tests that need no peer.
//!
//! State lives in one process-wide map keyed by node id, so every driver instance of a
//! node (one per job run) sees the same machine. A power change takes effect after a delay
//! (default 50 ms, OBM config `delay`), applied lazily when the state is next read, as
//! sushy-tools does; jobs must therefore poll, as they do against real BMCs. Each power
//! action logs one SEL entry, as real BMCs log power events. A cold reset of the BMC makes
//! it unreachable for the same delay, with the machine's state kept (the SEL is
//! non-volatile, and the node's power is not the BMC's).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metalgraph_engine::job::{BoxFuture, value_to_duration};
use metalgraph_engine::nodes::ObmConfig;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{
    At, Bmc, BootDevice, BootOverride, DriverOptions, Error, MediaSlot, MediaStatus, PowerAction,
    PowerState, Result, SIM_SERVICE,
};

/// One simulated machine.
#[derive(Debug, Clone, Default)]
struct Machine {
    on: bool,
    /// A power change that takes effect at the given instant.
    pending: Option<(bool, Instant)>,
    boot: Option<(BootDevice, bool, Option<bool>)>,
    /// The image in the primary (CD) and the secondary (USB stick) device.
    media: [Option<String>; 2],
    /// How many entries the System Event Log holds.
    sel_entries: u64,
    /// Until when the BMC is restarting after a cold reset and answers nothing.
    down_until: Option<Instant>,
}

/// A simulated machine's media device for `slot`.
fn device(slot: MediaSlot) -> usize {
    match slot {
        MediaSlot::Primary => 0,
        MediaSlot::Secondary => 1,
    }
}

impl Machine {
    fn settle(&mut self) {
        if let Some((on, at)) = self.pending
            && Instant::now() >= at
        {
            self.on = on;
            self.pending = None;
        }
    }
}

fn machines() -> &'static Mutex<HashMap<String, Machine>> {
    static MACHINES: OnceLock<Mutex<HashMap<String, Machine>>> = OnceLock::new();
    MACHINES.get_or_init(Mutex::default)
}

/// A simulated BMC for one node.
#[derive(Debug)]
pub struct SimBmc {
    node: String,
    node_id: String,
    delay: Duration,
    /// Fail every operation with this message (OBM config `fail`), to exercise error paths.
    fail: Option<String>,
}

impl SimBmc {
    pub(crate) fn new(
        node: &str,
        node_id: &str,
        config: &ObmConfig,
        options: &DriverOptions,
    ) -> Result<Self> {
        let delay = match config.extra.get("delay") {
            None | Some(Value::Null) => options.sim_delay,
            Some(v) => value_to_duration(v).map_err(|e| Error::Config {
                node: node.to_owned(),
                service: SIM_SERVICE.to_owned(),
                message: format!("'delay': {e}"),
            })?,
        };
        Ok(Self {
            node: node.to_owned(),
            node_id: node_id.to_owned(),
            delay,
            fail: config
                .extra
                .get("fail")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// Forgets every simulated machine's state (tests and demo restarts).
    pub fn reset_all() {
        machines()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn with<T>(&self, op: &str, f: impl FnOnce(&mut Machine) -> T) -> Result<T> {
        if let Some(message) = &self.fail {
            return Err(Error::Bmc {
                at: self.at(op),
                message: message.clone(),
            });
        }
        let mut map = machines().lock().unwrap_or_else(PoisonError::into_inner);
        let m = map.entry(self.node_id.clone()).or_default();
        if m.down_until.is_some_and(|until| Instant::now() < until) {
            return Err(Error::Unreachable {
                at: self.at(op),
                message: "the simulated BMC is restarting after a cold reset".to_owned(),
            });
        }
        m.down_until = None;
        m.settle();
        Ok(f(m))
    }

    fn at(&self, operation: &str) -> At {
        At {
            node: self.node.clone(),
            endpoint: format!("sim:{}", self.node_id),
            operation: operation.to_owned(),
        }
    }

    fn ready<T: Send + 'static>(result: Result<T>) -> BoxFuture<'static, Result<T>> {
        Box::pin(async move { result })
    }
}

impl Bmc for SimBmc {
    fn endpoint(&self) -> String {
        format!("sim:{}", self.node_id)
    }

    fn power_state(&self) -> BoxFuture<'_, Result<PowerState>> {
        Self::ready(self.with("read power state", |m| {
            if m.on {
                PowerState::On
            } else {
                PowerState::Off
            }
        }))
    }

    fn power_action(&self, action: PowerAction) -> BoxFuture<'_, Result<()>> {
        let at = Instant::now() + self.delay;
        Self::ready(self.with(&action.to_string(), |m| {
            m.sel_entries += 1;
            match action {
                PowerAction::On => m.pending = Some((true, at)),
                PowerAction::Off | PowerAction::SoftOff => m.pending = Some((false, at)),
                // A restart goes dark at once and comes back after the delay, like sushy.
                PowerAction::Reboot | PowerAction::Reset => {
                    m.on = false;
                    m.pending = Some((true, at));
                }
            }
        }))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> BoxFuture<'_, Result<()>> {
        Self::ready(self.with("set boot device", |m| {
            m.boot = Some((device, persistent, uefi));
        }))
    }

    fn boot_override(&self) -> BoxFuture<'_, Result<BootOverride>> {
        Self::ready(self.with("read boot override", |m| match m.boot {
            Some((device, persistent, uefi)) => BootOverride {
                device: Some(device),
                persistent: Some(persistent),
                uefi,
                raw: device.to_string(),
            },
            None => BootOverride {
                device: None,
                persistent: None,
                uefi: None,
                raw: "None".to_owned(),
            },
        }))
    }

    fn virtual_media_insert(&self, slot: MediaSlot, image: String) -> BoxFuture<'_, Result<()>> {
        Self::ready(self.with("insert virtual media", |m| {
            m.media[device(slot)] = Some(image);
        }))
    }

    fn virtual_media_eject(&self, slot: MediaSlot) -> BoxFuture<'_, Result<()>> {
        Self::ready(self.with("eject virtual media", |m| m.media[device(slot)] = None))
    }

    fn virtual_media_status(&self, slot: MediaSlot) -> BoxFuture<'_, Result<MediaStatus>> {
        Self::ready(self.with("read virtual media", |m| MediaStatus {
            inserted: m.media[device(slot)].is_some(),
            image: m.media[device(slot)].clone(),
        }))
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Value>> {
        let node_id = self.node_id.clone();
        Self::ready(self.with("read inventory", |m| {
            json!({
                "id": node_id,
                "name": format!("sim-{node_id}"),
                "uuid": null,
                "macs": [],
                "processorSummary": { "Count": 2, "Model": "Simulated CPU" },
                "memorySummary": { "TotalSystemMemoryGiB": 64 },
                "system": {
                    "Id": node_id,
                    "Manufacturer": "metalgraph",
                    "Model": "Simulated node",
                    "PowerState": if m.on { "On" } else { "Off" },
                },
                "errors": [],
            })
        }))
    }

    fn clear_sel(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Self::ready(self.with("clear SEL", |m| Some(std::mem::take(&mut m.sel_entries))))
    }

    fn reset_controller_cold(&self) -> BoxFuture<'_, Result<()>> {
        let until = Instant::now() + self.delay;
        Self::ready(self.with("cold reset", |m| m.down_until = Some(until)))
    }
}
