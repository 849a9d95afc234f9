-- pysched: read one job's live reservation (read only).
--
-- KEYS[1] job record.
-- Returns {'live', node, pool, session, committed, exp_ms, now_ms} or {'none'}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[1], 'node', 'pool', 'session', 'committed', 'exp')
local exp = tonumber(rec[5])
if not rec[1] or not exp or exp <= now then
  return {'none'}
end
return {'live', rec[1], rec[2] or '', rec[3] or '', tonumber(rec[4]) or 0, exp, now}
