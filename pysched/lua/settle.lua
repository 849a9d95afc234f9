-- pysched: commit, renew or release one job on the node that holds it.
--
-- KEYS[1] job record   KEYS[2] namespace-wide jobs zset
-- KEYS[3] the node's reserved zset   KEYS[4] the node's committed-lease zset
-- ARGV[1] job id   ARGV[2] node id the caller believes holds the job
-- ARGV[3] action: 'commit' | 'renew' | 'release'
-- ARGV[4] lease (ms, commit/renew)   ARGV[5] key margin (ms)
--
-- The node's keys must be known before the call (Redis Cluster requires
-- every key in KEYS), so the caller names the node it expects; when the
-- record says otherwise the script changes nothing and answers
-- {'moved', node} for the caller to retry with the right keys.
--
-- Returns {'ok', exp_ms, now_ms} (commit/renew), {'released'},
-- {'gone'} (no live reservation), {'moved', node},
-- {'uncommitted'} (renew of a job that was never committed).

local job_key, jobs_key, resv_key, lease_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, want_node, action = ARGV[1], ARGV[2], ARGV[3]

-- Redis < 5 replicates scripts verbatim, which forbids writing after TIME;
-- effects replication (the default since 5, the only mode since 7) is fine.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function drop()
  redis.call('ZREM', resv_key, job_id)
  redis.call('ZREM', lease_key, job_id)
  redis.call('ZREM', jobs_key, job_id)
  redis.call('DEL', job_key)
end

local rec = redis.call('HMGET', job_key, 'node', 'committed', 'exp')
if not rec[1] then
  -- No record means no live reservation anywhere (the record outlives its
  -- zset entries). Remove leftovers on the named node; harmless if none.
  if action == 'release' then drop() end
  return {'gone'}
end
if rec[1] ~= want_node then
  return {'moved', rec[1]}
end

local exp = tonumber(rec[3]) or 0
if exp <= now then
  drop()
  return {'gone'}
end

if action == 'release' then
  drop()
  return {'released'}
end

local committed = tonumber(rec[2]) == 1
if action == 'commit' and committed then
  -- Idempotent: committing twice leaves the lease alone (renew extends it).
  return {'ok', exp, now}
end
if action == 'renew' and not committed then
  return {'uncommitted'}
end

local lease = tonumber(ARGV[4])
local margin = tonumber(ARGV[5])
local new_exp = now + lease
redis.call('ZREM', resv_key, job_id)
redis.call('ZADD', lease_key, new_exp, job_id)
redis.call('ZADD', jobs_key, new_exp, job_id)
redis.call('HSET', job_key, 'committed', 1, 'exp', new_exp)
redis.call('PEXPIRE', job_key, lease + margin)
for _, key in ipairs({lease_key, jobs_key}) do
  if redis.call('PTTL', key) < lease + margin then
    redis.call('PEXPIRE', key, lease + margin)
  end
end
return {'ok', new_exp, now}
