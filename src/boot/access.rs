//! Whether a node-facing request comes from the node it asks about, which decides whether
//! the node's callback token (and its capability) is rendered for it.
//!
//! The node-facing listener is plain HTTP without accounts: whoever reaches it can ask for
//! any node's profile or kickstart. A task's token completes the task, so it is shown only
//! to a request that proves it is the node, in one of two ways:
//!
//! - **Its capability** (`cap=` in the query): the value the engine derives for the node's
//!   current task (`metalgraph_engine::NodeCap`), handed to the node in the URLs metalgraph
//!   gives it — DHCP's boot file name, then every URL its profile names.
//! - **Its leased address** (full DHCP only): the request comes from the address
//!   metalgraph's DHCP leased to one of the node's MACs, and the lease has not expired. In
//!   proxy mode or without DHCP, metalgraph does not know which address a machine has, and
//!   stored leases of an earlier full-mode run are not consulted.
//!
//! Any other request is answered as if no task of the node waited for a callback.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use metalgraph_engine::NodeCap;
use metalgraph_engine::nodes::Node;
use metalgraph_pxe::{Lease, MacAddr};
use metalgraph_store::Store;
use tracing::warn;

use super::LEASES;

/// How a request proved it is the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// It presented the node's capability for the task.
    Capability,
    /// It came from the address metalgraph's DHCP leased to one of the node's MACs.
    LeasedAddress,
    /// Nothing: the operator shows tokens to any request (`[boot] node_tokens = "open"`).
    Open,
}

/// The checks of node-facing requests; one per server.
#[derive(Clone, Default)]
pub struct NodeAccess {
    /// The store holding full-mode DHCP leases; `None` unless DHCP runs in full mode.
    leases: Option<Arc<dyn Store>>,
    /// Every request is taken as the node's (`[boot] node_tokens = "open"`).
    open: bool,
}

impl std::fmt::Debug for NodeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAccess")
            .field("leases", &self.leases.is_some())
            .field("open", &self.open)
            .finish()
    }
}

impl NodeAccess {
    /// Requests prove themselves by capability only.
    pub fn capability_only() -> Self {
        NodeAccess {
            leases: None,
            open: false,
        }
    }

    /// Every request is taken as the node's: its token is shown to whoever asks. The
    /// operator's explicit choice (`[boot] node_tokens = "open"`), for installers that
    /// cannot prove who they are.
    pub fn open() -> Self {
        NodeAccess {
            leases: None,
            open: true,
        }
    }

    /// Requests prove themselves by capability, or by coming from an address that full-mode
    /// DHCP leased to the node (leases read from `store`'s `leases` keyspace).
    pub fn with_leases(store: Arc<dyn Store>) -> Self {
        NodeAccess {
            leases: Some(store),
            open: false,
        }
    }

    /// How the request proves it is `node`, if it does: `presented` is its `cap=`, checked
    /// against `cap` (the node's capability for the task at stake), `peer` the address it
    /// came from.
    pub async fn proof(
        &self,
        node: &Node,
        cap: &NodeCap,
        presented: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Option<Proof> {
        if presented.is_some_and(|p| cap.matches(p)) {
            return Some(Proof::Capability);
        }
        if self.open {
            return Some(Proof::Open);
        }
        let (Some(store), Some(ip)) = (&self.leases, peer.and_then(ipv4)) else {
            return None;
        };
        let macs: Vec<MacAddr> = node
            .identifiers
            .iter()
            .filter_map(|i| i.parse().ok())
            .collect();
        let store = store.clone();
        let now = unix_now();
        let found =
            tokio::task::spawn_blocking(move || leased_to(store.as_ref(), &macs, ip, now)).await;
        match found {
            Ok(Ok(true)) => Some(Proof::LeasedAddress),
            Ok(Ok(false)) => None,
            Ok(Err(e)) => {
                warn!(node = %node.id, error = %e, "cannot read the node's DHCP leases; the request is not taken as the node's");
                None
            }
            Err(e) => {
                warn!(node = %node.id, error = %e, "the lease lookup did not complete");
                None
            }
        }
    }
}

/// Whether one of `macs` holds an unexpired lease (as of `now_unix`) of `ip` in `store`.
pub fn leased_to(
    store: &dyn Store,
    macs: &[MacAddr],
    ip: Ipv4Addr,
    now_unix: u64,
) -> Result<bool, metalgraph_store::Error> {
    for mac in macs {
        let Some(value) = store.get(LEASES, mac.to_string().as_bytes())? else {
            continue;
        };
        match serde_json::from_slice::<Lease>(&value) {
            Ok(lease) if lease.ip == ip && lease.expires_unix > now_unix => return Ok(true),
            Ok(_) => {}
            Err(e) => warn!(%mac, error = %e, "an unreadable stored lease is ignored"),
        }
    }
    Ok(false)
}

/// The IPv4 address of a peer (an IPv4-mapped IPv6 address counts as its IPv4 one).
fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalgraph_store::{Batch, MemStore};

    fn store_with(leases: &[(&str, [u8; 4], u64)]) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mut batch = Batch::new();
        for (mac, ip, expires) in leases {
            let lease = Lease {
                mac: mac.parse().unwrap(),
                ip: Ipv4Addr::from(*ip),
                expires_unix: *expires,
            };
            batch.put(
                LEASES,
                lease.mac.to_string().into_bytes(),
                serde_json::to_vec(&lease).unwrap(),
            );
        }
        store.commit(batch).unwrap();
        store
    }

    #[test]
    fn only_an_unexpired_lease_of_the_nodes_mac_names_the_address() {
        let store = store_with(&[
            ("52:54:00:00:00:01", [10, 0, 0, 100], 2_000),
            ("52:54:00:00:00:02", [10, 0, 0, 101], 500),
            ("52:54:00:00:00:03", [10, 0, 0, 102], 2_000),
        ]);
        let macs =
            |ms: &[&str]| -> Vec<MacAddr> { ms.iter().map(|m| m.parse().unwrap()).collect() };
        let ip = |last| Ipv4Addr::new(10, 0, 0, last);
        let node = macs(&[
            "52:54:00:00:00:09",
            "52:54:00:00:00:01",
            "52:54:00:00:00:02",
        ]);
        let cases = [
            (ip(100), 1_000, true),
            // Another machine's address.
            (ip(102), 1_000, false),
            // The node's own lease, expired.
            (ip(101), 1_000, false),
            (ip(100), 2_000, false),
            (ip(199), 1_000, false),
        ];
        for (addr, now, want) in cases {
            assert_eq!(
                leased_to(store.as_ref(), &node, addr, now).unwrap(),
                want,
                "{addr} at {now}"
            );
        }
        assert!(!leased_to(store.as_ref(), &[], ip(100), 1_000).unwrap());
    }

    fn node(identifiers: &[&str]) -> Node {
        Node {
            id: "n1".into(),
            name: "n1".into(),
            identifiers: identifiers.iter().map(|i| (*i).to_owned()).collect(),
            node_type: "compute".into(),
            tags: Vec::new(),
            obms: Vec::new(),
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    #[tokio::test]
    async fn a_request_proves_the_node_by_capability_or_by_its_leased_address() {
        let far = unix_now() + 3_600;
        let store = store_with(&[("52:54:00:00:00:01", [10, 0, 0, 100], far)]);
        let caps = metalgraph_engine::NodeCaps::random();
        let cap = caps.cap("n1", "wf", "t", "tok");
        // Identifiers are matched whatever their case.
        let n = node(&["52:54:00:00:00:01".to_uppercase().as_str()]);
        let leased: IpAddr = "10.0.0.100".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.100".parse().unwrap();
        let other: IpAddr = "10.0.0.7".parse().unwrap();

        let full = NodeAccess::with_leases(store);
        let proxy = NodeAccess::capability_only();
        let wrong = caps.cap("n1", "wf", "t", "other");
        let cases = [
            (
                &full,
                Some(cap.as_str()),
                Some(other),
                Some(Proof::Capability),
            ),
            (&proxy, Some(cap.as_str()), None, Some(Proof::Capability)),
            (&full, None, Some(leased), Some(Proof::LeasedAddress)),
            (
                &full,
                Some(wrong.as_str()),
                Some(mapped),
                Some(Proof::LeasedAddress),
            ),
            (&full, None, Some(other), None),
            (&full, Some(wrong.as_str()), Some(other), None),
            (&full, None, None, None),
            // Without full DHCP, an address proves nothing.
            (&proxy, None, Some(leased), None),
            (&proxy, Some(""), Some(leased), None),
        ];
        for (i, (access, presented, peer, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                access.proof(&n, &cap, presented, peer).await,
                want,
                "case {i}"
            );
        }
    }
}
