//! Redis key names: one place, so every coordinator (and every Lua script) agrees.
//!
//! Layout under a prefix (default `rf`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `rf:model:{model}:jobs` | stream, group `workers` | the job queue of one model (field `j` = job id) |
//! | `rf:models` | hash | model name → registered `ModelInfo` (protobuf bytes) |
//! | `rf:model:{model}:workers` | zset | worker id → last heartbeat (unix ms) |
//! | `rf:worker:{id}` | hash (expires after 3 leases) | a registered worker: hostname, devices, models |
//! | `rf:batches` | zset | batch id → creation time (unix ms) |
//! | `rf:batch:{id}` | hash | model, label, total, sealed, counters (done/failed/cancelled/running), `xc` (cancel requested), done_emitted |
//! | `rf:batch:{id}:events` | stream | the batch's events (see `events`) |
//! | `rf:job:{job}` | hash | resolved job spec + state, attempts, worker, stream entry, error, image ref |
//! | `rf:job:{job}:result` | string | the winning image ref (`SET NX`) |
//! | `rf:idem:{key}` | string | idempotency key → batch id |
//! | `rf:deadletter` | stream | dead-lettered jobs (job, batch, reason) |
//!
//! Job ids are `{batch_id}-{index:05}`, so a job id alone names its batch and position.

/// The consumer group of every model stream.
pub const GROUP: &str = "workers";

/// The consumer name the reaper claims idle entries to before re-queueing them.
pub const REAPER_CONSUMER: &str = "reaper";

/// Key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new("rf")
    }
}

impl Keys {
    /// Keys under `prefix` (no trailing colon).
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The job stream of a model.
    pub fn model_jobs(&self, model: &str) -> String {
        format!("{}:model:{model}:jobs", self.prefix)
    }

    /// Registered models (hash name → ModelInfo bytes).
    pub fn models(&self) -> String {
        format!("{}:models", self.prefix)
    }

    /// Workers serving a model (zset worker → last seen ms).
    pub fn model_workers(&self, model: &str) -> String {
        format!("{}:model:{model}:workers", self.prefix)
    }

    /// A worker's registration.
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.prefix)
    }

    /// All batches by creation time.
    pub fn batches(&self) -> String {
        format!("{}:batches", self.prefix)
    }

    /// A batch record.
    pub fn batch(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}", self.prefix)
    }

    /// A batch's event stream.
    pub fn batch_events(&self, batch_id: &str) -> String {
        format!("{}:batch:{batch_id}:events", self.prefix)
    }

    /// A job record.
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }

    /// A job's winning result (SET NX).
    pub fn job_result(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}:result", self.prefix)
    }

    /// An idempotency key.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    /// The dead-letter stream.
    pub fn dead_letter(&self) -> String {
        format!("{}:deadletter", self.prefix)
    }
}

/// The id of job `index` of a batch.
pub fn job_id(batch_id: &str, index: u32) -> String {
    format!("{batch_id}-{index:05}")
}

/// Splits a job id into its batch id and index; `None` for ids not made by [`job_id`].
pub fn parse_job_id(job_id: &str) -> Option<(&str, u32)> {
    let (batch, index) = job_id.rsplit_once('-')?;
    if batch.is_empty() || index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((batch, index.parse().ok()?))
}

/// A new batch id: 16 lowercase hex digits (random), safe in keys, paths and job ids.
pub fn new_batch_id() -> String {
    let u = uuid::Uuid::new_v4();
    let b = u.as_bytes();
    b[..8].iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        let k = Keys::default();
        assert_eq!(k.model_jobs("tiny"), "rf:model:tiny:jobs");
        assert_eq!(k.batch("ab"), "rf:batch:ab");
        assert_eq!(k.batch_events("ab"), "rf:batch:ab:events");
        assert_eq!(k.job("ab-00001"), "rf:job:ab-00001");
        assert_eq!(k.job_result("ab-00001"), "rf:job:ab-00001:result");
        assert_eq!(k.idempotency("x"), "rf:idem:x");
        assert_eq!(Keys::new("t1").models(), "t1:models");
    }

    #[test]
    fn job_ids_round_trip() {
        let b = new_batch_id();
        assert_eq!(b.len(), 16);
        assert!(!b.contains('-'));
        for i in [0u32, 7, 99_999, 123_456] {
            let id = job_id(&b, i);
            assert_eq!(parse_job_id(&id), Some((b.as_str(), i)));
        }
        assert_eq!(job_id("ab", 3), "ab-00003");
        assert_eq!(parse_job_id("nodash"), None);
        assert_eq!(parse_job_id("ab-"), None);
        assert_eq!(parse_job_id("-1"), None);
        assert_eq!(parse_job_id("ab-1x"), None);
    }
}
