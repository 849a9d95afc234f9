-- pysched fleet: write back the pool ids a process holds, after Redis lost them.
--
-- KEYS[1] pool id hash   KEYS[2] pool id sequence
-- ARGV: key_1, id_1, key_2, id_2, ...: the ids the caller holds (existing
-- entries win). The sequence ends above every id. Returns the sequence.

for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
local top = tonumber(redis.call('GET', KEYS[2])) or 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local n = tonumber(v)
  if n and n > top then top = n end
end
redis.call('SET', KEYS[2], top)
return top
