//! The `BootPlanner` trait through which `pxe` asks the rest of metalgraph what to do, the
//! types that cross it, and `MemPlanner`, an in-memory implementation for tests and demos.
//!
//! `pxe` knows neither the engine nor the store: the binary implements `BootPlanner` on top
//! of its node records and its store. Everything that crosses the trait is plain data.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A boxed, sendable future, so that `BootPlanner` stays object-safe without extra crates.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An Ethernet MAC address, printed and parsed as `aa:bb:cc:dd:ee:ff` (lower case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether this can be one network interface's own address: not a group address
    /// (multicast or broadcast: the first octet's lowest bit is set) and not all zeros.
    /// Only such a MAC identifies a machine.
    pub fn is_unicast_nonzero(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {input:?}: expected six hex octets separated by ':' or '-'")]
pub struct ParseMacError {
    /// The rejected input.
    pub input: String,
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError {
            input: s.to_owned(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = ParseMacError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Which boot firmware is talking to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// A plain PXE ROM (vendor class `PXEClient...`): it needs an iPXE binary over TFTP first.
    Pxe,
    /// iPXE (option 175 or user class `iPXE`): it can fetch the HTTP profile directly.
    Ipxe,
    /// UEFI HTTP Boot (vendor class `HTTPClient...`): it fetches an iPXE binary over HTTP
    /// first, then asks again once it runs iPXE.
    Http,
}

/// What a DHCP client told us about itself, as handed to the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// The client's hardware address (`chaddr`), the key metalgraph matches nodes on.
    pub mac: MacAddr,
    /// PXE firmware, UEFI HTTP Boot firmware or iPXE.
    pub firmware: Firmware,
    /// The client system architecture: the first of option 93 (0 BIOS, 7/9 x86-64 UEFI
    /// PXE, 16 x86-64 UEFI HTTP, ...), or for an HTTP Boot client without option 93 the
    /// one its vendor class names; none if the client sent neither.
    pub arch: Option<u16>,
    /// The SMBIOS UUID from option 97 (type 0), formatted like `27946b59-9e44-...`, which a
    /// discovery graph can match against a BMC's system UUID.
    pub uuid: Option<String>,
    /// Option 60 as text (lossy), e.g. `PXEClient:Arch:00007:UNDI:003000` or
    /// `HTTPClient:Arch:00016:UNDI:003000`.
    pub vendor_class: Option<String>,
    /// Option 77 as text (lossy), e.g. `iPXE`.
    pub user_class: Option<String>,
    /// The relay (giaddr) the request came through, if any.
    pub relay: Option<Ipv4Addr>,
}

/// The planner's answer for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer the client. `profile_url` is the HTTP URL iPXE should chain to, with the MAC
    /// already filled in (DHCP's boot file name is not expanded by iPXE's `${...}` syntax);
    /// see [`crate::ipxe::profile_url`]. PXE firmware gets an iPXE binary over TFTP instead,
    /// UEFI HTTP Boot firmware the URL of one, and each asks again once it runs iPXE.
    Answer {
        /// The URL handed to iPXE as its boot file name.
        profile_url: String,
        /// The static address reserved for the client's node (full DHCP mode), if it has
        /// one: answered in the same call, since it comes from the node `decide` looked up.
        ///
        /// A reservation may lie outside the dynamic pool. It takes precedence over the pool
        /// whenever the address is not actively leased to another MAC. Operators should keep
        /// reserved addresses outside the pool: `pxe` cannot see all reservations at once, so
        /// a reserved address inside the pool can be leased to another client while it is
        /// free.
        reserved: Option<Ipv4Addr>,
    },
    /// Stay silent; `reason` is logged (for example "known node without network boot work").
    Silent {
        /// Why we do not answer, for the operator reading the log.
        reason: String,
    },
}

/// One address lease of full DHCP mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The client holding the lease.
    pub mac: MacAddr,
    /// The leased address.
    pub ip: Ipv4Addr,
    /// When the lease ends, in seconds since the Unix epoch (wall clock, so that it survives
    /// a restart).
    pub expires_unix: u64,
}

/// One change to the stored leases, as [`BootPlanner::store_leases`] applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Store the lease, replacing any stored for the same MAC.
    Save(Lease),
    /// Remove the lease stored for the MAC, if any.
    Delete(MacAddr),
}

/// A failure of the planner's lease storage; the message names what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease storage failed: {0}")]
pub struct LeaseStoreError(pub String);

/// What `pxe` asks of the rest of metalgraph. The binary implements it over its node records
/// and store; [`MemPlanner`] implements it in memory.
///
/// Every method may be called concurrently from several DHCP exchanges. The DHCP server
/// bounds each call with a timeout and treats a timeout like `Silent` (for `decide`) or like
/// an error (for the lease methods), so an implementation should answer in milliseconds.
pub trait BootPlanner: Send + Sync + 'static {
    /// Decides whether to answer a PXE, HTTP Boot or iPXE client, with which profile URL,
    /// and (full mode) whether its node has a reserved address.
    ///
    /// Called for every DISCOVER and REQUEST from a client that identified itself as PXE,
    /// UEFI HTTP Boot or iPXE (never for other clients, which `pxe` ignores on its own),
    /// except, in full mode, a REQUEST that answers an OFFER of the last 30 s (same client,
    /// same transaction id): that one is acknowledged with the OFFER's decision. Expected
    /// policy: answer
    /// unknown MACs (so they get discovered) and nodes whose current workflow needs a network
    /// boot; stay silent for nodes that should boot from disk. It has no side effects that
    /// `pxe` relies on, may be called several times for one boot, and cannot fail: an
    /// implementation that cannot decide returns `Silent` with the reason.
    fn decide<'a>(&'a self, client: &'a ClientInfo) -> BoxFuture<'a, Decision>;

    /// Stores `lease`, replacing any lease stored for the same MAC (an upsert keyed by MAC).
    ///
    /// Must be durable when it returns `Ok`: the DHCP server sends the ACK only afterwards,
    /// so a client never holds an address that a restarted server would not know about. On
    /// `Err` the server does not answer and the client retries.
    fn save_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), LeaseStoreError>>;

    /// Removes the lease stored for `mac`; removing a lease that does not exist is `Ok`.
    /// Called on RELEASE, DECLINE and when an expired lease's address is given to another MAC.
    fn delete_lease<'a>(&'a self, mac: &'a MacAddr) -> BoxFuture<'a, Result<(), LeaseStoreError>>;

    /// Applies `changes` in order (a later change for the same MAC wins), all or nothing,
    /// and durably when it returns `Ok`: the DHCP server sends the ACKs (and forgets the
    /// released leases) of these changes only afterwards. On `Err` none of them may be
    /// stored; the server answers none of their clients, which retry.
    ///
    /// This is how the server stores every lease change: all the changes that queued up
    /// while the previous call ran, in one call, so that one durable write serves many
    /// clients. The default applies them one by one through `save_lease` and
    /// `delete_lease`, which is neither atomic nor one write; implementations over a store
    /// with atomic batches should override it.
    fn store_leases<'a>(
        &'a self,
        changes: &'a [LeaseChange],
    ) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        Box::pin(async move {
            for change in changes {
                match change {
                    LeaseChange::Save(lease) => self.save_lease(lease).await?,
                    LeaseChange::Delete(mac) => self.delete_lease(mac).await?,
                }
            }
            Ok(())
        })
    }

    /// Returns every stored lease, expired or not; called once when full DHCP mode starts.
    /// An error stops the DHCP server from starting rather than risk handing out addresses
    /// twice.
    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>, LeaseStoreError>>;
}

/// An in-memory `BootPlanner` for tests and demos.
///
/// By default it answers every client with a profile URL under `profile_base`, as an
/// unknown node would be answered. `set_silent` makes a MAC "known without network boot
/// work"; `set_reservation` gives it a static address; `fail_saves` simulates a broken
/// store.
#[derive(Debug)]
pub struct MemPlanner {
    profile_base: String,
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    silent: HashMap<MacAddr, String>,
    reservations: HashMap<MacAddr, Ipv4Addr>,
    leases: BTreeMap<MacAddr, Lease>,
    fail_saves: bool,
    decisions: Vec<ClientInfo>,
}

impl MemPlanner {
    /// A planner answering every client with `profile_url(profile_base, mac)`.
    pub fn new(profile_base: impl Into<String>) -> Self {
        MemPlanner {
            profile_base: profile_base.into(),
            state: Mutex::new(MemState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A panic while holding this lock can only come from a test assertion elsewhere;
        // the state itself stays consistent, so recover it rather than cascade panics.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the planner stay silent for `mac`, with `reason`.
    pub fn set_silent(&self, mac: MacAddr, reason: impl Into<String>) {
        self.state().silent.insert(mac, reason.into());
    }

    /// Reserves `ip` for `mac`.
    pub fn set_reservation(&self, mac: MacAddr, ip: Ipv4Addr) {
        self.state().reservations.insert(mac, ip);
    }

    /// Makes every later `save_lease` and `store_leases` that saves a lease fail (or
    /// succeed again).
    pub fn fail_saves(&self, fail: bool) {
        self.state().fail_saves = fail;
    }

    /// Stores `lease` directly, as if persisted by an earlier run.
    pub fn insert_lease(&self, lease: Lease) {
        self.state().leases.insert(lease.mac, lease);
    }

    /// The stored leases, ordered by MAC.
    pub fn leases(&self) -> Vec<Lease> {
        self.state().leases.values().cloned().collect()
    }

    /// Every client `decide` was asked about, in order.
    pub fn decisions(&self) -> Vec<ClientInfo> {
        self.state().decisions.clone()
    }
}

impl BootPlanner for MemPlanner {
    fn decide<'a>(&'a self, client: &'a ClientInfo) -> BoxFuture<'a, Decision> {
        let mut state = self.state();
        state.decisions.push(client.clone());
        let decision = match state.silent.get(&client.mac) {
            Some(reason) => Decision::Silent {
                reason: reason.clone(),
            },
            None => Decision::Answer {
                profile_url: crate::ipxe::profile_url(&self.profile_base, &client.mac),
                reserved: state.reservations.get(&client.mac).copied(),
            },
        };
        Box::pin(std::future::ready(decision))
    }

    fn save_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        let mut state = self.state();
        let result = if state.fail_saves {
            Err(LeaseStoreError(format!(
                "simulated failure saving the lease of {}",
                lease.mac
            )))
        } else {
            state.leases.insert(lease.mac, lease.clone());
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn delete_lease<'a>(&'a self, mac: &'a MacAddr) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        self.state().leases.remove(mac);
        Box::pin(std::future::ready(Ok(())))
    }

    fn store_leases<'a>(
        &'a self,
        changes: &'a [LeaseChange],
    ) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        let mut state = self.state();
        let saves = changes.iter().any(|c| matches!(c, LeaseChange::Save(_)));
        let result = if state.fail_saves && saves {
            Err(LeaseStoreError(format!(
                "simulated failure storing {} lease changes",
                changes.len()
            )))
        } else {
            for change in changes {
                match change {
                    LeaseChange::Save(lease) => {
                        state.leases.insert(lease.mac, lease.clone());
                    }
                    LeaseChange::Delete(mac) => {
                        state.leases.remove(mac);
                    }
                }
            }
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>, LeaseStoreError>> {
        let leases = self.leases();
        Box::pin(std::future::ready(Ok(leases)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let cases = [
            ("52:54:00:00:00:01", Some([0x52, 0x54, 0, 0, 0, 1])),
            ("52-54-00-AB-cd-01", Some([0x52, 0x54, 0, 0xab, 0xcd, 1])),
            ("52:54:00:00:00", None),
            ("52:54:00:00:00:01:02", None),
            ("5:54:00:00:00:01", None),
            ("zz:54:00:00:00:01", None),
            ("", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<MacAddr>().ok().map(|m| m.0);
            assert_eq!(got, want, "input {input:?}");
        }
        let mac: MacAddr = "52-54-00-AB-cd-01".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
    }

    #[test]
    fn only_unicast_nonzero_macs_identify_a_machine() {
        for (mac, want) in [
            ("52:54:00:00:00:01", true),
            ("00:00:00:00:00:01", true),
            ("ff:ff:ff:ff:ff:ff", false),
            ("01:00:5e:00:00:01", false),
            ("33:33:00:00:00:01", false),
            ("00:00:00:00:00:00", false),
        ] {
            let m: MacAddr = mac.parse().unwrap();
            assert_eq!(m.is_unicast_nonzero(), want, "{mac}");
        }
    }
}
