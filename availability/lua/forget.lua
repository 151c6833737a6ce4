-- Removes mitras Postgres does not have. ARGV[1]: the reconcile's read-at microseconds; a
-- mitra synced after it (created since the snapshot) is kept. Then the ids.
local snapshot = tonumber(ARGV[1])
local forgotten = 0
for i = 2, #ARGV do
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
    forgotten = forgotten + 1
  end
end
return forgotten
