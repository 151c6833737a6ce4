-- The auto-offline sweep's question. ARGV: stale ms, at most how many ids.
-- Returns {online count, stale count, stale ids...}: O(log n + ids), so the sweep costs
-- what the stale mitras cost, not the online ones.
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local bound = '(' .. (now_ms() - tonumber(ARGV[1]))
local result = {redis.call('SCARD', ONLINE), redis.call('ZCOUNT', HEARTBEATS, '-inf', bound)}
local ids = redis.call('ZRANGE', HEARTBEATS, '-inf', bound, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  result[#result + 1] = id
end
return result
