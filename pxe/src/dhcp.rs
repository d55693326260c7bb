//! The DHCP server, on tokio UDP: proxyDHCP (boot information only, beside another DHCP
//! server; ports 67 and 4011) or full DHCP (addresses from a pool, leases stored through
//! the `BootPlanner`).
//!
//! Full mode stores every lease change before it answers, and stores them together: an
//! exchange that needs one queues it for the lease writer, a task that takes every change
//! queued while the previous write was under way and stores them in one call to the
//! planner (one durable commit), then applies them to the pool and lets each exchange
//! answer. Under load, one commit carries many leases; alone, a lease waits for nothing.
//!
//! It answers only network-boot clients (PXE or UEFI HTTP Boot vendor class, or iPXE by
//! option 175 or user class) and only when the planner says so; everything else is
//! dropped with a log line saying why. Replies go where RFC 2131 §4.1 says: to the relay
//! (giaddr) when there is one, to `ciaddr` when the client has an address, else
//! broadcast. A client without an address that did not ask for broadcast should get a
//! unicast to `yiaddr`/`chaddr`, which needs a raw socket or an ARP entry; we broadcast
//! instead, which every client accepts.

pub mod boot;
pub mod packet;
pub mod pool;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcproto::v4::MessageType;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use boot::BootFiles;
use packet::{ReplyFields, Request, Vendor};
use pool::{Grant, Pool, Timers};

use crate::planner::{BootPlanner, ClientInfo, Decision, Firmware, LeaseChange, MacAddr};

/// Why the DHCP server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listening socket could not be set up.
    #[error("DHCP cannot listen on {addr}{}: {source}", interface.as_deref().map(|i| format!(" (interface {i})")).unwrap_or_default())]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The interface it was bound to, if any.
        interface: Option<String>,
        /// The cause.
        source: std::io::Error,
    },
    /// Stored leases could not be loaded, so full mode would risk duplicate addresses.
    #[error("DHCP cannot load stored leases: {0}")]
    LoadLeases(String),
}

/// The UDP ports the server uses; tests use high ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Where requests arrive (67).
    pub server: u16,
    /// Where clients listen (68).
    pub client: u16,
    /// ProxyDHCP's PXE boot-server port (4011); proxy mode only.
    pub proxy: u16,
    /// Where relays listen for replies (67; perfdhcp-style test relays use another port).
    pub relay: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            server: 67,
            client: 68,
            proxy: 4011,
            relay: 67,
        }
    }
}

/// Settings of full DHCP mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullOptions {
    /// First address of the dynamic pool.
    pub first: Ipv4Addr,
    /// Last address of the dynamic pool (inclusive).
    pub last: Ipv4Addr,
    /// Option 1.
    pub subnet_mask: Ipv4Addr,
    /// Option 3, if the network has a router.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Lease, offer and decline durations.
    pub timers: Timers,
}

impl FullOptions {
    /// A pool `first..=last` in a /24, with default timers and no router or DNS.
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Self {
        FullOptions {
            first,
            last,
            subnet_mask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: Vec::new(),
            timers: Timers::default(),
        }
    }
}

/// Proxy or full DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// ProxyDHCP: boot information only; another server hands out addresses.
    Proxy,
    /// Full DHCP with an address pool.
    Full(FullOptions),
}

/// Everything the DHCP server needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    /// Proxy or full.
    pub mode: Mode,
    /// The address nodes reach metalgraph at: server identifier (option 54), next-server
    /// (`siaddr`) and TFTP server name (option 66). It must be this host's address on the
    /// served network.
    pub boot_address: Ipv4Addr,
    /// The address to listen on; `0.0.0.0` to receive broadcasts.
    pub listen: Ipv4Addr,
    /// The interface to serve (SO_BINDTODEVICE); needed to send broadcasts on a host
    /// with several interfaces, and to keep DHCP off every other one.
    pub interface: Option<String>,
    /// Ports.
    pub ports: Ports,
    /// The iPXE binaries for PXE and UEFI HTTP Boot firmware, and how it reaches them.
    pub boot_files: BootFiles,
    /// How long a planner call may take before it counts as "stay silent" (or, for
    /// lease storage, as a failure).
    pub planner_timeout: Duration,
    /// Requests handled at once; more are dropped (clients retry).
    pub max_in_flight: usize,
}

impl Options {
    /// Defaults for `mode` at `boot_address`: all addresses, standard ports.
    pub fn new(mode: Mode, boot_address: Ipv4Addr) -> Self {
        Options {
            mode,
            boot_address,
            listen: Ipv4Addr::UNSPECIFIED,
            interface: None,
            ports: Ports::default(),
            boot_files: BootFiles::default(),
            planner_timeout: Duration::from_secs(2),
            max_in_flight: 256,
        }
    }
}

/// A reply and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Destination.
    pub to: SocketAddr,
    /// Encoded DHCP message.
    pub bytes: Vec<u8>,
}

/// The socket a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The DHCP server port (67).
    Server,
    /// The proxyDHCP boot-server port (4011).
    Proxy,
}

/// The request handler: everything except the sockets, so tests can drive it directly.
pub struct Handler {
    options: Options,
    planner: Arc<dyn BootPlanner>,
    /// Full mode's pool and lease writer.
    leases: Option<Leases>,
}

/// A lease change on its way to storage, and what the pool does once it is stored (or not).
enum Change {
    /// A lease `Pool::ack` computed: commit or abandon it.
    Grant(Grant),
    /// A RELEASE of the lease on `ip`.
    Release { mac: MacAddr, ip: Ipv4Addr },
    /// A DECLINE of the leased `ip`, at `now`.
    Decline {
        mac: MacAddr,
        ip: Ipv4Addr,
        now: u64,
    },
}

impl Change {
    /// What the planner stores for this change, in order.
    fn writes(&self, out: &mut Vec<LeaseChange>) {
        match self {
            Change::Grant(g) => {
                out.extend(g.evicts.map(LeaseChange::Delete));
                out.push(LeaseChange::Save(g.lease.clone()));
            }
            Change::Release { mac, .. } | Change::Decline { mac, .. } => {
                out.push(LeaseChange::Delete(*mac));
            }
        }
    }

    /// Applies the change to the pool once stored (`stored`), or undoes what was held for
    /// it; either way the client is no longer busy.
    fn apply(&self, pool: &mut Pool, stored: bool) {
        match (self, stored) {
            (Change::Grant(g), true) => pool.commit(g),
            (Change::Grant(g), false) => pool.abandon(g),
            (Change::Release { mac, ip }, _) => {
                if stored {
                    pool.release(mac, *ip);
                }
                pool.end(mac);
            }
            (Change::Decline { mac, ip, now }, _) => {
                if stored {
                    pool.decline(mac, *ip, *now);
                }
                pool.end(mac);
            }
        }
    }
}

/// A queued change and the exchange waiting for it to be stored.
struct Job {
    change: Change,
    stored: oneshot::Sender<Result<(), String>>,
}

/// What full mode does with a DISCOVER or REQUEST once the pool has seen it.
enum PoolStep {
    /// Answer now with these fields (an OFFER or a NAK), or stay silent.
    Answer(Option<ReplyFields>),
    /// Acknowledge `ip` once the grant queued for the lease writer is stored.
    Store {
        stored: oneshot::Receiver<Result<(), String>>,
        ip: Ipv4Addr,
        /// The client whose expired lease on `ip` the grant replaces.
        evicted: Option<MacAddr>,
    },
}

/// Full mode's state: the pool, and the queue to the lease writer.
///
/// A change is queued while the pool's lock is held, right after the pool checked it and
/// marked its client busy, so the writer stores changes in the order the pool saw them.
struct Leases {
    pool: Arc<Mutex<Pool>>,
    /// The boot decisions behind recent OFFERs (see [`Offered`]).
    offered: Mutex<Offered>,
    queue: mpsc::UnboundedSender<Job>,
    /// The lease writer; it ends when the queue closes with the handler, and is aborted
    /// then in case it is still waiting on the planner.
    writer: JoinHandle<()>,
}

impl Drop for Leases {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The pool is only changed by short, non-panicking methods; a poisoned lock means a
        // panic elsewhere in the same critical section, which the pool survives.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `change` (call it with the pool locked) and returns what to wait on.
    fn queue(&self, change: Change) -> oneshot::Receiver<Result<(), String>> {
        let (stored, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.queue.send(Job { change, stored }) {
            // Only after the writer ended, which happens when the handler is dropped.
            let _ = job
                .stored
                .send(Err("the lease writer has stopped".to_owned()));
        }
        rx
    }
}

/// The planner's decisions behind the OFFERs of the last `offer_secs`, by client: the
/// REQUEST that answers an OFFER (same client, same transaction id) is acknowledged with the
/// OFFER's decision rather than asking the planner again, so that the ACK says what the
/// OFFER said and a DORA costs one planner lookup.
#[derive(Default)]
struct Offered {
    by_mac: HashMap<MacAddr, OfferedDecision>,
    /// When `by_mac` reaches this size, expired entries are dropped.
    purge_at: usize,
}

struct OfferedDecision {
    xid: u32,
    profile_url: String,
    reserved: Option<Ipv4Addr>,
    until: u64,
}

/// Entries [`Offered`] keeps before dropping expired ones; doubles with the live ones.
const OFFERED_BEFORE_PURGE: usize = 1024;

impl Offered {
    fn remember(&mut self, mac: MacAddr, decision: OfferedDecision, now: u64) {
        if self.by_mac.len() >= self.purge_at.max(OFFERED_BEFORE_PURGE) {
            self.by_mac.retain(|_, d| d.until > now);
            self.purge_at = self.by_mac.len() * 2;
        }
        self.by_mac.insert(mac, decision);
    }

    /// The decision behind the OFFER to `mac` in transaction `xid`, if it is still valid;
    /// it is used once.
    fn take(&mut self, mac: &MacAddr, xid: u32, now: u64) -> Option<(String, Option<Ipv4Addr>)> {
        let d = self.by_mac.remove(mac)?;
        (d.xid == xid && d.until > now).then_some((d.profile_url, d.reserved))
    }
}

/// Waits for a queued change to be stored.
async fn stored(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), String> {
    rx.await
        .unwrap_or_else(|_| Err("the lease writer has stopped".to_owned()))
}

/// The lease writer: stores every change queued since its last write in one call to the
/// planner, bounded by `timeout`, applies them to the pool in queue order, then tells
/// each waiting exchange the outcome.
async fn write_leases(
    mut queue: mpsc::UnboundedReceiver<Job>,
    planner: Arc<dyn BootPlanner>,
    pool: Arc<Mutex<Pool>>,
    timeout: Duration,
) {
    let mut jobs = Vec::new();
    let mut writes = Vec::new();
    while queue.recv_many(&mut jobs, usize::MAX).await > 0 {
        writes.clear();
        for job in &jobs {
            job.change.writes(&mut writes);
        }
        let result = match tokio::time::timeout(timeout, planner.store_leases(&writes)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the planner did not store {} lease changes within {timeout:?}",
                writes.len()
            )),
        };
        crate::metrics::dhcp_lease_write(jobs.len());
        {
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            for job in &jobs {
                job.change.apply(&mut pool, result.is_ok());
            }
        }
        for job in jobs.drain(..) {
            let _ = job.stored.send(result.clone());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Handler {
    /// A handler; in full mode it loads the stored leases first and starts the lease
    /// writer (so it must be called within a tokio runtime).
    pub async fn new(options: Options, planner: Arc<dyn BootPlanner>) -> Result<Self, Error> {
        let leases = match &options.mode {
            Mode::Proxy => None,
            Mode::Full(full) => {
                let mut pool = Pool::new(full.first, full.last, full.timers);
                let leases = tokio::time::timeout(options.planner_timeout, planner.load_leases())
                    .await
                    .map_err(|_| Error::LoadLeases("the planner timed out".to_owned()))?
                    .map_err(|e| Error::LoadLeases(e.to_string()))?;
                info!(count = leases.len(), "loaded stored DHCP leases");
                pool.restore(leases);
                let pool = Arc::new(Mutex::new(pool));
                let (queue, rx) = mpsc::unbounded_channel();
                let writer = tokio::spawn(write_leases(
                    rx,
                    planner.clone(),
                    pool.clone(),
                    options.planner_timeout,
                ));
                Some(Leases {
                    pool,
                    offered: Mutex::default(),
                    queue,
                    writer,
                })
            }
        };
        Ok(Handler {
            options,
            planner,
            leases,
        })
    }

    /// Handles one datagram from `src` that arrived on `port`, at wall-clock `now` (Unix
    /// seconds). Returns the reply to send, if any. Never panics.
    pub async fn handle(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        port: Port,
        now: u64,
    ) -> Option<Reply> {
        let req = match packet::parse(bytes) {
            Ok(req) => req,
            Err(e) => {
                debug!(%src, len = bytes.len(), error = %e, "dropped malformed DHCP packet");
                crate::metrics::dhcp_malformed();
                return None;
            }
        };
        crate::metrics::dhcp_request(req.msg_type);
        let mac = req.mac;
        let xid = req.msg.xid();
        let msg_type = req.msg_type;
        // RELEASE and DECLINE come from clients that already hold our lease; they need no
        // boot decision, and some clients omit the vendor class in them.
        match (&self.leases, msg_type, port) {
            (Some(leases), MessageType::Release, Port::Server) => {
                self.release(leases, &req).await;
                return None;
            }
            (Some(leases), MessageType::Decline, Port::Server) => {
                self.decline(leases, &req, now).await;
                return None;
            }
            _ => {}
        }
        let wanted = matches!(
            (&self.options.mode, msg_type, port),
            (Mode::Proxy, MessageType::Discover, Port::Server)
                | (Mode::Proxy, MessageType::Request, Port::Proxy)
                | (
                    Mode::Full(_),
                    MessageType::Discover | MessageType::Request,
                    Port::Server
                )
        );
        if !wanted {
            debug!(%mac, xid, ?msg_type, ?port, "ignored DHCP message this mode does not answer");
            return None;
        }
        let client = match boot::classify(&req) {
            Ok(c) => c,
            Err(boot::Unclassified::NotBoot) => {
                debug!(%mac, xid, ?msg_type, reason = %boot::Unclassified::NotBoot, "silent");
                return None;
            }
            Err(boot::Unclassified::Malformed(reason)) => {
                info!(%mac, xid, ?msg_type, reason, "silent");
                return None;
            }
        };
        let offered = match (&self.leases, msg_type) {
            (Some(leases), MessageType::Request) => leases
                .offered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(&mac, xid, now),
            _ => None,
        };
        let decision = match offered {
            Some((profile_url, reserved)) => Decision::Answer {
                profile_url,
                reserved,
            },
            None => self.decide(&client).await,
        };
        let (profile_url, reserved) = match decision {
            Decision::Answer {
                profile_url,
                reserved,
            } => (profile_url, reserved),
            Decision::Silent { reason } => {
                info!(%mac, xid, ?msg_type, firmware = ?client.firmware, reason, "silent: the planner says so");
                return None;
            }
        };
        let boot_file = match boot::boot_file(&client, &self.options.boot_files, &profile_url) {
            Ok(f) => f,
            Err(reason) => {
                info!(%mac, xid, ?msg_type, arch = ?client.arch, reason, "silent");
                return None;
            }
        };
        let fields = match &self.leases {
            None => self.proxy_fields(msg_type, client.firmware, boot_file),
            Some(leases) => {
                let fields = self
                    .full_fields(leases, &req, client.firmware, boot_file, reserved, now)
                    .await?;
                if let (Some(MessageType::Offer), Mode::Full(full)) =
                    (fields.msg_type, &self.options.mode)
                {
                    let decision = OfferedDecision {
                        xid,
                        profile_url,
                        reserved,
                        until: now.saturating_add(full.timers.offer_secs),
                    };
                    leases
                        .offered
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remember(mac, decision, now);
                }
                fields
            }
        };
        let bytes = match packet::encode_reply(&req, &fields) {
            Ok(b) => b,
            Err(e) => {
                warn!(%mac, xid, error = %e, "could not encode a DHCP reply");
                return None;
            }
        };
        let to = self.destination(&req, src, port, &fields);
        // The boot file is logged without its query: a profile URL's query may carry a
        // capability meant for the machine alone (the MAC is logged on its own).
        let boot_file = fields.boot_file.as_deref().unwrap_or("");
        let boot_file = boot_file
            .split_once('?')
            .map_or(boot_file, |(path, _)| path);
        info!(
            %mac, xid, request = ?msg_type, reply = ?fields.msg_type, %to,
            yiaddr = ?fields.yiaddr, boot_file,
            firmware = ?client.firmware, arch = ?client.arch,
            "answered"
        );
        crate::metrics::dhcp_reply(fields.msg_type);
        Some(Reply { to, bytes })
    }

    async fn decide(&self, client: &ClientInfo) -> Decision {
        match tokio::time::timeout(self.options.planner_timeout, self.planner.decide(client)).await
        {
            Ok(d) => d,
            Err(_) => Decision::Silent {
                reason: format!(
                    "the planner did not decide within {:?}",
                    self.options.planner_timeout
                ),
            },
        }
    }

    /// A proxyDHCP answer: boot information without an address. UEFI HTTP Boot takes it
    /// as a "proxy offer" beside the address server's (UEFI 2.x, "HTTP Boot": it only
    /// needs option 60 `HTTPClient` and the URI), in the DISCOVER/OFFER exchange on port
    /// 67; it does not ask port 4011.
    fn proxy_fields(
        &self,
        msg_type: MessageType,
        firmware: Firmware,
        boot_file: String,
    ) -> ReplyFields {
        ReplyFields {
            msg_type: Some(if msg_type == MessageType::Discover {
                MessageType::Offer
            } else {
                MessageType::Ack
            }),
            server_id: self.options.boot_address,
            boot_file: Some(boot_file),
            vendor: match firmware {
                Firmware::Pxe | Firmware::Ipxe => Vendor::PxeProxy,
                Firmware::Http => Vendor::Http,
            },
            ..ReplyFields::default()
        }
    }

    async fn full_fields(
        &self,
        leases: &Leases,
        req: &Request,
        firmware: Firmware,
        boot_file: String,
        reserved: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<ReplyFields> {
        let Mode::Full(full) = &self.options.mode else {
            return None;
        };
        let mac = req.mac;
        let xid = req.msg.xid();
        let lease_secs = u32::try_from(full.timers.lease_secs).unwrap_or(u32::MAX);
        let base = ReplyFields {
            server_id: self.options.boot_address,
            boot_file: Some(boot_file),
            lease_secs: Some(lease_secs),
            subnet_mask: Some(full.subnet_mask),
            router: full.router,
            dns: full.dns.clone(),
            vendor: match firmware {
                Firmware::Pxe | Firmware::Ipxe => Vendor::None,
                Firmware::Http => Vendor::Http,
            },
            ..ReplyFields::default()
        };
        let (rx, ip, evicted) = match self.pool_step(leases, req, reserved, now, &base) {
            PoolStep::Answer(fields) => return fields,
            PoolStep::Store {
                stored,
                ip,
                evicted,
            } => (stored, ip, evicted),
        };
        if let Err(e) = stored(rx).await {
            match evicted {
                Some(evicted) => {
                    warn!(%mac, xid, %ip, %evicted, error = %e, "cannot store the lease (replacing an expired one); not answering")
                }
                None => warn!(%mac, xid, %ip, error = %e, "cannot store the lease; not answering"),
            }
            return None;
        }
        Some(ReplyFields {
            msg_type: Some(MessageType::Ack),
            yiaddr: Some(ip),
            ..base
        })
    }

    /// What the pool says to a DISCOVER or REQUEST, under its lock (which is never held
    /// across an await): an answer now (OFFER, NAK, or silence), or a grant queued for the
    /// lease writer, to be acknowledged once stored.
    fn pool_step(
        &self,
        leases: &Leases,
        req: &Request,
        reserved: Option<Ipv4Addr>,
        now: u64,
        base: &ReplyFields,
    ) -> PoolStep {
        let mac = req.mac;
        let xid = req.msg.xid();
        // The grant holds its address in the pool until it is stored (or not), so two
        // clients can never both be acknowledged for one address.
        let mut pool = leases.lock();
        if req.msg_type == MessageType::Discover {
            return PoolStep::Answer(match pool.offer(mac, req.requested_ip, reserved, now) {
                Ok(ip) => Some(ReplyFields {
                    msg_type: Some(MessageType::Offer),
                    yiaddr: Some(ip),
                    ..base.clone()
                }),
                Err(e) => {
                    warn!(%mac, xid, error = %e, "cannot offer an address");
                    None
                }
            });
        }
        // REQUEST: SELECTING names a server; INIT-REBOOT names an address; RENEWING and
        // REBINDING use ciaddr.
        if let Some(sid) = req.server_id
            && sid != self.options.boot_address
        {
            debug!(%mac, xid, server = %sid, "client chose another DHCP server");
            pool.forget_offer(&mac);
            return PoolStep::Answer(None);
        }
        let ciaddr = Some(req.msg.ciaddr()).filter(|a| !a.is_unspecified());
        let Some(ip) = req.requested_ip.or(ciaddr) else {
            debug!(%mac, xid, "REQUEST names no address (option 50 or ciaddr)");
            return PoolStep::Answer(None);
        };
        match pool.ack(mac, ip, reserved, now) {
            Ok(grant) => PoolStep::Store {
                evicted: grant.evicts,
                ip,
                stored: leases.queue(Change::Grant(grant)),
            },
            Err(e @ pool::Error::Busy { .. }) => {
                debug!(%mac, xid, %ip, error = %e, "not answering this retransmission yet");
                PoolStep::Answer(None)
            }
            Err(e) => {
                info!(%mac, xid, %ip, error = %e, "NAK");
                PoolStep::Answer(Some(ReplyFields {
                    msg_type: Some(MessageType::Nak),
                    server_id: self.options.boot_address,
                    message: Some(e.to_string()),
                    broadcast: !req.msg.giaddr().is_unspecified(),
                    ..ReplyFields::default()
                }))
            }
        }
    }

    async fn release(&self, leases: &Leases, req: &Request) {
        let mac = req.mac;
        let ip = req.msg.ciaddr();
        let rx = {
            let mut pool = leases.lock();
            match pool.lease_of(&mac) {
                Some(l) if l.ip == ip => {}
                _ => {
                    debug!(%mac, %ip, "RELEASE of an address the client does not hold");
                    return;
                }
            }
            if !pool.begin(mac) {
                debug!(%mac, %ip, "RELEASE ignored: a change to the client's lease is being stored");
                return;
            }
            leases.queue(Change::Release { mac, ip })
        };
        // Storage first: if deleting fails, the lease stays in memory and in storage alike.
        if let Err(e) = stored(rx).await {
            warn!(%mac, %ip, error = %e, "cannot delete the released lease");
            return;
        }
        info!(%mac, %ip, "released");
    }

    async fn decline(&self, leases: &Leases, req: &Request, now: u64) {
        let mac = req.mac;
        let Some(ip) = req.requested_ip else {
            debug!(%mac, "DECLINE without option 50");
            return;
        };
        let rx = {
            let mut pool = leases.lock();
            let held = pool.lease_of(&mac).is_some_and(|l| l.ip == ip);
            if !held {
                // Only offered (or not ours): nothing stored to delete.
                pool.decline(&mac, ip, now);
                info!(%mac, %ip, "declined; the address is quarantined if it was ours to give");
                return;
            }
            if !pool.begin(mac) {
                debug!(%mac, %ip, "DECLINE ignored: a change to the client's lease is being stored");
                return;
            }
            leases.queue(Change::Decline { mac, ip, now })
        };
        if let Err(e) = stored(rx).await {
            warn!(%mac, %ip, error = %e, "cannot delete the declined lease");
            return;
        }
        info!(%mac, %ip, "declined; the address is quarantined if it was ours to give");
    }

    fn destination(
        &self,
        req: &Request,
        src: SocketAddr,
        port: Port,
        f: &ReplyFields,
    ) -> SocketAddr {
        let ports = self.options.ports;
        let giaddr = req.msg.giaddr();
        let ciaddr = req.msg.ciaddr();
        let nak = f.msg_type == Some(MessageType::Nak);
        if port == Port::Proxy {
            // Boot-server replies go back to wherever the request came from (PXE spec).
            src
        } else if !giaddr.is_unspecified() {
            SocketAddr::V4(SocketAddrV4::new(giaddr, ports.relay))
        } else if !ciaddr.is_unspecified() && !nak {
            SocketAddr::V4(SocketAddrV4::new(ciaddr, ports.client))
        } else {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, ports.client))
        }
    }
}

/// A bound DHCP server; `run` serves until cancelled.
pub struct Server {
    handler: Arc<Handler>,
    server: Arc<UdpSocket>,
    proxy: Option<Arc<UdpSocket>>,
    max_in_flight: usize,
}

fn bind(addr: SocketAddrV4, interface: Option<&str>) -> Result<UdpSocket, Error> {
    let err = |source| Error::Bind {
        addr: SocketAddr::V4(addr),
        interface: interface.map(str::to_owned),
        source,
    };
    let std = std::net::UdpSocket::bind(addr).map_err(err)?;
    std.set_nonblocking(true).map_err(err)?;
    std.set_broadcast(true).map_err(err)?;
    let socket = UdpSocket::from_std(std).map_err(err)?;
    if let Some(ifname) = interface {
        // Without SO_BINDTODEVICE a limited broadcast has no route to follow, and we would
        // answer on every interface of the host.
        socket.bind_device(Some(ifname.as_bytes())).map_err(err)?;
    }
    // A rack's DISCOVERs arrive together; the default buffer drops part of the burst.
    crate::udp::enlarge_recv_buffer(&socket, "dhcp");
    Ok(socket)
}

impl Server {
    /// Binds the sockets (67, and 4011 in proxy mode) and, in full mode, loads the leases.
    pub async fn bind(options: Options, planner: Arc<dyn BootPlanner>) -> Result<Self, Error> {
        let ifname = options.interface.clone();
        let server = bind(
            SocketAddrV4::new(options.listen, options.ports.server),
            ifname.as_deref(),
        )?;
        let proxy = match options.mode {
            Mode::Proxy => Some(Arc::new(bind(
                SocketAddrV4::new(options.listen, options.ports.proxy),
                ifname.as_deref(),
            )?)),
            Mode::Full(_) => None,
        };
        let max_in_flight = options.max_in_flight.max(1);
        let handler = Arc::new(Handler::new(options, planner).await?);
        Ok(Server {
            handler,
            server: Arc::new(server),
            proxy,
            max_in_flight,
        })
    }

    /// The address of the server socket (useful with port 0 in tests).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// The address of the proxyDHCP socket, in proxy mode.
    pub fn proxy_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.proxy.as_ref().map(|s| s.local_addr())
    }

    /// Serves until `cancel` fires, then waits for requests in progress.
    pub async fn run(self, cancel: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.max_in_flight));
        let mut loops = JoinSet::new();
        loops.spawn(serve(
            self.server.clone(),
            Port::Server,
            self.handler.clone(),
            limit.clone(),
            cancel.clone(),
        ));
        if let Some(proxy) = &self.proxy {
            loops.spawn(serve(
                proxy.clone(),
                Port::Proxy,
                self.handler.clone(),
                limit,
                cancel.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
    }
}

async fn serve(
    socket: Arc<UdpSocket>,
    port: Port,
    handler: Arc<Handler>,
    limit: Arc<Semaphore>,
    cancel: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, src) = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux; they do not
                    // affect the socket.
                    debug!(?port, error = %e, "DHCP receive error");
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(%src, "DHCP request dropped: too many requests in progress");
            crate::metrics::dhcp_dropped();
            continue;
        };
        let bytes = buf[..len].to_vec();
        let (handler, socket) = (handler.clone(), socket.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Some(reply) = handler.handle(&bytes, src, port, unix_now()).await
                && let Err(e) = socket.send_to(&reply.bytes, reply.to).await
            {
                warn!(to = %reply.to, error = %e, "cannot send DHCP reply");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests;
