//! `metalgraph rekey`: rotates the secret key that seals stored secrets (docs/security.md).
//!
//! With the server stopped (the store is locked while it runs), a new key is made beside
//! the old one (`secret.key.new`), every sealed value is opened with the old key and sealed
//! with the new one (`seal::rekey`), and the new key file then replaces the old. Cut short,
//! it is finished by running it again: the new key file is kept, values already under it
//! are left, and `serve` refuses to start while the new key file is there.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use metalgraph_engine::keys;
use metalgraph_engine::seal::{self, Sealer};

/// Where a rekey keeps the new key until it is done: `secret.key` → `secret.key.new`.
pub fn pending_key_file(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Re-seals every secret of the store in `data_dir` under a new key and replaces
/// `key_file` with it; returns how many records were rewritten.
pub fn run(
    data_dir: &Path,
    backend: metalgraph_store::Backend,
    options: &metalgraph_store::OpenOptions,
    key_file: &Path,
) -> anyhow::Result<usize> {
    anyhow::ensure!(
        key_file.exists(),
        "there is no secret key at {}: nothing is sealed with it (give --secret-key-file)",
        key_file.display()
    );
    let old = Sealer::load_or_create(key_file)
        .map_err(|e| anyhow::anyhow!("secret key {}: {e}", key_file.display()))?;
    let store = metalgraph_store::open_with(backend, data_dir, options).with_context(|| {
        format!(
            "cannot open the store in {} (is serve still running? stop it, and every replica, first)",
            data_dir.display()
        )
    })?;
    if backend == metalgraph_store::Backend::Postgres {
        let live = metalgraph_engine::ownership::live_replicas(store.as_ref())
            .map_err(|e| anyhow::anyhow!("cannot read the replicas of the database: {e}"))?;
        anyhow::ensure!(
            live.is_empty(),
            "replicas serve this database ({}): stop every replica first (one killed rather \
             than stopped counts as serving until its lease runs out, lease_ttl_ms)",
            live.join(", ")
        );
    }
    // Made only once nothing serves the store: a new key file keeps `serve` from starting.
    let pending = pending_key_file(key_file);
    let new = Sealer::load_or_create(&pending)
        .map_err(|e| anyhow::anyhow!("new secret key {}: {e}", pending.display()))?;
    let rewritten = seal::rekey(
        store.as_ref(),
        &old,
        &new,
        &[keys::NODES, keys::ENDPOINTS, crate::hooks::KEYSPACE],
    )
    .map_err(|e| anyhow::anyhow!("re-sealing failed: {e}; run rekey again to finish"))?;
    store.close().context("closing the store failed")?;
    std::fs::rename(&pending, key_file).with_context(|| {
        format!(
            "the secrets are sealed with {} now, but it could not replace {}; move it there",
            pending.display(),
            key_file.display()
        )
    })?;
    if let Some(dir) = key_file.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(rewritten)
}
