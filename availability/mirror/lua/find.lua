-- ARGV: stale ms, limit, then ids to exclude. Walks READY in order and keeps the fresh,
-- so the cost follows limit + skipped, never the fleet size.
-- Returns id, load, capacity, name for each found mitra, flattened.
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local threshold = now_ms() - tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local excluded = {}
for i = 3, #ARGV do
  excluded[ARGV[i]] = true
end
local pending = redis.call('ZCARD', RESYNC) > 0
local found = {}
local loads = {}
local page = math.max(limit + #ARGV, 64)
local start = 0
while #found < limit do
  local members = redis.call('ZRANGE', READY, start, start + page - 1, 'WITHSCORES')
  if #members == 0 then
    break
  end
  for j = 1, #members, 2 do
    local id = members[j]
    if not excluded[id] and not (pending and awaiting_resync(id)) then
      local heartbeat = tonumber(redis.call('ZSCORE', HEARTBEATS, id))
      if heartbeat and heartbeat >= threshold then
        found[#found + 1] = id
        loads[#loads + 1] = math.floor(tonumber(members[j + 1]) / LOAD_SCALE)
        if #found == limit then
          break
        end
      end
    end
  end
  start = start + page
end
local out = {}
if #found == 0 then
  return out
end
-- unpack() is bounded by Lua's C stack, so look up in chunks.
for first = 1, #found, 500 do
  local chunk = {unpack(found, first, math.min(first + 499, #found))}
  local capacities = redis.call('HMGET', CAPACITY, unpack(chunk))
  local names = redis.call('HMGET', NAMES, unpack(chunk))
  for j = 1, #chunk do
    out[#out + 1] = chunk[j]
    out[#out + 1] = loads[first + j - 1]
    out[#out + 1] = tonumber(capacities[j]) or 0
    out[#out + 1] = names[j] or ''
  end
end
return out
