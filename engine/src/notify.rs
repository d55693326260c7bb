//! Node callbacks: the tasks that wait for a node to call back, found by node and token.
//!
//! A waiting job (`wait.notification`) registers here while it runs. A callback is only
//! matched here; the scheduler decides it: the task's success, with the callback's body as
//! its output, is committed before the caller is answered, so a `200` to an installer means
//! the callback survives any crash that follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
