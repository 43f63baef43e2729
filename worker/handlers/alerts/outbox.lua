--[==[
Settle claimed outbox entries after a delivery round (see episodes.lua for the layout).

KEYS[1]  P, the handler's key prefix;  KEYS[2]  the alert stream
ARGV[1]  JSON {now, maxlen, deadmax, hold, orphaned (reason a resolution is given up with
         its opening), results: [{e entry, f fence, o done|retry|wait|dead, x stream
         fields, due wall ms (retry, wait), r reason (dead)}]}

Fenced: a result acts only while the claim it comes from still holds its entry, that is
while the entry is in the outbox and its due score is still 'f', the expiry that claim
set (claim.lua). Otherwise the claim ran out and another replica claimed the entry (or it
was settled already): the result is stale and ignored, so a late settlement can neither
shorten another replica's claim nor undo what it did.

done:  the entry is removed; if it carries stream fields they are appended to the stream
       in the same step, so the stream gets each alert once even when two replicas deliver
       the same entry (only the holder of the claim settles it).
retry: the entry stays, due again at 'due', one more failed round counted.
wait:  the entry stays (it was not tried: a resolution waiting for its open alert's
       delivery, or an entry whose claim was running out), due again at 'due'. A
       resolution is marked in P:wait and due just after its opening is due instead; due
       now if its opening has been delivered since the round looked; given up (below) if
       its opening was given up.
dead:  the entry moves to P:dead (entry -> {payload, reason, at}) with its reason; when
       P:dead already holds deadmax entries it stays in the outbox instead, due again
       'hold' ms later (held): nothing is dropped to make room.
An opening that is delivered releases its resolution if it waits in P:wait: due now. One
due again later (retry, held) moves a waiting resolution to just after it. So a resolution
follows its opening as soon as that is delivered, even when another replica claimed the
opening, rather than when that replica's claim runs out. (A claimed resolution is no
longer marked, see claim.lua: a claim is never shortened.)
An opening that is given up takes its resolution with it (reason ORPHANED) if that is in
the outbox and not claimed (waiting, or due); a claimed one follows when its claim settles
(it cannot have been tried: its opening was not delivered) or, if that replica died, when
it is claimed again. So no sink gets a resolution whose opening it never got; a redrive
(outbox.py) puts both back, and the resolution waits for its opening again.
Returns {done, retried, dead, held, released, stale, orphans}: released counts resolutions
made due now, stale lists the entries whose results were ignored, orphans the resolutions
given up because their opening was (in P:dead, or held while it is full).
]==]

local P, STREAM = KEYS[1], KEYS[2]
local req = cjson.decode(ARGV[1])
local OUTBOX_KEY, DUE_KEY, TRIES_KEY = P .. ':outbox', P .. ':due', P .. ':tries'
local DEAD_KEY, WAIT_KEY = P .. ':dead', P .. ':wait'
local ORPHANED = req.orphaned
local done, retried, dead, held, released, stale, orphans = 0, 0, 0, 0, 0, {}, {}

local function forget(entry)
  redis.call('ZREM', DUE_KEY, entry)
  redis.call('HDEL', TRIES_KEY, entry)
  redis.call('HDEL', P .. ':requeued', entry)
  redis.call('HDEL', WAIT_KEY, entry)
end

-- Whether the claim that set 'fence' as the entry's due score still holds it.
local function holds(entry, fence)
  if redis.call('HEXISTS', OUTBOX_KEY, entry) == 0 then return false end
  local due = redis.call('ZSCORE', DUE_KEY, entry)
  return due and tonumber(due) == tonumber(fence)
end

-- Entries are 'sink|kind|subject|key|status': a resolution's opening and the reverse.
local function opening_of(entry)
  local head = string.match(entry, '^(.*)|resolved$')
  return head and head .. '|open'
end
local function resolution_of(entry)
  local head = string.match(entry, '^(.*)|open$')
  return head and head .. '|resolved'
end

-- The opening 'entry' is due again at 'due' (nil: it was delivered): a resolution
-- waiting for it follows just after, or at once.
local function follow(entry, due)
  local waiting = resolution_of(entry)
  if not waiting or redis.call('HEXISTS', WAIT_KEY, waiting) == 0 then return end
  if redis.call('HEXISTS', OUTBOX_KEY, waiting) == 0 then
    redis.call('HDEL', WAIT_KEY, waiting)
  elseif due then
    redis.call('ZADD', DUE_KEY, due + 1, waiting)
  else
    redis.call('HDEL', WAIT_KEY, waiting)
    redis.call('ZADD', DUE_KEY, req.now, waiting)
    released = released + 1
  end
end

local orphan

-- Give up the outbox entry 'entry': to P:dead with its reason, and its resolution with it
-- if it is an opening; while P:dead is full it stays in the outbox, due again later (held).
local function bury(entry, reason)
  local payload = redis.call('HGET', OUTBOX_KEY, entry)
  if not payload then
    forget(entry)
    return
  end
  if redis.call('HEXISTS', DEAD_KEY, entry) == 0 and redis.call('HLEN', DEAD_KEY) >= req.deadmax then
    redis.call('ZADD', DUE_KEY, req.now + req.hold, entry)
    redis.call('HINCRBY', TRIES_KEY, entry, 1)
    held = held + 1
    follow(entry, req.now + req.hold)
    return
  end
  redis.call('HSET', DEAD_KEY, entry, cjson.encode({payload = payload, reason = reason, at = req.now}))
  redis.call('HDEL', OUTBOX_KEY, entry)
  dead = dead + 1
  forget(entry)
  orphan(entry)
end

-- The opening 'entry' was given up: so is its resolution, unless another claim holds it
-- (that one is given up when it settles, see wait()).
orphan = function(entry)
  local resolution = resolution_of(entry)
  if not resolution then return end
  if redis.call('HEXISTS', OUTBOX_KEY, resolution) == 0 then
    redis.call('HDEL', WAIT_KEY, resolution)
    return
  end
  local due = redis.call('ZSCORE', DUE_KEY, resolution)
  if redis.call('HEXISTS', WAIT_KEY, resolution) == 1 or not due or tonumber(due) <= req.now then
    orphans[#orphans + 1] = resolution
    bury(resolution, ORPHANED)
  end
end

-- An entry that was not tried: a resolution whose opening was not delivered when the round
-- looked, or an entry handed back because its claim was running out.
local function wait(entry, due)
  local opening = opening_of(entry)
  if opening and redis.call('HEXISTS', DEAD_KEY, opening) == 1 then
    orphans[#orphans + 1] = entry
    bury(entry, ORPHANED)
    return
  end
  if opening and redis.call('HEXISTS', OUTBOX_KEY, opening) == 0 then
    redis.call('HDEL', WAIT_KEY, entry)
    redis.call('ZADD', DUE_KEY, req.now, entry)  -- the opening went out meanwhile
    released = released + 1
    return
  end
  local after = opening and redis.call('ZSCORE', DUE_KEY, opening)
  if after then due = math.max(tonumber(after), req.now) + 1 end
  if opening then redis.call('HSET', WAIT_KEY, entry, '1') end  -- an opening waits for none
  redis.call('ZADD', DUE_KEY, due, entry)
end

for _, result in ipairs(req.results) do
  local entry = result.e
  if not holds(entry, result.f) then
    stale[#stale + 1] = entry
  elseif result.o == 'done' then
    redis.call('HDEL', OUTBOX_KEY, entry)
    done = done + 1
    if type(result.x) == 'table' and #result.x > 0 then
      redis.call('XADD', STREAM, 'MAXLEN', '~', req.maxlen, '*', unpack(result.x))
    end
    forget(entry)
    follow(entry, nil)
  elseif result.o == 'retry' then
    redis.call('ZADD', DUE_KEY, result.due, entry)
    redis.call('HINCRBY', TRIES_KEY, entry, 1)
    retried = retried + 1
    follow(entry, result.due)
  elseif result.o == 'wait' then
    wait(entry, result.due)
  else
    bury(entry, result.r)
  end
end

return {done, retried, dead, held, released, stale, orphans}
