//! The conformance suite: every `Store` backend must give the same answers.
//!
//! Each check below is a plain function taking an `Open` (how to open the backend on a
//! directory). The `semantics!` and `durability!` macros instantiate them per backend; the
//! in-memory store runs only the checks that do not reopen. Checks specific to the file
//! backend's journal (torn tails, corruption, compaction) live in `mod file_journal`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use metalgraph_store::{
    Batch, Bytes, Error, FileStore, MemStore, PgOptions, PgStore, Scan, SledStore, Store,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

type Open = fn(&Path) -> Box<dyn Store>;

fn open_sled(dir: &Path) -> Box<dyn Store> {
    Box::new(SledStore::open(dir).expect("open sled store"))
}

fn open_file(dir: &Path) -> Box<dyn Store> {
    Box::new(FileStore::open(dir).expect("open file store"))
}

/// The file backend with a tiny compaction threshold, so that most commits compact.
fn open_file_compacting(dir: &Path) -> Box<dyn Store> {
    Box::new(
        FileStore::open(dir)
            .expect("open file store")
            .with_compact_threshold(300),
    )
}

/// PostgreSQL, in this test process's throwaway cluster: a schema per directory, made
/// when the directory is first opened and found again (by a file in it) on reopen.
fn open_pg(dir: &Path) -> Box<dyn Store> {
    let url = metalgraph_testkit::postgres().store_url_for(dir);
    Box::new(PgStore::open(&PgOptions { url, ca_pem: None }).expect("open the PostgreSQL store"))
}

fn open_mem(_dir: &Path) -> Box<dyn Store> {
    Box::new(MemStore::new())
}

/// A store on a fresh temporary directory that can be closed and reopened.
struct Harness {
    dir: tempfile::TempDir,
    open: Open,
    store: Option<Box<dyn Store>>,
}

impl Harness {
    fn new(open: Open) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Some(open(dir.path()));
        Harness { dir, open, store }
    }

    fn store(&self) -> &dyn Store {
        self.store.as_deref().expect("store is open")
    }

    /// Drops the store, as a process exit would, and opens the same directory again.
    fn reopen(&mut self) {
        self.store = None;
        self.store = Some((self.open)(self.dir.path()));
    }
}

fn put(store: &dyn Store, keyspace: &str, key: &[u8], value: &[u8]) {
    let mut batch = Batch::new();
    batch.put(keyspace, key, value);
    store.commit(batch).expect("commit a put");
}

fn get(store: &dyn Store, keyspace: &str, key: &[u8]) -> Option<Bytes> {
    store.get(keyspace, key).expect("get")
}

fn scan(store: &dyn Store, keyspace: &str, prefix: &[u8]) -> Vec<(Bytes, Bytes)> {
    store.scan_prefix(keyspace, prefix).expect("scan")
}

fn conflict_index(result: Result<(), Error>) -> usize {
    match result {
        Err(Error::Conflict { index, .. }) => index,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn kv(key: &[u8], value: &[u8]) -> (Bytes, Bytes) {
    (key.to_vec(), value.to_vec())
}

// ---- Semantics: every backend, no reopen. ----

fn get_put_delete(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    assert_eq!(get(s, "nodes", b"a"), None);
    put(s, "nodes", b"a", b"1");
    assert_eq!(get(s, "nodes", b"a"), Some(b"1".to_vec()));
    put(s, "nodes", b"a", b"2");
    assert_eq!(get(s, "nodes", b"a"), Some(b"2".to_vec()));
    put(s, "nodes", b"", b"empty key");
    put(s, "nodes", b"empty value", b"");
    assert_eq!(get(s, "nodes", b""), Some(b"empty key".to_vec()));
    assert_eq!(get(s, "nodes", b"empty value"), Some(Vec::new()));

    let mut batch = Batch::new();
    batch.delete("nodes", b"a").delete("nodes", b"never there");
    s.commit(batch)
        .expect("deleting an absent key is not an error");
    assert_eq!(get(s, "nodes", b"a"), None);
    assert_eq!(
        scan(s, "nodes", b""),
        vec![kv(b"", b"empty key"), kv(b"empty value", b"")]
    );
}

fn scan_prefix_order_and_bounds(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    let keys: Vec<&[u8]> = vec![
        b"b",
        b"",
        b"\xff\xff\xff",
        b"a",
        b"\x00",
        b"ab",
        b"\xff",
        b"abc",
        b"\xff\x00",
        b"ac",
        b"\x01",
        b"\xff\xff",
        b"a\xff",
        b"b\x00",
    ];
    let mut batch = Batch::new();
    for key in &keys {
        batch.put("ks", *key, [b"v:".as_slice(), key].concat());
    }
    s.commit(batch).unwrap();

    let mut sorted: Vec<Bytes> = keys.iter().map(|k| k.to_vec()).collect();
    sorted.sort();
    for prefix in [
        &b""[..],
        b"a",
        b"ab",
        b"abc",
        b"abcd",
        b"b",
        b"c",
        b"\x00",
        b"\xff",
        b"\xff\xff",
        b"\xff\xff\xff",
        b"\xff\xff\xff\xff",
        b"a\xff",
    ] {
        let expected: Vec<(Bytes, Bytes)> = sorted
            .iter()
            .filter(|k| k.starts_with(prefix))
            .map(|k| (k.clone(), [b"v:".as_slice(), k].concat()))
            .collect();
        assert_eq!(scan(s, "ks", prefix), expected, "prefix {prefix:?}");
    }
    assert_eq!(scan(s, "other", b""), Vec::new());
}

fn keyspaces_are_isolated(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    let mut batch = Batch::new();
    batch
        .put("nodes", b"k", b"in nodes")
        .put("locks", b"k", b"in locks")
        .put("node state \u{e9}", b"k", b"unicode keyspace");
    s.commit(batch).unwrap();
    assert_eq!(get(s, "nodes", b"k"), Some(b"in nodes".to_vec()));
    assert_eq!(get(s, "locks", b"k"), Some(b"in locks".to_vec()));
    assert_eq!(
        get(s, "node state \u{e9}", b"k"),
        Some(b"unicode keyspace".to_vec())
    );
    assert_eq!(get(s, "unknown", b"k"), None);

    let mut batch = Batch::new();
    batch.delete("locks", b"k");
    s.commit(batch).unwrap();
    assert_eq!(get(s, "locks", b"k"), None);
    assert_eq!(scan(s, "nodes", b""), vec![kv(b"k", b"in nodes")]);
    // A keyspace whose name is a prefix of another's shares nothing with it.
    put(s, "node", b"k", b"in node");
    assert_eq!(scan(s, "nodes", b""), vec![kv(b"k", b"in nodes")]);
    assert_eq!(scan(s, "node", b""), vec![kv(b"k", b"in node")]);
}

fn invalid_keyspaces_are_rejected(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    let long = "x".repeat(65);
    for bad in ["", "a/b", "tab\there", "new\nline", long.as_str()] {
        assert!(
            matches!(s.get(bad, b"k"), Err(Error::InvalidKeyspace(_))),
            "get {bad:?}"
        );
        assert!(
            matches!(s.scan_prefix(bad, b""), Err(Error::InvalidKeyspace(_))),
            "scan {bad:?}"
        );
        let mut batch = Batch::new();
        batch.put("good", b"k", b"v").put(bad, b"k", b"v");
        assert!(
            matches!(s.commit(batch), Err(Error::InvalidKeyspace(_))),
            "commit {bad:?}"
        );
        let mut batch = Batch::new();
        batch.require_absent(bad, b"k").put("good", b"k", b"v");
        assert!(
            matches!(s.commit(batch), Err(Error::InvalidKeyspace(_))),
            "precondition {bad:?}"
        );
    }
    assert_eq!(
        get(s, "good", b"k"),
        None,
        "a rejected batch applies nothing"
    );
    let max = "y".repeat(64);
    put(s, &max, b"k", b"v");
    assert_eq!(get(s, &max, b"k"), Some(b"v".to_vec()));
}

fn failed_precondition_applies_nothing(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    put(s, "a", b"x", b"1");
    put(s, "b", b"y", b"2");

    let mut batch = Batch::new();
    batch
        .require_equals("a", b"x", b"1") // holds
        .require_absent("c", b"z") // holds
        .require_equals("b", b"y", b"wrong") // fails: reported
        .require_absent("a", b"x") // fails too, later
        .put("a", b"x", b"changed")
        .delete("b", b"y")
        .put("c", b"new", b"v");
    assert_eq!(conflict_index(s.commit(batch)), 2);
    assert_eq!(get(s, "a", b"x"), Some(b"1".to_vec()));
    assert_eq!(get(s, "b", b"y"), Some(b"2".to_vec()));
    assert_eq!(scan(s, "c", b""), Vec::new());

    match s.commit({
        let mut b = Batch::new();
        b.require_absent("a", b"x").put("a", b"q", b"v");
        b
    }) {
        Err(Error::Conflict {
            index,
            keyspace,
            key,
        }) => {
            assert_eq!((index, keyspace.as_str(), key.as_str()), (0, "a", "x"));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn absent_and_equals(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    put(s, "ks", b"present", b"v");
    put(s, "ks", b"empty", b"");
    let check = |build: &dyn Fn(&mut Batch)| {
        let mut batch = Batch::new();
        build(&mut batch);
        s.commit(batch)
    };
    assert!(
        check(&|b| {
            b.require_absent("ks", b"missing");
        })
        .is_ok()
    );
    assert!(
        check(&|b| {
            b.require_absent("nowhere", b"missing");
        })
        .is_ok()
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_absent("ks", b"present");
        })),
        0
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_absent("ks", b"empty");
        })),
        0,
        "a key holding an empty value exists"
    );
    assert!(
        check(&|b| {
            b.require_equals("ks", b"present", b"v");
        })
        .is_ok()
    );
    assert!(
        check(&|b| {
            b.require_equals("ks", b"empty", b"");
        })
        .is_ok()
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_equals("ks", b"missing", b"");
        })),
        0,
        "a missing key does not equal the empty value"
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_equals("nowhere", b"k", b"");
        })),
        0
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_equals("ks", b"present", b"v2");
        })),
        0
    );
    assert_eq!(
        conflict_index(check(&|b| {
            b.require_equals("ks", b"present", b"");
        })),
        0
    );
    // Preconditions see the state before the batch, not its own ops.
    assert!(
        check(&|b| {
            b.put("ks", b"fresh", b"1")
                .require_absent("ks", b"fresh")
                .delete("ks", b"present")
                .require_equals("ks", b"present", b"v");
        })
        .is_ok()
    );
    assert_eq!(get(s, "ks", b"fresh"), Some(b"1".to_vec()));
    assert_eq!(get(s, "ks", b"present"), None);
}

fn later_op_wins(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    put(s, "ks", b"deleted then put", b"old");
    let mut batch = Batch::new();
    batch
        .put("ks", b"put twice", b"first")
        .put("ks", b"put twice", b"second")
        .put("ks", b"put then deleted", b"v")
        .delete("ks", b"put then deleted")
        .delete("ks", b"deleted then put")
        .put("ks", b"deleted then put", b"new")
        .put("other", b"put twice", b"other keyspace");
    s.commit(batch).unwrap();
    assert_eq!(
        scan(s, "ks", b""),
        vec![kv(b"deleted then put", b"new"), kv(b"put twice", b"second")]
    );
    assert_eq!(
        scan(s, "other", b""),
        vec![kv(b"put twice", b"other keyspace")]
    );
}

fn empty_and_precondition_only_batches(open: Open) {
    let h = Harness::new(open);
    let s = h.store();
    s.commit(Batch::new()).unwrap();
    put(s, "ks", b"k", b"v");
    let mut batch = Batch::new();
    batch.require_equals("ks", b"k", b"v");
    s.commit(batch).unwrap();
    let mut batch = Batch::new();
    batch
        .require_equals("ks", b"k", b"v")
        .require_absent("ks", b"k");
    assert_eq!(conflict_index(s.commit(batch)), 1);
    assert_eq!(scan(s, "ks", b""), vec![kv(b"k", b"v")]);
}

/// Several threads increment one counter with compare-and-swap; none may be lost. Each
/// increment also records itself in a second keyspace in the same batch, so the counter
/// must always equal the number of records.
fn concurrent_cas_increments(open: Open) {
    const THREADS: usize = 4;
    const INCREMENTS: usize = 15;
    let h = Harness::new(open);
    let s = h.store();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            scope.spawn(move || {
                for i in 0..INCREMENTS {
                    loop {
                        let current = get(s, "counter", b"n");
                        let n: usize = current
                            .as_deref()
                            .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                        let mut batch = Batch::new();
                        match &current {
                            Some(v) => batch.require_equals("counter", b"n", v.clone()),
                            None => batch.require_absent("counter", b"n"),
                        };
                        batch.put("counter", b"n", (n + 1).to_string()).put(
                            "log",
                            format!("{t}/{i:03}"),
                            (n + 1).to_string(),
                        );
                        match s.commit(batch) {
                            Ok(()) => break,
                            Err(Error::Conflict { index: 0, .. }) => continue,
                            Err(e) => panic!("thread {t}: {e}"),
                        }
                    }
                }
            });
        }
    });
    let total = THREADS * INCREMENTS;
    assert_eq!(
        get(s, "counter", b"n"),
        Some(total.to_string().into_bytes())
    );
    let log = scan(s, "log", b"");
    assert_eq!(log.len(), total);
    let mut values: Vec<usize> = log
        .iter()
        .map(|(_, v)| std::str::from_utf8(v).unwrap().parse().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(
        values,
        (1..=total).collect::<Vec<_>>(),
        "each increment saw a distinct value"
    );
}

/// Many threads commit at once (the durable backends group such commits): each batch keeps
/// its own precondition and atomicity. Every thread tries to take the same locks; exactly
/// one takes each, its row is written with it, and each loser is answered with its own
/// conflict and wrote nothing.
fn concurrent_commits_keep_their_own_preconditions(open: Open) {
    const THREADS: usize = 12;
    const LOCKS: usize = 20;
    let mut h = Harness::new(open);
    let s = h.store();
    let won: Vec<Vec<usize>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    let mut won = Vec::new();
                    for i in 0..LOCKS {
                        let mut batch = Batch::new();
                        batch
                            .require_absent("locks", format!("lock-{i:02}"))
                            .put("locks", format!("lock-{i:02}"), t.to_string())
                            .put("rows", format!("{i:02}-{t:02}"), b"won")
                            .put("mine", format!("{t:02}-{i:02}"), b"tried");
                        match s.commit(batch) {
                            Ok(()) => won.push(i),
                            Err(Error::Conflict { index: 0, .. }) => {}
                            Err(e) => panic!("thread {t}, lock {i}: {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let check = |s: &dyn Store| {
        for i in 0..LOCKS {
            let winners: Vec<usize> = (0..THREADS).filter(|t| won[*t].contains(&i)).collect();
            assert_eq!(winners.len(), 1, "lock {i} taken by {winners:?}");
            let t = winners[0];
            assert_eq!(
                get(s, "locks", format!("lock-{i:02}").as_bytes()),
                Some(t.to_string().into_bytes())
            );
            let rows = scan(s, "rows", format!("{i:02}-").as_bytes());
            assert_eq!(rows, vec![kv(format!("{i:02}-{t:02}").as_bytes(), b"won")]);
        }
        let mine = scan(s, "mine", b"");
        assert_eq!(mine.len(), LOCKS, "one row per lock, the winner's");
    };
    check(s);
    if h.dir.path().read_dir().unwrap().next().is_some() {
        h.reopen();
        check(h.store());
    }
}

/// A reader scanning while a writer rewrites many keys in one batch sees every key from
/// the same batch. (sled alone fails this: its iterators lock per step, not per scan.)
fn readers_never_see_part_of_a_batch(open: Open) {
    const KEYS: usize = 64;
    let h = Harness::new(open);
    let s = h.store();
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..200u32 {
                let mut batch = Batch::new();
                for k in 0..KEYS {
                    batch.put("ks", format!("k{k}"), round.to_string());
                }
                s.commit(batch).unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let entries = scan(s, "ks", b"k");
                if let Some((_, first)) = entries.first() {
                    assert_eq!(entries.len(), KEYS);
                    let rounds: std::collections::BTreeSet<&Bytes> =
                        entries.iter().map(|(_, v)| v).collect();
                    assert!(
                        entries.iter().all(|(_, v)| v == first),
                        "saw a partial batch: values from rounds {rounds:?}"
                    );
                }
            }
        });
    });
}

// ---- Durability: backends that persist. ----

fn durable_across_reopen(open: Open) {
    let mut h = Harness::new(open);
    let awkward_key: Vec<u8> = b"key with \" quote % percent \n newline \x00 nul \xff".to_vec();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut batch = Batch::new();
    batch
        .put("nodes", b"a", b"1")
        .put("nodes", b"b", b"2")
        .put("locks", awkward_key.clone(), big.clone())
        .put("spaced keyspace", b"", b"");
    h.store().commit(batch).unwrap();
    h.reopen();
    let mut batch = Batch::new();
    batch
        .require_equals("nodes", b"a", b"1")
        .delete("nodes", b"a")
        .put("nodes", b"c", b"3");
    h.store().commit(batch).unwrap();
    let mut failing = Batch::new();
    failing
        .require_absent("nodes", b"b")
        .put("nodes", b"z", b"never");
    assert!(h.store().commit(failing).is_err());
    h.store().close().unwrap();
    h.reopen();
    h.reopen();
    let s = h.store();
    assert_eq!(scan(s, "nodes", b""), vec![kv(b"b", b"2"), kv(b"c", b"3")]);
    assert_eq!(get(s, "locks", &awkward_key), Some(big));
    assert_eq!(scan(s, "spaced keyspace", b""), vec![kv(b"", b"")]);
}

/// The reference model: keyspaces of ordered maps, with the documented batch semantics.
#[derive(Default, Clone, Debug)]
struct Model {
    keyspaces: BTreeMap<String, BTreeMap<Bytes, Bytes>>,
}

impl Model {
    fn get(&self, keyspace: &str, key: &[u8]) -> Option<Bytes> {
        self.keyspaces.get(keyspace)?.get(key).cloned()
    }

    /// The index of the first failing precondition, or `None` after applying the batch.
    fn commit(&mut self, step: &CommitStep) -> Option<usize> {
        for (index, (keyspace, key, expected)) in step.preconditions.iter().enumerate() {
            if self.get(KEYSPACES[*keyspace], key) != *expected {
                return Some(index);
            }
        }
        for (keyspace, key, value) in &step.ops {
            let entries = self
                .keyspaces
                .entry(KEYSPACES[*keyspace].to_owned())
                .or_default();
            match value {
                Some(value) => entries.insert(key.clone(), value.clone()),
                None => entries.remove(key),
            };
        }
        None
    }
}

const KEYSPACES: [&str; 2] = ["a", "b c"];

/// One commit: preconditions as (keyspace, key, expected value or absent), then ops as
/// (keyspace, key, value to put or `None` to delete).
#[derive(Clone, Debug)]
struct CommitStep {
    preconditions: Vec<(usize, Bytes, Option<Bytes>)>,
    ops: Vec<(usize, Bytes, Option<Bytes>)>,
}

#[derive(Clone, Debug)]
enum Step {
    Commit(CommitStep),
    Reopen,
}

fn key_strategy() -> impl Strategy<Value = Bytes> {
    // Few distinct bytes, so that keys collide, share prefixes and hit the 0x00/0xff edges.
    prop::collection::vec(prop::sample::select(vec![0x00u8, b'a', b'b', 0xff]), 0..3)
}

fn value_strategy() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        prop::sample::select(vec![Vec::new(), b"x".to_vec(), b"y".to_vec()]),
        prop::collection::vec(any::<u8>(), 0..16),
        // Longer than the file store keeps in memory (its INLINE_MAX, 64 bytes):
        // read back from its snapshot or journal.
        prop::collection::vec(any::<u8>(), 60..200),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let entry = || {
        (
            0..KEYSPACES.len(),
            key_strategy(),
            prop::option::of(value_strategy()),
        )
    };
    prop_oneof![
        8 => (
            prop::collection::vec(entry(), 0..3),
            prop::collection::vec(entry(), 0..5),
        )
            .prop_map(|(preconditions, ops)| Step::Commit(CommitStep { preconditions, ops })),
        1 => Just(Step::Reopen),
    ]
}

fn all_keys() -> Vec<Bytes> {
    let symbols = [0x00u8, b'a', b'b', 0xff];
    let mut keys = vec![Vec::new()];
    for &a in &symbols {
        keys.push(vec![a]);
        for &b in &symbols {
            keys.push(vec![a, b]);
        }
    }
    keys
}

/// The store holds what the model holds; with `pages`, every page of every scan too.
fn assert_matches_model(store: &dyn Store, model: &Model, step: usize, pages: bool) {
    for keyspace in KEYSPACES {
        let expected: Vec<(Bytes, Bytes)> = model
            .keyspaces
            .get(keyspace)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for prefix in [&b""[..], b"a", b"\xff", b"\x00", b"ab"] {
            let want: Vec<_> = expected
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .cloned()
                .collect();
            assert_eq!(
                scan(store, keyspace, prefix),
                want,
                "after step {step}: scan {keyspace:?} prefix {prefix:?}"
            );
            if pages {
                assert_pages_match(store, keyspace, prefix, &want, step);
            }
        }
        for key in all_keys() {
            assert_eq!(
                get(store, keyspace, &key),
                model.get(keyspace, &key),
                "after step {step}: get {keyspace:?} {key:?}"
            );
        }
    }
}

/// Every page `Store::scan` gives over `prefix` — from every start key, both directions,
/// several limits — is the model's slice of `want` (the prefix's entries, ascending).
fn assert_pages_match(
    store: &dyn Store,
    keyspace: &str,
    prefix: &[u8],
    want: &[(Bytes, Bytes)],
    step: usize,
) {
    let starts: Vec<Option<Vec<u8>>> = std::iter::once(None)
        .chain(all_keys().into_iter().map(Some))
        .chain([Some(Vec::new()), Some(vec![0xff, 0xff, 0xff])])
        .collect();
    for after in &starts {
        for reverse in [false, true] {
            for limit in [0, 1, 2, 100] {
                let mut expected: Vec<(Bytes, Bytes)> = want
                    .iter()
                    .filter(|(k, _)| match after {
                        None => true,
                        Some(a) if reverse => k < a,
                        Some(a) => k > a,
                    })
                    .cloned()
                    .collect();
                if reverse {
                    expected.reverse();
                }
                expected.truncate(limit);
                let mut scan = Scan::prefix(prefix, limit).after(after.as_deref());
                if reverse {
                    scan = scan.reverse();
                }
                let got = store.scan(keyspace, scan).expect("scan");
                assert_eq!(got, expected, "after step {step}: {keyspace:?} {scan:?}");
            }
        }
    }
}

fn run_model(open: Open, steps: &[Step]) {
    let mut h = Harness::new(open);
    let mut model = Model::default();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Reopen => h.reopen(),
            Step::Commit(commit) => {
                let mut batch = Batch::new();
                for (ks, key, expected) in &commit.preconditions {
                    match expected {
                        Some(value) => {
                            batch.require_equals(KEYSPACES[*ks], key.clone(), value.clone())
                        }
                        None => batch.require_absent(KEYSPACES[*ks], key.clone()),
                    };
                }
                for (ks, key, value) in &commit.ops {
                    match value {
                        Some(value) => batch.put(KEYSPACES[*ks], key.clone(), value.clone()),
                        None => batch.delete(KEYSPACES[*ks], key.clone()),
                    };
                }
                let result = h.store().commit(batch);
                match model.commit(commit) {
                    None => assert!(result.is_ok(), "step {i}: expected success, got {result:?}"),
                    Some(index) => assert_eq!(conflict_index(result), index, "step {i}"),
                }
            }
        }
        assert_matches_model(h.store(), &model, i, false);
    }
    // Whatever happened, everything must survive one last reopen.
    h.reopen();
    assert_matches_model(h.store(), &model, steps.len(), true);
}

/// Random commits and reopens, applied to the store and to the model, compared after
/// every step.
fn matches_the_model(open: Open) {
    model_cases(open, 64);
}

/// [`matches_the_model`] with fewer cases, for PostgreSQL: each step's comparison reads
/// every key and page through the server (about a thousand round trips a case), so 64
/// cases took 95 s of a 2-core run.
fn matches_the_model_briefly(open: Open) {
    model_cases(open, 16);
}

fn model_cases(open: Open, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = prop::collection::vec(step_strategy(), 1..40);
    let result = runner.run(&strategy, |steps| {
        run_model(open, &steps);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The store's clock reads the time: the system's, or the database's (which runs on this
/// machine in the tests), and never goes back between two reads.
fn the_clock_reads_the_time(open: Open) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let system = metalgraph_store::system_now_ms();
    let first = store.now_ms().unwrap();
    let second = store.now_ms().unwrap();
    assert!(first.abs_diff(system) < 5_000, "{first} vs {system}");
    assert!(second >= first, "{second} < {first}");
}

macro_rules! tests {
    ($open:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                super::$name($open);
            }
        )*
    };
}

macro_rules! semantics {
    ($open:expr) => {
        tests!($open;
            get_put_delete,
            scan_prefix_order_and_bounds,
            keyspaces_are_isolated,
            invalid_keyspaces_are_rejected,
            failed_precondition_applies_nothing,
            absent_and_equals,
            later_op_wins,
            empty_and_precondition_only_batches,
            concurrent_cas_increments,
            concurrent_commits_keep_their_own_preconditions,
            readers_never_see_part_of_a_batch,
            the_clock_reads_the_time,
        );
    };
}

macro_rules! durability {
    ($open:expr) => {
        tests!($open; durable_across_reopen, matches_the_model);
    };
}

mod mem {
    semantics!(super::open_mem);
}

mod sled {
    semantics!(super::open_sled);
    durability!(super::open_sled);
}

mod postgres {
    semantics!(super::open_pg);
    tests!(super::open_pg; durable_across_reopen, matches_the_model_briefly);
}

mod file {
    semantics!(super::open_file);
    durability!(super::open_file);
}

mod file_compacting {
    semantics!(super::open_file_compacting);
    durability!(super::open_file_compacting);
}

/// TLS to the database: a connection that asks for TLS (`sslmode=require`) verifies the
/// server's certificate against the CA given, and is refused without it.
#[test]
fn postgres_over_tls_verifies_the_server() {
    let pg = metalgraph_testkit::postgres();
    let url = pg.store_url().replace("sslmode=disable", "sslmode=require");
    let refused = PgStore::open(&PgOptions {
        url: url.clone(),
        ca_pem: None,
    })
    .expect_err("an unknown CA");
    assert!(refused.to_string().contains("certificate"), "{refused}");
    let store = PgStore::open(&PgOptions {
        url,
        ca_pem: Some(pg.ca_pem()),
    })
    .expect("TLS with the cluster's CA");
    put(&store, "nodes", b"n1", b"over TLS");
    assert_eq!(
        get(&store, "nodes", b"n1").as_deref(),
        Some(&b"over TLS"[..])
    );
}

/// The file backend's journal: torn tails, corruption and compaction.
mod file_journal {
    use std::fs;
    use std::path::Path;

    use super::*;

    const KEYSPACES: [&str; 3] = ["nodes", "locks", "other"];

    /// Everything in the keyspaces these tests use.
    fn dump(store: &dyn Store) -> Vec<(String, Bytes, Bytes)> {
        KEYSPACES
            .iter()
            .flat_map(|ks| {
                scan(store, ks, b"")
                    .into_iter()
                    .map(move |(k, v)| (ks.to_string(), k, v))
            })
            .collect()
    }

    fn journal(dir: &Path) -> std::path::PathBuf {
        dir.join("journal.log")
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    /// The journal's records, without the empty lines written ahead of them: every record
    /// ends with an op line, which is never empty.
    fn records(dir: &Path) -> Vec<u8> {
        let mut data = fs::read(journal(dir)).unwrap();
        let end = data.iter().rposition(|&b| b != b'\n').map_or(0, |i| i + 2);
        data.truncate(end);
        data
    }

    /// Where the journal's records end.
    fn journal_len(dir: &Path) -> u64 {
        records(dir).len() as u64
    }

    /// Commits three batches and returns the journal offset where each record starts.
    fn three_commits(store: &FileStore, dir: &Path) -> Vec<u64> {
        let mut starts = Vec::new();
        for i in 0..3u8 {
            starts.push(journal_len(dir));
            let mut batch = Batch::new();
            batch
                .put("nodes", vec![b'n', i], vec![i; 5])
                .put("locks", b"l", vec![i])
                .delete("other", b"x");
            store.commit(batch).unwrap();
        }
        starts
    }

    fn corrupt_byte(path: &Path, offset: u64) {
        let mut data = fs::read(path).unwrap();
        data[offset as usize] ^= 0x20;
        fs::write(path, data).unwrap();
    }

    fn open_err(dir: &Path) -> String {
        match FileStore::open(dir) {
            Err(Error::Io(message)) => message,
            Err(e) => panic!("expected an I/O error, got {e}"),
            Ok(_) => panic!("expected opening {} to fail", dir.display()),
        }
    }

    #[test]
    fn a_torn_last_record_is_discarded_at_every_offset() {
        let source = tempfile::tempdir().unwrap();
        let store = FileStore::open(source.path()).unwrap();
        three_commits(&store, source.path());
        let before = dump(&store);
        let start = journal_len(source.path());
        let mut last = Batch::new();
        last.put("nodes", b"n\x00", b"replaced")
            .delete("locks", b"l")
            .put("other", b"binary \xff", b"\x00\x01");
        store.commit(last).unwrap();
        drop(store);
        let with_fill = fs::read(journal(source.path())).unwrap();
        let full = records(source.path());
        assert!(full.len() as u64 > start);
        assert!(with_fill.len() > full.len(), "the journal is written ahead");

        for cut in start..full.len() as u64 {
            // The record cut short at the end of the file, or over the journal's fill
            // (the rest of the record never reached the disk, the fill before it did;
            // a record whose missing rest is only its last newline is whole).
            let mut over_fill = with_fill.clone();
            over_fill[cut as usize..full.len()].fill(b'\n');
            let over_fill = (over_fill != with_fill).then_some((&over_fill[..], "over the fill"));
            for (torn, what) in [(&full[..cut as usize], "at the end")]
                .into_iter()
                .chain(over_fill)
            {
                let dir = tempfile::tempdir().unwrap();
                fs::write(journal(dir.path()), torn).unwrap();
                let store = FileStore::open(dir.path()).unwrap();
                assert_eq!(dump(&store), before, "cut at {cut} {what}");
                assert_eq!(
                    journal_len(dir.path()),
                    start,
                    "the torn tail is cut off (cut at {cut} {what})"
                );
                if cut > start {
                    assert_eq!(
                        file_len(&journal(dir.path())),
                        start,
                        "with whatever followed it (cut at {cut} {what})"
                    );
                }
                put(&store, "other", b"after", b"reopen");
                let mut expected = dump(&store);
                drop(store);
                let store = FileStore::open(dir.path()).unwrap();
                assert_eq!(
                    dump(&store),
                    expected,
                    "a commit after the cut at {cut} {what} survives"
                );
                expected.retain(|(ks, k, _)| !(ks == "other" && k == b"after"));
                assert_eq!(expected, before);
            }
        }
    }

    #[test]
    fn records_are_written_over_space_written_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        let size = file_len(&journal(dir.path()));
        assert!(
            size > journal_len(dir.path()) + 4096,
            "the first commit wrote ahead ({size} bytes)"
        );
        put(&store, "other", b"x", b"one more");
        assert_eq!(
            file_len(&journal(dir.path())),
            size,
            "written over the fill"
        );
        let expected = dump(&store);
        let end = journal_len(dir.path());
        drop(store);
        // Reopening ends the replay at the fill and keeps it.
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
        assert_eq!(file_len(&journal(dir.path())), size);
        put(&store, "other", b"y", b"after reopening");
        assert!(journal_len(dir.path()) > end);
        assert_eq!(file_len(&journal(dir.path())), size);
        let expected = dump(&store);
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
    }

    #[test]
    fn a_bad_checksum_on_the_last_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let starts = three_commits(&store, dir.path());
        drop(store);
        // Damage a payload byte of the last record.
        corrupt_byte(&journal(dir.path()), starts[2] + 20);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(get(&store, "locks", b"l"), Some(vec![1]));
        assert_eq!(get(&store, "nodes", b"n\x02"), None);
        assert_eq!(journal_len(dir.path()), starts[2]);
    }

    #[test]
    fn a_zero_filled_tail_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        let before = dump(&store);
        drop(store);
        // Zeros where the file grew but its data never reached the disk.
        let mut data = fs::read(journal(dir.path())).unwrap();
        let len = journal_len(dir.path());
        data.extend_from_slice(&[0; 4096]);
        fs::write(journal(dir.path()), data).unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), before);
        assert_eq!(file_len(&journal(dir.path())), len);
    }

    #[test]
    fn corruption_in_the_middle_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let starts = three_commits(&store, dir.path());
        drop(store);
        let path = journal(dir.path());
        let pristine = fs::read(&path).unwrap();

        // A payload byte of the first record.
        corrupt_byte(&path, starts[0] + 25);
        let message = open_err(dir.path());
        assert!(message.contains("journal.log"), "{message}");
        assert!(message.contains("offset 0"), "{message}");
        assert!(
            message.contains(&format!("offset {}", starts[1])),
            "{message}"
        );

        // The header of the second record.
        fs::write(&path, &pristine).unwrap();
        corrupt_byte(&path, starts[1] + 2);
        let message = open_err(dir.path());
        assert!(
            message.contains(&format!("offset {}", starts[1])),
            "{message}"
        );

        // Nothing was truncated by the failed opens.
        assert_eq!(fs::read(&path).unwrap().len(), pristine.len());
    }

    #[test]
    fn the_journal_is_readable_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut batch = Batch::new();
        batch
            .put("nodes", b"node-17", br#"{"state":"ready"}"#)
            .delete("locks", b"node-17");
        store.commit(batch).unwrap();
        let text = fs::read_to_string(journal(dir.path())).unwrap();
        // The record, then the empty lines written ahead of the next ones.
        let lines: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).collect();
        assert!(text.ends_with("\n\n\n"), "{text}");
        assert!(text.lines().skip(3).all(str::is_empty), "{text}");
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("batch "), "{text}");
        assert_eq!(
            lines[1],
            r#"put "nodes" "node-17" "{%22state%22:%22ready%22}""#
        );
        assert_eq!(lines[2], r#"del "locks" "node-17""#);
    }

    #[test]
    fn compaction_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        // Enough entries to need several snapshot records.
        let mut batch = Batch::new();
        for i in 0..2500u32 {
            batch.put("other", i.to_be_bytes(), i.to_string());
        }
        store.commit(batch).unwrap();
        let before = dump(&store);
        store.compact().unwrap();
        assert_eq!(journal_len(dir.path()), 0);
        assert!(dir.path().join("snapshot").exists());
        assert_eq!(dump(&store), before);
        put(&store, "nodes", b"after", b"compaction");
        let expected = dump(&store);
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
        // Compacting twice, and an empty state, are fine too.
        store.compact().unwrap();
        store.compact().unwrap();
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
    }

    #[test]
    fn a_leftover_snapshot_tmp_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        let before = dump(&store);
        drop(store);
        fs::write(
            dir.path().join("snapshot.tmp"),
            b"batch 999 00000000\nhalf a snap",
        )
        .unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), before);
        assert!(!dir.path().join("snapshot.tmp").exists());
    }

    /// A crash after the new snapshot is renamed into place but before the journal is
    /// emptied leaves both; replaying the journal over the snapshot must change nothing.
    #[test]
    fn a_crash_between_rename_and_truncation_reopens_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        // Overwrites and deletes are where a non-idempotent replay would show.
        let mut batch = Batch::new();
        batch
            .put("nodes", b"n\x00", b"overwritten")
            .delete("nodes", b"n\x01")
            .put("nodes", b"n\x01", b"back")
            .delete("locks", b"l");
        store.commit(batch).unwrap();
        let before = dump(&store);
        let journal_copy = fs::read(journal(dir.path())).unwrap();
        store.compact().unwrap();
        drop(store);
        fs::write(journal(dir.path()), &journal_copy).unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), before);
        put(&store, "locks", b"l", b"new");
        let expected = dump(&store);
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
    }

    #[test]
    fn a_corrupt_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        three_commits(&store, dir.path());
        store.compact().unwrap();
        drop(store);
        let snapshot = dir.path().join("snapshot");
        let len = fs::metadata(&snapshot).unwrap().len();
        // Even damage at the very end of the snapshot is corruption: it is never torn.
        corrupt_byte(&snapshot, len - 3);
        let message = open_err(dir.path());
        assert!(message.contains("snapshot"), "{message}");
    }

    #[test]
    fn the_journal_compacts_past_its_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path())
            .unwrap()
            .with_compact_threshold(4096);
        for i in 0..200u32 {
            let mut batch = Batch::new();
            batch
                .put("nodes", format!("n{}", i % 17), i.to_string())
                .delete("locks", format!("l{}", (i + 3) % 11))
                .put("locks", format!("l{}", i % 11), b"held");
            store.commit(batch).unwrap();
            assert!(journal_len(dir.path()) <= 4096 + 200);
        }
        let expected = dump(&store);
        drop(store);
        assert!(dir.path().join("snapshot").exists());
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(dump(&store), expected);
    }

    /// Past its threshold the journal still grows to the snapshot's size before it
    /// compacts, so a compaction (which rewrites the whole state) follows as many bytes of
    /// commits as it writes.
    #[test]
    fn the_journal_grows_to_the_snapshots_size_before_it_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path())
            .unwrap()
            .with_compact_threshold(4096);
        let mut batch = Batch::new();
        for i in 0..64 {
            batch.put("big", format!("k{i}"), vec![b'v'; 1024]);
        }
        store.commit(batch).unwrap();
        store.compact().unwrap();
        let snapshot = fs::metadata(dir.path().join("snapshot")).unwrap().len();
        assert!(snapshot > 64 * 1024, "{snapshot}");
        let mut peak = 0;
        let mut compacted = false;
        for i in 0..200u32 {
            let mut batch = Batch::new();
            batch.put("small", b"k".to_vec(), vec![b'0' + (i % 10) as u8; 1024]);
            store.commit(batch).unwrap();
            let len = journal_len(dir.path());
            if len < peak {
                compacted = true;
                break;
            }
            peak = len;
        }
        assert!(compacted, "the journal never compacted (at {peak} bytes)");
        assert!(
            peak > snapshot - 2048 && peak <= snapshot + 2048,
            "compacted at {peak} bytes, the snapshot is {snapshot}"
        );
    }
}

/// A file store keeps its keys in memory and its values on disk: one holding far more data
/// than it keeps in memory opens, serves every value, compacts (copying values from file to
/// file) and reopens.
#[test]
fn a_file_store_larger_than_its_memory_opens_and_serves() {
    use metalgraph_store::FileStore;
    let dir = tempfile::tempdir().unwrap();
    let value = |i: usize| -> Vec<u8> { (0..64 * 1024).map(|j| (i * 31 + j * 7) as u8).collect() };
    let store = FileStore::open(dir.path()).unwrap();
    for chunk in 0..8 {
        let mut batch = Batch::new();
        for i in chunk * 64..(chunk + 1) * 64 {
            batch.put("workflows", format!("wf-{i:04}"), value(i));
        }
        store.commit(batch).unwrap();
    }
    let data: u64 = 512 * 64 * 1024;
    let memory = store.memory();
    assert_eq!(memory.keys, 512);
    assert!(
        memory.bytes * 1000 < data,
        "{} bytes in memory for {data} bytes of values",
        memory.bytes
    );
    let check = |store: &FileStore| {
        for i in [0usize, 1, 255, 511] {
            assert_eq!(
                store
                    .get("workflows", format!("wf-{i:04}").as_bytes())
                    .unwrap(),
                Some(value(i)),
                "wf-{i:04}"
            );
        }
        let page = store.scan("workflows", Scan::prefix(b"wf-01", 3)).unwrap();
        assert_eq!(page.len(), 3);
        assert_eq!(page[0], (b"wf-0100".to_vec(), value(100)));
    };
    check(&store);
    store.compact().unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("journal.log"))
            .unwrap()
            .len(),
        0
    );
    check(&store);
    // A value replaced after the compaction is read from the journal, the rest from the
    // snapshot.
    let mut batch = Batch::new();
    batch.put("workflows", "wf-0001", value(9999));
    store.commit(batch).unwrap();
    assert_eq!(
        store.get("workflows", b"wf-0001").unwrap(),
        Some(value(9999))
    );
    drop(store);
    let store = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        store.get("workflows", b"wf-0001").unwrap(),
        Some(value(9999))
    );
    assert_eq!(
        store.get("workflows", b"wf-0511").unwrap(),
        Some(value(511))
    );
    assert!(store.memory().bytes * 1000 < data);
}

/// Two openings of one file store would interleave their journals; the second is refused.
#[test]
fn a_file_store_is_opened_by_one_owner_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = metalgraph_store::FileStore::open(dir.path()).unwrap();
    let err = metalgraph_store::FileStore::open(dir.path()).expect_err("second open refused");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    metalgraph_store::FileStore::open(dir.path()).expect("reopens once released");
}
