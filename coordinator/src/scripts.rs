//! Lua scripts: every job state change is one atomic script, so several coordinators (and
//! their reapers) can act on the same Redis at once without double counting or double events.
//!
//! Job states (`s` in `rf:job:{id}`): `queued` → `running` → `done` | `failed` | `cancelled`
//! (a running job may go back to `queued` when its lease expires or it fails retryably).
//! `en` is the job's current stream entry ("" until first delivered); a stream entry that is
//! not the job's current one is a stale duplicate and is dropped (XACK + XDEL) when met.
//! Batch counters (`done`, `failed`, `cancelled`, `running`) change only inside `finish`,
//! which refuses a job that is already terminal: hence one terminal event per job, and one
//! `BatchDone` per batch (guarded by `HSETNX done_emitted`).
//!
//! ARGV[1] is always the key prefix (see `keys`); key names are built as in `keys.rs`.

/// Helpers shared by every script.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function jobkey(id) return P .. ':job:' .. id end
local function batchkey(b) return P .. ':batch:' .. b end
local function evkey(b) return P .. ':batch:' .. b .. ':events' end
local function streamkey(m) return P .. ':model:' .. m .. ':jobs' end
local function split_job(id)
  local b, i = string.match(id, '^(.+)%-(%d+)$')
  return b, tonumber(i)
end
local function drop_entry(m, entry)
  if m and entry and entry ~= '' then
    local sk = streamkey(m)
    redis.call('XACK', sk, 'workers', entry)
    redis.call('XDEL', sk, entry)
  end
end
local function done_check(b)
  local bk = batchkey(b)
  local v = redis.call('HMGET', bk, 'sealed', 'total', 'done', 'failed', 'cancelled')
  if v[1] ~= '1' then return end
  local total = tonumber(v[2]) or 0
  local d = tonumber(v[3]) or 0
  local f = tonumber(v[4]) or 0
  local c = tonumber(v[5]) or 0
  if d + f + c >= total and redis.call('HSETNX', bk, 'done_emitted', '1') == 1 then
    redis.call('XADD', evkey(b), '*', 'k', 'd', 'j', '', 'x', '0', 'd', d, 'f', f, 'c', c)
  end
end
local function is_terminal(s)
  return s == 'done' or s == 'failed' or s == 'cancelled'
end
-- Moves a job to a terminal state, counts it, emits its event, drops its stream entry and
-- checks whether the batch is done. False when the job is unknown or already terminal.
local function finish(id, state, ev)
  local jk = jobkey(id)
  local s, m, en = unpack(redis.call('HMGET', jk, 's', 'm', 'en'))
  if (not s) or is_terminal(s) then return false end
  local b, idx = split_job(id)
  local bk = batchkey(b)
  if s == 'running' then redis.call('HINCRBY', bk, 'running', -1) end
  redis.call('HSET', jk, 's', state)
  redis.call('HINCRBY', bk, state, 1)
  local fields = {'k', ev[1], 'j', id, 'x', idx}
  for i = 2, #ev do fields[#fields + 1] = ev[i] end
  redis.call('XADD', evkey(b), '*', unpack(fields))
  drop_entry(m, en)
  done_check(b)
  return true
end
local function batch_cancelled(b)
  return b ~= nil and redis.call('HGET', batchkey(b), 'xc') == '1'
end
"#;

/// Builds a script from the prelude and a body.
fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}\n{body}"))
}

/// Claim a delivered stream entry for a worker.
/// ARGV: prefix, worker, model, entry, now_ms, job id.
/// Returns `{0}` (skipped) or `{1, attempt, prompt, name, negative, h, w, steps, guidance, seed, no_binning}`.
const CLAIM: &str = r#"
local worker, model, entry, now, id = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local jk = jobkey(id)
local s, en = unpack(redis.call('HMGET', jk, 's', 'en'))
if not s then drop_entry(model, entry) return {0} end
if not en then en = '' end
if s ~= 'queued' then
  if en ~= entry then drop_entry(model, entry) end
  return {0}
end
if en ~= '' and en ~= entry then drop_entry(model, entry) return {0} end
local b, idx = split_job(id)
redis.call('HSET', jk, 'en', entry)
if batch_cancelled(b) then
  finish(id, 'cancelled', {'c'})
  return {0}
end
local a = redis.call('HINCRBY', jk, 'a', 1)
redis.call('HSET', jk, 's', 'running', 'wk', worker, 'since', now)
redis.call('HINCRBY', batchkey(b), 'running', 1)
redis.call('XADD', evkey(b), '*', 'k', 's', 'j', id, 'x', idx, 'w', worker, 'a', a)
local f = redis.call('HMGET', jk, 'p', 'n', 'np', 'h', 'w', 'st', 'g', 'sd', 'nb')
return {1, a, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9]}
"#;

/// Give a job back or fail it.
/// ARGV: prefix, job id, mode, reason, max_attempts, worker, entry, model.
/// Modes: `reap` / `extra` (entry-based: a lease expired, or an entry delivered but not
/// claimed), `fail` (retryable), `fatal` (dead-letter now), `release` (attempt not counted).
/// Returns a status word: requeued, redelivered, dead, cancelled, stale, terminal, gone,
/// not_running, not_owner.
const REQUEUE: &str = r#"
local id, mode, reason, maxa, worker, entry, model_arg = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local jk = jobkey(id)
local s, en, wk, m, a = unpack(redis.call('HMGET', jk, 's', 'en', 'wk', 'm', 'a'))
if not s then drop_entry(model_arg, entry) return 'gone' end
if not en then en = '' end
a = tonumber(a) or 0
if mode == 'reap' or mode == 'extra' then
  if s == 'running' then
    if en ~= entry then drop_entry(m, entry) return 'stale' end
  elseif s == 'queued' then
    if en ~= '' and en ~= entry then drop_entry(m, entry) return 'stale' end
    drop_entry(m, entry)
    local ne = redis.call('XADD', streamkey(m), '*', 'j', id)
    redis.call('HSET', jk, 'en', ne)
    return 'redelivered'
  else
    drop_entry(m, entry)
    return 'terminal'
  end
else
  if s ~= 'running' then return 'not_running' end
  if wk ~= worker then return 'not_owner' end
end
local b, idx = split_job(id)
if batch_cancelled(b) then
  finish(id, 'cancelled', {'c'})
  return 'cancelled'
end
if mode == 'release' then
  a = math.max(a - 1, 0)
  redis.call('HSET', jk, 'a', a)
else
  redis.call('HSET', jk, 'e', reason)
end
if mode == 'fatal' or (mode ~= 'release' and a >= maxa) then
  local why = reason
  if mode ~= 'fatal' then why = 'dead-lettered after ' .. a .. ' attempts: ' .. reason end
  redis.call('HSET', jk, 'e', why)
  redis.call('XADD', P .. ':deadletter', '*', 'j', id, 'b', b, 'r', why)
  finish(id, 'failed', {'f', 'r', why, 'a', a})
  return 'dead'
end
drop_entry(m, en)
redis.call('HINCRBY', batchkey(b), 'running', -1)
local ne = redis.call('XADD', streamkey(m), '*', 'j', id)
redis.call('HSET', jk, 's', 'queued', 'en', ne, 'wk', '')
redis.call('XADD', evkey(b), '*', 'k', 'q', 'j', id, 'x', idx)
return 'requeued'
"#;

/// Record a finished image: the first completion wins (`SET NX` on the result key).
/// ARGV: prefix, job id, image ref, width, height, seed, bytes, worker.
/// Returns 1 (accepted), 0 (already finished), -1 (unknown job).
const COMPLETE: &str = r#"
local id, ref = ARGV[2], ARGV[3]
local jk = jobkey(id)
local s = redis.call('HGET', jk, 's')
if not s then return -1 end
if is_terminal(s) then return 0 end
if not redis.call('SET', jk .. ':result', ref, 'NX') then return 0 end
redis.call('HSET', jk, 'r', ref, 'wk', ARGV[8])
finish(id, 'done', {'i', 'r', ref, 'w', ARGV[4], 'h', ARGV[5], 'sd', ARGV[6], 'b', ARGV[7]})
return 1
"#;

/// Heartbeat: refresh the worker's registration and renew the leases of its running jobs
/// (XCLAIM to the same consumer resets the idle time); report jobs to stop.
/// ARGV: prefix, worker, now_ms, worker_ttl_ms, job ids...
/// Returns `{known (0/1), {job ids to cancel}}`.
const HEARTBEAT: &str = r#"
local worker, now, ttl = ARGV[2], ARGV[3], ARGV[4]
local wkey = P .. ':worker:' .. worker
local known = redis.call('EXISTS', wkey)
if known == 1 then
  redis.call('PEXPIRE', wkey, ttl)
  local models = redis.call('HGET', wkey, 'models')
  if models then
    for m in string.gmatch(models, '[^\n]+') do
      redis.call('ZADD', P .. ':model:' .. m .. ':workers', now, worker)
    end
  end
end
local cancel = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local s, wk, en, m = unpack(redis.call('HMGET', jobkey(id), 's', 'wk', 'en', 'm'))
  local b = split_job(id)
  if s == 'cancelled' or (s == 'running' and batch_cancelled(b)) then
    cancel[#cancel + 1] = id
  elseif s == 'running' and wk == worker and en and en ~= '' then
    redis.pcall('XCLAIM', streamkey(m), 'workers', worker, 0, en, 'JUSTID')
  end
end
return {known, cancel}
"#;

/// Step progress: emit an event while the job runs on this worker; 1 when it must stop.
/// ARGV: prefix, job id, worker, step, total.
const PROGRESS: &str = r#"
local id, worker = ARGV[2], ARGV[3]
local s, wk = unpack(redis.call('HMGET', jobkey(id), 's', 'wk'))
local b, idx = split_job(id)
if s == 'cancelled' or (s == 'running' and batch_cancelled(b)) then return 1 end
if s == 'running' and wk == worker then
  redis.call('XADD', evkey(b), '*', 'k', 'p', 'j', id, 'x', idx, 'st', ARGV[4], 't', ARGV[5])
end
return 0
"#;

/// Cancel a batch: flag it and cancel its queued jobs with index in [from, to).
/// ARGV: prefix, batch id, from, to. Returns `{cancelled_pending, running}`, or `{-1, 0}`
/// when the batch does not exist.
const CANCEL: &str = r#"
local b, from, to = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local bk = batchkey(b)
if redis.call('EXISTS', bk) == 0 then return {-1, 0} end
if redis.call('HGET', bk, 'done_emitted') == '1' then return {0, 0} end
redis.call('HSET', bk, 'xc', '1')
local pend, run = 0, 0
for i = from, to - 1 do
  local id = string.format('%s-%05d', b, i)
  local s = redis.call('HGET', jobkey(id), 's')
  if s == 'queued' then
    if finish(id, 'cancelled', {'c'}) then pend = pend + 1 end
  elseif s == 'running' then
    run = run + 1
  end
end
return {pend, run}
"#;

/// Seal a submitted batch (all its jobs are queued) and check whether it is already done.
/// ARGV: prefix, batch id.
const SEAL: &str = r#"
local b = ARGV[2]
redis.call('HSET', batchkey(b), 'sealed', '1')
done_check(b)
return 1
"#;

/// Complete an interrupted submission: write the jobs that do not exist yet, and re-queue
/// queued jobs never delivered (a duplicate entry is harmless: `CLAIM` drops stale ones).
/// ARGV: prefix, batch id, model, no_binning, then per job: index, prompt, name, negative,
/// height, width, steps, guidance, seed. Returns the number of jobs written.
const RESUME: &str = r#"
local b, m, nb = ARGV[2], ARGV[3], ARGV[4]
local n = 0
for i = 5, #ARGV, 9 do
  local idx = tonumber(ARGV[i])
  local id = string.format('%s-%05d', b, idx)
  local jk = jobkey(id)
  local s, en = unpack(redis.call('HMGET', jk, 's', 'en'))
  if not s then
    redis.call('HSET', jk, 'b', b, 'i', ARGV[i], 'm', m, 'p', ARGV[i + 1], 'n', ARGV[i + 2],
      'np', ARGV[i + 3], 'h', ARGV[i + 4], 'w', ARGV[i + 5], 'st', ARGV[i + 6], 'g', ARGV[i + 7],
      'sd', ARGV[i + 8], 'nb', nb, 's', 'queued', 'a', '0', 'en', '')
    redis.call('XADD', evkey(b), '*', 'k', 'q', 'j', id, 'x', idx)
    redis.call('XADD', streamkey(m), '*', 'j', id)
    n = n + 1
  elseif s == 'queued' and ((not en) or en == '') then
    redis.call('XADD', streamkey(m), '*', 'j', id)
  end
end
return n
"#;

/// The compiled scripts.
#[derive(Debug, Clone)]
pub struct Scripts {
    /// See `CLAIM`.
    pub claim: redis::Script,
    /// See `REQUEUE`.
    pub requeue: redis::Script,
    /// See `COMPLETE`.
    pub complete: redis::Script,
    /// See `HEARTBEAT`.
    pub heartbeat: redis::Script,
    /// See `PROGRESS`.
    pub progress: redis::Script,
    /// See `CANCEL`.
    pub cancel: redis::Script,
    /// See `SEAL`.
    pub seal: redis::Script,
    /// See `RESUME`.
    pub resume: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            claim: script(CLAIM),
            requeue: script(REQUEUE),
            complete: script(COMPLETE),
            heartbeat: script(HEARTBEAT),
            progress: script(PROGRESS),
            cancel: script(CANCEL),
            seal: script(SEAL),
            resume: script(RESUME),
        }
    }
}
