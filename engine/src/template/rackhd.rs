//! RackHD's template dialect for task options: Mustache as RackHD uses it, translated into
//! the engine's minijinja templates so that both dialects share one renderer, its limits
//! and its variables.
//!
//! | RackHD | means |
//! |---|---|
//! | `{{ a.b }}`, `{{{ a.b }}}`, `{{& a.b }}` | the value (null prints nothing; never HTML-escaped) |
//! | `{{ a || b || 'text' }}` | the first of them that is set (JavaScript's `||`) |
//! | `{{#a}}…{{/a}}` | the inside once when `a` is set, once per item when it is a list (`{{.}}` is the item; names are looked up in the item first) |
//! | `{{^a}}…{{/a}}` | the inside when `a` is not set (missing, null, false, empty) |
//! | `{{! … }}` | a comment |
//!
//! Variables are strict, as in the engine's own dialect: a name that is not set is an
//! error naming it, unless a `||` gives another choice or a section guards it. Partials
//! (`{{> x}}`) and delimiter changes (`{{= =}}`) are refused with a message saying so.

use minijinja::value::Rest;
use minijinja::{Environment, Error, ErrorKind, State, Value};

/// The prefix of every name the translation introduces, out of the way of RackHD's names.
const P: &str = "_rackhd";

/// Whether a template uses syntax only RackHD's dialect has (for hints in errors of the
/// engine's own dialect).
pub fn looks_like_rackhd(s: &str) -> bool {
    s.contains("{{#") || s.contains("{{^") || s.contains("{{/") || s.contains("{{{") || {
        // `||` inside a `{{ … }}` tag.
        s.split("{{").skip(1).any(|t| {
            t.split("}}")
                .next()
                .is_some_and(|inner| inner.contains("||"))
        })
    }
}

#[derive(Debug)]
enum Open {
    Section(String),
    Inverted(String),
}

/// Translates a RackHD template into the engine's template language. Errors name the tag
/// at fault.
pub fn translate(src: &str) -> Result<String, String> {
    let mut out = String::with_capacity(src.len() + 32);
    let mut open: Vec<Open> = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("{{") {
        literal(&mut out, &rest[..at]);
        let after = &rest[at..];
        let (inner, len) = if let Some(body) = after.strip_prefix("{{{") {
            let end = body
                .find("}}}")
                .ok_or_else(|| format!("the tag {} is never closed with }}}}}}", head(after)))?;
            (&body[..end], 3 + end + 3)
        } else {
            let body = &after[2..];
            let end = body
                .find("}}")
                .ok_or_else(|| format!("the tag {} is never closed with }}}}", head(after)))?;
            (&body[..end], 2 + end + 2)
        };
        let tag = &after[..len];
        rest = &after[len..];
        let inner = inner.trim();
        let (sigil, name) = match inner.chars().next() {
            Some(c @ ('#' | '^' | '/' | '!' | '>' | '=' | '&')) => (Some(c), inner[1..].trim()),
            _ => (None, inner),
        };
        let stack = stack_expr(&open);
        match sigil {
            Some('!') => {}
            Some('#') => {
                check_path(name, tag)?;
                let depth = 1 + sections(&open);
                out.push_str(&format!(
                    "{{% for {P}_s{depth} in {P}_section({stack}, {}) %}}",
                    quoted(name)
                ));
                open.push(Open::Section(name.to_owned()));
            }
            Some('^') => {
                check_path(name, tag)?;
                out.push_str(&format!(
                    "{{% if not {P}_truthy({stack}, {}) %}}",
                    quoted(name)
                ));
                open.push(Open::Inverted(name.to_owned()));
            }
            Some('/') => {
                let closes = match open.pop() {
                    None => return Err(format!("{tag} closes no section")),
                    Some(o) => o,
                };
                let (opened, end) = match &closes {
                    Open::Section(n) => (n, "{% endfor %}"),
                    Open::Inverted(n) => (n, "{% endif %}"),
                };
                if opened != name {
                    return Err(format!(
                        "{tag} closes the section {{{{{}{opened}}}}}, which must be closed by {{{{/{opened}}}}}",
                        if matches!(closes, Open::Section(_)) {
                            '#'
                        } else {
                            '^'
                        }
                    ));
                }
                out.push_str(end);
            }
            Some('>') => {
                return Err(format!(
                    "{tag}: Mustache partials are not supported in task options"
                ));
            }
            Some('=') => {
                return Err(format!(
                    "{tag}: changing Mustache's delimiters is not supported in task options"
                ));
            }
            _ => {
                let operands: Vec<&str> = name.split("||").map(str::trim).collect();
                let mut args = Vec::with_capacity(operands.len());
                for op in operands {
                    args.push(operand(op, tag)?);
                }
                out.push_str(&format!(
                    "{{{{ {P}_value({stack}, {}) }}}}",
                    args.join(", ")
                ));
            }
        }
    }
    literal(&mut out, rest);
    if let Some(o) = open.last() {
        let (sigil, name) = match o {
            Open::Section(n) => ('#', n),
            Open::Inverted(n) => ('^', n),
        };
        return Err(format!(
            "the section {{{{{sigil}{name}}}}} is never closed with {{{{/{name}}}}}"
        ));
    }
    Ok(out)
}

/// The first characters of a tag, for messages.
fn head(s: &str) -> String {
    let h: String = s.chars().take(30).collect();
    if h.len() < s.len() {
        format!("{h}…")
    } else {
        h
    }
}

fn sections(open: &[Open]) -> usize {
    open.iter()
        .filter(|o| matches!(o, Open::Section(_)))
        .count()
}

/// The section items in scope, innermost first: `[_rackhd_s2, _rackhd_s1]`.
fn stack_expr(open: &[Open]) -> String {
    let n = sections(open);
    let items: Vec<String> = (1..=n).rev().map(|i| format!("{P}_s{i}")).collect();
    format!("[{}]", items.join(", "))
}

/// Text outside tags, kept as it is: quoted when the engine's own syntax would see a tag in it.
fn literal(out: &mut String, text: &str) {
    if text.contains("{%") || text.contains("{#") {
        out.push_str("{{ ");
        out.push_str(&quoted(text));
        out.push_str(" }}");
    } else {
        out.push_str(text);
    }
}

/// A string literal of the template language (JSON's escapes are a subset of its own).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// One operand of a `||` chain: a name (passed as `"name"`) or a quoted text (passed as
/// `"=text"`).
fn operand(op: &str, tag: &str) -> Result<String, String> {
    for q in ['\'', '"'] {
        if let Some(inner) = op.strip_prefix(q).and_then(|o| o.strip_suffix(q)) {
            return Ok(quoted(&format!("={inner}")));
        }
    }
    check_path(op, tag)?;
    Ok(quoted(op))
}

fn check_path(name: &str, tag: &str) -> Result<(), String> {
    let ok = name == "."
        || (!name.is_empty()
            && name.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$'))
            }));
    if ok {
        Ok(())
    } else if name.is_empty() {
        Err(format!("{tag} names no variable"))
    } else {
        Err(format!(
            "{tag}: {name:?} is not a variable name (names are words joined by dots, like options.version)"
        ))
    }
}

/// Registers the functions the translation calls.
pub fn register(env: &mut Environment<'static>) {
    env.add_function(format!("{P}_value"), value);
    env.add_function(format!("{P}_section"), section);
    env.add_function(format!("{P}_truthy"), truthy);
}

/// Looks `path` up: in the section items first (innermost first), then in the variables.
fn lookup(state: &State, stack: &[Value], path: &str) -> Value {
    if path == "." {
        return stack.first().cloned().unwrap_or(Value::UNDEFINED);
    }
    let mut segs = path.split('.');
    let first = segs.next().unwrap_or_default();
    let mut v = stack
        .iter()
        .map(|item| attr(item, first))
        .find(|v| !v.is_undefined())
        .or_else(|| state.lookup(first))
        .unwrap_or(Value::UNDEFINED);
    for seg in segs {
        if v.is_undefined() || v.is_none() {
            return Value::UNDEFINED;
        }
        v = attr(&v, seg);
    }
    v
}

fn attr(v: &Value, seg: &str) -> Value {
    let found = match seg.parse::<i64>() {
        Ok(i) if v.as_object().is_none() || v.len().is_some() => v.get_item(&Value::from(i)),
        _ => v.get_attr(seg),
    };
    found.unwrap_or(Value::UNDEFINED)
}

/// JavaScript's truthiness, which RackHD's `||` follows.
fn js_truthy(v: &Value) -> bool {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => false,
        ValueKind::Bool | ValueKind::Number | ValueKind::String => v.is_true(),
        _ => true,
    }
}

/// Mustache's truthiness for sections: set, not false, and not an empty list or text.
fn section_items(v: Value) -> Vec<Value> {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => vec![],
        ValueKind::Bool if !v.is_true() => vec![],
        ValueKind::String if v.as_str() == Some("") => vec![],
        ValueKind::Seq => v.try_iter().map(|it| it.collect()).unwrap_or_default(),
        _ => vec![v],
    }
}

/// `{{ a || b }}`: the first operand that is set, else the last one; null prints nothing.
fn value(state: &State, stack: Vec<Value>, ops: Rest<String>) -> Result<Value, Error> {
    let mut last = Value::UNDEFINED;
    for op in ops.iter() {
        last = match op.strip_prefix('=') {
            Some(text) => Value::from(text),
            None => lookup(state, &stack, op),
        };
        if js_truthy(&last) {
            break;
        }
    }
    if last.is_undefined() {
        let names: Vec<&str> = ops.iter().map(|s| s.trim_start_matches('=')).collect();
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("undefined value (at `{}`)", names.join(" || ")),
        ));
    }
    Ok(Value::from(print(&last)))
}

/// How RackHD prints a value: null as nothing, a list as its items joined with commas, an
/// object as JSON.
fn print(v: &Value) -> String {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => String::new(),
        ValueKind::Seq => v
            .try_iter()
            .map(|it| it.map(|x| print(&x)).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        ValueKind::Map => serde_json::to_string(v).unwrap_or_default(),
        _ => v.to_string(),
    }
}

fn section(state: &State, stack: Vec<Value>, path: String) -> Value {
    Value::from(section_items(lookup(state, &stack, &path)))
}

fn truthy(state: &State, stack: Vec<Value>, path: String) -> bool {
    !section_items(lookup(state, &stack, &path)).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_refuses_what_it_cannot_read_naming_the_tag() {
        for (src, want) in [
            ("{{#options.a}}x", "{{#options.a}} is never closed"),
            ("{{#a}}x{{/b}}", "{{/b}} closes the section {{#a}}"),
            ("x{{/a}}", "{{/a}} closes no section"),
            ("{{ options.a ", "never closed"),
            ("{{> partial}}", "partials are not supported"),
            ("{{ a b }}", "\"a b\" is not a variable name"),
            ("{{}}", "names no variable"),
        ] {
            let e = translate(src).unwrap_err();
            assert!(e.contains(want), "{src}: {e}");
        }
    }

    #[test]
    fn looks_like_rackhd_sees_only_rackhd_syntax() {
        assert!(looks_like_rackhd("{{ a || b }}"));
        assert!(looks_like_rackhd("{{#a}}x{{/a}}"));
        assert!(!looks_like_rackhd("{{ a or b }} || {{ c }}"));
        assert!(!looks_like_rackhd("{% if a %}{{ b }}{% endif %}"));
    }
}
