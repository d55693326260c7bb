//! The PostgreSQL backend: every keyspace in one table, `(keyspace, key) → value`, in a
//! database several metalgraph replicas may share (docs/scale-out.md).
//!
//! A commit is one transaction at READ COMMITTED. It first takes a transaction-scoped
//! advisory lock on every key it touches (preconditions and writes, as 64-bit hashes, in
//! ascending order so that two commits never wait on each other in a cycle), then reads its
//! preconditions against the rows as committed and writes, and commits only when every
//! precondition holds (else it rolls back). Replicas that share the database fence their
//! schedulers' commits with preconditions on their partitions' epochs (the engine's
//! `ownership.rs`), so the store itself knows no owner. After `BEGIN`, those statements
//! go to the server as one pipeline, so a commit costs three round trips. Every commit that touches a key
//! holds that key's lock from its check to its end, so a check and the writes that depend on
//! it are atomic with respect to every other commit, without SERIALIZABLE's retries. A
//! hash collision only serialises two unrelated commits. Reads are single statements and
//! see only committed transactions, so no reader sees part of a batch. A commit returns once
//! PostgreSQL has made it durable (`synchronous_commit` as the server is set, `on` by
//! default).
//!
//! `Store` is synchronous and is called from tokio's blocking pool, from plain threads
//! (tests, `rekey`) and, at start-up, from async code. So the store runs its connections on
//! a small runtime of its own: a call hands its work to that runtime and waits for the
//! answer on a channel, and never starts a runtime on the caller's thread.
//!
//! The schema is created and migrated when the store opens, under an advisory lock so that
//! replicas starting together migrate once. Connections are pooled, at most
//! [`POOL_SIZE`] of them (further calls wait for one); one that fails is dropped and a new
//! one is made on the next call, so the store reconnects by itself after
//! the database restarts (the call that met the failure reports it).
//!
//! SQL used: one table with a primary key, `INSERT ... ON CONFLICT DO UPDATE`, `unnest`
//! with `WITH ORDINALITY`, `pg_advisory_xact_lock`. CockroachDB and YugabyteDB offer most
//! of it (advisory locks differ there); neither is tested.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Batch, Bytes, Error, Op, Result, Scan, Store, check_keyspace};

/// The schema version this build writes; [`MIGRATIONS`] brings older ones up to it.
const SCHEMA_VERSION: i32 = 2;

/// Each migration, in order: migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS metalgraph_kv (
        keyspace text NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (keyspace, key)
    );
    CREATE TABLE IF NOT EXISTS metalgraph_owner (
        id integer PRIMARY KEY,
        owner text NOT NULL
    )",
    // Version 2: replicas share the database under partition leases kept in
    // `metalgraph_kv`; the one-owner row goes, and with the version bump a build that
    // expects to own the database alone refuses it.
    "DROP TABLE IF EXISTS metalgraph_owner",
];

/// The advisory lock (an arbitrary constant) that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6d67_7261_7068_0001;

/// The most connections a store opens: calls beyond that many at once wait for one to be
/// free, rather than each opening (and the server forking) a connection of its own.
const POOL_SIZE: usize = 16;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the database is reached.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style URL (`postgresql://user@host:5432/db?sslmode=require`) or key/value
    /// string (`host=... dbname=...`).
    pub url: String,
    /// PEM certificates to trust for TLS to the database, beside the public web roots.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PgOptions").finish_non_exhaustive()
    }
}

/// The store on PostgreSQL.
pub struct PgStore {
    shared: Arc<Shared>,
    /// The store's own runtime, where its connections live (see the module docs). Shut
    /// down in the background on drop, which is allowed on any thread.
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the store's tasks share.
struct Shared {
    config: Config,
    tls: MakeRustlsConnect,
    idle: Mutex<Vec<Client>>,
    /// One permit per connection in use: at most [`POOL_SIZE`] are open.
    permits: tokio::sync::Semaphore,
    /// What messages call the database: host and database name, never a password.
    name: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.shared.name)
            .finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// One call of the store, owning what it needs, so that it can run on the store's runtime.
enum Call {
    Migrate,
    Get {
        keyspace: String,
        key: Bytes,
    },
    Scan {
        keyspace: String,
        lo: (Option<Bytes>, bool),
        hi: (Option<Bytes>, bool),
        reverse: bool,
        limit: i64,
    },
    Commit(Prepared),
    Now,
}

/// What a call answers.
enum Reply {
    Done,
    Value(Option<Bytes>),
    Rows(Vec<(Bytes, Bytes)>),
    Millis(u64),
}

/// A batch as the commit statements take it: the keys to lock, the preconditions, and the
/// last write of each key.
struct Prepared {
    batch: Batch,
    locks: Vec<i64>,
    puts: (Vec<String>, Vec<Bytes>, Vec<Bytes>),
    deletes: (Vec<String>, Vec<Bytes>),
}

impl Prepared {
    fn new(batch: Batch) -> Prepared {
        let mut locks: Vec<i64> = batch
            .preconditions
            .iter()
            .map(|p| lock_of(p.target().0, p.target().1))
            .chain(batch.ops.iter().map(|op| match op {
                Op::Put { keyspace, key, .. } | Op::Delete { keyspace, key } => {
                    lock_of(keyspace, key)
                }
            }))
            .collect();
        locks.sort_unstable();
        locks.dedup();
        // The last op on a key decides it.
        let mut last: std::collections::BTreeMap<(&str, &[u8]), Option<&[u8]>> =
            std::collections::BTreeMap::new();
        for op in &batch.ops {
            let (keyspace, key, value) = op.effect();
            last.insert((keyspace, key), value);
        }
        let mut puts = (Vec::new(), Vec::new(), Vec::new());
        let mut deletes = (Vec::new(), Vec::new());
        for ((ks, k), v) in last {
            match v {
                Some(v) => {
                    puts.0.push(ks.to_owned());
                    puts.1.push(k.to_vec());
                    puts.2.push(v.to_vec());
                }
                None => {
                    deletes.0.push(ks.to_owned());
                    deletes.1.push(k.to_vec());
                }
            }
        }
        Prepared {
            batch,
            locks,
            puts,
            deletes,
        }
    }
}

/// How long a call keeps trying while the database cannot be reached (restarting, failing
/// over) before it reports the failure.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Why an attempt failed, and whether trying again on a new connection is safe and useful:
/// the connection was lost or the server is shutting down, before anything was committed.
struct Failed {
    error: Error,
    retry: bool,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed {
            error,
            retry: false,
        }
    }
}

/// A database error as a store error, naming the operation; PostgreSQL's own message (and
/// its detail) never holds a password. A lost connection, or a server that is shutting
/// down or starting (SQLSTATE classes 08 and 57P), may be tried again.
fn db(op: &str, e: tokio_postgres::Error) -> Failed {
    let code = e.as_db_error().map(|d| d.code().code().to_owned());
    let retry = e.is_closed()
        || code
            .as_deref()
            .is_none_or(|c| c.starts_with("08") || c.starts_with("57P"));
    // The client's own errors ("error performing TLS handshake") keep their cause (the
    // certificate refused, the connection reset) in their source.
    let detail = match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }
    };
    Failed {
        error: Error::Io(format!("PostgreSQL {op}: {detail}")),
        retry,
    }
}

/// [`db`] for the `COMMIT` itself: whether it took effect is unknown when its answer is
/// lost, so it is never tried again; the caller stops, and recovery reads what is there.
fn db_final(op: &str, e: tokio_postgres::Error) -> Failed {
    Failed {
        retry: false,
        ..db(op, e)
    }
}

impl PgStore {
    /// Connects, creates or migrates the schema, and returns the store. An unreachable
    /// database or a schema newer than this build is an error naming it.
    pub fn open(options: &PgOptions) -> Result<PgStore> {
        let mut config: Config = options
            .url
            .parse()
            .map_err(|e| Error::Io(format!("the database URL is not valid: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("metalgraph");
        }
        let name = format!(
            "{} on {}",
            config.get_dbname().unwrap_or("(default database)"),
            config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let tls = MakeRustlsConnect::new(tls_config(options.ca_pem.as_deref())?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("metalgraph-postgres")
            .enable_all()
            .build()
            .map_err(|e| Error::Io(format!("cannot start the PostgreSQL store's runtime: {e}")))?;
        let store = PgStore {
            shared: Arc::new(Shared {
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(POOL_SIZE),
                name,
            }),
            runtime: Some(runtime),
        };
        store.call(Call::Migrate)?;
        Ok(store)
    }

    /// Runs `call` on the store's runtime and waits for its answer.
    fn call(&self, call: Call) -> Result<Reply> {
        let Some(runtime) = &self.runtime else {
            return Err(Error::Io("the PostgreSQL store is closed".into()));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let _ = tx.send(shared.with_retries(&call).await);
        });
        rx.recv()
            .map_err(|_| Error::Io("the PostgreSQL store stopped".into()))?
    }
}

impl Shared {
    async fn connect(&self) -> Result<Client, Failed> {
        let connected = match self.config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => {
                self.config.connect(NoTls).await.map(|(client, conn)| {
                    tokio::spawn(conn);
                    client
                })
            }
            _ => self
                .config
                .connect(self.tls.clone())
                .await
                .map(|(client, conn)| {
                    tokio::spawn(conn);
                    client
                }),
        };
        connected.map_err(|e| db(&format!("connect to {}", self.name), e))
    }

    /// Runs `call` on a pooled connection; a connection that failed is not returned to the
    /// pool. An attempt that failed in a way worth retrying (the connection was lost before
    /// anything was committed) is made again on a new connection, with growing pauses, for
    /// up to [`RECONNECT_FOR`]: a database restart holds the caller up rather than failing
    /// it.
    async fn with_retries(&self, call: &Call) -> Result<Reply> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut pause = Duration::from_millis(50);
        let mut warned = false;
        loop {
            // Never closed, so acquiring only waits.
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| Error::Io("the PostgreSQL store is closed".into()))?;
            let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let client = match pooled {
                Some(c) if !c.is_closed() => Ok(c),
                _ => self.connect().await,
            };
            let attempt = match client {
                Ok(mut client) => {
                    let out = run(&mut client, call).await;
                    // A precondition conflict leaves the connection healthy; a failure may
                    // not.
                    let reusable = match &out {
                        Ok(_) => true,
                        Err(f) => matches!(f.error, Error::Conflict { .. }),
                    };
                    if reusable && !client.is_closed() {
                        // Below POOL_SIZE: only permit holders put connections back.
                        self.idle
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(client);
                    }
                    out
                }
                Err(f) => Err(f),
            };
            match attempt {
                Ok(reply) => return Ok(reply),
                Err(Failed { error, retry: true }) if Instant::now() < deadline => {
                    if !warned {
                        tracing::warn!(database = %self.name, error = %error, "the database is unreachable; trying again");
                        warned = true;
                    }
                    // Connections opened before the failure are likely broken too.
                    self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(Failed { error, .. }) => return Err(error),
            }
        }
    }
}

/// One attempt of `call` on `client`.
async fn run(client: &mut Client, call: &Call) -> Result<Reply, Failed> {
    match call {
        Call::Migrate => migrate(client).await.map(|()| Reply::Done),
        // Typed statements: one round trip each, no prepare.
        Call::Get { keyspace, key } => client
            .query_typed_opt(
                "SELECT value FROM metalgraph_kv WHERE keyspace = $1 AND key = $2",
                &[(keyspace, Type::TEXT), (key, Type::BYTEA)],
            )
            .await
            .map(|row| Reply::Value(row.map(|r| r.get(0))))
            .map_err(|e| db("read", e)),
        Call::Scan {
            keyspace,
            lo,
            hi,
            reverse,
            limit,
        } => {
            let order = if *reverse { "DESC" } else { "ASC" };
            let sql = format!(
                "SELECT key, value FROM metalgraph_kv WHERE keyspace = $1 \
                 AND ($2::bytea IS NULL OR key > $2 OR ($3 AND key = $2)) \
                 AND ($4::bytea IS NULL OR key < $4 OR ($5 AND key = $4)) \
                 ORDER BY key {order} LIMIT $6"
            );
            let rows = client
                .query_typed(
                    &sql,
                    &[
                        (keyspace, Type::TEXT),
                        (&lo.0, Type::BYTEA),
                        (&lo.1, Type::BOOL),
                        (&hi.0, Type::BYTEA),
                        (&hi.1, Type::BOOL),
                        (limit, Type::INT8),
                    ],
                )
                .await
                .map_err(|e| db("scan", e))?;
            Ok(Reply::Rows(
                rows.into_iter().map(|r| (r.get(0), r.get(1))).collect(),
            ))
        }
        Call::Commit(prepared) => commit(client, prepared).await.map(|()| Reply::Done),
        Call::Now => client
            .query_typed_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8",
                &[],
            )
            .await
            .map(|row| Reply::Millis(row.get::<_, i64>(0).max(0) as u64))
            .map_err(|e| db("read the clock", e)),
    }
}

async fn migrate(client: &mut Client) -> Result<(), Failed> {
    let tx = client.transaction().await.map_err(|e| db("begin", e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db("lock the schema", e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS metalgraph_schema (version integer NOT NULL)")
        .await
        .map_err(|e| db("create the schema table", e))?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM metalgraph_schema", &[])
        .await
        .map_err(|e| db("read the schema version", e))?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO metalgraph_schema (version) VALUES (0)", &[])
                .await
                .map_err(|e| db("record the schema version", e))?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(Error::Io(format!(
            "the database has schema version {version}, newer than this build's \
             {SCHEMA_VERSION}: run a newer metalgraph"
        ))
        .into());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| db(&format!("migrate the schema to version {}", i + 1), e))?;
    }
    tx.execute(
        "UPDATE metalgraph_schema SET version = $1",
        &[&SCHEMA_VERSION],
    )
    .await
    .map_err(|e| db("record the schema version", e))?;
    tx.commit()
        .await
        .map_err(|e| db_final("commit the schema", e))
}

async fn commit(client: &mut Client, p: &Prepared) -> Result<(), Failed> {
    let tx = client.transaction().await.map_err(|e| db("begin", e))?;
    let pre = &p.batch.preconditions;
    let pre_keyspaces: Vec<&str> = pre.iter().map(|c| c.target().0).collect();
    let pre_keys: Vec<&[u8]> = pre.iter().map(|c| c.target().1).collect();
    let nothing = || async { Ok::<_, tokio_postgres::Error>(Vec::new()) };
    // One round trip for all of it: the statements are sent together, in this order (a
    // biased join polls them in order, and each is sent on its first poll), and the server
    // runs them one after the other, so every statement after the first takes its snapshot
    // once the keys' locks are held. Statements typed here need no prepare round trip. The
    // writes are undone (the transaction is rolled back) when a precondition says no.
    let lock_params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
        [(&p.locks, Type::INT8_ARRAY)];
    let (locked, current, deleted, written) = tokio::join!(
        biased;
        tx.query_typed(
            "SELECT pg_advisory_xact_lock(l) FROM unnest($1::bigint[]) AS l ORDER BY l",
            &lock_params,
        ),
        async {
            if pre.is_empty() {
                return nothing().await;
            }
            tx.query_typed(
                "SELECT p.i, kv.value FROM unnest($1::text[], $2::bytea[]) \
                 WITH ORDINALITY AS p(keyspace, key, i) \
                 LEFT JOIN metalgraph_kv kv ON kv.keyspace = p.keyspace AND kv.key = p.key \
                 ORDER BY p.i",
                &[(&pre_keyspaces, Type::TEXT_ARRAY), (&pre_keys, Type::BYTEA_ARRAY)],
            )
            .await
        },
        async {
            if p.deletes.1.is_empty() {
                return nothing().await;
            }
            tx.query_typed(
                "DELETE FROM metalgraph_kv kv USING unnest($1::text[], $2::bytea[]) AS d(keyspace, key) \
                 WHERE kv.keyspace = d.keyspace AND kv.key = d.key",
                &[(&p.deletes.0, Type::TEXT_ARRAY), (&p.deletes.1, Type::BYTEA_ARRAY)],
            )
            .await
        },
        async {
            if p.puts.1.is_empty() {
                return nothing().await;
            }
            tx.query_typed(
                "INSERT INTO metalgraph_kv (keyspace, key, value) \
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                 ON CONFLICT (keyspace, key) DO UPDATE SET value = EXCLUDED.value",
                &[
                    (&p.puts.0, Type::TEXT_ARRAY),
                    (&p.puts.1, Type::BYTEA_ARRAY),
                    (&p.puts.2, Type::BYTEA_ARRAY),
                ],
            )
            .await
        },
    );
    // The first failure is the one to report: a later statement of an aborted transaction
    // only says so.
    locked.map_err(|e| db("lock the keys", e))?;
    let current = current.map_err(|e| db("check the preconditions", e))?;
    for (index, (row, c)) in current.iter().zip(pre).enumerate() {
        let value: Option<Vec<u8>> = row.get(1);
        if !c.holds(value.as_deref()) {
            // Dropping the transaction rolls it back, the writes with it.
            return Err(c.conflict(index).into());
        }
    }
    deleted.map_err(|e| db("delete", e))?;
    written.map_err(|e| db("write", e))?;
    tx.commit().await.map_err(|e| db_final("commit", e))
}

/// TLS to the database: the public web roots and the given CA certificates.
fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| Error::Io(format!("the database CA is not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Io(format!("the database CA is not usable: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Io(
                "the database CA holds no certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Io(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// A 64-bit hash of `keyspace/key` for its advisory lock (FNV-1a: stable, and collisions
/// only serialise two commits).
fn lock_of(keyspace: &str, key: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in keyspace.bytes().chain([b'/']).chain(key.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl Store for PgStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        check_keyspace(keyspace)?;
        match self.call(Call::Get {
            keyspace: keyspace.to_owned(),
            key: key.to_vec(),
        })? {
            Reply::Value(v) => Ok(v),
            _ => Err(Error::Io("PostgreSQL read: an unexpected answer".into())),
        }
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan(keyspace, Scan::prefix(prefix, usize::MAX))
    }

    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let Some((lo, hi)) = scan.bounds() else {
            return Ok(Vec::new());
        };
        let bound = |b: std::ops::Bound<Vec<u8>>| match b {
            std::ops::Bound::Included(k) => (Some(k), true),
            std::ops::Bound::Excluded(k) => (Some(k), false),
            std::ops::Bound::Unbounded => (None, true),
        };
        match self.call(Call::Scan {
            keyspace: keyspace.to_owned(),
            lo: bound(lo),
            hi: bound(hi),
            reverse: scan.reverse,
            limit: i64::try_from(scan.limit).unwrap_or(i64::MAX),
        })? {
            Reply::Rows(rows) => Ok(rows),
            _ => Err(Error::Io("PostgreSQL scan: an unexpected answer".into())),
        }
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        for p in &batch.preconditions {
            check_keyspace(p.target().0)?;
        }
        for op in &batch.ops {
            let (Op::Put { keyspace, .. } | Op::Delete { keyspace, .. }) = op;
            check_keyspace(keyspace)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.call(Call::Commit(Prepared::new(batch))).map(|_| ())
    }

    fn close(&self) -> Result<()> {
        self.shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    /// The database's clock, which every replica sharing it reads alike.
    fn now_ms(&self) -> Result<u64> {
        match self.call(Call::Now)? {
            Reply::Millis(ms) => Ok(ms),
            _ => Err(Error::Io("PostgreSQL clock: an unexpected answer".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_hashes_are_stable_and_per_key() {
        assert_ne!(lock_of("nodes", b"n1"), lock_of("nodes", b"n2"));
        assert_eq!(lock_of("nodes", b"n1"), lock_of("nodes", b"n1"));
    }

    #[test]
    fn a_bad_url_is_an_error_naming_it() {
        let e = PgStore::open(&PgOptions {
            url: "postgresql://[::1".into(),
            ca_pem: None,
        })
        .expect_err("refused");
        assert!(e.to_string().contains("database URL"), "{e}");
    }
}
