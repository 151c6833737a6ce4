-- KEYS: the instances (sorted by when last seen, on Valkey's clock), their reports.
-- ARGV: instance, report, forget after ms. An instance that stops announcing (it crashed)
-- is dropped by the next announcement of any other after ARGV[3].
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for _, gone in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[3])), 'BYSCORE')) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('HDEL', KEYS[2], gone)
end
return now
