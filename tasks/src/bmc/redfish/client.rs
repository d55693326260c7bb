//! The one send path to a Redfish BMC: every HTTP request the driver makes goes through
//! [`Client::send`].
//!
//! `send` resolves the request's link against the BMC's base URL and refuses one that
//! leaves the BMC's origin, takes the endpoint's concurrency permit, applies the timeout,
//! authenticates (Basic, or a session token with one fresh login when the BMC answers
//! 401), caps the body it reads, retries GETs on connection failures and server errors
//! (never other methods: a repeated action is not always harmless), and turns every failure
//! into an [`Error`] that carries the BMC's `@Message.ExtendedInfo` and no secret.
//!
//! Also here, because authentication needs them: the [`RedfishEndpoint`] that drivers of
//! one BMC share (the pooled client, whose redirects stay on the BMC's origin, the limit and
//! the session tokens), the service root and the discovery of the Sessions collection.
//!
//! Invariant: no request leaves this file for an origin other than the OBM's base URL, so
//! neither the Basic credentials, the session token nor the login's password ever reach
//! another server, whatever links, action targets or redirects the BMC sends.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metalgraph_engine::job::BoxFuture;
use metalgraph_engine::nodes::Secret;
use reqwest::header::{ACCEPT, HeaderMap, LOCATION};
use reqwest::{Method, StatusCode, Url, redirect};
use serde_json::{Value, json};
use tokio::sync::{OnceCell, Semaphore};

use super::links::{self, LinkError, odata_id};
use crate::bmc::{At, DriverOptions, Error, Result};

/// Which certificates a Redfish endpoint accepts: the system's CAs (the default), the
/// OBM's own CA (`caCert`), or any (`verifySSL: false`). Part of the endpoint's key, so
/// that one BMC reached under two policies gets two clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Trust {
    System,
    Ca(String),
    Anything,
}

impl Trust {
    /// An OBM's policy: `verifySSL: false` wins over `caCert`.
    pub fn of(config: &metalgraph_engine::nodes::ObmConfig) -> Trust {
        match (config.verify_ssl, &config.ca_cert) {
            (Some(false), _) => Trust::Anything,
            (_, Some(pem)) if !pem.trim().is_empty() => Trust::Ca(pem.clone()),
            _ => Trust::System,
        }
    }
}

/// The largest reply body read from a BMC; Redfish documents are small, and a reply larger
/// than this is a broken or hostile BMC.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Backoff before each retry of an idempotent request (two retries).
const RETRY_BACKOFF: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(600)];

/// How many redirects within the BMC's origin one request follows (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// The header a Redfish session token travels in.
const AUTH_TOKEN: &str = "X-Auth-Token";

/// What a Redfish BMC endpoint (one base URL, one TLS policy) shares across jobs: a pooled
/// HTTP client, a concurrency limit and the session tokens of its users.
pub struct RedfishEndpoint {
    client: reqwest::Client,
    /// Requests in flight to this BMC at once; BMCs have small session tables.
    limit: Semaphore,
    request_timeout: Duration,
    /// The timeout of a virtual media insert, which BMCs answer only once they have
    /// downloaded the whole image.
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
    pub(crate) fn new(options: &DriverOptions, trust: &Trust) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("metalgraph/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .timeout(options.request_timeout);
        builder = match trust {
            Trust::System => builder,
            // BMCs commonly run with self-signed certificates; `verifySSL: false` is the
            // operator's explicit choice for those.
            Trust::Anything => builder.danger_accept_invalid_certs(true),
            // A private CA: it alone is trusted for this BMC.
            Trust::Ca(pem) => {
                let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                    .map_err(|e| format!("caCert is not a PEM certificate: {e}"))?;
                if certs.is_empty() {
                    return Err("caCert holds no PEM certificate".to_owned());
                }
                certs
                    .into_iter()
                    .fold(builder.tls_built_in_root_certs(false), |b, c| {
                        b.add_root_certificate(c)
                    })
            }
        };
        let client = builder
            .pool_max_idle_per_host(options.per_endpoint_limit.max(1))
            .redirect(same_origin_redirects())
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

/// Redirects are followed only within the origin of the request that met them. reqwest
/// drops `Authorization` on a redirect to another host, but not `X-Auth-Token`, and it
/// keeps both on a switch from https to http; so a redirect that leaves the origin is not
/// followed at all, and [`Client::send`] reports it.
fn same_origin_redirects() -> redirect::Policy {
    redirect::Policy::custom(|attempt| {
        let leaves = attempt
            .previous()
            .first()
            .is_some_and(|first| !links::same_origin(first, attempt.url()));
        if leaves {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// How a request authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Auth {
    /// As the OBM's user: with a session token when the OBM asks for sessions and the
    /// service has a SessionService, with Basic authentication otherwise.
    User,
    /// Without credentials: the service root and the session service, which Redfish
    /// leaves open (the login's credentials are in its body).
    Anonymous,
}

/// One request, as an operation describes it to [`Client::send`].
pub(super) struct Request<'a> {
    /// The operation, for messages (`power on`).
    op: &'a str,
    method: Method,
    /// A path or URL, from configuration or from the BMC's JSON.
    target: &'a str,
    body: Option<&'a Value>,
    headers: HeaderMap,
    auth: Auth,
    /// Whether the media timeout applies instead of the request timeout.
    slow: bool,
    /// Whether the answer's body is read as JSON; a login's is not needed.
    json: bool,
}

impl<'a> Request<'a> {
    pub(super) fn new(op: &'a str, method: Method, target: &'a str) -> Self {
        Self {
            op,
            method,
            target,
            body: None,
            headers: HeaderMap::new(),
            auth: Auth::User,
            slow: false,
            json: true,
        }
    }

    pub(super) fn get(op: &'a str, target: &'a str) -> Self {
        Self::new(op, Method::GET, target)
    }

    /// A JSON body (sent with `Content-Type: application/json`, without which sushy and
    /// others answer 415).
    pub(super) fn body(mut self, body: &'a Value) -> Self {
        self.body = Some(body);
        self
    }

    pub(super) fn headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    pub(super) fn anonymous(mut self) -> Self {
        self.auth = Auth::Anonymous;
        self
    }

    /// The media timeout: BMCs download the whole image before they answer an insert.
    pub(super) fn slow(mut self) -> Self {
        self.slow = true;
        self
    }

    fn ignore_body(mut self) -> Self {
        self.json = false;
        self
    }
}

/// A successful answer: its headers, the final URL (after redirects within the origin)
/// and the JSON body (`Null` when empty or not asked for).
pub(super) struct Reply {
    pub(super) headers: HeaderMap,
    pub(super) url: Url,
    pub(super) body: Value,
}

/// One exchange's answer, before [`Client::send`] judges it.
struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    url: Url,
    /// The body, at most [`MAX_BODY_BYTES`] of it.
    bytes: Vec<u8>,
    /// Whether the body was longer than what `bytes` holds.
    truncated: bool,
}

/// A Redfish service as one OBM user talks to it: the shared endpoint, the credentials,
/// and what the send path learns once (the service root, where sessions are made).
#[derive(Clone)]
pub(super) struct Client {
    /// The node, for messages.
    node: String,
    /// `scheme://host:port/`, without credentials or path; every request stays on its
    /// origin.
    base: Url,
    ep: Arc<RedfishEndpoint>,
    user: Option<String>,
    password: Secret,
    /// Whether to log in through the SessionService (`extra.auth: session`) when the
    /// service has one; Basic authentication otherwise.
    session_auth: bool,
    /// The service root, read once.
    root: OnceCell<Value>,
    /// The SessionService's Sessions collection, or `None` when the service has none.
    sessions_path: OnceCell<Option<String>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("node", &self.node)
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .field("session_auth", &self.session_auth)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(super) fn new(
        node: &str,
        base: Url,
        ep: Arc<RedfishEndpoint>,
        user: Option<String>,
        password: Secret,
        session_auth: bool,
    ) -> Self {
        Self {
            node: node.to_owned(),
            base,
            ep,
            user,
            password,
            session_auth,
            root: OnceCell::new(),
            sessions_path: OnceCell::new(),
        }
    }

    /// The base URL as messages show it.
    pub(super) fn base_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    pub(super) fn at(&self, operation: &str) -> At {
        At {
            node: self.node.clone(),
            endpoint: self.base_url(),
            operation: operation.to_owned(),
        }
    }

    /// `link` as a URL on the BMC's origin, or an error naming the operation and saying
    /// why it cannot be followed.
    pub(super) fn resolve(&self, op: &str, link: &str) -> Result<Url> {
        links::resolve(&self.base, link).map_err(|e| Error::Bmc {
            at: self.at(op),
            message: match e {
                LinkError::Unusable(why) => {
                    format!(
                        "the BMC gave an unusable link '{}': {why}",
                        self.scrub(link)
                    )
                }
                LinkError::CrossOrigin => format!(
                    "refused to follow '{}': it leaves the BMC's origin {}, and credentials \
                     go only to the BMC",
                    self.scrub(link),
                    self.base_url()
                ),
            },
        })
    }

    /// A GET as the OBM's user.
    pub(super) async fn get(&self, op: &str, target: &str) -> Result<Reply> {
        self.send(Request::get(op, target)).await
    }

    /// Sends one request: the only way the driver talks to the BMC (see the module docs
    /// for what it applies).
    pub(super) async fn send(&self, req: Request<'_>) -> Result<Reply> {
        // Before anything else, so that a link elsewhere costs no login either.
        let url = self.resolve(req.op, req.target)?;
        let at = || self.at(&format!("{} ({} {})", req.op, req.method, url.path()));
        let retries = if req.method == Method::GET {
            RETRY_BACKOFF.len()
        } else {
            0
        };
        let mut attempt = 0;
        let mut relogged = false;
        loop {
            let token = match req.auth {
                Auth::User => self.session_token(req.op).await?,
                Auth::Anonymous => None,
            };
            let outcome = match self.exchange(&req, &url, token.as_deref(), &at).await {
                Ok(raw) if raw.status == StatusCode::UNAUTHORIZED && token.is_some() => {
                    if !relogged {
                        // The session expired or the BMC restarted: log in again, once.
                        self.forget_session();
                        relogged = true;
                        continue;
                    }
                    self.judge(&req, raw, &at)
                }
                Ok(raw) => self.judge(&req, raw, &at),
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if attempt < retries && retryable(&e) => {
                    tracing::debug!(node = %self.node, endpoint = %self.base_url(), operation = req.op, error = %e, "retrying");
                    tokio::time::sleep(RETRY_BACKOFF[attempt]).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One HTTP exchange under the endpoint's concurrency permit, its body read up to the
    /// cap. Transport failures come back as errors; any status as a [`Raw`] answer.
    async fn exchange(
        &self,
        req: &Request<'_>,
        url: &Url,
        token: Option<&str>,
        at: &impl Fn() -> At,
    ) -> Result<Raw> {
        let timeout = if req.slow {
            self.ep.media_timeout
        } else {
            self.ep.request_timeout
        };
        let mut builder = self
            .ep
            .client
            .request(req.method.clone(), url.clone())
            .timeout(timeout)
            .header(ACCEPT, "application/json")
            .headers(req.headers.clone());
        if let Some(body) = req.body {
            builder = builder.json(body);
        }
        builder = match (req.auth, token, &self.user) {
            (Auth::Anonymous, _, _) | (Auth::User, None, None) => builder,
            (Auth::User, Some(token), _) => builder.header(AUTH_TOKEN, token),
            (Auth::User, None, Some(user)) => {
                builder.basic_auth(user, Some(self.password.expose()))
            }
        };
        let _permit = self.ep.limit.acquire().await.map_err(|_| Error::Bmc {
            at: at(),
            message: "the driver is shutting down".to_owned(),
        })?;
        let fail = |e: reqwest::Error| self.transport_error(at(), timeout, &e);
        let resp = builder.send().await.map_err(fail)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let final_url = resp.url().clone();
        let (bytes, truncated) = read_body(resp).await.map_err(fail)?;
        Ok(Raw {
            status,
            headers,
            url: final_url,
            bytes,
            truncated,
        })
    }

    /// A [`Reply`] for a success, otherwise an error in the BMC's own words.
    fn judge(&self, req: &Request<'_>, raw: Raw, at: &impl Fn() -> At) -> Result<Reply> {
        if raw.status.is_success() {
            if raw.truncated {
                return Err(Error::Bmc {
                    at: at(),
                    message: format!(
                        "the BMC's answer is larger than {} MiB, which no Redfish document is",
                        MAX_BODY_BYTES / (1024 * 1024)
                    ),
                });
            }
            let body = if !req.json || raw.bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&raw.bytes).map_err(|e| Error::Bmc {
                    at: at(),
                    message: format!("the BMC's answer is not JSON: {e}"),
                })?
            };
            return Ok(Reply {
                headers: raw.headers,
                url: raw.url,
                body,
            });
        }
        // A redirect reaches here only when the client refused to follow it.
        if raw.status.is_redirection()
            && let Some(location) = raw.headers.get(LOCATION).and_then(|v| v.to_str().ok())
            && links::resolve(&raw.url, location) == Err(LinkError::CrossOrigin)
        {
            return Err(Error::Bmc {
                at: at(),
                message: format!(
                    "refused to follow the BMC's redirect to '{}': it leaves the BMC's \
                     origin {}, and credentials go only to the BMC",
                    self.scrub(location),
                    self.base_url()
                ),
            });
        }
        let message = self.scrub(redfish_message(&raw.bytes));
        Err(
            if raw.status == StatusCode::UNAUTHORIZED && req.auth == Auth::User {
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
                    status: raw.status.as_u16(),
                    message,
                }
            },
        )
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
        // for the caller's purposes, and worth a retry. reqwest reports a body cut short as
        // a body error or, once the body passes its decoder, as a decode error; we parse
        // JSON ourselves, so a decode error here is always the body cut short.
        if e.is_request() || e.is_body() || e.is_decode() {
            return Error::Unreachable { at, message };
        }
        Error::Bmc { at, message }
    }

    /// Removes the password from text a BMC sent back, in case it echoes a request body.
    /// Very short passwords are left alone, since replacing them would mangle the message
    /// without protecting much.
    fn scrub(&self, text: impl Into<String>) -> String {
        let text = text.into();
        let secret = self.password.expose();
        if secret.len() >= 4 && text.contains(secret) {
            text.replace(secret, "<redacted>")
        } else {
            text
        }
    }

    /// The user that logs in through the SessionService, if sessions are asked for.
    fn session_user(&self) -> Option<&str> {
        self.user.as_deref().filter(|_| self.session_auth)
    }

    fn forget_session(&self) {
        if let Some(user) = self.session_user() {
            self.ep.set_session(user, None);
        }
    }

    /// The session token to send, logging in when needed; `None` means Basic
    /// authentication (sessions not asked for, no user, or no SessionService).
    ///
    /// Boxed, since the login is itself a request through [`Self::send`].
    fn session_token<'a>(&'a self, op: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let Some(user) = self.session_user() else {
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
            let token = self.login(op, user, sessions).await?;
            self.ep.set_session(user, Some(token.clone()));
            Ok(Some(token))
        })
    }

    /// Creates a session in the Sessions collection; the token comes back as a header.
    async fn login(&self, op: &str, user: &str, sessions: &str) -> Result<String> {
        let op = format!("log in ({op})");
        let credentials = json!({ "UserName": user, "Password": self.password.expose() });
        let request = Request::new(&op, Method::POST, sessions)
            .body(&credentials)
            .anonymous()
            .ignore_body();
        let reply = self.send(request).await.map_err(|e| match e {
            Error::Http {
                at,
                status: status @ (400 | 401 | 403),
                message,
            } => Error::Auth {
                at,
                message: format!(
                    "Redfish session login failed for user {user} (HTTP {status}; check user \
                     and password): {message}"
                ),
            },
            other => other,
        })?;
        reply
            .headers
            .get(AUTH_TOKEN)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Error::Bmc {
                at: self.at(&format!("{op} (POST {})", reply.url.path())),
                message: "the session login answer has no X-Auth-Token".to_owned(),
            })
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
        // Read without credentials: the session service is what provides them. A BMC that
        // wants credentials even for this keeps its Sessions at the standard place.
        let doc = match self.send(Request::get(op, &svc).anonymous()).await {
            Ok(reply) => Some(reply.body),
            Err(Error::Http { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(doc
            .and_then(|d| odata_id(d.get("Sessions")))
            .or_else(|| Some(format!("{}/Sessions", svc.trim_end_matches('/')))))
    }

    /// The service root, read once. The standard leaves it unauthenticated, so it is read
    /// without credentials and session discovery needs none.
    pub(super) async fn service_root(&self, op: &str) -> Result<&Value> {
        self.root
            .get_or_try_init(|| async {
                let reply = self
                    .send(Request::get(op, "/redfish/v1/").anonymous())
                    .await?;
                Ok(reply.body)
            })
            .await
    }
}

/// Whether an error of a GET is worth another try.
fn retryable(e: &Error) -> bool {
    matches!(e, Error::Unreachable { .. })
        || matches!(e, Error::Http { status, .. } if matches!(status, 500 | 502 | 503 | 504))
}

/// Reads a body up to [`MAX_BODY_BYTES`], and says whether there was more. Only the cap is
/// ever held in memory, however much the BMC sends.
async fn read_body(mut resp: reqwest::Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        // Keep nothing: an error message needs only the start, and a declared size this
        // large is reason enough to stop.
        return Ok((Vec::new(), true));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > MAX_BODY_BYTES {
            // Keep what fits: the caller only needs the start of an oversized answer to
            // report it, and a body this size is never a valid Redfish document.
            out.extend_from_slice(&chunk[..MAX_BODY_BYTES - out.len()]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
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
