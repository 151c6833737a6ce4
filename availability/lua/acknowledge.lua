-- The heartbeat flush wrote these (id, ms) pairs to Postgres: drop each from DIRTY unless a
-- newer heartbeat replaced it meanwhile. Safe to run late or twice.
local dropped = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', DIRTY, ARGV[i]) == ARGV[i + 1] then
    dropped = dropped + redis.call('HDEL', DIRTY, ARGV[i])
  end
end
return dropped
