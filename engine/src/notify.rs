//! Node callbacks: the tasks that wait for a node to call back, found by node and token.
//!
//! A waiting job (`wait.notification`) registers here while it runs. A callback is only
//! matched here; the scheduler decides it: the task's success, with the callback's body as
//! its output, is committed before the caller is answered, so a `200` to an installer means
//! the callback survives any crash that follows.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::Error;

/// A task waiting for its node to call back.
#[derive(Debug, Clone)]
pub(crate) struct Waiter {
    pub node: Option<String>,
    pub workflow_id: String,
    pub task_id: String,
    pub label: String,
    pub token: String,
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

    pub fn register(&self, w: Waiter) {
        self.lock().insert(w.task_id.clone(), w);
    }

    pub fn remove(&self, task_id: &str) {
        self.lock().remove(task_id);
    }

    /// The task a callback from `node` (any node when `None`) with `token` is for. A node
    /// with a waiting task but another token gets a conflict; no waiting task, not found.
    pub fn find(&self, node: Option<&str>, token: &str) -> Result<Waiter, Error> {
        let map = self.lock();
        let of_node = |w: &&Waiter| node.is_none() || w.node.as_deref() == node;
        if let Some(w) = map.values().filter(of_node).find(|w| w.token == token) {
            return Ok(w.clone());
        }
        Err(if node.is_some() && map.values().any(|w| of_node(&w)) {
            Error::Conflict("the notification token does not match the waiting task".into())
        } else {
            Error::NotFound {
                kind: "waiting task for node",
                id: node.unwrap_or("(any)").to_owned(),
            }
        })
    }

    /// The workflow and token of the task waiting on `node`, if one waits.
    pub fn token_for(&self, node: &str) -> Option<(String, String)> {
        self.lock()
            .values()
            .find(|w| w.node.as_deref() == Some(node))
            .map(|w| (w.workflow_id.clone(), w.token.clone()))
    }
}
