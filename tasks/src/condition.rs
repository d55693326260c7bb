//! `evaluate.condition`: succeeds or fails on a template expression, so graphs can branch
//! with `waitOn: {check: succeeded}` and `waitOn: {check: failed}`.

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{Job, JobError, OptionKind, OptionSchema};
use serde_json::{Value, json};

/// Rendered values longer than this are cut in error messages, since a template may render
/// a whole document by mistake.
const SHOWN_CHARS: usize = 200;

/// Succeeds when `when` rendered to `true` and fails when it rendered to `false`.
#[derive(Debug)]
pub struct EvaluateConditionJob {
    schema: OptionSchema,
}

impl Default for EvaluateConditionJob {
    fn default() -> Self {
        Self {
            schema: OptionSchema::new().required(
                "when",
                OptionKind::String,
                "a template that renders to true or false, e.g. \
                 \"{{ context.probe.status == 200 }}\"",
            ),
        }
    }
}

impl Job for EvaluateConditionJob {
    fn name(&self) -> &'static str {
        "evaluate.condition"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let result = evaluate(ctx.options.get("when"));
        Box::pin(async move { result })
    }
}

fn evaluate(when: Option<&Value>) -> JobResult {
    // The engine renders templates to strings; a literal boolean can only arrive when a
    // caller bypasses the schema, and it means what it says.
    let rendered = match when {
        None | Some(Value::Null) => return Err(JobError::new("option 'when' is required")),
        Some(Value::Bool(b)) => return verdict(*b, &b.to_string()),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(JobError::new(format!(
                "condition must render to true or false, got {}",
                shorten(&other.to_string())
            )));
        }
    };
    // Surrounding whitespace comes from template layout, not from the expression's value.
    let value = rendered.trim();
    if value.eq_ignore_ascii_case("true") {
        verdict(true, value)
    } else if value.is_empty() || value.eq_ignore_ascii_case("false") {
        verdict(false, value)
    } else {
        Err(JobError::new(format!(
            "condition must render to true or false, got '{}'",
            shorten(value)
        )))
    }
}

fn verdict(result: bool, shown: &str) -> JobResult {
    if result {
        Ok(json!({ "result": true }))
    } else {
        Err(JobError::new(format!(
            "condition '{}' is false",
            shorten(shown)
        )))
    }
}

fn shorten(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}
