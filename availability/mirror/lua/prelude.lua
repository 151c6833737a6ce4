-- Shared by every script. KEYS are always the whole mirror, in this order:
local ONLINE, DEACTIVATED, CAPACITY, NAMES, LOADS, HEARTBEATS, READY, VERSIONS, DIRTY, BEACON =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local SYNCED, SEEDED, BUSY, BEACON_COMPUTED = KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local FLUSHING = KEYS[15]
local PUBLISHED, REVISION, EVENTS, CHECKED = KEYS[16], KEYS[17], KEYS[18], KEYS[19]
local SEEDING, LAYOUTS, RESYNC = KEYS[20], KEYS[21], KEYS[22]

-- SEEDED is the trust marker: 'v<layout> <run_id> <master_replid> <evicted_keys> <stamp>',
-- written by a complete seed (trust.lua). MARK is this code's layout ('v2 '), filled in when
-- the script is loaded. Only a marker of this layout makes the mirror readable: a fresh,
-- flushed or distrusted Valkey has none, and another version's layout is not ours to read.
local MARK = '@MARK@'

local function seeded()
  local held = redis.call('GET', SEEDED)
  return held and string.sub(held, 1, #MARK) == MARK
end

-- Until then, readers must ask Postgres instead.
local function require_seeded()
  if not seeded() then
    return redis.error_reply('UNSEEDED the mirror is being seeded')
  end
end

-- A mitra an older layout asked the owner to resync (resync.lua) may be newer in Postgres
-- (deactivated, say): readers must not answer it from the mirror until it is resynced.
local function awaiting_resync(id)
  return redis.call('ZSCORE', RESYNC, id) ~= false
end

-- Valkey's clock is the one clock: every instance's freshness is judged by it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- READY holds online, active mitras below capacity, scored load * 1e10 + the second
-- their load last changed (or they came online): least loaded, then longest idle.
local LOAD_SCALE = 1e10

-- The watch stream (WatchAvailableMitras). PUBLISHED holds what watchers were told is
-- available (id -> load US capacity US name). Whatever changes a mitra compares its
-- availability now with that and, when they differ, appends one change to the EVENTS stream
-- under the next REVISION: every path that changes availability feeds watchers through here.

-- A mitra's availability from what is known of it: its PUBLISHED value when available, else
-- nil and the reason; and its fields either way (nil for a mitra the mirror does not have).
local function judge(capacity, load, name, deactivated, online, heartbeat, now, stale_ms)
  if not capacity then
    return nil, 'removed'
  end
  load = load or '0'
  local fields = load .. '\31' .. capacity .. '\31' .. (name or '')
  if deactivated then
    return nil, 'deactivated', fields
  end
  if not online then
    return nil, 'offline', fields
  end
  if tonumber(load) >= tonumber(capacity) then
    return nil, 'full', fields
  end
  if not heartbeat or heartbeat < now - stale_ms then
    return nil, 'stale', fields
  end
  return fields, nil, fields
end

-- The change from held (what watchers were told) to value: kind, reason, fields; nil if none.
local function change_of(held, value, reason, fields)
  if value == held or (not value and not held) then
    return nil
  end
  if value then
    return held and 'l' or 'a', '', value
  end
  return 'u', reason, fields or held
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

-- While the mirror is being seeded PUBLISHED follows silently (callers check SEEDED):
-- watchers take a fresh snapshot once it is seeded.
local function append_change(now, retain, kind, reason, id, fields)
  current_revision(now)
  local revision = redis.call('INCR', REVISION)
  redis.call('XADD', EVENTS, 'MAXLEN', '~', retain, string.format('%d-0', revision),
    'e', kind .. '\31' .. reason .. '\31' .. id .. '\31' .. fields)
end

-- One mitra, everything read here. Returns 1 when its published availability changed.
local function publish(id, now, stale_ms, retain)
  local held = redis.call('HGET', PUBLISHED, id)
  local value, reason, fields = judge(
    redis.call('HGET', CAPACITY, id),
    redis.call('HGET', LOADS, id),
    redis.call('HGET', NAMES, id),
    redis.call('SISMEMBER', DEACTIVATED, id) == 1,
    redis.call('SISMEMBER', ONLINE, id) == 1,
    tonumber(redis.call('ZSCORE', HEARTBEATS, id)),
    now,
    stale_ms
  )
  local kind, why, payload = change_of(held, value, reason, fields)
  if not kind then
    return 0
  end
  if value then
    redis.call('HSET', PUBLISHED, id, value)
  else
    redis.call('HDEL', PUBLISHED, id)
  end
  if seeded() then
    append_change(now, retain, kind, why, id, payload)
  end
  return 1
end
