//! The IPMI driver (`ipmi-obm-service`): runs `ipmitool -I lanplus` once per operation
//! (twice to clear the SEL, whose entry count it reads first).
//!
//! The password reaches ipmitool only through the `IPMI_PASSWORD` environment variable
//! (`-E`), never on its command line, where every user of the machine could read it in the
//! process list. Each run is bounded by a timeout and killed when it expires or when the
//! caller gives up (the child is `kill_on_drop`).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use metalgraph_engine::job::BoxFuture;
use metalgraph_engine::nodes::{ObmConfig, Secret};
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::Semaphore;

use super::{
    At, Bmc, BootDevice, BootOverride, DriverOptions, Error, IPMI_SERVICE, MediaSlot, MediaStatus,
    PowerAction, PowerState, Result,
};

const DEFAULT_PORT: u16 = 623;

/// Cipher suite 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) is what nearly every BMC
/// offers. Naming it also spares ipmitool the "Get Channel Cipher Suites" query that some
/// BMCs (OpenIPMI's ipmi_sim among them) never answer, which costs ~10 s per command.
const DEFAULT_CIPHER_SUITE: &str = "3";

/// Stderr lines ipmitool prints at `-v` that say nothing about a failure.
const NOISE: &[&str] = &[
    "Loading IANA PEN Registry",
    "Running Get VSO Capabilities",
    "Invalid completion code received: Invalid command",
    "Discovered IPMB address",
];

/// A BMC reached with `ipmitool -I lanplus`.
#[derive(Debug)]
pub struct IpmiBmc {
    node: String,
    host: String,
    port: u16,
    user: Option<String>,
    password: Secret,
    cipher_suite: String,
    ipmitool: String,
    timeout: Duration,
    /// Shared by every driver of this BMC: BMCs allow only a few sessions at once.
    limit: Arc<Semaphore>,
}

impl IpmiBmc {
    pub(crate) fn new(
        node: &str,
        config: &ObmConfig,
        options: &DriverOptions,
        limit: impl FnOnce(&str) -> Arc<Semaphore>,
    ) -> Result<Self> {
        let config_err = |message: String| Error::Config {
            node: node.to_owned(),
            service: IPMI_SERVICE.to_owned(),
            message,
        };
        let mut host = config.host.trim().to_owned();
        let mut port = config.port;
        // Accept `host:port` (not for IPv6 addresses, which hold several colons).
        if port.is_none()
            && let Some((h, p)) = host.split_once(':')
            && !p.contains(':')
        {
            let p = p
                .parse()
                .map_err(|_| config_err(format!("'host' has an invalid port '{p}'")))?;
            port = Some(p);
            host = h.to_owned();
        }
        if host.is_empty() {
            return Err(config_err(
                "'host' is empty; give the BMC's address".to_owned(),
            ));
        }
        if host.starts_with('-') {
            // It would reach ipmitool's argv as an option.
            return Err(config_err(format!(
                "'host' must not start with '-': {host}"
            )));
        }
        let cipher_suite = match config.extra.get("cipherSuite") {
            None | Some(Value::Null) => DEFAULT_CIPHER_SUITE.to_owned(),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= 17) => n.to_string(),
            Some(Value::String(s)) if s.parse::<u8>().is_ok_and(|n| n <= 17) => s.clone(),
            Some(other) => {
                return Err(config_err(format!(
                    "'cipherSuite' must be a number from 0 to 17, got {other}"
                )));
            }
        };
        let port = port.unwrap_or(DEFAULT_PORT);
        let limit = limit(&format!("{host}:{port}"));
        Ok(Self {
            node: node.to_owned(),
            host,
            port,
            user: config.user.clone().filter(|u| !u.is_empty()),
            password: config.password.clone().unwrap_or_default(),
            cipher_suite,
            ipmitool: options.ipmitool.clone(),
            timeout: options.ipmi_timeout,
            limit,
        })
    }

    fn user_at(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    fn at(&self, operation: &str) -> At {
        At {
            node: self.node.clone(),
            endpoint: self.user_at(),
            operation: operation.to_owned(),
        }
    }

    /// The ipmitool command for `args`. The password is only in the environment.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ipmitool);
        cmd.args([
            "-I",
            "lanplus",
            "-H",
            &self.host,
            "-p",
            &self.port.to_string(),
        ]);
        if let Some(user) = &self.user {
            cmd.args(["-U", user]);
        }
        // `-v` makes ipmitool say why a session failed (bad password or no answer).
        // Two retries of two seconds each bound an unreachable BMC at a few seconds.
        cmd.args(["-E", "-C", &self.cipher_suite, "-N", "2", "-R", "2", "-v"]);
        cmd.args(args);
        // Always set it: without it `-E` makes ipmitool prompt on the terminal.
        cmd.env("IPMI_PASSWORD", self.password.expose());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs ipmitool and returns its standard output.
    async fn run(&self, op: &str, args: &[&str]) -> Result<String> {
        let at = || self.at(op);
        let _permit = self.limit.acquire().await.map_err(|_| Error::Bmc {
            at: at(),
            message: "the driver is shutting down".to_owned(),
        })?;
        let child = self.command(args).spawn().map_err(|e| Error::Bmc {
            at: at(),
            message: if e.kind() == std::io::ErrorKind::NotFound {
                format!("'{}' not found; install ipmitool", self.ipmitool)
            } else {
                format!("cannot start '{}': {e}", self.ipmitool)
            },
        })?;
        // Dropping the child (timeout or cancellation) kills it.
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| Error::Timeout {
                at: at(),
                after: self.timeout,
            })?
            .map_err(|e| Error::Bmc {
                at: at(),
                message: format!("ipmitool failed to run: {e}"),
            })?;
        let stdout = self.scrub(String::from_utf8_lossy(&output.stdout).into_owned());
        let stderr = self.scrub(String::from_utf8_lossy(&output.stderr).into_owned());
        if output.status.success() {
            return Ok(stdout);
        }
        Err(self.classify(at(), &stdout, &stderr))
    }

    /// Turns ipmitool's complaints into an error that says what to fix.
    fn classify(&self, at: At, stdout: &str, stderr: &str) -> Error {
        let said = |s: &str| stderr.contains(s) || stdout.contains(s);
        if said("RAKP 2 HMAC is invalid")
            || said("unauthorized name")
            || said("RAKP 2 message indicates an error")
            || said("Invalid user name")
        {
            return Error::Auth {
                at,
                message: format!(
                    "IPMI authentication failed for {} (check user and password)",
                    self.user_at()
                ),
            };
        }
        if said("Get Auth Capabilities error")
            || said("Error issuing Get Channel Authentication Capabilities")
            || said("No response from remote controller")
        {
            return Error::Unreachable {
                at,
                message: format!(
                    "no IPMI answer from {}:{} (is the BMC up, and is the port right?)",
                    self.host, self.port
                ),
            };
        }
        if said("Unable to establish IPMI v2 / RMCP+ session") {
            return Error::Bmc {
                at,
                message: format!(
                    "cannot establish an IPMI v2 / RMCP+ session with {} (check user, password \
                     and that the BMC supports cipher suite {})",
                    self.user_at(),
                    self.cipher_suite
                ),
            };
        }
        let detail: Vec<&str> = stderr
            .lines()
            .chain(stdout.lines())
            .map(str::trim)
            .filter(|l| !l.is_empty() && !NOISE.iter().any(|n| l.contains(n)))
            .collect();
        Error::Bmc {
            at,
            message: if detail.is_empty() {
                "ipmitool failed without a message".to_owned()
            } else {
                format!("ipmitool: {}", detail.join("; "))
            },
        }
    }

    fn scrub(&self, text: String) -> String {
        let secret = self.password.expose();
        if secret.len() >= 4 && text.contains(secret) {
            text.replace(secret, "<redacted>")
        } else {
            text
        }
    }

    fn unsupported<T>(&self, op: &str, message: &str) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
    {
        let err = Error::Unsupported {
            at: self.at(op),
            message: message.to_owned(),
        };
        Box::pin(async move { Err(err) })
    }
}

impl Bmc for IpmiBmc {
    fn endpoint(&self) -> String {
        self.user_at()
    }

    fn power_state(&self) -> BoxFuture<'_, Result<PowerState>> {
        Box::pin(async move {
            let out = self
                .run("read power state", &["chassis", "power", "status"])
                .await?;
            Ok(parse_power_status(&out))
        })
    }

    fn power_action(&self, action: PowerAction) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let verb = match action {
                PowerAction::On => "on",
                PowerAction::Off => "off",
                PowerAction::SoftOff => "soft",
                PowerAction::Reboot => "cycle",
                PowerAction::Reset => "reset",
            };
            self.run(&action.to_string(), &["chassis", "power", verb])
                .await
                .map(drop)
        })
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        persistent: bool,
        uefi: Option<bool>,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let dev = match device {
                BootDevice::Pxe => "pxe",
                BootDevice::Cd => "cdrom",
                BootDevice::Hdd => "disk",
                BootDevice::Bios => "bios",
            };
            let mut opts = Vec::new();
            if persistent {
                opts.push("persistent");
            }
            if uefi == Some(true) {
                opts.push("efiboot");
            }
            let opts = format!("options={}", opts.join(","));
            let mut args = vec!["chassis", "bootdev", dev];
            if opts != "options=" {
                args.push(&opts);
            }
            self.run("set boot device", &args).await.map(drop)
        })
    }

    fn boot_override(&self) -> BoxFuture<'_, Result<BootOverride>> {
        Box::pin(async move {
            let out = self
                .run("read boot override", &["chassis", "bootparam", "get", "5"])
                .await?;
            Ok(parse_boot_flags(&out))
        })
    }

    fn virtual_media_insert(&self, _slot: MediaSlot, _image: String) -> BoxFuture<'_, Result<()>> {
        self.unsupported(
            "insert virtual media",
            "IPMI has no standard virtual media; use a Redfish OBM for this node",
        )
    }

    fn virtual_media_eject(&self, _slot: MediaSlot) -> BoxFuture<'_, Result<()>> {
        self.unsupported(
            "eject virtual media",
            "IPMI has no standard virtual media; use a Redfish OBM for this node",
        )
    }

    fn virtual_media_status(&self, _slot: MediaSlot) -> BoxFuture<'_, Result<MediaStatus>> {
        self.unsupported(
            "read virtual media",
            "IPMI has no standard virtual media; use a Redfish OBM for this node",
        )
    }

    fn inventory(&self) -> BoxFuture<'_, Result<Value>> {
        self.unsupported(
            "read inventory",
            "the IPMI driver reads no inventory; use a Redfish OBM for catalogs",
        )
    }

    fn clear_sel(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move {
            let info = self.run("read SEL info", &["sel", "info"]).await?;
            // `sel clear` reserves the SEL and asks the BMC to erase it; it prints "Clearing
            // SEL.  Please allow a few seconds to erase." and does not wait for the erasure.
            self.run("clear SEL", &["sel", "clear"]).await?;
            Ok(parse_sel_entries(&info))
        })
    }

    fn reset_controller_cold(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.run("cold reset", &["mc", "reset", "cold"])
                .await
                .map(drop)
        })
    }
}

/// The `Entries : 3` line of `sel info`.
fn parse_sel_entries(out: &str) -> Option<u64> {
    out.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "Entries")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// `Chassis Power is on` → On.
fn parse_power_status(out: &str) -> PowerState {
    let text = out.trim();
    match text.rsplit(' ').next() {
        Some("on") if text.starts_with("Chassis Power is") => PowerState::On,
        Some("off") if text.starts_with("Chassis Power is") => PowerState::Off,
        _ => PowerState::Unknown(text.to_owned()),
    }
}

/// Reads `chassis bootparam get 5` (boot flags).
fn parse_boot_flags(out: &str) -> BootOverride {
    let mut raw = String::new();
    let mut persistent = None;
    let mut uefi = None;
    for line in out
        .lines()
        .map(|l| l.trim().trim_start_matches("- ").trim())
    {
        if let Some(sel) = line.strip_prefix("Boot Device Selector :") {
            raw = sel.trim().to_owned();
        } else if line.contains("Options apply to all future boots") {
            persistent = Some(true);
        } else if line.contains("Options apply to only next boot") {
            persistent = Some(false);
        } else if line.starts_with("BIOS EFI boot") {
            uefi = Some(true);
        } else if line.starts_with("BIOS PC Compatible (legacy) boot") {
            uefi = Some(false);
        }
    }
    let lower = raw.to_ascii_lowercase();
    let device = if lower.contains("pxe") {
        Some(BootDevice::Pxe)
    } else if lower.contains("cd/dvd") {
        Some(BootDevice::Cd)
    } else if lower.contains("hard-drive") || lower.contains("hard drive") {
        Some(BootDevice::Hdd)
    } else if lower.contains("bios setup") {
        Some(BootDevice::Bios)
    } else {
        None
    };
    BootOverride {
        device,
        persistent,
        uefi,
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bmc(password: &str) -> IpmiBmc {
        let config = ObmConfig {
            host: "127.0.0.1:6230".to_owned(),
            user: Some("admin".to_owned()),
            password: Some(Secret(password.to_owned())),
            ..ObmConfig::default()
        };
        IpmiBmc::new("n1", &config, &DriverOptions::default(), |_| {
            Arc::new(Semaphore::new(1))
        })
        .unwrap()
    }

    #[test]
    fn the_password_is_in_the_environment_only() {
        let bmc = bmc("s3cret-pw");
        let cmd = bmc.command(&["chassis", "power", "status"]);
        let std = cmd.as_std();
        let args: Vec<String> = std
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a.contains("s3cret-pw")), "{args:?}");
        assert!(args.contains(&"-E".to_owned()), "{args:?}");
        assert!(!args.contains(&"-P".to_owned()), "{args:?}");
        let env: Vec<(String, String)> = std
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        assert!(env.contains(&("IPMI_PASSWORD".to_owned(), "s3cret-pw".to_owned())));
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-I lanplus -H 127.0.0.1 -p 6230 -U admin -E -C 3"),
            "{joined}"
        );
    }

    #[test]
    fn power_status_parses() {
        assert_eq!(parse_power_status("Chassis Power is on\n"), PowerState::On);
        assert_eq!(
            parse_power_status("Chassis Power is off\n"),
            PowerState::Off
        );
        assert!(matches!(parse_power_status("huh"), PowerState::Unknown(_)));
    }

    #[test]
    fn boot_flags_parse() {
        let out = "Boot parameter version: 1\nBoot parameter 5 is valid/unlocked\n\
                   Boot parameter data: 0004000000\n Boot Flags :\n   - Boot Flag Invalid\n   \
                   - Options apply to only next boot\n   - BIOS PC Compatible (legacy) boot \n   \
                   - Boot Device Selector : Force PXE\n   - BIOS verbosity : System Default\n";
        let b = parse_boot_flags(out);
        assert_eq!(b.device, Some(BootDevice::Pxe));
        assert_eq!(b.persistent, Some(false));
        assert_eq!(b.uefi, Some(false));
        assert_eq!(b.raw, "Force PXE");
        let cd = parse_boot_flags("   - Boot Device Selector : Force Boot from CD/DVD\n");
        assert_eq!(cd.device, Some(BootDevice::Cd));
    }

    #[test]
    fn sel_entries_parse() {
        let out = "SEL Information\nVersion          : 1.5 (v1.5, v2 compliant)\n\
                   Entries          : 3\nFree Space       : 15952 bytes \n\
                   Percent Used     : 0%\nOverflow         : false\n";
        assert_eq!(parse_sel_entries(out), Some(3));
        assert_eq!(parse_sel_entries("Entries : none\n"), None);
        assert_eq!(parse_sel_entries(""), None);
    }

    #[test]
    fn wrong_password_is_an_authentication_error() {
        let bmc = bmc("pw");
        let e = bmc.classify(
            bmc.at("read power state"),
            "",
            "> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n",
        );
        assert!(
            e.to_string().contains(
                "IPMI authentication failed for admin@127.0.0.1:6230 (check user and password)"
            ),
            "{e}"
        );
    }
}
