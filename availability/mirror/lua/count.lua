-- The beacon. ARGV: stale ms, ttl ms. Scripts run one at a time, so however many
-- instances ask at expiry, exactly one call computes and the rest read its snapshot.
-- available = |READY| - (READY members whose heartbeat is stale): the stale are few
-- (the auto-offline sweep removes them), so this costs O(stale + log n).
-- Returns "available:online:as_of_ms".
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local cached = redis.call('GET', BEACON)
if cached then
  return cached
end
local now = now_ms()
local stale = redis.call('ZRANGE', HEARTBEATS, '-inf', '(' .. (now - tonumber(ARGV[1])), 'BYSCORE')
local available = redis.call('ZCARD', READY)
for _, id in ipairs(stale) do
  if redis.call('ZSCORE', READY, id) then
    available = available - 1
  end
end
local snapshot = available .. ':' .. redis.call('SCARD', ONLINE) .. ':' .. now
redis.call('SET', BEACON, snapshot, 'PX', ARGV[2])
redis.call('INCR', BEACON_COMPUTED)
return snapshot
