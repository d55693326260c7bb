//! Webhooks: `POST /api/2.0/hooks {"url", "filters"?, "secret"?}` registers a receiver that
//! is sent every engine event matching its filters, as one JSON `POST` per event.
//!
//! Deliveries come from the engine's durable event log (`metalgraph_engine::events`): each
//! event is committed with the change it reports, and each hook keeps a cursor — the number
//! of the last event it has dealt with — in the store. So an event committed is delivered
//! even across a kill -9: at least once (a crash between a delivery and the cursor's next
//! commit sends it again; `X-Metalgraph-Delivery` tells duplicates apart), in log order,
//! one at a time per hook. A failed delivery (an error, a timeout, a status other than 2xx)
//! is retried with exponential backoff until it succeeds; the hook's later events wait
//! behind it. Every hook has its own task reading the in-memory log, so a dead receiver
//! slows neither the engine nor other hooks. A receiver that falls more than
//! [`EVENT_RETENTION`](metalgraph_engine::EVENT_RETENTION) events behind loses the oldest; its status counts them as `dropped`.
//!
//! Replicas of one database (docs/scale-out.md) deliver each hook once: only the replica
//! that holds the sequencer (`Engine::leads`) runs deliveries, and it reads the stored hooks
//! again every [`SUPERVISE_EVERY`] to start those registered through other replicas and stop
//! those deleted. A delivery's progress is written only over the record it last read or
//! wrote, so a hook deleted elsewhere is never written back, and a delivery that finds its
//! record changed under it stops.
//!
//! With a secret, each delivery carries `X-Metalgraph-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the body under the secret. The secret is never shown again: views say only
//! whether one is set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalgraph_engine::workflow::scrub;
use metalgraph_engine::{Engine, Error, Event, EventFilter};
use metalgraph_store::{Batch, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The store keyspace of hooks: hook id → [`HookRecord`] as JSON.
pub const KEYSPACE: &str = "hooks";

/// The most hooks one server keeps.
pub const MAX_HOOKS: usize = 64;

/// The longest URL and secret accepted.
const MAX_URL_LEN: usize = 2048;
const MAX_SECRET_LEN: usize = 1024;

/// How often, at most, a busy hook commits its cursor: a crash redelivers at most this much.
const CURSOR_INTERVAL: Duration = Duration::from_secs(1);

/// How often a replica of a shared database reads the stored hooks again.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// The most events a hook reads from the log at once.
const PAGE: usize = 256;

/// How deliveries are made (the `[hooks]` section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long one delivery may take, from connecting to the end of the response.
    pub timeout: Duration,
    /// The wait before the first retry of a failed delivery; it doubles with each failure.
    pub backoff: Duration,
    /// The longest wait between retries.
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            timeout: Duration::from_secs(10),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// What a client sends to register a hook.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// Where events are `POST`ed: an `http://` or `https://` URL with a host.
    #[schema(
        example = "https://receiver.example/metalgraph",
        pattern = "^[Hh][Tt][Tt][Pp][Ss]?://",
        max_length = 2048
    )]
    pub url: String,
    /// Which events; every given field must match. None: every event.
    #[serde(default, deserialize_with = "metalgraph_engine::text::object")]
    pub filters: EventFilter,
    /// Signs each delivery (`X-Metalgraph-Signature`, hex HMAC-SHA256 of the body); 1 to
    /// 1024 bytes. Never shown.
    #[serde(default)]
    #[schema(write_only, min_length = 1, max_length = 1024)]
    pub secret: Option<String>,
}

impl HookSpec {
    fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::BadRequest(m));
        if self.url.len() > MAX_URL_LEN {
            return bad(format!("url is longer than {MAX_URL_LEN} bytes"));
        }
        let url = match reqwest::Url::parse(&self.url) {
            Ok(url) => url,
            Err(e) => return bad(format!("url {:?} is not a URL: {e}", scrub(&self.url))),
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return bad(format!(
                "url {} must be an http:// or https:// URL with a host",
                scrub(&self.url)
            ));
        }
        if let Some(secret) = &self.secret
            && (secret.is_empty() || secret.len() > MAX_SECRET_LEN)
        {
            return bad(format!("secret must be 1 to {MAX_SECRET_LEN} bytes long"));
        }
        Ok(())
    }
}

/// A hook as stored: its spec and its delivery state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRecord {
    pub id: String,
    pub url: String,
    pub filters: EventFilter,
    pub secret: Option<String>,
    pub created_at: u64,
    /// The number of the last event dealt with (delivered, or not matching the filters).
    pub cursor: u64,
    pub delivered: u64,
    /// Events that left the log's retention before they could be delivered.
    pub dropped: u64,
    pub last_success_at: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
}

impl HookRecord {
    /// What clients see: no secret, no password in the URL.
    fn view(&self, log: &str, backlog: u64) -> Value {
        let at = |ms: Option<u64>| ms.map(metalgraph_engine::clock::rfc3339);
        json!({
            "id": self.id,
            "url": scrub(&self.url),
            "filters": self.filters,
            "signed": self.secret.is_some(),
            "createdAt": metalgraph_engine::clock::rfc3339(self.created_at),
            "status": {
                "lastEventId": (self.cursor > 0).then(|| format!("{log}-{}", self.cursor)),
                "delivered": self.delivered,
                "dropped": self.dropped,
                "backlog": backlog,
                "lastSuccessAt": at(self.last_success_at),
                "lastError": self.last_error,
                "lastErrorAt": at(self.last_error_at),
            },
        })
    }
}

/// The hooks of one server, each with its delivery task.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

struct Inner {
    engine: Engine,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    settings: Settings,
    /// Serializes creations and deletions, so that the count limit holds.
    changes: tokio::sync::Mutex<()>,
    running: Mutex<BTreeMap<String, Running>>,
    stop: CancellationToken,
}

/// A hook being delivered: its record as its task last updated it, and the task.
struct Running {
    record: Arc<Mutex<HookRecord>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Hooks {
    /// Starts delivering every stored hook (once the engine has recovered); returns at once.
    pub fn start(engine: Engine, settings: Settings) -> Hooks {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        let hooks = Hooks {
            inner: Arc::new(Inner {
                store: engine.store(),
                engine,
                http,
                settings,
                changes: tokio::sync::Mutex::new(()),
                running: Mutex::new(BTreeMap::new()),
                stop: CancellationToken::new(),
            }),
        };
        let this = hooks.clone();
        tokio::spawn(async move {
            let shared = matches!(
                this.inner.engine.ownership(),
                metalgraph_engine::ownership::Ownership::Leased(_)
            );
            let n = this.supervise().await;
            if n > 0 {
                info!(hooks = n, "webhooks delivering");
            }
            if !shared {
                return;
            }
            loop {
                tokio::select! {
                    () = this.inner.stop.cancelled() => return,
                    () = tokio::time::sleep(SUPERVISE_EVERY) => {}
                }
                this.supervise().await;
            }
        });
        hooks
    }

    /// Brings the deliveries in line with the stored hooks: while this process leads, every
    /// stored hook is delivered (those registered elsewhere start, those deleted elsewhere
    /// or whose delivery stopped are dropped); otherwise none is. Returns how many run.
    async fn supervise(&self) -> usize {
        let _guard = self.inner.changes.lock().await;
        let stored = if self.inner.engine.leads() {
            match self.load().await {
                Ok(records) => records,
                Err(e) => {
                    warn!(error = %e, "cannot read the webhooks; deliveries stay as they are");
                    return self.lock().len();
                }
            }
        } else {
            Vec::new()
        };
        let keep: std::collections::BTreeSet<String> =
            stored.iter().map(|(r, _)| r.id.clone()).collect();
        let gone: Vec<Running> = {
            let mut running = self.lock();
            let ids: Vec<String> = running
                .iter()
                .filter(|(id, r)| !keep.contains(*id) || r.task.is_finished())
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| running.remove(id)).collect()
        };
        for r in gone {
            r.stop.cancel();
            let _ = r.task.await;
        }
        for (rec, raw) in stored {
            if !self.lock().contains_key(&rec.id) {
                self.spawn(rec, raw);
            }
        }
        self.lock().len()
    }

    /// Every stored hook, with its record as stored.
    async fn load(&self) -> Result<Vec<(HookRecord, Vec<u8>)>, Error> {
        let store = self.inner.store.clone();
        let rows = tokio::task::spawn_blocking(move || store.scan_prefix(KEYSPACE, b""))
            .await
            .map_err(Error::from)??;
        let sealer = self.inner.engine.sealer();
        rows.into_iter()
            .map(|(k, v)| {
                let unreadable = |e: String| {
                    Error::Store(format!(
                        "hook {} is unreadable: {e}",
                        String::from_utf8_lossy(&k)
                    ))
                };
                let mut rec: HookRecord =
                    serde_json::from_slice(&v).map_err(|e| unreadable(e.to_string()))?;
                if let Some(secret) = &mut rec.secret
                    && metalgraph_engine::seal::is_sealed(secret)
                {
                    let sealer = sealer.as_ref().ok_or_else(|| {
                        unreadable("its secret is sealed and no key is loaded".into())
                    })?;
                    *secret = sealer.open(secret).map_err(unreadable)?;
                }
                Ok((rec, v))
            })
            .collect()
    }

    /// Registers a hook; it is sent the events committed from now on.
    pub async fn create(&self, spec: HookSpec) -> Result<Value, Error> {
        spec.check()?;
        let _guard = self.inner.changes.lock().await;
        if self.load().await?.len() >= MAX_HOOKS {
            return Err(Error::Conflict(format!(
                "there are {MAX_HOOKS} hooks already, the most one server keeps; delete one first"
            )));
        }
        let rec = HookRecord {
            id: metalgraph_engine::new_id(),
            url: spec.url,
            filters: spec.filters,
            secret: spec.secret,
            created_at: now_ms(),
            cursor: self.inner.engine.last_event().await,
            delivered: 0,
            dropped: 0,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
        };
        let stored = save(&self.inner, &rec, None).await?;
        info!(hook = %rec.id, url = %scrub(&rec.url), "webhook registered");
        let view = self.view(&rec).await;
        // With replicas, the one that leads delivers it (it reads it within a second).
        if self.inner.engine.leads() {
            self.spawn(rec, stored);
        }
        Ok(view)
    }

    /// Every hook as stored, each overlaid with the progress of its delivery when it runs
    /// here.
    async fn records(&self) -> Result<Vec<HookRecord>, Error> {
        let stored = self.load().await?;
        let running = self.lock();
        Ok(stored
            .into_iter()
            .map(|(rec, _)| match running.get(&rec.id) {
                Some(r) => r.record.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                None => rec,
            })
            .collect())
    }

    /// Every hook, oldest first.
    pub async fn list(&self) -> Result<Vec<Value>, Error> {
        let mut records = self.records().await?;
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut out = Vec::with_capacity(records.len());
        for rec in &records {
            out.push(self.view(rec).await);
        }
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<Value, Error> {
        let rec = self
            .records()
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| not_found(id))?;
        Ok(self.view(&rec).await)
    }

    /// Stops a hook's deliveries and forgets it.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let _guard = self.inner.changes.lock().await;
        let running = self.lock().remove(id);
        if let Some(running) = running {
            // Its task commits its progress as it stops; the record is deleted after that.
            running.stop.cancel();
            let _ = running.task.await;
        }
        let store = self.inner.store.clone();
        let key = id.as_bytes().to_vec();
        let existed = tokio::task::spawn_blocking(move || {
            let Some(current) = store.get(KEYSPACE, &key)? else {
                return Ok(false);
            };
            // Over the record as read: a delivery elsewhere that writes its progress
            // meanwhile makes this fail rather than be undone.
            let mut batch = Batch::new();
            batch.require_equals(KEYSPACE, key.clone(), current);
            batch.delete(KEYSPACE, key);
            store.commit(batch).map(|()| true)
        })
        .await
        .map_err(Error::from)?
        .map_err(|e| match e {
            metalgraph_store::Error::Conflict { .. } => {
                Error::Conflict(format!("hook {id} changed while it was deleted; try again"))
            }
            other => Error::from(other),
        })?;
        if !existed {
            return Err(not_found(id));
        }
        info!(hook = %id, "webhook deleted");
        Ok(())
    }

    /// Stops every delivery and waits for the hooks' last cursors to be committed.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let tasks: Vec<_> = std::mem::take(&mut *self.lock())
            .into_values()
            .map(|r| r.task)
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.inner.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn view(&self, rec: &HookRecord) -> Value {
        let log = self.inner.engine.event_log_id().await;
        let backlog = self
            .inner
            .engine
            .count_events_after(rec.cursor, &rec.filters)
            .await;
        rec.view(&log, backlog)
    }

    fn spawn(&self, rec: HookRecord, stored: Vec<u8>) {
        let stop = self.inner.stop.child_token();
        let record = Arc::new(Mutex::new(rec.clone()));
        let id = rec.id.clone();
        let delivery = Delivery {
            inner: self.inner.clone(),
            rec,
            stored,
            shared: record.clone(),
            stop: stop.clone(),
            saved_at: Instant::now(),
            dirty: false,
        };
        let task = tokio::spawn(delivery.run());
        self.lock().insert(id, Running { record, stop, task });
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound {
        kind: "hook",
        id: id.to_owned(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Stores a hook, its secret sealed when the engine has a key, over the record as `over`
/// last stored it (`None`: a new hook). Returns the record as stored. A record changed or
/// deleted meanwhile (through another replica) is a conflict, and nothing is written.
async fn save(inner: &Inner, rec: &HookRecord, over: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
    let store = inner.store.clone();
    let key = rec.id.as_bytes().to_vec();
    let mut stored = rec.clone();
    if let (Some(secret), Some(sealer)) = (&mut stored.secret, inner.engine.sealer()) {
        *secret = sealer.seal(secret);
    }
    let value = serde_json::to_vec(&stored).expect("a hook serializes");
    let written = value.clone();
    tokio::task::spawn_blocking(move || {
        let mut batch = Batch::new();
        match over {
            Some(old) => batch.require_equals(KEYSPACE, key.clone(), old),
            None => batch.require_absent(KEYSPACE, key.clone()),
        };
        batch.put(KEYSPACE, key, value);
        store.commit(batch)
    })
    .await
    .map_err(Error::from)?
    .map_err(|e| match e {
        metalgraph_store::Error::Conflict { .. } => {
            Error::Conflict(format!("hook {} changed or was deleted elsewhere", rec.id))
        }
        other => Error::from(other),
    })?;
    Ok(written)
}

/// One hook's delivery task.
struct Delivery {
    inner: Arc<Inner>,
    /// The task's own copy of the record; `shared` mirrors it for views.
    rec: HookRecord,
    /// The record as last read or written: progress is written only over it.
    stored: Vec<u8>,
    shared: Arc<Mutex<HookRecord>>,
    stop: CancellationToken,
    saved_at: Instant,
    dirty: bool,
}

impl Delivery {
    async fn run(mut self) {
        let engine = self.inner.engine.clone();
        let log = tokio::select! {
            log = engine.event_log_id() => log,
            () = self.stop.cancelled() => return,
        };
        loop {
            // Subscribed before reading, so that an event published after the read wakes us.
            let (page, mut live) = engine.events_since(Some(self.rec.cursor), PAGE).await;
            if let Some((first, _)) = page.first()
                && *first > self.rec.cursor + 1
            {
                let lost = *first - self.rec.cursor - 1;
                warn!(hook = %self.rec.id, lost, "webhook receiver fell behind the event log's retention; the oldest events are dropped");
                self.rec.dropped += lost;
                self.rec.cursor = *first - 1;
                self.touch();
            }
            if page.is_empty() {
                self.save().await;
                tokio::select! {
                    got = live.recv() => {
                        if matches!(got, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            break;
                        }
                    }
                    () = self.stop.cancelled() => break,
                    () = engine.stopped() => break,
                }
                continue;
            }
            drop(live);
            for (n, ev) in page {
                if self.rec.filters.matches(&ev) && !self.deliver(&log, n, &ev).await {
                    self.save().await;
                    return;
                }
                self.rec.cursor = n;
                self.touch();
                if self.saved_at.elapsed() >= CURSOR_INTERVAL {
                    self.save().await;
                }
            }
        }
        self.save().await;
    }

    /// Sends one event until the receiver takes it; false when stopped first.
    async fn deliver(&mut self, log: &str, n: u64, ev: &Event) -> bool {
        let id = format!("{log}-{n}");
        let mut body = serde_json::Map::new();
        body.insert("id".into(), Value::String(id.clone()));
        if let Ok(Value::Object(fields)) = serde_json::to_value(ev) {
            body.extend(fields);
        }
        let body = serde_json::to_vec(&body).expect("an event serializes");
        let signature = self.rec.secret.as_ref().map(|s| sign(s, &body));
        let mut backoff = self.inner.settings.backoff;
        loop {
            let mut req = self
                .inner
                .http
                .post(&self.rec.url)
                .header("content-type", "application/json")
                .header("x-metalgraph-event", ev.kind())
                .header("x-metalgraph-delivery", &id)
                .header("x-metalgraph-hook", &self.rec.id)
                .body(body.clone());
            if let Some(sig) = &signature {
                req = req.header("x-metalgraph-signature", sig);
            }
            let outcome = tokio::select! {
                r = req.send() => r,
                () = self.stop.cancelled() => return false,
            };
            crate::metrics::hook_delivery(matches!(&outcome, Ok(r) if r.status().is_success()));
            let error = match outcome {
                Ok(resp) if resp.status().is_success() => {
                    self.rec.delivered += 1;
                    self.rec.last_success_at = Some(now_ms());
                    self.touch();
                    return true;
                }
                Ok(resp) => format!("the receiver answered {}", resp.status()),
                Err(e) if e.is_timeout() => format!(
                    "no answer within {} ms",
                    self.inner.settings.timeout.as_millis()
                ),
                // reqwest's message names the URL; it is scrubbed of any password.
                Err(e) => scrub(&error_chain(&e)),
            };
            warn!(hook = %self.rec.id, delivery = %id, error = %error, retry_in_ms = backoff.as_millis() as u64, "webhook delivery failed");
            self.rec.last_error = Some(error);
            self.rec.last_error_at = Some(now_ms());
            self.touch();
            self.save().await;
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.stop.cancelled() => return false,
            }
            backoff = (backoff * 2).min(self.inner.settings.max_backoff);
        }
    }

    /// Marks the record changed and shows the change to views.
    fn touch(&mut self) {
        self.dirty = true;
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = self.rec.clone();
    }

    /// Commits the record if it changed.
    /// A record changed elsewhere (deleted through another replica, or delivered by
    /// another one) stops this delivery.
    async fn save(&mut self) {
        if !self.dirty {
            return;
        }
        match save(&self.inner, &self.rec, Some(self.stored.clone())).await {
            Ok(stored) => {
                self.stored = stored;
                self.dirty = false;
                self.saved_at = Instant::now();
            }
            Err(Error::Conflict(why)) => {
                info!(hook = %self.rec.id, why = %why, "webhook delivery stops here");
                self.stop.cancel();
            }
            Err(e) => warn!(hook = %self.rec.id, error = %e, "cannot record a webhook's progress"),
        }
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::from("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}
