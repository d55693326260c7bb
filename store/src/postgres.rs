//! The PostgreSQL backend: every keyspace in one table, `(keyspace, key) → value`, in a
//! database several metalgraph replicas may share (docs/scale-out.md).
//!
//! A commit is one transaction at READ COMMITTED. It first takes a transaction-scoped
//! advisory lock on every key it touches (preconditions and writes, as 64-bit hashes, in
//! ascending order so that two commits never wait on each other in a cycle), then checks its
//! preconditions against the rows as committed, then writes. Every commit that touches a key
//! holds that key's lock from its check to its end, so a check and the writes that depend on
//! it are atomic with respect to every other commit, without SERIALIZABLE's retries. A
//! hash collision only serialises two unrelated commits. Reads are single statements and
//! see only committed transactions, so no reader sees part of a batch. A commit returns once
//! PostgreSQL has made it durable (`synchronous_commit` as the server is set, `on` by
//! default).
//!
//! The schema is created and migrated when the store opens, under an advisory lock so that
//! replicas starting together migrate once. Connections are pooled; one that fails is
//! dropped and a new one is made on the next call, so the store reconnects by itself after
//! the database restarts (the call that met the failure reports it).
//!
//! SQL used: one table with a primary key, `INSERT ... ON CONFLICT DO UPDATE`, `unnest`
//! with `WITH ORDINALITY`, `pg_advisory_xact_lock`. CockroachDB and YugabyteDB offer most
//! of it (advisory locks differ there); neither is tested.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Batch, Bytes, Error, Op, Result, Scan, Store, check_keyspace};

/// The schema version this build writes; [`MIGRATIONS`] brings older ones up to it.
const SCHEMA_VERSION: i32 = 1;

/// Each migration, in order: migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS metalgraph_kv (
        keyspace text NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (keyspace, key)
    )"];

/// The advisory lock (an arbitrary constant) that serialises migrations.
const MIGRATION_LOCK: i64 = 0x6d67_7261_7068_0001;

/// How many idle connections the pool keeps.
const POOL_IDLE: usize = 16;

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
    config: Config,
    tls: MakeRustlsConnect,
    idle: Mutex<Vec<Client>>,
    /// What messages call the database: host and database name, never a password.
    name: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.name)
            .finish()
    }
}

/// A database error as a store error, naming the operation; PostgreSQL's own message (and
/// its detail) never holds a password.
fn db(op: &str, e: postgres::Error) -> Error {
    let detail = e
        .as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string());
    Error::Io(format!("PostgreSQL {op}: {detail}"))
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
                    postgres::config::Host::Tcp(h) => h.clone(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let tls = MakeRustlsConnect::new(tls_config(options.ca_pem.as_deref())?);
        let store = PgStore {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            name,
        };
        store.migrate()?;
        Ok(store)
    }

    fn connect(&self) -> Result<Client> {
        let result = match self.config.get_ssl_mode() {
            postgres::config::SslMode::Disable => self.config.connect(NoTls),
            _ => self.config.connect(self.tls.clone()),
        };
        result.map_err(|e| db(&format!("connect to {}", self.name), e))
    }

    /// Runs `f` on a pooled connection; a connection that failed is not returned to the
    /// pool.
    fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut client = match pooled {
            Some(c) if !c.is_closed() => c,
            _ => self.connect()?,
        };
        let out = f(&mut client);
        // A precondition conflict leaves the connection healthy; an I/O failure may not.
        let healthy = !client.is_closed() && !matches!(out, Err(Error::Io(_)));
        if healthy {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < POOL_IDLE {
                idle.push(client);
            }
        }
        out
    }

    fn migrate(&self) -> Result<()> {
        self.with(|c| {
            let mut tx = c.transaction().map_err(|e| db("begin", e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .map_err(|e| db("lock the schema", e))?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS metalgraph_schema (version integer NOT NULL)",
            )
            .map_err(|e| db("create the schema table", e))?;
            let version: i32 = match tx
                .query_opt("SELECT version FROM metalgraph_schema", &[])
                .map_err(|e| db("read the schema version", e))?
            {
                Some(row) => row.get(0),
                None => {
                    tx.execute("INSERT INTO metalgraph_schema (version) VALUES (0)", &[])
                        .map_err(|e| db("record the schema version", e))?;
                    0
                }
            };
            if version > SCHEMA_VERSION {
                return Err(Error::Io(format!(
                    "the database {} has schema version {version}, newer than this build's \
                     {SCHEMA_VERSION}: run a newer metalgraph",
                    self.name
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                tx.batch_execute(sql)
                    .map_err(|e| db(&format!("migrate the schema to version {}", i + 1), e))?;
            }
            tx.execute(
                "UPDATE metalgraph_schema SET version = $1",
                &[&SCHEMA_VERSION],
            )
            .map_err(|e| db("record the schema version", e))?;
            tx.commit().map_err(|e| db("commit the schema", e))
        })
    }
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
        self.with(|c| {
            c.query_opt(
                "SELECT value FROM metalgraph_kv WHERE keyspace = $1 AND key = $2",
                &[&keyspace, &key],
            )
            .map(|row| row.map(|r| r.get(0)))
            .map_err(|e| db("read", e))
        })
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan(keyspace, Scan::prefix(prefix, usize::MAX))
    }

    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let Some((lo, hi)) = scan.bounds() else {
            return Ok(Vec::new());
        };
        let bound = |b: &std::ops::Bound<Vec<u8>>| match b {
            std::ops::Bound::Included(k) => (Some(k.clone()), true),
            std::ops::Bound::Excluded(k) => (Some(k.clone()), false),
            std::ops::Bound::Unbounded => (None, true),
        };
        let ((lo, lo_inc), (hi, hi_inc)) = (bound(&lo), bound(&hi));
        let order = if scan.reverse { "DESC" } else { "ASC" };
        let limit = i64::try_from(scan.limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT key, value FROM metalgraph_kv WHERE keyspace = $1 \
             AND ($2::bytea IS NULL OR key > $2 OR ($3 AND key = $2)) \
             AND ($4::bytea IS NULL OR key < $4 OR ($5 AND key = $4)) \
             ORDER BY key {order} LIMIT $6"
        );
        self.with(|c| {
            let rows = c
                .query(&sql, &[&keyspace, &lo, &lo_inc, &hi, &hi_inc, &limit])
                .map_err(|e| db("scan", e))?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
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
            match op {
                Op::Put {
                    keyspace,
                    key,
                    value,
                } => last.insert((keyspace, key), Some(value)),
                Op::Delete { keyspace, key } => last.insert((keyspace, key), None),
            };
        }
        let (mut put_ks, mut put_k, mut put_v) = (Vec::new(), Vec::new(), Vec::new());
        let (mut del_ks, mut del_k) = (Vec::new(), Vec::new());
        for ((ks, k), v) in last {
            match v {
                Some(v) => {
                    put_ks.push(ks);
                    put_k.push(k);
                    put_v.push(v);
                }
                None => {
                    del_ks.push(ks);
                    del_k.push(k);
                }
            }
        }
        let pre_ks: Vec<&str> = batch.preconditions.iter().map(|p| p.target().0).collect();
        let pre_k: Vec<&[u8]> = batch.preconditions.iter().map(|p| p.target().1).collect();
        self.with(|c| {
            let mut tx = c.transaction().map_err(|e| db("begin", e))?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(l) FROM unnest($1::bigint[]) AS l ORDER BY l",
                &[&locks],
            )
            .map_err(|e| db("lock the keys", e))?;
            if !pre_k.is_empty() {
                let rows = tx
                    .query(
                        "SELECT p.i, kv.value FROM unnest($1::text[], $2::bytea[]) \
                         WITH ORDINALITY AS p(keyspace, key, i) \
                         LEFT JOIN metalgraph_kv kv ON kv.keyspace = p.keyspace AND kv.key = p.key \
                         ORDER BY p.i",
                        &[&pre_ks, &pre_k],
                    )
                    .map_err(|e| db("check the preconditions", e))?;
                for (index, (row, p)) in rows.iter().zip(&batch.preconditions).enumerate() {
                    let current: Option<Vec<u8>> = row.get(1);
                    if !p.holds(current.as_deref()) {
                        // Dropping the transaction rolls it back.
                        return Err(p.conflict(index));
                    }
                }
            }
            if !del_k.is_empty() {
                tx.execute(
                    "DELETE FROM metalgraph_kv kv USING unnest($1::text[], $2::bytea[]) AS d(keyspace, key) \
                     WHERE kv.keyspace = d.keyspace AND kv.key = d.key",
                    &[&del_ks, &del_k],
                )
                .map_err(|e| db("delete", e))?;
            }
            if !put_k.is_empty() {
                tx.execute(
                    "INSERT INTO metalgraph_kv (keyspace, key, value) \
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                     ON CONFLICT (keyspace, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&put_ks, &put_k, &put_v],
                )
                .map_err(|e| db("write", e))?;
            }
            tx.commit().map_err(|e| db("commit", e))
        })
    }

    fn close(&self) -> Result<()> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
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
