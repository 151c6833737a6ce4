-- Resync requests: mitras whose state in Postgres may be newer than the mirror's because an
-- instance of an older layout wrote them (or heard their heartbeat) without writing the
-- mirror. RESYNC scores each id by when it was asked for (Valkey's clock); while an id is
-- there the owner's readers do not answer it from the mirror.
-- ARGV[1]: request (ARGV[2..]: ids) | take (ARGV[2]: at most how many; returns {now, ids...})
-- | release (ARGV[2]: the `now` take returned, ARGV[3..]: ids resynced since): drops each id
-- not asked for again after that take, since the resync read Postgres after it.
local action = ARGV[1]
if action == 'request' then
  local now = now_ms()
  for i = 2, #ARGV do
    redis.call('ZADD', RESYNC, now, ARGV[i])
  end
  return #ARGV - 1
elseif action == 'take' then
  local taken = redis.call('ZRANGE', RESYNC, 0, tonumber(ARGV[2]) - 1)
  table.insert(taken, 1, now_ms())
  return taken
end
local taken_at = tonumber(ARGV[2])
local released = 0
for i = 3, #ARGV do
  local asked = tonumber(redis.call('ZSCORE', RESYNC, ARGV[i]))
  if asked and asked <= taken_at then
    released = released + redis.call('ZREM', RESYNC, ARGV[i])
  end
end
return released
