-- Writes mitra states read from Postgres. ARGV[1], ARGV[2]: stale ms and retained changes
-- (for the watch stream). ARGV[3]: milliseconds of heartbeat credit for a mitra the mirror
-- holds no heartbeat of (the flush interval: Postgres heartbeat times lag Valkey's by up to
-- that much, the same allowance the Postgres fallback makes).
-- Then one argument a mitra (one, not nine, because packing arguments is most of the
-- client's cost at 100,000 mitras): fields joined by US (\31): id, name, capacity, active,
-- online, version, load, heartbeat ms ('' for none), read-at microseconds. Ids are distinct.
-- Two fences make late writers harmless (a paused instance, a slow reconcile):
--   online/active apply only from a version >= the one held (mitra_online_status.version);
--   name/capacity/load apply only from a read at least as recent as the one held.
-- Heartbeats only ever move forward.
-- Everything is read with one command a structure and written the same way (a reseed of
-- 100,000 mitras is Valkey-bound, and a command costs more than the work it does here).
-- Returns what it changed, by kind: {online, deactivated, load, profile, heartbeat, ready}.
local now = now_ms()
local now_s = math.floor(now / 1000)
local stale_ms, retain, credit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local changed = {0, 0, 0, 0, 0, 0}
local CHUNK = 500

-- Split with plain finds: a pattern of nine lazy captures costs more than the rest of a row.
local find, sub = string.find, string.sub
local function fields(packed)
  local row, start = {}, 1
  for f = 1, 8 do
    local stop = find(packed, '\31', start, true)
    row[f] = sub(packed, start, stop - 1)
    start = stop + 1
  end
  row[9] = sub(packed, start)
  return unpack(row)
end

local ids = {}
local marker = redis.call('GET', SEEDED)
local held_layout = marker and tonumber(string.match(marker, '^v(%d+) '))
if held_layout and held_layout > tonumber(string.match(MARK, '^v(%d+) ')) then
  -- A newer layout owns the mirror (a rolling upgrade): leave its structures alone and ask
  -- its owner to resync these mitras from Postgres. Returns -1 in place of counts. Any other
  -- marker (an older layout's, or a release from before layouts, which knows nothing of
  -- resync requests and reads these structures as they are) is written as ours: this
  -- instance's trust check distrusts it within a second, and until then its readers must
  -- see this write.
  local asked = now_ms()
  for i = 4, #ARGV do
    redis.call('ZADD', RESYNC, 'GT', asked, sub(ARGV[i], 1, find(ARGV[i], '\31', 1, true) - 1))
  end
  return {-1, 0, 0, 0, 0, 0}
end
for i = 4, #ARGV do
  ids[#ids + 1] = sub(ARGV[i], 1, find(ARGV[i], '\31', 1, true) - 1)
end
if #ids == 0 then
  return changed
end

local function read(command, key)
  local values = {}
  for first = 1, #ids, CHUNK do
    local part = redis.call(command, key, unpack(ids, first, math.min(first + CHUNK - 1, #ids)))
    for j = 1, #part do
      values[#values + 1] = part[j]
    end
  end
  return values
end

local synced, names, capacities = read('HMGET', SYNCED), read('HMGET', NAMES), read('HMGET', CAPACITY)
local loads, versions, published = read('HMGET', LOADS), read('HMGET', VERSIONS), read('HMGET', PUBLISHED)
local deactivated, online_now = read('SMISMEMBER', DEACTIVATED), read('SMISMEMBER', ONLINE)
local heartbeats, ready = read('ZMSCORE', HEARTBEATS), read('ZMSCORE', READY)
local seeded_mirror = marker ~= false

-- Writes, gathered by command and key: {command, key, arguments...}.
local writes, by_command = {}, {}
local function write(command, key, first, second)
  local by_key = by_command[command]
  if not by_key then
    by_key = {}
    by_command[command] = by_key
  end
  local pending = by_key[key]
  if not pending then
    pending = {command = command, key = key}
    by_key[key] = pending
    writes[#writes + 1] = pending
  end
  pending[#pending + 1] = first
  if second ~= nil then
    pending[#pending + 1] = second
  end
end

for i, id in ipairs(ids) do
  local _, name, capacity, active, online, version, load, heartbeat, read_at = fields(ARGV[i + 3])
  local held_name, held_capacity, held_load = names[i], capacities[i], loads[i]
  local held_read = tonumber(synced[i])
  if not held_read or tonumber(read_at) >= held_read then
    write('HSET', SYNCED, id, read_at)
    if held_name ~= name then
      changed[4] = changed[4] + 1
      write('HSET', NAMES, id, name)
      held_name = name
    end
    if held_capacity ~= capacity then
      changed[4] = changed[4] + 1
      write('HSET', CAPACITY, id, capacity)
      held_capacity = capacity
    end
    if held_load ~= load then
      changed[3] = changed[3] + 1
      write('HSET', LOADS, id, load)
      held_load = load
    end
  end

  local is_deactivated, is_online = deactivated[i] == 1, online_now[i] == 1
  local held_heartbeat = tonumber(heartbeats[i])
  local held_version = tonumber(versions[i])
  if not held_version or tonumber(version) >= held_version then
    write('HSET', VERSIONS, id, version)
    if (active ~= '1') ~= is_deactivated then
      changed[2] = changed[2] + 1
      write(is_deactivated and 'SREM' or 'SADD', DEACTIVATED, id)
      is_deactivated = not is_deactivated
    end
    local serving = active == '1' and online == '1'
    if serving ~= is_online then
      changed[1] = changed[1] + 1
      write(serving and 'SADD' or 'SREM', ONLINE, id)
      is_online = serving
    end
    if serving then
      local beat = tonumber(heartbeat) or 0
      if not held_heartbeat and beat > 0 then
        beat = math.min(now, beat + credit)
      end
      if not held_heartbeat or held_heartbeat < beat then
        write('ZADD', HEARTBEATS, beat, id)
        if held_heartbeat then
          changed[5] = changed[5] + 1
        end
        held_heartbeat = beat
      end
    elseif held_heartbeat then
      write('ZREM', HEARTBEATS, id)
      held_heartbeat = nil
    end
  end

  -- READY (the pairing order) and BUSY (the dashboard's) follow the state just written.
  local serving_now = is_online and not is_deactivated
  local load_now, capacity_now = tonumber(held_load) or 0, tonumber(held_capacity) or 0
  if serving_now then
    write('ZADD', BUSY, load_now, id)
  else
    write('ZREM', BUSY, id)
  end
  local ready_score = tonumber(ready[i])
  if serving_now and load_now < capacity_now then
    if not ready_score or math.floor(ready_score / LOAD_SCALE) ~= load_now then
      write('ZADD', READY, string.format('%d', load_now * LOAD_SCALE + now_s), id)
      changed[6] = changed[6] + 1
    end
  elseif ready_score then
    write('ZREM', READY, id)
    changed[6] = changed[6] + 1
  end

  local value, reason, fields = judge(held_capacity, held_load, held_name, is_deactivated,
    is_online, held_heartbeat, now, stale_ms)
  local kind, why, payload = change_of(published[i], value, reason, fields)
  if kind then
    if value then
      write('HSET', PUBLISHED, id, value)
    else
      write('HDEL', PUBLISHED, id)
    end
    if seeded_mirror then
      append_change(now, retain, kind, why, id, payload)
    end
  end
end

for _, pending in ipairs(writes) do
  local step = (pending.command == 'HSET' or pending.command == 'ZADD') and 2 * CHUNK or CHUNK
  for first = 1, #pending, step do
    redis.call(pending.command, pending.key, unpack(pending, first, math.min(first + step - 1, #pending)))
  end
end
return changed
