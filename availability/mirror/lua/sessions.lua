-- Presence binding's check (sessions.py). KEYS after the mirror's: the session epochs, then
-- one session key a pair. ARGV: the pairs' mitra ids, in the order of their keys.
-- Returns 'unseeded' alone when the mirror cannot be read; else the mirror's marker digest,
-- then for each pair the cache does not vouch for (not cached as a live session of that
-- mitra at its current epoch): its position (1-based) and the epoch that mitra's sessions
-- are at, which a fill must present (cache_sessions.lua). All vouched for: the digest alone.
if not seeded() then
  return {'unseeded'}
end
local EPOCHS = KEYS[23]
local marker = redis.sha1hex(redis.call('GET', SEEDED))
-- A mitra's epoch is the whole mirror's ('*': a listener that lost its connection may have
-- missed changes) and then its own.
local all = (redis.call('HGET', EPOCHS, '*') or '0') .. '.'
local reply = {marker}
for i = 1, #ARGV do
  local epoch = all .. (redis.call('HGET', EPOCHS, ARGV[i]) or '0')
  if redis.call('GET', KEYS[23 + i]) ~= (ARGV[i] .. ':' .. epoch .. ':' .. marker) then
    reply[#reply + 1] = i
    reply[#reply + 1] = epoch
  end
end
return reply
