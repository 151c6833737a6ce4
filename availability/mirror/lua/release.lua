-- KEYS: the lease. ARGV: owner. Drops the lease only if this owner still holds it.
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. '/' then
  return redis.call('DEL', KEYS[1])
end
return 0
