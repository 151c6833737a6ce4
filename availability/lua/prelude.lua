-- Shared by every script. KEYS are always the whole mirror, in this order:
local ONLINE, DEACTIVATED, CAPACITY, NAMES, LOADS, HEARTBEATS, READY, VERSIONS, DIRTY, BEACON =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local SYNCED, SEEDED, BUSY, BEACON_COMPUTED = KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local FLUSHING = KEYS[15]

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
