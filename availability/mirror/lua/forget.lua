-- Removes mitras Postgres does not have. ARGV: stale ms and retained changes (for publish),
-- the reconcile's read-at microseconds (a mitra synced after it, created since the
-- snapshot, is kept), then the ids.
local stale_ms, retain, snapshot = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local forgotten = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local synced = tonumber(redis.call('HGET', SYNCED, id))
  if not synced or synced < snapshot then
    redis.call('SREM', ONLINE, id)
    redis.call('SREM', DEACTIVATED, id)
    redis.call('HDEL', CAPACITY, id)
    redis.call('HDEL', NAMES, id)
    redis.call('HDEL', LOADS, id)
    redis.call('HDEL', VERSIONS, id)
    redis.call('HDEL', SYNCED, id)
    redis.call('HDEL', DIRTY, id)
    redis.call('HDEL', FLUSHING, id)
    redis.call('ZREM', HEARTBEATS, id)
    redis.call('ZREM', READY, id)
    redis.call('ZREM', BUSY, id)
    publish(id, now, stale_ms, retain)
    forgotten = forgotten + 1
  end
end
return forgotten
