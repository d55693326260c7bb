//! `discovery.redfish`: walks a Redfish service's Systems and, for each ComputerSystem,
//! creates or updates a node with its OBM settings and `redfish` catalog.
//!
//! Nodes are matched by the system's UUID and MACs (node identifiers), so running
//! discovery again updates the same nodes instead of creating duplicates. The `password`
//! option is stored in the OBMs it writes and appears nowhere else: not in the output, not
//! in errors, not in logs.

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::nodes::{self, Node, Nodes, Obm, ObmConfig, Secret};
use metalgraph_engine::{Error as EngineError, Job, JobError, OptionKind, OptionSchema};
use serde_json::{Map, Value, json};

use super::catalog::{SOURCE, summary};
use super::until_cancelled;
use crate::bmc::{Bmc, Drivers, REDFISH_SERVICE, RedfishBmc};
use metalgraph_engine::endpoints::{Endpoint, Service};

/// How the discovering "node" is named in driver messages, since there is none yet.
const DISCOVERY: &str = "(discovery)";

/// How often a node update is tried again when another writer changed the node meanwhile.
const UPDATE_ATTEMPTS: usize = 3;

/// Discovers the ComputerSystems behind a Redfish service as nodes.
pub struct DiscoveryRedfishJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for DiscoveryRedfishJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryRedfishJob")
    }
}

impl DiscoveryRedfishJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "uri",
                    OptionKind::String,
                    "the Redfish service's base URL (https://bmc.example:8443)",
                )
                .optional("username", OptionKind::String, None, "the BMC user")
                .optional(
                    "password",
                    OptionKind::String,
                    None,
                    "the BMC password; stored in the nodes' OBMs, shown nowhere",
                )
                .optional(
                    "verifySSL",
                    OptionKind::Bool,
                    Some(Value::Bool(true)),
                    "whether to verify the BMC's TLS certificate",
                )
                .optional(
                    "caCert",
                    OptionKind::String,
                    None,
                    "the CA certificate (PEM) that signed the BMC's certificate; stored in the nodes' OBMs",
                )
                .secret("password"),
            drivers,
        }
    }
}

impl Job for DiscoveryRedfishJob {
    fn name(&self) -> &'static str {
        "discovery.redfish"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let prepared = (|| {
            let uri = ctx.str_required("uri")?.to_owned();
            let config = ObmConfig {
                host: uri,
                user: ctx.str_opt("username").map(str::to_owned),
                password: ctx.str_opt("password").map(|p| Secret(p.to_owned())),
                verify_ssl: Some(ctx.bool_or("verifySSL", true)),
                ca_cert: ctx.str_opt("caCert").map(str::to_owned),
                ..ObmConfig::default()
            };
            let service = self
                .drivers
                .redfish(DISCOVERY, &config)
                .map_err(|e| JobError::new(e.to_string()))?;
            Ok::<_, JobError>((service, config))
        })();
        Box::pin(async move {
            let (service, mut config) = prepared?;
            // The OBM keeps the normalised base URL: the given one may carry credentials,
            // and the host is visible to templates and the API.
            config.host = service.base_url();
            let what = format!("discovery of {}", service.base_url());
            let nodes = ctx.services.nodes().clone();
            until_cancelled(&ctx.cancel, || what, discover(service, config, nodes)).await
        })
    }
}

/// Discovers the systems behind a registered endpoint (`/api/2.0/endpoints`): a node per
/// ComputerSystem of a Redfish service, or one node for an IPMI BMC, each with an OBM that
/// refers to the endpoint rather than copying its credentials.
pub struct DiscoveryEndpointJob {
    schema: OptionSchema,
    drivers: Arc<Drivers>,
}

impl std::fmt::Debug for DiscoveryEndpointJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryEndpointJob")
    }
}

impl DiscoveryEndpointJob {
    pub fn new(drivers: Arc<Drivers>) -> Self {
        Self {
            schema: OptionSchema::new().required(
                "endpoint",
                OptionKind::String,
                "the registered endpoint's id",
            ),
            drivers,
        }
    }
}

impl Job for DiscoveryEndpointJob {
    fn name(&self) -> &'static str {
        "discovery.endpoint"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let drivers = self.drivers.clone();
        Box::pin(async move {
            let id = ctx.str_required("endpoint")?.to_owned();
            let nodes = ctx.services.nodes().clone();
            let ep = nodes
                .endpoints()
                .require(&id)
                .await
                .map_err(|e| JobError::new(e.to_string()))?;
            let what = format!("discovery of endpoint {} ({})", ep.name, ep.url);
            let result = until_cancelled(&ctx.cancel, || what, async {
                let own = ObmConfig {
                    endpoint: Some(ep.id.clone()),
                    ..ObmConfig::default()
                };
                match ep.service {
                    Service::Redfish => {
                        let service = drivers
                            .redfish(DISCOVERY, &ep.obm_config(&own))
                            .map_err(|e| JobError::new(e.to_string()))?;
                        discover(service, own, nodes.clone()).await
                    }
                    Service::Ipmi => discover_ipmi(&drivers, &ep, own, &nodes).await,
                }
            })
            .await;
            let seen = result.as_ref().map(|out| {
                out.get("nodes")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            });
            let seen = seen.map_err(|e| e.to_string());
            nodes.endpoints().record_contact(&ep.id, seen).await;
            result
        })
    }
}

/// An IPMI BMC manages one system: its node is found by the identifier
/// `endpoint:{id}` (or created), once the BMC has answered a power status.
async fn discover_ipmi(
    drivers: &Drivers,
    ep: &Endpoint,
    own: ObmConfig,
    nodes: &Nodes,
) -> JobResult {
    let obm = Obm {
        service: ep.service.obm_service().to_owned(),
        config: own,
    };
    let resolved = Obm {
        config: ep.obm_config(&obm.config),
        ..obm.clone()
    };
    let bmc = drivers
        .for_obm(DISCOVERY, &ep.id, &resolved)
        .map_err(|e| JobError::new(e.to_string()))?;
    let power = bmc
        .power_state()
        .await
        .map_err(|e| JobError::new(e.to_string()))?;
    let identifier = format!("endpoint:{}", ep.id);
    let (node, created) = upsert(nodes, &ep.name, &[identifier], obm).await?;
    Ok(json!({
        "nodes": [node.id],
        "systems": [{ "id": node.id, "name": node.name, "created": created, "powerState": power.to_string() }],
    }))
}

async fn discover(service: RedfishBmc, config: ObmConfig, nodes: Nodes) -> JobResult {
    let systems = service
        .systems()
        .await
        .map_err(|e| JobError::new(e.to_string()))?;
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for path in &systems {
        match discover_one(&service.for_system(path), &config, &nodes).await {
            Ok(entry) => found.push(entry),
            Err(e) => {
                tracing::warn!(service = %service.base_url(), system = %path, error = %e, "discovery of a system failed");
                failures.push(format!("{path}: {e}"));
            }
        }
    }
    if !failures.is_empty() {
        return Err(JobError::new(format!(
            "discovery of {}: {} of {} systems failed: {}",
            service.base_url(),
            failures.len(),
            systems.len(),
            failures.join("; ")
        )));
    }
    let ids: Vec<Value> = found.iter().map(|f| f["id"].clone()).collect();
    Ok(json!({ "nodes": ids, "systems": found }))
}

/// Creates or updates the node of one ComputerSystem and stores its catalog.
async fn discover_one(
    bmc: &RedfishBmc,
    config: &ObmConfig,
    nodes: &Nodes,
) -> Result<Value, JobError> {
    let inventory = bmc
        .inventory()
        .await
        .map_err(|e| JobError::new(e.to_string()))?;
    let system_id = inventory
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| JobError::new(format!("the system at {} has no Id", bmc.endpoint())))?
        .to_owned();
    let mut identifiers: Vec<String> = Vec::new();
    if let Some(uuid) = inventory
        .get("uuid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        identifiers.push(uuid.to_ascii_lowercase());
    }
    for mac in inventory
        .get("macs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        identifiers.push(nodes::normalize_identifier(mac));
    }
    let name = inventory
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(&system_id)
        .to_owned();
    let obm = Obm {
        service: REDFISH_SERVICE.to_owned(),
        config: ObmConfig {
            system_id: Some(system_id.clone()),
            extra: Map::new(),
            ..config.clone()
        },
    };
    let (node, created) = upsert(nodes, &name, &identifiers, obm).await?;
    nodes
        .put_catalog(&node.id, SOURCE, &inventory)
        .await
        .map_err(|e| JobError::new(format!("node {}: cannot store the catalog: {e}", node.id)))?;
    let mut entry = summary(&inventory);
    if let Value::Object(m) = &mut entry {
        m.insert("id".into(), Value::from(node.id.clone()));
        m.insert("name".into(), Value::from(node.name.clone()));
        m.insert("created".into(), Value::Bool(created));
    }
    Ok(entry)
}

/// The node owning any of `identifiers`, updated with the OBM and identifiers, or a new
/// node. Returns the node and whether it was created.
async fn upsert(
    nodes: &Nodes,
    name: &str,
    identifiers: &[String],
    obm: Obm,
) -> Result<(Node, bool), JobError> {
    let store_err = |e: EngineError| JobError::new(e.to_string());
    for _ in 0..UPDATE_ATTEMPTS {
        let mut existing = None;
        for ident in identifiers {
            if let Some(n) = nodes.by_identifier(ident).await.map_err(store_err)? {
                existing = Some(n);
                break;
            }
        }
        let creating = existing.is_none();
        let result = match existing {
            Some(node) => {
                let (identifiers, name, obm) = (identifiers.to_vec(), name.to_owned(), obm.clone());
                nodes
                    .update(&node.id, move |n| {
                        for ident in identifiers {
                            if !n.identifiers.contains(&ident) {
                                n.identifiers.push(ident);
                            }
                        }
                        if n.name.is_empty() {
                            n.name = name;
                        }
                        // Replace the node's OBM of this service (the BMC's address or
                        // credentials may have changed) and keep any other OBM it has.
                        match n.obms.iter_mut().find(|o| o.service == obm.service) {
                            Some(o) => *o = obm,
                            None => n.obms.insert(0, obm),
                        }
                        Ok(())
                    })
                    .await
                    .map(|n| (n, false))
            }
            None => nodes
                .create(Node {
                    id: String::new(),
                    name: name.to_owned(),
                    identifiers: identifiers.to_vec(),
                    node_type: "compute".to_owned(),
                    tags: Vec::new(),
                    obms: vec![obm.clone()],
                    created_at: String::new(),
                    updated_at: String::new(),
                })
                .await
                .map(|n| (n, true)),
        };
        match result {
            // Another writer changed the node, or created it (a concurrent discovery)
            // between our lookup and our write: look again.
            Err(EngineError::Conflict(_)) => {}
            Err(EngineError::AlreadyExists(_)) if creating => {}
            other => return other.map_err(store_err),
        }
    }
    Err(JobError::new(format!(
        "node for system {name} kept changing concurrently; run discovery again"
    )))
}
