-- pysched: reserve one job on the first candidate node that still has room.
--
-- One call = one round trip: the caller sends its whole ordered shortlist
-- and the script tries the nodes in order, atomically (scripts run alone).
--
-- KEYS[1] the dataset's epoch (hash: id, born)
-- KEYS[2] recovery: holders still expected to re-assert (zset, score = deadline ms)
-- KEYS[3] live holders (zset: holder id -> liveness deadline ms)
-- KEYS[4] the job record (hash: node, pool, session, committed, exp, holder)
-- KEYS[5] the namespace-wide zset of live jobs (score = expiry, ms)
-- KEYS[3+3i], [4+3i], [5+3i] (i = 1..n)
--         candidate i: max-concurrency string, reserved zset, committed-lease zset
-- ARGV[1] the epoch the caller last re-asserted into   ARGV[2] caller's holder id
-- ARGV[3] holder liveness (ms; 0: the caller's entry is fresh)   ARGV[4] job id   ARGV[5] reservation ttl (ms)
-- ARGV[6] pool id   ARGV[7] session id
-- ARGV[6 + 2i], ARGV[7 + 2i] (i = 1..n)   candidate i: node id, reported running
--
-- Every key is passed in KEYS (nothing is built from ARGV) so that Redis
-- Cluster can route the call; the caller puts them all under one hash tag.
--
-- Returns one of
--   {'epoch', current_epoch_id_or_empty}       the caller must re-assert first
--   {'ok', i, exp_ms, now_ms}                  reserved candidate i
--   {'existing', node, pool, session, committed, exp_ms, now_ms, holder}   job already held
--   {'refused', reason_1, ..., reason_n}       'full' / 'offline' / 'recovering'

-- Redis < 5 replicates scripts verbatim, which forbids writing after TIME;
-- effects replication (the default since 5, the only mode since 7) is fine.
if redis.replicate_commands then redis.replicate_commands() end

local epoch_key, pending_key, holders_key, job_key, jobs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

-- A caller that has not re-asserted its jobs into this dataset (Redis lost
-- its data since the caller last looked) must do so before anything else.
local epoch = redis.call('HGET', epoch_key, 'id')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end

local holder, live = ARGV[2], tonumber(ARGV[3])
local job_id = ARGV[4]
local ttl = tonumber(ARGV[5])
-- Extra lifetime given to keys beyond their newest entry. The exact liveness
-- test uses the stored expiry, never the key TTL, so this only needs to
-- cover the gap between two commands inside one script.
local margin = 5000
local n = (#ARGV - 7) / 2
if n ~= math.floor(n) or #KEYS ~= 5 + 3 * n then
  return redis.error_reply('pysched reserve: KEYS/ARGV do not describe the same candidates')
end

-- Server time, so the hosts' clocks never matter.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Grow a key's TTL (never shrink it): a key lives at least as long as its
-- newest entry, and vanishes by itself once every entry is dead, so a node
-- nobody reserves on any more leaves no garbage behind.
local function keep_until(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

-- An existing live reservation makes retries idempotent. The record's 'exp'
-- field equals the score written to the zsets, so liveness is exact even
-- though the record's own TTL carries a margin.
local rec = redis.call('HMGET', job_key, 'node', 'pool', 'session', 'committed', 'exp', 'holder')
if rec[1] then
  local exp = tonumber(rec[5])
  if exp and exp > now then
    return {'existing', rec[1], rec[2] or '', rec[3] or '', tonumber(rec[4]) or 0, exp, now, rec[6] or ''}
  end
  -- Dead record: its zset members carry the same past score and are pruned
  -- below (or on the next reserve on that node).
  redis.call('DEL', job_key)
end

-- After Redis lost its data, capacity stays shut until every process that
-- held jobs has written them back (or its deadline passed): counting a node
-- before that would over-commit it. (The caller itself has re-asserted, or
-- the epoch check above would have sent it back.) The set only exists
-- during a recovery: one EXISTS the rest of the time.
if redis.call('EXISTS', pending_key) == 1 then
  redis.call('ZREM', pending_key, holder)
  if redis.call('ZCOUNT', pending_key, string.format('(%d', now), '+inf') > 0 then
    local out = {'refused'}
    for i = 1, n do out[i + 1] = 'recovering' end
    return out
  end
end

redis.call('ZREMRANGEBYSCORE', jobs_key, '-inf', now)

local reasons = {'refused'}
for i = 1, n do
  local max_key, resv_key, lease_key = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local node_id = ARGV[6 + 2 * i]
  local running = tonumber(ARGV[7 + 2 * i]) or 0
  local cap = tonumber(redis.call('GET', max_key))
  if not cap then
    reasons[#reasons + 1] = 'offline'
  else
    -- Self-healing: whatever a crashed scheduler reserved, or a node never
    -- finished, drops out here once its expiry passes. No counter exists
    -- that could leak or that a heartbeat could reset.
    redis.call('ZREMRANGEBYSCORE', resv_key, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', lease_key, '-inf', now)
    local held = redis.call('ZCARD', resv_key) + redis.call('ZCARD', lease_key)
    if math.max(held, running) >= cap then
      reasons[#reasons + 1] = 'full'
    else
      local exp = now + ttl
      redis.call('ZADD', resv_key, exp, job_id)
      redis.call('ZADD', jobs_key, exp, job_id)
      redis.call('HSET', job_key, 'node', node_id, 'pool', ARGV[6], 'session', ARGV[7],
                 'committed', 0, 'exp', exp, 'holder', holder)
      redis.call('PEXPIRE', job_key, ttl + margin)
      keep_until(resv_key, ttl + margin)
      keep_until(jobs_key, ttl + margin)
      -- The caller now holds a job: after a data loss it is waited for.
      -- (live is 0 while the caller knows its entry is fresh.)
      if live > 0 then
        redis.call('ZADD', holders_key, now + live, holder)
        keep_until(holders_key, live + margin)
      end
      return {'ok', i, exp, now}
    end
  end
end
return reasons
