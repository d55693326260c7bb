//! Option templating: every string option that holds `{{ ... }}` or `{% ... %}` is rendered
//! with minijinja, with strict undefined, when its task starts.
//!
//! The variables are `options` (the task's merged options), `context` (each finished task's
//! output under its label), `node` (never a secret), `task` (id, label, workflow id, token)
//! and `api` (base URLs of the management and node-facing endpoints).
//!
//! Templates come from users, so each render is bounded: at most [`FUEL`] steps of the
//! template machine and [`MAX_OUTPUT`] bytes of output per template; a template over either
//! fails its task with a message naming the limit. Rendering runs on the blocking pool,
//! never on the scheduler.
//!
//! The binary also renders node-facing files (iPXE scripts, kickstarts) with a
//! [`Renderer::checked`] renderer: every value printed by `{{ ... }}` must pass the format's
//! check, so that a value a node controls cannot add lines to what the node runs.

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value};

/// The most steps one template may take (minijinja's fuel: roughly one per instruction).
pub const FUEL: u64 = 1_000_000;

/// The most bytes one template may render.
pub const MAX_OUTPUT: usize = 1 << 20;

/// A configured template environment, built once per engine.
pub struct Renderer {
    env: Environment<'static>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renderer")
    }
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a string holds template syntax.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// Whether an option value holds a template anywhere inside it.
pub fn holds_template(v: &Value) -> bool {
    match v {
        Value::String(s) => is_template(s),
        Value::Array(items) => items.iter().any(holds_template),
        Value::Object(m) => m.values().any(holds_template),
        _ => false,
    }
}

impl Renderer {
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_fuel(Some(FUEL));
        Self { env }
    }

    /// A renderer whose every printed value (`{{ ... }}`, filters applied, `safe` or not) must
    /// pass `check`; a value that fails makes the whole rendering fail with `check`'s message
    /// and the template line. Literal template text is not checked: it is the operator's.
    pub fn checked(check: fn(&str) -> Result<(), String>) -> Self {
        let mut renderer = Self::new();
        renderer.env.set_formatter(move |out, _state, value| {
            let text = value.to_string();
            check(&text).map_err(|why| minijinja::Error::new(ErrorKind::InvalidOperation, why))?;
            out.write_str(&text).map_err(minijinja::Error::from)
        });
        renderer
    }

    /// Renders one template string over `vars`, within [`FUEL`] and [`MAX_OUTPUT`].
    pub fn render_str(&self, template: &str, vars: &Value) -> Result<String, String> {
        guarded(|| self.render_unguarded(template, vars))
    }

    fn render_unguarded(&self, template: &str, vars: &Value) -> Result<String, String> {
        let tmpl = self
            .env
            .template_from_str(template)
            .map_err(|e| describe_in(&e, template))?;
        let mut out = Limited(Vec::new());
        match tmpl.render_captured_to(vars, &mut out) {
            Ok(_) => String::from_utf8(out.0).map_err(|_| "rendered invalid UTF-8".to_owned()),
            Err(_) if out.0.len() > MAX_OUTPUT => Err(format!(
                "the template renders more than {} KiB (the limit of one rendered option)",
                MAX_OUTPUT / 1024
            )),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
                "the template takes more than {FUEL} steps (the limit of one rendered option)"
            )),
            Err(e) => Err(describe_in(&e, template)),
        }
    }

    /// Renders every template string inside `options` (recursively through objects and
    /// lists). Errors name the option path at fault.
    pub fn render_options(
        &self,
        options: &Map<String, Value>,
        vars: &Value,
    ) -> Result<Map<String, Value>, String> {
        self.render_options_except(options, vars, &[])
    }

    /// [`Renderer::render_options`], leaving the options named in `data` as they are.
    pub fn render_options_except(
        &self,
        options: &Map<String, Value>,
        vars: &Value,
        data: &[String],
    ) -> Result<Map<String, Value>, String> {
        let mut out = Map::new();
        for (k, v) in options {
            let v = if data.contains(k) {
                v.clone()
            } else {
                self.render_value(v, vars, k)?
            };
            out.insert(k.clone(), v);
        }
        Ok(out)
    }

    fn render_value(&self, v: &Value, vars: &Value, path: &str) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) if is_template(s) => Value::String(
                self.render_str(s, vars)
                    .map_err(|e| format!("option '{path}': {e}"))?,
            ),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.render_value(x, vars, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| {
                        Ok((
                            k.clone(),
                            self.render_value(x, vars, &format!("{path}.{k}"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Evaluates an expression (`context.probe.status == 200`) to a boolean, or renders a
    /// template and reads `true`/`false`.
    pub fn truthy(&self, template: &str, vars: &Value) -> Result<bool, String> {
        guarded(|| self.truthy_unguarded(template, vars))
    }

    fn truthy_unguarded(&self, template: &str, vars: &Value) -> Result<bool, String> {
        let rendered = if is_template(template) {
            self.render_str(template, vars)?
        } else {
            let expr = self
                .env
                .compile_expression(template)
                .map_err(|e| describe_in(&e, template))?;
            let v = expr.eval(vars).map_err(|e| describe_in(&e, template))?;
            return Ok(v.is_true());
        };
        match rendered.trim() {
            "true" | "True" => Ok(true),
            "false" | "False" | "" => Ok(false),
            other => Err(format!(
                "condition rendered {other:?}, expected true or false"
            )),
        }
    }
}

/// Runs the template engine on user text, turning a panic inside it (minijinja 2.24's
/// lexer panics on some malformed input, such as `}}]`) into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err("the template engine cannot read this template (it is malformed)".to_owned())
    })
}

/// A writer that refuses to grow past [`MAX_OUTPUT`], so a render stops at its first write
/// beyond it.
struct Limited(Vec<u8>);

impl std::io::Write for Limited {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            self.0
                .extend_from_slice(&buf[..MAX_OUTPUT + 1 - self.0.len().min(MAX_OUTPUT)]);
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The check of node-facing text formats (kickstarts, preseeds, scripts) for
/// [`Renderer::checked`]: a printed value may hold no control character (a line break above
/// all) and no Unicode line or paragraph separator, so it can neither add a line nor end the
/// one it is on. Which quoting a format needs beyond that is the template's business.
pub fn no_control_characters(value: &str) -> Result<(), String> {
    match value
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        None => Ok(()),
        Some(c) => {
            let head: String = value.chars().take(40).collect();
            Err(format!(
                "a value with the control character U+{:04X} cannot be printed into a node-facing file: {head:?}{}",
                u32::from(c),
                if head.len() < value.len() { "..." } else { "" }
            ))
        }
    }
}

/// An error of rendering `source`, naming the expression at fault when the engine says
/// where it is (`undefined value: options.nope`), since "undefined value" alone does not
/// say which of a template's variables is missing.
fn describe_in(e: &minijinja::Error, source: &str) -> String {
    // The range may start at an attribute (`.probe.status`): widen it back over the
    // variable it belongs to.
    let at = e
        .range()
        .map(|r| {
            let head = source.get(..r.start).unwrap_or("");
            let start = head
                .char_indices()
                .rev()
                .take_while(|(_, c)| c.is_alphanumeric() || matches!(c, '_' | '.'))
                .last()
                .map_or(r.start, |(i, _)| i);
            start..r.end
        })
        .and_then(|r| source.get(r))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 120 && !s.contains('\n'));
    match at {
        Some(expr) if e.kind() == minijinja::ErrorKind::UndefinedError => {
            let mut msg = describe(e);
            msg.push_str(&format!(" (at `{expr}`)"));
            msg
        }
        _ => describe(e),
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_undefined_variable_is_named() {
        let r = Renderer::new();
        let e = r
            .render_str("x={{ options.nope }}", &json!({"options": {}}))
            .unwrap_err();
        assert!(
            e.contains("undefined") && e.contains("`options.nope`"),
            "{e}"
        );
        let e = r
            .truthy("context.probe.status == 200", &json!({"context": {}}))
            .unwrap_err();
        assert!(e.contains("context.probe"), "{e}");
    }

    #[test]
    fn malformed_text_that_trips_the_template_engine_is_an_error() {
        let r = Renderer::new();
        let e = r.truthy("}}]", &json!({})).unwrap_err();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn a_template_over_its_limits_fails_clearly() {
        let r = Renderer::new();
        let vars = json!({});
        let e = r
            .render_str(
                "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}",
                &vars,
            )
            .unwrap_err();
        assert!(e.contains("more than 1000000 steps"), "{e}");
        let e = r
            .render_str(
                "{% for i in range(10) %}{{ 'a' * 100000000 }}{% endfor %}",
                &vars,
            )
            .unwrap_err();
        assert!(e.contains("more than 1024 KiB"), "{e}");
        assert_eq!(r.render_str("{{ 'ab' * 3 }}", &vars).unwrap(), "ababab");
    }

    #[test]
    fn renders_nested_and_fails_strictly() {
        let r = Renderer::new();
        let vars =
            json!({"options": {"imageUrl": "http://x/a.iso"}, "context": {"probe": {"n": 3}}});
        let opts = json!({"image": "{{ options.imageUrl }}", "list": ["{{ context.probe.n }}", 1], "plain": "x"});
        let out = r.render_options(opts.as_object().unwrap(), &vars).unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"image": "http://x/a.iso", "list": ["3", 1], "plain": "x"})
        );
        let bad = json!({"image": "{{ options.missing }}"});
        let err = r
            .render_options(bad.as_object().unwrap(), &vars)
            .unwrap_err();
        assert!(err.contains("option 'image'"), "{err}");
        assert!(err.contains("undefined"), "{err}");
        assert!(r.truthy("context.probe.n == 3", &vars).unwrap());
        assert!(!r.truthy("{{ context.probe.n > 5 }}", &vars).unwrap());
        assert!(r.truthy("{{ 'maybe' }}", &vars).is_err());
    }

    #[test]
    fn a_checked_renderer_checks_every_printed_value_but_not_the_template_text() {
        let r = Renderer::checked(no_control_characters);
        let vars =
            json!({"node": {"name": "evil\nchain http://127.0.0.1:1/pwn.ipxe", "ok": "rack1"}});
        assert_eq!(
            r.render_str("line one\n{{ node.ok }}\n", &vars).unwrap(),
            "line one\nrack1\n"
        );
        for template in [
            "# Node {{ node.name }}",
            "{{ node.name | safe }}",
            "{{ node.name | upper }}",
            "{% for n in [node.name] %}{{ n }}{% endfor %}",
        ] {
            let err = r.render_str(template, &vars).expect_err(template);
            assert!(err.contains("U+000A"), "{template}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        assert!(no_control_characters("tab\t").is_err());
        assert!(no_control_characters("sep\u{2028}").is_err());
        assert!(no_control_characters("caf\u{e9} & $x ; 'q'").is_ok());
        // Unchecked rendering is unchanged.
        assert!(Renderer::new().render_str("{{ node.name }}", &vars).is_ok());
    }
}
