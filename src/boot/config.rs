//! The `[boot]` section of the configuration (DESIGN.md section 7): its fields, the
//! `METALGRAPH_BOOT_*` variables, the `serve` flags of the same names, and the translation
//! into the `pxe` crate's [`PxeOptions`].
//!
//! Network boot is off unless `dhcp` is `proxy` or `full`, or `tftp_listen` is an address.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use metalgraph_pxe::{DhcpMode, FullOptions, PxeOptions};
use serde::{Deserialize, Serialize};

use crate::config::Error;

/// Which DHCP service metalgraph runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DhcpSetting {
    /// No DHCP (the default): another server hands out addresses and boot files.
    #[default]
    Off,
    /// ProxyDHCP beside an existing DHCP server: boot information only (ports 67 and 4011).
    Proxy,
    /// Full DHCP: addresses from `dhcp_pool`, leases kept in the store.
    Full,
}

impl FromStr for DhcpSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(DhcpSetting::Off),
            "proxy" => Ok(DhcpSetting::Proxy),
            "full" => Ok(DhcpSetting::Full),
            other => Err(format!(
                "unknown DHCP mode {other:?} (expected off, proxy or full)"
            )),
        }
    }
}

/// Where TFTP listens (`tftp_listen`): an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TftpListen {
    /// No TFTP, even when DHCP is on: PXE ROMs then need another TFTP server at the boot
    /// address, and UEFI HTTP Boot and iPXE need none.
    Off,
    /// TFTP on this address.
    At(SocketAddr),
}

impl FromStr for TftpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" => Ok(TftpListen::Off),
            other => other
                .parse()
                .map(TftpListen::At)
                .map_err(|_| format!("{other:?} is neither an address (10.0.0.1:69) nor off")),
        }
    }
}

impl TryFrom<String> for TftpListen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TftpListen> for String {
    fn from(t: TftpListen) -> String {
        match t {
            TftpListen::Off => "off".to_owned(),
            TftpListen::At(addr) => addr.to_string(),
        }
    }
}

/// The `[boot]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BootConfig {
    /// `off`, `proxy` or `full` (`METALGRAPH_BOOT_DHCP`, `--dhcp`).
    pub dhcp: DhcpSetting,
    /// The interface DHCP serves, e.g. `eth1` (`METALGRAPH_BOOT_DHCP_INTERFACE`,
    /// `--dhcp-interface`). Strongly recommended: without it DHCP answers on every interface.
    pub dhcp_interface: Option<String>,
    /// Full mode's dynamic pool, `FIRST-LAST` inclusive, e.g. `10.0.0.100-10.0.0.199`
    /// (`METALGRAPH_BOOT_DHCP_POOL`, `--dhcp-pool`).
    pub dhcp_pool: Option<String>,
    /// Full mode's subnet mask (option 1; `METALGRAPH_BOOT_DHCP_NETMASK`, `--dhcp-netmask`).
    pub dhcp_netmask: Ipv4Addr,
    /// Full mode's router (option 3), if the network has one (`METALGRAPH_BOOT_DHCP_ROUTER`,
    /// `--dhcp-router`).
    pub dhcp_router: Option<Ipv4Addr>,
    /// Full mode's DNS servers (option 6), comma-separated in the environment and flag
    /// (`METALGRAPH_BOOT_DHCP_DNS`, `--dhcp-dns`).
    pub dhcp_dns: Vec<Ipv4Addr>,
    /// The address DHCP listens on; `0.0.0.0` (the default) receives broadcasts
    /// (`METALGRAPH_BOOT_DHCP_LISTEN`, `--dhcp-listen`).
    pub dhcp_listen: Ipv4Addr,
    /// The address nodes reach metalgraph at, on the served network: next-server, DHCP
    /// server identifier, and the host of profile URLs when the node-facing API listens on
    /// every address (`METALGRAPH_BOOT_ADDRESS`, `--boot-address`). Required when DHCP is on.
    pub boot_address: Option<Ipv4Addr>,
    /// Where TFTP listens, or `off` (`METALGRAPH_BOOT_TFTP_LISTEN`, `--tftp-listen`);
    /// unset, `BOOT_ADDRESS:69` when DHCP is on and off otherwise. UEFI HTTP Boot and iPXE
    /// need no TFTP.
    pub tftp_listen: Option<TftpListen>,
    /// The boot files directory, served read-only by TFTP and on the node-facing listener
    /// under `/boot/` while network boot is on: where `undionly.kpxe`, `snponly.efi` and
    /// `ipxe.efi` live (`METALGRAPH_BOOT_TFTP_ROOT`, `--tftp-root`; Debian's `ipxe` package
    /// installs them in `/usr/lib/ipxe`).
    pub tftp_root: PathBuf,
    /// TFTP transfers served at once, each on a thread of its own
    /// (`METALGRAPH_BOOT_TFTP_MAX_TRANSFERS`, `--tftp-max-transfers`); 1 to
    /// [`MAX_TFTP_TRANSFERS`]. A request beyond it is dropped, and the client retries.
    pub tftp_max_transfers: usize,
    /// The graph an unknown machine runs when it first asks for a profile
    /// (`METALGRAPH_BOOT_DISCOVERY_GRAPH`, `--discovery-graph`).
    pub discovery_graph: String,
    /// Whether an unknown machine that asks for a profile becomes a node
    /// (`METALGRAPH_BOOT_ENROLMENT`, `--enrolment true|false`). Unset (the default): on
    /// when metalgraph runs DHCP (proxy or full), off otherwise. Off, an unknown machine is
    /// told to boot from its disk and nothing is created.
    pub enrolment: Option<bool>,
    /// How many machines may be enrolled per minute, on average
    /// (`METALGRAPH_BOOT_ENROLMENT_RATE`, `--enrolment-rate`); at least 1.
    pub enrolment_rate: u32,
    /// How many machines may be enrolled at once before the rate applies
    /// (`METALGRAPH_BOOT_ENROLMENT_BURST`, `--enrolment-burst`); at least 1.
    pub enrolment_burst: u32,
    /// Who is shown a node's callback token on the node-facing listener
    /// (`METALGRAPH_BOOT_NODE_TOKENS`, `--node-tokens`): `proven` (the default), only a
    /// request that proves it is the node (its capability, or full DHCP's leased address);
    /// `open`, any request (for installers booted from virtual media without metalgraph's
    /// DHCP, which have no way to prove it; anyone who reaches the listener can then
    /// complete a waiting install). `open` is logged as a warning on every start.
    pub node_tokens: NodeTokens,
}

/// Who is shown a node's callback token (`[boot] node_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NodeTokens {
    /// Only a request that proves it is the node.
    #[default]
    Proven,
    /// Any request to the node-facing listener.
    Open,
}

impl std::str::FromStr for NodeTokens {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "proven" => Ok(NodeTokens::Proven),
            "open" => Ok(NodeTokens::Open),
            other => Err(format!("unknown value {other:?} (expected proven or open)")),
        }
    }
}

/// The default of `enrolment_rate`: machines enrolled per minute.
pub const DEFAULT_ENROLMENT_RATE: u32 = 20;
/// The default of `tftp_max_transfers`: a rack of machines booting at once. 64 was below a
/// rack of 200, whose requests beyond it each waited for a retransmission (BENCHMARKS.md,
/// "Rack power-on"). A transfer holds at most a 128 KiB read-ahead buffer, a thread of the
/// blocking pool (512 threads) and two descriptors, so 256 cost about 40 MiB (measured:
/// 145 KiB each) and leave half the pool to the engine (docs/network-boot.md).
pub const DEFAULT_TFTP_TRANSFERS: usize = 256;
/// The most `tftp_max_transfers` may be (each transfer holds a thread while it runs).
pub const MAX_TFTP_TRANSFERS: usize = 1024;

/// The default of `enrolment_burst`.
pub const DEFAULT_ENROLMENT_BURST: u32 = 50;

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            dhcp: DhcpSetting::Off,
            dhcp_interface: None,
            dhcp_pool: None,
            dhcp_netmask: Ipv4Addr::new(255, 255, 255, 0),
            dhcp_router: None,
            dhcp_dns: Vec::new(),
            dhcp_listen: Ipv4Addr::UNSPECIFIED,
            boot_address: None,
            tftp_listen: None,
            tftp_root: PathBuf::from("/usr/lib/ipxe"),
            tftp_max_transfers: DEFAULT_TFTP_TRANSFERS,
            discovery_graph: super::DEFAULT_DISCOVERY_GRAPH.to_owned(),
            enrolment: None,
            enrolment_rate: DEFAULT_ENROLMENT_RATE,
            enrolment_burst: DEFAULT_ENROLMENT_BURST,
            node_tokens: NodeTokens::Proven,
        }
    }
}

/// The `serve` flags of the `[boot]` section; each one given overrides every other layer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BootArgs {
    /// DHCP for network boot: off, proxy (beside another DHCP server) or full.
    #[arg(long, value_enum, value_name = "MODE")]
    pub dhcp: Option<DhcpSetting>,
    /// The interface DHCP serves.
    #[arg(long, value_name = "IF")]
    pub dhcp_interface: Option<String>,
    /// Full DHCP's address pool, FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST")]
    pub dhcp_pool: Option<String>,
    /// Full DHCP's subnet mask (default 255.255.255.0).
    #[arg(long, value_name = "MASK")]
    pub dhcp_netmask: Option<Ipv4Addr>,
    /// Full DHCP's router option.
    #[arg(long, value_name = "IP")]
    pub dhcp_router: Option<Ipv4Addr>,
    /// Full DHCP's DNS servers, comma-separated.
    #[arg(long, value_name = "IP,...", value_delimiter = ',')]
    pub dhcp_dns: Option<Vec<Ipv4Addr>>,
    /// The address DHCP listens on (default 0.0.0.0).
    #[arg(long, value_name = "IP")]
    pub dhcp_listen: Option<Ipv4Addr>,
    /// The address nodes reach metalgraph at (next-server, profile URLs).
    #[arg(long, value_name = "IP")]
    pub boot_address: Option<Ipv4Addr>,
    /// Where TFTP listens, or off (default BOOT_ADDRESS:69 when DHCP is on).
    #[arg(long, value_name = "ADDR|off")]
    pub tftp_listen: Option<TftpListen>,
    /// The boot files directory TFTP and /boot/ serve (default /usr/lib/ipxe).
    #[arg(long, value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// TFTP transfers served at once (default 256, at most 1024).
    #[arg(long, value_name = "N")]
    pub tftp_max_transfers: Option<usize>,
    /// The graph unknown machines run (default Graph.Discovery.Pxe).
    #[arg(long, value_name = "NAME")]
    pub discovery_graph: Option<String>,
    /// Whether unknown machines that ask for a profile become nodes (default: true when
    /// DHCP is proxy or full, false otherwise).
    #[arg(long, value_name = "BOOL")]
    pub enrolment: Option<bool>,
    /// Machines enrolled per minute, on average (default 20).
    #[arg(long, value_name = "N")]
    pub enrolment_rate: Option<u32>,
    /// Machines enrolled at once before the rate applies (default 50).
    #[arg(long, value_name = "N")]
    pub enrolment_burst: Option<u32>,
    /// Who is shown a node's callback token: proven (the default: only the node itself) or
    /// open (anyone who reaches the node-facing listener; not recommended).
    #[arg(long, value_enum)]
    pub node_tokens: Option<NodeTokens>,
}

fn env_err(var: &str, value: &str, message: impl std::fmt::Display) -> Error {
    Error::Env {
        var: var.to_owned(),
        value: value.to_owned(),
        message: message.to_string(),
    }
}

fn parse<T: FromStr>(var: &str, value: &str) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| env_err(var, value, e))
}

/// `""` and `off` mean none.
fn parse_optional<T: FromStr>(var: &str, value: &str) -> Result<Option<T>, Error>
where
    T::Err: std::fmt::Display,
{
    match value.trim() {
        "" | "off" => Ok(None),
        _ => parse(var, value).map(Some),
    }
}

impl BootConfig {
    /// Applies the `METALGRAPH_BOOT_*` variables (`boot_address` reads
    /// `METALGRAPH_BOOT_ADDRESS`).
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        let var = |name: &str| {
            let var = format!("METALGRAPH_BOOT_{name}");
            env(&var).map(|value| (var, value))
        };
        if let Some((v, s)) = var("DHCP") {
            self.dhcp = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("DHCP_INTERFACE") {
            self.dhcp_interface = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("DHCP_POOL") {
            self.dhcp_pool = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("DHCP_NETMASK") {
            self.dhcp_netmask = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("DHCP_ROUTER") {
            self.dhcp_router = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("DHCP_DNS") {
            self.dhcp_dns = s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| parse(&v, p))
                .collect::<Result<_, _>>()?;
        }
        if let Some((v, s)) = var("DHCP_LISTEN") {
            self.dhcp_listen = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("ADDRESS") {
            self.boot_address = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("TFTP_LISTEN") {
            // `off` is a value of its own here (TFTP off even with DHCP), so only "" unsets.
            self.tftp_listen = match s.trim() {
                "" => None,
                _ => Some(parse(&v, &s)?),
            };
        }
        if let Some((_, s)) = var("TFTP_ROOT") {
            self.tftp_root = PathBuf::from(s.trim());
        }
        if let Some((v, s)) = var("TFTP_MAX_TRANSFERS") {
            self.tftp_max_transfers = parse(&v, &s)?;
        }
        if let Some((_, s)) = var("DISCOVERY_GRAPH") {
            self.discovery_graph = s.trim().to_owned();
        }
        if let Some((v, s)) = var("ENROLMENT") {
            self.enrolment = match s.trim() {
                "" => None,
                _ => Some(parse(&v, &s)?),
            };
        }
        if let Some((v, s)) = var("ENROLMENT_RATE") {
            self.enrolment_rate = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("ENROLMENT_BURST") {
            self.enrolment_burst = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("NODE_TOKENS") {
            self.node_tokens = parse(&v, &s)?;
        }
        Ok(())
    }

    /// Applies the flags that were given.
    pub fn apply_flags(&mut self, flags: &BootArgs) {
        if let Some(d) = flags.dhcp {
            self.dhcp = d;
        }
        if let Some(i) = &flags.dhcp_interface {
            self.dhcp_interface = Some(i.clone());
        }
        if let Some(p) = &flags.dhcp_pool {
            self.dhcp_pool = Some(p.clone());
        }
        if let Some(m) = flags.dhcp_netmask {
            self.dhcp_netmask = m;
        }
        if let Some(r) = flags.dhcp_router {
            self.dhcp_router = Some(r);
        }
        if let Some(d) = &flags.dhcp_dns {
            self.dhcp_dns = d.clone();
        }
        if let Some(l) = flags.dhcp_listen {
            self.dhcp_listen = l;
        }
        if let Some(a) = flags.boot_address {
            self.boot_address = Some(a);
        }
        if let Some(a) = flags.tftp_listen {
            self.tftp_listen = Some(a);
        }
        if let Some(r) = &flags.tftp_root {
            self.tftp_root = r.clone();
        }
        if let Some(n) = flags.tftp_max_transfers {
            self.tftp_max_transfers = n;
        }
        if let Some(g) = &flags.discovery_graph {
            self.discovery_graph = g.clone();
        }
        if let Some(e) = flags.enrolment {
            self.enrolment = Some(e);
        }
        if let Some(r) = flags.enrolment_rate {
            self.enrolment_rate = r;
        }
        if let Some(b) = flags.enrolment_burst {
            self.enrolment_burst = b;
        }
        if let Some(t) = flags.node_tokens {
            self.node_tokens = t;
        }
    }

    /// Whether unknown machines are enrolled: `enrolment` when set, else whether metalgraph
    /// runs DHCP (an operator who points metalgraph's DHCP at a network expects its
    /// machines to be discovered; one who does not has not asked for it).
    pub fn enrolment_on(&self) -> bool {
        self.enrolment.unwrap_or(self.dhcp != DhcpSetting::Off)
    }

    /// Whether any network-boot service (DHCP or TFTP) runs.
    pub fn enabled(&self) -> bool {
        self.dhcp != DhcpSetting::Off || matches!(self.tftp_listen, Some(TftpListen::At(_)))
    }

    /// Where TFTP listens, if it runs: `tftp_listen`, or unset `BOOT_ADDRESS:69` when DHCP
    /// is on.
    pub fn tftp_addr(&self) -> Option<SocketAddr> {
        match self.tftp_listen {
            Some(TftpListen::Off) => None,
            Some(TftpListen::At(addr)) => Some(addr),
            None => (self.dhcp != DhcpSetting::Off).then(|| {
                SocketAddr::from((self.boot_address.unwrap_or(Ipv4Addr::UNSPECIFIED), 69))
            }),
        }
    }

    /// Checks what no type can express, naming the field at fault.
    pub fn check(&self) -> Result<(), Error> {
        let field = |field: &'static str, message: String| Error::Field { field, message };
        if self.discovery_graph.trim().is_empty() {
            return Err(field(
                "boot.discovery_graph",
                "must name a graph".to_owned(),
            ));
        }
        if !(1..=MAX_TFTP_TRANSFERS).contains(&self.tftp_max_transfers) {
            return Err(field(
                "boot.tftp_max_transfers",
                format!(
                    "must be 1 to {MAX_TFTP_TRANSFERS}, got {}",
                    self.tftp_max_transfers
                ),
            ));
        }
        if self.enrolment_rate == 0 {
            return Err(field(
                "boot.enrolment_rate",
                "must be at least 1 per minute (set enrolment = false to enrol no machine)"
                    .to_owned(),
            ));
        }
        if self.enrolment_burst == 0 {
            return Err(field(
                "boot.enrolment_burst",
                "must be at least 1 (set enrolment = false to enrol no machine)".to_owned(),
            ));
        }
        if self.dhcp != DhcpSetting::Off && self.boot_address.is_none() {
            return Err(field(
                "boot.boot_address",
                "is required when DHCP is on: it is the next-server and server identifier nodes see"
                    .to_owned(),
            ));
        }
        match (self.dhcp, &self.dhcp_pool) {
            (DhcpSetting::Full, None) => {
                return Err(field(
                    "boot.dhcp_pool",
                    "is required in full DHCP mode (FIRST-LAST)".to_owned(),
                ));
            }
            (_, Some(_)) => {
                self.pool().map_err(|m| field("boot.dhcp_pool", m))?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The pool's first and last address.
    fn pool(&self) -> Result<(Ipv4Addr, Ipv4Addr), String> {
        let pool = self.dhcp_pool.as_deref().unwrap_or_default();
        let bad = || format!("{pool:?} is not FIRST-LAST (for example 10.0.0.100-10.0.0.199)");
        let (a, b) = pool.split_once('-').ok_or_else(bad)?;
        let first: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let last: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if u32::from(first) > u32::from(last) {
            return Err(format!("{pool:?}: the first address is after the last"));
        }
        Ok((first, last))
    }

    /// The `pxe` crate's options, or `None` when network boot is off. Call after `check`.
    pub fn pxe_options(&self) -> Result<Option<PxeOptions>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        let dhcp = match self.dhcp {
            DhcpSetting::Off => DhcpMode::Off,
            DhcpSetting::Proxy => DhcpMode::Proxy,
            DhcpSetting::Full => {
                let (first, last) = self.pool()?;
                let mut full = FullOptions::new(first, last);
                full.subnet_mask = self.dhcp_netmask;
                full.router = self.dhcp_router;
                full.dns = self.dhcp_dns.clone();
                DhcpMode::Full(full)
            }
        };
        let boot_address = self.boot_address.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mut options = PxeOptions::new(dhcp, boot_address);
        options.interface = self.dhcp_interface.clone();
        options.dhcp_listen = self.dhcp_listen;
        options.tftp = self.tftp_addr().map(|addr| {
            let mut tftp = metalgraph_pxe::tftp::Options::new(addr, self.tftp_root.clone());
            tftp.max_transfers = self.tftp_max_transfers;
            tftp
        });
        Ok(Some(options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn off_by_default() {
        let c = BootConfig::default();
        assert!(!c.enabled());
        assert!(c.check().is_ok());
        assert!(c.pxe_options().unwrap().is_none());
    }

    #[test]
    fn layers_apply_and_full_mode_needs_a_pool_and_an_address() {
        let mut c = BootConfig::default();
        c.apply_env(&env_of(&[
            ("METALGRAPH_BOOT_DHCP", "full"),
            ("METALGRAPH_BOOT_DHCP_INTERFACE", "br0"),
            ("METALGRAPH_BOOT_DHCP_DNS", "10.0.0.2, 10.0.0.3"),
        ]))
        .unwrap();
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("boot.boot_address"), "{err}");
        c.apply_flags(&BootArgs {
            boot_address: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..BootArgs::default()
        });
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("boot.dhcp_pool"), "{err}");
        c.apply_flags(&BootArgs {
            dhcp_pool: Some("10.0.0.200-10.0.0.100".into()),
            ..BootArgs::default()
        });
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("after the last"), "{err}");
        c.dhcp_pool = Some("10.0.0.100-10.0.0.199".into());
        c.check().unwrap();
        let o = c.pxe_options().unwrap().unwrap();
        assert_eq!(o.interface.as_deref(), Some("br0"));
        let DhcpMode::Full(full) = &o.dhcp else {
            panic!("{:?}", o.dhcp)
        };
        assert_eq!(full.first, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(full.dns.len(), 2);
        let tftp = o.tftp.expect("TFTP follows DHCP");
        assert_eq!(tftp.listen.to_string(), "10.0.0.1:69");
        assert_eq!(tftp.root, PathBuf::from("/usr/lib/ipxe"));
    }

    #[test]
    fn enrolment_follows_dhcp_unless_set_and_its_rate_is_checked() {
        let mut c = BootConfig::default();
        assert!(!c.enrolment_on(), "no DHCP, no enrolment");
        c.dhcp = DhcpSetting::Proxy;
        assert!(c.enrolment_on());
        c.dhcp = DhcpSetting::Full;
        assert!(c.enrolment_on());
        c.apply_env(&env_of(&[
            ("METALGRAPH_BOOT_ENROLMENT", "false"),
            ("METALGRAPH_BOOT_ENROLMENT_RATE", "5"),
        ]))
        .unwrap();
        assert!(!c.enrolment_on());
        assert_eq!((c.enrolment_rate, c.enrolment_burst), (5, 50));
        c.apply_flags(&BootArgs {
            enrolment: Some(true),
            enrolment_burst: Some(0),
            ..BootArgs::default()
        });
        c.dhcp = DhcpSetting::Off;
        assert!(c.enrolment_on(), "the flag wins over the DHCP default");
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("boot.enrolment_burst"), "{err}");
        let err = c
            .apply_env(&env_of(&[("METALGRAPH_BOOT_ENROLMENT", "sometimes")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("METALGRAPH_BOOT_ENROLMENT"), "{err}");
    }

    #[test]
    fn tftp_transfers_are_bounded_by_the_setting() {
        let mut c = BootConfig {
            tftp_listen: Some("127.0.0.1:6969".parse().unwrap()),
            ..BootConfig::default()
        };
        c.apply_env(&env_of(&[("METALGRAPH_BOOT_TFTP_MAX_TRANSFERS", "200")]))
            .unwrap();
        c.check().unwrap();
        let options = c.pxe_options().unwrap().expect("TFTP is on");
        assert_eq!(options.tftp.unwrap().max_transfers, 200);
        c.apply_flags(&BootArgs {
            tftp_max_transfers: Some(0),
            ..BootArgs::default()
        });
        let err = c.check().unwrap_err().to_string();
        assert!(
            err.contains("boot.tftp_max_transfers") && err.contains("1 to 1024"),
            "{err}"
        );
    }

    #[test]
    fn tftp_can_be_off_while_dhcp_runs() {
        let mut c = BootConfig {
            dhcp: DhcpSetting::Proxy,
            boot_address: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..BootConfig::default()
        };
        let tftp = |c: &BootConfig| c.pxe_options().unwrap().unwrap().tftp.map(|t| t.listen);
        assert_eq!(
            tftp(&c),
            Some("10.0.0.1:69".parse().unwrap()),
            "the default"
        );
        c.apply_env(&env_of(&[("METALGRAPH_BOOT_TFTP_LISTEN", "off")]))
            .unwrap();
        assert_eq!(c.tftp_listen, Some(TftpListen::Off));
        assert!(c.enabled(), "DHCP still runs");
        assert_eq!(tftp(&c), None);
        c.apply_env(&env_of(&[("METALGRAPH_BOOT_TFTP_LISTEN", "")]))
            .unwrap();
        assert_eq!(
            tftp(&c),
            Some("10.0.0.1:69".parse().unwrap()),
            "unset again"
        );
        c.apply_flags(&BootArgs {
            tftp_listen: Some("off".parse().unwrap()),
            ..BootArgs::default()
        });
        assert_eq!(tftp(&c), None);
        // In the file, as a string either way; and TFTP alone, off, is no network boot.
        let file: BootConfig =
            toml::from_str("tftp_listen = \"off\"\ntftp_root = \"/srv/ipxe\"").unwrap();
        assert_eq!(file.tftp_listen, Some(TftpListen::Off));
        assert!(!file.enabled());
        let file: BootConfig = toml::from_str("tftp_listen = \"127.0.0.1:6969\"").unwrap();
        assert_eq!(
            file.tftp_listen,
            Some(TftpListen::At("127.0.0.1:6969".parse().unwrap()))
        );
        assert!(file.enabled());
        let err = c
            .apply_env(&env_of(&[("METALGRAPH_BOOT_TFTP_LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("METALGRAPH_BOOT_TFTP_LISTEN") && err.contains("nor off"),
            "{err}"
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        let mut c = BootConfig::default();
        let err = c
            .apply_env(&env_of(&[("METALGRAPH_BOOT_DHCP", "sometimes")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("METALGRAPH_BOOT_DHCP"), "{err}");
        let err = c
            .apply_env(&env_of(&[("METALGRAPH_BOOT_ADDRESS", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("METALGRAPH_BOOT_ADDRESS"), "{err}");
    }
}
