//! BMC drivers: one [`Bmc`] trait (power, boot override, virtual media, inventory, and the
//! BMC's own upkeep: its event log and a cold reset) with a Redfish, an IPMI and a
//! simulated implementation, and the [`Drivers`] factory that picks
//! one from a node's OBM record.
//!
//! Architecture invariant: drivers know nothing of workflows or tasks. They take a node's
//! OBM settings, talk to one BMC and return typed answers or an [`Error`] that names the
//! node, the BMC endpoint (never its credentials), the operation and the BMC's own words.
//! Jobs (`crate::provision`) decide what to wait for and what counts as done.

mod cache;
mod ipmi;
mod metered;
mod redfish;
mod sim;
pub mod systems;

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalgraph_engine::job::BoxFuture;
use metalgraph_engine::nodes::{Node, Obm, ObmConfig};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use cache::SharedCache;
pub use ipmi::IpmiBmc;
use metered::Metered;
pub use metered::register as register_metrics;
pub use redfish::{RedfishBmc, RedfishEndpoint, Trust};
pub use sim::SimBmc;

/// The OBM service names, as RackHD spells them.
pub const REDFISH_SERVICE: &str = "redfish-obm-service";
pub const IPMI_SERVICE: &str = "ipmi-obm-service";
pub const SIM_SERVICE: &str = "sim-obm-service";

/// A node's power state as its BMC reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
    /// Anything else the BMC said (`PoweringOn`, an empty answer, ...), verbatim.
    Unknown(String),
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PowerState::On => f.write_str("On"),
            PowerState::Off => f.write_str("Off"),
            PowerState::Unknown(s) if s.is_empty() => f.write_str("Unknown"),
            PowerState::Unknown(s) => f.write_str(s),
        }
    }
}

/// A power operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    On,
    /// Hard power off.
    Off,
    /// Ask the operating system to shut down (ACPI).
    SoftOff,
    /// Restart the node; drivers prefer a forced restart, as RackHD did.
    Reboot,
    /// Hard reset.
    Reset,
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerAction::On => "power on",
            PowerAction::Off => "power off",
            PowerAction::SoftOff => "soft power off",
            PowerAction::Reboot => "reboot",
            PowerAction::Reset => "reset",
        })
    }
}

/// A one-time or persistent boot source override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Pxe,
    Cd,
    Hdd,
    /// The firmware's setup screen.
    Bios,
}

impl BootDevice {
    /// The job option spelling (`pxe`, `cd`, `hdd`, `bios`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pxe" => Some(BootDevice::Pxe),
            "cd" => Some(BootDevice::Cd),
            "hdd" => Some(BootDevice::Hdd),
            "bios" => Some(BootDevice::Bios),
            _ => None,
        }
    }
}

impl fmt::Display for BootDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootDevice::Pxe => "pxe",
            BootDevice::Cd => "cd",
            BootDevice::Hdd => "hdd",
            BootDevice::Bios => "bios",
        })
    }
}

/// The boot override a BMC reports. BMCs round-trip different subsets (sushy always reads
/// back `Continuous`; ipmi_sim drops the persistent and EFI bits), so only `device` is
/// reliable everywhere and the rest is `None` when the BMC did not say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootOverride {
    /// The override target, `None` when there is no override.
    pub device: Option<BootDevice>,
    pub persistent: Option<bool>,
    pub uefi: Option<bool>,
    /// The BMC's own words for the target (`Pxe`, `Force PXE`), for operators.
    pub raw: String,
}

/// Which of the BMC's virtual media devices an operation addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaSlot {
    /// The virtual CD/DVD drive an OS image boots from: the first device that takes CD or
    /// DVD media.
    Primary,
    /// Another device than the primary one that takes an ISO image, for a second medium
    /// such as configuration media: another CD/DVD drive if there is one, else a device
    /// that takes a USB stick image (sushy-tools' and iLO's `Floppy`, iDRAC's
    /// `RemovableDisk`). A BMC with no such device refuses it as unsupported.
    Secondary,
}

impl MediaSlot {
    /// The job option spelling (`primary`, `secondary`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "primary" => Some(MediaSlot::Primary),
            "secondary" => Some(MediaSlot::Secondary),
            _ => None,
        }
    }
}

impl fmt::Display for MediaSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MediaSlot::Primary => "primary",
            MediaSlot::Secondary => "secondary",
        })
    }
}

/// The state of one of the BMC's virtual media devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaStatus {
    pub inserted: bool,
    /// The image URL the BMC reports, when inserted.
    pub image: Option<String>,
}

/// Where an operation failed: the node, the BMC endpoint and the operation. Displayed as
/// `node n1: power on on BMC https://10.0.0.5:443`; it never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub node: String,
    pub endpoint: String,
    pub operation: String,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {}: {} on BMC {}",
            self.node, self.operation, self.endpoint
        )
    }
}

/// Why a BMC operation failed. Every message names the node, the endpoint (host and port,
/// never credentials), the operation and, where there is one, the BMC's own message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node {node} has no OBM settings; add an OBM (redfish, ipmi or sim) first")]
    NoObm { node: String },
    #[error(
        "node {node}: unknown OBM service '{service}' (known: {REDFISH_SERVICE}, \
         {IPMI_SERVICE}, {SIM_SERVICE})"
    )]
    UnknownService { node: String, service: String },
    #[error("node {node}: invalid OBM settings for {service}: {message}")]
    Config {
        node: String,
        service: String,
        message: String,
    },
    #[error("{at}: {message}")]
    Auth { at: At, message: String },
    #[error(
        "{at}: TLS certificate not accepted ({message}); give the OBM the CA that signed it (caCert), or set verifySSL: false to accept any certificate"
    )]
    Tls { at: At, message: String },
    #[error("{at}: BMC unreachable: {message}")]
    Unreachable { at: At, message: String },
    #[error("{at}: no answer within {}", show_duration(*.after))]
    Timeout { at: At, after: Duration },
    #[error("{at}: BMC answered HTTP {status}: {message}")]
    Http {
        at: At,
        status: u16,
        message: String,
    },
    #[error("{at}: {message}")]
    Bmc { at: At, message: String },
    #[error("{at}: not supported: {message}")]
    Unsupported { at: At, message: String },
}

impl Error {
    /// Whether trying again later might succeed: the BMC was unreachable, slow, or answered
    /// with a server error. Authentication, certificate and configuration problems are
    /// permanent until an operator acts.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Http { status, .. } => *status >= 500 && *status != 501,
            _ => false,
        }
    }
}

/// Shows a duration the way options spell them (`30s`, `250ms`).
pub(crate) fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A result of a BMC operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One node's BMC.
///
/// Methods are asynchronous through boxed futures (like [`metalgraph_engine::Job`]), so
/// the trait stays object safe. Dropping a returned future abandons the operation: HTTP
/// requests are aborted and `ipmitool` processes killed.
pub trait Bmc: Send + Sync {
    /// The endpoint for messages: a base URL or `user@host:port`, never a password.
    fn endpoint(&self) -> String;

    fn power_state(&self) -> BoxFuture<'_, Result<PowerState>>;

    /// Starts a power operation; it returns when the BMC accepted it, which is usually
    /// before the power state changes.
    fn power_action(&self, action: PowerAction) -> BoxFuture<'_, Result<()>>;

    /// Sets the boot override: `persistent` for every boot rather than the next one,
    /// `uefi` to force UEFI (`Some(true)`) or legacy (`Some(false)`) boot.
    fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> BoxFuture<'_, Result<()>>;

    /// Reads the boot override back.
    fn boot_override(&self) -> BoxFuture<'_, Result<BootOverride>>;

    /// Inserts `image` (a URL the BMC downloads or mounts) into the virtual media device
    /// `slot`.
    fn virtual_media_insert(&self, slot: MediaSlot, image: String) -> BoxFuture<'_, Result<()>>;

    fn virtual_media_eject(&self, slot: MediaSlot) -> BoxFuture<'_, Result<()>>;

    fn virtual_media_status(&self, slot: MediaSlot) -> BoxFuture<'_, Result<MediaStatus>>;

    /// The node's inventory as a JSON document (stored as a catalog). Parts the BMC fails
    /// to provide are listed under `errors` rather than failing the whole inventory.
    fn inventory(&self) -> BoxFuture<'_, Result<Value>>;

    /// Clears the BMC's System Event Log (SEL) and returns how many entries it held just
    /// before, when the BMC said. It returns when the BMC accepted the clear: BMCs may
    /// erase in the background, and many log the clearing itself as a new entry, so the
    /// log is not necessarily empty afterwards.
    fn clear_sel(&self) -> BoxFuture<'_, Result<Option<u64>>>;

    /// Cold-resets the BMC itself (the node's power is not touched). It returns when the
    /// BMC accepted the reset; the BMC then stops answering for a while, often seconds to
    /// minutes, and may reset before its answer is sent, which the caller sees as an
    /// unreachable BMC or a timeout.
    fn reset_controller_cold(&self) -> BoxFuture<'_, Result<()>>;
}

/// Driver settings shared by every BMC.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// How long connecting to a Redfish BMC may take.
    pub connect_timeout: Duration,
    /// How long one Redfish request may take, answer included.
    pub request_timeout: Duration,
    /// How long a virtual media insert may take: BMCs often download the whole image
    /// before they answer.
    pub media_timeout: Duration,
    /// How many requests (or `ipmitool` processes) may talk to one BMC at once; BMCs have
    /// small session tables and fall over under load.
    pub per_endpoint_limit: usize,
    /// How long one `ipmitool` run may take before it is killed.
    pub ipmi_timeout: Duration,
    /// The `ipmitool` binary.
    pub ipmitool: String,
    /// How long the simulated BMC takes to apply a power change, unless its OBM config
    /// gives `delay`.
    pub sim_delay: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            media_timeout: Duration::from_secs(300),
            per_endpoint_limit: 4,
            ipmi_timeout: Duration::from_secs(20),
            ipmitool: "ipmitool".to_owned(),
            sim_delay: Duration::from_millis(50),
        }
    }
}

/// How long what drivers share for one BMC endpoint is kept after it was last handed out,
/// once no driver holds it.
const ENDPOINT_IDLE: Duration = Duration::from_secs(10 * 60);

/// How many BMC endpoints' shared state [`Drivers`] keeps, endpoints in use aside.
const MAX_ENDPOINTS: usize = 1024;

/// The driver factory: picks a [`Bmc`] from a node's OBM record and owns what drivers share
/// across jobs (a pooled HTTP client and a concurrency limit per BMC endpoint).
///
/// What it shares is bounded: an endpoint no driver holds is dropped after ten minutes
/// without use, and beyond 1024 endpoints the least recently used of those no driver holds
/// are dropped first. An endpoint a driver still holds is never dropped, so every live
/// endpoint keeps exactly one client and one concurrency limit; a dropped one is built
/// afresh (new connections, new Redfish sessions) the next time a job needs it.
pub struct Drivers {
    options: DriverOptions,
    /// Redfish endpoints by `(base URL, verify TLS)`, each with its own client and limit.
    redfish: SharedCache<(String, Trust), RedfishEndpoint>,
    /// Concurrency limits of IPMI BMCs by `host:port`.
    ipmi_limits: SharedCache<String, Semaphore>,
}

impl fmt::Debug for Drivers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drivers")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for Drivers {
    fn default() -> Self {
        Self::new(DriverOptions::default())
    }
}

impl Drivers {
    pub fn new(options: DriverOptions) -> Self {
        Self {
            options,
            redfish: SharedCache::new(ENDPOINT_IDLE, MAX_ENDPOINTS),
            ipmi_limits: SharedCache::new(ENDPOINT_IDLE, MAX_ENDPOINTS),
        }
    }

    pub fn options(&self) -> &DriverOptions {
        &self.options
    }

    /// The driver for a node's (first) OBM.
    pub fn for_node(&self, node: &Node) -> Result<Arc<dyn Bmc>> {
        let obm = node.obm().ok_or_else(|| Error::NoObm {
            node: node_label(node),
        })?;
        self.for_obm(&node_label(node), &node.id, obm)
    }

    /// The driver for an OBM record; `node` names the node in messages, `node_id` keys the
    /// simulated BMC's state. Its every operation is measured (`metered.rs`).
    pub fn for_obm(&self, node: &str, node_id: &str, obm: &Obm) -> Result<Arc<dyn Bmc>> {
        match obm.service.as_str() {
            REDFISH_SERVICE => Ok(Metered::wrap(
                "redfish",
                Arc::new(self.redfish(node, &obm.config)?),
            )),
            IPMI_SERVICE => Ok(Metered::wrap(
                "ipmi",
                Arc::new(IpmiBmc::new(node, &obm.config, &self.options, |key| {
                    self.ipmi_limit(key)
                })?),
            )),
            SIM_SERVICE => Ok(Metered::wrap(
                "sim",
                Arc::new(SimBmc::new(node, node_id, &obm.config, &self.options)?),
            )),
            other => Err(Error::UnknownService {
                node: node.to_owned(),
                service: other.to_owned(),
            }),
        }
    }

    /// A Redfish driver for `config`, also used by discovery before any node exists.
    pub fn redfish(&self, node: &str, config: &ObmConfig) -> Result<RedfishBmc> {
        RedfishBmc::new(node, config, |base, trust| {
            self.redfish_endpoint(base, trust)
        })
    }

    fn redfish_endpoint(&self, base: &str, trust: &Trust) -> Result<Arc<RedfishEndpoint>, String> {
        self.redfish
            .get_or_try_insert(&(base.to_owned(), trust.clone()), Instant::now(), || {
                RedfishEndpoint::new(&self.options, trust)
            })
    }

    fn ipmi_limit(&self, key: &str) -> Arc<Semaphore> {
        let limit = self.options.per_endpoint_limit.max(1);
        let Ok(limit) = self
            .ipmi_limits
            .get_or_try_insert(&key.to_owned(), Instant::now(), || {
                Ok::<_, Infallible>(Semaphore::new(limit))
            });
        limit
    }
}

/// How a node is named in messages: its name and id when it has a name.
pub(crate) fn node_label(node: &Node) -> String {
    if node.name.is_empty() || node.name == node.id {
        node.id.clone()
    } else {
        format!("{} ({})", node.id, node.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_of_one_endpoint_share_its_client_and_limit() {
        let drivers = Drivers::default();
        let a = drivers
            .redfish_endpoint("https://10.0.0.5/", &Trust::System)
            .unwrap();
        let again = drivers
            .redfish_endpoint("https://10.0.0.5/", &Trust::System)
            .unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        // Another TLS policy or another BMC is another endpoint.
        let insecure = drivers
            .redfish_endpoint("https://10.0.0.5/", &Trust::Anything)
            .unwrap();
        let other = drivers
            .redfish_endpoint("https://10.0.0.6/", &Trust::System)
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &insecure) && !Arc::ptr_eq(&a, &other));
        assert_eq!(drivers.redfish.len(), 3);
        // A CA that is not PEM is refused with a message naming caCert.
        let bad = drivers.redfish_endpoint("https://10.0.0.7/", &Trust::Ca("nonsense".into()));
        assert!(bad.is_err_and(|e| e.contains("caCert")));

        let limit = drivers.ipmi_limit("10.0.0.5:623");
        assert!(Arc::ptr_eq(&limit, &drivers.ipmi_limit("10.0.0.5:623")));
        assert_eq!(drivers.ipmi_limits.len(), 1);
    }
}
