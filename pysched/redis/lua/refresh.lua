-- pysched: one process's periodic look at the namespace, in one round trip.
--
-- KEYS[1] the dataset's epoch   KEYS[2] recovery: holders still expected (zset)
-- KEYS[3] live holders (zset)   KEYS[4] the caller's inbox (hash)
-- KEYS[5 .. 4+s]   records of the caller's jobs whose local expiry passed ("suspects")
-- KEYS[5+s ..]     the bound nodes' reserved and committed-lease zsets, in pairs
-- ARGV[1] the caller's epoch   ARGV[2] caller's holder id
-- ARGV[3] holder liveness (ms); '0' when the caller holds nothing
-- ARGV[4] s, the number of suspects
--
-- It keeps the caller's liveness entry (a process holding jobs is waited for
-- after a data loss), hands over and empties the caller's inbox (commits,
-- renewals and releases other processes made of its jobs), tells whether the
-- suspects are still alive (renewed elsewhere) and counts each node's load.
--
-- Returns {'ok', now_ms, recovering (0/1), {live holder ids}, {inbox field, value, ...},
--          {node, committed, exp_ms, holder per suspect ('' when dead)}, count_1, count_2, ...}
-- or {'epoch', current_epoch_id_or_empty}.

if redis.replicate_commands then redis.replicate_commands() end

local epoch_key, pending_key, holders_key, inbox_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local epoch = redis.call('HGET', epoch_key, 'id')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end

local holder, live, s = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

redis.call('ZREMRANGEBYSCORE', holders_key, '-inf', now)
if live > 0 then
  redis.call('ZADD', holders_key, now + live, holder)
  if redis.call('PTTL', holders_key) < live then
    redis.call('PEXPIRE', holders_key, live)
  end
else
  redis.call('ZREM', holders_key, holder)
end
-- The caller passed the epoch check: it has re-asserted, so it is not awaited.
redis.call('ZREM', pending_key, holder)
redis.call('ZREMRANGEBYSCORE', pending_key, '-inf', now)
local recovering = redis.call('ZCARD', pending_key) > 0 and 1 or 0

local inbox = redis.call('HGETALL', inbox_key)
if #inbox > 0 then
  redis.call('DEL', inbox_key)
end

local suspects = {}
for i = 1, s do
  local rec = redis.call('HMGET', KEYS[4 + i], 'node', 'committed', 'exp', 'holder')
  local exp = tonumber(rec[3]) or 0
  if rec[1] and exp > now then
    suspects[#suspects + 1] = rec[1]
    suspects[#suspects + 1] = tonumber(rec[2]) or 0
    suspects[#suspects + 1] = exp
    suspects[#suspects + 1] = rec[4] or ''
  else
    suspects[#suspects + 1] = ''
    suspects[#suspects + 1] = 0
    suspects[#suspects + 1] = 0
    suspects[#suspects + 1] = ''
  end
end

local out = {'ok', now, recovering, redis.call('ZRANGE', holders_key, 0, -1), inbox, suspects}
local low = string.format('(%d', now)
for i = 5 + s, #KEYS do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i], low, '+inf')
end
return out
