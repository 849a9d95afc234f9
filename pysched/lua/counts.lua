-- pysched: live reservation counts (read only; expired entries are not counted
-- even before a reserve prunes them).
--
-- KEYS: any number of zsets scored by expiry (ms). Nodes pass their reserved
-- and committed-lease zsets as consecutive pairs; the namespace-wide jobs
-- zset may be passed alone.
-- Returns {now_ms, count(KEYS[1]), count(KEYS[2]), ...}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local low = string.format('(%d', now)
local out = {now}
for i = 1, #KEYS do
  out[i + 1] = redis.call('ZCOUNT', KEYS[i], low, '+inf')
end
return out
