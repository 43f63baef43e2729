--[==[
Settle claimed outbox entries after a delivery round (see episodes.lua for the layout).

KEYS[1]  P, the handler's key prefix;  KEYS[2]  the alert stream
ARGV[1]  JSON {now, maxlen, deadmax, hold, results: [{e entry, o done|retry|dead,
         x stream fields, due wall ms (retry), r reason (dead)}]}

done:  the entry is removed; if it carries stream fields they are appended to the stream
       only when this call removed the entry, so the stream gets each alert once even
       when two replicas deliver the same entry.
retry: the entry stays, due again at 'due', one more failed round counted.
wait:  the entry stays, due again at 'due' (it was not tried: a resolution waiting for
       its open alert's delivery).
dead:  the entry moves to P:dead (entry -> {payload, reason, at}) with its reason; when
       P:dead already holds deadmax entries it stays in the outbox instead, due again
       'hold' ms later (held): nothing is dropped to make room.
Returns {done, retried, dead, held}.
]==]

local P, STREAM = KEYS[1], KEYS[2]
local req = cjson.decode(ARGV[1])
local OUTBOX_KEY, DUE_KEY, TRIES_KEY = P .. ':outbox', P .. ':due', P .. ':tries'
local DEAD_KEY = P .. ':dead'
local done, retried, dead, held = 0, 0, 0, 0

local function forget(entry)
  redis.call('ZREM', DUE_KEY, entry)
  redis.call('HDEL', TRIES_KEY, entry)
  redis.call('HDEL', P .. ':requeued', entry)
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
  elseif result.o == 'retry' or result.o == 'wait' then
    if redis.call('HEXISTS', OUTBOX_KEY, entry) == 1 then
      redis.call('ZADD', DUE_KEY, result.due, entry)
      if result.o == 'retry' then
        redis.call('HINCRBY', TRIES_KEY, entry, 1)
        retried = retried + 1
      end
    end
  elseif redis.call('HEXISTS', OUTBOX_KEY, entry) == 1
      and redis.call('HEXISTS', DEAD_KEY, entry) == 0
      and redis.call('HLEN', DEAD_KEY) >= req.deadmax then
    redis.call('ZADD', DUE_KEY, req.now + req.hold, entry)
    redis.call('HINCRBY', TRIES_KEY, entry, 1)
    held = held + 1
  else
    local payload = redis.call('HGET', OUTBOX_KEY, entry)
    if payload then
      redis.call('HSET', DEAD_KEY, entry,
        cjson.encode({payload = payload, reason = result.r, at = req.now}))
      redis.call('HDEL', OUTBOX_KEY, entry)
      dead = dead + 1
    end
    forget(entry)
  end
end

return {done, retried, dead, held}
