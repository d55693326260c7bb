//! `config-media.build`: renders a node's installer configuration from templates into an
//! ISO 9660 image on the node-facing `/files/`, so that a BMC can insert it as a second
//! virtual medium and an unattended installer finds its configuration on a volume it
//! knows by label — cloud-init NoCloud (`user-data`, `meta-data`, `network-config` on
//! `cidata`) or a kickstart (`ks.cfg` on `OEMDRV`) — with no network request for the
//! configuration itself.
//!
//! Images live in `<files dir>/config-media/`, named `<task id>.<128 random bits>.iso`,
//! mode 0600. A BMC fetches virtual media without any of metalgraph's credentials, so the
//! name is the capability: it cannot be guessed, and the directory is never listed. The
//! binary deletes a workflow's images when the workflow ends, and at start those of
//! workflows that ended (or vanished) while it was down ([`ConfigMediaSite::workflows`],
//! [`ConfigMediaSite::remove_workflow`]). The task id leads the name so that both find a
//! workflow's images without an index.
//!
//! Templates see `node` (never a secret), `api`, `task`, `kind`, `vars`, `secrets` and,
//! with the `notify` option, `notification`: the callback of the workflow's
//! `wait.notification` task, token included, since the installer a medium configures has
//! no other way to learn it. The `secrets` option and that token are the only secrets that
//! may reach a medium: `secrets` is declared secret (so redacted in workflow views and
//! events), the token is never in an output, and errors quote neither.

mod iso;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult, json_kind};
use metalgraph_engine::template::{Renderer, no_control_characters};
use metalgraph_engine::workflow::REDACTED;
use metalgraph_engine::{ApiUrls, Job, JobError, OptionKind, OptionSchema};
use serde_json::{Map, Value, json};

use crate::files::{Unresolved, plain_relative, resolve};

/// The folder of the files directory that holds configuration media.
pub const DIR: &str = "config-media";

/// The most files one medium holds.
const MAX_FILES: usize = 16;

/// The longest file name on a medium (Joliet's limit).
const MAX_NAME: usize = 64;

/// What an installer looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// cloud-init's NoCloud data source: a volume labelled `cidata`.
    NoCloud,
    /// Anaconda's driver-disk convention: a volume labelled `OEMDRV` holding `ks.cfg`.
    Kickstart,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "nocloud" => Some(Kind::NoCloud),
            "kickstart" => Some(Kind::Kickstart),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::NoCloud => "nocloud",
            Kind::Kickstart => "kickstart",
        }
    }

    /// The volume label the installer looks for.
    fn label(self) -> &'static str {
        match self {
            Kind::NoCloud => "cidata",
            Kind::Kickstart => "OEMDRV",
        }
    }

    /// The files when the `files` option gives none: name on the medium, template.
    fn default_files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::NoCloud => &[
                ("user-data", "config-media/nocloud/user-data"),
                ("meta-data", "config-media/nocloud/meta-data"),
                ("network-config", "config-media/nocloud/network-config"),
            ],
            Kind::Kickstart => &[("ks.cfg", "config-media/ks.cfg")],
        }
    }
}

/// Where configuration media come from and go: the templates directory, the files
/// directory and the node-facing URLs. The binary lends it to the job; what it lacks, the
/// job names when it runs.
#[derive(Debug, Clone, Default)]
pub struct ConfigMediaSite {
    files_dir: Option<PathBuf>,
    templates_dir: Option<PathBuf>,
    api: ApiUrls,
}

impl ConfigMediaSite {
    /// `api.node_base` is the node-facing API's base (empty when it is off); images are
    /// served under its `/files/`.
    pub fn new(files_dir: Option<PathBuf>, templates_dir: Option<PathBuf>, api: ApiUrls) -> Self {
        Self {
            files_dir,
            templates_dir,
            api,
        }
    }

    /// The folder images are written to, when there is a files directory.
    pub fn dir(&self) -> Option<PathBuf> {
        self.files_dir.as_ref().map(|d| d.join(DIR))
    }

    /// The ids of the workflows that have images (or partial writes) in the folder
    /// (blocking).
    pub fn workflows(&self) -> std::io::Result<BTreeSet<String>> {
        let Some(dir) = self.dir() else {
            return Ok(BTreeSet::new());
        };
        Ok(images(&dir)?
            .into_iter()
            .map(|(task, _)| workflow_of(&task).to_owned())
            .collect())
    }

    /// Deletes every image (and partial write) of workflow `workflow_id`; returns how many
    /// (blocking).
    pub fn remove_workflow(&self, workflow_id: &str) -> std::io::Result<usize> {
        let Some(dir) = self.dir() else {
            return Ok(0);
        };
        remove_images(&dir, |task| workflow_of(task) == workflow_id)
    }

    /// The templates directory, the images folder and its node-facing URL, or what is
    /// missing for them.
    fn ready(&self) -> Result<(PathBuf, PathBuf, String), JobError> {
        let missing = |what: &str| {
            JobError::new(format!(
                "config-media.build needs {what}; configure it on the server (docs/provisioning.md)"
            ))
        };
        let templates = self
            .templates_dir
            .clone()
            .ok_or_else(|| missing("a templates directory (templates_dir, --templates-dir)"))?;
        let dir = self
            .dir()
            .ok_or_else(|| missing("a files directory (files_dir, --files-dir)"))?;
        let files = self.api.node_vars()["files"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if files.is_empty() {
            return Err(missing(
                "the node-facing listener (node_listen, --node-listen), which serves the image",
            ));
        }
        Ok((templates, dir, format!("{files}/{DIR}")))
    }
}

/// The images (and partial writes) in `dir`, as (task id, path). Only names this module
/// writes count (`<task id>.<32 hex digits>.iso`, or that with `.part`), so nothing else
/// in the folder is ever taken for an image.
fn images(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let image = name.strip_suffix(".part").unwrap_or(&name);
        let Some((task, random)) = image
            .strip_suffix(".iso")
            .and_then(|stem| stem.rsplit_once('.'))
        else {
            continue;
        };
        if !task.is_empty()
            && random.len() == 32
            && random
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            found.push((task.to_owned(), entry.path()));
        }
    }
    Ok(found)
}

/// The workflow a task id belongs to (`<workflow id>.<index>`).
fn workflow_of(task_id: &str) -> &str {
    task_id.split('.').next().unwrap_or(task_id)
}

/// Deletes the images in `dir` of the tasks `which` picks; returns how many.
fn remove_images(dir: &Path, which: impl Fn(&str) -> bool) -> std::io::Result<usize> {
    let mut removed = 0;
    for (task, path) in images(dir)? {
        if !which(&task) {
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// 128 random bits in hex.
fn random_name_part() -> Result<String, JobError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| JobError::new("the system's random number generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` as a new image of task `task_id` in `dir` (blocking): the task's earlier
/// images go, the new one is written to a temporary name with mode 0600, flushed, renamed
/// into place and the folder flushed, so a crash leaves either no image or a whole one.
fn write_image(dir: &Path, task_id: &str, bytes: &[u8]) -> Result<(String, PathBuf), String> {
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create", e))?;
    // An attempt restarted after a crash replaces what the earlier one wrote.
    remove_images(dir, |task| task == task_id).map_err(|e| io("cannot clean", e))?;
    let name = format!(
        "{task_id}.{}.iso",
        random_name_part().map_err(|e| e.message)?
    );
    let part = dir.join(format!("{name}.part"));
    let path = dir.join(&name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .map_err(|e| io("cannot write an image in", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&part, &path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| {
            let _ = std::fs::remove_file(&part);
            io("cannot write an image in", e)
        })?;
    Ok((name, path))
}

/// The check of every value printed into a medium's file: no control character (so no
/// value adds a line), and a message that does not quote the value, which may be a secret.
fn printable(value: &str) -> Result<(), String> {
    no_control_characters(value).map_err(|_| {
        "a printed value holds a control character (a line break?), which cannot go into a \
         node's configuration file; print structured or multi-line values with `| tojson`"
            .to_owned()
    })
}

/// `message` with every string (and number) inside `secrets` replaced by [`REDACTED`].
fn scrub(message: String, secrets: &Value) -> String {
    fn leaves(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if !s.is_empty() => out.push(s.clone()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(items) => items.iter().for_each(|x| leaves(x, out)),
            Value::Object(m) => m.values().for_each(|x| leaves(x, out)),
            _ => {}
        }
    }
    let mut secret_values = Vec::new();
    leaves(secrets, &mut secret_values);
    // The longest first, so a secret that contains another is replaced whole.
    secret_values.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secret_values
        .iter()
        .fold(message, |m, s| m.replace(s.as_str(), REDACTED))
}

/// Builds a node's configuration medium (see the module documentation).
pub struct ConfigMediaBuildJob {
    schema: OptionSchema,
    site: Arc<ConfigMediaSite>,
}

impl std::fmt::Debug for ConfigMediaBuildJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMediaBuildJob")
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl ConfigMediaBuildJob {
    pub fn new(site: Arc<ConfigMediaSite>) -> Self {
        Self {
            schema: OptionSchema::new()
                .required(
                    "kind",
                    OptionKind::Enum(&["nocloud", "kickstart"]),
                    "nocloud (cloud-init: user-data, meta-data, network-config on volume \
                     cidata) or kickstart (ks.cfg on volume OEMDRV)",
                )
                .optional(
                    "files",
                    OptionKind::Object,
                    None,
                    "the medium's files, {name: template in the templates directory}; \
                     by default the kind's files from templates/config-media/",
                )
                .optional(
                    "vars",
                    OptionKind::Object,
                    Some(json!({})),
                    "values the templates see as `vars`",
                )
                .optional(
                    "secrets",
                    OptionKind::Object,
                    Some(json!({})),
                    "secret values the templates see as `secrets` (root password hashes, \
                     keys); redacted wherever options are shown",
                )
                .secret("secrets")
                .optional(
                    "notify",
                    OptionKind::String,
                    None,
                    "the label of the workflow's wait.notification task the installer ends: \
                     templates then see `notification` (url, token, workflowId, cap), so the \
                     medium carries the installer's callback",
                ),
            site,
        }
    }
}

/// The medium's files as (name on the medium, template), checked.
fn wanted_files(kind: Kind, option: Option<&Value>) -> Result<Vec<(String, String)>, JobError> {
    let files: Vec<(String, String)> = match option {
        None | Some(Value::Null) => kind
            .default_files()
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(name, template)| match template.as_str() {
                Some(t) => Ok((name.clone(), t.to_owned())),
                None => Err(JobError::new(format!(
                    "option 'files.{name}' must be a template name, got {}",
                    json_kind(template)
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(JobError::new(format!(
                "option 'files' must be an object, got {}",
                json_kind(other)
            )));
        }
    };
    if files.is_empty() || files.len() > MAX_FILES {
        return Err(JobError::new(format!(
            "option 'files' must name between 1 and {MAX_FILES} files, got {}",
            files.len()
        )));
    }
    for (name, template) in &files {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            let shown: String = name.chars().take(MAX_NAME).collect();
            return Err(JobError::new(format!(
                "option 'files': {shown:?} is not a usable file name on the medium (1 to \
                 {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.')"
            )));
        }
        if !plain_relative(template) {
            return Err(JobError::new(format!(
                "option 'files.{name}': template {template:?} leads outside the templates \
                 directory"
            )));
        }
    }
    Ok(files)
}

impl Job for ConfigMediaBuildJob {
    fn name(&self) -> &'static str {
        "config-media.build"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let site = self.site.clone();
        Box::pin(async move {
            let secrets = ctx.options.get("secrets").cloned().unwrap_or(Value::Null);
            build(&site, &ctx)
                .await
                .map_err(|e| JobError::new(scrub(e.message, &secrets)))
        })
    }
}

async fn build(site: &ConfigMediaSite, ctx: &JobContext) -> JobResult {
    let node = crate::provision::require_node(ctx, "config-media.build")?;
    let kind = Kind::parse(ctx.str_required("kind")?)
        .ok_or_else(|| JobError::new("option 'kind' must be nocloud or kickstart"))?;
    let files = wanted_files(kind, ctx.options.get("files"))?;
    let (templates_dir, dir, url_base) = site.ready()?;
    let mut sources = Vec::with_capacity(files.len());
    for (name, template) in files {
        let path = resolve(&templates_dir, &template)
            .await
            .map_err(|e| match e {
                Unresolved::NotFound => JobError::new(format!(
                    "option 'files.{name}': no template {template:?} in the templates directory"
                )),
                other => JobError::new(format!(
                    "option 'files.{name}': template {template:?}: {other}"
                )),
            })?;
        let source = tokio::fs::read_to_string(&path).await.map_err(|e| {
            JobError::new(format!(
                "option 'files.{name}': cannot read template {template:?}: {e}"
            ))
        })?;
        sources.push((name, template, source));
    }
    let object = |key: &str| match ctx.options.get(key) {
        Some(v @ Value::Object(_)) => v.clone(),
        _ => Value::Object(Map::new()),
    };
    let mut vars = json!({
        "node": node.template_view(),
        "api": site.api.node_vars(),
        "task": {"id": ctx.task_id, "label": ctx.label, "workflowId": ctx.workflow_id},
        "kind": kind.name(),
        "vars": object("vars"),
        "secrets": object("secrets"),
    });
    // The callback's token goes onto the medium, which only the node (and its BMC) is
    // given; never into an output or an error.
    let mut token = None;
    if let Some(label) = ctx.str_opt("notify").filter(|l| !l.is_empty()) {
        let callback = ctx
            .services
            .callback(ctx, label)
            .await
            .map_err(|e| JobError::new(format!("option 'notify': {e}")))?;
        vars["notification"] = metalgraph_engine::waiting_vars(
            &site.api.node_base,
            &node.id,
            &callback.workflow_id,
            &callback.token,
            callback.cap.as_deref().unwrap_or_default(),
        );
        token = Some(callback.token);
    }
    let hide_token = |e: JobError| match &token {
        Some(t) if !t.is_empty() => JobError::new(e.message.replace(t.as_str(), REDACTED)),
        _ => e,
    };
    let task_id = ctx.task_id.clone();
    let node_id = node.id.clone();
    // Rendering user templates is CPU work, and writing the image file work: both on the
    // blocking pool. Not raced against cancellation: it takes milliseconds, and an image
    // written after the task was cancelled is removed below rather than left behind.
    let written = tokio::task::spawn_blocking(move || {
        let renderer = Renderer::checked(printable);
        let mut rendered = Vec::with_capacity(sources.len());
        for (name, template, source) in sources {
            let text = renderer.render_str(&source, &vars).map_err(|e| {
                format!(
                    "template {template:?} (for {name}) cannot be rendered for node {node_id}: {e}"
                )
            })?;
            rendered.push((name, text.into_bytes()));
        }
        let names: Vec<String> = rendered.iter().map(|(n, _)| n.clone()).collect();
        let bytes = iso::image(kind.label(), &rendered)?;
        let (file, path) = write_image(&dir, &task_id, &bytes)?;
        Ok::<_, String>((file, path, bytes.len(), names))
    })
    .await
    .map_err(|e| JobError::new(format!("building the image did not complete: {e}")))?
    .map_err(|e| hide_token(JobError::new(e)))?;
    let (file, path, size, names) = written;
    if ctx.cancel.is_cancelled() {
        let _ = std::fs::remove_file(&path);
        return Err(JobError::new(format!("task {}: cancelled", ctx.label)));
    }
    Ok(json!({
        "url": format!("{url_base}/{file}"),
        "path": path.display().to_string(),
        "size": size,
        "kind": kind.name(),
        "label": kind.label(),
        "files": names,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_quote_a_secret() {
        let secrets = json!({"rootPassword": "hunter2-long", "pin": 4711, "nested": ["hunter2"]});
        let msg = "value hunter2-long and hunter2 and 4711 in a message".to_owned();
        assert_eq!(
            scrub(msg, &secrets),
            "value <redacted> and <redacted> and <redacted> in a message"
        );
        let e = printable("Sw0rdfish\nroot::0:0").unwrap_err();
        assert!(
            e.contains("control character") && !e.contains("Sw0rdfish"),
            "{e}"
        );
        assert!(printable("plain value").is_ok());
    }

    #[test]
    fn files_default_per_kind_and_are_checked() {
        let names = |kind, option: Option<Value>| {
            wanted_files(kind, option.as_ref())
                .map(|f| f.into_iter().map(|(n, _)| n).collect::<Vec<_>>())
        };
        assert_eq!(
            names(Kind::NoCloud, None).unwrap(),
            ["user-data", "meta-data", "network-config"]
        );
        assert_eq!(names(Kind::Kickstart, None).unwrap(), ["ks.cfg"]);
        assert_eq!(
            names(Kind::Kickstart, Some(json!({"ks.cfg": "my.ks"}))).unwrap(),
            ["ks.cfg"]
        );
        for (bad, why) in [
            (json!({}), "between 1 and 16"),
            (json!({"../x": "t"}), "not a usable file name"),
            (json!({"a/b": "t"}), "not a usable file name"),
            (json!({".hidden": "t"}), "not a usable file name"),
            (json!({"ks.cfg": "../../etc/passwd"}), "leads outside"),
            (json!({"ks.cfg": "/etc/passwd"}), "leads outside"),
            (
                json!({"ks.cfg": 3}),
                "must be a template name, got a number",
            ),
        ] {
            let e = wanted_files(Kind::Kickstart, Some(&bad)).unwrap_err();
            assert!(e.message.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn images_of_a_workflow_are_found_and_removed_together() {
        let files = tempfile::tempdir().unwrap();
        let site = ConfigMediaSite::new(Some(files.path().to_owned()), None, ApiUrls::default());
        assert!(site.workflows().unwrap().is_empty(), "no folder yet");
        let dir = site.dir().unwrap();
        let (a, path) = write_image(&dir, "wf1.3", b"one").unwrap();
        let (again, _) = write_image(&dir, "wf1.3", b"two").unwrap();
        assert!(!path.exists(), "a restarted attempt replaces its image");
        assert_ne!(a, again);
        write_image(&dir, "wf1.30", b"other task").unwrap();
        write_image(&dir, "wf2.0", b"other workflow").unwrap();
        // Files this module did not write are never taken for images.
        std::fs::write(dir.join("wf1.notes.txt"), b"mine").unwrap();
        std::fs::write(dir.join("wf1.3.not-random.iso"), b"mine").unwrap();
        let name = again
            .strip_prefix("wf1.3.")
            .unwrap()
            .strip_suffix(".iso")
            .unwrap();
        assert_eq!(name.len(), 32, "128 random bits: {again}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(&again))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            site.workflows().unwrap().into_iter().collect::<Vec<_>>(),
            ["wf1", "wf2"]
        );
        assert_eq!(site.remove_workflow("wf1").unwrap(), 2);
        assert_eq!(
            site.workflows().unwrap().into_iter().collect::<Vec<_>>(),
            ["wf2"]
        );
        assert!(dir.join("wf1.notes.txt").exists() && dir.join("wf1.3.not-random.iso").exists());
        let e = site.ready().unwrap_err();
        assert!(e.message.contains("templates directory"), "{e}");
    }
}
