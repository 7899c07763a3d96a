//! Step progress from the device thread to the coordinator, throttled.

use super::device_thread::Progress;
use super::rpc::Cluster;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

/// The default gap between two progress reports of one job (at most ~10 a second).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Decides which step events are reported: the first, then at most one per `interval`, and
/// always the last step.
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    /// A throttle letting one event through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: None,
        }
    }

    /// Whether the event `(step, total)` seen at `now` should be sent (and, if so, records it).
    pub fn allow(&mut self, now: Instant, step: u32, total: u32) -> bool {
        let due = match self.last {
            None => true,
            Some(last) => step >= total || now.saturating_duration_since(last) >= self.interval,
        };
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// Forwards step events of one job to the coordinator until the device thread drops its sender.
/// A `cancelled` acknowledgement sets `cancel`, which the device thread sees at the next step
/// boundary. Report failures are logged and skipped: progress is advisory.
pub async fn forward(
    cluster: Cluster,
    job_id: String,
    mut rx: UnboundedReceiver<Progress>,
    cancel: Arc<AtomicBool>,
    interval: Duration,
) {
    let mut throttle = Throttle::new(interval);
    let mut failures = 0u32;
    while let Some(mut ev) = rx.recv().await {
        // Skip to the newest event if several piled up while the last report was in flight.
        while let Ok(newer) = rx.try_recv() {
            ev = newer;
        }
        let (step, total) = ev;
        if !throttle.allow(Instant::now(), step, total) {
            continue;
        }
        match cluster.report_progress(&job_id, step, total).await {
            Ok(ack) => {
                failures = 0;
                if ack.cancelled && !cancel.swap(true, Ordering::Relaxed) {
                    tracing::info!(job_id = %job_id, step, "coordinator says the job was cancelled; stopping at the step boundary");
                }
            }
            Err(status) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(job_id = %job_id, code = ?status.code(), error = %super::rpc::describe(&status), "progress report failed (the job goes on)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_limits_rate_but_keeps_first_and_last() {
        let mut t = Throttle::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(t.allow(t0, 1, 20));
        assert!(!t.allow(t0 + Duration::from_millis(10), 2, 20));
        assert!(!t.allow(t0 + Duration::from_millis(99), 3, 20));
        assert!(t.allow(t0 + Duration::from_millis(100), 4, 20));
        assert!(!t.allow(t0 + Duration::from_millis(150), 5, 20));
        // The last step always goes through.
        assert!(t.allow(t0 + Duration::from_millis(151), 20, 20));
        // 1000 events within one second → at most ~11 reports.
        let mut t = Throttle::new(Duration::from_millis(100));
        let sent = (0..1000u32)
            .filter(|i| t.allow(t0 + Duration::from_millis(*i as u64), i + 1, 2000))
            .count();
        assert!(sent <= 11, "{sent} reports in one second");
    }
}
