//! Node callbacks: the tasks that wait for a node to call back, found by node and token,
//! and the capabilities that let a node read its own callback token.
//!
//! A waiting job (`wait.notification`) registers here while it runs. A callback is only
//! matched here; the scheduler decides it: the task's success, with the callback's body as
//! its output, is committed before the caller is answered, so a `200` to an installer means
//! the callback survives any crash that follows.
//!
//! **Capabilities.** A task's token completes the task, so it must reach only the node the
//! task runs for. The node-facing listener is plain HTTP that anyone on the provisioning
//! network can call; what it renders for a node (its iPXE profile, its kickstart) holds the
//! token only when the request proves it is that node. One proof is a [`NodeCap`]: an
//! HMAC-SHA256, cut to 128 bits, over the node id, the workflow id, the task id and the
//! task's token, under a key derived from the secret key ([`NodeCaps`]). The binary puts it
//! into the URLs it hands the node (DHCP's boot file name, then every URL the profile
//! names), and checks it against the task the node has now. So a capability
//!
//! - cannot be guessed (128 bits of HMAC output under a 256-bit key) nor computed from
//!   anything the node-facing API shows;
//! - names one node and one task of one workflow: it is worthless for another node, and
//!   once the task ends (or the workflow is cancelled) no current task matches it;
//! - needs no storage: it is recomputed from the task record, and survives a restart of
//!   the server as long as the secret key does.
//!
//! The attempt is not in it: DHCP hands the node its URL while the task may still be
//! pending, before the attempt that will serve it exists.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ring::hmac;
use ring::rand::SystemRandom;

use crate::error::Error;

/// The key node capabilities are computed with.
#[derive(Clone)]
pub struct NodeCaps {
    key: hmac::Key,
}

impl std::fmt::Debug for NodeCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCaps(<key>)")
    }
}

/// The HKDF purpose of the capability key derived from the secret key.
const CAP_PURPOSE: &[u8] = b"metalgraph node capability v1";

impl NodeCaps {
    /// Capabilities under a key derived from the secret key: stable across restarts.
    pub fn from_sealer(sealer: &crate::seal::Sealer) -> Self {
        NodeCaps {
            key: sealer.derive_hmac_key(CAP_PURPOSE),
        }
    }

    /// Capabilities under a random key of this process (an engine without a secret key):
    /// they end with the process.
    pub fn random() -> Self {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system has random numbers");
        NodeCaps { key }
    }

    /// The capability of task `task_id` (with `token`) of workflow `workflow_id` on `node`.
    pub fn cap(&self, node: &str, workflow_id: &str, task_id: &str, token: &str) -> NodeCap {
        let mut ctx = hmac::Context::with_key(&self.key);
        // Each field is length-prefixed, so no two different tuples share an input.
        for field in [node, workflow_id, task_id, token] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field.as_bytes());
        }
        let tag = ctx.sign();
        NodeCap(crate::seal::to_hex(&tag.as_ref()[..16]))
    }
}

/// A node's capability for one task (32 hex digits); see the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCap(String);

impl std::fmt::Debug for NodeCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCap(<secret>)")
    }
}

impl NodeCap {
    /// The capability as it goes into URLs.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this capability, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        same_secret(&self.0, presented)
    }
}

/// Whether two secrets are equal, without an early exit that would time how much of a
/// guess is right. Lengths are not secret.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// A task waiting for its node to call back. Replicas of one store publish it under the
/// node in the `waiting` keyspace, so that the others can show it to the node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Waiter {
    pub node: Option<String>,
    pub workflow_id: String,
    pub task_id: String,
    pub label: String,
    pub token: String,
}

/// A task's registration as waiting; dropping it unregisters the task.
pub(crate) struct Registration {
    waiters: Arc<Waiters>,
    task_id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.task_id);
    }
}

/// The waiting tasks, by task id.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<String, Waiter>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a waiting task until the returned guard is dropped: however the waiting
    /// future ends (it returns, is cancelled or is simply dropped), the task stops waiting.
    pub fn register(self: &Arc<Self>, w: Waiter) -> Registration {
        let task_id = w.task_id.clone();
        self.lock().insert(task_id.clone(), w);
        Registration {
            waiters: self.clone(),
            task_id,
        }
    }

    /// The task a callback from `node` (any node when `None`) with `token` is for. A wrong
    /// token and no waiting task are one answer, [`not_waiting`], so that a caller cannot
    /// learn which nodes wait.
    pub fn find(&self, node: Option<&str>, token: &str) -> Result<Waiter, Error> {
        let map = self.lock();
        let of_node = |w: &&Waiter| node.is_none() || w.node.as_deref() == node;
        // Every candidate is compared, so the time taken does not say which one matched.
        let mut found = None;
        for w in map.values().filter(of_node) {
            if same_secret(&w.token, token) {
                found = Some(w);
            }
        }
        found.cloned().ok_or_else(|| not_waiting(node))
    }

    /// The task waiting on `node`, if one waits.
    pub fn waiting_on(&self, node: &str) -> Option<Waiter> {
        self.lock()
            .values()
            .find(|w| w.node.as_deref() == Some(node))
            .cloned()
    }
}

/// The one answer to a callback that matches no waiting task, whether nothing waits on the
/// node or the token is wrong.
pub fn not_waiting(node: Option<&str>) -> Error {
    Error::NotFound {
        kind: "task waiting for a notification with this token on node",
        id: node.unwrap_or("(any)").to_owned(),
    }
}

/// The `notification` variables of a file rendered for a node, for the task that waits (or
/// will wait) for its callback: `url` (the callback URL with the token), `token`,
/// `workflowId`, and `cap`, the node's capability for the task, for URLs to further
/// templates.
pub fn waiting_vars(
    node_base: &str,
    node_id: &str,
    workflow_id: &str,
    token: &str,
    cap: &str,
) -> serde_json::Value {
    let node_base = node_base.trim_end_matches('/');
    serde_json::json!({
        "url": format!(
            "{node_base}/notification?nodeId={}&token={}",
            query_escape(node_id),
            query_escape(token)
        ),
        "token": token,
        "workflowId": workflow_id,
        "cap": cap,
    })
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved
/// characters).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_names_one_node_task_and_token() {
        let caps = NodeCaps::random();
        let cap = caps.cap("n1", "wf", "wf.2", "tok");
        assert_eq!(cap.as_str().len(), 32);
        assert!(cap.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(cap, caps.cap("n1", "wf", "wf.2", "tok"), "deterministic");
        for other in [
            caps.cap("n2", "wf", "wf.2", "tok"),
            caps.cap("n1", "wf2", "wf.2", "tok"),
            caps.cap("n1", "wf", "wf.3", "tok"),
            caps.cap("n1", "wf", "wf.2", "tok2"),
            // Moving a boundary between fields gives another capability.
            caps.cap("n1w", "f", "wf.2", "tok"),
            NodeCaps::random().cap("n1", "wf", "wf.2", "tok"),
        ] {
            assert_ne!(cap, other);
            assert!(!cap.matches(other.as_str()));
        }
        assert!(cap.matches(cap.as_str()));
        assert!(!cap.matches(""));
        assert!(!cap.matches(&cap.as_str()[..31]));
        assert!(
            !format!("{cap:?}").contains(cap.as_str()),
            "never in a debug print"
        );
    }

    #[test]
    fn capabilities_from_the_secret_key_survive_a_restart() {
        let key = [7u8; 32];
        let a = NodeCaps::from_sealer(&crate::seal::Sealer::new(&key).unwrap());
        let b = NodeCaps::from_sealer(&crate::seal::Sealer::new(&key).unwrap());
        let c = NodeCaps::from_sealer(&crate::seal::Sealer::new(&[8u8; 32]).unwrap());
        let cap = a.cap("n1", "wf", "t", "tok");
        assert_eq!(cap, b.cap("n1", "wf", "t", "tok"));
        assert_ne!(cap, c.cap("n1", "wf", "t", "tok"));
    }

    #[test]
    fn a_wrong_token_and_no_waiting_task_answer_alike() {
        let waiters = Arc::new(Waiters::default());
        let nothing = waiters.find(Some("n1"), "guess").unwrap_err().to_string();
        let _reg = waiters.register(Waiter {
            node: Some("n1".into()),
            workflow_id: "wf".into(),
            task_id: "t".into(),
            label: "wait".into(),
            token: "right".into(),
        });
        let wrong = waiters.find(Some("n1"), "guess").unwrap_err().to_string();
        assert_eq!(nothing, wrong);
        assert_eq!(waiters.find(Some("n1"), "right").unwrap().label, "wait");
        assert!(waiters.find(Some("n2"), "right").is_err());
    }
}
