-- Shared by every script. KEYS are always the whole mirror, in this order:
local ONLINE, DEACTIVATED, CAPACITY, NAMES, LOADS, HEARTBEATS, READY, VERSIONS, DIRTY, BEACON =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local SYNCED, SEEDED, BUSY, BEACON_COMPUTED = KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local FLUSHING = KEYS[15]
local PUBLISHED, REVISION, EVENTS, CHECKED = KEYS[16], KEYS[17], KEYS[18], KEYS[19]

-- Until a complete seed has written SEEDED (a fresh or restarted Valkey), the mirror is
-- partial: readers must ask Postgres instead.
local function require_seeded()
  if redis.call('EXISTS', SEEDED) == 0 then
    return redis.error_reply('UNSEEDED the mirror is being seeded')
  end
end

-- Valkey's clock is the one clock: every instance's freshness is judged by it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- READY holds online, active mitras below capacity, scored load * 1e10 + the second
-- their load last changed (or they came online): least loaded, then longest idle.
local LOAD_SCALE = 1e10

-- Keeps READY and BUSY in step with one mitra's state. The caller passes what it already
-- knows (nil to read it here): load, capacity, and serving (online and not deactivated).
local function update_ready(id, now_s, load, capacity, serving)
  load = load or tonumber(redis.call('HGET', LOADS, id)) or 0
  capacity = capacity or tonumber(redis.call('HGET', CAPACITY, id)) or 0
  if serving == nil then
    serving = redis.call('SISMEMBER', ONLINE, id) == 1
      and redis.call('SISMEMBER', DEACTIVATED, id) == 0
  end
  if serving then
    redis.call('ZADD', BUSY, load, id)
  else
    redis.call('ZREM', BUSY, id)
  end
  if serving and load < capacity then
    local score = tonumber(redis.call('ZSCORE', READY, id))
    if score and math.floor(score / LOAD_SCALE) == load then
      return 0
    end
    redis.call('ZADD', READY, string.format('%d', load * LOAD_SCALE + now_s), id)
    return 1
  end
  return redis.call('ZREM', READY, id)
end

-- The watch stream (WatchAvailableMitras). PUBLISHED holds what watchers were told is
-- available (id -> load US capacity US name). publish() compares a mitra's availability now
-- with it and, when they differ, appends one change to the EVENTS stream under the next
-- REVISION, so every path that changes availability feeds watchers through here.
-- available_now returns those fields when available, else nil, the reason and the fields;
-- `known` holds what the caller already knows of the mitra (apply knows it all), so only
-- the rest is read.
local function available_now(id, now, stale_ms, known)
  local capacity = known.capacity or redis.call('HGET', CAPACITY, id)
  if not capacity then
    return nil, 'removed'
  end
  local load = known.load or redis.call('HGET', LOADS, id) or '0'
  local name = known.name or redis.call('HGET', NAMES, id) or ''
  local fields = load .. '\31' .. capacity .. '\31' .. name
  local deactivated = known.deactivated
  if deactivated == nil then
    deactivated = redis.call('SISMEMBER', DEACTIVATED, id) == 1
  end
  if deactivated then
    return nil, 'deactivated', fields
  end
  local online = known.online
  if online == nil then
    online = redis.call('SISMEMBER', ONLINE, id) == 1
  end
  if not online then
    return nil, 'offline', fields
  end
  if tonumber(load) >= tonumber(capacity) then
    return nil, 'full', fields
  end
  local heartbeat = known.heartbeat or tonumber(redis.call('ZSCORE', HEARTBEATS, id))
  if not heartbeat or heartbeat < now - stale_ms then
    return nil, 'stale', fields
  end
  return fields
end

-- Revisions start from Valkey's clock in microseconds, so a Valkey that lost its data
-- (restarted, flushed) never hands out a revision a watcher has already seen.
local function current_revision(now)
  local revision = redis.call('GET', REVISION)
  if not revision then
    revision = string.format('%d', now * 1000)
    redis.call('SET', REVISION, revision)
  end
  return revision
end

local function next_revision(now)
  current_revision(now)
  return redis.call('INCR', REVISION)
end

-- Returns 1 when the mitra's published availability changed. While the mirror is being
-- seeded, PUBLISHED follows silently: watchers take a fresh snapshot once it is seeded.
local function publish(id, now, stale_ms, retain, known)
  local held = redis.call('HGET', PUBLISHED, id)
  local value, reason, current = available_now(id, now, stale_ms, known or {})
  if value == held or (not value and not held) then
    return 0
  end
  local kind, fields
  if value then
    redis.call('HSET', PUBLISHED, id, value)
    kind, reason, fields = held and 'l' or 'a', '', value
  else
    redis.call('HDEL', PUBLISHED, id)
    kind, fields = 'u', current or held
  end
  if redis.call('EXISTS', SEEDED) == 1 then
    redis.call('XADD', EVENTS, 'MAXLEN', '~', retain, string.format('%d-0', next_revision(now)),
      'e', kind .. '\31' .. reason .. '\31' .. id .. '\31' .. fields)
  end
  return 1
end
