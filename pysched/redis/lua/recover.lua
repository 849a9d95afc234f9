-- pysched: join the current dataset, re-asserting what the caller holds.
--
-- Redis restarted without persistence (or failed over to an empty replica)
-- has forgotten every reservation and lease, while the processes holding
-- them live on. Each process calls this before anything else once it sees
-- an epoch it has not joined: it writes back its own jobs (with their
-- remaining lifetime), and, if it knew an earlier dataset and this one is
-- young, makes every holder it knew of a "pending" entry: reservations are
-- refused until each of them has re-asserted or its deadline has passed.
-- It also shuts capacity until the dataset is `quiet` ms old: a holder
-- nobody had in its list yet (its first job came after everyone's last
-- refresh) is not named, but it finds the loss at its next refresh, so one
-- refresh period covers it.
--
-- KEYS[1] epoch (hash: id, born)   KEYS[2] pending holders (zset, score = deadline ms)
-- KEYS[3] live holders (zset)   KEYS[4] namespace-wide jobs zset   KEYS[5] tombstones (zset)
-- then per re-asserted job: its record, its node's reserved zset, its node's lease zset
-- then per tombstone:       its record, its node's reserved zset, its node's lease zset
-- ARGV[1] the epoch the caller knew ('' if none)   ARGV[2] a fresh random id
-- ARGV[3] caller's holder id   ARGV[4] grace (ms)   ARGV[5] '1': last call of this recovery
-- ARGV[6] key margin (ms)   ARGV[7] h   ARGV[8] j   ARGV[9] b (tombstones)
-- ARGV[10] '1' if the caller holds jobs   ARGV[11] quiet (ms)
-- ARGV[12 .. 11+h]   the holders the caller saw alive when it last looked
-- then per job (7 each): job id, node id, pool, session, committed, remaining ms, holder
-- then per tombstone (2 each): job id, node id
--
-- Returns {'ok', epoch_id, skipped job ids...}: jobs not re-asserted because
-- they were released meanwhile (tombstone) or are held on another node.

if redis.replicate_commands then redis.replicate_commands() end

local epoch_key, pending_key, holders_key, jobs_key, tombs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local known, token, me = ARGV[1], ARGV[2], ARGV[3]
local grace, final, margin = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
local h, j, b = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local holding, quiet = ARGV[10] == '1', tonumber(ARGV[11])
-- The pending entry of the quiet period: holder ids are printable, so no
-- holder can be named this.
local QUIET = '\0quiet'
if #KEYS ~= 5 + 3 * (j + b) or #ARGV ~= 11 + h + 7 * j + 2 * b then
  return redis.error_reply('pysched recover: KEYS/ARGV do not describe the same jobs')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function keep_until(key, ms)
  if redis.call('PTTL', key) < ms then
    redis.call('PEXPIRE', key, ms)
  end
end

local e = redis.call('HMGET', epoch_key, 'id', 'born')
local epoch, born = e[1], tonumber(e[2])
if not epoch then
  -- A new dataset (first use of the namespace, or Redis lost its data).
  epoch, born = token, now
  redis.call('HSET', epoch_key, 'id', epoch, 'born', now)
end
born = born or now

-- The caller knew another dataset: Redis lost its data. While the new one is
-- young, wait for every holder the caller knew that has not re-asserted yet
-- (those that have are back in the live holders), itself included until its
-- last call is done.
if known ~= '' and known ~= epoch and born + quiet > now then
  local until_ms = tonumber(redis.call('ZSCORE', pending_key, QUIET))
  if not until_ms or until_ms < born + quiet then
    redis.call('ZADD', pending_key, born + quiet, QUIET)
  end
  keep_until(pending_key, born + quiet - now + margin)
end
if known ~= '' and known ~= epoch and now - born < grace then
  for i = 1, h do
    local other = ARGV[11 + i]
    if not redis.call('ZSCORE', holders_key, other) then
      redis.call('ZADD', pending_key, 'NX', now + grace, other)
    end
  end
  if holding and not final then
    redis.call('ZADD', pending_key, 'NX', now + grace, me)
  end
  keep_until(pending_key, grace + margin)
end

redis.call('ZREMRANGEBYSCORE', tombs_key, '-inf', now)

-- Releases the caller made of other processes' jobs shortly before: they
-- stay released whichever of the two re-asserts first.
local base = 11 + h + 7 * j
for i = 1, b do
  local job_id, node = ARGV[base + 2 * i - 1], ARGV[base + 2 * i]
  local k = 5 + 3 * j + 3 * i
  local job_key, resv_key, lease_key = KEYS[k - 2], KEYS[k - 1], KEYS[k]
  redis.call('ZADD', tombs_key, now + grace, job_id)
  keep_until(tombs_key, grace + margin)
  if redis.call('HGET', job_key, 'node') == node then
    redis.call('ZREM', resv_key, job_id)
    redis.call('ZREM', lease_key, job_id)
    redis.call('ZREM', jobs_key, job_id)
    redis.call('DEL', job_key)
  end
end

local skipped = {'ok', epoch}
for i = 1, j do
  local a = 11 + h + 7 * (i - 1)
  local job_id, node, pool, session = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local committed, remaining, holder = ARGV[a + 5] == '1', tonumber(ARGV[a + 6]), ARGV[a + 7]
  local job_key, resv_key, lease_key = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local rec = redis.call('HMGET', job_key, 'node', 'committed', 'exp', 'holder')
  local rec_exp = tonumber(rec[3]) or 0
  local tomb = tonumber(redis.call('ZSCORE', tombs_key, job_id))
  if (tomb and tomb > now) or (rec[1] and rec[1] ~= node and rec_exp > now) then
    skipped[#skipped + 1] = job_id
  else
    local exp = now + remaining
    if rec[1] == node and rec_exp > now then
      -- Already written back (by another process that settled it): merge.
      if rec_exp > exp then exp = rec_exp end
      committed = committed or tonumber(rec[2]) == 1
      if rec[4] then holder = rec[4] end
    end
    local keep = exp - now + margin
    redis.call('HSET', job_key, 'node', node, 'pool', pool, 'session', session,
               'committed', committed and 1 or 0, 'exp', exp, 'holder', holder)
    redis.call('PEXPIRE', job_key, keep)
    if committed then
      redis.call('ZREM', resv_key, job_id)
      redis.call('ZADD', lease_key, exp, job_id)
      keep_until(lease_key, keep)
    else
      redis.call('ZADD', resv_key, exp, job_id)
      keep_until(resv_key, keep)
    end
    redis.call('ZADD', jobs_key, exp, job_id)
    keep_until(jobs_key, keep)
  end
end

if final then
  redis.call('ZREM', pending_key, me)
  if holding then
    redis.call('ZADD', holders_key, now + grace, me)
    keep_until(holders_key, grace + margin)
  end
end
return skipped
