//! Secrets at rest: values such as OBM passwords are sealed (ChaCha20-Poly1305, a random
//! 96-bit nonce each) before they are written to the store, with a 256-bit key kept in a
//! file of its own (`<data-dir>/secret.key`, mode 0600). A copy of the data directory's
//! store alone reveals none of them.
//!
//! Two forms: a sealed string field (`sealed:v1:<hex of nonce, ciphertext and tag>`, for
//! OBM passwords inside node records and webhook secrets), and [`SealedStore`], which seals
//! the values of whole keyspaces — workflow and task records, which hold run options,
//! outputs and checkpoints — as `~mgs1:<base64url>`. Reading a value that is not sealed returns it as it
//! is, so records written before sealing still read; the engine seals node passwords on
//! start, and other records as they are next written.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use metalgraph_store::{Batch, Bytes, Op, Scan, Store};
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{hkdf, hmac};

use crate::keys;

/// What every sealed value starts with.
pub const PREFIX: &str = "sealed:v1:";

const KEY_LEN: usize = 32;

/// The key that seals and opens stored secrets.
pub struct Sealer {
    key: LessSafeKey,
    /// The key's pseudo-random key for HKDF, from which keys for other purposes are
    /// derived ([`Sealer::derive_hmac_key`]), so that one key file serves them all and no
    /// purpose's key reveals another's.
    prk: hkdf::Prk,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    /// A sealer with `key` (32 bytes).
    pub fn new(raw: &[u8]) -> Result<Sealer, String> {
        let key = UnboundKey::new(&CHACHA20_POLY1305, raw)
            .map_err(|_| format!("a secret key is {KEY_LEN} bytes, not {}", raw.len()))?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"metalgraph secret.key").extract(raw);
        Ok(Sealer {
            key: LessSafeKey::new(key),
            prk,
            rng: SystemRandom::new(),
        })
    }

    /// An HMAC-SHA256 key for `purpose`, derived from the secret key with HKDF-SHA256
    /// (`purpose` is the info): the same key file and purpose always give the same key,
    /// and nothing computed with it reveals the secret key or another purpose's key.
    pub fn derive_hmac_key(&self, purpose: &[u8]) -> hmac::Key {
        let info = [purpose];
        let okm = self
            .prk
            .expand(&info, hmac::HMAC_SHA256)
            .expect("HKDF-SHA256 gives 32 bytes");
        hmac::Key::from(okm)
    }

    /// Reads the key file at `path`, creating it (mode 0600, 32 random bytes as hex) when
    /// it does not exist. A key file readable by others is refused.
    pub fn load_or_create(path: &Path) -> Result<Sealer, String> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| format!("cannot read {shown}: {e}"))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "the secret key {shown} is readable by others (mode {:o}); \
                         chmod 600 it",
                        mode & 0o777
                    ));
                }
                let key = from_hex(text.trim()).ok_or_else(|| {
                    format!("the secret key {shown} is not {KEY_LEN} bytes of hex")
                })?;
                Sealer::new(&key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| "the system has no random numbers".to_owned())?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                // Created with its final mode and never replaced: a crash leaves either no
                // file or the whole key (it is written and synced before first use).
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("cannot create the secret key {shown}: {e}"))?;
                file.write_all(format!("{}\n", to_hex(&key)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| format!("cannot write the secret key {shown}: {e}"))?;
                Sealer::new(&key)
            }
            Err(e) => Err(format!("cannot read the secret key {shown}: {e}")),
        }
    }

    /// Seals `plain` as a string field: `sealed:v1:` and the hex of [`Sealer::seal_raw`].
    pub fn seal(&self, plain: &str) -> String {
        format!("{PREFIX}{}", to_hex(&self.seal_raw(plain.as_bytes())))
    }

    /// Opens a sealed string field; a value that is not sealed is returned as it is.
    pub fn open(&self, stored: &str) -> Result<String, String> {
        let Some(hex) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let bad = || "a sealed secret was sealed with another key, or is damaged".to_owned();
        let plain = self
            .open_raw(&from_hex(hex).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        String::from_utf8(plain).map_err(|_| bad())
    }

    /// The nonce, then `plain` encrypted with its tag.
    fn seal_raw(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).expect("random numbers");
        let mut out = Vec::with_capacity(aead::NONCE_LEN + plain.len() + aead::MAX_TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[aead::NONCE_LEN..],
            )
            .expect("sealing cannot fail for a value this size");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// What [`Sealer::seal_raw`] made, opened; `None` for another key or damage.
    fn open_raw(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < aead::NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let len = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }

    /// Seals bytes into the form a store keeps: the magic, then base64url of
    /// [`Sealer::seal_raw`].
    fn seal_bytes(&self, plain: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        let sealed = self.seal_raw(plain);
        let mut out = String::with_capacity(STORED_MAGIC.len() + sealed.len() * 4 / 3 + 4);
        out.push_str(STORED_MAGIC);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(&sealed, &mut out);
        out.into_bytes()
    }

    /// Opens what [`Sealer::seal_bytes`] made; other bytes are returned as they are.
    fn open_bytes(&self, stored: Vec<u8>) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        let Some(rest) = stored.strip_prefix(STORED_MAGIC.as_bytes()) else {
            return Ok(stored);
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .ok()
            .and_then(|raw| self.open_raw(&raw))
            .ok_or_else(|| "a sealed record was sealed with another key, or is damaged".to_owned())
    }
}

/// The `meta` key of a value sealed with the store's key, by which a key is checked.
const CHECK_KEY: &[u8] = b"seal_check";
const CHECK_TEXT: &str = "metalgraph secret key check";

/// Checks that `sealer` holds the key this store's secrets are sealed with (blocking), and
/// records a check value in a store that has none yet. Run on start, before anything is
/// read: a wrong key fails here, naming the problem, rather than in every job.
pub fn check_key(store: &dyn Store, sealer: &Sealer) -> Result<(), String> {
    check_key_once(store, sealer).or_else(|e| match e {
        // Another replica of the database wrote the check value first: check against it.
        None => check_key_once(store, sealer).map_err(|e| e.unwrap_or_default()),
        Some(e) => Err(e),
    })
}

/// [`check_key`]'s one attempt; `Err(None)` when another writer stored the check value
/// between this one's read and write.
fn check_key_once(store: &dyn Store, sealer: &Sealer) -> Result<(), Option<String>> {
    match store
        .get(keys::META, CHECK_KEY)
        .map_err(|e| Some(e.to_string()))?
    {
        Some(v) => {
            let stored = String::from_utf8_lossy(&v);
            match sealer.open(&stored) {
                Ok(text) if text == CHECK_TEXT => Ok(()),
                _ => Err(Some(
                    "the secret key does not open this store's secrets: they were sealed \
                     with another key (give the key file they were sealed with)"
                        .into(),
                )),
            }
        }
        None => {
            let mut batch = Batch::new();
            batch.require_absent(keys::META, CHECK_KEY);
            batch.put(keys::META, CHECK_KEY, sealer.seal(CHECK_TEXT).into_bytes());
            store.commit(batch).map_err(|e| match e {
                metalgraph_store::Error::Conflict { .. } => None,
                other => Some(other.to_string()),
            })
        }
    }
}

/// What a value sealed by [`SealedStore`] starts with (then base64url of
/// [`Sealer::seal_raw`]): no JSON document starts with a `~`. Printable, so the file store's
/// text journal keeps it at a third above the raw size rather than escaping every byte.
const STORED_MAGIC: &str = "~mgs1:";

/// The keyspaces whose values [`SealedStore`] seals whole: workflow records hold the run
/// options (passwords and tokens a graph was given), plans hold them merged into their
/// tasks' options, task records hold outputs and
/// checkpoints, requests for a partition's owner may hold a node's callback and its task's
/// token, and a published waiting task holds its token.
pub const SEALED_KEYSPACES: [&str; 5] = [
    keys::WORKFLOWS,
    keys::PLANS,
    keys::TASKS,
    keys::INBOX,
    keys::WAITING,
];

/// A store that seals the values of [`SEALED_KEYSPACES`] whole before they reach `inner`,
/// and opens them when they are read; every other keyspace passes through. Records written
/// unsealed (by an earlier version) still read. No precondition compares a sealed
/// keyspace's value (each seal is different), which the engine never asks for.
pub struct SealedStore {
    inner: Arc<dyn Store>,
    sealer: Arc<Sealer>,
}

impl SealedStore {
    pub fn wrap(inner: Arc<dyn Store>, sealer: Arc<Sealer>) -> Arc<dyn Store> {
        Arc::new(SealedStore { inner, sealer })
    }

    fn open(&self, keyspace: &str, v: Vec<u8>) -> metalgraph_store::Result<Vec<u8>> {
        if SEALED_KEYSPACES.contains(&keyspace) {
            self.sealer
                .open_bytes(v)
                .map_err(|e| metalgraph_store::Error::Io(format!("{keyspace}: {e}")))
        } else {
            Ok(v)
        }
    }

    fn open_all(
        &self,
        keyspace: &str,
        rows: Vec<(Bytes, Bytes)>,
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        rows.into_iter()
            .map(|(k, v)| Ok((k, self.open(keyspace, v)?)))
            .collect()
    }
}

impl Store for SealedStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> metalgraph_store::Result<Option<Bytes>> {
        self.inner
            .get(keyspace, key)?
            .map(|v| self.open(keyspace, v))
            .transpose()
    }

    fn scan_prefix(
        &self,
        keyspace: &str,
        prefix: &[u8],
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        let rows = self.inner.scan_prefix(keyspace, prefix)?;
        self.open_all(keyspace, rows)
    }

    fn scan(
        &self,
        keyspace: &str,
        scan: Scan<'_>,
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        let rows = self.inner.scan(keyspace, scan)?;
        self.open_all(keyspace, rows)
    }

    fn commit(&self, mut batch: Batch) -> metalgraph_store::Result<()> {
        for op in &mut batch.ops {
            if let Op::Put {
                keyspace, value, ..
            } = op
                && SEALED_KEYSPACES.contains(&keyspace.as_str())
            {
                *value = self.sealer.seal_bytes(value);
            }
        }
        self.inner.commit(batch)
    }

    fn close(&self) -> metalgraph_store::Result<()> {
        self.inner.close()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn now_ms(&self) -> metalgraph_store::Result<u64> {
        self.inner.now_ms()
    }
}

/// Whether `stored` is a sealed value.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` for anything else.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// How many records a rekey commits at once.
const REKEY_BATCH: usize = 256;

/// Re-seals every secret of `store` (opened without [`SealedStore`]) from `old` to `new`,
/// blocking: the records of [`SEALED_KEYSPACES`], and the sealed string fields inside the
/// JSON records of `field_keyspaces` (node OBM passwords, webhook secrets). Returns how
/// many records it rewrote.
///
/// Resumable: a value the new key opens already is left as it is, so a rekey cut short (a
/// crash, a full disk) is finished by running it again with the same two keys; the check
/// value (see [`check_key`]) is rewritten last. Until then `serve` with either key alone
/// may meet values it cannot open, so it must not run meanwhile.
pub fn rekey(
    store: &dyn Store,
    old: &Sealer,
    new: &Sealer,
    field_keyspaces: &[&str],
) -> Result<usize, String> {
    if let Some(v) = store
        .get(keys::META, CHECK_KEY)
        .map_err(|e| e.to_string())?
    {
        let stored = String::from_utf8_lossy(&v);
        let opens = |s: &Sealer| s.open(&stored).is_ok_and(|t| t == CHECK_TEXT);
        if !opens(old) && !opens(new) {
            return Err(
                "neither key opens this store's secrets: give the key file they are sealed with"
                    .into(),
            );
        }
    }
    let mut rewritten = 0;
    let reseal_bytes = |key: &[u8], v: &[u8]| -> Result<Option<Vec<u8>>, String> {
        if !v.starts_with(STORED_MAGIC.as_bytes()) || new.open_bytes(v.to_vec()).is_ok() {
            return Ok(None);
        }
        let plain = old.open_bytes(v.to_vec()).map_err(|_| {
            format!(
                "record {} opens with neither key",
                String::from_utf8_lossy(key)
            )
        })?;
        Ok(Some(new.seal_bytes(&plain)))
    };
    let reseal_fields = |key: &[u8], v: &[u8]| -> Result<Option<Vec<u8>>, String> {
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(v) else {
            return Ok(None);
        };
        let mut changed = false;
        reseal_strings(&mut doc, old, new, &mut changed)
            .map_err(|e| format!("record {}: {e}", String::from_utf8_lossy(key)))?;
        Ok(changed.then(|| serde_json::to_vec(&doc).expect("JSON serialises")))
    };
    let plan = SEALED_KEYSPACES
        .iter()
        .map(|k| (*k, true))
        .chain(field_keyspaces.iter().map(|k| (*k, false)));
    for (keyspace, whole) in plan {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let rows = store
                .scan(
                    keyspace,
                    Scan::prefix(b"", REKEY_BATCH).after(after.as_deref()),
                )
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = rows.last() else { break };
            after = Some(last.clone());
            let mut batch = Batch::new();
            for (k, v) in &rows {
                let resealed = if whole {
                    reseal_bytes(k, v)?
                } else {
                    reseal_fields(k, v)?
                };
                if let Some(v) = resealed {
                    batch.put(keyspace, k.clone(), v);
                    rewritten += 1;
                }
            }
            if !batch.is_empty() {
                store.commit(batch).map_err(|e| e.to_string())?;
            }
            if rows.len() < REKEY_BATCH {
                break;
            }
        }
    }
    let mut batch = Batch::new();
    batch.put(keys::META, CHECK_KEY, new.seal(CHECK_TEXT).into_bytes());
    store.commit(batch).map_err(|e| e.to_string())?;
    Ok(rewritten)
}

/// Re-seals every sealed string inside `v` from `old` to `new`, setting `changed`.
fn reseal_strings(
    v: &mut serde_json::Value,
    old: &Sealer,
    new: &Sealer,
    changed: &mut bool,
) -> Result<(), String> {
    match v {
        serde_json::Value::String(s) if is_sealed(s) && new.open(s).is_err() => {
            let plain = old
                .open(s)
                .map_err(|_| "a sealed field opens with neither key".to_owned())?;
            *s = new.seal(&plain);
            *changed = true;
        }
        serde_json::Value::Array(items) => {
            for item in items {
                reseal_strings(item, old, new, changed)?;
            }
        }
        serde_json::Value::Object(map) => {
            for item in map.values_mut() {
                reseal_strings(item, old, new, changed)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rekey_reseals_every_secret_and_resumes_when_cut_short() {
        let raw: Arc<dyn Store> = Arc::new(metalgraph_store::MemStore::new());
        let old = Arc::new(Sealer::new(&[1u8; 32]).unwrap());
        let new = Arc::new(Sealer::new(&[2u8; 32]).unwrap());
        check_key(raw.as_ref(), &old).unwrap();
        let sealed = SealedStore::wrap(raw.clone(), old.clone());
        let mut batch = Batch::new();
        for i in 0..600 {
            batch.put(
                keys::WORKFLOWS,
                format!("wf{i:04}"),
                format!("{{\"n\":{i}}}"),
            );
        }
        batch.put(keys::TASKS, "wf0000/00000", b"{\"out\":\"x\"}".to_vec());
        sealed.commit(batch).unwrap();
        let node = serde_json::json!({"id": "n1", "obms": [{"config": {
            "password": old.seal("BMC-pw"), "user": "root"}}]});
        let hook = serde_json::json!({"id": "h1", "secret": old.seal("hook-secret")});
        let mut batch = Batch::new();
        batch.put(keys::NODES, "n1", serde_json::to_vec(&node).unwrap());
        batch.put("hooks", "h1", serde_json::to_vec(&hook).unwrap());
        raw.commit(batch).unwrap();

        // Cut short: only the first page of workflows is re-sealed, by hand.
        let first = raw.scan(keys::WORKFLOWS, Scan::prefix(b"", 100)).unwrap();
        let mut batch = Batch::new();
        for (k, v) in first {
            batch.put(
                keys::WORKFLOWS,
                k,
                new.seal_bytes(&old.open_bytes(v).unwrap()),
            );
        }
        raw.commit(batch).unwrap();
        // Run again (as after a crash): everything ends under the new key.
        let n = rekey(raw.as_ref(), &old, &new, &[keys::NODES, "hooks"]).unwrap();
        assert_eq!(
            n,
            500 + 1 + 2,
            "the rest of the workflows, the task, the node and the hook"
        );
        check_key(raw.as_ref(), &new).unwrap();
        assert!(check_key(raw.as_ref(), &old).is_err());
        let reopened = SealedStore::wrap(raw.clone(), new.clone());
        assert_eq!(
            reopened.get(keys::WORKFLOWS, b"wf0599").unwrap().unwrap(),
            b"{\"n\":599}"
        );
        let stale = SealedStore::wrap(raw.clone(), old.clone());
        assert!(stale.get(keys::WORKFLOWS, b"wf0599").is_err());
        let node: serde_json::Value =
            serde_json::from_slice(&raw.get(keys::NODES, b"n1").unwrap().unwrap()).unwrap();
        let pw = node["obms"][0]["config"]["password"].as_str().unwrap();
        assert_eq!(new.open(pw).unwrap(), "BMC-pw");
        assert_eq!(node["obms"][0]["config"]["user"], "root");
        let hook: serde_json::Value =
            serde_json::from_slice(&raw.get("hooks", b"h1").unwrap().unwrap()).unwrap();
        assert_eq!(
            new.open(hook["secret"].as_str().unwrap()).unwrap(),
            "hook-secret"
        );
        // Once done, again is nothing; a third key is refused.
        assert_eq!(
            rekey(raw.as_ref(), &old, &new, &[keys::NODES, "hooks"]).unwrap(),
            0
        );
        let third = Sealer::new(&[3u8; 32]).unwrap();
        assert!(rekey(raw.as_ref(), &third, &third, &[]).is_err());
    }

    #[test]
    fn seals_opens_and_refuses_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = Sealer::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = a.seal("Pl41n-password");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("Pl41n"));
        assert_ne!(sealed, a.seal("Pl41n-password"), "a fresh nonce each time");
        assert_eq!(a.open(&sealed).unwrap(), "Pl41n-password");
        // The same file gives the same key.
        let again = Sealer::load_or_create(&path).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), "Pl41n-password");
        assert_eq!(a.open("not sealed").unwrap(), "not sealed");
        let other = Sealer::new(&[7u8; 32]).unwrap();
        assert_eq!(
            other.open(&sealed).unwrap_err(),
            "a sealed secret was sealed with another key, or is damaged"
        );
        let mut damaged = sealed.clone();
        let last = damaged.pop().unwrap();
        damaged.push(if last == '0' { '1' } else { '0' });
        assert!(a.open(&damaged).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Sealer::load_or_create(&path).unwrap_err();
        assert!(err.contains("readable by others (mode 644)"), "{err}");
    }

    #[test]
    fn a_sealed_store_seals_workflow_records_whole_and_reads_them_back() {
        let raw: Arc<dyn Store> = Arc::new(metalgraph_store::MemStore::new());
        let sealer = Arc::new(Sealer::new(&[3u8; 32]).unwrap());
        let store = SealedStore::wrap(raw.clone(), sealer);
        let record = br#"{"options":{"password":"Wf-s3cret"}}"#.to_vec();
        // A record written before sealing, unsealed, still reads.
        let mut old = Batch::new();
        old.put(
            keys::TASKS,
            b"old/00000".to_vec(),
            b"{\"legacy\":true}".to_vec(),
        );
        raw.commit(old).unwrap();
        let mut batch = Batch::new();
        batch.put(keys::WORKFLOWS, b"w1".to_vec(), record.clone());
        batch.put(keys::NODE_LOCKS, b"n1".to_vec(), b"w1".to_vec());
        store.commit(batch).unwrap();
        let stored = raw.get(keys::WORKFLOWS, b"w1").unwrap().unwrap();
        assert!(stored.starts_with(STORED_MAGIC.as_bytes()));
        assert!(!stored.windows(9).any(|w| w == b"Wf-s3cret"));
        assert_eq!(
            store.get(keys::WORKFLOWS, b"w1").unwrap(),
            Some(record.clone())
        );
        assert_eq!(
            store.scan(keys::WORKFLOWS, Scan::prefix(b"", 10)).unwrap(),
            vec![(b"w1".to_vec(), record.clone())]
        );
        assert_eq!(
            store.scan_prefix(keys::TASKS, b"old/").unwrap()[0].1,
            b"{\"legacy\":true}".to_vec()
        );
        // Other keyspaces pass through as they are.
        assert_eq!(
            raw.get(keys::NODE_LOCKS, b"n1").unwrap(),
            Some(b"w1".to_vec())
        );
        // Another key cannot read the record.
        let other = SealedStore::wrap(raw, Arc::new(Sealer::new(&[4u8; 32]).unwrap()));
        let err = other.get(keys::WORKFLOWS, b"w1").unwrap_err().to_string();
        assert!(err.contains("sealed with another key"), "{err}");
    }

    #[test]
    fn a_store_remembers_its_key() {
        let store = metalgraph_store::MemStore::new();
        let a = Sealer::new(&[1u8; 32]).unwrap();
        check_key(&store, &a).unwrap();
        check_key(&store, &a).unwrap();
        let b = Sealer::new(&[2u8; 32]).unwrap();
        let err = check_key(&store, &b).unwrap_err();
        assert!(
            err.starts_with("the secret key does not open this store's secrets"),
            "{err}"
        );
    }
}
