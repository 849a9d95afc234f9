-- pysched: commit, renew or release one job on the node that holds it.
--
-- KEYS[1] the dataset's epoch   KEYS[2] job record   KEYS[3] namespace-wide jobs zset
-- KEYS[4] the node's reserved zset   KEYS[5] the node's committed-lease zset
-- KEYS[6] the inbox of the process holding the job
-- KEYS[7] release tombstones (zset; only for a release that may leave one)
-- ARGV[1] the caller's epoch   ARGV[2] job id   ARGV[3] node id the caller names
-- ARGV[4] action: 'commit' | 'renew' | 'release'
-- ARGV[5] '1': the caller named the node (refuse elsewhere)
-- ARGV[6] caller's holder id   ARGV[7] the holder the caller expects
-- release:        ARGV[8] tombstone lifetime (ms) if it finds nothing, or absent
-- commit / renew: ARGV[8] commit lease (ms)   ARGV[9] reservation ttl (ms)
--                 ARGV[10] explicit lease (ms) or ''
-- (Only what the action needs is sent: every argument costs the caller an encoding.)
--
-- The node's keys must be known before the call (Redis Cluster requires
-- every key in KEYS), so the caller names the node (and the holder's inbox)
-- it expects. When the record says otherwise nothing changes: with ARGV[9]
-- the answer is {'wrong', node} (the caller asked about that node only),
-- else {'moved', node, holder} for the caller to retry with the right keys.
--
-- A process settling a job another process holds leaves a note in the
-- holder's inbox (hash job id -> 'gone' | '<committed>:<exp_ms>'), which the
-- holder reads on its next refresh: its view of what it holds, re-asserted
-- after a data loss, must follow commits, renewals and releases made elsewhere.
--
-- Returns {'ok', exp_ms, now_ms, committed, pool, session, holder} (commit/renew),
-- {'released', holder}, {'gone'} (no live job), {'moved', node, holder},
-- {'wrong', node}, or {'epoch', current_epoch_id_or_empty}.

if redis.replicate_commands then redis.replicate_commands() end

local epoch_key, job_key, jobs_key, resv_key, lease_key, inbox_key, tombs_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]

local epoch = redis.call('HGET', epoch_key, 'id')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end

local job_id, want_node, action = ARGV[2], ARGV[3], ARGV[4]
local strict = ARGV[5] == '1'
local caller, want_holder = ARGV[6], ARGV[7]
local tomb, commit_lease, ttl, explicit = 0, 0, 0, nil
if action == 'release' then
  tomb = tonumber(ARGV[8]) or 0
else
  commit_lease, ttl, explicit = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
end
-- Extra lifetime given to keys beyond their newest entry (see reserve.lua).
local margin = 5000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function keep_until(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

local function drop()
  redis.call('ZREM', resv_key, job_id)
  redis.call('ZREM', lease_key, job_id)
  redis.call('ZREM', jobs_key, job_id)
  redis.call('DEL', job_key)
end

local rec = redis.call('HMGET', job_key, 'node', 'committed', 'exp', 'holder', 'pool', 'session')
local exp = tonumber(rec[3]) or 0
if not rec[1] or exp <= now then
  if rec[1] and rec[1] == want_node then
    drop()  -- a dead record on the named node: tidy up
  end
  if action == 'release' and tomb > 0 then
    -- Shortly after a data loss the job may not be re-asserted yet by the
    -- process holding it: the tombstone stops that re-assertion.
    redis.call('ZADD', tombs_key, now + tomb, job_id)
    keep_until(tombs_key, tomb + margin)
  end
  return {'gone'}
end
if rec[1] ~= want_node then
  if strict then
    return {'wrong', rec[1]}
  end
  return {'moved', rec[1], rec[4] or ''}
end
local holder = rec[4] or ''
if holder ~= want_holder then
  return {'moved', rec[1], holder}
end

local function note(state, keep_ms)
  if holder ~= '' and holder ~= caller then
    redis.call('HSET', inbox_key, job_id, state)
    keep_until(inbox_key, keep_ms + margin)
  end
end

if action == 'release' then
  drop()
  note('gone', 86400000)  -- the holder reads it at its next refresh; a day bounds a lost one
  return {'released', holder}
end

local committed = tonumber(rec[2]) == 1
if action == 'commit' and committed then
  -- Idempotent: committing twice leaves the lease alone (renew extends it).
  return {'ok', exp, now, 1, rec[5] or '', rec[6] or '', holder}
end

local lease
if action == 'commit' then
  committed = true
  lease = explicit or commit_lease
elseif committed then
  lease = explicit or commit_lease
else
  lease = explicit or ttl  -- renewing an uncommitted reservation extends its TTL
end
local new_exp = now + lease
if committed then
  redis.call('ZREM', resv_key, job_id)
  redis.call('ZADD', lease_key, new_exp, job_id)
  keep_until(lease_key, lease + margin)
else
  redis.call('ZADD', resv_key, new_exp, job_id)
  keep_until(resv_key, lease + margin)
end
redis.call('ZADD', jobs_key, new_exp, job_id)
keep_until(jobs_key, lease + margin)
redis.call('HSET', job_key, 'committed', committed and 1 or 0, 'exp', new_exp)
redis.call('PEXPIRE', job_key, lease + margin)
note((committed and '1' or '0') .. ':' .. string.format('%d', new_exp), lease)
return {'ok', new_exp, now, committed and 1 or 0, rec[5] or '', rec[6] or '', holder}
