//! Nodes (the servers metalgraph manages), their OBM settings and catalogs, kept in the
//! store.
//!
//! OBM passwords are write-only: they are stored and handed to jobs, but every view meant
//! for the outside world ([`Node::public`]) leaves them out, and `Debug` never prints them.

use std::sync::Arc;

use metalgraph_store::{Batch, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::now_rfc3339;
use crate::keys;

/// A secret string: serialised as-is (the store must keep it), but never shown by `Debug`
/// and left out of every public view.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How a node's BMC is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Obm {
    /// `redfish-obm-service`, `ipmi-obm-service` or `sim-obm-service`.
    pub service: String,
    #[serde(default)]
    pub config: ObmConfig,
}

/// An OBM's settings. `host` may be a full base URL for Redfish.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObmConfig {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Write-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    #[serde(default, rename = "verifySSL", skip_serializing_if = "Option::is_none")]
    pub verify_ssl: Option<bool>,
    /// Driver-specific settings (`cipherSuite` for IPMI, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A managed server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// MAC addresses (lower case, colon separated) and other identifiers.
    #[serde(default)]
    pub identifiers: Vec<String>,
    #[serde(default = "default_type", rename = "type")]
    pub node_type: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub obms: Vec<Obm>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
}

fn default_type() -> String {
    "compute".to_owned()
}

impl Node {
    /// The node as the outside world may see it: OBM passwords replaced by
    /// `passwordSet: true`.
    pub fn public(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(obms) = v.get_mut("obms").and_then(Value::as_array_mut) {
            for obm in obms {
                redact_obm(obm);
            }
        }
        v
    }

    /// What templates may see of the node: never a secret.
    pub fn template_view(&self) -> Value {
        let obm_host = self.obms.first().map(|o| o.config.host.clone());
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "macs": self.identifiers.iter().filter(|i| looks_like_mac(i)).collect::<Vec<_>>(),
            "identifiers": self.identifiers,
            "type": self.node_type,
            "tags": self.tags,
            "obmHost": obm_host,
            "obmService": self.obms.first().map(|o| o.service.clone()),
        })
    }

    /// The first OBM, which drivers use.
    pub fn obm(&self) -> Option<&Obm> {
        self.obms.first()
    }
}

/// Replaces a serialised OBM's password by `passwordSet`.
pub fn redact_obm(obm: &mut Value) {
    if let Some(cfg) = obm.get_mut("config").and_then(Value::as_object_mut) {
        let had = cfg.remove("password").is_some_and(|p| !p.is_null());
        cfg.insert("passwordSet".to_owned(), Value::Bool(had));
    }
}

/// Whether an identifier looks like a MAC address.
pub fn looks_like_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Normalises a MAC-like identifier to lower case with colons; other identifiers unchanged.
pub fn normalize_identifier(s: &str) -> String {
    let t = s.trim().replace('-', ":").to_ascii_lowercase();
    if looks_like_mac(&t) {
        t
    } else {
        s.trim().to_owned()
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node {0} not found")]
    NotFound(String),
    #[error("node {id}: identifier {identifier} already belongs to node {other}")]
    IdentifierTaken {
        id: String,
        identifier: String,
        other: String,
    },
    #[error("node {0} already exists")]
    Exists(String),
    #[error("node {id} is running workflow {workflow}; cancel it first")]
    Busy { id: String, workflow: String },
    #[error("node {0} was changed concurrently; try again")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] metalgraph_store::Error),
    #[error("stored node {0} is unreadable: {1}")]
    Corrupt(String, String),
}

/// The node store.
#[derive(Clone)]
pub struct Nodes {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nodes")
    }
}

impl Nodes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    fn read(&self, id: &str) -> Result<Option<(Node, Vec<u8>)>, Error> {
        match self.store.get(keys::NODES, id.as_bytes())? {
            None => Ok(None),
            Some(raw) => {
                let node = serde_json::from_slice(&raw)
                    .map_err(|e| Error::Corrupt(id.to_owned(), e.to_string()))?;
                Ok(Some((node, raw)))
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Node>, Error> {
        Ok(self.read(id)?.map(|(n, _)| n))
    }

    pub fn list(&self) -> Result<Vec<Node>, Error> {
        self.store
            .scan_prefix(keys::NODES, b"")?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v).map_err(|e| {
                    Error::Corrupt(String::from_utf8_lossy(&k).into_owned(), e.to_string())
                })
            })
            .collect()
    }

    /// The node that owns an identifier (a MAC), if any.
    pub fn by_identifier(&self, identifier: &str) -> Result<Option<Node>, Error> {
        let ident = normalize_identifier(identifier);
        match self.store.get(keys::NODE_IDENTS, ident.as_bytes())? {
            None => Ok(None),
            Some(id) => self.get(&String::from_utf8_lossy(&id)),
        }
    }

    /// Creates a node. Its identifiers must not belong to another node.
    pub fn create(&self, mut node: Node) -> Result<Node, Error> {
        if node.id.is_empty() {
            node.id = crate::new_id();
        }
        node.identifiers = node
            .identifiers
            .iter()
            .map(|i| normalize_identifier(i))
            .collect();
        node.identifiers.dedup();
        let now = now_rfc3339();
        node.created_at = now.clone();
        node.updated_at = now;
        let mut batch = Batch::new();
        batch.require_absent(keys::NODES, node.id.as_bytes());
        self.index_identifiers(&mut batch, &node, &[])?;
        batch.put(keys::NODES, node.id.as_bytes(), encode(&node));
        match self.store.commit(batch) {
            Ok(()) => Ok(node),
            Err(metalgraph_store::Error::Conflict { index: 0, .. }) => {
                Err(Error::Exists(node.id.clone()))
            }
            Err(metalgraph_store::Error::Conflict { .. }) => Err(Error::Conflict(node.id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a node (optimistically: fails with `Conflict` if it changed meanwhile).
    /// `update` receives the stored node and changes it in place.
    pub fn update(&self, id: &str, update: impl FnOnce(&mut Node)) -> Result<Node, Error> {
        let (old, raw) = self
            .read(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let mut node = old.clone();
        update(&mut node);
        node.id = old.id.clone();
        node.created_at = old.created_at.clone();
        node.updated_at = now_rfc3339();
        node.identifiers = node
            .identifiers
            .iter()
            .map(|i| normalize_identifier(i))
            .collect();
        node.identifiers.dedup();
        let mut batch = Batch::new();
        batch.require_equals(keys::NODES, id.as_bytes(), raw);
        self.index_identifiers(&mut batch, &node, &old.identifiers)?;
        batch.put(keys::NODES, id.as_bytes(), encode(&node));
        match self.store.commit(batch) {
            Ok(()) => Ok(node),
            Err(metalgraph_store::Error::Conflict { .. }) => Err(Error::Conflict(id.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a node with its catalogs. Refused while a workflow runs on it.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        let (node, raw) = self
            .read(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if let Some(wf) = self.store.get(keys::NODE_LOCKS, id.as_bytes())? {
            return Err(Error::Busy {
                id: id.to_owned(),
                workflow: String::from_utf8_lossy(&wf).into_owned(),
            });
        }
        let mut batch = Batch::new();
        batch.require_equals(keys::NODES, id.as_bytes(), raw);
        batch.require_absent(keys::NODE_LOCKS, id.as_bytes());
        for ident in &node.identifiers {
            batch.delete(keys::NODE_IDENTS, ident.as_bytes());
        }
        for (k, _) in self
            .store
            .scan_prefix(keys::CATALOGS, &catalog_prefix(id))?
        {
            batch.delete(keys::CATALOGS, k);
        }
        batch.delete(keys::NODES, id.as_bytes());
        match self.store.commit(batch) {
            Ok(()) => Ok(()),
            Err(metalgraph_store::Error::Conflict { index: 1, .. }) => Err(Error::Busy {
                id: id.to_owned(),
                workflow: "(just started)".to_owned(),
            }),
            Err(metalgraph_store::Error::Conflict { .. }) => Err(Error::Conflict(id.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    fn index_identifiers(
        &self,
        batch: &mut Batch,
        node: &Node,
        old: &[String],
    ) -> Result<(), Error> {
        for ident in old.iter().filter(|i| !node.identifiers.contains(i)) {
            batch.delete(keys::NODE_IDENTS, ident.as_bytes());
        }
        for ident in node.identifiers.iter().filter(|i| !old.contains(i)) {
            if let Some(other) = self.store.get(keys::NODE_IDENTS, ident.as_bytes())? {
                let other = String::from_utf8_lossy(&other).into_owned();
                if other != node.id {
                    return Err(Error::IdentifierTaken {
                        id: node.id.clone(),
                        identifier: ident.clone(),
                        other,
                    });
                }
            }
            batch.require_absent(keys::NODE_IDENTS, ident.as_bytes());
            batch.put(
                keys::NODE_IDENTS,
                ident.as_bytes(),
                node.id.as_bytes().to_vec(),
            );
        }
        Ok(())
    }

    /// Stores one catalog (inventory document) of a node under `source`.
    pub fn put_catalog(&self, id: &str, source: &str, data: &Value) -> Result<(), Error> {
        if self.get(id)?.is_none() {
            return Err(Error::NotFound(id.to_owned()));
        }
        let record = serde_json::json!({
            "node": id,
            "source": source,
            "data": data,
            "updatedAt": now_rfc3339(),
        });
        let mut key = catalog_prefix(id);
        key.extend_from_slice(source.as_bytes());
        let mut batch = Batch::new();
        batch.put(
            keys::CATALOGS,
            key,
            serde_json::to_vec(&record).unwrap_or_default(),
        );
        self.store.commit(batch)?;
        Ok(())
    }

    /// Every catalog of a node, ordered by source.
    pub fn catalogs(&self, id: &str) -> Result<Vec<Value>, Error> {
        Ok(self
            .store
            .scan_prefix(keys::CATALOGS, &catalog_prefix(id))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// The workflow running on a node, if any.
    pub fn active_workflow(&self, id: &str) -> Result<Option<String>, Error> {
        Ok(self
            .store
            .get(keys::NODE_LOCKS, id.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

fn catalog_prefix(id: &str) -> Vec<u8> {
    let mut p = id.as_bytes().to_vec();
    p.push(b'/');
    p
}

fn encode(node: &Node) -> Vec<u8> {
    serde_json::to_vec(node).unwrap_or_default()
}
