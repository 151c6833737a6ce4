-- Whether the mirror may be trusted: is the data set in Valkey the one a complete seed wrote?
-- A restart (empty, or loading an older RDB/AOF), a restore, a promoted replica, a failover,
-- a flush or an eviction each leave a data set that may predate Postgres, often with an old
-- marker inside it. So the marker names the data set's identity: the server's run_id (new for
-- every process), its master_replid (new when a replica is promoted) and its evicted_keys
-- count (moves when anything was evicted). A marker naming another identity is distrusted.
-- KEYS: the mirror's (prelude), then each sweep's lease and epoch.
-- ARGV: action, this code's layout, ms a layout stays live after its last check, seed identity.
-- Actions:
--   check  every instance, on every new connection and once a second: says the layout is
--          live, and distrusts a marker of another identity (or of an older layout, or of a
--          newer one no longer live): the marker and what must not outlive a data set are
--          dropped, so every instance reads Postgres until a reseed.
--   seed   check, then remember the identity a reseed starts from (SEEDING).
--   mark   check, then write the marker if the data set is still the one the seed started
--          from (a flush or a distrust since then dropped SEEDING, so the seed is void).
--   peek   nothing written (availability status).
-- Returns {verdict, held marker or '', identity, highest live layout, maxmemory-policy, role,
-- Valkey's time in ms}: verdict is trusted, unseeded, distrusted, guest (a newer layout is live:
-- not ours to use) or void (mark: the seed must run again).
local action, layout, live_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function field(section, name)
  return string.match(redis.call('INFO', section), name .. ':([^\r\n]*)')
end

local role = field('replication', 'role') or 'master'
local identity = (field('server', 'run_id') or '-') .. ' ' ..
  (field('replication', 'master_replid') or '-') .. ' ' .. (field('stats', 'evicted_keys') or '0')
local policy = field('memory', 'maxmemory_policy') or 'unknown'
local now = now_ms()

if action ~= 'peek' then
  -- pcall: a Valkey out of memory refuses the ZADD, and the check must still answer.
  redis.pcall('ZADD', LAYOUTS, now, layout)
  redis.call('ZREMRANGEBYSCORE', LAYOUTS, '-inf', now - 3600000)
end
local highest = layout
for _, live in ipairs(redis.call('ZRANGE', LAYOUTS, now - live_ms, '+inf', 'BYSCORE')) do
  highest = math.max(highest, tonumber(live))
end

local held = redis.call('GET', SEEDED)
local ours = MARK .. identity .. ' '
local verdict
if highest > layout then
  verdict = 'guest'
elseif held and string.sub(held, 1, #ours) == ours then
  verdict = 'trusted'
elseif not held then
  verdict = 'unseeded'
else
  verdict = 'distrusted'
  if action ~= 'peek' then
    -- Heartbeats of another data set would deny the reseed its credit; leases and epochs
    -- restored from a snapshot could block sweeps or fall behind Postgres's fences; the
    -- revision must only grow (it restarts from the clock).
    redis.call('DEL', SEEDED, SEEDING, BEACON, REVISION, HEARTBEATS)
    for i = 23, #KEYS do
      redis.call('DEL', KEYS[i])
    end
  end
end

if action == 'seed' and verdict ~= 'guest' then
  redis.call('SET', SEEDING, identity)
elseif action == 'mark' and verdict ~= 'guest' then
  local started = ARGV[4]
  if verdict == 'trusted' then
    if redis.call('GET', SEEDING) == started then
      redis.call('DEL', SEEDING)
    end
  elseif verdict == 'unseeded' and started == identity and redis.call('GET', SEEDING) == started then
    held = ours .. now
    redis.call('SET', SEEDED, held)
    -- The seed published silently: revisions restart from the clock, so no resume from
    -- before it can be answered with changes that skip what it did.
    redis.call('DEL', SEEDING, REVISION)
    verdict = 'trusted'
  else
    verdict = 'void'
  end
end
return {verdict, held or '', identity, highest, policy, role, now}
