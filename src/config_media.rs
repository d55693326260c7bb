//! Configuration media seen from the binary: the images `config-media.build` writes into
//! the files directory are deleted when their workflow ends, whatever way it ends.
//!
//! A workflow's end is an event committed with it; this task follows the engine's events
//! and deletes the ended workflow's images. An end it cannot see — one that came while the
//! server was down, or in a burst that overran its queue — is caught by a sweep at start
//! (and after such a burst): an image whose workflow is finished or gone is deleted.

use std::sync::Arc;

use metalgraph_engine::Engine;
use metalgraph_tasks::ConfigMediaSite;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Deletes ended workflows' images until `shutdown`.
pub async fn run(engine: Engine, site: Arc<ConfigMediaSite>, shutdown: CancellationToken) {
    if site.dir().is_none() {
        return;
    }
    // Subscribed before the sweep, so that no end falls between the two.
    let mut events = engine.subscribe();
    sweep(&engine, &site).await;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok((_, ev)) if ev.ended().is_some() => remove(&site, ev.workflow_id().to_owned()).await,
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => {
                info!(
                    missed,
                    "config media: events were missed; sweeping the images"
                );
                sweep(&engine, &site).await;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Deletes the images of every workflow that is finished or no longer exists.
async fn sweep(engine: &Engine, site: &Arc<ConfigMediaSite>) {
    let listed = {
        let site = site.clone();
        tokio::task::spawn_blocking(move || site.workflows()).await
    };
    let ids = match listed {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            warn!(error = %e, "config media: cannot list the images");
            return;
        }
        Err(e) => {
            warn!(error = %e, "config media: listing the images did not complete");
            return;
        }
    };
    for id in ids {
        match engine.get(&id).await {
            Ok(Some(wf)) if !wf.status.is_terminal() => {}
            Ok(_) => remove(site, id).await,
            // The store cannot say: keep the image, the next sweep decides.
            Err(e) => {
                warn!(workflow_id = %id, error = %e, "config media: cannot read the workflow of an image")
            }
        }
    }
}

async fn remove(site: &Arc<ConfigMediaSite>, workflow_id: String) {
    let site = site.clone();
    let id = workflow_id.clone();
    match tokio::task::spawn_blocking(move || site.remove_workflow(&id)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(removed)) => {
            info!(%workflow_id, removed, "config media: deleted the ended workflow's images")
        }
        Ok(Err(e)) => {
            warn!(%workflow_id, error = %e, "config media: cannot delete the ended workflow's images")
        }
        Err(e) => {
            warn!(%workflow_id, error = %e, "config media: deleting the images did not complete")
        }
    }
}
