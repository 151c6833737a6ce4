-- ARGV: stale ms, retained changes, mitra id.
-- Returns 1 recorded (online), 0 offline (not recorded), -1 deactivated, -2 unknown here,
-- -3 mirror not seeded.
local id = ARGV[3]
if redis.call('EXISTS', SEEDED) == 0 then
  return -3
end
if redis.call('SISMEMBER', DEACTIVATED, id) == 1 then
  return -1
end
if redis.call('SISMEMBER', ONLINE, id) == 0 then
  if redis.call('HEXISTS', CAPACITY, id) == 0 then
    return -2
  end
  return 0
end
local now = now_ms()
redis.call('ZADD', HEARTBEATS, now, id)
redis.call('HSET', DIRTY, id, now)
-- A mitra that was stale is available again: one HEXISTS on the common path.
if redis.call('HEXISTS', PUBLISHED, id) == 0 and redis.call('ZSCORE', READY, id) then
  publish(id, now, tonumber(ARGV[1]), tonumber(ARGV[2]))
end
return 1
