-- Presence binding's check (sessions.py). KEYS after the mirror's: the session epochs, then
-- one session key a pair. ARGV: the pairs' mitra ids, in the order of their keys.
-- Returns 'unseeded' alone when the mirror cannot be read; else one 1 (a live session of
-- that mitra, as Postgres said when it was cached) or 0 (ask Postgres) a pair, then the
-- epoch each mitra's sessions are at and the mirror's marker digest: what a fill must
-- present (cache_sessions.lua).
if not seeded() then
  return {'unseeded'}
end
local EPOCHS = KEYS[23]
local marker = redis.sha1hex(redis.call('GET', SEEDED))
-- A mitra's epoch is the whole mirror's ('*': a listener that lost its connection may have
-- missed changes) and then its own.
local all = (redis.call('HGET', EPOCHS, '*') or '0') .. '.'
local found, epochs = {}, {}
for i = 1, #ARGV do
  local epoch = all .. (redis.call('HGET', EPOCHS, ARGV[i]) or '0')
  local held = redis.call('GET', KEYS[23 + i])
  found[i] = held == (ARGV[i] .. ':' .. epoch .. ':' .. marker) and 1 or 0
  epochs[i] = epoch
end
for i = 1, #ARGV do
  found[#found + 1] = epochs[i]
end
found[#found + 1] = marker
return found
