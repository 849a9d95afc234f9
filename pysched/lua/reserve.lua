-- pysched: reserve one job on the first candidate node that still has room.
--
-- One call = one round trip: the caller sends its whole ordered shortlist
-- and the script tries the nodes in order, atomically (scripts run alone).
--
-- KEYS[1]              the job record (hash: node, pool, session, committed, exp)
-- KEYS[2]              the namespace-wide zset of live jobs (score = expiry, ms)
-- KEYS[3i], [3i+1], [3i+2] (i = 1..n)
--                      candidate i: max-concurrency string, reserved zset,
--                      committed-lease zset
-- ARGV[1] job id   ARGV[2] reservation ttl (ms)   ARGV[3] pool id
-- ARGV[4] session id   ARGV[5] key margin (ms)
-- ARGV[4 + 2i], ARGV[5 + 2i] (i = 1..n)   candidate i: node id, reported running
--
-- Every key is passed in KEYS (nothing is built from ARGV) so that Redis
-- Cluster can route the call; the caller puts them all under one hash tag.
--
-- Returns one of
--   {'ok', i, exp_ms, now_ms}                                 reserved candidate i
--   {'existing', node, pool, session, committed, exp_ms, now_ms}   job already held
--   {'refused', reason_1, ..., reason_n}                     'full' / 'offline'

local job_key, jobs_key = KEYS[1], KEYS[2]
local job_id = ARGV[1]
local ttl = tonumber(ARGV[2])
local margin = tonumber(ARGV[5])
local n = (#ARGV - 5) / 2
if n ~= math.floor(n) or #KEYS ~= 2 + 3 * n then
  return redis.error_reply('pysched reserve: KEYS/ARGV do not describe the same candidates')
end

-- Server time, so the hosts' clocks never matter.
-- Redis < 5 replicates scripts verbatim, which forbids writing after TIME;
-- effects replication (the default since 5, the only mode since 7) is fine.
if redis.replicate_commands then redis.replicate_commands() end
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
local rec = redis.call('HMGET', job_key, 'node', 'pool', 'session', 'committed', 'exp')
if rec[1] then
  local exp = tonumber(rec[5])
  if exp and exp > now then
    return {'existing', rec[1], rec[2] or '', rec[3] or '', tonumber(rec[4]) or 0, exp, now}
  end
  -- Dead record: its zset members carry the same past score and are pruned
  -- below (or on the next reserve on that node).
  redis.call('DEL', job_key)
end

redis.call('ZREMRANGEBYSCORE', jobs_key, '-inf', now)

local reasons = {'refused'}
for i = 1, n do
  local max_key, resv_key, lease_key = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local node_id = ARGV[4 + 2 * i]
  local running = tonumber(ARGV[5 + 2 * i]) or 0
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
      redis.call('HSET', job_key, 'node', node_id, 'pool', ARGV[3], 'session', ARGV[4],
                 'committed', 0, 'exp', exp)
      redis.call('PEXPIRE', job_key, ttl + margin)
      keep_until(resv_key, ttl + margin)
      keep_until(jobs_key, ttl + margin)
      return {'ok', i, exp, now}
    end
  end
end
return reasons
