-- KEYS: the lease, its epoch counter. ARGV: owner, ttl ms.
-- Takes or renews the lease; returns its epoch (a fencing token that only grows), or 0 when
-- another owner holds it.
local held = redis.call('GET', KEYS[1])
if held then
  local owner, epoch = string.match(held, '^(.*)/(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(epoch)
  end
  return 0
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. epoch, 'PX', ARGV[2])
return epoch
