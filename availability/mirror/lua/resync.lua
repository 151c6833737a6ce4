-- Resync requests: mitras whose state in Postgres may be newer than the mirror's because an
-- instance of an older layout wrote them (or heard their heartbeat) without writing the
-- mirror, or because a deactivation is being written. RESYNC scores each id by when it was
-- asked for (Valkey's clock; a score only moves forward, except by unpin); while an id is
-- there every reader answers it from Postgres.
-- ARGV[1]: request (ARGV[2..]: ids) | take (ARGV[2]: at most how many; returns {now, ids...})
-- | release (ARGV[2]: the `now` take returned, ARGV[3..]: ids resynced since): drops each id
-- asked for before that take's millisecond, since the resync read Postgres after it (one asked
-- in the same millisecond, after the take, may have been written after the read: it waits for
-- the next take)
-- | pin (ARGV[2]: ms, ARGV[3..]: ids; returns the score): asked for that far in the future,
-- so no release drops it before then: a deactivation pins its mitra before it commits, so a
-- mirror write that fails after the commit cannot leave the mitra served from the mirror
-- | unpin (ARGV[2]: the score pin returned, ARGV[3..]: ids): once the write reached the
-- mirror (or was left to the owner), each id still pinned with that score becomes a request
-- asked for now, which the owner's next resync releases.
local action = ARGV[1]
if action == 'request' then
  local now = now_ms()
  for i = 2, #ARGV do
    redis.call('ZADD', RESYNC, 'GT', now, ARGV[i])
  end
  return #ARGV - 1
elseif action == 'take' then
  local taken = redis.call('ZRANGE', RESYNC, 0, tonumber(ARGV[2]) - 1)
  table.insert(taken, 1, now_ms())
  return taken
elseif action == 'pin' then
  local until_ms = now_ms() + tonumber(ARGV[2])
  for i = 3, #ARGV do
    redis.call('ZADD', RESYNC, 'GT', until_ms, ARGV[i])
  end
  return until_ms
elseif action == 'unpin' then
  local now, unpinned = now_ms(), 0
  for i = 3, #ARGV do
    if tonumber(redis.call('ZSCORE', RESYNC, ARGV[i])) == tonumber(ARGV[2]) then
      redis.call('ZADD', RESYNC, now, ARGV[i])
      unpinned = unpinned + 1
    end
  end
  return unpinned
end
local taken_at = tonumber(ARGV[2])
local released = 0
for i = 3, #ARGV do
  local asked = tonumber(redis.call('ZSCORE', RESYNC, ARGV[i]))
  if asked and asked < taken_at then
    released = released + redis.call('ZREM', RESYNC, ARGV[i])
  end
end
return released
