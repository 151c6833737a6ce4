-- Publishes the mitras that went stale since the last run (no write marks that moment, so
-- every instance runs this twice a second; the CHECKED watermark makes repeats free).
-- ARGV: stale ms, retained changes, at most how many mitras.
-- Heartbeats in [CHECKED, now - stale) crossed the threshold since the last run: the cost
-- follows the mitras that went stale, not the fleet.
local unseeded = require_seeded()
if unseeded then
  return unseeded
end
local stale_ms, retain, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local threshold = now - stale_ms
local from = redis.call('GET', CHECKED) or '-inf'
local crossed = redis.call('ZRANGE', HEARTBEATS, from, '(' .. threshold, 'BYSCORE',
  'LIMIT', 0, limit, 'WITHSCORES')
local changed = 0
for i = 1, #crossed, 2 do
  changed = changed + publish(crossed[i], now, stale_ms, retain)
end
local checked = threshold
if #crossed == 2 * limit then
  -- More crossed than one run takes: the next run goes on from the last one seen.
  local last = tonumber(crossed[#crossed])
  if last > (tonumber(from) or -math.huge) then
    checked = last
  end
end
redis.call('SET', CHECKED, string.format('%d', checked))
return changed
