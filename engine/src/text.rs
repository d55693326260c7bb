//! Documents from outside — request bodies, definition files, gRPC text definitions, node
//! callbacks — turned into JSON values, with the limits that keep a hostile document from
//! wedging the parser: a nesting depth limit for both formats (YAML's parser takes time
//! that grows with the square of the depth, so depth is measured before it runs) and no
//! duplicate keys (a second value for a key would silently win).
//!
//! Parsing is CPU work: callers on the async runtime run these on the blocking pool.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize as _;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The deepest nesting of mappings and lists a document may have.
pub const MAX_DEPTH: usize = 128;

/// Parses a JSON document, refusing duplicate keys and nesting deeper than [`MAX_DEPTH`].
pub fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue { depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// Parses one YAML document (JSON is YAML), refusing duplicate keys and nesting deeper than
/// [`MAX_DEPTH`]; the depth is measured before the YAML parser runs.
pub fn parse_yaml(text: &str) -> Result<Value, String> {
    let mut docs = parse_yaml_documents(text)?;
    match docs.len() {
        0 => Ok(Value::Null),
        1 => Ok(docs.remove(0)),
        n => Err(format!("expected one YAML document, found {n}")),
    }
}

/// Parses every YAML document of a text (`---` separated), with the limits of
/// [`parse_yaml`].
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let depth = yaml_depth(text);
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        out.push(
            StrictValue { depth: 0 }
                .deserialize(doc)
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(out)
}

fn too_deep() -> String {
    format!("the document is nested deeper than {MAX_DEPTH} levels")
}

/// An upper estimate of a YAML text's nesting depth, in one pass: open flow brackets
/// outside quotes and comments, plus, per line, the block levels (indentations deeper
/// than an enclosing line's) and the compact `- ` / `? ` entries that start the line.
/// It never underestimates a real document's depth by more than its block scalars' lines
/// (whose indentation counts as nesting), which only makes it stricter.
fn yaml_depth(text: &str) -> usize {
    let mut max = 0;
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if flow == 0 {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut compact = 0;
        let mut rest = body;
        while let Some(r) = rest
            .strip_prefix("- ")
            .or_else(|| rest.strip_prefix("? "))
            .or_else(|| rest.strip_prefix("-\t"))
        {
            compact += 1;
            rest = r.trim_start();
        }
        let mut quote: Option<char> = None;
        let mut line_max = flow;
        let mut prev = ' ';
        for c in rest.chars() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '"' | '\''
                        if prev == ' '
                            || prev == '['
                            || prev == '{'
                            || prev == ','
                            || prev == ':' =>
                    {
                        quote = Some(c)
                    }
                    '#' if prev == ' ' => break,
                    '[' | '{' => {
                        flow += 1;
                        line_max = line_max.max(flow);
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
        max = max.max(indents.len() + compact + line_max);
    }
    max
}

/// Deserialises any self-describing document into a `Value`, refusing duplicate keys and
/// nesting deeper than [`MAX_DEPTH`].
struct StrictValue {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl StrictValue {
    fn inner<E: de::Error>(&self) -> Result<StrictValue, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(too_deep()));
        }
        Ok(StrictValue {
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON or YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("the number {v} is not finite")))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.inner()?)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key_seed(KeyString)? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            let value = map.next_value_seed(self.inner()?)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A mapping key: a string, or a scalar written as one (YAML allows `1: x`).
struct KeyString;

impl<'de> DeserializeSeed<'de> for KeyString {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for KeyString {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or scalar key")
    }

    fn visit_str<E>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_bool<E>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_unit<E>(self) -> Result<String, E> {
        Ok("null".to_owned())
    }
}

/// Deserializes a struct-typed field only from a mapping. serde's derived `Deserialize`
/// also builds a struct from a list of its fields in order (`filters: [null, null]`, an OBM
/// as `["sim-obm-service", {}]`), which no caller means and no schema of ours allows; fields
/// of struct type that come from outside take this (`#[serde(deserialize_with = ...)]`).
pub fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let value = Value::deserialize(d)?;
    checked_object(value)
}

/// [`object`] for an optional field: null or absent is none.
pub fn optional_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        value => checked_object(value).map(Some),
    }
}

/// [`object`] for a list of structs: every item must be a mapping.
pub fn objects<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let items = Vec::<Value>::deserialize(d)?;
    items.into_iter().map(checked_object).collect()
}

/// [`objects`] for an optional list: null or absent is none.
pub fn optional_objects<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    match Option::<Vec<Value>>::deserialize(d)? {
        None => Ok(None),
        Some(items) => items
            .into_iter()
            .map(checked_object)
            .collect::<Result<_, _>>()
            .map(Some),
    }
}

fn checked_object<T: de::DeserializeOwned, E: de::Error>(value: Value) -> Result<T, E> {
    if !value.is_object() {
        return Err(E::invalid_type(unexpected(&value), &"a mapping"));
    }
    T::deserialize(value).map_err(E::custom)
}

/// What serde calls a value in a type error.
fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("a number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_in_both_formats() {
        let e = parse_json(br#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(e.contains("duplicate key \"a\""), "{e}");
        let e = parse_yaml("a: 1\nb: {c: 1, c: 2}\n").unwrap_err();
        assert!(e.contains("duplicate"), "{e}");
        assert_eq!(parse_json(br#"{"a": {"a": 1}}"#).unwrap()["a"]["a"], 1);
    }

    #[test]
    fn depth_is_limited_in_both_formats_and_measured_before_yaml_parses() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(parse_json(deep(MAX_DEPTH - 1).as_bytes()).is_ok());
        let e = parse_json(deep(MAX_DEPTH + 1).as_bytes()).unwrap_err();
        // serde_json's own limit is the same 128 levels, and it speaks first.
        assert!(e.contains("recursion limit exceeded"), "{e}");
        assert!(parse_yaml(&deep(MAX_DEPTH - 1)).is_ok());
        // 100,000 levels: refused at once, without running the YAML parser.
        let started = std::time::Instant::now();
        assert!(parse_yaml(&deep(100_000)).unwrap_err().contains("128"));
        assert!(
            parse_yaml(&"- ".repeat(100_000))
                .unwrap_err()
                .contains("128")
        );
        let block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
        assert!(parse_yaml(&block).unwrap_err().contains("128"));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn ordinary_documents_parse() {
        let g = "injectableName: G\ntasks:\n  - {label: a, taskName: \"Task.[x]\"}\n  - label: b\n    waitOn: {a: succeeded} # [[[\n";
        let v = parse_yaml(g).unwrap();
        assert_eq!(v["tasks"][1]["waitOn"]["a"], "succeeded");
        assert_eq!(parse_yaml("").unwrap(), Value::Null);
        assert_eq!(parse_yaml_documents("a: 1\n---\nb: 2\n").unwrap().len(), 2);
    }
}
