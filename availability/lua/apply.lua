-- Writes mitra states read from Postgres. ARGV[1]: milliseconds of heartbeat credit
-- (the flush interval: Postgres heartbeat times lag Valkey's by up to that much).
-- Then 8 fields a mitra: id, name, capacity, active, online, version, load, heartbeat ms.
-- A state older than the one held (by version) leaves online/active alone, so two
-- instances whose writes reach Valkey out of order cannot undo each other.
local now = now_ms()
local now_s = math.floor(now / 1000)
local credit = tonumber(ARGV[1])
for i = 2, #ARGV, 8 do
  local id = ARGV[i]
  local version = tonumber(ARGV[i + 5])
  redis.call('HSET', NAMES, id, ARGV[i + 1])
  redis.call('HSET', CAPACITY, id, ARGV[i + 2])
  redis.call('HSET', LOADS, id, ARGV[i + 6])
  local held = tonumber(redis.call('HGET', VERSIONS, id))
  if not held or version >= held then
    redis.call('HSET', VERSIONS, id, version)
    local active = ARGV[i + 3] == '1'
    if active then
      redis.call('SREM', DEACTIVATED, id)
    else
      redis.call('SADD', DEACTIVATED, id)
    end
    if active and ARGV[i + 4] == '1' then
      redis.call('SADD', ONLINE, id)
      local seeded = 0
      if ARGV[i + 7] ~= '' then
        seeded = math.min(now, tonumber(ARGV[i + 7]) + credit)
      end
      local held_hb = tonumber(redis.call('ZSCORE', HEARTBEATS, id))
      if not held_hb or held_hb < seeded then
        redis.call('ZADD', HEARTBEATS, seeded, id)
      end
    else
      redis.call('SREM', ONLINE, id)
      redis.call('ZREM', HEARTBEATS, id)
    end
  end
  update_ready(id, now_s)
end
return now
