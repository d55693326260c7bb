//! The Redfish driver (`redfish-obm-service`): a ComputerSystem reached over HTTPS (or
//! HTTP) with reqwest, found by following links from the service root rather than by
//! guessing paths, since BMCs disagree on where things hang (sushy-tools serves
//! VirtualMedia under the System and points its Manager's link there).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metalgraph_engine::job::BoxFuture;
use metalgraph_engine::nodes::{ObmConfig, Secret, normalize_identifier};
use reqwest::header::{ACCEPT, ETAG, HeaderMap, IF_MATCH};
use reqwest::{Client, Method, StatusCode, Url};
use serde_json::{Map, Value, json};
use tokio::sync::{OnceCell, Semaphore};

use super::{
    At, Bmc, BootDevice, BootOverride, DriverOptions, Error, MediaStatus, PowerAction, PowerState,
    REDFISH_SERVICE, Result,
};

/// The largest reply body read from a BMC; Redfish documents are small, and a reply larger
/// than this is a broken or hostile BMC.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// How many members of one collection the inventory follows.
const MAX_MEMBERS: usize = 64;

/// The operation name of an insert, which gets the longer media timeout: BMCs download
/// the whole image before they answer.
const INSERT_MEDIA: &str = "insert virtual media";

/// Backoff before each retry of an idempotent request (two retries).
const RETRY_BACKOFF: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(600)];

/// What a Redfish BMC endpoint (one base URL, one TLS policy) shares across jobs: a pooled
/// HTTP client, a concurrency limit and the session tokens of its users.
pub struct RedfishEndpoint {
    client: Client,
    limit: Semaphore,
    request_timeout: Duration,
    media_timeout: Duration,
    /// Session tokens (`X-Auth-Token`) by user name, reused until the BMC answers 401.
    sessions: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for RedfishEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedfishEndpoint").finish_non_exhaustive()
    }
}

impl RedfishEndpoint {
    pub(crate) fn new(options: &DriverOptions, verify_tls: bool) -> Result<Self, String> {
        let client = Client::builder()
            .user_agent(concat!("metalgraph/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout)
            // BMCs commonly run with self-signed certificates; `verifySSL: false` is the
            // operator's explicit choice for those.
            .danger_accept_invalid_certs(!verify_tls)
            .pool_max_idle_per_host(options.per_endpoint_limit.max(1))
            .build()
            .map_err(|e| error_chain(&e))?;
        Ok(Self {
            client,
            limit: Semaphore::new(options.per_endpoint_limit.max(1)),
            request_timeout: options.request_timeout,
            media_timeout: options.media_timeout.max(options.request_timeout),
            sessions: Mutex::default(),
        })
    }

    fn session(&self, user: &str) -> Option<String> {
        let map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(user).cloned()
    }

    fn set_session(&self, user: &str, token: Option<String>) {
        let mut map = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match token {
            Some(t) => map.insert(user.to_owned(), t),
            None => map.remove(user),
        };
    }
}

/// One ComputerSystem behind a Redfish service.
pub struct RedfishBmc {
    /// The node, for messages.
    node: String,
    /// `scheme://host:port/`, without credentials or path.
    base: Url,
    ep: Arc<RedfishEndpoint>,
    user: Option<String>,
    password: Secret,
    /// The ComputerSystem as configured: its id, name, UUID, path or URL; `None` when the
    /// service has exactly one.
    system_id: Option<String>,
    /// Whether to log in through the SessionService (`extra.auth: session`) when the
    /// service has one; Basic authentication otherwise.
    session_auth: bool,
    /// The service root, read once.
    root: OnceCell<Value>,
    /// The resolved ComputerSystem's path (`@odata.id`).
    system: OnceCell<String>,
    /// The virtual CD/DVD drive's path.
    cd: OnceCell<String>,
    /// The SessionService's Sessions collection, or `None` when the service has none.
    sessions_path: OnceCell<Option<String>>,
}

impl fmt::Debug for RedfishBmc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedfishBmc")
            .field("node", &self.node)
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .field("system_id", &self.system_id)
            .finish_non_exhaustive()
    }
}

/// A reply: status, headers, the final URL (after redirects) and the JSON body (`Null`
/// when empty).
struct Reply {
    headers: HeaderMap,
    url: Url,
    body: Value,
}

impl RedfishBmc {
    /// A driver for `config`; `endpoint` hands out the shared endpoint for a base URL and
    /// TLS policy.
    pub(crate) fn new(
        node: &str,
        config: &ObmConfig,
        endpoint: impl FnOnce(&str, bool) -> Result<Arc<RedfishEndpoint>, String>,
    ) -> Result<Self> {
        let config_err = |message: String| Error::Config {
            node: node.to_owned(),
            service: REDFISH_SERVICE.to_owned(),
            message,
        };
        let base = base_url(&config.host, config.port).map_err(config_err)?;
        let verify = config.verify_ssl.unwrap_or(true);
        let ep = endpoint(base.as_str(), verify)
            .map_err(|e| config_err(format!("cannot build the HTTP client: {e}")))?;
        let session_auth = config
            .extra
            .get("auth")
            .and_then(Value::as_str)
            .is_some_and(|a| a.eq_ignore_ascii_case("session"));
        Ok(Self {
            node: node.to_owned(),
            base,
            ep,
            user: config.user.clone().filter(|u| !u.is_empty()),
            password: config.password.clone().unwrap_or_default(),
            system_id: config.system_id.clone().filter(|s| !s.is_empty()),
            session_auth,
            root: OnceCell::new(),
            system: OnceCell::new(),
            cd: OnceCell::new(),
            sessions_path: OnceCell::new(),
        })
    }

    /// The same service and credentials, aimed at another ComputerSystem (`path`).
    pub fn for_system(&self, path: &str) -> RedfishBmc {
        RedfishBmc {
            node: self.node.clone(),
            base: self.base.clone(),
            ep: self.ep.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            system_id: Some(path.to_owned()),
            session_auth: self.session_auth,
            root: self.root.clone(),
            system: OnceCell::new(),
            cd: OnceCell::new(),
            sessions_path: self.sessions_path.clone(),
        }
    }

    /// The base URL as messages show it.
    pub fn base_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    fn at(&self, operation: &str) -> At {
        At {
            node: self.node.clone(),
            endpoint: self.base_url(),
            operation: operation.to_owned(),
        }
    }

    /// Removes the password from text a BMC sent back, in case it echoes a request body.
    /// Very short passwords are left alone, since replacing them would mangle the message
    /// without protecting much.
    fn scrub(&self, text: String) -> String {
        let secret = self.password.expose();
        if secret.len() >= 4 && text.contains(secret) {
            text.replace(secret, "<redacted>")
        } else {
            text
        }
    }

    fn url(&self, target: &str, op: &str) -> Result<Url> {
        let parsed = if target.starts_with("http://") || target.starts_with("https://") {
            Url::parse(target)
        } else {
            self.base.join(target)
        };
        parsed.map_err(|e| Error::Bmc {
            at: self.at(op),
            message: format!("the BMC gave an unusable link '{target}': {e}"),
        })
    }

    async fn get(&self, op: &str, target: &str) -> Result<Reply> {
        self.call(op, Method::GET, target, None, None).await
    }

    /// Sends one request. GETs are retried (twice, with a short backoff) when the BMC was
    /// unreachable or answered with a server error; other methods never are, since a
    /// repeated action is not always harmless.
    async fn call(
        &self,
        op: &str,
        method: Method,
        target: &str,
        body: Option<&Value>,
        headers: Option<HeaderMap>,
    ) -> Result<Reply> {
        let retries = if method == Method::GET {
            RETRY_BACKOFF.len()
        } else {
            0
        };
        let mut attempt = 0;
        loop {
            match self
                .call_once(op, method.clone(), target, body, headers.clone())
                .await
            {
                Err(e) if attempt < retries && retryable(&e) => {
                    tracing::debug!(node = %self.node, endpoint = %self.base_url(), operation = op, error = %e, "retrying");
                    tokio::time::sleep(RETRY_BACKOFF[attempt]).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One exchange, with one fresh login when a session token was refused.
    async fn call_once(
        &self,
        op: &str,
        method: Method,
        target: &str,
        body: Option<&Value>,
        headers: Option<HeaderMap>,
    ) -> Result<Reply> {
        let mut relogged = false;
        loop {
            let token = self.session_token(op).await?;
            let url = self.url(target, op)?;
            let at = || self.at(&format!("{op} ({method} {})", url.path()));
            let timeout = if op == INSERT_MEDIA {
                self.ep.media_timeout
            } else {
                self.ep.request_timeout
            };
            let mut req = self
                .ep
                .client
                .request(method.clone(), url.clone())
                .timeout(timeout)
                .header(ACCEPT, "application/json");
            if let Some(h) = &headers {
                req = req.headers(h.clone());
            }
            if let Some(b) = body {
                // `json` also sets `Content-Type: application/json`, without which sushy
                // and others answer 415.
                req = req.json(b);
            }
            req = match (&token, &self.user) {
                (Some(t), _) => req.header("X-Auth-Token", t),
                (None, Some(u)) => req.basic_auth(u, Some(self.password.expose())),
                (None, None) => req,
            };
            let (status, headers, final_url, bytes) = {
                let _permit = self.ep.limit.acquire().await.map_err(|_| Error::Bmc {
                    at: at(),
                    message: "the driver is shutting down".to_owned(),
                })?;
                let resp = req
                    .send()
                    .await
                    .map_err(|e| self.transport_error(at(), timeout, &e))?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let final_url = resp.url().clone();
                let bytes = read_body(resp)
                    .await
                    .map_err(|e| self.transport_error(at(), timeout, &e))?;
                (status, headers, final_url, bytes)
            };
            if status == StatusCode::UNAUTHORIZED && token.is_some() && !relogged {
                // The session expired or the BMC restarted: log in again, once.
                if let Some(user) = &self.user {
                    self.ep.set_session(user, None);
                }
                relogged = true;
                continue;
            }
            if status.is_success() {
                let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).map_err(|e| Error::Bmc {
                        at: at(),
                        message: format!("the BMC's answer is not JSON: {e}"),
                    })?
                };
                return Ok(Reply {
                    headers,
                    url: final_url,
                    body,
                });
            }
            let message = self.scrub(redfish_message(&bytes));
            return Err(if status == StatusCode::UNAUTHORIZED {
                Error::Auth {
                    at: at(),
                    message: format!(
                        "Redfish authentication failed for user {} (HTTP 401; check user and \
                         password): {message}",
                        self.user.as_deref().unwrap_or("(none)")
                    ),
                }
            } else {
                Error::Http {
                    at: at(),
                    status: status.as_u16(),
                    message,
                }
            });
        }
    }

    fn transport_error(&self, at: At, timeout: Duration, e: &reqwest::Error) -> Error {
        let message = self.scrub(error_chain(e));
        if e.is_timeout() {
            return Error::Timeout { at, after: timeout };
        }
        let lower = message.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            return Error::Tls { at, message };
        }
        if e.is_connect() {
            return Error::Unreachable { at, message };
        }
        // A BMC that drops the connection mid-answer (killed, rebooting) is unreachable
        // for the caller's purposes, and worth a retry.
        if e.is_request() || e.is_body() {
            return Error::Unreachable { at, message };
        }
        Error::Bmc { at, message }
    }

    /// The session token to send, logging in when needed; `None` means Basic
    /// authentication (sessions not asked for, no user, or no SessionService).
    async fn session_token(&self, op: &str) -> Result<Option<String>> {
        let Some(user) = (self.session_auth).then_some(()).and(self.user.as_ref()) else {
            return Ok(None);
        };
        if let Some(t) = self.ep.session(user) {
            return Ok(Some(t));
        }
        let sessions = self
            .sessions_path
            .get_or_try_init(|| self.find_sessions(op))
            .await?;
        let Some(sessions) = sessions else {
            return Ok(None);
        };
        let url = self.url(sessions, op)?;
        let at = || self.at(&format!("log in ({op}) (POST {})", url.path()));
        let timeout = self.ep.request_timeout;
        let resp = {
            let _permit = self.ep.limit.acquire().await.map_err(|_| Error::Bmc {
                at: at(),
                message: "the driver is shutting down".to_owned(),
            })?;
            self.ep
                .client
                .post(url.clone())
                .header(ACCEPT, "application/json")
                .json(&json!({ "UserName": user, "Password": self.password.expose() }))
                .send()
                .await
                .map_err(|e| self.transport_error(at(), timeout, &e))?
        };
        let status = resp.status();
        let token = resp
            .headers()
            .get("X-Auth-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = read_body(resp)
            .await
            .map_err(|e| self.transport_error(at(), timeout, &e))?;
        if !status.is_success() {
            let message = self.scrub(redfish_message(&bytes));
            return Err(if matches!(status.as_u16(), 400 | 401 | 403) {
                Error::Auth {
                    at: at(),
                    message: format!(
                        "Redfish session login failed for user {user} (HTTP {}; check user and \
                         password): {message}",
                        status.as_u16()
                    ),
                }
            } else {
                Error::Http {
                    at: at(),
                    status: status.as_u16(),
                    message,
                }
            });
        }
        let token = token.ok_or_else(|| Error::Bmc {
            at: at(),
            message: "the session login answer has no X-Auth-Token".to_owned(),
        })?;
        self.ep.set_session(user, Some(token.clone()));
        Ok(Some(token))
    }

    /// The Sessions collection, from the service root's `Links.Sessions` or its
    /// SessionService; `None` when the service offers no sessions.
    async fn find_sessions(&self, op: &str) -> Result<Option<String>> {
        let root = self.service_root(op).await?;
        if let Some(p) = odata_id(root.pointer("/Links/Sessions")) {
            return Ok(Some(p));
        }
        let Some(svc) = odata_id(root.get("SessionService")) else {
            return Ok(None);
        };
        // Read without credentials: the session service is what provides them.
        let url = self.url(&svc, op)?;
        let resp = self
            .ep
            .client
            .get(url)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .ok();
        let doc = match resp {
            Some(r) if r.status().is_success() => r.json::<Value>().await.ok(),
            _ => None,
        };
        Ok(doc
            .and_then(|d| odata_id(d.get("Sessions")))
            .or_else(|| Some(format!("{}/Sessions", svc.trim_end_matches('/')))))
    }

    async fn service_root(&self, op: &str) -> Result<&Value> {
        self.root
            .get_or_try_init(|| async {
                let mut attempt = 0;
                loop {
                    match self.fetch_root(op).await {
                        Err(e) if attempt < RETRY_BACKOFF.len() && retryable(&e) => {
                            tokio::time::sleep(RETRY_BACKOFF[attempt]).await;
                            attempt += 1;
                        }
                        other => return other,
                    }
                }
            })
            .await
    }

    /// Reads the service root once. The standard makes it unauthenticated, so it is read
    /// without credentials and session discovery needs none.
    async fn fetch_root(&self, op: &str) -> Result<Value> {
        let url = self.url("/redfish/v1/", op)?;
        let at = || self.at(&format!("{op} (GET /redfish/v1/)"));
        let timeout = self.ep.request_timeout;
        let _permit = self.ep.limit.acquire().await.map_err(|_| Error::Bmc {
            at: at(),
            message: "the driver is shutting down".to_owned(),
        })?;
        let resp = self
            .ep
            .client
            .get(url)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| self.transport_error(at(), timeout, &e))?;
        let status = resp.status();
        let bytes = read_body(resp)
            .await
            .map_err(|e| self.transport_error(at(), timeout, &e))?;
        if !status.is_success() {
            return Err(Error::Http {
                at: at(),
                status: status.as_u16(),
                message: self.scrub(redfish_message(&bytes)),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Bmc {
            at: at(),
            message: format!("the service root is not JSON: {e}"),
        })
    }

    /// The Systems collection's path.
    async fn systems_path(&self, op: &str) -> Result<String> {
        let root = self.service_root(op).await?;
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
        self.system
            .get_or_try_init(|| self.resolve_system(op))
            .await
            .map(String::as_str)
    }

    async fn resolve_system(&self, op: &str) -> Result<String> {
        let canonical = |reply: &Reply| {
            odata_id(Some(&reply.body)).unwrap_or_else(|| reply.url.path().to_owned())
        };
        match self.system_id.as_deref() {
            Some(id) if id.starts_with('/') || id.contains("://") => {
                let reply = self.get(op, id).await?;
                Ok(canonical(&reply))
            }
            Some(id) => {
                let systems = self.systems_path(op).await?;
                let mut url = self.url(&systems, op)?;
                if let Ok(mut segs) = url.path_segments_mut() {
                    segs.pop_if_empty().push(id);
                }
                // sushy answers a system's name with a redirect to its id, which reqwest
                // follows; other BMCs only know the id, so on 404 match by name or UUID.
                match self.get(op, url.as_str()).await {
                    Ok(reply) => Ok(canonical(&reply)),
                    Err(Error::Http { status: 404, .. }) => {
                        self.find_system(op, &systems, id).await
                    }
                    Err(e) => Err(e),
                }
            }
            None => {
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
        self.call(
            &op,
            Method::POST,
            &target,
            Some(&json!({ "ResetType": reset_type })),
            None,
        )
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
        match self.call(op, Method::PATCH, &path, Some(&body), None).await {
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
                self.call(op, Method::PATCH, &path, Some(&body), Some(headers))
                    .await
                    .map(drop)
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

    /// The virtual CD/DVD drive's path: the VirtualMedia collections linked from the
    /// System and from its Managers, searched for a member whose MediaTypes include CD or
    /// DVD (or, failing that, whose id looks like a CD drive).
    async fn cd_path(&self, op: &str) -> Result<&str> {
        self.cd
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
                let mut by_id = None;
                for coll in &collections {
                    let Ok(c) = self.get(op, coll).await else {
                        continue;
                    };
                    for member in members(&c.body) {
                        let Ok(m) = self.get(op, &member).await else {
                            continue;
                        };
                        let types = m.body.get("MediaTypes").and_then(Value::as_array);
                        let is_cd = types.is_some_and(|t| {
                            t.iter().filter_map(Value::as_str).any(|t| {
                                t.eq_ignore_ascii_case("CD") || t.eq_ignore_ascii_case("DVD")
                            })
                        });
                        if is_cd {
                            return Ok(member);
                        }
                        let id = m.body.get("Id").and_then(Value::as_str).unwrap_or("");
                        if by_id.is_none() && id.to_ascii_lowercase().starts_with("cd") {
                            by_id = Some(member);
                        }
                    }
                }
                by_id.ok_or_else(|| Error::Unsupported {
                    at: self.at(op),
                    message: if collections.is_empty() {
                        "neither the System nor its Managers link to VirtualMedia".to_owned()
                    } else {
                        format!("no virtual CD/DVD drive in {}", collections.join(", "))
                    },
                })
            })
            .await
            .map(String::as_str)
    }

    async fn do_media_insert(&self, image: String) -> Result<()> {
        let op = INSERT_MEDIA;
        let path = self.cd_path(op).await?.to_owned();
        let doc = self.get(op, &path).await?;
        let body = json!({ "Image": image, "Inserted": true, "WriteProtected": true });
        match action_target(&doc.body, "#VirtualMedia.InsertMedia") {
            Some(target) => {
                self.call(op, Method::POST, &target, Some(&body), None)
                    .await
            }
            // Before Redfish 2017.1 media was inserted by patching the resource.
            None => self.call(op, Method::PATCH, &path, Some(&body), None).await,
        }
        .map(drop)
    }

    async fn do_media_eject(&self) -> Result<()> {
        let op = "eject virtual media";
        let path = self.cd_path(op).await?.to_owned();
        let doc = self.get(op, &path).await?;
        match action_target(&doc.body, "#VirtualMedia.EjectMedia") {
            Some(target) => {
                self.call(op, Method::POST, &target, Some(&json!({})), None)
                    .await
            }
            None => {
                let body = json!({ "Image": null, "Inserted": false });
                self.call(op, Method::PATCH, &path, Some(&body), None).await
            }
        }
        .map(drop)
    }

    async fn do_media_status(&self) -> Result<MediaStatus> {
        let op = "read virtual media";
        let path = self.cd_path(op).await?.to_owned();
        let doc = self.get(op, &path).await?.body;
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

    fn virtual_media_insert(&self, image: String) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_media_insert(image))
    }

    fn virtual_media_eject(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_media_eject())
    }

    fn virtual_media_status(&self) -> BoxFuture<'_, Result<MediaStatus>> {
        Box::pin(self.do_media_status())
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Value>> {
        Box::pin(self.do_inventory())
    }
}

/// `scheme://host:port/` from an OBM's `host` (a bare host, `host:port` or a URL) and
/// `port`; a bare host means HTTPS.
fn base_url(host: &str, port: Option<u16>) -> Result<Url, String> {
    let host = host.trim();
    if host.is_empty() {
        return Err("'host' is empty; give the BMC's address or base URL".to_owned());
    }
    let with_scheme = if host.contains("://") {
        host.to_owned()
    } else if host.matches(':').count() > 1 && !host.starts_with('[') {
        // A bare IPv6 address.
        format!("https://[{host}]")
    } else {
        format!("https://{host}")
    };
    let mut url =
        Url::parse(&with_scheme).map_err(|e| format!("'host' is not a usable address: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "'host' must be http:// or https://, got {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("'host' has no host name".to_owned());
    }
    // Credentials belong in `user` and `password`, never in the URL we show in messages.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if let Some(port) = port {
        let _ = url.set_port(Some(port));
    }
    url.set_path("/");
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Whether an error of a GET is worth another try.
fn retryable(e: &Error) -> bool {
    matches!(e, Error::Unreachable { .. })
        || matches!(e, Error::Http { status, .. } if matches!(status, 500 | 502 | 503 | 504))
}

/// Reads a body, refusing one larger than [`MAX_BODY_BYTES`] (reported as a body error).
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > MAX_BODY_BYTES {
            // Keep what fits: the caller only needs the start of an oversized answer to
            // report it, and a body this size is never a valid Redfish document.
            out.extend_from_slice(&chunk[..MAX_BODY_BYTES - out.len()]);
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The BMC's own words from an error body: every `@Message.ExtendedInfo[].Message`, else
/// `error.message`, else the start of the body as text.
fn redfish_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let err = v.get("error").unwrap_or(&v);
        let extended: Vec<&str> = err
            .get("@Message.ExtendedInfo")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|i| i.get("Message").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        if !extended.is_empty() {
            return extended.join("; ");
        }
        if let Some(m) = err.get("message").and_then(Value::as_str) {
            return m.to_owned();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(no message)".to_owned();
    }
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// `@odata.id` of a link object.
fn odata_id(link: Option<&Value>) -> Option<String> {
    link?
        .get("@odata.id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The `@odata.id`s of an array of links.
fn links(array: Option<&Value>) -> Vec<String> {
    array
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|l| odata_id(Some(l))).collect())
        .unwrap_or_default()
}

/// The member paths of a collection.
fn members(collection: &Value) -> Vec<String> {
    links(collection.get("Members"))
}

fn action_target(doc: &Value, action: &str) -> Option<String> {
    doc.get("Actions")?
        .get(action)?
        .get("target")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// An error with its sources, so that "error sending request" says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let cases = [
            ("10.0.0.5", None, "https://10.0.0.5/"),
            ("10.0.0.5", Some(8443), "https://10.0.0.5:8443/"),
            ("http://127.0.0.1:8000", None, "http://127.0.0.1:8000/"),
            (
                "https://admin:pw@bmc.example:8443/redfish/v1",
                None,
                "https://bmc.example:8443/",
            ),
            ("fe80::1", None, "https://[fe80::1]/"),
        ];
        for (host, port, want) in cases {
            assert_eq!(base_url(host, port).unwrap().as_str(), want, "{host}");
        }
        assert!(base_url("", None).is_err());
        assert!(base_url("ftp://x", None).is_err());
    }

    #[test]
    fn bmc_messages() {
        let cases = [
            (
                r#"{"error":{"code":"Base.1.0.GeneralError","message":"A general error","@Message.ExtendedInfo":[{"Message":"Disk on fire."},{"Message":"Really."}]}}"#,
                "Disk on fire.; Really.",
            ),
            (r#"{"error":{"message":"Nope"}}"#, "Nope"),
            ("plain text failure\n", "plain text failure"),
            ("", "(no message)"),
        ];
        for (body, want) in cases {
            assert_eq!(redfish_message(body.as_bytes()), want);
        }
    }
}
