--[==[
Event time for episodes.lua, which is appended to this file to make one script.

Reads from the request (ARGV[1], JSON): now (wall ms), shard (the batch's shard, '' for a
tick), wm (its newest event time), tick (event time every shard has reached, 0 if not a
tick), idle and warmup (wall ms), ttl (seconds).

  P:wm     hash   shard -> newest event time it delivered
  P:seen   hash   shard -> wall ms of its last batch
  P:tick   string event time of the last tick
  P:since  string wall ms when shards became active after none was (warm-up start)

Defines P, req, NOW, FRESH, GRACE, TTL, INF and
  LOW   event time: the progress of the slowest shard that delivered within 'idle', or
        the last tick if later. With every shard counted, a hit still to come from a
        shard is no older than that shard's progress minus its own disorder, so episodes
        may close once LOW passes their end by grace.
  WARM  false during 'warmup' after a start: shards that have not delivered yet may be
        behind, so nothing closes and nothing is trimmed (a tick ends it).
]==]

local P = KEYS[1]
local req = cjson.decode(ARGV[1])
local NOW, FRESH, GRACE, TTL = req.now, req.fresh, req.grace, req.ttl
local INF = math.huge
local WM_KEY, SEEN_KEY, TICK_KEY = P .. ':wm', P .. ':seen', P .. ':tick'

-- Event time: the slowest active shard's progress, or the last tick if later.
local function low_watermark()
  if req.shard ~= '' then
    local active = false
    local seen = redis.call('HGETALL', SEEN_KEY)
    for i = 2, #seen, 2 do
      if NOW - tonumber(seen[i]) <= req.idle then active = true end
    end
    if not active then redis.call('SET', P .. ':since', string.format('%.0f', NOW), 'EX', TTL) end
    local before = tonumber(redis.call('HGET', WM_KEY, req.shard) or '0')
    if req.wm > before then redis.call('HSET', WM_KEY, req.shard, string.format('%.0f', req.wm)) end
    redis.call('HSET', SEEN_KEY, req.shard, string.format('%.0f', NOW))
  end
  local ticked = tonumber(redis.call('GET', TICK_KEY) or '0')
  if req.tick > ticked then
    ticked = req.tick
    redis.call('SET', TICK_KEY, string.format('%.0f', ticked), 'EX', TTL)
  end
  local seen = redis.call('HGETALL', SEEN_KEY)
  local slowest, newest = INF, 0
  for i = 1, #seen, 2 do
    local shard, at = seen[i], tonumber(seen[i + 1])
    local progress = tonumber(redis.call('HGET', WM_KEY, shard) or '0')
    if progress > newest then newest = progress end
    if NOW - at <= req.idle then
      if progress < slowest then slowest = progress end
    elseif NOW - at > TTL * 1000 then
      redis.call('HDEL', SEEN_KEY, shard)
      redis.call('HDEL', WM_KEY, shard)
    end
  end
  if slowest == INF then slowest = newest end
  if ticked > slowest then return ticked end
  return slowest
end
local LOW = low_watermark()
-- After a start, shards that have not delivered yet may be behind: until every shard has
-- had 'warmup' to report, event time closes nothing (a tick says all are caught up).
local WARM = req.tick > 0 or NOW - tonumber(redis.call('GET', P .. ':since') or '0') >= req.warmup
