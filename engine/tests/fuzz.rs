//! Property-based fuzzing of the parsers reachable from the network — request bodies and
//! definition texts (JSON and YAML), run options, templates and callback bodies — on the
//! stable toolchain: random and mutated inputs, each parse bounded in time, never a panic.
//! The seeds below are the committed corpus; proptest mutates around them.
//!
//! (`cargo fuzz` needs a nightly compiler, which this project's machines do not have; these
//! run everywhere, in CI, for a bounded number of cases.)

use std::time::{Duration, Instant};

use metalgraph_engine::definitions;
use metalgraph_engine::template::Renderer;
use metalgraph_engine::text::{parse_json, parse_yaml};
use proptest::prelude::*;
use serde_json::json;

/// Inputs that once broke a parser somewhere, or come close to a limit.
const CORPUS: &[&str] = &[
    "injectableName: G\ntasks:\n  - {label: a, taskName: Task.Noop}\n",
    "{\"injectableName\": \"G\", \"tasks\": [{\"label\": \"a\", \"taskName\": \"Task.Noop\"}]}",
    "a: &x [*x]",
    "a: &a [*a, *a]\nb: &b [*a, *a]\nc: &c [*b, *b]",
    "- - - - - - - - - - - - - - - - x",
    "{a: 1, a: 2}",
    "? [a, b]\n: c",
    "---\n---\n...\n",
    "key: |\n  literal\n   text\n",
    "\"\\u0000\": 1",
    "!!binary aGk=",
    "{% for i in range(100) %}{{ i }}{% endfor %}",
    "{{ options.x | tojson }}",
    "{{ 'a' * 1000 }}",
    "{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}",
    "{{ range(10000000) | list | length }}",
];

/// Mutates a seed: cut it, repeat a slice of it, or splice in bytes.
fn mutated() -> impl Strategy<Value = String> {
    (
        prop::sample::select(CORPUS),
        any::<usize>(),
        any::<usize>(),
        0usize..4,
        prop::collection::vec(any::<char>(), 0..8),
    )
        .prop_map(|(seed, a, b, how, extra)| {
            let chars: Vec<char> = seed.chars().collect();
            let n = chars.len().max(1);
            let (i, j) = (a % n, b % n);
            let (i, j) = (i.min(j), i.max(j));
            let extra: String = extra.into_iter().collect();
            match how {
                0 => chars[..i].iter().collect(),
                1 => {
                    let slice: String = chars[i..j].iter().collect();
                    format!(
                        "{}{}{}",
                        &seed[..seed.char_indices().nth(i).map_or(0, |c| c.0)],
                        slice.repeat(50),
                        slice
                    )
                }
                2 => format!("{extra}{seed}"),
                _ => {
                    let at = seed.char_indices().nth(i).map_or(seed.len(), |c| c.0);
                    format!("{}{extra}{}", &seed[..at], &seed[at..])
                }
            }
        })
}

fn inputs() -> impl Strategy<Value = String> {
    prop_oneof![
        mutated(),
        any::<String>(),
        "[\\[\\]{}:, \\-a-z0-9\"'\n]{0,200}"
    ]
}

fn bounded<T>(what: &str, input: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{what} took {:?} on {input:?}",
        started.elapsed()
    );
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn document_parsers_never_panic_or_hang(input in inputs()) {
        bounded("parse_json", &input, || { let _ = parse_json(input.as_bytes()); });
        bounded("parse_yaml", &input, || { let _ = parse_yaml(&input); });
        bounded("definitions::parse", &input, || { let _ = definitions::parse(&input, "fuzz"); });
    }

    #[test]
    fn templates_never_panic_or_run_unbounded(input in inputs()) {
        let r = Renderer::new();
        let vars = json!({"options": {"x": [1, "two", {"three": 3}]}, "context": {}, "task": {"label": "t"}});
        bounded("render", &input, || {
            if let Ok(out) = r.render_str(&input, &vars) {
                assert!(out.len() <= metalgraph_engine::template::MAX_OUTPUT);
            }
        });
        bounded("truthy", &input, || { let _ = r.truthy(&input, &vars); });
    }
}

#[test]
fn the_corpus_itself_parses_or_fails_cleanly() {
    let r = Renderer::new();
    for seed in CORPUS {
        let _ = bounded("parse_yaml", seed, || parse_yaml(seed));
        let _ = bounded("render", seed, || {
            r.render_str(seed, &json!({"options": {}}))
        });
    }
}
