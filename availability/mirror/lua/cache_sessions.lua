-- Cache the sessions Postgres just found live. KEYS after the mirror's: the session epochs,
-- then one session key an entry. ARGV: the marker digest the check read, then per entry the
-- mitra id, the epoch the check read and when the entry expires (unix ms). An entry is
-- cached only if nothing revoked that mitra's sessions since the check (its epoch moved) and
-- the mirror is the data set it was (the marker): so a revocation that lands between the
-- check and this write is never covered up by it.
if not seeded() or redis.sha1hex(redis.call('GET', SEEDED)) ~= ARGV[1] then
  return 0
end
local EPOCHS = KEYS[23]
local all = (redis.call('HGET', EPOCHS, '*') or '0') .. '.'
local cached = 0
for i = 24, #KEYS do
  local at = 2 + (i - 24) * 3
  local mitra, epoch = ARGV[at], ARGV[at + 1]
  if all .. (redis.call('HGET', EPOCHS, mitra) or '0') == epoch then
    redis.call('SET', KEYS[i], mitra .. ':' .. epoch .. ':' .. ARGV[1], 'PXAT', ARGV[at + 2])
    cached = cached + 1
  end
end
return cached
