--[==[
Claim due outbox entries for delivery (see episodes.lua for the layout): nobody else takes
them until the lease ends. Included by episodes.lua (a batch claims in the same round trip)
and by the dispatcher's own claims (Outbox.claim).

claim_due(P, now, limit, lease) -> flat {entry, payload, tries, until, ...}: at most
'limit' of the entries due by 'now' (wall ms), each then due again only at until = now +
lease. 'until' is the claim's fence: while the entry's due score is still 'until', this
claim holds it; a settlement carries it, and outbox.lua ignores one whose claim has run out
and been taken by another (stale). A claimed resolution no longer waits for its opening in
P:wait (outbox.lua): its claim stands until it is settled or runs out.
]==]

local function claim_due(prefix, now, limit, lease)
  local claimed = {}
  if limit <= 0 then return claimed end
  local outbox, due_key, tries = prefix .. ':outbox', prefix .. ':due', prefix .. ':tries'
  local due = redis.call('ZRANGEBYSCORE', due_key, '-inf', string.format('%.0f', now), 'LIMIT', 0, limit)
  local expiry = string.format('%.0f', now + lease)
  for _, entry in ipairs(due) do
    local payload = redis.call('HGET', outbox, entry)
    if payload then
      redis.call('ZADD', due_key, expiry, entry)
      redis.call('HDEL', prefix .. ':wait', entry)
      claimed[#claimed + 1] = entry
      claimed[#claimed + 1] = payload
      claimed[#claimed + 1] = redis.call('HGET', tries, entry) or '0'
      claimed[#claimed + 1] = expiry
    else
      redis.call('ZREM', due_key, entry)
    end
  end
  return claimed
end
