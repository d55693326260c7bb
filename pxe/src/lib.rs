//! Network boot for metalgraph: DHCP (proxy and full), a read-only TFTP server, and the
//! building blocks of iPXE scripts.
//!
//! **Architecture invariant:** this crate knows neither the engine, nor the tasks, nor the
//! store. Whatever it needs to know about nodes (answer this MAC or stay silent, which
//! profile URL, which reserved address) and wherever leases are kept, it asks a
//! [`BootPlanner`] that the binary implements.
//!
//! Codemap:
//! - `planner.rs`: the `BootPlanner` trait, the data crossing it, and `MemPlanner`.
//! - `dhcp.rs`: the DHCP server and request handler; `dhcp/packet.rs` decodes untrusted
//!   datagrams without panicking and encodes replies; `dhcp/boot.rs` classifies clients
//!   (PXE, UEFI HTTP Boot, iPXE, neither) and picks boot files; `dhcp/pool.rs` is the
//!   lease pool.
//! - `tftp.rs`: the TFTP server, its request parser and its path jail.
//! - `ipxe.rs`: iPXE script building blocks and the profile URL.
//! - `metrics.rs`: DHCP and TFTP counters.
//! - `udp.rs`: the larger receive buffer of the request sockets, which a rack's burst needs.
//!
//! The binary builds a [`PxeService`] from [`PxeOptions`] and runs it with a cancellation
//! token, like every other component.

pub mod dhcp;
pub mod ipxe;
pub mod metrics;
pub mod planner;
pub mod tftp;
mod udp;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use dhcp::{BootFiles, FullOptions, Ports};
pub use planner::{
    BootPlanner, BoxFuture, ClientInfo, Decision, Firmware, Lease, LeaseChange, LeaseStoreError,
    MacAddr, MemPlanner,
};

/// Which DHCP service to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpMode {
    /// No DHCP: another server (or static configuration) provides boot information.
    Off,
    /// ProxyDHCP beside an existing DHCP server: boot information only, on ports 67 and 4011.
    Proxy,
    /// Full DHCP with an address pool and leases.
    Full(FullOptions),
}

/// Settings of the network-boot service (the config file's `[boot]` section).
#[derive(Debug, Clone)]
pub struct PxeOptions {
    /// Off, proxy or full DHCP.
    pub dhcp: DhcpMode,
    /// The interface DHCP serves; recommended whenever DHCP is on.
    pub interface: Option<String>,
    /// The address nodes reach metalgraph at (next-server, server identifier).
    pub boot_address: Ipv4Addr,
    /// The address DHCP listens on; `0.0.0.0` (the default) receives broadcasts.
    pub dhcp_listen: Ipv4Addr,
    /// DHCP ports (standard by default; tests use high ports).
    pub dhcp_ports: Ports,
    /// The iPXE binaries for PXE and UEFI HTTP Boot firmware, whether TFTP serves them to
    /// PXE ROMs, and the URL they are served under over HTTP, if they are.
    pub boot_files: BootFiles,
    /// How long a planner call may take.
    pub planner_timeout: Duration,
    /// The TFTP server, if any.
    pub tftp: Option<tftp::Options>,
}

impl PxeOptions {
    /// Options with DHCP `dhcp` at `boot_address`, no TFTP, and defaults elsewhere.
    pub fn new(dhcp: DhcpMode, boot_address: Ipv4Addr) -> Self {
        PxeOptions {
            dhcp,
            interface: None,
            boot_address,
            dhcp_listen: Ipv4Addr::UNSPECIFIED,
            dhcp_ports: Ports::default(),
            boot_files: BootFiles::default(),
            planner_timeout: Duration::from_secs(2),
            tftp: None,
        }
    }
}

/// Why the network-boot service could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// DHCP could not start.
    #[error(transparent)]
    Dhcp(#[from] dhcp::Error),
    /// TFTP could not start.
    #[error(transparent)]
    Tftp(#[from] tftp::Error),
}

/// The bound network-boot service: DHCP and TFTP, each optional.
pub struct PxeService {
    dhcp: Option<dhcp::Server>,
    tftp: Option<tftp::Server>,
}

impl PxeService {
    /// Binds every configured socket and loads stored leases, so that configuration
    /// errors surface before `run`.
    pub async fn bind(options: PxeOptions, planner: Arc<dyn BootPlanner>) -> Result<Self, Error> {
        let mode = match options.dhcp {
            DhcpMode::Off => None,
            DhcpMode::Proxy => Some(dhcp::Mode::Proxy),
            DhcpMode::Full(full) => Some(dhcp::Mode::Full(full)),
        };
        let dhcp = match mode {
            None => None,
            Some(mode) => {
                let mut o = dhcp::Options::new(mode, options.boot_address);
                o.listen = options.dhcp_listen;
                o.interface = options.interface;
                o.ports = options.dhcp_ports;
                o.boot_files = options.boot_files;
                o.planner_timeout = options.planner_timeout;
                Some(dhcp::Server::bind(o, planner).await?)
            }
        };
        let tftp = match options.tftp {
            None => None,
            Some(o) => Some(tftp::Server::bind(o).await?),
        };
        Ok(PxeService { dhcp, tftp })
    }

    /// The DHCP server's address, if DHCP is on.
    pub fn dhcp_addr(&self) -> Option<SocketAddr> {
        self.dhcp.as_ref().and_then(|d| d.local_addr().ok())
    }

    /// The TFTP server's address, if TFTP is on.
    pub fn tftp_addr(&self) -> Option<SocketAddr> {
        self.tftp.as_ref().and_then(|t| t.local_addr().ok())
    }

    /// Serves until `cancel` fires, then returns once every socket task has stopped.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tasks = JoinSet::new();
        if let Some(d) = self.dhcp {
            tasks.spawn(d.run(cancel.clone()));
        }
        if let Some(t) = self.tftp {
            tasks.spawn(t.run(cancel.clone()));
        }
        while tasks.join_next().await.is_some() {}
    }
}
