-- ARGV: stale ms, retained changes, then the ids of the heartbeats that arrived together.
-- Returns one outcome an id: 1 recorded (online), 0 offline (not recorded), -1 deactivated,
-- -2 unknown here (or awaiting a resync: Postgres decides), -3 mirror not seeded.
local stale_ms, retain = tonumber(ARGV[1]), tonumber(ARGV[2])
local outcomes = {}
if not seeded() then
  for i = 3, #ARGV do
    outcomes[#outcomes + 1] = -3
  end
  return outcomes
end
local now = now_ms()
local pending = redis.call('ZCARD', RESYNC) > 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local outcome = 1
  if pending and awaiting_resync(id) then
    outcome = -2
  elseif redis.call('SISMEMBER', DEACTIVATED, id) == 1 then
    outcome = -1
  elseif redis.call('SISMEMBER', ONLINE, id) == 0 then
    outcome = redis.call('HEXISTS', CAPACITY, id) == 0 and -2 or 0
  else
    redis.call('ZADD', HEARTBEATS, now, id)
    redis.call('HSET', DIRTY, id, now)
    -- A mitra that was stale is available again: one HEXISTS on the common path.
    if redis.call('HEXISTS', PUBLISHED, id) == 0 and redis.call('ZSCORE', READY, id) then
      publish(id, now, stale_ms, retain)
    end
  end
  outcomes[#outcomes + 1] = outcome
end
return outcomes
