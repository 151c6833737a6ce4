-- The flush wrote FLUSHING to Postgres: drop it, unless a newer leader's flush has taken it
-- over since (a paused former leader waking late must not drop what another is writing).
-- ARGV[1]: the lease epoch of the flush that took it.
if redis.call('HGET', FLUSHING, '__epoch') == ARGV[1] then
  return redis.call('UNLINK', FLUSHING)
end
return 0
