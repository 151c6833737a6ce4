-- ARGV[1]: how many of the busiest online mitras. Returns {online count, then id, load,
-- name for each, busiest first}. BUSY is scored by load, so this is O(log n + limit).
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local result = {redis.call('SCARD', ONLINE)}
local busiest = redis.call('ZRANGE', BUSY, '+inf', '-inf', 'BYSCORE', 'REV', 'LIMIT', 0,
  tonumber(ARGV[1]), 'WITHSCORES')
for first = 1, #busiest, 1000 do
  local ids = {}
  for j = first, math.min(first + 999, #busiest), 2 do
    ids[#ids + 1] = busiest[j]
  end
  local names = redis.call('HMGET', NAMES, unpack(ids))
  for j = 1, #ids do
    result[#result + 1] = ids[j]
    result[#result + 1] = busiest[first + 2 * j - 1]
    result[#result + 1] = names[j] or ''
  end
end
return result
