//! An in-process job queue with the farm's contract: FIFO claims, idempotent completion,
//! failures kept with their reason, nothing dropped silently.

use relayfarm_core::{JobId, JobSpec};
use std::collections::{BTreeMap, VecDeque};

/// The state of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to be claimed.
    Pending,
    /// Claimed by a runner.
    Running,
    /// Finished; the result's location.
    Done(String),
    /// Already finished by an earlier run (resumed batch).
    Skipped(String),
    /// Failed, with the reason.
    Failed(String),
}

/// Counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Pending jobs.
    pub pending: usize,
    /// Running jobs.
    pub running: usize,
    /// Jobs done in this run.
    pub done: usize,
    /// Jobs skipped because their result already existed.
    pub skipped: usize,
    /// Failed jobs.
    pub failed: usize,
}

/// The embedded queue.
#[derive(Debug, Default)]
pub struct EmbeddedQueue {
    pending: VecDeque<JobId>,
    jobs: BTreeMap<JobId, (JobSpec, JobState)>,
}

impl EmbeddedQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueues a job. A job id seen before is ignored (returns false).
    pub fn push(&mut self, job: JobSpec) -> bool {
        if self.jobs.contains_key(&job.id) {
            return false;
        }
        self.pending.push_back(job.id.clone());
        self.jobs.insert(job.id.clone(), (job, JobState::Pending));
        true
    }

    /// Records a job whose result already exists, without queueing it.
    pub fn push_done(&mut self, job: JobSpec, location: String) {
        self.jobs
            .insert(job.id.clone(), (job, JobState::Skipped(location)));
    }

    /// Claims the next pending job.
    pub fn claim(&mut self) -> Option<JobSpec> {
        while let Some(id) = self.pending.pop_front() {
            if let Some((spec, state)) = self.jobs.get_mut(&id) {
                if *state == JobState::Pending {
                    *state = JobState::Running;
                    return Some(spec.clone());
                }
            }
        }
        None
    }

    /// Marks a job done. Completing a job twice keeps the first result (returns false).
    pub fn complete(&mut self, id: &JobId, location: String) -> bool {
        match self.jobs.get_mut(id) {
            Some((_, state @ (JobState::Running | JobState::Pending))) => {
                *state = JobState::Done(location);
                true
            }
            _ => false,
        }
    }

    /// Marks a job failed with its reason.
    pub fn fail(&mut self, id: &JobId, reason: String) {
        if let Some((_, state)) = self.jobs.get_mut(id) {
            if !matches!(state, JobState::Done(_) | JobState::Skipped(_)) {
                *state = JobState::Failed(reason);
            }
        }
    }

    /// The state of a job.
    pub fn state(&self, id: &JobId) -> Option<&JobState> {
        self.jobs.get(id).map(|(_, s)| s)
    }

    /// All jobs in id order with their states.
    pub fn jobs(&self) -> impl Iterator<Item = (&JobSpec, &JobState)> {
        self.jobs.values().map(|(j, s)| (j, s))
    }

    /// Counts by state.
    pub fn summary(&self) -> QueueSummary {
        let mut s = QueueSummary::default();
        for (_, state) in self.jobs.values() {
            match state {
                JobState::Pending => s.pending += 1,
                JobState::Running => s.running += 1,
                JobState::Done(_) => s.done += 1,
                JobState::Skipped(_) => s.skipped += 1,
                JobState::Failed(_) => s.failed += 1,
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relayfarm_core::RenderParams;

    fn job(i: usize) -> JobSpec {
        JobSpec {
            id: JobId(format!("job-{i:03}")),
            index: i,
            prompt: format!("prompt {i}"),
            params: RenderParams::default(),
            name: None,
        }
    }

    #[test]
    fn fifo_idempotent_and_failures_kept() {
        let mut q = EmbeddedQueue::new();
        assert!(q.push(job(0)));
        assert!(q.push(job(1)));
        assert!(!q.push(job(1)), "duplicate id ignored");
        q.push_done(job(2), "x.png".into());
        let a = q.claim().unwrap();
        assert_eq!(a.index, 0);
        assert!(q.complete(&a.id, "a.png".into()));
        assert!(
            !q.complete(&a.id, "again.png".into()),
            "second completion ignored"
        );
        assert_eq!(q.state(&a.id), Some(&JobState::Done("a.png".into())));
        let b = q.claim().unwrap();
        q.fail(&b.id, "boom".into());
        assert!(q.claim().is_none());
        let s = q.summary();
        assert_eq!((s.done, s.failed, s.skipped, s.pending), (1, 1, 1, 0));
    }
}
