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
//! Task options come in two dialects ([`Dialect`]): the engine's own (minijinja, Jinja2's
//! syntax) and RackHD's (Mustache as RackHD uses it, [`rackhd`]), which is translated into
//! the engine's before rendering. Options may refer to other options (`options.x`); those
//! are rendered first, on demand, and a cycle is an error naming it.
//!
//! The binary also renders node-facing files (iPXE scripts, kickstarts) with a
//! [`Renderer::checked`] renderer: every value printed by `{{ ... }}` must pass the format's
//! check, so that a value a node controls cannot add lines to what the node runs.

pub mod rackhd;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The template language of a definition's options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// minijinja: `{{ options.x }}`, `{% if %}`, filters.
    #[default]
    Jinja,
    /// RackHD's Mustache: `{{ options.x || options.y }}`, `{{#x}}…{{/x}}`.
    Rackhd,
}

impl Dialect {
    pub fn is_jinja(&self) -> bool {
        *self == Dialect::Jinja
    }

    /// The dialect of a task definition that does not name one: RackHD's for a definition
    /// implementing one of RackHD's base tasks (`Task.Base.*`), the engine's otherwise.
    pub fn of_job(implements_task: &str) -> Self {
        if implements_task.starts_with("Task.Base.") {
            Dialect::Rackhd
        } else {
            Dialect::Jinja
        }
    }
}

/// The most steps one template may take (minijinja's fuel: roughly one per instruction).
pub const FUEL: u64 = 1_000_000;

/// The most bytes one template may render.
pub const MAX_OUTPUT: usize = 1 << 20;

/// A configured template environment, built once per engine.
pub struct Renderer {
    env: Arc<Environment<'static>>,
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

/// The template environment every renderer starts from.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    rackhd::register(&mut env);
    env
}

impl Renderer {
    pub fn new() -> Self {
        Self {
            env: Arc::new(environment()),
        }
    }

    /// A renderer whose every printed value (`{{ ... }}`, filters applied, `safe` or not) must
    /// pass `check`; a value that fails makes the whole rendering fail with `check`'s message
    /// and the template line. Literal template text is not checked: it is the operator's.
    pub fn checked(check: fn(&str) -> Result<(), String>) -> Self {
        let mut env = environment();
        env.set_formatter(move |out, _state, value| {
            let text = value.to_string();
            check(&text).map_err(|why| minijinja::Error::new(ErrorKind::InvalidOperation, why))?;
            out.write_str(&text).map_err(minijinja::Error::from)
        });
        Self { env: Arc::new(env) }
    }

    /// Renders one template string over `vars`, within [`FUEL`] and [`MAX_OUTPUT`].
    pub fn render_str(&self, template: &str, vars: &Value) -> Result<String, String> {
        guarded(|| render_in(&self.env, Dialect::Jinja, template, vars))
    }

    /// Renders a task's options in `dialect` over `vars`, whose `options` are the options
    /// themselves: an option that another one refers to is rendered first, on demand, and
    /// options that refer to each other in a cycle are an error naming it. Options named
    /// in `data` are values, never templates. Errors name the option path at fault.
    pub fn render_task_options(
        &self,
        dialect: Dialect,
        options: &Map<String, Value>,
        data: &[String],
        vars: &Value,
    ) -> Result<Map<String, Value>, String> {
        guarded(|| {
            let lazy = Arc::new(LazyOptions {
                env: self.env.clone(),
                dialect,
                raw: options.clone(),
                data: data.to_vec(),
                vars: match vars {
                    Value::Object(m) => m
                        .iter()
                        .filter(|(k, _)| k.as_str() != "options")
                        .map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v)))
                        .collect(),
                    _ => BTreeMap::new(),
                },
                state: Mutex::new(Progress::default()),
            });
            options
                .keys()
                .map(|k| Ok((k.clone(), lazy.resolve(k).unwrap_or(Ok(Value::Null))?)))
                .collect()
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

/// Renders `template`, written in `dialect`, over `ctx`, within [`FUEL`] and [`MAX_OUTPUT`].
fn render_in<S: Serialize>(
    env: &Environment<'static>,
    dialect: Dialect,
    template: &str,
    ctx: S,
) -> Result<String, String> {
    let translated;
    let source = match dialect {
        Dialect::Jinja => template,
        Dialect::Rackhd => {
            translated = rackhd::translate(template)?;
            translated.as_str()
        }
    };
    let describe = |e: &minijinja::Error| match dialect {
        Dialect::Jinja if rackhd::looks_like_rackhd(template) => format!(
            "{} (this is RackHD's template syntax: give the definition `templateDialect: rackhd`)",
            describe_in(e, template)
        ),
        Dialect::Jinja => describe_in(e, template),
        // The translation's own names mean nothing to the author: say only what is wrong.
        Dialect::Rackhd => e.detail().map_or_else(|| describe(e), str::to_owned),
    };
    let tmpl = env.template_from_str(source).map_err(|e| describe(&e))?;
    let mut out = Limited(Vec::new());
    match tmpl.render_captured_to(ctx, &mut out) {
        Ok(_) => String::from_utf8(out.0).map_err(|_| "rendered invalid UTF-8".to_owned()),
        Err(_) if out.0.len() > MAX_OUTPUT => Err(format!(
            "the template renders more than {} KiB (the limit of one rendered option)",
            MAX_OUTPUT / 1024
        )),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(format!(
            "the template takes more than {FUEL} steps (the limit of one rendered option)"
        )),
        Err(e) => Err(describe(&e)),
    }
}

/// A task's options as the `options` variable of its own templates: each one rendered
/// when a template first reads it, once.
#[derive(Debug)]
struct LazyOptions {
    env: Arc<Environment<'static>>,
    dialect: Dialect,
    raw: Map<String, Value>,
    data: Vec<String>,
    /// Every variable but `options`.
    vars: BTreeMap<String, minijinja::Value>,
    state: Mutex<Progress>,
}

#[derive(Debug, Default)]
struct Progress {
    /// Options rendered so far.
    done: HashMap<String, Result<Value, String>>,
    /// Options being rendered, outermost first.
    rendering: Vec<String>,
    /// Why the last option read on demand could not be given (the template engine only
    /// hears "undefined").
    failure: Option<String>,
}

impl LazyOptions {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Option `key` rendered; `None` when there is no such option.
    fn resolve(self: &Arc<Self>, key: &str) -> Option<Result<Value, String>> {
        let raw = self.raw.get(key)?;
        if self.data.iter().any(|d| d == key) || !holds_template(raw) {
            return Some(Ok(raw.clone()));
        }
        {
            let mut p = self.progress();
            if let Some(r) = p.done.get(key) {
                return Some(r.clone());
            }
            if let Some(at) = p.rendering.iter().position(|k| k == key) {
                let mut cycle = p.rendering[at..].to_vec();
                cycle.push(key.to_owned());
                return Some(Err(format!(
                    "options refer to each other in a cycle: {}",
                    cycle.join(" -> ")
                )));
            }
            p.rendering.push(key.to_owned());
        }
        let ctx = {
            let mut m = self.vars.clone();
            m.insert(
                "options".into(),
                minijinja::Value::from_dyn_object(self.clone()),
            );
            minijinja::Value::from_iter(m)
        };
        let result = render_value(raw, key, &|s: &str| {
            let rendered = render_in(&self.env, self.dialect, s, &ctx);
            // An option read on demand that failed is the cause, not "undefined"; one the
            // template could do without (`default`) is forgotten.
            let failure = self.progress().failure.take();
            rendered.map_err(|e| failure.unwrap_or(e))
        });
        let mut p = self.progress();
        p.rendering.pop();
        p.done.insert(key.to_owned(), result.clone());
        Some(result)
    }
}

impl minijinja::value::Object for LazyOptions {
    fn repr(self: &Arc<Self>) -> minijinja::value::ObjectRepr {
        minijinja::value::ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        match self.resolve(key.as_str()?)? {
            Ok(v) => Some(minijinja::Value::from_serialize(&v)),
            Err(e) => {
                self.progress().failure = Some(e);
                None
            }
        }
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        minijinja::value::Enumerator::Values(
            self.raw
                .keys()
                .map(|k| minijinja::Value::from(k.as_str()))
                .collect(),
        )
    }
}

/// Renders the template strings inside `v` with `render`, naming the option path at fault.
fn render_value(
    v: &Value,
    path: &str,
    render: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) if is_template(s) => {
            Value::String(render(s).map_err(|e| format!("option '{path}': {e}"))?)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| render_value(x, &format!("{path}[{i}]"), render))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, &format!("{path}.{k}"), render)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
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
        let vars = json!({"context": {"probe": {"n": 3}}});
        let opts = json!({"image": "{{ options.imageUrl }}", "imageUrl": "http://x/a.iso", "list": ["{{ context.probe.n }}", 1], "plain": "x"});
        let out = r
            .render_task_options(Dialect::Jinja, opts.as_object().unwrap(), &[], &vars)
            .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"image": "http://x/a.iso", "imageUrl": "http://x/a.iso", "list": ["3", 1], "plain": "x"})
        );
        let bad = json!({"image": "{{ options.missing }}"});
        let err = r
            .render_task_options(Dialect::Jinja, bad.as_object().unwrap(), &[], &vars)
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

    fn task_options(dialect: Dialect, options: Value, vars: Value) -> Result<Value, String> {
        Renderer::new()
            .render_task_options(dialect, options.as_object().unwrap(), &[], &vars)
            .map(Value::Object)
    }

    #[test]
    fn options_that_refer_to_options_see_them_rendered_in_either_dialect() {
        for dialect in [Dialect::Jinja, Dialect::Rackhd] {
            let out = task_options(
                dialect,
                json!({"uri": "{{ api.templates }}/{{ options.script }}", "script": "{{ options.os }}-ks", "os": "centos", "n": 3}),
                json!({"api": {"templates": "http://h/t"}}),
            )
            .unwrap();
            assert_eq!(
                out,
                json!({"uri": "http://h/t/centos-ks", "script": "centos-ks", "os": "centos", "n": 3}),
                "{dialect:?}"
            );
            let e = task_options(
                dialect,
                json!({"a": "{{ options.b }}", "b": "x{{ options.a }}"}),
                json!({}),
            )
            .unwrap_err();
            assert_eq!(
                e, "option 'a': option 'b': options refer to each other in a cycle: a -> b -> a",
                "{dialect:?}"
            );
            let e = task_options(
                dialect,
                json!({"a": "{{ options.b }}", "b": "{{ options.nope }}"}),
                json!({}),
            )
            .unwrap_err();
            assert!(
                e.starts_with("option 'a': option 'b': undefined value")
                    && e.contains("`options.nope`"),
                "{dialect:?}: {e}"
            );
        }
        // Data options are never rendered, even when another option reads them.
        let out = Renderer::new()
            .render_task_options(
                Dialect::Jinja,
                json!({"a": "<{{ options.raw }}>", "raw": "{{ not rendered }}"})
                    .as_object()
                    .unwrap(),
                &["raw".to_owned()],
                &json!({}),
            )
            .unwrap();
        assert_eq!(out["a"], json!("<{{ not rendered }}>"));
    }

    #[test]
    fn the_rackhd_dialect_renders_mustache_as_rackhd_does() {
        let vars = json!({
            "task": {"nodeId": "n1"},
            "context": {"target": "n1"},
            "file": {"server": "http://h/files"},
        });
        let options = json!({
            "fallback": "{{ options.name || task.nodeId }}",
            "literal": "{{ options.name || 'anonymous' }}",
            "given": "{{ options.os || options.name }}",
            "repo": "{{ file.server }}/centos/{{ options.version }}/os",
            "list": "{{#options.dns}}nameserver={{.}};{{/options.dns}}",
            "accounts": "{{#options.users}}{{name}}:{{uid}} {{/options.users}}",
            "object": "{{#options.proxy}}proxy={{host}}:{{port}}{{/options.proxy}}",
            "absent": "[{{#options.name}}never{{/options.name}}]",
            "inverted": "{{^options.name}}no name{{/options.name}}",
            "nullPrints": "<{{ options.name }}>",
            "triple": "{{{ options.os }}}{{! a comment }}",
            "jinjaText": "{% raw %} stays {# too #}",
            "joined": "{{ options.dns }}",
            "name": null,
            "os": "centos",
            "version": 7,
            "dns": ["10.0.0.2", "10.0.0.3"],
            "users": [{"name": "ops", "uid": 1000}, {"name": "ci", "uid": 1001}],
            "proxy": {"host": "px", "port": 3128},
        });
        let out = task_options(Dialect::Rackhd, options, vars.clone()).unwrap();
        for (k, want) in [
            ("fallback", "n1"),
            ("literal", "anonymous"),
            ("given", "centos"),
            ("repo", "http://h/files/centos/7/os"),
            ("list", "nameserver=10.0.0.2;nameserver=10.0.0.3;"),
            ("accounts", "ops:1000 ci:1001 "),
            ("object", "proxy=px:3128"),
            ("absent", "[]"),
            ("inverted", "no name"),
            ("nullPrints", "<>"),
            ("triple", "centos"),
            ("jinjaText", "{% raw %} stays {# too #}"),
            ("joined", "10.0.0.2,10.0.0.3"),
        ] {
            assert_eq!(out[k], json!(want), "{k}");
        }
        let e = task_options(
            Dialect::Rackhd,
            json!({"x": "{{ options.nope || context.missing }}"}),
            vars.clone(),
        )
        .unwrap_err();
        assert_eq!(
            e,
            "option 'x': undefined value (at `options.nope || context.missing`)"
        );
        let e = task_options(Dialect::Rackhd, json!({"x": "{{#a}}"}), vars).unwrap_err();
        assert_eq!(
            e,
            "option 'x': the section {{#a}} is never closed with {{/a}}"
        );
    }

    #[test]
    fn rackhd_syntax_in_the_engine_dialect_gets_a_hint() {
        let e = task_options(
            Dialect::Jinja,
            json!({"x": "{{ options.a || options.b }}"}),
            json!({}),
        )
        .unwrap_err();
        assert!(e.contains("templateDialect: rackhd"), "{e}");
    }
}
