-- pysched: read one job's live reservation (read only).
--
-- KEYS[1] the dataset's epoch   KEYS[2] job record
-- ARGV[1] the caller's epoch
-- Returns {'live', node, pool, session, committed, exp_ms, now_ms, holder},
-- {'none'}, or {'epoch', current_epoch_id_or_empty} (re-assert first: a
-- dataset that lost its data would otherwise deny the caller's own jobs).

local epoch = redis.call('HGET', KEYS[1], 'id')
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[2], 'node', 'pool', 'session', 'committed', 'exp', 'holder')
local exp = tonumber(rec[5])
if not rec[1] or not exp or exp <= now then
  return {'none'}
end
return {'live', rec[1], rec[2] or '', rec[3] or '', tonumber(rec[4]) or 0, exp, now, rec[6] or ''}
