//! Endpoints: the Redfish services and IPMI BMCs metalgraph talks to, registered at run
//! time with their credentials, so that many nodes share one credential rotated in one
//! place.
//!
//! A node's OBM refers to an endpoint by id (`config.endpoint`) instead of carrying a host
//! and a password; [`Endpoints::resolve`] fills the endpoint's URL and credentials in when
//! a job reads its node, so a rotated password is used by the next BMC call of every node.
//! Endpoints are few (one per BMC or aggregator): they are all kept in memory, read from
//! the store once, and every write goes to the store first. Passwords are write-only and
//! sealed at rest like OBM passwords.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use metalgraph_store::{Batch, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::now_rfc3339;
use crate::error::{Error, blocking};
use crate::history::{Page, PageRequest, page_size};
use crate::keys;
use crate::nodes::{MAX_CA_CERT, ObmConfig, Secret};
use crate::seal::{self, Sealer};

/// The most endpoints that may be registered.
pub const MAX_ENDPOINTS: usize = 10_000;

/// How often listing an endpoint's systems writes its last contact to the store when
/// nothing else about it changed.
const CONTACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The id of the endpoint named `name`, other than `except`.
fn named(all: &BTreeMap<String, Endpoint>, name: &str, except: &str) -> Option<String> {
    all.values()
        .find(|e| e.name == name && e.id != except)
        .map(|e| e.id.clone())
}

/// What kind of management service an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// A Redfish service: one BMC, or an aggregator in front of many systems.
    Redfish,
    /// An IPMI BMC (one system), reached with `ipmitool -I lanplus`.
    Ipmi,
}

impl Service {
    /// The OBM service name of nodes behind such an endpoint.
    pub fn obm_service(self) -> &'static str {
        match self {
            Service::Redfish => "redfish-obm-service",
            Service::Ipmi => "ipmi-obm-service",
        }
    }
}

/// A registered endpoint as stored (the password sealed there, opened in memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub id: String,
    pub name: String,
    pub service: Service,
    /// Redfish: the service's base URL (`https://bmc.example:8443`). IPMI: `host` or
    /// `host:port`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Write-only: views show `passwordSet` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, write_only))]
    pub password: Option<Secret>,
    #[serde(default = "yes", rename = "verifySSL")]
    pub verify_ssl: bool,
    /// Redfish: the CA certificate(s), PEM, that signed the service's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
    /// How many systems the service listed when it was last asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systems_seen: Option<usize>,
    /// When metalgraph last had an answer from the service (listing systems, discovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact: Option<String>,
    /// The last error talking to the service; cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn yes() -> bool {
    true
}

/// A new endpoint (`POST /api/2.0/endpoints`).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewEndpoint {
    pub name: String,
    pub service: Service,
    pub url: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, write_only))]
    pub password: Option<Secret>,
    #[serde(default = "yes", rename = "verifySSL")]
    pub verify_ssl: bool,
    #[serde(default)]
    pub ca_cert: Option<String>,
}

/// A change to an endpoint (`PATCH /api/2.0/endpoints/{id}`): the fields given replace
/// the stored ones; `caCert: null` removes the CA. The service cannot change.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, write_only))]
    pub password: Option<Secret>,
    #[serde(default, rename = "verifySSL")]
    pub verify_ssl: Option<bool>,
    #[serde(default, with = "double_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub ca_cert: Option<Option<String>>,
}

/// `null` and absent told apart: `Some(None)` is an explicit `null`.
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl Endpoint {
    /// The endpoint as the outside world may see it: the password replaced by
    /// `passwordSet`.
    pub fn public(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.remove("password");
            m.insert("passwordSet".into(), Value::Bool(self.password.is_some()));
        }
        v
    }

    /// The OBM settings of a system behind this endpoint: the endpoint's URL and
    /// credentials, with what the node's own OBM says (its `systemId`, driver settings).
    pub fn obm_config(&self, own: &ObmConfig) -> ObmConfig {
        let (host, port) = match self.service {
            Service::Redfish => (self.url.clone(), None),
            Service::Ipmi => split_host_port(&self.url),
        };
        ObmConfig {
            host,
            port: own.port.or(port),
            user: self.user.clone(),
            password: self.password.clone(),
            system_id: own.system_id.clone(),
            verify_ssl: Some(self.verify_ssl),
            ca_cert: self.ca_cert.clone(),
            endpoint: Some(self.id.clone()),
            extra: own.extra.clone(),
        }
    }

    /// The rules every stored endpoint keeps.
    fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::BadRequest(m));
        if self.name.trim().is_empty() || self.name.len() > 256 {
            return bad("field 'name' is required and must be at most 256 bytes".into());
        }
        for (field, value) in [("name", &self.name), ("url", &self.url)]
            .into_iter()
            .chain(self.user.iter().map(|u| ("user", u)))
        {
            if value.chars().any(char::is_control) {
                return bad(format!(
                    "field '{field}' must not contain control characters"
                ));
            }
        }
        match self.service {
            Service::Redfish => {
                let scheme_ok = ["https://", "http://"].iter().any(|s| {
                    self.url.len() > s.len()
                        && self
                            .url
                            .get(..s.len())
                            .is_some_and(|p| p.eq_ignore_ascii_case(s))
                });
                if !scheme_ok || self.url.contains('@') || self.url.len() > 2048 {
                    return bad(format!(
                        "field 'url' must be the Redfish service's base URL (https://host[:port]), \
                         without credentials; got {:?}",
                        self.url
                    ));
                }
            }
            Service::Ipmi => {
                let (host, _) = split_host_port(&self.url);
                if host.is_empty() || self.url.contains('/') || self.url.contains('@') {
                    return bad(format!(
                        "field 'url' of an IPMI endpoint must be host or host:port; got {:?}",
                        self.url
                    ));
                }
                if self.ca_cert.is_some() {
                    return bad("field 'caCert' applies to Redfish endpoints only".into());
                }
            }
        }
        if let Some(pem) = &self.ca_cert
            && (pem.len() > MAX_CA_CERT || !pem.contains("-----BEGIN CERTIFICATE-----"))
        {
            return bad(format!(
                "field 'caCert' must be one or more PEM certificates \
                 ('-----BEGIN CERTIFICATE-----'), at most {MAX_CA_CERT} bytes"
            ));
        }
        Ok(())
    }
}

/// `host:port` split, the port when it parses (an IPv6 literal needs brackets).
fn split_host_port(s: &str) -> (String, Option<u16>) {
    if let Some((host, port)) = s.rsplit_once(':')
        && !host.contains(':')
        && let Ok(p) = port.parse()
    {
        return (host.to_owned(), Some(p));
    }
    if let Some(inner) = s.strip_prefix('[')
        && let Some((host, rest)) = inner.split_once(']')
    {
        return (
            host.to_owned(),
            rest.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    (s.to_owned(), None)
}

/// The registered endpoints: in memory, written through to the store.
#[derive(Clone)]
pub struct Endpoints {
    store: Arc<dyn Store>,
    sealer: Option<Arc<Sealer>>,
    /// Every endpoint by id, once read from the store.
    all: Arc<RwLock<Option<BTreeMap<String, Endpoint>>>>,
    /// Serialises writers, so that the name check and the commit see the same endpoints.
    write: Arc<tokio::sync::Mutex<()>>,
    /// When each endpoint's last contact was last written to the store.
    contact_stored: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// Other replicas write the store too: `all` is never kept, every read goes to the
    /// store.
    shared: bool,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Endpoints")
    }
}

impl Endpoints {
    pub fn new(store: Arc<dyn Store>, sealer: Option<Arc<Sealer>>) -> Self {
        Self {
            store,
            sealer,
            all: Arc::default(),
            write: Arc::default(),
            contact_stored: Arc::default(),
            shared: false,
        }
    }

    /// Endpoints in a store other replicas write too (see [`crate::nodes::Nodes::shared`]).
    pub fn shared(self) -> Self {
        Self {
            shared: true,
            ..self
        }
    }

    fn encode(&self, ep: &Endpoint) -> Vec<u8> {
        let mut stored = ep.clone();
        if let (Some(sealer), Some(p)) = (&self.sealer, &mut stored.password)
            && !seal::is_sealed(&p.0)
        {
            p.0 = sealer.seal(&p.0);
        }
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    fn decode(&self, k: &[u8], v: &[u8]) -> Result<Endpoint, Error> {
        let id = String::from_utf8_lossy(k);
        let corrupt = |e: String| Error::Store(format!("stored endpoint {id} is unreadable: {e}"));
        let mut ep: Endpoint = serde_json::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
        if let Some(p) = &mut ep.password
            && seal::is_sealed(&p.0)
        {
            let sealer = self.sealer.as_ref().ok_or_else(|| {
                corrupt("its password is sealed and no secret key is loaded".into())
            })?;
            p.0 = sealer.open(&p.0).map_err(corrupt)?;
        }
        Ok(ep)
    }

    /// Reads the endpoints through `f`, under the lock, without copying them; the store is
    /// read the first time (blocking).
    fn read_blocking<T>(
        &self,
        f: impl FnOnce(&BTreeMap<String, Endpoint>) -> T,
    ) -> Result<T, Error> {
        if let Some(all) = self.all.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(f(all));
        }
        let mut loaded = BTreeMap::new();
        for (k, v) in self.store.scan_prefix(keys::ENDPOINTS, b"")? {
            let ep = self.decode(&k, &v)?;
            loaded.insert(ep.id.clone(), ep);
        }
        if self.shared {
            return Ok(f(&loaded));
        }
        let mut slot = self.all.write().unwrap_or_else(|p| p.into_inner());
        Ok(f(slot.get_or_insert(loaded)))
    }

    /// [`Self::read_blocking`] from async code: the first read goes to the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BTreeMap<String, Endpoint>) -> T + Send + 'static,
    ) -> Result<T, Error> {
        if let Some(all) = self.all.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(f(all));
        }
        let this = self.clone();
        blocking(move || this.read_blocking(f)).await
    }

    /// Every endpoint, by name.
    pub async fn list(&self) -> Result<Vec<Endpoint>, Error> {
        let mut all: Vec<Endpoint> = self.read(|all| all.values().cloned().collect()).await?;
        all.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    /// One page of endpoints in id order (see [`PageRequest`]).
    pub async fn page(&self, page: &PageRequest) -> Result<Page<Endpoint>, Error> {
        let limit = page_size(page.limit, "endpoints")?;
        let (skip, after) = (page.skip, page.cursor.clone());
        let mut items: Vec<Endpoint> = self
            .read(move |all| {
                let lower = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                all.range::<str, _>((lower, Bound::Unbounded))
                    .skip(skip)
                    .take(limit + 1)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .await?;
        let next = (items.len() > limit).then(|| {
            items.truncate(limit);
            items.last().map(|e| e.id.clone()).unwrap_or_default()
        });
        Ok(Page { items, next })
    }

    pub async fn get(&self, id: &str) -> Result<Option<Endpoint>, Error> {
        let id = id.to_owned();
        self.read(move |all| all.get(&id).cloned()).await
    }

    pub(crate) fn get_blocking(&self, id: &str) -> Result<Option<Endpoint>, Error> {
        self.read_blocking(|all| all.get(id).cloned())
    }

    /// The endpoint or a 404 naming it.
    pub async fn require(&self, id: &str) -> Result<Endpoint, Error> {
        self.get(id).await?.ok_or_else(|| Error::NotFound {
            kind: "endpoint",
            id: id.to_owned(),
        })
    }

    /// Registers an endpoint; its name must be new.
    pub async fn create(&self, new: NewEndpoint) -> Result<Endpoint, Error> {
        let now = now_rfc3339();
        let ep = Endpoint {
            id: crate::new_id(),
            name: new.name,
            service: new.service,
            url: new.url,
            user: new.user.filter(|u| !u.is_empty()),
            password: new.password,
            verify_ssl: new.verify_ssl,
            ca_cert: new.ca_cert,
            created_at: now.clone(),
            updated_at: now,
            systems_seen: None,
            last_contact: None,
            last_error: None,
        };
        ep.check()?;
        let _w = self.write.lock().await;
        let name = ep.name.clone();
        let (count, named) = self
            .read(move |all| (all.len(), named(all, &name, "")))
            .await?;
        if count >= MAX_ENDPOINTS {
            return Err(Error::Conflict(format!(
                "at most {MAX_ENDPOINTS} endpoints may be registered"
            )));
        }
        if let Some(other) = named {
            return Err(Error::AlreadyExists(format!(
                "endpoint {other} is already named {:?}",
                ep.name
            )));
        }
        self.put(ep).await
    }

    /// Changes an endpoint; the nodes that refer to it use the change from their next BMC
    /// call on.
    pub async fn update(&self, id: &str, patch: EndpointPatch) -> Result<Endpoint, Error> {
        let _w = self.write.lock().await;
        let (key, name) = (id.to_owned(), patch.name.clone());
        let (found, named) = self
            .read(move |all| {
                let named = name.and_then(|n| named(all, &n, &key));
                (all.get(&key).cloned(), named)
            })
            .await?;
        let mut ep = found.ok_or_else(|| Error::NotFound {
            kind: "endpoint",
            id: id.to_owned(),
        })?;
        if let Some(name) = patch.name {
            if let Some(other) = named {
                return Err(Error::AlreadyExists(format!(
                    "endpoint {other} is already named {name:?}"
                )));
            }
            ep.name = name;
        }
        if let Some(url) = patch.url {
            // The stored password only ever goes to the service it was given for.
            if url != ep.url && patch.password.is_none() && ep.password.is_some() {
                return Err(Error::BadRequest(
                    "field 'password' is required: the URL changed, and the stored password is \
                     only ever sent to the service it was given for"
                        .into(),
                ));
            }
            ep.url = url;
        }
        if let Some(user) = patch.user {
            ep.user = Some(user).filter(|u| !u.is_empty());
        }
        if let Some(p) = patch.password {
            ep.password = Some(p).filter(|p| !p.0.is_empty());
        }
        if let Some(v) = patch.verify_ssl {
            ep.verify_ssl = v;
        }
        if let Some(ca) = patch.ca_cert {
            ep.ca_cert = ca;
        }
        ep.updated_at = now_rfc3339();
        ep.check()?;
        self.put(ep).await
    }

    /// Records the outcome of talking to the endpoint: how many systems it listed (when it
    /// answered) or the error.
    ///
    /// Listing systems is a read, which dashboards repeat: the endpoint shown is updated
    /// every time, but it is written to the store only when what it says changed (systems
    /// seen, last error) or its stored last contact is a minute old, so that reads do not
    /// become a commit each.
    ///
    /// Recording is a side note to the call that talked to the service: a failure to record
    /// is logged here, not returned.
    pub async fn record_contact(&self, id: &str, outcome: Result<usize, String>) {
        if let Err(e) = self.try_record_contact(id, outcome).await {
            tracing::warn!(endpoint = %id, error = %e, "cannot record the endpoint's last contact");
        }
    }

    async fn try_record_contact(
        &self,
        id: &str,
        outcome: Result<usize, String>,
    ) -> Result<(), Error> {
        let _w = self.write.lock().await;
        let Some(mut ep) = self.get(id).await? else {
            return Ok(());
        };
        let before = (ep.systems_seen, ep.last_error.clone());
        match outcome {
            Ok(n) => {
                ep.systems_seen = Some(n);
                ep.last_contact = Some(now_rfc3339());
                ep.last_error = None;
            }
            Err(e) => ep.last_error = Some(e),
        }
        let now = std::time::Instant::now();
        let due = {
            let stored = self
                .contact_stored
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            stored
                .get(id)
                .is_none_or(|at| now.duration_since(*at) >= CONTACT_EVERY)
        };
        if before == (ep.systems_seen, ep.last_error.clone()) && !due {
            // Shown, not stored: the stored one is less than a minute old.
            self.wrote(id, Some(&ep));
            return Ok(());
        }
        self.put(ep).await?;
        self.contact_stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), now);
        Ok(())
    }

    async fn put(&self, ep: Endpoint) -> Result<Endpoint, Error> {
        let this = self.clone();
        blocking(move || {
            let mut batch = Batch::new();
            batch.put(keys::ENDPOINTS, ep.id.as_bytes(), this.encode(&ep));
            this.store.commit(batch)?;
            this.wrote(&ep.id, Some(&ep));
            Ok(ep)
        })
        .await
    }

    /// Removes an endpoint in `batch` (the caller commits it with what goes with it).
    pub(crate) fn delete_in(&self, batch: &mut Batch, id: &str) {
        batch.delete(keys::ENDPOINTS, id.as_bytes());
    }

    /// Records in memory a committed write of endpoint `id` (`None`: deleted), or a last
    /// contact shown but not stored (see [`Self::record_contact`]).
    pub(crate) fn wrote(&self, id: &str, ep: Option<&Endpoint>) {
        let mut slot = self.all.write().unwrap_or_else(|p| p.into_inner());
        if let Some(all) = slot.as_mut() {
            match ep {
                Some(e) => all.insert(id.to_owned(), e.clone()),
                None => all.remove(id),
            };
        }
    }

    /// The endpoint writers' lock, held across a delete that checks nodes first.
    pub(crate) async fn lock_writes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write.lock().await
    }
}

/// What uses an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Nodes whose OBM refers to it.
    pub nodes: usize,
    /// Of those, the ones running a workflow.
    pub active_workflows: usize,
}

/// What deleting an endpoint did to its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Nodes deleted with it (`?nodes=delete`).
    pub deleted: Vec<String>,
    /// Nodes kept, without the OBM that referred to it.
    pub detached: Vec<String>,
}

impl crate::Engine {
    /// How many nodes refer to endpoint `id`, and how many of them run a workflow.
    pub async fn endpoint_usage(&self, id: &str) -> Result<Usage, Error> {
        let nodes = self.nodes().by_endpoint(id).await?;
        let mut usage = Usage {
            nodes: nodes.len(),
            active_workflows: 0,
        };
        for n in &nodes {
            if self.nodes().active_workflow(&n.id).await?.is_some() {
                usage.active_workflows += 1;
            }
        }
        Ok(usage)
    }

    /// Deletes endpoint `id`: refused (naming them) while any of its nodes runs a
    /// workflow. Its nodes are deleted with it when `delete_nodes`, else kept without the
    /// OBM that referred to it.
    pub async fn delete_endpoint(&self, id: &str, delete_nodes: bool) -> Result<Deleted, Error> {
        let endpoints = self.endpoints();
        let _w = endpoints.lock_writes().await;
        endpoints.get(id).await?.ok_or_else(|| Error::NotFound {
            kind: "endpoint",
            id: id.to_owned(),
        })?;
        let nodes = self.nodes().by_endpoint(id).await?;
        let mut busy = Vec::new();
        for n in &nodes {
            if let Some(wf) = self.nodes().active_workflow(&n.id).await? {
                busy.push(format!("{} (workflow {wf})", n.id));
            }
        }
        if !busy.is_empty() {
            return Err(Error::Conflict(format!(
                "endpoint {id} is in use: {} of its nodes run workflows: {}; cancel them or \
                 wait for them to end",
                busy.len(),
                busy.join(", ")
            )));
        }
        let mut gone = Deleted::default();
        for n in nodes {
            if delete_nodes {
                self.nodes().delete(&n.id).await?;
                gone.deleted.push(n.id);
            } else {
                let ep = id.to_owned();
                self.nodes()
                    .update(&n.id, move |node| {
                        node.obms
                            .retain(|o| o.config.endpoint.as_deref() != Some(ep.as_str()));
                        Ok(())
                    })
                    .await?;
                gone.detached.push(n.id);
            }
        }
        let (store, key) = (self.store(), id.to_owned());
        let this = endpoints.clone();
        blocking(move || {
            let mut batch = Batch::new();
            this.delete_in(&mut batch, &key);
            store.commit(batch)?;
            this.wrote(&key, None);
            Ok::<_, Error>(())
        })
        .await?;
        tracing::info!(endpoint = %id, deleted = gone.deleted.len(), detached = gone.detached.len(), "endpoint deleted");
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("10.0.0.5"), ("10.0.0.5".into(), None));
        assert_eq!(split_host_port("bmc:6230"), ("bmc".into(), Some(6230)));
        assert_eq!(split_host_port("[::1]:623"), ("::1".into(), Some(623)));
        assert_eq!(split_host_port("::1"), ("::1".into(), None));
    }

    #[test]
    fn a_url_with_a_multibyte_character_where_the_scheme_ends_is_refused_not_a_panic() {
        for url in ["kû\u{faa63}ãÂ[", "http:/é", "httpsé://x"] {
            let e: Endpoint = serde_json::from_value(serde_json::json!({
                "id": "e", "name": "e", "service": "redfish", "url": url,
            }))
            .unwrap();
            assert!(matches!(e.check(), Err(Error::BadRequest(_))), "{url}");
        }
    }
}
