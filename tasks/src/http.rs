//! `http.request`: calls a REST service; its reply becomes the task's output, so later
//! tasks can feed it onward through `context.<label>`.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, StatusCode, Url};
use serde_json::{Map, Value, json};

/// The largest response body the job reads. A task output is persisted with its workflow,
/// so an unbounded reply must fail the task rather than fill the store.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// How much of a response body an error message quotes.
const ERROR_BODY_CHARS: usize = 500;

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Query parameters whose values are hidden in error messages, matched as substrings of
/// the lower-cased parameter name.
const SECRET_QUERY_WORDS: &[&str] = &[
    "pass",
    "secret",
    "token",
    "key",
    "auth",
    "sig",
    "session",
    "credential",
];

/// Sends one HTTP request and returns `{status, headers, body}`.
///
/// Each instance owns two connection pools (one verifying TLS certificates, one not),
/// built on first use and shared by every task that runs the job.
pub struct HttpRequestJob {
    schema: OptionSchema,
    clients: Arc<Clients>,
}

impl fmt::Debug for HttpRequestJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRequestJob").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Clients {
    verifying: OnceLock<Result<Client, String>>,
    insecure: OnceLock<Result<Client, String>>,
}

impl Clients {
    fn get(&self, verify_tls: bool) -> Result<Client, JobError> {
        let cell = if verify_tls {
            &self.verifying
        } else {
            &self.insecure
        };
        cell.get_or_init(|| build_client(verify_tls))
            .clone()
            .map_err(|e| JobError::new(format!("cannot build the HTTP client: {e}")))
    }
}

fn build_client(verify_tls: bool) -> Result<Client, String> {
    Client::builder()
        .user_agent(concat!("metalgraph/", env!("CARGO_PKG_VERSION")))
        // BMCs and lab services commonly run with self-signed certificates; `verifySSL:
        // false` is the operator's explicit choice for those.
        .danger_accept_invalid_certs(!verify_tls)
        // Headers a graph gives (`Authorization`, `X-Api-Key`, ...) must never reach another
        // origin: redirects are followed within the request's origin only; a redirect
        // elsewhere is answered as it came (a 3xx the task then reports).
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let first = attempt.previous().first().cloned();
            if attempt.previous().len() > 10 {
                attempt.error("more than 10 redirects")
            } else if first.is_some_and(|f| f.origin() == attempt.url().origin()) {
                attempt.follow()
            } else {
                attempt.stop()
            }
        }))
        .build()
        .map_err(|e| error_chain(&e))
}

impl Default for HttpRequestJob {
    fn default() -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "url",
                    OptionKind::String,
                    "the http:// or https:// URL to call",
                )
                .optional(
                    "method",
                    OptionKind::Enum(METHODS),
                    Some(Value::from("GET")),
                    "the HTTP method: GET, POST, PUT, PATCH, DELETE or HEAD",
                )
                .optional(
                    "headers",
                    OptionKind::Object,
                    Some(Value::Object(Map::new())),
                    "request headers, name to string value; values never appear in errors",
                )
                .optional(
                    "body",
                    OptionKind::Any,
                    None,
                    "the request body: JSON, or a string sent as-is (text/plain unless \
                     headers give a content-type)",
                )
                .optional(
                    "expectStatus",
                    OptionKind::Any,
                    None,
                    "the acceptable status code or list of codes; any 2xx when absent",
                )
                .optional(
                    "timeout",
                    OptionKind::Duration,
                    Some(Value::from("30s")),
                    "how long the whole exchange may take, body included",
                )
                .optional(
                    "verifySSL",
                    OptionKind::Bool,
                    Some(Value::Bool(true)),
                    "whether to verify the server's TLS certificate",
                ),
            clients: Arc::default(),
        }
    }
}

impl Job for HttpRequestJob {
    fn name(&self) -> &'static str {
        "http.request"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let request = Request::from_options(&ctx, &self.clients);
        Box::pin(async move {
            let request = request?;
            let what = request.describe();
            let timeout = request.timeout;
            tokio::select! {
                // Cancellation wins a tie, so a cancelled task never reports success.
                // Dropping the exchange future aborts the request and its connection.
                biased;
                _ = ctx.cancel.cancelled() => Err(JobError::new(format!("{what}: cancelled"))),
                outcome = tokio::time::timeout(timeout, request.exchange()) => {
                    outcome.unwrap_or_else(|_| {
                        Err(JobError::new(format!(
                            "{what}: timed out after {}",
                            show_duration(timeout)
                        )))
                    })
                }
            }
        })
    }
}

/// One request, parsed and checked from the task's options.
struct Request {
    client: Client,
    method: Method,
    /// The URL as given, userinfo included: reqwest moves userinfo into an `Authorization:
    /// Basic` header (unless `headers` gives one) and strips it from the URL it sends.
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    expect: Expect,
    timeout: Duration,
}

impl Request {
    fn from_options(ctx: &JobContext, clients: &Clients) -> Result<Self, JobError> {
        let method = match ctx.str_opt("method").unwrap_or("GET") {
            m if METHODS.contains(&m) => Method::from_bytes(m.as_bytes())
                .map_err(|_| JobError::new(format!("option 'method': invalid method {m}")))?,
            other => {
                return Err(JobError::new(format!(
                    "option 'method' must be one of {}, got {other}",
                    METHODS.join(", ")
                )));
            }
        };
        let url = parse_url(ctx.str_required("url")?)?;
        let mut headers = parse_headers(ctx.options.get("headers"))?;
        let body = match ctx.options.get("body") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => {
                default_content_type(&mut headers, "text/plain; charset=utf-8");
                Some(text.clone().into_bytes())
            }
            Some(value) => {
                default_content_type(&mut headers, "application/json");
                Some(serde_json::to_vec(value).map_err(|e| {
                    JobError::new(format!("option 'body' cannot be encoded as JSON: {e}"))
                })?)
            }
        };
        let expect = Expect::parse(ctx.options.get("expectStatus"))
            .map_err(|e| JobError::new(format!("option 'expectStatus' {e}")))?;
        let timeout = ctx.duration_or("timeout", DEFAULT_TIMEOUT)?;
        let client = clients.get(ctx.bool_or("verifySSL", true))?;
        Ok(Self {
            client,
            method,
            url,
            headers,
            body,
            expect,
            timeout,
        })
    }

    /// `METHOD url` for messages, with userinfo and secret-looking query values hidden.
    fn describe(&self) -> String {
        format!("{} {}", self.method, redact_url(&self.url))
    }

    async fn exchange(self) -> JobResult {
        let what = self.describe();
        let mut builder = self
            .client
            .request(self.method.clone(), self.url)
            .headers(self.headers);
        if let Some(body) = self.body {
            builder = builder.body(body);
        }
        let mut response = builder
            .send()
            .await
            .map_err(|e| JobError::new(format!("{what}: {}", error_chain(&e.without_url()))))?;

        let status = response.status();
        let headers = headers_to_json(response.headers());
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);

        // A declared length over the limit fails before any of the body is read. HEAD
        // replies declare the length of a body they never send, so they are exempt.
        if self.method != Method::HEAD
            && let Some(len) = response.content_length()
            && len > MAX_RESPONSE_BYTES as u64
        {
            return Err(too_large(&what, status));
        }
        let mut raw = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            JobError::new(format!(
                "{what}: reading the {status} response failed: {}",
                error_chain(&e.without_url())
            ))
        })? {
            if raw.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(too_large(&what, status));
            }
            raw.extend_from_slice(&chunk);
        }

        if !self.expect.accepts(status) {
            let text = String::from_utf8_lossy(&raw);
            let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
            let more = if text.chars().nth(ERROR_BODY_CHARS).is_some() {
                "..."
            } else {
                ""
            };
            return Err(JobError::new(format!(
                "{what}: got status {status}, expected {}; body: {excerpt}{more}",
                self.expect
            )));
        }

        Ok(json!({
            "status": status.as_u16(),
            "headers": headers,
            "body": decode_body(content_type.as_deref(), raw),
        }))
    }
}

fn too_large(what: &str, status: StatusCode) -> JobError {
    JobError::new(format!(
        "{what}: the {status} response body exceeds the limit of {} MiB",
        MAX_RESPONSE_BYTES / (1024 * 1024)
    ))
}

fn parse_url(raw: &str) -> Result<Url, JobError> {
    // The raw string may carry a password, so a parse error names only the reason.
    let url = Url::parse(raw.trim())
        .map_err(|e| JobError::new(format!("option 'url' is not a valid URL: {e}")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(JobError::new(format!(
            "option 'url' must be an http or https URL, not {other}:"
        ))),
    }
}

fn parse_headers(value: Option<&Value>) -> Result<HeaderMap, JobError> {
    let mut headers = HeaderMap::new();
    let map = match value {
        None | Some(Value::Null) => return Ok(headers),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(JobError::new("option 'headers' must be an object")),
    };
    for (name, value) in map {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            JobError::new(format!("option 'headers': invalid header name {name:?}"))
        })?;
        // Header values are never quoted in messages: they are where tokens live.
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Number(_) | Value::Bool(_) => value.to_string(),
            _ => {
                return Err(JobError::new(format!(
                    "option 'headers': the value of {name} must be a string"
                )));
            }
        };
        let mut header_value = HeaderValue::try_from(text).map_err(|_| {
            JobError::new(format!(
                "option 'headers': the value of {name} is not a valid header value"
            ))
        })?;
        // Sensitive values are left out of the HTTP stack's debug output.
        header_value.set_sensitive(true);
        headers.append(header, header_value);
    }
    Ok(headers)
}

fn default_content_type(headers: &mut HeaderMap, content_type: &'static str) {
    if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
}

/// Which statuses count as success.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    AnySuccess,
    Codes(Vec<u16>),
}

impl Expect {
    /// Accepts an integer, a list of integers, or (since templates render strings) either
    /// of those as text: `200`, `[200, 204]`, `"200"`, `"[200, 204]"`.
    fn parse(value: Option<&Value>) -> Result<Self, String> {
        let codes = match value {
            None | Some(Value::Null) => return Ok(Self::AnySuccess),
            Some(Value::Array(items)) => items.iter().map(status_code).collect::<Result<_, _>>()?,
            Some(Value::String(s)) if s.trim_start().starts_with('[') => {
                let parsed: Value = serde_json::from_str(s)
                    .map_err(|_| format!("must be a status code or a list of them, got {s}"))?;
                return Self::parse(Some(&parsed));
            }
            Some(single) => vec![status_code(single)?],
        };
        Ok(Self::Codes(codes))
    }

    fn accepts(&self, status: StatusCode) -> bool {
        match self {
            Self::AnySuccess => status.is_success(),
            Self::Codes(codes) => codes.contains(&status.as_u16()),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AnySuccess => f.write_str("2xx"),
            Self::Codes(codes) => {
                let codes: Vec<String> = codes.iter().map(u16::to_string).collect();
                f.write_str(&codes.join(" or "))
            }
        }
    }
}

fn status_code(value: &Value) -> Result<u16, String> {
    let code = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match code {
        Some(c @ 100..=599) => Ok(c as u16),
        _ => Err(format!("must hold status codes (100 to 599), got {value}")),
    }
}

/// Response headers that carry credentials; the output keeps their names (so a graph can
/// see that a session was issued) but never their values, since outputs are stored and
/// shown in the workflow context.
const SECRET_HEADERS: &[&str] = &[
    "set-cookie",
    "x-auth-token",
    "authorization",
    "proxy-authorization",
    "x-subject-token",
];

/// Response headers as `{name: value}` with lower-case names; repeated headers are joined
/// with `, ` as HTTP allows, and credential-bearing headers are redacted.
fn headers_to_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        if SECRET_HEADERS.contains(&name.as_str()) {
            out.insert(name.as_str().to_owned(), Value::from("<redacted>"));
            continue;
        }
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        out.insert(name.as_str().to_owned(), Value::from(values.join(", ")));
    }
    Value::Object(out)
}

/// The body as JSON when the reply says it is JSON (or says nothing and parses as JSON),
/// else as text. A JSON reply that does not parse is kept as text rather than failing
/// the task, so the next task (or the operator) can still see what came back.
fn decode_body(content_type: Option<&str>, raw: Vec<u8>) -> Value {
    let json_declared = content_type.is_some_and(|ct| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        essence == "application/json" || essence.ends_with("+json")
    });
    if json_declared && raw.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    if (json_declared || content_type.is_none())
        && let Ok(value) = serde_json::from_slice(&raw)
    {
        return value;
    }
    match String::from_utf8(raw) {
        Ok(text) => Value::String(text),
        Err(e) => Value::String(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// The URL for messages: no userinfo, no fragment, and secret-looking query values hidden.
fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    // Both only fail for URLs that cannot have userinfo, which then has none to hide.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    if shown.query().is_some() {
        let mut hid = false;
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(k, v)| {
                let lower = k.to_ascii_lowercase();
                if SECRET_QUERY_WORDS.iter().any(|w| lower.contains(w)) {
                    hid = true;
                    (k.into_owned(), "REDACTED".to_owned())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        if hid {
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    shown.to_string()
}

/// An error and its sources, since reqwest's own message ("error sending request") hides
/// the cause (connection refused, certificate rejected) in its source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // hyper and reqwest often repeat the inner message in the outer one.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credential_headers_are_redacted_in_outputs() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-auth-token", "abc123".parse().unwrap());
        h.insert("set-cookie", "session=s3cret".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let v = super::headers_to_json(&h);
        assert_eq!(v["x-auth-token"], "<redacted>");
        assert_eq!(v["set-cookie"], "<redacted>");
        assert_eq!(v["content-type"], "application/json");
    }

    use super::*;

    #[test]
    fn redact_url_hides_userinfo_and_secret_query_values() {
        let cases = [
            (
                "http://admin:s3cret@bmc.lab/redfish/v1",
                "http://bmc.lab/redfish/v1",
            ),
            ("https://admin@bmc.lab/x#frag", "https://bmc.lab/x"),
            (
                "http://h/p?api_key=abc&page=2&access_token=xyz",
                "http://h/p?api_key=REDACTED&page=2&access_token=REDACTED",
            ),
            ("http://h/p?page=2&sort=name", "http://h/p?page=2&sort=name"),
        ];
        for (input, want) in cases {
            let url = Url::parse(input).unwrap();
            assert_eq!(redact_url(&url), want, "input {input}");
        }
    }

    #[test]
    fn expect_status_forms() {
        let cases: [(Value, Result<Expect, ()>); 8] = [
            (Value::Null, Ok(Expect::AnySuccess)),
            (json!(204), Ok(Expect::Codes(vec![204]))),
            (json!("404"), Ok(Expect::Codes(vec![404]))),
            (json!([200, "201"]), Ok(Expect::Codes(vec![200, 201]))),
            (json!("[200, 204]"), Ok(Expect::Codes(vec![200, 204]))),
            (json!(99), Err(())),
            (json!("2xx"), Err(())),
            (json!({"code": 200}), Err(())),
        ];
        for (input, want) in cases {
            let got = Expect::parse(Some(&input)).map_err(|_| ());
            assert_eq!(got, want, "input {input}");
        }
    }

    #[test]
    fn body_decoding() {
        let cases = [
            (Some("application/json"), &b"{\"a\":1}"[..], json!({"a": 1})),
            (
                Some("application/hal+json; charset=utf-8"),
                b"[1]",
                json!([1]),
            ),
            (Some("application/json"), b"", Value::Null),
            (Some("application/json"), b"not json", json!("not json")),
            (Some("text/plain"), b"{\"a\":1}", json!("{\"a\":1}")),
            (None, b"{\"a\":1}", json!({"a": 1})),
            (None, b"hello", json!("hello")),
        ];
        for (ct, raw, want) in cases {
            assert_eq!(decode_body(ct, raw.to_vec()), want, "content-type {ct:?}");
        }
    }
}
