//! When devices were last seen: the front marks a device when its
//! certificate-authenticated connection opens and closes ([`Sessions`]), and
//! [`record`] writes those marks to the registry once a minute, in one
//! transaction, so a reconnecting fleet costs at most one row update per
//! device per minute. Devices that stay connected are refreshed once an hour,
//! so "not seen for N days" never counts a device that is online.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::warn;

use super::front::Sessions;
use crate::registry::{Registry, now};

/// How often marks are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// How often devices connected all along are marked.
pub const LIVE_EVERY: Duration = Duration::from_secs(3600);
/// Most rows per transaction: a big reconnect storm does not hold SQLite's
/// write lock for long.
const CHUNK: usize = 500;

/// Writes the marks of `sessions` to `registry` every [`FLUSH_EVERY`] until
/// `shutdown`, then once more.
pub async fn record(
    registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut live_due = Instant::now() + LIVE_EVERY;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if stopping {
            flush(&registry, &sessions, false).await;
            return;
        }
        let live = Instant::now() >= live_due;
        if live {
            live_due = Instant::now() + LIVE_EVERY;
        }
        flush(&registry, &sessions, live).await;
    }
}

/// Writes the marks taken now (with `live`, every connected device too).
/// A failed write is logged and its marks dropped: presence is a hint, and
/// the next connection marks the device again.
pub async fn flush(registry: &Registry, sessions: &Sessions, live: bool) {
    let seen = sessions.take_seen(live, now());
    for chunk in seen.chunks(CHUNK) {
        if let Err(e) = registry.record_last_seen(chunk).await {
            warn!(error = %e, devices = chunk.len(), "cannot record when devices were last seen");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::NewDevice;
    use crate::testing::{TestDatabase, registry};

    #[tokio::test]
    async fn connections_are_recorded_as_last_seen() {
        let Some((registry, _url)) = registry(TestDatabase::Sqlite).await else {
            return;
        };
        for id in ["a", "b"] {
            let device = NewDevice {
                id: id.into(),
                owner: "x@x.io".into(),
                site: "plant".into(),
                model: None,
                label: None,
                created_by: "test".into(),
            };
            registry.add_device(&device, b"sealed", 1).await.unwrap();
        }
        let sessions = Sessions::default();
        let before = now();
        let (session, _closed) = sessions.register("a", "01");
        flush(&registry, &sessions, false).await;
        let a = registry.device("a").await.unwrap().unwrap();
        assert!(a.last_seen_at.is_some_and(|t| t >= before));
        assert_eq!(
            registry.device("b").await.unwrap().unwrap().last_seen_at,
            None
        );
        // Nothing new: nothing to write.
        assert!(sessions.take_seen(false, now()).is_empty());
        // Still connected: the hourly refresh marks it.
        assert_eq!(sessions.take_seen(true, 42), [("a".to_owned(), 42)]);
        // Disconnecting marks it again.
        sessions.unregister(session);
        let seen = sessions.take_seen(true, now());
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "a");
    }
}
