-- A watch hub's starting point, in one atomic read: the revision, every published mitra,
-- and the retained changes up to that revision (so resumes can be served from memory).
-- ARGV: retained changes. Returns {revision, {id, fields, ...}, {entry, ...}, marker}: the
-- marker tells the hub which seed this is (a reseed writes a new one).
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local revision = current_revision(now_ms())
local retained = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', tonumber(ARGV[1]))
return {revision, redis.call('HGETALL', PUBLISHED), retained, redis.call('GET', SEEDED)}
