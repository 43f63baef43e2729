--[==[
Settle claimed outbox entries after a delivery round (see episodes.lua for the layout).

KEYS[1]  P, the handler's key prefix;  KEYS[2]  the alert stream
ARGV[1]  JSON {now, maxlen, deadmax, hold, results: [{e entry, o done|retry|dead,
         x stream fields, due wall ms (retry), r reason (dead)}]}

done:  the entry is removed; if it carries stream fields they are appended to the stream
       only when this call removed the entry, so the stream gets each alert once even
       when two replicas deliver the same entry.
retry: the entry stays, due again at 'due', one more failed round counted.
wait:  the entry stays (it was not tried: a resolution waiting for its open alert's
       delivery), marked in P:wait, due again just after its opening is due (else at
       'due'); due now if its opening has left the outbox since the round looked.
dead:  the entry moves to P:dead (entry -> {payload, reason, at}) with its reason; when
       P:dead already holds deadmax entries it stays in the outbox instead, due again
       'hold' ms later (held): nothing is dropped to make room.
An opening that leaves the outbox (done or dead) releases its resolution if it waits in
P:wait: due now. One due again later (retry, held) moves a waiting resolution to just after
it. So a resolution follows its opening as soon as that is delivered, even when another
replica claimed the opening, rather than when that replica's claim runs out. (A claimed
resolution is no longer marked, see claim.lua: a claim is never shortened.)
Returns {done, retried, dead, held, released}: released counts resolutions made due now.
]==]

local P, STREAM = KEYS[1], KEYS[2]
local req = cjson.decode(ARGV[1])
local OUTBOX_KEY, DUE_KEY, TRIES_KEY = P .. ':outbox', P .. ':due', P .. ':tries'
local DEAD_KEY, WAIT_KEY = P .. ':dead', P .. ':wait'
local done, retried, dead, held, released = 0, 0, 0, 0, 0

local function forget(entry)
  redis.call('ZREM', DUE_KEY, entry)
  redis.call('HDEL', TRIES_KEY, entry)
  redis.call('HDEL', P .. ':requeued', entry)
  redis.call('HDEL', WAIT_KEY, entry)
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

-- The opening 'entry' is due again at 'due' (nil: it left the outbox): a resolution
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

-- A resolution that was not tried because its opening was pending when the round looked.
local function wait(entry, due)
  local opening = opening_of(entry)
  if opening and redis.call('HEXISTS', OUTBOX_KEY, opening) == 0 then
    redis.call('HDEL', WAIT_KEY, entry)
    redis.call('ZADD', DUE_KEY, req.now, entry)  -- the opening went out meanwhile
    released = released + 1
    return
  end
  local after = opening and redis.call('ZSCORE', DUE_KEY, opening)
  if after then due = math.max(tonumber(after), req.now) + 1 end
  redis.call('HSET', WAIT_KEY, entry, '1')
  redis.call('ZADD', DUE_KEY, due, entry)
end

for _, result in ipairs(req.results) do
  local entry = result.e
  if result.o == 'done' then
    if redis.call('HDEL', OUTBOX_KEY, entry) == 1 then
      done = done + 1
      if type(result.x) == 'table' and #result.x > 0 then
        redis.call('XADD', STREAM, 'MAXLEN', '~', req.maxlen, '*', unpack(result.x))
      end
    end
    forget(entry)
    follow(entry, nil)
  elseif result.o == 'retry' or result.o == 'wait' then
    if redis.call('HEXISTS', OUTBOX_KEY, entry) == 1 then
      if result.o == 'retry' then
        redis.call('ZADD', DUE_KEY, result.due, entry)
        redis.call('HINCRBY', TRIES_KEY, entry, 1)
        retried = retried + 1
        follow(entry, result.due)
      else
        wait(entry, result.due)
      end
    end
  elseif redis.call('HEXISTS', OUTBOX_KEY, entry) == 1
      and redis.call('HEXISTS', DEAD_KEY, entry) == 0
      and redis.call('HLEN', DEAD_KEY) >= req.deadmax then
    redis.call('ZADD', DUE_KEY, req.now + req.hold, entry)
    redis.call('HINCRBY', TRIES_KEY, entry, 1)
    held = held + 1
    follow(entry, req.now + req.hold)
  else
    local payload = redis.call('HGET', OUTBOX_KEY, entry)
    if payload then
      redis.call('HSET', DEAD_KEY, entry,
        cjson.encode({payload = payload, reason = result.r, at = req.now}))
      redis.call('HDEL', OUTBOX_KEY, entry)
      dead = dead + 1
    end
    forget(entry)
    follow(entry, nil)
  end
end

return {done, retried, dead, held, released}
