//! The Redfish driver (`redfish-obm-service`): a ComputerSystem reached over HTTPS (or
//! HTTP) with reqwest, found by following links from the service root rather than by
//! guessing paths, since BMCs disagree on where things hang (sushy-tools serves
//! VirtualMedia under the System and points its Manager's link there).
//!
//! This file holds the operations (the [`Bmc`] implementation). They describe requests;
//! `client.rs` sends every one of them (limit, timeout, authentication, body cap, retries,
//! errors, and the rule that nothing goes to another origin), and `links.rs` reads links
//! out of the BMC's JSON.

mod client;
mod links;

use std::fmt;
use std::sync::Arc;

use metalgraph_engine::job::BoxFuture;
use metalgraph_engine::nodes::{ObmConfig, normalize_identifier};
use reqwest::Method;
use reqwest::header::{ETAG, HeaderMap, IF_MATCH};
use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;

use super::{
    At, Bmc, BootDevice, BootOverride, Error, MediaSlot, MediaStatus, PowerAction, PowerState,
    REDFISH_SERVICE, Result,
};
use client::{Client, Reply, Request};
pub use client::{RedfishEndpoint, Trust};
use links::{SystemRef, action_target, links, members, odata_id};

/// How many members of one collection the inventory follows.
const MAX_MEMBERS: usize = 64;

/// One ComputerSystem behind a Redfish service.
pub struct RedfishBmc {
    /// The service as the OBM's user talks to it; every request goes through it.
    client: Client,
    /// The ComputerSystem as configured (or as discovery found it).
    system: SystemRef,
    /// The resolved ComputerSystem's path (`@odata.id`).
    system_path: OnceCell<String>,
    /// The virtual media devices, found once.
    media: OnceCell<MediaDevices>,
}

impl fmt::Debug for RedfishBmc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedfishBmc")
            .field("client", &self.client)
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl RedfishBmc {
    /// A driver for `config`; `endpoint` hands out the shared endpoint for a base URL and
    /// TLS policy.
    pub(crate) fn new(
        node: &str,
        config: &ObmConfig,
        endpoint: impl FnOnce(&str, &Trust) -> Result<Arc<RedfishEndpoint>, String>,
    ) -> Result<Self> {
        let config_err = |message: String| Error::Config {
            node: node.to_owned(),
            service: REDFISH_SERVICE.to_owned(),
            message,
        };
        let base = links::base_url(&config.host, config.port).map_err(config_err)?;
        let system = links::system_ref(config.system_id.as_deref()).map_err(config_err)?;
        let trust = Trust::of(config);
        let ep = endpoint(base.as_str(), &trust)
            .map_err(|e| config_err(format!("cannot build the HTTP client: {e}")))?;
        let session_auth = config
            .extra
            .get("auth")
            .and_then(Value::as_str)
            .is_some_and(|a| a.eq_ignore_ascii_case("session"));
        Ok(Self {
            client: Client::new(
                node,
                base,
                ep,
                config.user.clone().filter(|u| !u.is_empty()),
                config.password.clone().unwrap_or_default(),
                session_auth,
            ),
            system,
            system_path: OnceCell::new(),
            media: OnceCell::new(),
        })
    }

    /// The same service and credentials, aimed at another ComputerSystem: `path` is a
    /// link the service listed (see [`Self::systems`]).
    pub fn for_system(&self, path: &str) -> RedfishBmc {
        RedfishBmc {
            client: self.client.clone(),
            system: SystemRef::Link(path.to_owned()),
            system_path: OnceCell::new(),
            media: OnceCell::new(),
        }
    }

    /// The base URL as messages show it.
    pub fn base_url(&self) -> String {
        self.client.base_url()
    }

    fn at(&self, operation: &str) -> At {
        self.client.at(operation)
    }

    async fn get(&self, op: &str, target: &str) -> Result<Reply> {
        self.client.get(op, target).await
    }

    /// The Systems collection's path.
    async fn systems_path(&self, op: &str) -> Result<String> {
        let root = self.client.service_root(op).await?;
        Ok(odata_id(root.get("Systems")).unwrap_or_else(|| "/redfish/v1/Systems".to_owned()))
    }

    /// The paths of every ComputerSystem the service has.
    pub async fn systems(&self) -> Result<Vec<String>> {
        self.systems_for("list systems").await
    }

    /// [`Self::systems`], with errors naming the operation that needed the list.
    async fn systems_for(&self, op: &str) -> Result<Vec<String>> {
        let path = self.systems_path(op).await?;
        let coll = self.get(op, &path).await?;
        Ok(members(&coll.body))
    }

    /// The ComputerSystem's path, resolved once from `systemId`.
    async fn system_path(&self, op: &str) -> Result<&str> {
        self.system_path
            .get_or_try_init(|| self.resolve_system(op))
            .await
            .map(String::as_str)
    }

    async fn resolve_system(&self, op: &str) -> Result<String> {
        let canonical = |reply: &Reply| {
            odata_id(Some(&reply.body)).unwrap_or_else(|| reply.url.path().to_owned())
        };
        match &self.system {
            SystemRef::Link(link) => {
                let reply = self.get(op, link).await?;
                Ok(canonical(&reply))
            }
            SystemRef::Id(id) => {
                let systems = self.systems_path(op).await?;
                let mut url = self.client.resolve(op, &systems)?;
                if let Ok(mut segs) = url.path_segments_mut() {
                    segs.pop_if_empty().push(id);
                }
                // sushy answers a system's name with a redirect to its id, which the
                // client follows (within the BMC's origin only); other BMCs only know the
                // id, so on 404 match by name or UUID.
                match self.get(op, url.as_str()).await {
                    Ok(reply) => Ok(canonical(&reply)),
                    Err(Error::Http { status: 404, .. }) => {
                        self.find_system(op, &systems, id).await
                    }
                    Err(e) => Err(e),
                }
            }
            SystemRef::Only => {
                let all = self.systems_for(op).await?;
                match all.as_slice() {
                    [one] => Ok(one.clone()),
                    [] => Err(Error::Bmc {
                        at: self.at(op),
                        message: "the service has no ComputerSystem".to_owned(),
                    }),
                    many => Err(Error::Bmc {
                        at: self.at(op),
                        message: format!(
                            "the service has {} ComputerSystems ({}); set the OBM's systemId",
                            many.len(),
                            many.join(", ")
                        ),
                    }),
                }
            }
        }
    }

    async fn find_system(&self, op: &str, systems: &str, wanted: &str) -> Result<String> {
        let coll = self.get(op, systems).await?;
        let mut seen = Vec::new();
        for path in members(&coll.body) {
            let Ok(doc) = self.get(op, &path).await else {
                continue;
            };
            let field = |k: &str| doc.body.get(k).and_then(Value::as_str).unwrap_or("");
            if [field("Id"), field("Name"), field("UUID")]
                .iter()
                .any(|v| v.eq_ignore_ascii_case(wanted))
            {
                return Ok(path);
            }
            seen.push(field("Id").to_owned());
        }
        Err(Error::Bmc {
            at: self.at(op),
            message: format!(
                "no ComputerSystem has the id, name or UUID '{wanted}' (found: {})",
                seen.join(", ")
            ),
        })
    }

    /// What the fleet view lists of the system: its id, name, UUID, power state, maker,
    /// model and serial number (one request once the system is resolved).
    pub async fn system_summary(&self) -> Result<super::systems::System> {
        let reply = self.system_doc("read the system").await?;
        let doc = &reply.body;
        let text = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(super::systems::System {
            system_id: text("Id").unwrap_or_default(),
            path: odata_id(Some(doc)).unwrap_or_else(|| reply.url.path().to_owned()),
            name: text("Name").unwrap_or_default(),
            uuid: text("UUID"),
            power_state: text("PowerState").unwrap_or_else(|| "Unknown".to_owned()),
            manufacturer: text("Manufacturer"),
            model: text("Model"),
            serial_number: text("SerialNumber"),
        })
    }

    async fn system_doc(&self, op: &str) -> Result<Reply> {
        let path = self.system_path(op).await?.to_owned();
        self.get(op, &path).await
    }

    async fn do_power_action(&self, action: PowerAction) -> Result<()> {
        let op = action.to_string();
        let sys = self.system_doc(&op).await?;
        let path = self.system_path(&op).await?.to_owned();
        let reset = sys.body.pointer("/Actions/#ComputerSystem.Reset");
        let target = reset
            .and_then(|a| a.get("target"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!(
                    "{}/Actions/ComputerSystem.Reset",
                    path.trim_end_matches('/')
                )
            });
        let allowed: Option<Vec<&str>> = reset
            .and_then(|a| a.get("ResetType@Redfish.AllowableValues"))
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect());
        let preferred: &[&str] = match action {
            PowerAction::On => &["On", "ForceOn"],
            PowerAction::Off => &["ForceOff"],
            PowerAction::SoftOff => &["GracefulShutdown"],
            PowerAction::Reboot => &["ForceRestart", "GracefulRestart", "PowerCycle"],
            PowerAction::Reset => &["ForceRestart", "PowerCycle"],
        };
        let reset_type = match &allowed {
            None => preferred[0],
            Some(allowed) => preferred
                .iter()
                .copied()
                .find(|p| allowed.contains(p))
                .ok_or_else(|| Error::Unsupported {
                    at: self.at(&op),
                    message: format!(
                        "the BMC allows ResetType {} but {op} needs one of {}",
                        allowed.join(", "),
                        preferred.join(", ")
                    ),
                })?,
        };
        let body = json!({ "ResetType": reset_type });
        self.client
            .send(Request::new(&op, Method::POST, &target).body(&body))
            .await
            .map(drop)
    }

    async fn do_set_boot(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> Result<()> {
        let op = "set boot device";
        let path = self.system_path(op).await?.to_owned();
        let mut boot = Map::new();
        let target = match device {
            BootDevice::Pxe => "Pxe",
            BootDevice::Cd => "Cd",
            BootDevice::Hdd => "Hdd",
            BootDevice::Bios => "BiosSetup",
        };
        boot.insert("BootSourceOverrideTarget".into(), target.into());
        boot.insert(
            "BootSourceOverrideEnabled".into(),
            if persistent { "Continuous" } else { "Once" }.into(),
        );
        if let Some(uefi) = uefi {
            boot.insert(
                "BootSourceOverrideMode".into(),
                if uefi { "UEFI" } else { "Legacy" }.into(),
            );
        }
        let body = json!({ "Boot": boot });
        let patch = || Request::new(op, Method::PATCH, &path).body(&body);
        match self.client.send(patch()).await {
            // Some BMCs (iLO, iDRAC) insist on the resource's ETag: read it and try again.
            Err(Error::Http {
                status: 412 | 428, ..
            }) => {
                let doc = self.get(op, &path).await?;
                let mut headers = HeaderMap::new();
                let etag = doc.headers.get(ETAG).cloned().or_else(|| {
                    doc.body
                        .get("@odata.etag")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse().ok())
                });
                if let Some(etag) = etag {
                    headers.insert(IF_MATCH, etag);
                }
                self.client.send(patch().headers(headers)).await.map(drop)
            }
            other => other.map(drop),
        }
    }

    async fn do_boot_override(&self) -> Result<BootOverride> {
        let sys = self.system_doc("read boot override").await?;
        let boot = sys.body.get("Boot").cloned().unwrap_or(Value::Null);
        let field = |k: &str| boot.get(k).and_then(Value::as_str).unwrap_or("");
        let raw = field("BootSourceOverrideTarget").to_owned();
        let enabled = field("BootSourceOverrideEnabled");
        let device = if enabled == "Disabled" {
            None
        } else {
            match raw.as_str() {
                "Pxe" => Some(BootDevice::Pxe),
                "Cd" => Some(BootDevice::Cd),
                "Hdd" => Some(BootDevice::Hdd),
                "BiosSetup" => Some(BootDevice::Bios),
                _ => None,
            }
        };
        Ok(BootOverride {
            device,
            persistent: match enabled {
                "Continuous" => Some(true),
                "Once" => Some(false),
                _ => None,
            },
            uefi: match field("BootSourceOverrideMode") {
                "UEFI" => Some(true),
                "Legacy" => Some(false),
                _ => None,
            },
            raw,
        })
    }

    /// The virtual media devices: the members of the VirtualMedia collections linked from
    /// the System and from its Managers, each with its `MediaTypes`.
    async fn media_devices(&self, op: &str) -> Result<&MediaDevices> {
        self.media
            .get_or_try_init(|| async {
                let sys = self.system_doc(op).await?;
                let mut collections: Vec<String> = Vec::new();
                collections.extend(odata_id(sys.body.get("VirtualMedia")));
                for manager in links(sys.body.pointer("/Links/ManagedBy")) {
                    if let Ok(m) = self.get(op, &manager).await
                        && let Some(p) = odata_id(m.body.get("VirtualMedia"))
                        && !collections.contains(&p)
                    {
                        collections.push(p);
                    }
                }
                let mut devices = Vec::new();
                for coll in &collections {
                    let Ok(c) = self.get(op, coll).await else {
                        continue;
                    };
                    for member in members(&c.body) {
                        let Ok(m) = self.get(op, &member).await else {
                            continue;
                        };
                        let id = m.body.get("Id").and_then(Value::as_str).unwrap_or("");
                        let types = m.body.get("MediaTypes").and_then(Value::as_array);
                        devices.push(MediaDevice {
                            id: id.to_owned(),
                            types: types
                                .into_iter()
                                .flatten()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect(),
                            path: member,
                        });
                    }
                }
                Ok(MediaDevices::new(collections, devices))
            })
            .await
    }

    /// The path of the device `slot` names (see [`MediaSlot`]).
    async fn media_path(&self, op: &str, slot: MediaSlot) -> Result<String> {
        let devices = self.media_devices(op).await?;
        devices.path(slot).map_err(|message| Error::Unsupported {
            at: self.at(op),
            message,
        })
    }

    async fn do_media_insert(&self, slot: MediaSlot, image: String) -> Result<()> {
        let op = format!("insert virtual media ({slot})");
        let path = self.media_path(&op, slot).await?;
        let doc = self.get(&op, &path).await?;
        let body = json!({ "Image": image, "Inserted": true, "WriteProtected": true });
        let target = action_target(&doc.body, "#VirtualMedia.InsertMedia");
        let request = match &target {
            Some(target) => Request::new(&op, Method::POST, target),
            // Before Redfish 2017.1 media was inserted by patching the resource.
            None => Request::new(&op, Method::PATCH, &path),
        };
        // BMCs download the whole image before they answer.
        self.client.send(request.body(&body).slow()).await.map(drop)
    }

    async fn do_media_eject(&self, slot: MediaSlot) -> Result<()> {
        let op = format!("eject virtual media ({slot})");
        let path = self.media_path(&op, slot).await?;
        let doc = self.get(&op, &path).await?;
        let target = action_target(&doc.body, "#VirtualMedia.EjectMedia");
        let (request, body) = match &target {
            Some(target) => (Request::new(&op, Method::POST, target), json!({})),
            None => (
                Request::new(&op, Method::PATCH, &path),
                json!({ "Image": null, "Inserted": false }),
            ),
        };
        self.client.send(request.body(&body)).await.map(drop)
    }

    async fn do_media_status(&self, slot: MediaSlot) -> Result<MediaStatus> {
        let op = format!("read virtual media ({slot})");
        let path = self.media_path(&op, slot).await?;
        let doc = self.get(&op, &path).await?.body;
        let image = doc
            .get("Image")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let inserted = doc
            .get("Inserted")
            .and_then(Value::as_bool)
            .unwrap_or(image.is_some());
        Ok(MediaStatus {
            inserted,
            image: if inserted { image } else { None },
        })
    }

    async fn do_inventory(&self) -> Result<Value> {
        let op = "read inventory";
        let sys = self.system_doc(op).await?.body;
        let mut errors = Vec::new();
        let mut out = Map::new();
        let mut macs = Vec::new();
        for (key, link) in [
            ("processors", "Processors"),
            ("memory", "Memory"),
            ("ethernetInterfaces", "EthernetInterfaces"),
            ("simpleStorage", "SimpleStorage"),
            ("storage", "Storage"),
        ] {
            let Some(path) = odata_id(sys.get(link)) else {
                continue;
            };
            let docs = self.collection(op, &path, &mut errors).await;
            if key == "ethernetInterfaces" {
                for nic in &docs {
                    for k in ["MACAddress", "PermanentMACAddress"] {
                        if let Some(mac) = nic.get(k).and_then(Value::as_str) {
                            let mac = normalize_identifier(mac);
                            if !mac.is_empty() && !macs.contains(&mac) {
                                macs.push(mac);
                            }
                        }
                    }
                }
            }
            out.insert(key.to_owned(), Value::Array(docs));
        }
        let mut managers = Vec::new();
        for path in links(sys.pointer("/Links/ManagedBy")) {
            match self.get(op, &path).await {
                Ok(m) => managers.push(m.body),
                Err(e) => errors.push(json!({ "resource": path, "error": e.to_string() })),
            }
        }
        let mut chassis = Vec::new();
        for path in links(sys.pointer("/Links/Chassis")) {
            match self.get(op, &path).await {
                Ok(c) => chassis.push(c.body),
                Err(e) => errors.push(json!({ "resource": path, "error": e.to_string() })),
            }
        }
        let summary = |k: &str| sys.get(k).cloned().unwrap_or(Value::Null);
        let mut doc = Map::new();
        doc.insert("id".into(), summary("Id"));
        doc.insert("name".into(), summary("Name"));
        doc.insert("uuid".into(), summary("UUID"));
        doc.insert("macs".into(), json!(macs));
        doc.insert("processorSummary".into(), summary("ProcessorSummary"));
        doc.insert("memorySummary".into(), summary("MemorySummary"));
        doc.insert("system".into(), sys.clone());
        doc.extend(out);
        doc.insert("managers".into(), Value::Array(managers));
        doc.insert("chassis".into(), Value::Array(chassis));
        doc.insert("errors".into(), Value::Array(errors));
        Ok(Value::Object(doc))
    }

    /// The members of a collection, each read in full; what fails is recorded in
    /// `errors` instead, since BMCs often advertise links they cannot serve.
    async fn collection(&self, op: &str, path: &str, errors: &mut Vec<Value>) -> Vec<Value> {
        let coll = match self.get(op, path).await {
            Ok(c) => c.body,
            Err(e) => {
                errors.push(json!({ "resource": path, "error": e.to_string() }));
                return Vec::new();
            }
        };
        let mut docs = Vec::new();
        for member in members(&coll).into_iter().take(MAX_MEMBERS) {
            match self.get(op, &member).await {
                Ok(m) => docs.push(m.body),
                Err(e) => errors.push(json!({ "resource": member, "error": e.to_string() })),
            }
        }
        docs
    }
}

/// One virtual media device of a BMC.
#[derive(Debug, Clone)]
struct MediaDevice {
    /// Its `@odata.id`.
    path: String,
    /// Its `Id`, for messages.
    id: String,
    /// Its `MediaTypes` (`CD`, `DVD`, `USBStick`, `Floppy`, ...).
    types: Vec<String>,
}

impl MediaDevice {
    fn takes(&self, wanted: &[&str]) -> bool {
        self.types
            .iter()
            .any(|t| wanted.iter().any(|w| t.eq_ignore_ascii_case(w)))
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.id, self.types.join(", "))
    }
}

/// A System's virtual media devices and which of them each [`MediaSlot`] names.
#[derive(Debug)]
struct MediaDevices {
    collections: Vec<String>,
    devices: Vec<MediaDevice>,
    /// The CD/DVD drive an OS boots from: the first device that takes CD or DVD media or,
    /// failing that, whose id looks like a CD drive.
    primary: Option<usize>,
    /// Another device that takes an ISO image: a second CD/DVD drive, else the first that
    /// takes a USB stick image.
    secondary: Option<usize>,
}

impl MediaDevices {
    fn new(collections: Vec<String>, devices: Vec<MediaDevice>) -> Self {
        const OPTICAL: &[&str] = &["CD", "DVD"];
        let primary = devices.iter().position(|d| d.takes(OPTICAL)).or_else(|| {
            devices
                .iter()
                .position(|d| d.id.to_ascii_lowercase().starts_with("cd"))
        });
        let other = |wanted: &[&str]| {
            (0..devices.len()).find(|&i| Some(i) != primary && devices[i].takes(wanted))
        };
        let secondary = other(OPTICAL).or_else(|| other(&["USBStick"]));
        MediaDevices {
            collections,
            devices,
            primary,
            secondary,
        }
    }

    /// The path of the device `slot` names, or why there is none.
    fn path(&self, slot: MediaSlot) -> Result<String, String> {
        let found = match slot {
            MediaSlot::Primary => self.primary,
            MediaSlot::Secondary => self.secondary,
        };
        if let Some(i) = found {
            return Ok(self.devices[i].path.clone());
        }
        if self.collections.is_empty() {
            return Err("neither the System nor its Managers link to VirtualMedia".to_owned());
        }
        let all: Vec<String> = self.devices.iter().map(MediaDevice::describe).collect();
        let has = if all.is_empty() {
            format!("no device in {}", self.collections.join(", "))
        } else {
            format!("only {}", all.join(", "))
        };
        Err(match slot {
            MediaSlot::Primary => format!("no virtual CD/DVD drive: the BMC has {has}"),
            MediaSlot::Secondary => format!(
                "no second virtual media device for an ISO image (one besides the CD/DVD \
                 drive that takes CD, DVD or USBStick media): the BMC has {has}"
            ),
        })
    }
}

impl Bmc for RedfishBmc {
    fn endpoint(&self) -> String {
        self.base_url()
    }

    fn power_state(&self) -> BoxFuture<'_, Result<PowerState>> {
        Box::pin(async move {
            let sys = self.system_doc("read power state").await?;
            Ok(match sys.body.get("PowerState").and_then(Value::as_str) {
                Some("On") => PowerState::On,
                Some("Off") => PowerState::Off,
                Some(other) => PowerState::Unknown(other.to_owned()),
                None => PowerState::Unknown(String::new()),
            })
        })
    }

    fn power_action(&self, action: PowerAction) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_power_action(action))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_set_boot(device, persistent, uefi))
    }

    fn boot_override(&self) -> BoxFuture<'_, Result<BootOverride>> {
        Box::pin(self.do_boot_override())
    }

    fn virtual_media_insert(&self, slot: MediaSlot, image: String) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_media_insert(slot, image))
    }

    fn virtual_media_eject(&self, slot: MediaSlot) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_media_eject(slot))
    }

    fn virtual_media_status(&self, slot: MediaSlot) -> BoxFuture<'_, Result<MediaStatus>> {
        Box::pin(self.do_media_status(slot))
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Value>> {
        Box::pin(self.do_inventory())
    }

    fn clear_sel(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        self.ipmi_only("clear SEL", "clears a BMC's SEL")
    }

    fn reset_controller_cold(&self) -> BoxFuture<'_, Result<()>> {
        self.ipmi_only("cold reset", "cold-resets a BMC")
    }
}

impl RedfishBmc {
    /// The answer to an operation metalgraph performs only over IPMI. Redfish has it
    /// (`LogService.ClearLog`, `Manager.Reset`), but the Redfish BMC the tests run against
    /// (sushy-tools) implements neither, so metalgraph does not send what it cannot test.
    /// No request is made.
    fn ipmi_only<T: Send + 'static>(&self, op: &str, does: &str) -> BoxFuture<'_, Result<T>> {
        let err = Error::Unsupported {
            at: self.at(op),
            message: format!(
                "metalgraph {does} only over IPMI, as RackHD's ipmi-obm-service did; give the \
                 node an ipmi-obm-service OBM for its BMC"
            ),
        };
        Box::pin(async move { Err(err) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(list: &[(&str, &[&str])]) -> MediaDevices {
        MediaDevices::new(
            vec!["/redfish/v1/Systems/1/VirtualMedia".to_owned()],
            list.iter()
                .map(|(id, types)| MediaDevice {
                    path: format!("/redfish/v1/Systems/1/VirtualMedia/{id}"),
                    id: (*id).to_owned(),
                    types: types.iter().map(|t| (*t).to_owned()).collect(),
                })
                .collect(),
        )
    }

    fn check(list: &[(&str, &[&str])], primary: Option<&str>, secondary: Option<&str>) {
        let d = devices(list);
        let id = |slot| {
            d.path(slot)
                .ok()
                .map(|p| p.rsplit('/').next().unwrap().to_owned())
        };
        assert_eq!(id(MediaSlot::Primary).as_deref(), primary, "{list:?}");
        assert_eq!(id(MediaSlot::Secondary).as_deref(), secondary, "{list:?}");
    }

    #[test]
    fn slots_are_picked_by_media_type() {
        // sushy-tools: a CD drive and a "Floppy" that takes USB stick images.
        check(
            &[("Cd", &["CD", "DVD"]), ("Floppy", &["Floppy", "USBStick"])],
            Some("Cd"),
            Some("Floppy"),
        );
        // Listed in another order, with a second CD drive: CD drives come first.
        check(
            &[("Usb", &["USBStick"]), ("CD1", &["DVD"]), ("CD2", &["CD"])],
            Some("CD1"),
            Some("CD2"),
        );
        // iDRAC: CD and RemovableDisk.
        check(
            &[("CD", &["CD", "DVD"]), ("RemovableDisk", &["USBStick"])],
            Some("CD"),
            Some("RemovableDisk"),
        );
        // A CD drive that does not say what it takes is still found by its id.
        check(
            &[("Cd", &[]), ("Usb", &["USBStick"])],
            Some("Cd"),
            Some("Usb"),
        );
        // A floppy-only device cannot hold an ISO image; one device is not two.
        check(
            &[("Cd", &["CD"]), ("Floppy", &["Floppy"])],
            Some("Cd"),
            None,
        );
        check(&[("Cd", &["CD", "DVD"])], Some("Cd"), None);
    }

    #[test]
    fn a_missing_slot_is_explained() {
        let d = devices(&[("Cd", &["CD", "DVD"])]);
        let e = d.path(MediaSlot::Secondary).unwrap_err();
        assert!(
            e.contains("no second virtual media device") && e.contains("only Cd (CD, DVD)"),
            "{e}"
        );
        let e = devices(&[]).path(MediaSlot::Primary).unwrap_err();
        assert!(
            e.contains("no virtual CD/DVD drive") && e.contains("no device in"),
            "{e}"
        );
        let none = MediaDevices::new(Vec::new(), Vec::new());
        assert!(
            none.path(MediaSlot::Primary)
                .unwrap_err()
                .contains("link to VirtualMedia")
        );
    }
}
