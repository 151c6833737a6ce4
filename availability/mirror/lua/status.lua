-- ARGV[1] mitra id. Returns {} when the mirror does not know it, else
-- {online, deactivated, capacity, load, heartbeat ms or false, now ms, name}.
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local id = ARGV[1]
local capacity = redis.call('HGET', CAPACITY, id)
if not capacity or awaiting_resync(id) then
  return {}
end
return {
  redis.call('SISMEMBER', ONLINE, id),
  redis.call('SISMEMBER', DEACTIVATED, id),
  tonumber(capacity),
  tonumber(redis.call('HGET', LOADS, id)) or 0,
  redis.call('ZSCORE', HEARTBEATS, id),
  now_ms(),
  redis.call('HGET', NAMES, id) or '',
}
