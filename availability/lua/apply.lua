-- Writes mitra states read from Postgres. ARGV[1]: milliseconds of heartbeat credit for a
-- mitra the mirror holds no heartbeat of (the flush interval: Postgres heartbeat times lag
-- Valkey's by up to that much, the same allowance the Postgres fallback makes).
-- Then 9 fields a mitra: id, name, capacity, active, online, version, load,
-- heartbeat ms ('' for none), read-at microseconds.
-- Two fences make late writers harmless (a paused instance, a slow reconcile):
--   online/active apply only from a version >= the one held (mitra_online_status.version);
--   name/capacity/load apply only from a read at least as recent as the one held.
-- Heartbeats only ever move forward.
-- Returns what it changed, by kind: {online, deactivated, load, profile, heartbeat, ready}.
local now = now_ms()
local now_s = math.floor(now / 1000)
local credit = tonumber(ARGV[1])
local changed = {0, 0, 0, 0, 0, 0}

local function set_member(key, id, member, kind)
  local moved
  if member then
    moved = redis.call('SADD', key, id)
  else
    moved = redis.call('SREM', key, id)
  end
  changed[kind] = changed[kind] + moved
end

for i = 2, #ARGV, 9 do
  local id = ARGV[i]
  local version = tonumber(ARGV[i + 5])
  local read_at = tonumber(ARGV[i + 8])
  local held_read = tonumber(redis.call('HGET', SYNCED, id))
  if not held_read or read_at >= held_read then
    redis.call('HSET', SYNCED, id, ARGV[i + 8])
    if redis.call('HGET', NAMES, id) ~= ARGV[i + 1]
        or redis.call('HGET', CAPACITY, id) ~= ARGV[i + 2] then
      changed[4] = changed[4] + 1
      redis.call('HSET', NAMES, id, ARGV[i + 1])
      redis.call('HSET', CAPACITY, id, ARGV[i + 2])
    end
    if redis.call('HGET', LOADS, id) ~= ARGV[i + 6] then
      changed[3] = changed[3] + 1
      redis.call('HSET', LOADS, id, ARGV[i + 6])
    end
  end
  local held = tonumber(redis.call('HGET', VERSIONS, id))
  if not held or version >= held then
    redis.call('HSET', VERSIONS, id, version)
    local active = ARGV[i + 3] == '1'
    set_member(DEACTIVATED, id, not active, 2)
    if active and ARGV[i + 4] == '1' then
      set_member(ONLINE, id, true, 1)
      local held_hb = tonumber(redis.call('ZSCORE', HEARTBEATS, id))
      local seeded = tonumber(ARGV[i + 7]) or 0
      if not held_hb and seeded > 0 then
        seeded = math.min(now, seeded + credit)
      end
      if not held_hb or held_hb < seeded then
        redis.call('ZADD', HEARTBEATS, seeded, id)
        if held_hb then
          changed[5] = changed[5] + 1
        end
      end
    else
      set_member(ONLINE, id, false, 1)
      redis.call('ZREM', HEARTBEATS, id)
    end
  end
  changed[6] = changed[6] + update_ready(id, now_s)
end
return changed
