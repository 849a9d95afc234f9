-- pysched fleet: the fleet-wide pool id of a language set.
--
-- KEYS[1] pool id hash (language-set key -> pool id)   KEYS[2] pool id sequence
-- ARGV[1] language-set key   ARGV[2] floor: the caller's highest known pool id
--
-- HSETNX semantics: the first caller allocates, everybody else reads its id.
-- The floor keeps a fresh id above every id the caller already uses (after a
-- Redis restart the sequence may be behind the ids processes still hold).
-- Returns the pool id.

local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then return tonumber(id) end
local floor = tonumber(ARGV[2]) or 0
local seq = tonumber(redis.call('GET', KEYS[2])) or 0
if seq < floor then redis.call('SET', KEYS[2], floor) end
id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id)
return id
