//! RackHD's base tasks (`implementsTask: Task.Base.*`) as jobs, so that RackHD task
//! definitions load unchanged where metalgraph has the behaviour (docs/rackhd.md).
//!
//! Each is the metalgraph job that does the same work, under RackHD's name and with
//! RackHD's option names, which are translated when the task starts:
//!
//! | base task | job | RackHD's options |
//! |---|---|---|
//! | `Task.Base.noop` | `noop` | any (ignored) |
//! | `Task.Base.Graph.Run` | `graph.run` | `graphName`, `graphOptions` |
//! | `Task.Base.Evaluate.Condition` | `evaluate.condition` | `when` |
//! | `Task.Base.Wait.Notification` | `wait.notification` | — |
//! | `Task.Base.Redfish.Discovery` | `discovery.redfish` | `uri`, `username`, `password`, `verifySSL` |
//! | `Task.Base.Rest` | `http.request` | `url`, `method`, `headers`, `data` (the body), `recvTimeoutMs`, `verifySSL` |
//! | `Task.Base.Obm.Node` | `obm.power` / `obm.boot-device` / `obm.bmc` | `action` (RackHD's names), `obmServiceName` |
//! | `Task.Base.Os.Install` | `wait.notification` | `profile` (served while it runs), `installScript`, `installScriptUri`, and RackHD's install options |
//!
//! A base task metalgraph does not run is refused where a definition names it, with a
//! message that says so (`definitions::unknown_job`).

use std::sync::Arc;

use metalgraph_engine::job::{BoxFuture, JobContext, JobResult, Options};
use metalgraph_engine::{Job, JobError, JobRegistry, OptionKind, OptionSchema};
use serde_json::Value;

/// RackHD's OBM actions metalgraph's drivers perform, and what each becomes: a power
/// action of `obm.power`, a boot device of `obm.boot-device` or an action on the BMC
/// itself of `obm.bmc`. RackHD's others (`identifyOn`, `identifyOff`, `mcInfo`, `NMI`,
/// `powerButton`, `clearWatchDog`, ...) are not among them, so a definition naming one is
/// refused when it is stored, with this list.
const OBM_ACTIONS: &[(&str, ObmStep)] = &[
    ("powerOn", ObmStep::Power("on")),
    ("powerOff", ObmStep::Power("off")),
    ("reboot", ObmStep::Power("reboot")),
    ("reset", ObmStep::Power("reset")),
    // RackHD's `softReset` is IPMI's `chassis power soft`: an ACPI shutdown.
    ("softReset", ObmStep::Power("soft-off")),
    ("powerStatus", ObmStep::Power("status")),
    ("setBootPxe", ObmStep::Boot("pxe")),
    // RackHD's `setBootDisk`: the disk on the next boot only.
    ("setBootDisk", ObmStep::Boot("hdd")),
    // RackHD's `forceBootPxe`: PXE next time, then a reset.
    ("forceBootPxe", ObmStep::BootThenPower("pxe", "reset")),
    // IPMI's `sel clear` and `mc reset cold`, as RackHD's ipmi-obm-service ran them; the
    // Redfish driver refuses both, naming IPMI.
    ("clearSEL", ObmStep::Bmc("clear-sel")),
    ("mcResetCold", ObmStep::Bmc("reset-cold")),
];

/// The names of [`OBM_ACTIONS`], for the option's schema.
const OBM_ACTION_NAMES: &[&str] = &[
    "powerOn",
    "powerOff",
    "reboot",
    "reset",
    "softReset",
    "powerStatus",
    "setBootPxe",
    "setBootDisk",
    "forceBootPxe",
    "clearSEL",
    "mcResetCold",
];

#[derive(Debug, Clone, Copy)]
enum ObmStep {
    Power(&'static str),
    Boot(&'static str),
    BootThenPower(&'static str, &'static str),
    Bmc(&'static str),
}

/// Registers RackHD's base tasks over the jobs already in `reg` (register the basic and
/// provisioning jobs first). A base task whose job is missing is left out.
pub fn register(reg: &mut JobRegistry) {
    let job = |reg: &JobRegistry, name: &str| reg.get(name).cloned();
    let mut add = Vec::<BaseTask>::new();
    for (name, inner) in [
        ("Task.Base.noop", "noop"),
        ("Task.Base.Graph.Run", "graph.run"),
        ("Task.Base.Evaluate.Condition", "evaluate.condition"),
        ("Task.Base.Wait.Notification", "wait.notification"),
        ("Task.Base.Redfish.Discovery", "discovery.redfish"),
    ] {
        if let Some(inner) = job(reg, inner) {
            add.push(BaseTask::same(name, inner));
        }
    }
    if let Some(http) = job(reg, "http.request") {
        add.push(BaseTask::rest(http));
    }
    if let Some(wait) = job(reg, "wait.notification") {
        add.push(BaseTask::os_install(wait));
    }
    for task in add {
        reg.register(task);
    }
    if let (Some(power), Some(boot), Some(bmc)) = (
        job(reg, "obm.power"),
        job(reg, "obm.boot-device"),
        job(reg, "obm.bmc"),
    ) {
        reg.register(ObmNode::new(power, boot, bmc));
    }
}

/// A RackHD base task run by a metalgraph job, its options translated first.
struct BaseTask {
    name: &'static str,
    inner: Arc<dyn Job>,
    schema: OptionSchema,
    translate: fn(&mut Options) -> Result<(), JobError>,
}

impl std::fmt::Debug for BaseTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BaseTask({} as {})", self.name, self.inner.name())
    }
}

impl BaseTask {
    /// A base task whose options are the job's own.
    fn same(name: &'static str, inner: Arc<dyn Job>) -> Self {
        BaseTask {
            name,
            schema: inner.schema().clone(),
            inner,
            translate: |_| Ok(()),
        }
    }

    /// `Task.Base.Rest`: `http.request` with RackHD's `data` (the body) and
    /// `recvTimeoutMs` (the timeout) beside its own names.
    fn rest(inner: Arc<dyn Job>) -> Self {
        let schema = inner
            .schema()
            .clone()
            .optional(
                "data",
                OptionKind::Any,
                None,
                "RackHD's name for the request body",
            )
            .optional(
                "recvTimeoutMs",
                OptionKind::Integer,
                None,
                "RackHD's timeout, in milliseconds",
            );
        BaseTask {
            name: "Task.Base.Rest",
            inner,
            schema,
            translate: |options| {
                if let Some(data) = options.remove("data").filter(|v| !v.is_null()) {
                    options.entry("body").or_insert(data);
                }
                if let Some(ms) = options.remove("recvTimeoutMs").filter(|v| !v.is_null()) {
                    let ms = ms.as_u64().ok_or_else(|| {
                        JobError::new(
                            "option 'recvTimeoutMs' must be a whole number of milliseconds",
                        )
                    })?;
                    options.insert("timeout".into(), Value::from(ms));
                }
                Ok(())
            },
        }
    }
}

/// RackHD's OS install options: each may be left null (not given) and is null unless
/// given, so that install templates can test any of them (RackHD's own definitions leave
/// most out); the templates use those given. `(name, kind, what)`. `version` is not among them: a definition that
/// leaves it null needs it given when its graph runs.
const OS_INSTALL_OPTIONS: &[(&str, OptionKind, &str)] = &[
    (
        "installScript",
        OptionKind::String,
        "the install script's template name (a kickstart, a preseed...)",
    ),
    (
        "installScriptUri",
        OptionKind::String,
        "the URL the installer fetches the install script from",
    ),
    ("osType", OptionKind::String, "linux, esx or windows"),
    ("osName", OptionKind::String, "the OS's name, for templates"),
    (
        "repo",
        OptionKind::String,
        "the URL of the OS's installation tree",
    ),
    (
        "hostname",
        OptionKind::String,
        "the installed system's host name",
    ),
    ("domain", OptionKind::String, "its DNS domain"),
    (
        "rootPassword",
        OptionKind::String,
        "the root (Administrator) password, shown only to the node itself",
    ),
    (
        "rootSshKey",
        OptionKind::String,
        "an SSH public key for root",
    ),
    (
        "users",
        OptionKind::Array,
        "further accounts: name, password, uid, sshKey",
    ),
    ("dnsServers", OptionKind::Array, "DNS servers"),
    ("ntpServers", OptionKind::Array, "NTP servers"),
    (
        "networkDevices",
        OptionKind::Array,
        "static network settings per device",
    ),
    ("installDisk", OptionKind::Any, "the disk to install on"),
    ("kvm", OptionKind::Bool, "install the KVM packages"),
    (
        "proxy",
        OptionKind::String,
        "an HTTP proxy for the installer",
    ),
    (
        "kernelParams",
        OptionKind::String,
        "more kernel parameters for the installer",
    ),
    (
        "completionUri",
        OptionKind::String,
        "RackHD's completion template; metalgraph's installers call back instead",
    ),
    (
        "kargs",
        OptionKind::Any,
        "RackHD's extra kernel arguments: a string, or NAME: VALUE pairs",
    ),
    (
        "baseUrl",
        OptionKind::String,
        "RackHD's Debian installer path under the repository",
    ),
    (
        "interface",
        OptionKind::String,
        "the network interface the Debian installer uses (auto)",
    ),
    (
        "installType",
        OptionKind::String,
        "Photon OS's package set (minimal, full)",
    ),
    (
        "username",
        OptionKind::String,
        "RackHD's Windows account, made beside Administrator",
    ),
    (
        "password",
        OptionKind::String,
        "RackHD's Windows password, shown only to the node itself",
    ),
    (
        "rackhdCallbackScript",
        OptionKind::String,
        "RackHD's first-boot callback script: with it, the install script also calls back \
         when the installed system first boots",
    ),
    ("productkey", OptionKind::String, "a Windows product key"),
    (
        "smbUser",
        OptionKind::String,
        "the user of a Windows installation share",
    ),
    ("smbPassword", OptionKind::String, "its password"),
    (
        "smbRepo",
        OptionKind::String,
        "a Windows installation share",
    ),
    (
        "imageIndex",
        OptionKind::Integer,
        "the Windows image in install.wim",
    ),
    (
        "iso",
        OptionKind::String,
        "the URL of an ISO image (a live CD, an installer)",
    ),
    ("kernel", OptionKind::String, "the URL of a kernel to boot"),
    ("initrd", OptionKind::String, "the URL of its initrd"),
    (
        "rootfs",
        OptionKind::String,
        "the URL of a live root file system (CoreOS)",
    ),
];

impl BaseTask {
    /// `Task.Base.Os.Install`: serves the task's iPXE `profile` to the node while it runs
    /// (as every task with a `profile` option does), and ends when the installer calls
    /// back (`wait.notification`), with the callback's body as output. The install script
    /// (`installScript`, fetched at `installScriptUri`) is a node-facing template rendered
    /// with the task's options and the callback URL.
    fn os_install(inner: Arc<dyn Job>) -> Self {
        let mut schema = inner.schema().clone().required(
            "profile",
            OptionKind::String,
            "the iPXE profile the node is served while the install runs (a template name)",
        );
        for (name, kind, doc) in OS_INSTALL_OPTIONS {
            schema = schema.optional(name, kind.clone(), Some(Value::Null), doc);
        }
        BaseTask {
            name: "Task.Base.Os.Install",
            inner,
            schema: schema
                .secret("rootPassword")
                .secret("smbPassword")
                .secret("password")
                .secret("users"),
            translate: |_| Ok(()),
        }
    }
}

impl Job for BaseTask {
    fn name(&self) -> &'static str {
        self.name
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, mut ctx: JobContext) -> BoxFuture<'static, JobResult> {
        if let Err(e) = (self.translate)(&mut ctx.options) {
            return Box::pin(std::future::ready(Err(e)));
        }
        self.inner.run(ctx)
    }

    fn occupies_slot(&self) -> bool {
        self.inner.occupies_slot()
    }
}

/// `Task.Base.Obm.Node`: RackHD's OBM actions on the node's BMC.
///
/// `obmServiceName` is accepted and not used: the node's OBM is the one its record names
/// (RackHD picks among several by it; a metalgraph node's first usable OBM drives it).
struct ObmNode {
    power: Arc<dyn Job>,
    boot: Arc<dyn Job>,
    bmc: Arc<dyn Job>,
    schema: OptionSchema,
}

impl std::fmt::Debug for ObmNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObmNode")
    }
}

impl ObmNode {
    fn new(power: Arc<dyn Job>, boot: Arc<dyn Job>, bmc: Arc<dyn Job>) -> Self {
        let mut schema = OptionSchema::new()
            .required(
                "action",
                OptionKind::Enum(OBM_ACTION_NAMES),
                "RackHD's OBM action: powerOn, powerOff, reboot, reset, softReset, \
                 powerStatus, setBootPxe, setBootDisk, forceBootPxe, clearSEL or mcResetCold (the last \
                 two over IPMI only)",
            )
            .optional(
                "obmServiceName",
                OptionKind::String,
                None,
                "RackHD's OBM service; accepted, the node's own OBM is used",
            );
        // The power job's tuning (waitTimeout, pollInterval) applies too, and the BMC
        // job's own (resetGrace, for mcResetCold).
        for (name, spec) in &power.schema().options {
            if *name != "action" {
                schema.options.insert(name, spec.clone());
            }
        }
        for (name, spec) in &bmc.schema().options {
            if *name != "action" {
                schema.options.entry(name).or_insert_with(|| spec.clone());
            }
        }
        ObmNode {
            power,
            boot,
            bmc,
            schema,
        }
    }
}

impl Job for ObmNode {
    fn name(&self) -> &'static str {
        "Task.Base.Obm.Node"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let action = ctx.str_opt("action").unwrap_or_default().to_owned();
        let Some((_, step)) = OBM_ACTIONS.iter().find(|(name, _)| *name == action) else {
            return Box::pin(std::future::ready(Err(JobError::new(format!(
                "option 'action' must be one of {}, got {action:?}",
                OBM_ACTION_NAMES.join(", ")
            )))));
        };
        let with = |key: &str, value: &str, ctx: &JobContext| {
            let mut ctx = ctx.clone();
            ctx.options.remove("obmServiceName");
            ctx.options.remove("action");
            ctx.options.insert(key.to_owned(), Value::from(value));
            ctx
        };
        match *step {
            ObmStep::Power(a) => self.power.run(with("action", a, &ctx)),
            ObmStep::Boot(d) => self.boot.run(with("device", d, &ctx)),
            ObmStep::Bmc(a) => self.bmc.run(with("action", a, &ctx)),
            ObmStep::BootThenPower(d, a) => {
                let boot = self.boot.run(with("device", d, &ctx));
                let power = self.power.clone();
                let then = with("action", a, &ctx);
                Box::pin(async move {
                    boot.await?;
                    power.run(then).await
                })
            }
        }
    }
}
