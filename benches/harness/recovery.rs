//! The recovery scenario: `n` workflows stand in their first task (a one-hour wait) in a
//! real `metalgraph serve`; the process is killed with SIGKILL and started again on the same
//! data directory, and the clock runs from that second start until every workflow's task
//! is running again.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;

use crate::graphs;
use crate::inproc::runtime;
use crate::server::{Api, Server};

/// What the recovery scenario measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryResult {
    pub workflows: usize,
    /// Submitting every workflow over HTTP before the kill (not part of the figure).
    #[serde(with = "crate::util::secs")]
    pub create_wall: Duration,
    /// From spawning the second process to its listening line. The engine recovers before
    /// the server announces itself, so at this point every unfinished workflow is loaded,
    /// its interrupted task is committed as running again (attempt 2) and its job spawned.
    #[serde(with = "crate::util::secs")]
    pub to_listening: Duration,
    /// From spawning the second process until `GET /workflows?active=true` shows every
    /// workflow's first task running in attempt 2: the same point, checked from outside.
    /// Includes the time of the last listing, which grows with the number of workflows.
    #[serde(with = "crate::util::secs")]
    pub to_all_running: Duration,
    /// How long one listing of every active workflow took, the granularity of the above.
    #[serde(with = "crate::util::secs")]
    pub listing: Duration,
    /// Workflows found running again after the restart.
    pub recovered: usize,
    /// Workflows created before the kill and not found active after it.
    pub lost: usize,
}

/// How many run requests are in flight at once while the workflows are created.
const CLIENTS: usize = 32;

pub fn recovery(
    backend: Backend,
    dir: &Path,
    log: &Path,
    n: usize,
    limit: Duration,
) -> anyhow::Result<RecoveryResult> {
    // Every interrupted task must get a job slot again, so the limit is raised above `n`:
    // a fleet of this size waits on this many BMCs at once.
    let env = [("METALGRAPH_MAX_RUNNING_JOBS", (n + 64).to_string())];
    runtime()?.block_on(async {
        let (mut server, _) = Server::start(backend, dir, log, &env, limit)?;
        let api = server.api()?;
        api.put_graph(&graphs::recovery()).await?;

        let start = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS.min(n.max(1)) {
            let api = api.clone();
            let next = next.clone();
            clients.spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    ids.push(api.run(graphs::RECOVERY).await?);
                }
                Ok::<_, anyhow::Error>(ids)
            });
        }
        let mut created = HashSet::new();
        while let Some(r) = clients.join_next().await {
            created.extend(r??);
        }
        let create_wall = start.elapsed();
        if created.len() != n {
            bail!("created {} workflows, expected {n}", created.len());
        }

        // Kill only once every workflow stands in its running first task.
        let deadline = Instant::now() + limit;
        loop {
            let (running, _) = running_in(&api, 1).await?;
            if running.len() == n {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {n} workflows started before the kill",
                    running.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.kill9()?;
        drop(server);

        let start = Instant::now();
        let (server, to_listening) = Server::start(backend, dir, log, &env, limit)?;
        let api = server.api()?;
        let (recovered, to_all_running, listing) = loop {
            let before = Instant::now();
            let (running, active) = running_in(&api, 2).await?;
            let listing = before.elapsed();
            if running.len() >= n || active.len() < n {
                break (running, start.elapsed(), listing);
            }
            if start.elapsed() > limit {
                bail!(
                    "only {} of {n} workflows were running again after {limit:?}",
                    running.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let lost = created.difference(&recovered).count();
        server.terminate(Duration::from_secs(30))?;
        Ok(RecoveryResult {
            workflows: n,
            create_wall,
            to_listening,
            to_all_running,
            listing,
            recovered: recovered.len(),
            lost,
        })
    })
}

/// The ids of active workflows whose first task is running in attempt `attempt`, and the
/// ids of every active workflow.
async fn running_in(api: &Api, attempt: u64) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let list = api.workflows(Some(true)).await?;
    let mut running = HashSet::new();
    let mut active = HashSet::new();
    for w in &list {
        let id = w["instanceId"]
            .as_str()
            .context("a listed workflow has no instanceId")?
            .to_owned();
        let first = &w["tasks"][0];
        if first["state"] == "running" && first["attempts"] == attempt {
            running.insert(id.clone());
        }
        active.insert(id);
    }
    Ok((running, active))
}
