//! Nodes (the servers metalgraph manages), their OBM settings and catalogs, kept in the
//! store.
//!
//! OBM passwords are write-only: they are stored and handed to jobs, but every view meant
//! for the outside world ([`Node::public`]) leaves them out, and `Debug` never prints them.

use std::sync::{Arc, Mutex};

use metalgraph_store::{Batch, Scan, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::now_rfc3339;
use crate::endpoints::Endpoints;
use crate::error::blocking;
use crate::history::{Page, Visit, page_index};
use crate::keys;
use crate::seal::{self, Sealer};

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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Obm {
    /// `redfish-obm-service`, `ipmi-obm-service` or `sim-obm-service`. Another name is
    /// stored (RackHD knows more), and a job that needs the BMC fails naming it.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, example = "redfish-obm-service")
    )]
    pub service: String,
    #[serde(default, deserialize_with = "crate::text::object")]
    pub config: ObmConfig,
}

/// An OBM's settings. `host` may be a full base URL for Redfish.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ObmConfig {
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Write-only: accepted and stored, never shown; views show `passwordSet` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, write_only))]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    #[serde(default, rename = "verifySSL", skip_serializing_if = "Option::is_none")]
    pub verify_ssl: Option<bool>,
    /// Redfish: the CA certificate(s), PEM, that signed the BMC's certificate (a private
    /// CA). When given, the BMC is verified against these alone, not the system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// A registered endpoint (`/api/2.0/endpoints`) whose URL and credentials this OBM
    /// uses, in place of its own `host`, `user` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Driver-specific settings (`cipherSuite` for IPMI, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The largest `caCert` an OBM may carry.
pub const MAX_CA_CERT: usize = 64 * 1024;

/// A managed server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

    /// The rules every stored node keeps, whichever API wrote it: a name; no control
    /// characters in the name, type, identifiers or tags; and OBMs that name a service and whose `systemId` is an id or a path, never a URL (credentials
    /// only ever go to the BMC they were given for).
    pub fn check(&self) -> Result<(), Error> {
        if !self.id.is_empty()
            && let Err(e) = crate::model::check_id(&self.id)
        {
            return Err(Error::Invalid(format!("field 'id' {e}")));
        }
        if self.name.trim().is_empty() {
            return Err(Error::Invalid("field 'name' is required".into()));
        }
        if self.name.len() > 256 {
            return Err(Error::Invalid(
                "field 'name' must be at most 256 bytes".into(),
            ));
        }
        // Names, types, identifiers and tags end up in boot scripts and kickstarts: a line
        // break in one would add lines there. Printing escapes them anyway; refusing them
        // here keeps them out of logs and listings too.
        let fields = [("name", &self.name), ("type", &self.node_type)]
            .into_iter()
            .map(|(f, v)| (f.to_owned(), v))
            .chain(
                self.identifiers
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("identifiers[{i}]"), v)),
            )
            .chain(
                self.tags
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("tags[{i}]"), v)),
            );
        for (field, value) in fields {
            if let Some(c) = value.chars().find(|c| c.is_control()) {
                return Err(Error::Invalid(format!(
                    "field '{field}' must not contain control characters (found U+{:04X})",
                    u32::from(c)
                )));
            }
        }
        for (i, obm) in self.obms.iter().enumerate() {
            if obm.service.trim().is_empty() {
                return Err(Error::Invalid(format!(
                    "field 'obms[{i}].service' must name an OBM service (redfish-obm-service, \
                     ipmi-obm-service, sim-obm-service)"
                )));
            }
            if let Some(pem) = &obm.config.ca_cert
                && (pem.len() > MAX_CA_CERT || !pem.contains("-----BEGIN CERTIFICATE-----"))
            {
                return Err(Error::Invalid(format!(
                    "field 'obms[{i}].config.caCert' must be one or more PEM certificates \
                     ('-----BEGIN CERTIFICATE-----'), at most {MAX_CA_CERT} bytes"
                )));
            }
            if obm.config.endpoint.is_some()
                && (!obm.config.host.is_empty() || obm.config.password.is_some())
            {
                return Err(Error::Invalid(format!(
                    "field 'obms[{i}].config': an OBM that names an endpoint takes its URL and \
                     credentials from it; give no host or password"
                )));
            }
            if let Some(sys) = &obm.config.system_id
                && (sys.contains("://") || sys.starts_with("//"))
            {
                return Err(Error::Invalid(format!(
                    "field 'obms[{i}].config.systemId' must be a ComputerSystem id or a path on \
                     the BMC, not a URL"
                )));
            }
        }
        Ok(())
    }

    /// Replaces the node's OBMs by `new` (see [`Node::set_obm`] for the password rule).
    pub fn replace_obms(&mut self, new: Vec<Obm>) -> Result<(), Error> {
        let old = std::mem::take(&mut self.obms);
        self.obms = new
            .into_iter()
            .enumerate()
            .map(|(i, obm)| keep_password(&old, obm, i))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Sets one OBM: it replaces the OBM of the same service, or is added after the others.
    ///
    /// An OBM given without a password keeps the stored password of the OBM with the same
    /// service when it points at the same BMC (host and port), so that clients can round-trip
    /// what they read (passwords are never read back). Pointing it elsewhere without a new
    /// password is refused: the stored password is only ever sent where it was given for.
    pub fn set_obm(&mut self, obm: Obm) -> Result<(), Error> {
        let pos = self.obms.iter().position(|o| o.service == obm.service);
        let obm = keep_password(&self.obms, obm, pos.unwrap_or(self.obms.len()))?;
        match pos {
            Some(i) => self.obms[i] = obm,
            None => self.obms.push(obm),
        }
        Ok(())
    }
}

fn keep_password(old: &[Obm], mut obm: Obm, i: usize) -> Result<Obm, Error> {
    if obm.config.password.is_some() {
        return Ok(obm);
    }
    let Some(prev) = old.iter().find(|o| o.service == obm.service) else {
        return Ok(obm);
    };
    let Some(password) = &prev.config.password else {
        return Ok(obm);
    };
    if prev.config.host != obm.config.host || prev.config.port != obm.config.port {
        return Err(Error::Invalid(format!(
            "field 'obms[{i}].config.password' is required: the BMC's host or port changed, and \
             the stored password is only ever sent to the BMC it was given for"
        )));
    }
    obm.config.password = Some(password.clone());
    Ok(obm)
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
/// Filters and paging for listing nodes; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct NodeFilter {
    /// Nodes with this tag.
    pub tag: Option<String>,
    /// Nodes of this type.
    pub node_type: Option<String>,
    /// Nodes with an OBM at this host (as stored: a name, an address or a base URL), or
    /// referring to this registered endpoint (its id).
    pub endpoint: Option<String>,
    /// Matching nodes to pass over first (`$skip`).
    pub skip: usize,
    /// The page size (`$top`); `None` is 100; at most 1000.
    pub limit: Option<usize>,
    /// Where the previous page ended: the last node's id ([`Page::next`]).
    pub cursor: Option<String>,
}

impl NodeFilter {
    fn matches(&self, n: &Node) -> bool {
        self.tag.as_ref().is_none_or(|t| n.tags.contains(t))
            && self.node_type.as_ref().is_none_or(|t| *t == n.node_type)
            && self.endpoint.as_ref().is_none_or(|h| {
                n.obms.iter().any(|o| {
                    o.config.host == *h || o.config.endpoint.as_deref() == Some(h.as_str())
                })
            })
    }
}

/// The `meta` key that says the node index covers every node.
const NODE_INDEX_BUILT: &[u8] = b"node_index";
/// The `meta` key that says every stored OBM password is sealed.
const NODES_SEALED: &[u8] = b"nodes_sealed";

/// The `node_index` keys of a node's tags (`t/`), type (`y/`) and OBM hosts (`e/`):
/// `{kind}{value}\0{id}` → the id.
fn field_keys(n: &Node) -> Vec<Vec<u8>> {
    let key = |kind: &[u8], value: &str| {
        let mut k = field_family(kind, value);
        k.extend_from_slice(n.id.as_bytes());
        k
    };
    let mut keys: Vec<Vec<u8>> = n.tags.iter().map(|t| key(b"t/", t)).collect();
    keys.push(key(b"y/", &n.node_type));
    keys.extend(n.obms.iter().map(|o| {
        key(
            b"e/",
            o.config.endpoint.as_deref().unwrap_or(&o.config.host),
        )
    }));
    keys.sort();
    keys.dedup();
    keys
}

fn field_family(kind: &[u8], value: &str) -> Vec<u8> {
    let mut f = kind.to_vec();
    f.extend_from_slice(value.as_bytes());
    f.push(0);
    f
}

/// Moves a node's index keys from what `old` had to what `new` has, in `batch`.
fn index_fields(batch: &mut Batch, old: Option<&Node>, new: Option<&Node>) {
    let before = old.map(field_keys).unwrap_or_default();
    let after = new.map(field_keys).unwrap_or_default();
    for k in before.iter().filter(|k| !after.contains(k)) {
        batch.delete(keys::NODE_INDEX, k.clone());
    }
    if let Some(n) = new {
        for k in after.iter().filter(|k| !before.contains(k)) {
            batch.put(keys::NODE_INDEX, k.clone(), n.id.as_bytes().to_vec());
        }
    }
}

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
    /// The node or OBM given breaks a rule (a missing name, an OBM without a service, ...).
    #[error("{0}")]
    Invalid(String),
    #[error("a node operation did not complete: {0}")]
    Incomplete(String),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Incomplete(e.to_string())
    }
}

/// The node store.
#[derive(Clone)]
pub struct Nodes {
    store: Arc<dyn Store>,
    cache: Arc<Mutex<Cache>>,
    /// The most nodes the cache keeps: [`CACHE_CAPACITY`], or none when replicas share the
    /// store (another replica's writes would leave it stale).
    capacity: usize,
    /// Seals OBM passwords before they are stored; none stores them as given.
    sealer: Option<Arc<Sealer>>,
    /// The registered endpoints OBMs may refer to.
    endpoints: Endpoints,
}

/// The nodes jobs read when they start, kept in memory so that a job's start does not wait
/// on the store (every attempt reads its node afresh, so that a corrected OBM is used).
/// Writers through [`Nodes`] update it after their commit; a reader fills it only when no
/// write happened since it began reading (`generation`), so it never holds a stale node.
/// At most [`CACHE_CAPACITY`] nodes are kept; beyond that, reads go to the store.
#[derive(Default)]
struct Cache {
    nodes: std::collections::HashMap<String, Node>,
    generation: u64,
}

/// The most nodes the cache keeps.
pub const CACHE_CAPACITY: usize = 16_384;

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nodes")
    }
}

impl Nodes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            endpoints: Endpoints::new(store.clone(), None),
            store,
            cache: Arc::default(),
            capacity: CACHE_CAPACITY,
            sealer: None,
        }
    }

    /// Nodes in a store other replicas write too: nothing is kept in memory, every read
    /// goes to the store (and so do the endpoints').
    pub fn shared(self) -> Self {
        Self {
            capacity: 0,
            endpoints: self.endpoints.shared(),
            ..self
        }
    }

    /// Nodes whose OBM passwords (and endpoints' passwords) are sealed with `sealer` in
    /// the store (`seal.rs`).
    pub fn with_sealer(self, sealer: Option<Arc<Sealer>>) -> Self {
        let endpoints = Endpoints::new(self.store.clone(), sealer.clone());
        Self {
            endpoints: if self.capacity == 0 {
                endpoints.shared()
            } else {
                endpoints
            },
            sealer,
            ..self
        }
    }

    /// The registered endpoints.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// `node` with each OBM that refers to an endpoint completed with the endpoint's URL
    /// and credentials, as drivers need it. An endpoint deleted meanwhile is an error
    /// naming it.
    pub async fn resolve(&self, mut node: Node) -> Result<Node, crate::Error> {
        for obm in &mut node.obms {
            if let Some(id) = obm.config.endpoint.clone() {
                let ep = self.endpoints.get(&id).await?.ok_or_else(|| {
                    crate::Error::Conflict(format!(
                        "node {}: its OBM refers to endpoint {id}, which no longer exists",
                        node.id
                    ))
                })?;
                obm.config = ep.obm_config(&obm.config);
            }
        }
        Ok(node)
    }

    /// That every endpoint `node`'s OBMs refer to is registered (blocking).
    fn check_endpoints(&self, node: &Node) -> Result<(), Error> {
        for (i, obm) in node.obms.iter().enumerate() {
            if let Some(id) = &obm.config.endpoint {
                let ep = self
                    .endpoints
                    .get_blocking(id)
                    .map_err(|e| Error::Incomplete(e.to_string()))?
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "field 'obms[{i}].config.endpoint': no endpoint {id} is registered"
                        ))
                    })?;
                if obm.service != ep.service.obm_service() {
                    return Err(Error::Invalid(format!(
                        "field 'obms[{i}].service' must be {} for endpoint {id}",
                        ep.service.obm_service()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The nodes whose OBM refers to endpoint `id`.
    pub async fn by_endpoint(&self, id: &str) -> Result<Vec<Node>, crate::Error> {
        let this = self.clone();
        let id = id.to_owned();
        blocking(move || {
            let mut found = Vec::new();
            for (_, v) in this
                .store
                .scan_prefix(keys::NODE_INDEX, &field_family(b"e/", &id))?
            {
                if let Some(n) = this.get_blocking(&String::from_utf8_lossy(&v))?
                    && n.obms
                        .iter()
                        .any(|o| o.config.endpoint.as_deref() == Some(&id))
                {
                    found.push(n);
                }
            }
            Ok(found)
        })
        .await
    }

    /// A node as stored: its OBM passwords sealed when there is a key.
    fn encode(&self, node: &Node) -> Vec<u8> {
        let Some(sealer) = &self.sealer else {
            return serde_json::to_vec(node).unwrap_or_default();
        };
        let mut stored = node.clone();
        for obm in &mut stored.obms {
            if let Some(p) = &mut obm.config.password
                && !seal::is_sealed(&p.0)
            {
                p.0 = sealer.seal(&p.0);
            }
        }
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// A stored node with its OBM passwords opened.
    fn decode(&self, k: &[u8], v: &[u8]) -> Result<Node, Error> {
        let id = || String::from_utf8_lossy(k).into_owned();
        let mut node: Node =
            serde_json::from_slice(v).map_err(|e| Error::Corrupt(id(), e.to_string()))?;
        for obm in &mut node.obms {
            if let Some(p) = &mut obm.config.password
                && seal::is_sealed(&p.0)
            {
                let sealer = self.sealer.as_ref().ok_or_else(|| {
                    Error::Corrupt(
                        id(),
                        "an OBM password is sealed and no secret key is loaded".into(),
                    )
                })?;
                p.0 = sealer.open(&p.0).map_err(|e| Error::Corrupt(id(), e))?;
            }
        }
        Ok(node)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a committed write of node `id` (`None`: deleted).
    fn wrote(&self, id: &str, node: Option<&Node>) {
        let mut c = self.cache();
        c.generation += 1;
        match node {
            Some(n) if c.nodes.contains_key(id) || c.nodes.len() < self.capacity => {
                c.nodes.insert(id.to_owned(), n.clone());
            }
            _ => {
                c.nodes.remove(id);
            }
        }
    }

    /// A node as last committed, from memory when it is there, else from the store (then
    /// remembered).
    pub async fn current(&self, id: &str) -> Result<Option<Node>, crate::Error> {
        let generation = match self.cached(id) {
            Ok(n) => return Ok(Some(n)),
            Err(generation) => generation,
        };
        let node = self.get(id).await?;
        self.remember(id, &node, generation);
        Ok(node)
    }

    /// [`Nodes::current`], blocking: a workflow's creation reads its node with it, so that
    /// its jobs find the node in memory.
    pub(crate) fn current_blocking(&self, id: &str) -> Result<Option<Node>, Error> {
        let generation = match self.cached(id) {
            Ok(n) => return Ok(Some(n)),
            Err(generation) => generation,
        };
        let node = self.get_blocking(id)?;
        self.remember(id, &node, generation);
        Ok(node)
    }

    /// Node `id` from memory, or the cache's generation before it is read from the store.
    fn cached(&self, id: &str) -> Result<Node, u64> {
        let c = self.cache();
        c.nodes.get(id).cloned().ok_or(c.generation)
    }

    /// Remembers a node read from the store, unless a write happened since the read began
    /// (`generation`) or the cache is full.
    fn remember(&self, id: &str, node: &Option<Node>, generation: u64) {
        if let Some(n) = node {
            let mut c = self.cache();
            if c.generation == generation && c.nodes.len() < self.capacity {
                c.nodes.insert(id.to_owned(), n.clone());
            }
        }
    }

    fn read(&self, id: &str) -> Result<Option<(Node, Vec<u8>)>, Error> {
        match self.store.get(keys::NODES, id.as_bytes())? {
            None => Ok(None),
            Some(raw) => {
                let node = self.decode(id.as_bytes(), &raw)?;
                Ok(Some((node, raw)))
            }
        }
    }

    pub(crate) fn get_blocking(&self, id: &str) -> Result<Option<Node>, Error> {
        Ok(self.read(id)?.map(|(n, _)| n))
    }

    /// One page of nodes in id order (see [`NodeFilter`]).
    pub(crate) fn list_blocking(&self, f: &NodeFilter) -> Result<Page<Node>, crate::Error> {
        let limit = crate::history::page_size(f.limit, "nodes")?;
        // The most selective index the filter names, else the nodes themselves.
        let (keyspace, family) = match (&f.tag, &f.endpoint, &f.node_type) {
            (Some(tag), _, _) => (keys::NODE_INDEX, field_family(b"t/", tag)),
            (None, Some(host), _) => (keys::NODE_INDEX, field_family(b"e/", host)),
            (None, None, Some(t)) => (keys::NODE_INDEX, field_family(b"y/", t)),
            (None, None, None) => (keys::NODES, Vec::new()),
        };
        let after = f.cursor.as_ref().map(|c| {
            let mut k = family.clone();
            k.extend_from_slice(c.as_bytes());
            k
        });
        let scan = Scan::prefix(&family, 0).after(after.as_deref());
        page_index(
            self.store.as_ref(),
            keyspace,
            scan,
            limit,
            f.skip,
            |k, v| {
                let node = if keyspace == keys::NODES {
                    Some(self.decode(k, v)?)
                } else {
                    self.get_blocking(&String::from_utf8_lossy(v))?
                };
                Ok(match node {
                    Some(n) if f.matches(&n) => {
                        let at = n.id.clone();
                        Visit::Take(n, at)
                    }
                    Some(n) => Visit::Pass(n.id),
                    // Deleted between the index read and this one.
                    None => Visit::Pass(String::from_utf8_lossy(v).into_owned()),
                })
            },
        )
    }

    /// Brings the nodes an earlier version stored up to date (blocking; on start): indexes
    /// their tags, types and OBM endpoints when the index is not built yet, and seals OBM
    /// passwords stored as given when there is a key. Each is done once per store (a `meta`
    /// marker), idempotently. Returns how many nodes were indexed and how many sealed.
    pub(crate) fn migrate_blocking(&self) -> Result<(usize, usize), Error> {
        let index = self.store.get(keys::META, NODE_INDEX_BUILT)?.is_none();
        let seal = self.sealer.is_some() && self.store.get(keys::META, NODES_SEALED)?.is_none();
        let (mut indexed, mut sealed) = (0, 0);
        let mut after: Option<Vec<u8>> = None;
        if !index && !seal {
            return Ok((0, 0));
        }
        loop {
            let page = self
                .store
                .scan(keys::NODES, Scan::prefix(b"", 500).after(after.as_deref()))?;
            let Some((k, _)) = page.last() else { break };
            after = Some(k.clone());
            let mut batch = Batch::new();
            for (k, v) in &page {
                // As stored: the index needs tags, type and hosts, not passwords.
                let stored: Node = serde_json::from_slice(v).map_err(|e| {
                    Error::Corrupt(String::from_utf8_lossy(k).into_owned(), e.to_string())
                })?;
                if index {
                    index_fields(&mut batch, None, Some(&stored));
                    indexed += 1;
                }
                let plain = stored
                    .obms
                    .iter()
                    .filter_map(|o| o.config.password.as_ref())
                    .any(|p| !seal::is_sealed(&p.0));
                if seal && plain {
                    batch.require_equals(keys::NODES, k.clone(), v.clone());
                    batch.put(keys::NODES, k.clone(), self.encode(&self.decode(k, v)?));
                    sealed += 1;
                }
            }
            if !batch.is_empty() {
                self.store.commit(batch)?;
            }
        }
        let mut batch = Batch::new();
        if index {
            batch.put(keys::META, NODE_INDEX_BUILT, b"1".to_vec());
        }
        if seal {
            batch.put(keys::META, NODES_SEALED, b"1".to_vec());
        }
        if !batch.is_empty() {
            self.store.commit(batch)?;
        }
        Ok((indexed, sealed))
    }

    /// The node that owns an identifier (a MAC), if any.
    pub(crate) fn by_identifier_blocking(&self, identifier: &str) -> Result<Option<Node>, Error> {
        let ident = normalize_identifier(identifier);
        match self.store.get(keys::NODE_IDENTS, ident.as_bytes())? {
            None => Ok(None),
            Some(id) => self.get_blocking(&String::from_utf8_lossy(&id)),
        }
    }

    /// Creates a node. Its identifiers must not belong to another node.
    pub(crate) fn create_blocking(&self, mut node: Node) -> Result<Node, Error> {
        node.check()?;
        self.check_endpoints(&node)?;
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
        index_fields(&mut batch, None, Some(&node));
        batch.put(keys::NODES, node.id.as_bytes(), self.encode(&node));
        match self.store.commit(batch) {
            Ok(()) => {
                self.wrote(&node.id, Some(&node));
                Ok(node)
            }
            Err(metalgraph_store::Error::Conflict { index: 0, .. }) => {
                Err(Error::Exists(node.id.clone()))
            }
            Err(metalgraph_store::Error::Conflict { .. }) => Err(Error::Conflict(node.id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a node (optimistically: fails with `Conflict` if it changed meanwhile).
    /// `update` receives the stored node and changes it in place.
    pub(crate) fn update_blocking(
        &self,
        id: &str,
        update: impl FnOnce(&mut Node) -> Result<(), crate::Error>,
    ) -> Result<Node, crate::Error> {
        let (old, raw) = self
            .read(id)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        let mut node = old.clone();
        update(&mut node)?;
        node.check()?;
        self.check_endpoints(&node)?;
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
        index_fields(&mut batch, Some(&old), Some(&node));
        batch.put(keys::NODES, id.as_bytes(), self.encode(&node));
        match self.store.commit(batch) {
            Ok(()) => {
                self.wrote(&node.id, Some(&node));
                Ok(node)
            }
            Err(metalgraph_store::Error::Conflict { .. }) => {
                Err(Error::Conflict(id.to_owned()).into())
            }
            Err(e) => Err(Error::from(e).into()),
        }
    }

    /// Sets one OBM: it replaces the node's OBM of the same service, or is added after the
    /// existing ones (see [`Node::set_obm`] for the password rule).
    pub(crate) fn set_obm_blocking(&self, id: &str, obm: Obm) -> Result<Node, crate::Error> {
        self.update_blocking(id, |n| n.set_obm(obm).map_err(crate::Error::from))
    }

    /// Deletes a node with its catalogs. Refused while a workflow runs on it.
    pub(crate) fn delete_blocking(&self, id: &str) -> Result<(), Error> {
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
        index_fields(&mut batch, Some(&node), None);
        for (k, _) in self
            .store
            .scan_prefix(keys::CATALOGS, &catalog_prefix(id))?
        {
            batch.delete(keys::CATALOGS, k);
        }
        batch.delete(keys::NODES, id.as_bytes());
        match self.store.commit(batch) {
            Ok(()) => {
                self.wrote(id, None);
                Ok(())
            }
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
    pub(crate) fn put_catalog_blocking(
        &self,
        id: &str,
        source: &str,
        data: &Value,
    ) -> Result<(), Error> {
        if self.get_blocking(id)?.is_none() {
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
    pub(crate) fn catalogs_blocking(&self, id: &str) -> Result<Vec<Value>, Error> {
        Ok(self
            .store
            .scan_prefix(keys::CATALOGS, &catalog_prefix(id))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// The workflow running on a node, if any.
    pub(crate) fn active_workflow_blocking(&self, id: &str) -> Result<Option<String>, Error> {
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

/// The asynchronous API: each call does its store work on the blocking pool.
impl Nodes {
    pub async fn get(&self, id: &str) -> Result<Option<Node>, crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.get_blocking(&id).map_err(crate::Error::from)).await
    }

    pub async fn list(&self) -> Result<Vec<Node>, crate::Error> {
        Ok(self.list_page(&NodeFilter::default()).await?.items)
    }

    /// One page of nodes in id order, filtered (see [`NodeFilter`]).
    pub async fn list_page(&self, filter: &NodeFilter) -> Result<Page<Node>, crate::Error> {
        let (n, filter) = (self.clone(), filter.clone());
        blocking(move || n.list_blocking(&filter)).await
    }

    /// The node that owns an identifier (a MAC), if any.
    pub async fn by_identifier(&self, identifier: &str) -> Result<Option<Node>, crate::Error> {
        let (n, ident) = (self.clone(), identifier.to_owned());
        blocking(move || n.by_identifier_blocking(&ident).map_err(crate::Error::from)).await
    }

    /// Creates a node; see [`Nodes::create_blocking`].
    pub async fn create(&self, node: Node) -> Result<Node, crate::Error> {
        let n = self.clone();
        blocking(move || n.create_blocking(node).map_err(crate::Error::from)).await
    }

    /// Changes a node; see [`Nodes::update_blocking`].
    pub async fn update(
        &self,
        id: &str,
        update: impl FnOnce(&mut Node) -> Result<(), crate::Error> + Send + 'static,
    ) -> Result<Node, crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.update_blocking(&id, update)).await
    }

    /// Sets one OBM of a node; see [`Nodes::set_obm_blocking`].
    pub async fn set_obm(&self, id: &str, obm: Obm) -> Result<Node, crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.set_obm_blocking(&id, obm)).await
    }

    /// Deletes a node with its catalogs. Refused while a workflow runs on it.
    pub async fn delete(&self, id: &str) -> Result<(), crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.delete_blocking(&id).map_err(crate::Error::from)).await
    }

    /// Stores one catalog (inventory document) of a node under `source`.
    pub async fn put_catalog(
        &self,
        id: &str,
        source: &str,
        data: &Value,
    ) -> Result<(), crate::Error> {
        let (n, id, source, data) = (self.clone(), id.to_owned(), source.to_owned(), data.clone());
        blocking(move || {
            n.put_catalog_blocking(&id, &source, &data)
                .map_err(crate::Error::from)
        })
        .await
    }

    /// Every catalog of a node, ordered by source.
    pub async fn catalogs(&self, id: &str) -> Result<Vec<Value>, crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.catalogs_blocking(&id).map_err(crate::Error::from)).await
    }

    /// The workflow running on a node, if any.
    pub async fn active_workflow(&self, id: &str) -> Result<Option<String>, crate::Error> {
        let (n, id) = (self.clone(), id.to_owned());
        blocking(move || n.active_workflow_blocking(&id).map_err(crate::Error::from)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        Node {
            id: String::new(),
            name: name.to_owned(),
            identifiers: vec!["52:54:00:00:00:01".to_owned()],
            node_type: "compute".to_owned(),
            tags: vec!["rack=1".to_owned()],
            obms: Vec::new(),
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn control_characters_are_refused_naming_the_field() {
        assert!(node("rack1-u08 (spare)").check().is_ok());
        type Spoil = fn(&mut Node);
        let cases: [(Spoil, &str); 4] = [
            (
                |n| n.name = "evil\nchain http://127.0.0.1:1/pwn.ipxe".into(),
                "'name'",
            ),
            (|n| n.node_type = "compute\r".into(), "'type'"),
            (|n| n.identifiers.push("x\0".into()), "'identifiers[1]'"),
            (|n| n.tags.push("boot-profile=a\tb".into()), "'tags[1]'"),
        ];
        for (spoil, field) in cases {
            let mut n = node("ok");
            spoil(&mut n);
            let err = n.check().expect_err(field).to_string();
            assert!(err.contains(field) && err.contains("control"), "{err}");
        }
    }
}
