-- The heartbeat flush takes the heartbeats recorded since the last flush: DIRTY is renamed
-- to FLUSHING in O(1), so heartbeats arriving meanwhile start a fresh DIRTY. A FLUSHING left
-- by a flush that died is merged, keeping the later time of each mitra. ARGV[1]: the lease
-- epoch, stored in FLUSHING so that only this flush may drop it (release_dirty.lua).
-- Returns 1 when there is something to flush.
local epoch_field = '__epoch'
if redis.call('EXISTS', FLUSHING) == 1 then
  local pending = redis.call('HGETALL', DIRTY)
  for i = 1, #pending, 2 do
    local held = tonumber(redis.call('HGET', FLUSHING, pending[i]))
    if not held or held < tonumber(pending[i + 1]) then
      redis.call('HSET', FLUSHING, pending[i], pending[i + 1])
    end
  end
  redis.call('DEL', DIRTY)
elseif redis.call('EXISTS', DIRTY) == 1 then
  redis.call('RENAME', DIRTY, FLUSHING)
else
  return 0
end
redis.call('HSET', FLUSHING, epoch_field, ARGV[1])
return 1
