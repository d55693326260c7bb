//! Bearer tokens and roles for the management and gRPC APIs (docs/security.md).
//!
//! A token is 32 random bytes, shown once (as `mgt_` and base64url) when it is made; the
//! store keeps only its SHA-256, in the `tokens` keyspace (name → [`TokenRecord`]). A
//! presented token is hashed and compared with every stored hash in constant time, so
//! neither the answer nor its timing tells how much of a guess was right. Tokens are held in
//! memory (there are at most [`MAX_TOKENS`]) and revoked there and in the store at once.
//!
//! Roles are ordered: `viewer` reads, `operator` also changes workflows, nodes and
//! definitions, `admin` also manages tokens, webhooks and reads the audit log. Which role a
//! request needs is decided in one place per protocol: [`http_role`] and [`grpc_role`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use metalgraph_engine::Error;
use metalgraph_engine::clock::{Clock as _, SystemClock, now_rfc3339, parse_rfc3339};
use metalgraph_store::{Batch, Store};
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// The keyspace of tokens: name → [`TokenRecord`] as JSON.
pub const KEYSPACE: &str = "tokens";

/// The most tokens one server keeps.
pub const MAX_TOKENS: usize = 1000;

/// What every token starts with, so that one found in a log or a file is recognisable.
const PREFIX: &str = "mgt_";

/// The name of the token `serve` makes on first start.
pub const BOOTSTRAP_NAME: &str = "admin";

/// How stale a token's stored `lastUsed` may get before a use writes it again.
const LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// What a token may do; each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but tokens and the audit log.
    Viewer,
    /// Also runs, cancels and deletes workflows, and changes nodes, OBMs and definitions.
    Operator,
    /// Also manages tokens and webhooks and reads the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected viewer, operator or admin"
            )),
        }
    }
}

/// The role an HTTP request on the management listener needs; `None` for what anyone may
/// reach: health, and the web view's pages and the redirect to them (which hold no data;
/// the API calls they make carry a token).
pub fn http_role(method: &axum::http::Method, path: &str) -> Option<Role> {
    use axum::http::Method;
    if path == "/api/2.0/health" || path == "/" || path == "/ui" || path.starts_with("/ui/") {
        return None;
    }
    let admin_only = ["/api/2.0/tokens", "/api/2.0/audit", "/api/2.0/hooks"]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')));
    if admin_only {
        Some(Role::Admin)
    } else if matches!(*method, Method::GET | Method::HEAD) {
        Some(Role::Viewer)
    } else {
        Some(Role::Operator)
    }
}

/// The role a gRPC call needs, from its path (`/package.Service/Method`); `None` for the
/// health service. Reads (`Get*`, `List*`, `Watch`) and reflection need `viewer`; every
/// other call changes something and needs `operator`.
pub fn grpc_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    if service == "grpc.health.v1.Health" {
        return None;
    }
    if service.starts_with("grpc.reflection.")
        || ["Get", "List", "Watch"]
            .iter()
            .any(|p| method.starts_with(p))
    {
        Some(Role::Viewer)
    } else {
        Some(Role::Operator)
    }
}

/// Whether an HTTP method changes something (and so is audited).
pub fn mutates(method: &axum::http::Method) -> bool {
    use axum::http::Method;
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Who made a request: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, a malformed header, or a token that is not (or no longer) valid.
    Unauthenticated(String),
    /// A valid token whose role is too weak.
    Forbidden { caller: Caller, needed: Role },
}

impl Denied {
    /// Who was refused, when the token was valid.
    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Denied::Forbidden { caller, .. } => Some(caller),
            Denied::Unauthenticated(_) => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denied::Unauthenticated(why) => why.clone(),
            Denied::Forbidden { caller, needed } => format!(
                "token {:?} has role {}; this needs role {} or higher",
                caller.name,
                caller.role.as_str(),
                needed.as_str()
            ),
        }
    }
}

/// A stored token: its hash, never the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRecord {
    name: String,
    role: Role,
    /// SHA-256 of the token, hex.
    sha256: String,
    created_at: String,
    #[serde(default)]
    last_used: Option<String>,
}

/// A token as the API shows it: no secret, no hash.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    pub created_at: String,
    /// When it was last presented (to within a minute); absent if never.
    pub last_used: Option<String>,
}

/// A token just made: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewToken {
    pub name: String,
    pub role: Role,
    /// The bearer token. It is not stored and cannot be shown again.
    pub token: String,
    pub created_at: String,
}

/// How often a replica of a shared database reads the tokens again.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Every stored token by name, with its hash decoded (blocking).
fn read_all(store: &dyn Store) -> Result<BTreeMap<String, Held>, Error> {
    let mut by_name = BTreeMap::new();
    for (key, value) in store.scan_prefix(KEYSPACE, b"")? {
        let name = String::from_utf8_lossy(&key).into_owned();
        let record: TokenRecord = serde_json::from_slice(&value)
            .map_err(|e| Error::Store(format!("token {name:?} is unreadable: {e}")))?;
        let hash = decode_hash(&record.sha256)
            .ok_or_else(|| Error::Store(format!("token {name:?} has a malformed hash")))?;
        let last_written_ms = record
            .last_used
            .as_deref()
            .and_then(parse_rfc3339)
            .unwrap_or(0);
        by_name.insert(
            name,
            Held {
                record,
                hash,
                last_written_ms,
            },
        );
    }
    Ok(by_name)
}

/// The tokens of one server.
#[derive(Clone)]
pub struct Tokens {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("required", &self.inner.required)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn Store>,
    /// Whether requests need a token at all (`--no-auth` turns it off).
    required: bool,
    /// Every token by name, with the hash bytes decoded.
    by_name: RwLock<BTreeMap<String, Held>>,
    /// Serialises creations and revocations.
    changes: tokio::sync::Mutex<()>,
}

struct Held {
    record: TokenRecord,
    hash: [u8; 32],
    /// When a use last wrote `lastUsed` (ms since the epoch).
    last_written_ms: u64,
}

impl Tokens {
    /// Reads every stored token. `required` false accepts every request without one.
    pub fn load(store: Arc<dyn Store>, required: bool) -> Result<Tokens, Error> {
        let by_name = read_all(store.as_ref())?;
        Ok(Tokens {
            inner: Arc::new(Inner {
                store,
                required,
                by_name: RwLock::new(by_name),
                changes: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Reads the stored tokens again, so that what other replicas of the database created
    /// and revoked holds here too.
    pub async fn refresh(&self) -> Result<(), Error> {
        let _guard = self.inner.changes.lock().await;
        let store = self.inner.store.clone();
        let mut fresh = tokio::task::spawn_blocking(move || read_all(store.as_ref()))
            .await
            .map_err(|e| Error::Store(e.to_string()))??;
        let mut tokens = self.write();
        for (name, held) in fresh.iter_mut() {
            if let Some(old) = tokens.get(name) {
                held.last_written_ms = held.last_written_ms.max(old.last_written_ms);
            }
        }
        *tokens = fresh;
        Ok(())
    }

    /// Refreshes the tokens every [`REFRESH_EVERY`] until `stop`: replicas of one database
    /// see each other's creations and revocations within that.
    pub async fn keep_fresh(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "reading the tokens again failed; trying again");
            }
        }
    }

    /// Whether requests need a token.
    pub fn required(&self) -> bool {
        self.inner.required
    }

    /// Checks a request's `Authorization` header value for `needed`. With tokens off every
    /// request passes, as nobody.
    pub fn check(&self, header: Option<&[u8]>, needed: Role) -> Result<Option<Caller>, Denied> {
        let caller = self.authenticate(header);
        if !self.inner.required {
            return Ok(caller.ok());
        }
        let caller = caller?;
        if caller.role < needed {
            return Err(Denied::Forbidden { caller, needed });
        }
        Ok(Some(caller))
    }

    /// The caller a header names, if its token is valid.
    fn authenticate(&self, header: Option<&[u8]>) -> Result<Caller, Denied> {
        let header = header.ok_or_else(|| {
            Denied::Unauthenticated(
                "this needs a token: send 'Authorization: Bearer <token>' (see docs/security.md)"
                    .into(),
            )
        })?;
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Denied::Unauthenticated("the Authorization header must be 'Bearer <token>'".into())
            })?;
        let presented = sha256(token.as_bytes());
        let now = SystemClock.now_ms();
        let found = {
            let tokens = self.read();
            let mut found = None;
            // Every hash is compared, in constant time, whether or not one matched already.
            for held in tokens.values() {
                if same(&held.hash, &presented) {
                    found = Some((
                        Caller {
                            name: held.record.name.clone(),
                            role: held.record.role,
                        },
                        now.saturating_sub(held.last_written_ms)
                            >= LAST_USED_EVERY.as_millis() as u64,
                    ));
                }
            }
            found
        };
        let Some((caller, stale)) = found else {
            return Err(Denied::Unauthenticated(
                "the token is not valid (unknown, revoked or mistyped)".into(),
            ));
        };
        if stale {
            self.touch(&caller.name, now);
        }
        Ok(caller)
    }

    /// Records a use of `name` at `now`, in memory at once and in the store in the
    /// background (a token revoked meanwhile stays revoked: the write requires the record
    /// it read).
    fn touch(&self, name: &str, now: u64) {
        let (old, new) = {
            let mut tokens = self.write();
            let Some(held) = tokens.get_mut(name) else {
                return;
            };
            if now.saturating_sub(held.last_written_ms) < LAST_USED_EVERY.as_millis() as u64 {
                return;
            }
            held.last_written_ms = now;
            let old = encode(&held.record);
            held.record.last_used = Some(metalgraph_engine::clock::rfc3339(now));
            (old, encode(&held.record))
        };
        let store = self.inner.store.clone();
        let key = name.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || {
            let mut batch = Batch::new();
            batch.require_equals(KEYSPACE, key.clone(), old);
            batch.put(KEYSPACE, key, new);
            if let Err(e) = store.commit(batch) {
                tracing::debug!(error = %e, "a token's last use was not recorded");
            }
        });
    }

    /// Makes a token; its secret is in the answer and nowhere else.
    pub async fn create(&self, name: &str, role: Role) -> Result<NewToken, Error> {
        check_name(name)?;
        let _guard = self.inner.changes.lock().await;
        if self.read().contains_key(name) {
            return Err(Error::AlreadyExists(format!(
                "token {name:?} already exists"
            )));
        }
        if self.read().len() >= MAX_TOKENS {
            return Err(Error::Conflict(format!(
                "there are {MAX_TOKENS} tokens already, the most one server keeps; revoke one first"
            )));
        }
        let token = generate()?;
        let hash = sha256(token.as_bytes());
        let record = TokenRecord {
            name: name.to_owned(),
            role,
            sha256: metalgraph_engine::seal::to_hex(&hash),
            created_at: now_rfc3339(),
            last_used: None,
        };
        let store = self.inner.store.clone();
        let (key, value) = (name.as_bytes().to_vec(), encode(&record));
        commit_blocking(move || {
            let mut batch = Batch::new();
            batch.require_absent(KEYSPACE, key.clone());
            batch.put(KEYSPACE, key, value);
            store.commit(batch).map_err(Error::from)
        })
        .await?;
        let created_at = record.created_at.clone();
        self.write().insert(
            name.to_owned(),
            Held {
                record,
                hash,
                last_written_ms: 0,
            },
        );
        info!(token = %name, role = role.as_str(), "token created");
        Ok(NewToken {
            name: name.to_owned(),
            role,
            token,
            created_at,
        })
    }

    /// Every token, by name, without secrets.
    pub fn list(&self) -> Vec<TokenView> {
        self.read().values().map(|h| view(&h.record)).collect()
    }

    /// Revokes a token: from this moment it is refused.
    pub async fn revoke(&self, name: &str) -> Result<(), Error> {
        let _guard = self.inner.changes.lock().await;
        if !self.read().contains_key(name) {
            return Err(Error::NotFound {
                kind: "token",
                id: name.to_owned(),
            });
        }
        // Refused from now on, even before the store has it.
        let held = self.write().remove(name);
        let store = self.inner.store.clone();
        let key = name.as_bytes().to_vec();
        let res = commit_blocking(move || {
            let mut batch = Batch::new();
            batch.delete(KEYSPACE, key);
            store.commit(batch).map_err(Error::from)
        })
        .await;
        if let Err(e) = res {
            // Not revoked after all: keep it, so that memory says what the store says.
            if let Some(held) = held {
                self.write().insert(name.to_owned(), held);
            }
            return Err(e);
        }
        info!(token = %name, "token revoked");
        Ok(())
    }

    /// On first start (no token stored), makes the `admin` token and writes it to `file`
    /// (mode 0600), returning the file's path; otherwise does nothing.
    pub async fn bootstrap(&self, file: &Path) -> anyhow::Result<Option<PathBuf>> {
        if !self.read().is_empty() {
            return Ok(None);
        }
        let new = match self.create(BOOTSTRAP_NAME, Role::Admin).await {
            Ok(new) => new,
            // Another replica of the database made it a moment ago.
            Err(Error::AlreadyExists(_)) => {
                self.refresh().await?;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let path = file.to_owned();
        let text = format!("{}\n", new.token);
        tokio::task::spawn_blocking(move || {
            crate::datadir::write_whole(&path, text.as_bytes(), crate::datadir::PRIVATE)
        })
        .await??;
        Ok(Some(file.to_owned()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Held>> {
        self.inner.by_name.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Held>> {
        self.inner
            .by_name
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a store write on the blocking pool.
async fn commit_blocking(
    f: impl FnOnce() -> Result<(), Error> + Send + 'static,
) -> Result<(), Error> {
    tokio::task::spawn_blocking(f).await?
}

fn view(r: &TokenRecord) -> TokenView {
    TokenView {
        name: r.name.clone(),
        role: r.role,
        created_at: r.created_at.clone(),
        last_used: r.last_used.clone(),
    }
}

/// A token name: 1 to 64 of letters, digits, `.`, `_` and `-`.
fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "token name {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
            name.chars().take(80).collect::<String>()
        )))
    }
}

fn generate() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Store("the system's random source failed".into()))?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Whether two hashes are equal, looking at every byte whatever the first difference.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    diff == 0
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn decode_hash(s: &str) -> Option<[u8; 32]> {
    metalgraph_engine::seal::from_hex(s)?.try_into().ok()
}

fn encode(r: &TokenRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("a token record serialises")
}

/// Warns that tokens are off; `serve` calls it on every start with `--no-auth`.
pub fn warn_off() {
    warn!(
        "tokens are OFF (--no-auth): anyone who reaches the management or gRPC API can do anything, including rebooting every server; not recommended"
    );
}
