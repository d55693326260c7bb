//! Fixtures for the real peers metalgraph's tests run against: sushy-tools (Redfish),
//! ipmi_sim (IPMI), PostgreSQL (a throwaway cluster per test process), genisoimage's
//! `isoinfo` (reading ISO images back), free ports, child processes killed on drop.
//!
//! Each peer starts on free ports in a fresh temporary directory and is killed when dropped.
//! The peers come from scripts/install-peers.sh. Dev-only: shared by the tasks crate's and
//! the binary's tests, never a dependency of non-test code.

mod postgres;

pub use postgres::{Postgres, postgres, postgres_durable};

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Where scripts/install-peers.sh put the peers.
pub fn peers_dir() -> PathBuf {
    match std::env::var_os("METALGRAPH_PEERS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/metalgraph-peers"),
    }
}

/// The venv's python, or a failure that says how to get it.
pub fn venv_python() -> PathBuf {
    let venv = peers_dir().join("venv");
    let py = venv.join("bin/python");
    assert!(
        py.exists() && venv.join("bin/sushy-emulator").exists(),
        "sushy-tools is not installed at {}; run scripts/install-peers.sh (as root) first",
        venv.display()
    );
    py
}

/// A free TCP port on 127.0.0.1 (bound, then released for the peer to take).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp 127.0.0.1:0")
        .port()
}

/// What `isoinfo -i image ARGS` prints (genisoimage): a reader of ISO 9660 images that
/// shares no code with metalgraph's writer. `-d` describes the volume, `-J`/`-R` with `-f`
/// lists the Joliet/Rock Ridge names, and with `-x /name` prints a file.
pub fn isoinfo(image: &Path, args: &[&str]) -> String {
    let out = Command::new("isoinfo")
        .arg("-i")
        .arg(image)
        .args(args)
        .output()
        .expect("isoinfo runs (genisoimage; run scripts/install-peers.sh)");
    assert!(out.status.success(), "isoinfo {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("isoinfo prints UTF-8 here")
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// A child process, its output in a log file, killed (and reaped) when dropped.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fixed UUID of fake system `i`.
pub fn system_uuid(i: usize) -> String {
    format!("27946b59-9e44-4fa7-8e91-{i:012x}")
}

/// The MAC of fake system `i`.
pub fn system_mac(i: usize) -> String {
    format!("52:54:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
}

/// How a sushy-emulator is started.
#[derive(Debug, Default, Clone)]
pub struct SushyOptions {
    pub systems: usize,
    /// The index of the first system (UUIDs, MACs and names follow it), so that two
    /// emulators serve different systems.
    pub first_system: usize,
    /// Power changes visible at once (the fake driver's random 1-11 s delay patched out).
    pub instant: bool,
    /// The fake driver's delay pinned to this many whole seconds instead of its random
    /// 1-11 s: a change then shows between `n - 1` and `n` seconds after the request
    /// (the driver adds the delay to the current whole second).
    pub delay_secs: Option<u32>,
    /// Basic auth with this user and password (bcrypt htpasswd).
    pub auth: Option<(String, String)>,
    /// HTTPS with a certificate for 127.0.0.1 signed by a private CA (`ca_pem`).
    pub tls: bool,
    /// One virtual media device (the CD drive) instead of sushy's CD and Floppy.
    pub cd_only: bool,
}

/// A running sushy-emulator with the fake driver and its own state and TMPDIR.
pub struct Sushy {
    pub proc: Proc,
    pub base: String,
    pub dir: TempDir,
    auth: Option<(String, String)>,
}

/// Pins the fake driver's random power delay to `DELAY` seconds (0: power changes show
/// on the next GET).
const DELAY_WRAPPER: &str = "\
import sys
from sushy_tools.emulator.resources.systems import fakedriver

class _FixedDelay:
    @staticmethod
    def randint(a, b):
        return DELAY

fakedriver.random = _FixedDelay()
from sushy_tools.emulator.main import main
sys.exit(main())
";

impl Sushy {
    pub async fn start(opts: SushyOptions) -> Sushy {
        let py = venv_python();
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        let port = free_tcp_port();
        let first = opts.first_system;
        let systems: Vec<String> = (first..first + opts.systems.max(1))
            .map(|i| {
                format!(
                    "{{'uuid': '{}', 'name': 'node-{i}', 'power_state': 'Off', \
                     'external_notifier': False, 'nics': [{{'mac': '{}', 'ip': '10.0.0.{i}'}}]}}",
                    system_uuid(i),
                    system_mac(i)
                )
            })
            .collect();
        let mut conf = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_STATE_DIR = '{}'\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [{}]\n",
            dir.path().join("state").display(),
            systems.join(", ")
        );
        if let Some((user, password)) = &opts.auth {
            let out = Command::new(&py)
                .args([
                    "-c",
                    "import bcrypt,sys;print(sys.argv[1]+':'+bcrypt.hashpw(sys.argv[2].encode(),bcrypt.gensalt(4)).decode())",
                    user,
                    password,
                ])
                .output()
                .expect("run python bcrypt");
            assert!(out.status.success(), "bcrypt: {out:?}");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
            conf.push_str(&format!(
                "SUSHY_EMULATOR_AUTH_FILE = '{}'\n",
                htpasswd.display()
            ));
        }
        if opts.cd_only {
            conf.push_str(
                "SUSHY_EMULATOR_VMEDIA_DEVICES = {'Cd': {'Name': 'Virtual CD', \
                 'MediaTypes': ['CD', 'DVD']}}\n",
            );
        }
        if opts.tls {
            let (cert, key) = loopback_certificate(dir.path());
            conf.push_str(&format!(
                "SUSHY_EMULATOR_SSL_CERT = '{}'\nSUSHY_EMULATOR_SSL_KEY = '{}'\n",
                cert.display(),
                key.display()
            ));
        }
        let conf_path = dir.path().join("sushy.conf");
        std::fs::write(&conf_path, conf).expect("write config");
        let delay = if opts.instant {
            Some(0)
        } else {
            opts.delay_secs
        };
        let mut cmd = if let Some(delay) = delay {
            let wrapper = dir.path().join("sushy-delay.py");
            std::fs::write(&wrapper, DELAY_WRAPPER.replace("DELAY", &delay.to_string()))
                .expect("write wrapper");
            let mut c = Command::new(&py);
            c.arg(wrapper);
            c
        } else {
            Command::new(peers_dir().join("venv/bin/sushy-emulator"))
        };
        cmd.arg("--config").arg(&conf_path).env("TMPDIR", &tmp);
        let proc = Proc::spawn(cmd, &dir.path().join("sushy.log"));
        let scheme = if opts.tls { "https" } else { "http" };
        let sushy = Sushy {
            proc,
            base: format!("{scheme}://127.0.0.1:{port}"),
            dir,
            auth: opts.auth,
        };
        sushy.wait_ready().await;
        sushy
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/redfish/v1/Systems", self.base);
        loop {
            // The first Systems GET also seeds sushy's sqlite state, which is slow.
            if let Ok(r) = raw_client().get(&url).send().await
                && (r.status().is_success() || r.status().as_u16() == 401)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sushy-emulator did not come up at {url}; log:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The path of fake system `i`.
    pub fn system_path(&self, i: usize) -> String {
        format!("/redfish/v1/Systems/{}", system_uuid(i))
    }

    /// GETs a document straight from sushy (not through the code under test), with the
    /// configured credentials.
    pub async fn get(&self, path: &str) -> Value {
        let auth = self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        self.get_as(path, auth).await
    }

    /// GETs a document straight from sushy with these credentials, or none.
    pub async fn get_as(&self, path: &str, auth: Option<(&str, &str)>) -> Value {
        let mut req = raw_client().get(format!("{}{path}", self.base));
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.expect("GET from sushy");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.expect("JSON")
    }

    /// The PowerState sushy itself reports for system `i`.
    pub async fn power_state(&self, i: usize) -> String {
        self.get(&self.system_path(i)).await["PowerState"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Sushy's virtual CD drive of system `i`.
    pub async fn cd(&self, i: usize) -> Value {
        self.get(&format!("{}/VirtualMedia/Cd", self.system_path(i)))
            .await
    }

    /// System `i`'s second virtual media device (sushy's `Floppy`, which takes USB stick
    /// images).
    pub async fn floppy(&self, i: usize) -> Value {
        self.get(&format!("{}/VirtualMedia/Floppy", self.system_path(i)))
            .await
    }

    /// Where sushy downloads inserted images (its TMPDIR).
    /// With `tls`: the private CA (PEM) that signed the emulator's certificate.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.pem")).expect("the BMC's CA")
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// Stops the emulator, as a BMC that dies.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A client for reading peers in assertions, accepting self-signed certificates.
pub fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A private CA (written to `ca.pem`: what a client that verifies trusts, an OBM's `caCert`
/// or the database's CA) and a server certificate for 127.0.0.1 it signs, for the BMC
/// emulator and the PostgreSQL cluster: the paths of the certificate and its key.
pub(crate) fn loopback_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("a CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "metalgraph test CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let cert = leaf.signed_by(&key, &issuer).expect("the BMC certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    std::fs::write(&cert_path, cert.pem()).expect("write cert.pem");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key.pem");
    (cert_path, key_path)
}

/// The password of the simulated IPMI BMC's `admin` user.
pub const IPMI_PASSWORD: &str = "ipmi-Passw0rd";

/// ipmi_sim calls this with `get power boot`, `set power 1`, `set boot pxe`, ...; it keeps
/// the chassis state in files, so tests read power and boot device from there.
const CHASSIS_CONTROL: &str = r#"#!/bin/sh
D="$1"; op="$2"; shift 2; mkdir -p "$D"
echo "$op $*" >> "$D/calls.log"
case "$op" in
get) while [ -n "$1" ]; do
       case "$1" in
         power) echo "power:$(cat "$D/power" 2>/dev/null || echo 0)";;
         boot)  echo "boot:$(cat "$D/boot" 2>/dev/null || echo default)";;
         *) echo "invalid parm $1"; exit 1;;
       esac; shift; done;;
set) while [ -n "$1" ]; do
       p="$1"; v="$2"; shift 2
       case "$p" in
         power) echo "$v" > "$D/power";;
         reset) echo 1 > "$D/power";;
         shutdown) echo 0 > "$D/power";;
         boot) echo "$v" > "$D/boot";;
         identify) :;;
         *) echo "invalid parm $p"; exit 1;;
       esac; done;;
check) exit 0;;
*) echo "unknown op $op"; exit 1;;
esac
"#;

/// One simulated IPMI BMC: an `ipmi_sim` process on its own UDP port.
pub struct IpmiSim {
    pub proc: Proc,
    pub port: u16,
    chassis: PathBuf,
    /// Its configuration and state, and files tests hand to ipmitool; removed on drop.
    dir: TempDir,
}

impl IpmiSim {
    pub fn start() -> IpmiSim {
        assert!(
            which("ipmi_sim") && which("ipmitool"),
            "ipmi_sim or ipmitool is missing; run scripts/install-peers.sh (as root) first"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let chassis = d.join("chassis");
        std::fs::create_dir_all(&chassis).unwrap();
        std::fs::create_dir_all(d.join("state")).unwrap();
        let script = d.join("chassiscontrol.sh");
        std::fs::write(&script, CHASSIS_CONTROL).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = free_udp_port();
        let auths = "none md2 md5 straight";
        let lan = format!(
            "name \"bmc0\"\nset_working_mc 0x20\nstartlan 1\n  addr 127.0.0.1 {port}\n  \
             priv_limit admin\n  allowed_auths_callback {auths}\n  allowed_auths_user {auths}\n  \
             allowed_auths_operator {auths}\n  allowed_auths_admin {auths}\n  \
             guid a1234567000000000000000000000000\nendlan\n\
             chassis_control \"{} {}\"\n\
             user 1 true  \"\"      \"\"         user  10 {auths}\n\
             user 2 true  \"admin\" \"{IPMI_PASSWORD}\" admin 10 {auths}\n",
            script.display(),
            chassis.display()
        );
        std::fs::write(d.join("lan.conf"), lan).unwrap();
        std::fs::write(
            d.join("sim.emu"),
            "mc_setbmc 0x20\n\
             mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
             sel_enable 0x20 1000 0x0a\n\
             mc_enable 0x20\n",
        )
        .unwrap();
        let mut cmd = Command::new("ipmi_sim");
        cmd.arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n");
        let proc = Proc::spawn(cmd, &d.join("ipmi_sim.log"));
        let sim = IpmiSim {
            proc,
            port,
            chassis,
            dir,
        };
        sim.wait_ready();
        sim
    }

    /// `ipmitool` aimed at this BMC as `admin`, with `args` as its command.
    fn ipmitool_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ipmitool");
        cmd.args([
            "-I",
            "lanplus",
            "-H",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
        ])
        .args(["-U", "admin", "-E", "-C", "3", "-N", "1", "-R", "1"])
        .args(args)
        .env("IPMI_PASSWORD", IPMI_PASSWORD);
        cmd
    }

    /// Runs `ipmitool` against this BMC (`sel add FILE`, `sel info`, `chassis power
    /// status`, ...) and returns its standard output; panics with its stderr if it fails.
    pub fn ipmitool(&self, args: &[&str]) -> String {
        let out = self.ipmitool_command(args).output().expect("ipmitool runs");
        assert!(
            out.status.success(),
            "ipmitool {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many entries the BMC's System Event Log holds, as `ipmitool sel info` says.
    pub fn sel_entries(&self) -> u64 {
        let info = self.ipmitool(&["sel", "info"]);
        info.lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "Entries").then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no entry count in `sel info`:\n{info}"))
    }

    /// Logs `n` events in the BMC's System Event Log with `ipmitool sel add` (a Power Unit
    /// "power off" event each; ipmi_sim takes no Platform Event messages, so `ipmitool
    /// event` cannot fill it).
    pub fn add_sel_entries(&self, n: usize) {
        let file = self.dir.path().join("sel-events.txt");
        let line = "0x04 0x09 0x01 0x6f 0x00 0xff 0xff # Power Unit #1 power off\n";
        std::fs::write(&file, line.repeat(n)).unwrap();
        self.ipmitool(&["sel", "add", file.to_str().expect("a UTF-8 path")]);
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = self
                .ipmitool_command(&["chassis", "power", "status"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not come up on udp {}; log:\n{}",
                self.port,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The BMC's address for an OBM record: `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The chassis state file (`power`: 1 or 0, `boot`: pxe, cdrom, ...).
    pub fn state(&self, file: &str) -> String {
        std::fs::read_to_string(self.chassis.join(file))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Every chassis-control call so far, one per line (`set power 1`, `get power boot`, ...).
    pub fn calls(&self) -> String {
        self.state("calls.log")
    }
}
