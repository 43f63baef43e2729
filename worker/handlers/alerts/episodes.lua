--[==[
Event-time episode detection for alert handlers: one call per batch, atomic.

KEYS[1]  P, the handler's key prefix (every key below is P..':'..<name>, one hash tag)
ARGV[1]  JSON request (times are event-time milliseconds unless said otherwise); the
         event-time fields (shard, wm, tick, idle, warmup) are read by event_time.lua:
  now    wall clock ms: outbox due times and claim leases
  fresh  transitions at earlier event times are recorded but not sent (stale)
  grace  ms a quiet episode waits past its deadline before it closes
  ttl    seconds state lives after its last change
  sinks  sink names; each sent transition gets one outbox entry per sink
  claim  how many due outbox entries to claim; lease: ms a claim lasts
  keep   1 (a process's first call): make sure no open episode's state expires (states
         saved by versions before open states were kept carry a TTL)
  late   lateness ms: how long past event time hits are kept
  rules  [kind, n threshold, w window ms (0: unbounded), d 1 = count distinct members,
         q 1 = closes when quiet]
  subs   one per subject: [rule (index into rules, from 0), subject, group, meta JSON,
         hits [[member, ts, tags, info]] in ts order, clears: their distinct ts as text,
         newest first, "<ts>," each]

Per subject (kind K, subject S):
  P:s:K:S  hash   state: max (newest event seen), config (w g m d q) and the current
                  episode: key (id basis), first, last, at (met threshold), n, state
                  (open|closed), sent (0|1), pend (earliest clear after first, 0 none:
                  the episode ends there once event time is past it by grace),
                  closed (ts), why (recovered|quiet), info, af (its P:active field),
                  lo (its hits are all later: the clear or previous episode before it),
                  need (threshold), walked (event time up to which its hits and clears
                  have been walked; later ones are stored only, see walk()).
                  Lives ttl after its last change once closed; never expires while open
                  (an episode that only a clear ends may stay open for weeks).
  P:h:K:S  zset   hits: member -> ts. Members are event SIDs, so duplicates and both
                  vendor envelopes of one event count once; in distinct mode members
                  are SIM SIDs scored by their newest hit.
  P:x:K:S  hash   event SID -> its tags, then '\n' and its info if it has one (count
                  mode), trimmed with P:h
  P:c:K:S  zset   clears (events that end an episode and split windows), by ts, for a
                  subject with state (one without state logs them in P:logs; a set left
                  from when it had state moves into its log)
  P:t:K:S  hash   the episode's tags -> count (distinct mode: tag -> newest ts); kept
                  like P:s
Per handler:
  P:open   zset   'K\tS' -> event time at which the open episode ends: its pending
                  clear, else its last hit plus window (quiet)
  P:active hash   'K\tgroup\tS' -> ts the episode opened (gauges)
  P:pend   zset   'K\tS' -> event time of its earliest stored event not walked yet
  P:logs   hash   'K\tS' -> the recent clears of a subject without state, kept briefly in
                  case hits they precede arrive late: what its P:c would hold ("<ts>,"
                  each, newest first, those before the trims' cuts dropped); taken into
                  P:c when the subject gets state
  P:logt   zset   'K\tS' -> when its log expires (wall ms): fields have no TTL
  P:outbox hash   entry -> transition JSON, entry = 'sink|K|S|key|open|resolved'
  P:due    zset   entry -> wall ms when it may be (re)claimed; while claimed, the claim's
                  expiry, which fences its settlement (claim.lua, outbox.lua)
  P:tries  hash   entry -> failed delivery rounds
  P:wait   hash   resolution entry -> 1 while it waits for its opening's delivery
                  (outbox.lua); due again as soon as the opening is delivered, given up
                  with it if the opening is given up
  P:dead   hash   entry -> {payload, reason, at}: given up on (outbox.lua, outbox.py)
  P:requeued hash entry -> wall ms it was last put back from P:dead (outbox.py)
  (and the event-time keys of event_time.lua, which runs first: LOW, WARM)

Equal event times: a hit at t comes before a clear at t (the clear ends the hits up to and
including t; later hits are after it), everywhere below.

Episodes close when event time (LOW) passes their end by grace; hits are kept until LOW
(or their subject's newest event, if earlier) passes them by l + w.

Returns {transitions (JSON strings), claimed (flat: entry, payload, tries, ...), more (1
when a loop below took its limit of subjects, so more may be due: call again)}.
]==]

local OPEN_KEY, ACTIVE_KEY = P .. ':open', P .. ':active'
local OUTBOX_KEY, DUE_KEY, TRIES_KEY = P .. ':outbox', P .. ':due', P .. ':tries'
local PEND_KEY = P .. ':pend'
local transitions = {}

-- Numbers handed to Redis are written here, never by Redis or Lua: a number argument
-- of redis.call is printed with '%.17g' and a concatenated one with '%.14g', both through
-- the C library's floating-point printer, which cost a fifth of these scripts' work. Event
-- times, counts and TTLs are whole numbers, printed as integers ('%d' takes a C long:
-- whole numbers below 2^53 fit).
local format, whole = string.format, math.floor
local function fmt(x)
  if x == INF then return '+inf' elseif x == -INF then return '-inf' end
  if x == whole(x) and x < 9007199254740992 and x > -9007199254740992 then
    return format('%d', x)
  end
  return format('%.0f', x)
end
local TTL_TEXT = fmt(TTL)

local function excl(x)
  if x == INF or x == -INF then return fmt(x) end
  return '(' .. fmt(x)
end

local function key(part, st)
  return P .. ':' .. part .. ':' .. st.kind .. ':' .. st.subject
end

local function split(text)
  local parts = {}
  if text and text ~= '' then
    for part in string.gmatch(text, '[^\t]+') do parts[#parts + 1] = part end
  end
  return parts
end

-- Run a command over many arguments in chunks (unpack has a limit); HMGET results joined.
local function chunked(command, k, items)
  local out = {}
  for i = 1, #items, 500 do
    local part = {}
    for j = i, math.min(i + 499, #items) do part[#part + 1] = items[j] end
    local reply = redis.call(command, k, unpack(part))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

local NUMERIC = {max = true, w = true, key = true, first = true, last = true, at = true,
  n = true, closed = true, pend = true, lo = true, need = true, walked = true}
local FIELDS = {'max', 'w', 'g', 'm', 'd', 'q', 'key', 'first', 'last', 'at', 'n', 'state',
  'sent', 'pend', 'closed', 'why', 'info', 'af', 'lo', 'need', 'walked'}
-- The latest event time the current walk may look at: stored hits later than this have
-- not been walked and are neither counted nor taken into an episode yet.
local HORIZON = -INF

local function load(kind, subject)
  local st = {kind = kind, subject = subject}
  local raw = redis.call('HGETALL', key('s', st))
  for i = 1, #raw, 2 do
    local field, value = raw[i], raw[i + 1]
    if NUMERIC[field] then st[field] = tonumber(value) else st[field] = value end
  end
  return st
end

local function save(st)
  local args, n = {}, 0
  for i = 1, #FIELDS do
    local field = FIELDS[i]
    local value = st[field]
    if value ~= nil then
      args[n + 1], args[n + 2] = field, type(value) == 'number' and fmt(value) or value
      n = n + 2
    end
  end
  local sk, tk = key('s', st), key('t', st)
  redis.call('HSET', sk, unpack(args, 1, n))
  if st.state == 'open' then
    redis.call('PERSIST', sk)
    redis.call('PERSIST', tk)
  else
    redis.call('EXPIRE', sk, TTL_TEXT)
    redis.call('EXPIRE', tk, TTL_TEXT)
  end
end

local function member_of(st) return st.kind .. '\t' .. st.subject end
local function active_of(st) return st.kind .. '\t' .. (st.g or '') .. '\t' .. st.subject end

local function tags_of(st)
  local raw = redis.call('HGETALL', key('t', st))
  local tags = {}
  for i = 1, #raw, 2 do
    local value = tonumber(raw[i + 1])
    if st.d ~= '1' then
      tags[raw[i]] = value
    elseif value >= st.first then
      tags[raw[i]] = 1
    end
  end
  return tags
end

local function emit(st, event, at, sent)
  local count = st.n
  if st.d == '1' then
    -- Members are scored by their newest hit: count those up to the episode's end, and
    -- never fewer than announced (a member may have been hit again since).
    local upto = fmt(math.min(HORIZON, st.last))  -- none beyond the walk or its end
    if event == 'resolved' then upto = fmt(st.closed) end
    count = math.max(redis.call('ZCOUNT', key('h', st), fmt(st.first), upto), st.n or 0)
    st.n = count
  end
  local closed, why = nil, nil
  if event == 'resolved' then closed, why = st.closed, st.why end
  local payload = cjson.encode({
    k = st.kind, s = st.subject, g = st.g or '', m = st.m or '', key = st.key, ev = event,
    at = at, opened = st.at, first = st.first, last = st.last, closed = closed, why = why,
    n = count, tags = tags_of(st), info = st.info or '', sent = sent, cat = NOW,
  })
  transitions[#transitions + 1] = payload
  if sent then
    for _, sink in ipairs(req.sinks) do
      local entry = table.concat({sink, st.kind, st.subject, fmt(st.key), event}, '|')
      if redis.call('HSETNX', OUTBOX_KEY, entry, payload) == 1 then
        redis.call('ZADD', DUE_KEY, fmt(NOW), entry)
      end
    end
  end
end

local function pending(st) return st.pend ~= nil and st.pend > 0 end

-- Whether a clear at ts ends the open episode: unless it closes when quiet and had been
-- quiet for its window by then.
local function ends_at(st, ts)
  return st.q ~= '1' or ts <= st.last + st.w
end

-- When the open episode ends in event time if nothing changes: at its pending clear, or
-- when quiet for its window; nil if it only ends at a clear.
local function deadline(st)
  if pending(st) then return st.pend end
  if st.q == '1' then return st.last + st.w end
  return nil
end

local function schedule(st)
  local due = deadline(st)
  if due then redis.call('ZADD', OPEN_KEY, fmt(due), member_of(st)) end
end

-- The end is announced no earlier than the opening: a clear that arrived late may fall
-- between the episode's first hit and the one that met the threshold.
local function close(st, at, why)
  st.state, st.closed, st.why, st.pend = 'closed', at, why, 0
  redis.call('ZREM', OPEN_KEY, member_of(st))
  redis.call('HDEL', ACTIVE_KEY, st.af or active_of(st))
  emit(st, 'resolved', math.max(at, st.at), st.sent == '1')
end

-- Whether a stored clear lies in [lo, hi): a hit at lo then cannot join hits from hi on.
local function cleared(st, lo, hi)
  return #redis.call('ZRANGEBYSCORE', key('c', st), fmt(lo), excl(hi), 'LIMIT', '0', '1') > 0
end

-- Whether a hit at ts belongs to the subject's current (or last) episode: not past its
-- end, within its window (if any) of its hits, and with no clear between.
local function covered(st, ts)
  if st.state == nil then return false end
  if pending(st) and ts > st.pend then return false end
  if st.w > 0 and ts < st.first - st.w then return false end
  if st.lo and ts <= st.lo then return false end
  if st.state == 'closed' then
    -- It takes in hits up to the clear that ended it, or to its quiet end (never further:
    -- later hits belong to a new episode).
    if ts > st.closed then return false end
    if ts > st.last and cleared(st, st.last, ts) then return false end
  elseif st.w > 0 and ts > st.last + st.w then
    return false
  end
  return ts >= st.first or not cleared(st, ts, st.first)
end

-- The event time after which a new episode may start.
local function edge_of(st)
  if st.state == nil then return -INF end
  if pending(st) then return st.pend end
  if st.why == 'recovered' then return st.closed end
  return st.last
end

-- A P:x value as (tags, info); either may be ''.
local function tags_info(value)
  if not value then return '', '' end
  local cut = string.find(value, '\n', 1, true)
  if not cut then return value, '' end
  return string.sub(value, 1, cut - 1), string.sub(value, cut + 1)
end

-- Add tag counts to the episode's tag hash in one HINCRBY per distinct tag (sign -1:
-- subtract them, dropping tags that reach zero).
local function add_tags(st, list_of_tag_strings, sign)
  local counts = {}
  for _, value in ipairs(list_of_tag_strings) do
    if value then
      for _, tag in ipairs(split((tags_info(value)))) do counts[tag] = (counts[tag] or 0) + 1 end
    end
  end
  local tk = key('t', st)
  for tag, count in pairs(counts) do
    if redis.call('HINCRBY', tk, tag, fmt(count * (sign or 1))) <= 0 then redis.call('HDEL', tk, tag) end
  end
end

-- Count the stored hits between lo and hi (range strings) not counted in this call yet.
-- Invariant: the hits counted in an episode are the stored hits within [first, last], so
-- only the ranges the episode grows by hold uncounted ones (plus new late hits inside).
local function absorb(st, lo, hi, counted)
  if st.d == '1' then return end
  local found = {}
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key('h', st), lo, hi)) do
    if not counted[m] then
      counted[m] = true
      found[#found + 1] = m
    end
  end
  if #found > 0 then
    st.n = st.n + #found
    add_tags(st, chunked('HMGET', key('x', st), found))
  end
end

-- The episode's announcement, once it has a recent enough event (see 'fresh').
local function announce(st, ts)
  if st.state == 'open' and st.sent ~= '1' and ts >= FRESH then
    st.sent = '1'
    emit(st, 'open', ts, true)
  end
end

-- Grow the episode to cover ts, then through stored hits that chain on from it (no more
-- than w apart: they may have arrived before the hits that connect them), counting them.
local function grow(st, ts, info, counted)
  local f0, l0, w = st.first, st.last, st.w
  local first, last = math.min(f0, ts), math.max(l0, ts)
  if w > 0 then
    local hk, ck = key('h', st), key('c', st)
    local ceil = HORIZON  -- the latest hit time it may take in
    if pending(st) and st.pend < ceil then ceil = st.pend end
    if st.state == 'closed' and st.closed < ceil then ceil = st.closed end
    local nc = redis.call('ZRANGEBYSCORE', ck, fmt(last), '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
    if nc[2] and tonumber(nc[2]) < ceil then ceil = tonumber(nc[2]) end
    local ahead = redis.call('ZRANGEBYSCORE', hk, excl(last), fmt(ceil), 'WITHSCORES')
    for i = 2, #ahead, 2 do
      local t = tonumber(ahead[i])
      if t - last > w then break end
      last = t
    end
    if first < f0 then
      local pc = redis.call('ZREVRANGEBYSCORE', ck, excl(first), '-inf', 'WITHSCORES', 'LIMIT', '0', '1')
      local floor = pc[2] and tonumber(pc[2]) or -INF
      if st.lo and st.lo > floor then floor = st.lo end
      local back = redis.call('ZREVRANGEBYSCORE', hk, excl(first), excl(floor), 'WITHSCORES')
      for i = 2, #back, 2 do
        local t = tonumber(back[i])
        if first - t > w then break end
        first = t
      end
    end
  end
  if first < f0 then
    absorb(st, fmt(first), excl(f0), counted)
    if info ~= '' then st.info = info end
  end
  if last > l0 then absorb(st, excl(l0), fmt(last), counted) end
  st.first, st.last = first, last
  if st.state == 'open' and not pending(st) then
    -- A clear seen earlier, once too late to end it, may end it now that it lasts longer.
    local nc = redis.call('ZRANGEBYSCORE', key('c', st), fmt(last), '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
    if nc[2] and ends_at(st, tonumber(nc[2])) then st.pend = tonumber(nc[2]) end
  end
  if st.state == 'open' then schedule(st) end
end

-- A new hit that belongs to the episode: counted alone if inside it, else it grows it.
local function extend(st, hit, counted)
  local member, ts = hit[1], hit[2]
  if ts >= st.first and ts <= st.last then
    if st.d ~= '1' and not counted[member] then
      counted[member] = true
      st.n = st.n + 1
      add_tags(st, {hit[3]})
    end
  else
    grow(st, ts, hit[4], counted)
  end
  announce(st, ts)
end

-- A window of at most w holding n hits, around ts, between the clears and after the
-- previous episode: returns its first and last hit times and the bounds, or nil.
local function qualifying(st, ts)
  local hk, ck, w, n = key('h', st), key('c', st), st.w, st.need
  local before = redis.call('ZREVRANGEBYSCORE', ck, excl(ts), '-inf', 'WITHSCORES', 'LIMIT', '0', '1')
  local after = redis.call('ZRANGEBYSCORE', ck, fmt(ts), '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
  local floor = before[2] and tonumber(before[2]) or -INF
  local ceil = after[2] and tonumber(after[2]) or INF
  local edge = edge_of(st)
  if edge > floor then floor = edge end
  if n <= 1 then return ts, ts, floor, ceil end
  local top = math.min(ceil, HORIZON)
  local lo, hi = excl(floor), fmt(top)
  if w > 0 and ts - w > floor then lo = fmt(ts - w) end
  if w > 0 and ts + w < top then hi = fmt(ts + w) end
  local raw = redis.call('ZRANGEBYSCORE', hk, lo, hi, 'WITHSCORES')
  local times = {}
  for i = 2, #raw, 2 do times[#times + 1] = tonumber(raw[i]) end
  local i = 1
  for j = 1, #times do
    while w > 0 and times[j] - times[i] > w do i = i + 1 end
    if j - i + 1 >= n then return times[i], times[j], floor, ceil end
  end
  return nil
end

-- Widen [a, b] to the whole chain of hits no more than w apart, within the bounds.
local function chain(st, a, b, floor, ceil)
  local hk, w = key('h', st), st.w
  local first, last = a, b
  local back = redis.call('ZREVRANGEBYSCORE', hk, excl(a), excl(floor), 'WITHSCORES')
  for i = 2, #back, 2 do
    local t = tonumber(back[i])
    if w > 0 and first - t > w then break end
    first = t
  end
  local ahead = redis.call('ZRANGEBYSCORE', hk, excl(b), fmt(math.min(ceil, HORIZON)), 'WITHSCORES')
  for i = 2, #ahead, 2 do
    local t = tonumber(ahead[i])
    if w > 0 and t - last > w then break end
    last = t
  end
  return first, last
end

local function open_episode(st, a, b, floor, ceil, info, counted)
  if st.state == 'open' then
    if pending(st) then close(st, st.pend, 'recovered') else close(st, st.last + st.w, 'quiet') end
  end
  local first, last = chain(st, a, b, floor, ceil)
  local hk, tk = key('h', st), key('t', st)
  -- An episode's id is its kind, subject and key: never reuse the previous episode's.
  local basis = first
  if st.key and basis <= st.key then basis = st.key + 1 end
  st.key, st.first, st.last, st.at, st.lo = basis, first, last, b, floor
  st.state, st.sent, st.pend, st.closed, st.why, st.info = 'open', '0', 0, 0, '', info
  if ceil < INF and ends_at(st, ceil) then st.pend = ceil end  -- a clear seen after it
  if st.d == '1' then
    st.n = 0
  else
    redis.call('DEL', tk)
    local members = redis.call('ZRANGEBYSCORE', hk, fmt(first), fmt(last))
    for _, m in ipairs(members) do counted[m] = true end
    add_tags(st, chunked('HMGET', key('x', st), members))
    st.n = #members
  end
  schedule(st)
  st.af = active_of(st)  -- the group may change before it closes (a SIM moved fleets)
  redis.call('HSET', ACTIVE_KEY, st.af, fmt(b))
  local sent = last >= FRESH  -- stale only if even its newest event is
  if sent then st.sent = '1' end
  emit(st, 'open', b, sent)
end

-- A clear at ts before the episode's key (between hits that arrived late and the ones it
-- opened on): the hits up to ts leave the episode, which now starts after ts.
local function detach(st, ts)
  local hk = key('h', st)
  local first = st.key
  local after = redis.call('ZRANGEBYSCORE', hk, excl(ts), '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
  if after[2] and tonumber(after[2]) < first then first = tonumber(after[2]) end
  if st.d ~= '1' then
    local gone = redis.call('ZRANGEBYSCORE', hk, fmt(st.first), excl(first))
    if #gone > 0 then
      st.n = math.max(st.n - #gone, 0)
      add_tags(st, chunked('HMGET', key('x', st), gone), -1)
    end
  end
  st.first = first
end

-- A clear at ts inside the episode (it arrived after hits it precedes): the hits after ts
-- leave it (count mode). 'unwalked' says which of them this call has not counted yet
-- (they are only stored). Returns them as hits {member, ts, tags, info} to walk again:
-- they may start a new episode.
local function cut_tail(st, ts, unwalked)
  if st.d == '1' or ts >= st.last then return {} end
  local hk = key('h', st)
  local raw = redis.call('ZRANGEBYSCORE', hk, excl(ts), fmt(st.last), 'WITHSCORES')
  local members = {}
  for i = 1, #raw, 2 do members[#members + 1] = raw[i] end
  local stored = chunked('HMGET', key('x', st), members)
  local tail, gone = {}, {}
  for k, member in ipairs(members) do
    local tags, info = tags_info(stored[k])
    tail[k] = {member, tonumber(raw[2 * k]), tags, info}
    if not unwalked(member) then gone[#gone + 1] = tags end
  end
  if #gone > 0 then
    st.n = math.max(st.n - #gone, 0)
    add_tags(st, gone, -1)
  end
  local before = redis.call('ZREVRANGEBYSCORE', hk, fmt(ts), fmt(st.first), 'WITHSCORES', 'LIMIT', '0', '1')
  st.last = before[2] and tonumber(before[2]) or st.first
  return tail
end

-- A clear after an open episode's start: before its key it detaches the hits it
-- precedes; otherwise it ends the episode there, once event time has passed it by grace
-- (so an earlier clear arriving late still wins), and the hits after it leave. Returns
-- those hits (see cut_tail). A closed episode was announced as it was: clears arriving
-- after its end change nothing in it.
local function on_clear(st, ts, unwalked)
  if st.state ~= 'open' or ts < st.first then return {} end
  if ts < st.key then
    detach(st, ts)
  elseif (not pending(st) or ts < st.pend) and ends_at(st, ts) then
    st.pend = ts
    schedule(st)
    return cut_tail(st, ts, unwalked)
  end
  return {}
end

-- The hits still to walk (from position i) with 'extra' merged in, in event-time order.
local function requeue(hits, i, extra)
  local rest, seen = {}, {}
  for k = i, #hits do
    rest[#rest + 1] = hits[k]
    seen[hits[k][1]] = true
  end
  for _, hit in ipairs(extra) do
    if not seen[hit[1]] then rest[#rest + 1] = hit end
  end
  table.sort(rest, function(a, b) return a[2] < b[2] end)
  local out = {}
  for k = 1, i - 1 do out[k] = hits[k] end
  for _, hit in ipairs(rest) do out[#out + 1] = hit end
  return out
end

-- Walk hits and clears in event-time order (see walk and process). 'counted' holds the
-- hits of this walk already counted (by an opening or a growth that took in stored hits).
local function run(st, hits, clears)
  local i, j, counted = 1, 1, {}
  while i <= #hits or j <= #clears do
    if j <= #clears and (i > #hits or clears[j] < hits[i][2]) then
      local from = i
      local function unwalked(member)  -- a hit of this walk still ahead and not counted
        if counted[member] then return false end
        for k = from, #hits do
          if hits[k][1] == member then return true end
        end
        return false
      end
      local tail = on_clear(st, clears[j], unwalked)
      j = j + 1
      if #tail > 0 then
        for _, hit in ipairs(tail) do counted[hit[1]] = nil end
        hits = requeue(hits, i, tail)
      end
    else
      local hit = hits[i]
      local ts = hit[2]
      i = i + 1
      if counted[hit[1]] and st.d ~= '1' then
        announce(st, ts)
      elseif covered(st, ts) then
        extend(st, hit, counted)
      elseif ts > edge_of(st) then
        local a, b, floor, ceil = qualifying(st, ts)
        if a then open_episode(st, a, b, floor, ceil, hit[4], counted) end
      end
    end
  end
end

-- The earliest stored hit or clear the subject has not walked yet, or nil.
local function next_unwalked(st)
  local from = excl(st.walked or -INF)
  local h = redis.call('ZRANGEBYSCORE', key('h', st), from, '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
  local c = redis.call('ZRANGEBYSCORE', key('c', st), from, '+inf', 'WITHSCORES', 'LIMIT', '0', '1')
  local t = INF
  if h[2] then t = tonumber(h[2]) end
  if c[2] and tonumber(c[2]) < t then t = tonumber(c[2]) end
  if t == INF then return nil end
  return t
end

-- Walk the stored hits and clears from where the subject's walk stopped up to 'upto' (event
-- time minus grace: every shard has delivered them), in event-time order, so that what
-- episodes open, grow and end does not depend on which shard delivered first. Then index
-- the subject under P:pend by its next unwalked event time, if any.
local function walk(st, upto)
  local from = st.walked or -INF
  if upto > from and st.need then
    local hk, lo, hi = key('h', st), excl(from), fmt(upto)
    local raw = redis.call('ZRANGEBYSCORE', hk, lo, hi, 'WITHSCORES')
    local hits = {}
    if #raw > 0 then
      local members = {}
      for k = 1, #raw, 2 do members[#members + 1] = raw[k] end
      local stored = {}
      if st.d ~= '1' then stored = chunked('HMGET', key('x', st), members) end
      for k, member in ipairs(members) do
        local tags, info = tags_info(stored[k] or false)
        hits[k] = {member, tonumber(raw[2 * k]), tags, info}
      end
    end
    local clears = {}
    for _, ts in ipairs(redis.call('ZRANGEBYSCORE', key('c', st), lo, hi)) do
      clears[#clears + 1] = tonumber(ts)
    end
    HORIZON = upto
    run(st, hits, clears)
    st.walked = upto
  end
  local due = next_unwalked(st)
  if due then
    redis.call('ZADD', PEND_KEY, fmt(due), member_of(st))
  else
    redis.call('ZREM', PEND_KEY, member_of(st))
  end
end

-- Where event time lets walks go: every shard has delivered what lies before it (nothing
-- before warm-up ends).
local CUTOFF = -INF
if WARM then CUTOFF = LOW - GRACE end

-- Logs of subjects without state (P:logs, expiries in P:logt), read for the whole batch
-- in one HMGET and one ZMSCORE and written in one HSET and one ZADD: a SIM's clears come
-- with nearly every event it sends, and a Redis call from a script costs about as much as
-- the work of a whole event. A log holds what the sorted set it stands for would: the
-- distinct clears, newest first ("<ts>," each), those before a cut dropped; so the state
-- is the same whatever order and however often the events came. Its expiry is wall ms
-- (the workers' clocks): a hash field has no TTL, so an expired log counts as none and is
-- deleted by a later call. Only a subject found without state writes its log, and one
-- found with state takes in or deletes any log it has (one written by a replica whose
-- clock is behind, say), so a log never hides clears from a subject's state.
local LOGS_KEY, LOG_TIMES_KEY = P .. ':logs', P .. ':logt'
local logs, log_expiry, log_found, log_writes, log_times, log_gone = {}, {}, {}, {}, {}, {}

-- The times of a log or of a request's clears (newest first).
local function times_of(text)
  local list = {}
  for value in string.gmatch(text, '([^,]+),') do
    local ts = tonumber(value)  -- nil: not a time (never written by this script)
    if ts then list[#list + 1] = ts end
  end
  return list
end

local function first_time(text)
  local comma = string.find(text, ',', 1, true)
  return comma and tonumber(string.sub(text, 1, comma - 1))
end

-- The oldest time of a log (its last entry), found from the end.
local function last_time(text)
  local at = #text - 1
  while at > 0 and string.byte(text, at) ~= 44 do at = at - 1 end  -- ','
  return tonumber(string.sub(text, at + 1, -2))
end

local function read_logs(subs)
  local fields = {}
  for i, sub in ipairs(subs) do fields[i] = sub.field end
  local values = chunked('HMGET', LOGS_KEY, fields)
  local expiries = chunked('ZMSCORE', LOG_TIMES_KEY, fields)
  for i, field in ipairs(fields) do
    if values[i] or expiries[i] then log_found[field] = true end
    local expiry = expiries[i] and tonumber(expiries[i])
    if values[i] and expiry and expiry >= NOW then
      logs[field], log_expiry[field] = values[i], expiry
    end
  end
end

-- Expired logs: the oldest expiries, at most 'count' a call (as many as the batch has
-- subjects, so the deletes keep up with the logs calls write).
local function sweep_logs(count)
  local gone = redis.call('ZRANGEBYSCORE', LOG_TIMES_KEY, '-inf', '(' .. fmt(NOW),
    'LIMIT', '0', fmt(count))
  if #gone > 0 then
    chunked('HDEL', LOGS_KEY, gone)
    chunked('ZREM', LOG_TIMES_KEY, gone)
  end
end

local expiries = {}  -- an expiry's text by the TTL it is for
local longest_log_ttl = 0  -- ms, of the logs this call wrote
local function expiry_of(sub)
  local ttl = (math.ceil((sub.l + sub.w) / 1000) + 60) * 1000
  if ttl > longest_log_ttl then longest_log_ttl = ttl end
  local text = expiries[ttl]
  if text == nil then
    text = fmt(NOW + ttl)
    expiries[ttl] = text
  end
  return text
end

-- A subject without state: its clears join its log, and the log drops those before the
-- cut the sorted set it stands for would have been trimmed at. A new log takes over the
-- clears P:c still holds (the subject had state once).
local function log_clears(st, sub)
  local field, text = sub.field, sub.clears
  local log = logs[field]
  if log == nil then
    local ck = key('c', st)
    local held = redis.call('ZREVRANGE', ck, '0', '-1')
    if #held > 0 then
      redis.call('DEL', ck)
      held[#held + 1] = ''
      log = table.concat(held, ',')
    else
      log = ''
    end
  end
  -- Newer clears than any logged go in front (clears come in time order, mostly);
  -- otherwise the two are merged.
  local newest, top = first_time(text), first_time(log)
  if log == '' then
    log = text
  elseif top and last_time(text) > top then
    log = text .. log
  else
    local union, list = {}, {}
    for _, ts in ipairs(times_of(log)) do union[ts] = true end
    for _, ts in ipairs(times_of(text)) do union[ts] = true end
    for ts in pairs(union) do list[#list + 1] = ts end
    table.sort(list, function(x, y) return x > y end)
    for i, ts in ipairs(list) do list[i] = fmt(ts) end
    list[#list + 1] = ''
    log = table.concat(list, ',')
  end
  if WARM then
    local cut = math.min(newest, LOW) - sub.l - sub.w
    local oldest = last_time(log)
    if cut > -INF and (oldest == nil or oldest < cut) then
      local keep, at = 0, 1
      while true do
        local comma = string.find(log, ',', at, true)
        local ts = comma and tonumber(string.sub(log, at, comma - 1))
        if not ts or ts < cut then break end
        keep, at = comma, comma + 1
      end
      log = string.sub(log, 1, keep)
    end
  end
  if log == '' then  -- as the sorted set, trimmed empty, would be gone
    if log_found[field] then log_gone[#log_gone + 1] = field end
    return
  end
  log_writes[#log_writes + 1] = field
  log_writes[#log_writes + 1] = log
  log_times[#log_times + 1] = expiry_of(sub)
  log_times[#log_times + 1] = field
end

-- A subject found with state, or getting it: the clears its log holds (none if it
-- expired) move into P:c, and the log goes. Without state, P:c keeps the log's expiry
-- until the state is saved, as the sorted set the log stood for would have; with state
-- (a log it should not have had), they are returned to be ingested as the batch's own.
local function take_log(st, sub)
  local field = sub.field
  if not log_found[field] then return {} end
  log_gone[#log_gone + 1] = field
  local log = logs[field]
  if log == nil then return {} end
  local list = times_of(log)
  table.sort(list)
  if st.max ~= nil then return list end
  local ck = key('c', st)
  for _, ts in ipairs(list) do
    local text = fmt(ts)
    redis.call('ZADD', ck, text, text)
  end
  redis.call('PEXPIRE', ck, fmt(math.max(1, log_expiry[field] - NOW)))
  return {}
end

-- Ingest a subject's hits and clears (new ones only). Those at or before the subject's
-- walk arrived late: they are walked at once, as they come. The others wait in storage
-- until event time passes them (walk).
local function process(sub)
  local st = load(sub.k, sub.s)
  if st.max == nil and #sub.h == 0 then
    if sub.clears ~= '' then log_clears(st, sub) end
    return
  end
  local strays = take_log(st, sub)
  -- A state saved before walks were gated (no 'need') had walked everything it stored.
  if st.max ~= nil and st.need == nil then st.walked = st.max end
  st.w, st.d, st.q, st.need = sub.w, fmt(sub.d), fmt(sub.q), sub.n
  if st.state == 'open' and not st.af then st.af = active_of(st) end  -- saved before 'af'
  if sub.g ~= '' then st.g = sub.g end
  if sub.m ~= '' then st.m = sub.m end
  local hk, ck, tk, xk = key('h', st), key('c', st), key('t', st), key('x', st)
  local newest = st.max or -INF
  local walked = st.walked or -INF

  local clears = {}  -- new ones at or before the walk, to walk at once, oldest first
  local function ingest(ts, text)
    if redis.call('ZADD', ck, text, text) == 1 then
      if ts <= walked then clears[#clears + 1] = ts end
      if ts > newest then newest = ts end
    end
  end
  for _, ts in ipairs(strays) do ingest(ts, fmt(ts)) end
  for value in string.gmatch(sub.clears, '([^,]+),') do ingest(tonumber(value), value) end
  table.sort(clears)
  local hits = {}
  for _, hit in ipairs(sub.h) do
    local ts = hit[2]
    -- A hit before the current episode that it does not belong to can change nothing.
    if ts > walked or covered(st, ts) or ts > edge_of(st) then
      local changed
      if st.d == '1' then
        changed = redis.call('ZADD', hk, 'GT', 'CH', fmt(ts), hit[1])
        if changed == 1 then
          for _, tag in ipairs(split(hit[3])) do
            local seen = tonumber(redis.call('HGET', tk, tag) or '0')
            if ts > seen then redis.call('HSET', tk, tag, fmt(ts)) end
          end
        end
      else
        changed = redis.call('ZADD', hk, 'NX', fmt(ts), hit[1])
        if changed == 1 and (hit[3] ~= '' or hit[4] ~= '') then
          local value = hit[3]
          if hit[4] ~= '' then value = value .. '\n' .. hit[4] end
          redis.call('HSET', xk, hit[1], value)
        end
      end
      if changed == 1 then
        if ts <= walked then hits[#hits + 1] = hit end
        if ts > newest then newest = ts end
      end
    end
  end
  if newest == -INF then return end

  HORIZON = walked
  run(st, hits, clears)
  walk(st, CUTOFF)

  st.max = newest
  -- Keep hits until no shard can still deliver one that needs them (not before warm-up).
  local cut = -INF
  if WARM then cut = math.min(newest, LOW, st.walked or -INF) - sub.l - sub.w end
  if cut > -INF then  -- else nothing lies before it (a backfill's first half minute)
    if st.d ~= '1' then
      chunked('HDEL', xk, redis.call('ZRANGEBYSCORE', hk, '-inf', excl(cut)))
    end
    redis.call('ZREMRANGEBYSCORE', hk, '-inf', excl(cut))
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', excl(cut))
    if st.d == '1' then
      local raw = redis.call('HGETALL', tk)
      for x = 1, #raw, 2 do
        if tonumber(raw[x + 1]) < cut then redis.call('HDEL', tk, raw[x]) end
      end
    end
  end
  redis.call('EXPIRE', hk, TTL_TEXT)
  redis.call('EXPIRE', ck, TTL_TEXT)
  redis.call('EXPIRE', xk, TTL_TEXT)
  save(st)
end

if req.keep == 1 then
  for _, field in ipairs(redis.call('HKEYS', ACTIVE_KEY)) do
    local k, rest = string.match(field, '^([^\t]*)\t[^\t]*\t(.*)$')
    if k then
      local st = {kind = k, subject = rest}
      redis.call('PERSIST', key('s', st))
      redis.call('PERSIST', key('t', st))
    end
  end
end

-- The request's subjects with their rules' fields.
local subs = {}
for i, raw in ipairs(req.subs) do
  local rule = req.rules[raw[1] + 1]
  subs[i] = {k = rule[1], n = rule[2], w = rule[3], d = rule[4], q = rule[5], l = req.late,
    s = raw[2], g = raw[3], m = raw[4], h = raw[5], clears = raw[6],
    field = rule[1] .. '\t' .. raw[2]}
end
sweep_logs(math.max(50, #subs))
read_logs(subs)
for _, sub in ipairs(subs) do process(sub) end
if #log_gone > 0 then
  chunked('HDEL', LOGS_KEY, log_gone)
  chunked('ZREM', LOG_TIMES_KEY, log_gone)
end
if #log_writes > 0 then
  chunked('HSET', LOGS_KEY, log_writes)
  chunked('ZADD', LOG_TIMES_KEY, log_times)
  -- Gone a retention after a stream's last batch, and never before a log they hold (the
  -- TTL is only ever raised: another call may have written a log that lives longer).
  local needed = math.max(TTL, longest_log_ttl / 1000)
  for _, k in ipairs({LOGS_KEY, LOG_TIMES_KEY}) do
    if redis.call('TTL', k) < needed then redis.call('EXPIRE', k, fmt(needed)) end
  end
end

local function load_member(m)
  local tab = string.find(m, '\t', 1, true)
  return load(string.sub(m, 1, tab - 1), string.sub(m, tab + 1))
end

-- Subjects whose stored events event time has now passed walk them (they may open, grow
-- or end episodes), then episodes whose end (pending clear, or quiet for the window) event
-- time has passed by grace close.
local DUE_LIMIT = 1000  -- subjects each loop below takes a call
local more = 0
if WARM then
  local due = redis.call('ZRANGEBYSCORE', PEND_KEY, '-inf', fmt(CUTOFF), 'LIMIT', '0', fmt(DUE_LIMIT))
  if #due == DUE_LIMIT then more = 1 end
  for _, m in ipairs(due) do
    local st = load_member(m)
    if st.need then
      walk(st, CUTOFF)
      save(st)
    else
      redis.call('ZREM', PEND_KEY, m)
    end
  end
  local ending = redis.call('ZRANGEBYSCORE', OPEN_KEY, '-inf', fmt(CUTOFF), 'LIMIT', '0', fmt(DUE_LIMIT))
  if #ending == DUE_LIMIT then more = 1 end
  for _, m in ipairs(ending) do
    local st = load_member(m)
    if st.need then walk(st, CUTOFF) end
    if st.state == 'open' and pending(st) and st.pend <= CUTOFF then
      close(st, st.pend, 'recovered')
      save(st)
    elseif st.state == 'open' and st.q == '1' and st.last + st.w <= CUTOFF then
      close(st, st.last + st.w, 'quiet')
      save(st)
    elseif st.state == 'open' then
      -- Its end is later than CUTOFF now (its walk grew it, or its rule's window changed
      -- since it was indexed): index it there, so that it leaves the due range and the
      -- next call (a tick calls again while 'more') does not take it again.
      if deadline(st) then schedule(st) else redis.call('ZREM', OPEN_KEY, m) end
      save(st)
    else
      if st.need then save(st) end  -- keep what its walk did
      redis.call('ZREM', OPEN_KEY, m)
    end
  end
end

return {transitions, claim_due(P, NOW, req.claim, req.lease), more}
