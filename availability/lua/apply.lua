-- Writes mitra states read from Postgres. ARGV[1], ARGV[2]: stale ms and retained changes
-- (for publish). ARGV[3]: milliseconds of heartbeat credit for a
-- mitra the mirror holds no heartbeat of (the flush interval: Postgres heartbeat times lag
-- Valkey's by up to that much, the same allowance the Postgres fallback makes).
-- Then one argument a mitra (one, not nine, because packing arguments is most of the
-- client's cost at 100,000 mitras): fields joined by US (\31): id, name, capacity, active,
-- online, version, load, heartbeat ms ('' for none), read-at microseconds.
-- Two fences make late writers harmless (a paused instance, a slow reconcile):
--   online/active apply only from a version >= the one held (mitra_online_status.version);
--   name/capacity/load apply only from a read at least as recent as the one held.
-- Heartbeats only ever move forward.
-- Returns what it changed, by kind: {online, deactivated, load, profile, heartbeat, ready}.
local now = now_ms()
local now_s = math.floor(now / 1000)
local stale_ms, retain, credit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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

for i = 4, #ARGV do
  local id, name, capacity, active, online, version, load, heartbeat, read_at =
    string.match(ARGV[i], '^(.-)\31(.-)\31(.-)\31(.-)\31(.-)\31(.-)\31(.-)\31(.-)\31(.-)$')
  local known_load, known_capacity, serving
  local known = {}
  local held_read = tonumber(redis.call('HGET', SYNCED, id))
  if not held_read or tonumber(read_at) >= held_read then
    redis.call('HSET', SYNCED, id, read_at)
    if redis.call('HGET', NAMES, id) ~= name then
      changed[4] = changed[4] + 1
      redis.call('HSET', NAMES, id, name)
    end
    if redis.call('HGET', CAPACITY, id) ~= capacity then
      changed[4] = changed[4] + 1
      redis.call('HSET', CAPACITY, id, capacity)
    end
    if redis.call('HGET', LOADS, id) ~= load then
      changed[3] = changed[3] + 1
      redis.call('HSET', LOADS, id, load)
    end
    known_load, known_capacity = tonumber(load), tonumber(capacity)
    known.load, known.capacity, known.name = load, capacity, name
  end
  local held = tonumber(redis.call('HGET', VERSIONS, id))
  if not held or tonumber(version) >= held then
    redis.call('HSET', VERSIONS, id, version)
    set_member(DEACTIVATED, id, active ~= '1', 2)
    serving = active == '1' and online == '1'
    known.deactivated, known.online = active ~= '1', online == '1'
    if serving then
      set_member(ONLINE, id, true, 1)
      local held_hb = tonumber(redis.call('ZSCORE', HEARTBEATS, id))
      local seeded = tonumber(heartbeat) or 0
      if not held_hb and seeded > 0 then
        seeded = math.min(now, seeded + credit)
      end
      if not held_hb or held_hb < seeded then
        redis.call('ZADD', HEARTBEATS, seeded, id)
        if held_hb then
          changed[5] = changed[5] + 1
        end
        held_hb = seeded
      end
      known.heartbeat = held_hb
    else
      set_member(ONLINE, id, false, 1)
      redis.call('ZREM', HEARTBEATS, id)
    end
  end
  changed[6] = changed[6] + update_ready(id, now_s, known_load, known_capacity, serving)
  publish(id, now, stale_ms, retain, known)
end
return changed
