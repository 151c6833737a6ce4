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
-- A Valkey that lost its data starts the counter again: from its clock in ms, so a new
-- epoch still exceeds every one Postgres has recorded in sweep_fences.
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. string.format('%d', epoch), 'PX', ARGV[2])
return epoch
