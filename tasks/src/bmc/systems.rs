//! The systems behind a registered endpoint, read live: every ComputerSystem a Redfish
//! service lists, or the one system an IPMI BMC manages. What the fleet API shows
//! (`GET /api/2.0/endpoints/{id}/systems`, `GET /api/2.0/systems`).

use std::sync::Arc;

use metalgraph_engine::endpoints::{Endpoint, Service};
use metalgraph_engine::nodes::{Obm, ObmConfig};
use serde::Serialize;
use tokio::task::JoinSet;

use super::Drivers;

/// How many systems of one service are read at once (the driver's per-endpoint limit
/// bounds the requests further).
const READ_AT_ONCE: usize = 8;

/// One system as the fleet API lists it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct System {
    /// The ComputerSystem's `Id` (an IPMI BMC's system has none: empty).
    pub system_id: String,
    /// Its `@odata.id` on the service (empty for IPMI).
    pub path: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub power_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
}

/// Every system behind `ep`, in the order the service lists them, or why they could not
/// be read (the message names the service and never a credential).
pub async fn list(drivers: &Drivers, ep: &Endpoint) -> Result<Vec<System>, String> {
    read(drivers, ep).await.map_err(|e| e.to_string())
}

async fn read(drivers: &Drivers, ep: &Endpoint) -> super::Result<Vec<System>> {
    let label = format!("(endpoint {})", ep.name);
    let config = ep.obm_config(&ObmConfig::default());
    match ep.service {
        Service::Redfish => {
            let service = Arc::new(drivers.redfish(&label, &config)?);
            let paths = service.systems().await?;
            let limit = Arc::new(tokio::sync::Semaphore::new(READ_AT_ONCE));
            let mut reads = JoinSet::new();
            for (i, path) in paths.into_iter().enumerate() {
                let (bmc, limit) = (service.for_system(&path), limit.clone());
                reads.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    (i, bmc.system_summary().await)
                });
            }
            let mut found = Vec::new();
            while let Some(done) = reads.join_next().await {
                // A read that panicked is left out; the others are still listed.
                if let Ok((i, summary)) = done {
                    found.push((i, summary?));
                }
            }
            found.sort_by_key(|(i, _)| *i);
            Ok(found.into_iter().map(|(_, s)| s).collect())
        }
        Service::Ipmi => {
            let obm = Obm {
                service: ep.service.obm_service().to_owned(),
                config,
            };
            let bmc = drivers.for_obm(&label, &ep.id, &obm)?;
            let power = bmc.power_state().await?;
            Ok(vec![System {
                name: ep.name.clone(),
                power_state: power.to_string(),
                ..System::default()
            }])
        }
    }
}
