-- pysched fleet: publish one node event.
--
-- KEYS[1] event stream   KEYS[2] set of recorded nodes   KEYS[3] the node's record
-- KEYS[4] the node's max concurrency (RedisReservations' key)   KEYS[5] the node's removal mark
-- ARGV[1] stream MAXLEN (approximate)   ARGV[2] process id   ARGV[3] event
-- ARGV[4] node id   ARGV[5] event fields (JSON, opaque here)
-- ARGV[6] heartbeat health: '' (not given), '0' (unhealthy) or '1' (healthy)
-- ARGV[7] register: the max concurrency ('' otherwise)
-- ARGV[8] register: the initial status (JSON: "ready" or "registering")
-- ARGV[9] how long a removal mark lives (ms)
-- ARGV[10..] record field/value pairs to write (JSON values)
--
-- Appends the event and folds it into the record in one atomic step, so the
-- record never lags the stream. Returns {stream entry id, flag}: flag 'lost'
-- when the node has no record although nobody removed it (Redis lost its
-- data): the publisher then re-publishes the node's full state, which writes
-- its capacity back, so a node whose registering process died is healed by a
-- heartbeat reaching any live process.

if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ev, node = ARGV[3], ARGV[4]
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'p', ARGV[2], 'e', ev, 'n', node, 'f', ARGV[5])
if ev == 'remove' then
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[2], node)
  redis.call('DEL', KEYS[4])
  redis.call('SET', KEYS[5], 1, 'PX', ARGV[9])
  return {id, ''}
end
if ev == 'register' then
  -- a (re-)registration is a fresh start, as in the scheduler itself
  redis.call('DEL', KEYS[3])
  redis.call('DEL', KEYS[5])
  redis.call('SADD', KEYS[2], node)
  redis.call('HSET', KEYS[3], 'status', ARGV[8], 'streak', 0, 'seen', now)
  if ARGV[7] ~= '' then
    redis.call('SET', KEYS[4], ARGV[7])
  end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  -- only a register starts a record: the node was removed (marked), or
  -- Redis lost its data and the publisher re-publishes the node in full
  if redis.call('EXISTS', KEYS[5]) == 1 then
    return {id, ''}
  end
  return {id, 'lost'}
elseif ev == 'heartbeat' then
  redis.call('HSET', KEYS[3], 'seen', now)
  local status = redis.call('HGET', KEYS[3], 'status')
  if status == '"offline"' then
    redis.call('HSET', KEYS[3], 'status', '"ready"')
  elseif status == '"registering"' and ARGV[6] == '1' then
    redis.call('HSET', KEYS[3], 'status', '"ready"')
  end
  if ARGV[6] == '0' then
    redis.call('HINCRBY', KEYS[3], 'streak', 1)
  elseif ARGV[6] == '1' then
    redis.call('HSET', KEYS[3], 'streak', 0)
  end
elseif ev == 'drain' then
  redis.call('HSET', KEYS[3], 'status', '"draining"', 'streak', 0)
elseif ev == 'offline' then
  redis.call('HSET', KEYS[3], 'status', '"offline"', 'streak', 0)
elseif ev == 'resume' then
  redis.call('HSET', KEYS[3], 'status', '"ready"', 'streak', 0, 'seen', now)
end
redis.call('HSET', KEYS[3], 'by', ARGV[2])
for i = 10, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
if ev ~= 'register' and redis.call('EXISTS', KEYS[4]) == 0 then
  -- A live node whose capacity is gone (a process forgot it, or removed it
  -- and the node registered again elsewhere): write it back from the record.
  local max = tonumber(redis.call('HGET', KEYS[3], 'max_concurrency'))
  if max then
    redis.call('SET', KEYS[4], max)
  end
end
return {id, ''}
