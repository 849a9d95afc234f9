-- pysched: live reservation counts (read only; expired entries are not counted
-- even before a reserve prunes them).
--
-- KEYS[1] the dataset's epoch; KEYS[2..]: any number of zsets scored by expiry
-- (ms). Nodes pass their reserved and committed-lease zsets as consecutive
-- pairs; the namespace-wide jobs zset may be passed alone.
-- ARGV[1] the caller's epoch.
-- Returns {'ok', now_ms, count(KEYS[2]), count(KEYS[3]), ...} or
-- {'epoch', current_epoch_id_or_empty} (the caller re-asserts its jobs first,
-- so that it never reads a count that leaves them out).

local epoch = redis.call('HGET', KEYS[1], 'id')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local low = string.format('(%d', now)
local out = {'ok', now}
for i = 2, #KEYS do
  out[i + 1] = redis.call('ZCOUNT', KEYS[i], low, '+inf')
end
return out
