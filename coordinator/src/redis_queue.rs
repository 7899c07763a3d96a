//! The Redis Streams queue: batches, jobs, leases, the reaper, events.
//!
//! Everything that matters lives in Redis (see `keys` for the layout and `scripts` for the
//! atomic state changes), so any number of coordinators can share one Redis and a restarted
//! coordinator carries on. The only in-memory state is caches (connections, the set of consumer
//! groups already created).
//!
//! Two kinds of connections: a shared `ConnectionManager` (reconnects by itself; bounded
//! response timeout) for ordinary commands, and a small pool of dedicated connections without a
//! response timeout for blocking reads (`XREADGROUP BLOCK`, `XREAD BLOCK`): a blocking command
//! holds its whole connection, and redis-rs' default 500 ms response timeout would cut it short.

use crate::error::{redact_url, CoordError, Result};
use crate::events;
use crate::keys::{self, Keys, GROUP, REAPER_CONSUMER};
use crate::scripts::Scripts;
use crate::validation::ValidatedBatch;
use futures_util::StreamExt;
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Value};
use relayfarm_proto::v1::{
    Batch, BatchEvent, BatchState, ClaimedJob, CompleteJobRequest, JobInfo, JobState, ModelInfo,
    RegisterRequest, RenderParams,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Jobs written per pipeline when a batch is submitted.
const SUBMIT_CHUNK: usize = 1000;
/// Pipelines in flight at once when a batch is submitted.
const SUBMIT_CONCURRENCY: usize = 4;
/// Jobs visited per `CANCEL` script call (keeps each script short).
const CANCEL_CHUNK: u32 = 5000;
/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Dedicated blocking connections kept idle for reuse.
const MAX_IDLE_BLOCKING: usize = 64;

/// Queue settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// A claimed job whose lease was not renewed for this long is redelivered.
    pub lease_ms: u64,
    /// Deliveries of a job before it is dead-lettered.
    pub max_attempts: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease_ms: 10_000,
            max_attempts: 3,
        }
    }
}

impl QueueConfig {
    /// How often workers should heartbeat (a quarter of the lease, at least 50 ms).
    pub fn heartbeat_interval_ms(&self) -> u64 {
        (self.lease_ms / 4).max(50)
    }

    /// How long a worker registration lives without a heartbeat.
    pub fn worker_ttl_ms(&self) -> u64 {
        (self.lease_ms * 3).max(3000)
    }
}

/// What `submit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// The batch id.
    pub batch_id: String,
    /// Jobs in the batch.
    pub accepted: u32,
    /// The idempotency key matched an existing batch (nothing new was queued).
    pub deduplicated: bool,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeartbeatOutcome {
    /// Running jobs to stop.
    pub cancel_job_ids: Vec<String>,
    /// The worker is unknown: register again.
    pub reregister: bool,
}

/// What `fail`/`release` did to the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Back in the queue.
    Requeued,
    /// Failed for good (attempts exhausted or not retryable).
    DeadLettered,
    /// Its batch was cancelled: the job is cancelled.
    Cancelled,
    /// Nothing done (the job is not running on this worker, or already finished).
    Ignored(String),
}

/// A stream entry: id and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: String,
    fields: Vec<(String, String)>,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The Redis-backed queue. Cheap to share (`Arc`).
pub struct RedisQueue {
    client: redis::Client,
    url: String,
    keys: Keys,
    scripts: Scripts,
    cfg: QueueConfig,
    manager: RwLock<Option<ConnectionManager>>,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    groups: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("url", &self.url)
            .field("keys", &self.keys)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A dedicated connection for blocking reads; returned to the pool only after a clean reply
/// (a dropped future leaves the connection mid-command, so it is closed instead).
struct BlockingConn<'a> {
    queue: &'a RedisQueue,
    conn: Option<MultiplexedConnection>,
}

impl BlockingConn<'_> {
    fn conn(&mut self) -> Result<&mut MultiplexedConnection> {
        self.conn
            .as_mut()
            .ok_or_else(|| CoordError::RedisUnavailable {
                url: self.queue.url.clone(),
                detail: "blocking connection already released".into(),
            })
    }

    /// Returns the connection to the pool.
    fn done(mut self) {
        if let Some(c) = self.conn.take() {
            let mut pool = lock(&self.queue.blocking);
            if pool.len() < MAX_IDLE_BLOCKING {
                pool.push(c);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisQueue {
    /// A queue for `url` (not connected yet: call [`RedisQueue::connect`] or
    /// [`RedisQueue::spawn_connector`]). Fails only for a malformed URL.
    pub fn new(url: &str, keys: Keys, cfg: QueueConfig) -> Result<Arc<Self>> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map(|i| i.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
            .map_err(|e| {
                CoordError::Invalid(format!(
                    "--redis: {:?} is not a Redis URL: {e}",
                    redact_url(url)
                ))
            })?;
        let client = redis::Client::open(info).map_err(|e| {
            CoordError::Invalid(format!(
                "--redis: {:?} is not a Redis URL: {e}",
                redact_url(url)
            ))
        })?;
        Ok(Arc::new(RedisQueue {
            client,
            url: redact_url(url),
            keys,
            scripts: Scripts::default(),
            cfg,
            manager: RwLock::new(None),
            blocking: Mutex::new(Vec::new()),
            groups: Mutex::new(HashSet::new()),
        }))
    }

    /// The Redis URL (password removed).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The queue settings.
    pub fn config(&self) -> QueueConfig {
        self.cfg
    }

    /// Whether a connection has been established.
    pub fn is_connected(&self) -> bool {
        self.manager.read().map(|m| m.is_some()).unwrap_or(false)
    }

    fn unavailable(&self, detail: impl Into<String>) -> CoordError {
        CoordError::RedisUnavailable {
            url: self.url.clone(),
            detail: detail.into(),
        }
    }

    fn rerr(&self, e: redis::RedisError) -> CoordError {
        CoordError::from_redis(&self.url, &e)
    }

    /// Tries once to connect the shared connection.
    pub async fn connect(&self) -> Result<()> {
        if self.is_connected() {
            return Ok(());
        }
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let m = ConnectionManager::new_with_config(self.client.clone(), cfg)
            .await
            .map_err(|e| self.rerr(e))?;
        if let Ok(mut slot) = self.manager.write() {
            if slot.is_none() {
                *slot = Some(m);
            }
        }
        Ok(())
    }

    /// Connects in the background, retrying until it succeeds or `shutdown` fires.
    pub fn spawn_connector(self: &Arc<Self>, shutdown: CancellationToken) {
        let q = Arc::clone(self);
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match q.connect().await {
                    Ok(()) => {
                        tracing::info!(redis = %q.url, "connected to redis");
                        return;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(redis = %q.url, error = %e, "redis unreachable; retrying in the background");
                            warned = true;
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    /// The shared connection, or UNAVAILABLE while Redis has never been reached.
    fn conn(&self) -> Result<ConnectionManager> {
        self.manager
            .read()
            .ok()
            .and_then(|m| m.clone())
            .ok_or_else(|| self.unavailable("not connected yet"))
    }

    async fn blocking_conn(&self) -> Result<BlockingConn<'_>> {
        let pooled = lock(&self.blocking).pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                // Fail fast while the shared connection has not come up.
                self.conn()?;
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map_err(|e| self.rerr(e))?
            }
        };
        Ok(BlockingConn {
            queue: self,
            conn: Some(conn),
        })
    }

    /// Pings Redis.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn()?;
        redis::cmd("PING")
            .query_async::<Value>(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(())
    }

    /// Creates the consumer group of a model stream once (cached).
    async fn ensure_group(&self, model: &str) -> Result<()> {
        let key = self.keys.model_jobs(model);
        if lock(&self.groups).contains(&key) {
            return Ok(());
        }
        let mut c = self.conn()?;
        let r = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<Value>(&mut c)
            .await;
        match r {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(self.rerr(e)),
        }
        lock(&self.groups).insert(key);
        Ok(())
    }

    fn forget_groups(&self) {
        lock(&self.groups).clear();
    }

    // ----- models and workers -----

    /// The registered models (without worker counts).
    pub async fn models(&self) -> Result<BTreeMap<String, ModelInfo>> {
        let mut c = self.conn()?;
        let v: Value = redis::cmd("HGETALL")
            .arg(self.keys.models())
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        let mut out = BTreeMap::new();
        for (name, bytes) in pairs_bytes(&v) {
            let info = ModelInfo::decode(bytes.as_slice()).map_err(|e| CoordError::Corrupt {
                key: format!("{} {name}", self.keys.models()),
                detail: e.to_string(),
            })?;
            out.insert(name, info);
        }
        Ok(out)
    }

    /// The registered models with the number of live workers serving each.
    pub async fn models_with_workers(&self) -> Result<Vec<ModelInfo>> {
        let models = self.models().await?;
        let mut c = self.conn()?;
        let since = now_ms().saturating_sub(self.cfg.worker_ttl_ms());
        let mut pipe = redis::pipe();
        for name in models.keys() {
            pipe.cmd("ZCOUNT")
                .arg(self.keys.model_workers(name))
                .arg(since)
                .arg("+inf");
        }
        let counts: Vec<u64> = if models.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut c).await.map_err(|e| self.rerr(e))?
        };
        Ok(models
            .into_values()
            .zip(counts.into_iter().chain(std::iter::repeat(0)))
            .map(|(mut m, n)| {
                m.workers = n.min(u64::from(u32::MAX)) as u32;
                m
            })
            .collect())
    }

    /// Registers a worker and the models it serves.
    pub async fn register(&self, req: &RegisterRequest) -> Result<()> {
        check_name("worker_id", &req.worker_id)?;
        for (i, m) in req.models.iter().enumerate() {
            check_name(&format!("models[{i}].name"), &m.name)?;
        }
        let now = now_ms();
        let devices: Vec<String> = req
            .devices
            .iter()
            .map(|d| format!("{}:{}", d.name, d.memory_bytes))
            .collect();
        let names: Vec<&str> = req.models.iter().map(|m| m.name.as_str()).collect();
        let wkey = self.keys.worker(&req.worker_id);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&wkey)
            .arg("hostname")
            .arg(&req.hostname)
            .arg("devices")
            .arg(devices.join(","))
            .arg("models")
            .arg(names.join("\n"))
            .arg("registered_ms")
            .arg(now)
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&wkey)
            .arg(self.cfg.worker_ttl_ms())
            .ignore();
        for m in &req.models {
            let mut stored = m.clone();
            stored.workers = 0;
            pipe.cmd("HSET")
                .arg(self.keys.models())
                .arg(&m.name)
                .arg(stored.encode_to_vec())
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.keys.model_workers(&m.name))
                .arg(now)
                .arg(&req.worker_id)
                .ignore();
        }
        let mut c = self.conn()?;
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        for m in &req.models {
            self.ensure_group(&m.name).await?;
        }
        Ok(())
    }

    /// Renews a worker's registration and the leases of its running jobs.
    pub async fn heartbeat(&self, worker_id: &str, running: &[String]) -> Result<HeartbeatOutcome> {
        check_name("worker_id", worker_id)?;
        let mut c = self.conn()?;
        let mut inv = self.scripts.heartbeat.prepare_invoke();
        inv.arg(self.keys.prefix())
            .arg(worker_id)
            .arg(now_ms())
            .arg(self.cfg.worker_ttl_ms());
        for id in running {
            inv.arg(id);
        }
        let v: Value = inv.invoke_async(&mut c).await.map_err(|e| self.rerr(e))?;
        let a = arr(&v);
        let known = a.first().map(vint).unwrap_or(0) == 1;
        let cancel = a
            .get(1)
            .map(|x| arr(x).iter().map(vstr).collect())
            .unwrap_or_default();
        Ok(HeartbeatOutcome {
            cancel_job_ids: cancel,
            reregister: !known,
        })
    }

    /// The models a worker registered (empty when it is unknown).
    pub async fn worker_models(&self, worker_id: &str) -> Result<Vec<String>> {
        check_name("worker_id", worker_id)?;
        let mut c = self.conn()?;
        let models: Option<String> = redis::cmd("HGET")
            .arg(self.keys.worker(worker_id))
            .arg("models")
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(models
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Forgets a worker (its running jobs should have been released first).
    pub async fn deregister(&self, worker_id: &str) -> Result<()> {
        check_name("worker_id", worker_id)?;
        let mut c = self.conn()?;
        let wkey = self.keys.worker(worker_id);
        let models: Option<String> = redis::cmd("HGET")
            .arg(&wkey)
            .arg("models")
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        let mut pipe = redis::pipe();
        for m in models.unwrap_or_default().lines() {
            pipe.cmd("ZREM")
                .arg(self.keys.model_workers(m))
                .arg(worker_id)
                .ignore();
        }
        pipe.cmd("DEL").arg(&wkey).ignore();
        pipe.query_async::<()>(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(())
    }

    // ----- batches -----

    /// Stores a validated batch and queues its jobs (pipelined in chunks).
    pub async fn submit(&self, batch: &ValidatedBatch) -> Result<SubmitOutcome> {
        let mut c = self.conn()?;
        let total = u32::try_from(batch.jobs.len())
            .map_err(|_| CoordError::Invalid("prompts: too many prompts".into()))?;
        let mut batch_id = keys::new_batch_id();
        if !batch.idempotency_key.is_empty() {
            let ikey = self.keys.idempotency(&batch.idempotency_key);
            let set: Option<String> = redis::cmd("SET")
                .arg(&ikey)
                .arg(&batch_id)
                .arg("NX")
                .arg("PX")
                .arg(IDEMPOTENCY_TTL_MS)
                .query_async(&mut c)
                .await
                .map_err(|e| self.rerr(e))?;
            if set.is_none() {
                let existing: Option<String> = redis::cmd("GET")
                    .arg(&ikey)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| self.rerr(e))?;
                if let Some(existing) = existing {
                    let v: Vec<Option<String>> = redis::cmd("HMGET")
                        .arg(self.keys.batch(&existing))
                        .arg(&["total", "sealed", "model"])
                        .query_async(&mut c)
                        .await
                        .map_err(|e| self.rerr(e))?;
                    let get = |i: usize| v.get(i).cloned().flatten();
                    let stored_total = get(0).and_then(|t| t.parse::<u32>().ok());
                    if get(1).as_deref() == Some("1") {
                        return Ok(SubmitOutcome {
                            batch_id: existing,
                            accepted: stored_total.unwrap_or(total),
                            deduplicated: true,
                        });
                    }
                    if let (Some(t), Some(m)) = (stored_total, get(2)) {
                        if t != total || m != batch.model {
                            return Err(CoordError::Invalid(format!(
                                "header.idempotency_key: already used for batch `{existing}` \
                                 ({t} prompts for model `{m}`), not for these {total} prompts \
                                 for `{}`",
                                batch.model
                            )));
                        }
                    }
                    // An earlier submission with this key did not finish (or is still being
                    // written): complete it, idempotently.
                    return self.write_batch(&mut c, &existing, batch, true).await;
                }
                // The key expired between SET and GET: take it now.
                batch_id = keys::new_batch_id();
                redis::cmd("SET")
                    .arg(&ikey)
                    .arg(&batch_id)
                    .arg("PX")
                    .arg(IDEMPOTENCY_TTL_MS)
                    .query_async::<()>(&mut c)
                    .await
                    .map_err(|e| self.rerr(e))?;
            }
        }
        self.write_batch(&mut c, &batch_id, batch, false).await
    }

    /// Writes a batch record and its jobs, queues them and seals the batch. With `resume`,
    /// jobs that already exist are left alone (a retry of an interrupted submission).
    async fn write_batch(
        &self,
        c: &mut ConnectionManager,
        batch_id: &str,
        batch: &ValidatedBatch,
        resume: bool,
    ) -> Result<SubmitOutcome> {
        let total = u32::try_from(batch.jobs.len())
            .map_err(|_| CoordError::Invalid("prompts: too many prompts".into()))?;
        let batch_id = batch_id.to_string();
        self.ensure_group(&batch.model).await?;
        let created = now_ms();
        let bkey = self.keys.batch(&batch_id);
        let fields: [(&str, String); 10] = [
            ("model", batch.model.clone()),
            ("label", batch.label.clone()),
            ("total", total.to_string()),
            ("sealed", "0".into()),
            ("created_ms", created.to_string()),
            ("nb", u8::from(batch.no_resolution_binning).to_string()),
            ("done", "0".into()),
            ("failed", "0".into()),
            ("cancelled", "0".into()),
            ("running", "0".into()),
        ];
        let mut pipe = redis::pipe();
        if resume {
            // Keep whatever an interrupted submission already wrote.
            for (k, v) in &fields {
                pipe.cmd("HSETNX").arg(&bkey).arg(k).arg(v).ignore();
            }
            pipe.cmd("ZADD")
                .arg(self.keys.batches())
                .arg("NX")
                .arg(created)
                .arg(&batch_id)
                .ignore();
        } else {
            pipe.cmd("HSET").arg(&bkey).arg(&fields[..]).ignore();
            pipe.cmd("ZADD")
                .arg(self.keys.batches())
                .arg(created)
                .arg(&batch_id)
                .ignore();
        }
        pipe.query_async::<()>(c).await.map_err(|e| self.rerr(e))?;

        let stream = self.keys.model_jobs(&batch.model);
        let events_key = self.keys.batch_events(&batch_id);
        let nb = u8::from(batch.no_resolution_binning);
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        for chunk in batch.jobs.chunks(SUBMIT_CHUNK) {
            if resume {
                let mut inv = self.scripts.resume.prepare_invoke();
                inv.arg(self.keys.prefix())
                    .arg(&batch_id)
                    .arg(&batch.model)
                    .arg(nb);
                for j in chunk {
                    inv.arg(j.index)
                        .arg(&j.prompt)
                        .arg(&j.name)
                        .arg(&j.negative_prompt)
                        .arg(j.height)
                        .arg(j.width)
                        .arg(j.steps)
                        .arg(j.guidance.to_string())
                        .arg(j.seed.to_string());
                }
                inv.invoke_async::<Value>(c)
                    .await
                    .map_err(|e| self.rerr(e))?;
                continue;
            }
            let mut pipe = redis::pipe();
            for j in chunk {
                let id = keys::job_id(&batch_id, j.index);
                pipe.cmd("HSET")
                    .arg(self.keys.job(&id))
                    .arg("b")
                    .arg(&batch_id)
                    .arg("i")
                    .arg(j.index)
                    .arg("m")
                    .arg(&batch.model)
                    .arg("p")
                    .arg(&j.prompt)
                    .arg("n")
                    .arg(&j.name)
                    .arg("np")
                    .arg(&j.negative_prompt)
                    .arg("h")
                    .arg(j.height)
                    .arg("w")
                    .arg(j.width)
                    .arg("st")
                    .arg(j.steps)
                    .arg("g")
                    .arg(j.guidance.to_string())
                    .arg("sd")
                    .arg(j.seed.to_string())
                    .arg("nb")
                    .arg(nb)
                    .arg("s")
                    .arg("queued")
                    .arg("a")
                    .arg(0)
                    .arg("en")
                    .arg("")
                    .ignore();
                pipe.cmd("XADD")
                    .arg(&events_key)
                    .arg("*")
                    .arg("k")
                    .arg("q")
                    .arg("j")
                    .arg(&id)
                    .arg("x")
                    .arg(j.index)
                    .ignore();
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("j")
                    .arg(&id)
                    .ignore();
            }
            let mut c = c.clone();
            inflight.push(async move { pipe.query_async::<()>(&mut c).await });
            if inflight.len() >= SUBMIT_CONCURRENCY {
                if let Some(r) = inflight.next().await {
                    r.map_err(|e| self.rerr(e))?;
                }
            }
        }
        while let Some(r) = inflight.next().await {
            r.map_err(|e| self.rerr(e))?;
        }
        self.scripts
            .seal
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(&batch_id)
            .invoke_async::<Value>(c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(SubmitOutcome {
            batch_id,
            accepted: total,
            deduplicated: resume,
        })
    }

    /// Whether a batch exists.
    pub async fn batch_exists(&self, batch_id: &str) -> Result<bool> {
        let mut c = self.conn()?;
        let n: u32 = redis::cmd("EXISTS")
            .arg(self.keys.batch(batch_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(n == 1)
    }

    /// A batch's record (and its jobs when asked).
    pub async fn get_batch(&self, batch_id: &str, include_jobs: bool) -> Result<Batch> {
        let mut c = self.conn()?;
        let v: Value = redis::cmd("HGETALL")
            .arg(self.keys.batch(batch_id))
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        let fields = pairs(&v);
        if fields.is_empty() {
            return Err(CoordError::NotFound(format!(
                "batch_id: no batch `{batch_id}`"
            )));
        }
        let mut batch = batch_from_fields(batch_id, &fields);
        if include_jobs {
            batch.jobs = self.jobs_of(&mut c, batch_id, batch.total).await?;
        }
        Ok(batch)
    }

    async fn jobs_of(
        &self,
        c: &mut ConnectionManager,
        batch_id: &str,
        total: u32,
    ) -> Result<Vec<JobInfo>> {
        let mut jobs = Vec::with_capacity(total as usize);
        let mut start = 0u32;
        while start < total {
            let end = total.min(start + SUBMIT_CHUNK as u32);
            let mut pipe = redis::pipe();
            for i in start..end {
                pipe.cmd("HMGET")
                    .arg(self.keys.job(&keys::job_id(batch_id, i)))
                    .arg(&["p", "s", "r", "e", "a", "n"]);
            }
            let rows: Vec<Value> = pipe.query_async(c).await.map_err(|e| self.rerr(e))?;
            for (i, row) in (start..end).zip(rows) {
                let f: Vec<String> = arr(&row).iter().map(vstr).collect();
                let g = |k: usize| f.get(k).cloned().unwrap_or_default();
                jobs.push(JobInfo {
                    job_id: keys::job_id(batch_id, i),
                    index: i,
                    prompt: g(0),
                    state: job_state(&g(1)) as i32,
                    image_ref: g(2),
                    error: g(3),
                    attempts: g(4).parse().unwrap_or(0),
                    name: g(5),
                });
            }
            start = end;
        }
        Ok(jobs)
    }

    /// The newest batches first.
    pub async fn list_batches(&self, limit: u32) -> Result<Vec<Batch>> {
        let limit = if limit == 0 { 50 } else { limit.min(10_000) };
        let mut c = self.conn()?;
        let ids: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.keys.batches())
            .arg(0)
            .arg(limit - 1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.keys.batch(id));
        }
        let rows: Vec<Value> = pipe.query_async(&mut c).await.map_err(|e| self.rerr(e))?;
        Ok(ids
            .iter()
            .zip(rows)
            .filter_map(|(id, v)| {
                let f = pairs(&v);
                (!f.is_empty()).then(|| batch_from_fields(id, &f))
            })
            .collect())
    }

    /// Cancels a batch: queued jobs are cancelled now, running ones are told to stop.
    /// Returns (cancelled pending, still running).
    pub async fn cancel_batch(&self, batch_id: &str) -> Result<(u32, u32)> {
        let mut c = self.conn()?;
        let total: Option<u32> = redis::cmd("HGET")
            .arg(self.keys.batch(batch_id))
            .arg("total")
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        let Some(total) = total else {
            return Err(CoordError::NotFound(format!(
                "batch_id: no batch `{batch_id}`"
            )));
        };
        let (mut pending, mut running) = (0u32, 0u32);
        let mut start = 0u32;
        loop {
            let end = total.min(start.saturating_add(CANCEL_CHUNK));
            let v: Value = self
                .scripts
                .cancel
                .prepare_invoke()
                .arg(self.keys.prefix())
                .arg(batch_id)
                .arg(start)
                .arg(end)
                .invoke_async(&mut c)
                .await
                .map_err(|e| self.rerr(e))?;
            let a = arr(&v);
            let p = a.first().map(vint).unwrap_or(0);
            if p < 0 {
                return Err(CoordError::NotFound(format!(
                    "batch_id: no batch `{batch_id}`"
                )));
            }
            pending += p as u32;
            running += a.get(1).map(vint).unwrap_or(0).max(0) as u32;
            if end >= total {
                break;
            }
            start = end;
        }
        Ok((pending, running))
    }

    // ----- jobs -----

    /// Claims the next job of `models` for `worker_id`, waiting up to `wait` for one.
    pub async fn claim(
        &self,
        worker_id: &str,
        models: &[String],
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<ClaimedJob>> {
        check_name("worker_id", worker_id)?;
        if models.is_empty() {
            return Err(CoordError::Invalid(
                "models: name at least one model to claim from".into(),
            ));
        }
        for m in models {
            self.ensure_group(m).await?;
        }
        let streams: Vec<String> = models.iter().map(|m| self.keys.model_jobs(m)).collect();
        let deadline = Instant::now() + wait;
        let mut first = true;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !first && remaining.is_zero() {
                return Ok(None);
            }
            first = false;
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(worker_id)
                .arg("COUNT")
                .arg(1);
            let block_ms = remaining.as_millis() as u64;
            if block_ms > 0 {
                cmd.arg("BLOCK").arg(block_ms);
            }
            cmd.arg("STREAMS").arg(&streams);
            for _ in &streams {
                cmd.arg(">");
            }
            let mut bc = self.blocking_conn().await?;
            let reply = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                r = cmd.query_async::<Value>(bc.conn()?) => r,
            };
            let reply = match reply {
                Ok(v) => {
                    bc.done();
                    v
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    bc.done();
                    self.forget_groups();
                    for m in models {
                        self.ensure_group(m).await?;
                    }
                    continue;
                }
                Err(e) => {
                    // Pooled connections may all be dead (Redis restarted): start afresh.
                    lock(&self.blocking).clear();
                    return Err(self.rerr(e));
                }
            };
            let mut claimed = None;
            for (stream, entries) in parse_read(&reply) {
                let Some(model) = models
                    .iter()
                    .zip(&streams)
                    .find(|(_, s)| **s == stream)
                    .map(|(m, _)| m.clone())
                else {
                    continue;
                };
                for e in entries {
                    if claimed.is_some() {
                        // Over-delivery (one entry per stream): give it back at once.
                        self.requeue_entry(&model, &e, "extra", "").await?;
                        continue;
                    }
                    claimed = self.claim_entry(worker_id, &model, &e).await?;
                }
            }
            if claimed.is_some() {
                return Ok(claimed);
            }
        }
    }

    async fn claim_entry(
        &self,
        worker_id: &str,
        model: &str,
        e: &Entry,
    ) -> Result<Option<ClaimedJob>> {
        let job_id = e.field("j").unwrap_or_default().to_string();
        let mut c = self.conn()?;
        let v: Value = self
            .scripts
            .claim
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(worker_id)
            .arg(model)
            .arg(&e.id)
            .arg(now_ms())
            .arg(&job_id)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        let a = arr(&v);
        if a.first().map(vint) != Some(1) {
            return Ok(None);
        }
        let f: Vec<String> = a.iter().skip(1).map(vstr).collect();
        let g = |k: usize| f.get(k).cloned().unwrap_or_default();
        let num = |k: usize| g(k).parse::<u32>().unwrap_or(0);
        let (batch_id, index) = keys::parse_job_id(&job_id)
            .map(|(b, i)| (b.to_string(), i))
            .unwrap_or_default();
        Ok(Some(ClaimedJob {
            job_id: job_id.clone(),
            batch_id,
            index,
            model: model.to_string(),
            prompt: g(1),
            params: Some(RenderParams {
                negative_prompt: Some(g(3)),
                height: Some(num(4)),
                width: Some(num(5)),
                steps: Some(num(6)),
                guidance: Some(g(7).parse().unwrap_or(0.0)),
                seed: Some(g(8).parse().unwrap_or(0)),
            }),
            name: g(2),
            attempt: num(0),
            no_resolution_binning: g(9) == "1",
        }))
    }

    async fn requeue_entry(
        &self,
        model: &str,
        e: &Entry,
        mode: &str,
        reason: &str,
    ) -> Result<String> {
        let job_id = e.field("j").unwrap_or_default();
        let mut c = self.conn()?;
        let v: Value = self
            .scripts
            .requeue
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(job_id)
            .arg(mode)
            .arg(reason)
            .arg(self.cfg.max_attempts)
            .arg("")
            .arg(&e.id)
            .arg(model)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(vstr(&v))
    }

    async fn requeue_job(
        &self,
        worker_id: &str,
        job_id: &str,
        mode: &str,
        reason: &str,
    ) -> Result<RequeueOutcome> {
        check_name("worker_id", worker_id)?;
        let mut c = self.conn()?;
        let v: Value = self
            .scripts
            .requeue
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(job_id)
            .arg(mode)
            .arg(reason)
            .arg(self.cfg.max_attempts)
            .arg(worker_id)
            .arg("")
            .arg("")
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(match vstr(&v).as_str() {
            "requeued" => RequeueOutcome::Requeued,
            "dead" => RequeueOutcome::DeadLettered,
            "cancelled" => RequeueOutcome::Cancelled,
            other => RequeueOutcome::Ignored(other.to_string()),
        })
    }

    /// A worker failed a job: retry it (until attempts run out) or dead-letter it now.
    pub async fn fail(
        &self,
        worker_id: &str,
        job_id: &str,
        reason: &str,
        retryable: bool,
    ) -> Result<RequeueOutcome> {
        let mode = if retryable { "fail" } else { "fatal" };
        let reason = if reason.is_empty() {
            "worker reported a failure"
        } else {
            reason
        };
        self.requeue_job(worker_id, job_id, mode, reason).await
    }

    /// A worker gives a job back unfinished: redelivered at once, attempt not counted.
    pub async fn release(&self, worker_id: &str, job_id: &str) -> Result<RequeueOutcome> {
        self.requeue_job(worker_id, job_id, "release", "released by worker")
            .await
    }

    /// Records a finished image. True when this completion won (first for the job).
    pub async fn complete(&self, req: &CompleteJobRequest) -> Result<bool> {
        let CompleteJobRequest {
            worker_id,
            job_id,
            image_ref,
            width,
            height,
            seed,
            bytes,
        } = req;
        if image_ref.is_empty() {
            return Err(CoordError::Invalid("image_ref: empty".into()));
        }
        let mut c = self.conn()?;
        let v: Value = self
            .scripts
            .complete
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(job_id)
            .arg(image_ref)
            .arg(width)
            .arg(height)
            .arg(seed.to_string())
            .arg(bytes.to_string())
            .arg(worker_id)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        match vint(&v) {
            -1 => Err(CoordError::NotFound(format!("job_id: no job `{job_id}`"))),
            n => Ok(n == 1),
        }
    }

    /// Step progress; true when the job must stop (cancelled).
    pub async fn progress(
        &self,
        worker_id: &str,
        job_id: &str,
        step: u32,
        total: u32,
    ) -> Result<bool> {
        let mut c = self.conn()?;
        let v: Value = self
            .scripts
            .progress
            .prepare_invoke()
            .arg(self.keys.prefix())
            .arg(job_id)
            .arg(worker_id)
            .arg(step)
            .arg(total)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(vint(&v) == 1)
    }

    /// One reaper pass: entries idle longer than the lease are re-queued (or dead-lettered).
    /// Returns how many entries were acted on.
    pub async fn reap_once(&self) -> Result<usize> {
        let models = self.models().await?;
        let mut acted = 0;
        for model in models.keys() {
            let stream = self.keys.model_jobs(model);
            let mut cursor = "0-0".to_string();
            for _ in 0..1000 {
                let mut c = self.conn()?;
                let r = redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(REAPER_CONSUMER)
                    .arg(self.cfg.lease_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(100)
                    .query_async::<Value>(&mut c)
                    .await;
                let v = match r {
                    Ok(v) => v,
                    Err(e) if e.code() == Some("NOGROUP") => break,
                    Err(e) => return Err(self.rerr(e)),
                };
                let a = arr(&v);
                let next = a.first().map(vstr).unwrap_or_else(|| "0-0".into());
                let entries = a.get(1).map(parse_entries).unwrap_or_default();
                for e in &entries {
                    let reason = format!(
                        "lease expired (no heartbeat for {} ms; worker presumed dead)",
                        self.cfg.lease_ms
                    );
                    let what = self.requeue_entry(model, e, "reap", &reason).await?;
                    tracing::info!(model = %model, entry = %e.id, job = e.field("j").unwrap_or_default(), outcome = %what, "reaped");
                    acted += 1;
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(acted)
    }

    /// Runs the reaper every quarter lease until `shutdown`.
    pub fn spawn_reaper(self: &Arc<Self>, shutdown: CancellationToken) {
        let q = Arc::clone(self);
        tokio::spawn(async move {
            let period = Duration::from_millis((q.cfg.lease_ms / 4).max(50));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                if !q.is_connected() {
                    continue;
                }
                if let Err(e) = q.reap_once().await {
                    tracing::warn!(error = %e, "reaper pass failed");
                }
            }
        });
    }

    // ----- events -----

    /// Reads events after `after` ("" = from the start), blocking up to `block` when there are
    /// none yet. Returns an empty list on timeout.
    pub async fn read_events(
        &self,
        batch_id: &str,
        after: &str,
        block: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<BatchEvent>> {
        let after = if after.is_empty() { "0-0" } else { after };
        let key = self.keys.batch_events(batch_id);
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1000);
        let block_ms = block.as_millis() as u64;
        if block_ms > 0 {
            cmd.arg("BLOCK").arg(block_ms);
        }
        cmd.arg("STREAMS").arg(&key).arg(after);
        let mut bc = self.blocking_conn().await?;
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return Err(CoordError::ShuttingDown),
            r = cmd.query_async::<Value>(bc.conn()?) => r.map_err(|e| {
                lock(&self.blocking).clear();
                self.rerr(e)
            })?,
        };
        bc.done();
        let mut out = Vec::new();
        for (_, entries) in parse_read(&reply) {
            for e in entries {
                let ev = events::decode(batch_id, &e.id, &e.fields).map_err(|d| {
                    CoordError::Corrupt {
                        key: key.clone(),
                        detail: d,
                    }
                })?;
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Dead-lettered entries (job id, batch id, reason), oldest first; for tests and tools.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<(String, String, String)>> {
        let mut c = self.conn()?;
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.dead_letter())
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await
            .map_err(|e| self.rerr(e))?;
        Ok(parse_entries(&v)
            .into_iter()
            .map(|e| {
                let g = |k| e.field(k).unwrap_or_default().to_string();
                (g("j"), g("b"), g("r"))
            })
            .collect())
    }
}

/// Names used inside keys: non-empty, at most 128 bytes, no whitespace, control characters or colons.
fn check_name(field: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(CoordError::Invalid(format!("{field}: empty")));
    }
    if v.len() > 128
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(CoordError::Invalid(format!(
            "{field}: {v:?} must be at most 128 bytes without spaces, control characters or ':'"
        )));
    }
    Ok(())
}

fn job_state(s: &str) -> JobState {
    match s {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "done" => JobState::Done,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => JobState::Unspecified,
    }
}

fn batch_from_fields(batch_id: &str, f: &[(String, String)]) -> Batch {
    let get = |k: &str| -> &str {
        f.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let n = |k: &str| {
        get(k)
            .parse::<i64>()
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32
    };
    let total = n("total");
    let (done, failed, cancelled, running) = (n("done"), n("failed"), n("cancelled"), n("running"));
    let state = if get("xc") == "1" {
        BatchState::Cancelled
    } else if get("done_emitted") == "1" {
        BatchState::Done
    } else {
        BatchState::Active
    };
    Batch {
        batch_id: batch_id.to_string(),
        model: get("model").to_string(),
        label: get("label").to_string(),
        state: state as i32,
        total,
        queued: total.saturating_sub(done + failed + cancelled + running),
        running,
        done,
        failed,
        cancelled,
        created_unix_ms: get("created_ms").parse().unwrap_or(0),
        jobs: Vec::new(),
    }
}

// ----- reply parsing (RESP2 and RESP3 shapes) -----

fn vstr(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        Value::Boolean(b) => u8::from(*b).to_string(),
        Value::VerbatimString { text, .. } => text.clone(),
        _ => String::new(),
    }
}

fn vint(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => vstr(other).parse().unwrap_or(0),
    }
}

fn arr(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (vstr(k), vstr(v))).collect(),
        other => arr(other)
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (vstr(&c[0]), vstr(&c[1])))
            .collect(),
    }
}

fn bytes_of(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => vstr(other).into_bytes(),
    }
}

fn pairs_bytes(v: &Value) -> Vec<(String, Vec<u8>)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (vstr(k), bytes_of(v))).collect(),
        other => arr(other)
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (vstr(&c[0]), bytes_of(&c[1])))
            .collect(),
    }
}

/// `[[id, [f, v, ...]], ...]` → entries (entries whose content was deleted are skipped).
fn parse_entries(v: &Value) -> Vec<Entry> {
    arr(v)
        .iter()
        .filter_map(|e| {
            let a = arr(e);
            let id = vstr(a.first()?);
            let fields = a.get(1)?;
            if matches!(fields, Value::Nil) {
                return None;
            }
            Some(Entry {
                id,
                fields: pairs(fields),
            })
        })
        .collect()
}

/// XREAD/XREADGROUP reply → (stream, entries).
fn parse_read(v: &Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, e)| (vstr(k), parse_entries(e))).collect(),
        other => arr(other)
            .iter()
            .filter_map(|s| {
                let a = arr(s);
                Some((vstr(a.first()?), parse_entries(a.get(1)?)))
            })
            .collect(),
    }
}
