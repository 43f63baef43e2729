-- Usage metering: one atomic, idempotent call per batch (see worker/handlers/metering.py).
--
-- KEYS[1]  any key under the prefix (routes the call to the prefix's Cluster slot)
-- ARGV[1]  key prefix, e.g. "{sw:stream:group}"
-- ARGV[2]  hourly bucket TTL (s)    ARGV[3] daily bucket TTL (s)    ARGV[4] session TTL (s)
-- ARGV[5]  the events: a JSON array of arrays, each in EVENT_FIELDS order
--
-- Returns {events that counted bytes, events that changed nothing (duplicates)}.

local P = ARGV[1]
local HOUR_TTL, DAY_TTL, SESSION_TTL = ARGV[2], ARGV[3], ARGV[4]

local RECORD_FIELDS = {--[[RECORD_FIELDS]]}
local NFIELDS = #RECORD_FIELDS
local DEFAULTED = {--[[DEFAULTED_FIELDS]]}
local DEFAULTS = '~'  -- field of a SIM-day hash: DEFAULTED values of its first record
local SAME = '='      -- a record's DEFAULTED value equal to its hash's default; or a
                      -- location/IMEI priority equal to the operator priority
local POSITION = {}
for i = 1, NFIELDS do POSITION[RECORD_FIELDS[i]] = i end

local fmt, max = string.format, math.max

-- Byte sums are Lua numbers (doubles), exact below 2^53. A sum that reaches it (rounding
-- never takes a larger true sum below it) fails the call before anything is written, so the
-- consumer isolates and dead-letters the event(s) that caused it. Decode accepts counts up
-- to 2^53 - 1 each; real sums are petabytes below.
local EXACT = 9007199254740992
local function exact(value, what)
  if value >= EXACT or value <= -EXACT then
    error('usage sum beyond 2^53 bytes (' .. what .. '): not counted exactly, refused', 0)
  end
  return value
end

-- ---- buckets: summed per batch, written once per (key, field) at the end -----------------

local bucket_keys, bucket_ttl, bucket_sums, bucket_fields = {}, {}, {}, {}

local function add(key, field, delta, ttl)
  local sums = bucket_sums[key]
  if sums == nil then
    sums = {}
    bucket_sums[key] = sums
    bucket_fields[key] = {}
    bucket_ttl[key] = ttl
    bucket_keys[#bucket_keys + 1] = key
  end
  local old = sums[field]
  if old == nil then
    local fields = bucket_fields[key]
    fields[#fields + 1] = field
    old = 0
  end
  sums[field] = exact(old + delta, 'batch total')
end

-- Key names and field names, built once per batch.
local key_names = {h = {}, d = {}}
local function key_name(kind, dim, id, period)
  local by_dim = key_names[kind]
  local by_id = by_dim[dim]
  if by_id == nil then by_id = {}; by_dim[dim] = by_id end
  local by_period = by_id[id]
  if by_period == nil then by_period = {}; by_id[id] = by_period end
  local name = by_period[period]
  if name == nil then
    name = P .. ':m:' .. kind .. ':' .. dim .. ':' .. id .. ':' .. period
    by_period[period] = name
  end
  return name
end

local field_names = {d = {}, u = {}}
local function field_name(number, direction)
  local names = field_names[direction]
  local name = names[number]
  if name == nil then name = number .. direction; names[number] = name end
  return name
end

local function bump_dim(dim, id, day, month, hour_down, hour_up, day_down, day_up, down, up)
  local h, d = key_name('h', dim, id, day), key_name('d', dim, id, month)
  if down ~= 0 then add(h, hour_down, down, HOUR_TTL); add(d, day_down, down, DAY_TTL) end
  if up ~= 0 then add(h, hour_up, up, HOUR_TTL); add(d, day_up, up, DAY_TTL) end
end

-- Adds (down, up) to the buckets of every dimension for the UTC hour ``hour``
-- ("YYYYMMDDHH"): field "HHd"/"HHu" of the day's hourly hash, "DDd"/"DDu" of the month's
-- daily hash.
local function bump(sim, fleet, account, network, hour, down, up)
  if down == 0 and up == 0 then return end
  local day, month = hour:sub(1, 8), hour:sub(1, 6)
  local hh, dd = hour:sub(9, 10), hour:sub(7, 8)
  local hd, hu = field_name(hh, 'd'), field_name(hh, 'u')
  local dd_, du = field_name(dd, 'd'), field_name(dd, 'u')
  bump_dim('s', sim, day, month, hd, hu, dd_, du, down, up)
  if fleet ~= '' then bump_dim('f', fleet, day, month, hd, hu, dd_, du, down, up) end
  if account ~= '' then bump_dim('a', account, day, month, hd, hu, dd_, du, down, up) end
  bump_dim('n', network, day, month, hd, hu, dd_, du, down, up)
end

-- ---- session records ----------------------------------------------------------------------

local records, hashes, dirty = {}, {}, {}

local function split(packed, names)
  local out, i = {}, 1
  for value in (packed .. '|'):gmatch('([^|]*)|') do
    out[names[i]] = value
    i = i + 1
  end
  return out
end

local function unpack_record(packed, defaults)
  local rec = split(packed, RECORD_FIELDS)
  for i = 1, #DEFAULTED do
    local name = DEFAULTED[i]
    if rec[name] == SAME then rec[name] = defaults[name] end
  end
  if rec.lpri == SAME then rec.lpri = rec.opri end
  if rec.ipri == SAME then rec.ipri = rec.opri end
  return rec
end

local function pack_record(rec, defaults)
  local out = {}
  for i = 1, NFIELDS do out[i] = rec[RECORD_FIELDS[i]] end
  for i = 1, #DEFAULTED do
    local name = DEFAULTED[i]
    if rec[name] == defaults[name] then out[POSITION[name]] = SAME end
  end
  if rec.lpri == rec.opri then out[POSITION.lpri] = SAME end
  if rec.ipri == rec.opri then out[POSITION.ipri] = SAME end
  return table.concat(out, '|')
end

-- The record of session ``sid`` in the SIM-day hash ``key``, cached for the batch.
local function load_record(key, sid, start)
  local id = key .. '|' .. sid
  local entry = records[id]
  if entry then return entry end
  local hash, packed = hashes[key], nil
  if hash == nil then
    local got = redis.call('HMGET', key, sid, DEFAULTS)
    packed = got[1]
    hash = {}
    if got[2] then hash.defaults = split(got[2], DEFAULTED) end
    hashes[key] = hash
  else
    packed = redis.call('HGET', key, sid)
  end
  local rec
  if packed and hash.defaults then
    rec = unpack_record(packed, hash.defaults)
  else
    rec = {}
    for i = 1, NFIELDS do rec[RECORD_FIELDS[i]] = '' end
    rec.start = start
  end
  rec.sd, rec.su = tonumber(rec.sd) or 0, tonumber(rec.su) or 0
  entry = {key = key, sid = sid, rec = rec, hash = hash, touched = false, queued = false,
    base = tonumber(rec.start) or 0}
  records[id] = entry
  return entry
end

-- Updated windows counted: intervals [a, b] relative to the session start, "a:b,c:d".
-- Consecutive windows merge, so a session seen in order keeps a single interval. An empty
-- or inverted window (start >= end) is only ever matched exactly.
local function parse_intervals(text)
  if text == '' then return {} end
  local a, b = text:match('^(-?%d+):(-?%d+)$')
  if a then return {{tonumber(a), tonumber(b)}} end
  local list = {}
  for a, b in text:gmatch('(-?%d+):(-?%d+)') do list[#list + 1] = {tonumber(a), tonumber(b)} end
  return list
end

local function covered(list, s, e)
  for i = 1, #list do
    local a, b = list[i][1], list[i][2]
    if s >= e then
      if a == s and b == e then return true end
    elseif a < b and a <= s and e <= b then
      return true
    end
  end
  return false
end

local function with_interval(list, s, e)
  if s < e then  -- the usual cases: the first window, or the next one in order
    if #list == 0 then return fmt('%d:%d', s, e) end
    if #list == 1 and list[1][1] < list[1][2] and list[1][2] == s then
      return fmt('%d:%d', list[1][1], e)
    end
  end
  local out = {}
  if s < e then
    for i = 1, #list do
      local a, b = list[i][1], list[i][2]
      if a < b and a <= e and s <= b then
        if a < s then s = a end
        if b > e then e = b end
      else
        out[#out + 1] = list[i]
      end
    end
  else
    for i = 1, #list do out[i] = list[i] end
  end
  out[#out + 1] = {s, e}
  table.sort(out, function(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end)
  local parts = {}
  for i = 1, #out do parts[i] = fmt('%d:%d', out[i][1], out[i][2]) end
  return table.concat(parts, ',')
end

-- What the ended window is credited with: the session's cumulative bytes minus the
-- updated windows counted (v2), else the ended window's own bytes (v1); 0 before it.
local function ended_share(rec)
  if rec.eh == '' then return 0, 0 end
  if rec.cd ~= '' then
    return max(tonumber(rec.cd) - rec.sd, 0), max(tonumber(rec.cu) - rec.su, 0)
  end
  return tonumber(rec.ewd), tonumber(rec.ewu)
end

-- Credits the ended window's hour with the change of its share (was old_d, old_u), under
-- the ended event's fleet, account and network (the start of its operator group).
local function move_ended_share(sim, rec, old_d, old_u)
  local d, u = ended_share(rec)
  if d == old_d and u == old_u then return end
  local fleet, account, network = rec.og:match('^([^%^]*)%^([^%^]*)%^([^%^]*)')
  bump(sim, fleet, account, network, rec.eh, d - old_d, u - old_u)
end

local function set(entry, name, value)
  if entry.rec[name] ~= value then
    entry.rec[name] = value
    entry.touched = true
  end
end

-- Descriptive fields come from the event with the highest priority (twice its window end,
-- plus one for the ended event), until the first ended event: it always sets the operator
-- group (fleet, account, network, radio, operator) and from then on nothing changes it,
-- not even a copy of the ended event naming another fleet, account or network. So the
-- ended share is always moved under the dimensions it was credited to. Location and IMEI
-- come from the highest-priority event that has one.
local function describe(entry, pri, ended, a)
  local rec = entry.rec
  local opri = tonumber(rec.opri)
  if rec.eh == '' and (ended or opri == nil or pri >= opri) then
    set(entry, 'opri', fmt('%d', pri))
    set(entry, 'og', a[17])
  end
  if a[18] ~= '' then
    local lpri = tonumber(rec.lpri)
    if lpri == nil or pri >= lpri then
      set(entry, 'lpri', fmt('%d', pri))
      set(entry, 'loc', a[18])
    end
  end
  if a[19] ~= '' then
    local ipri = tonumber(rec.ipri)
    if ipri == nil or pri >= ipri then
      set(entry, 'ipri', fmt('%d', pri))
      set(entry, 'imei', a[19])
    end
  end
end

local function cumulative(value)
  if value == '' then return '' end
  return fmt('%d', value)
end

-- ---- the batch ----------------------------------------------------------------------------

local counted, unchanged = 0, 0
local events = cjson.decode(ARGV[5])
for i = 1, #events do
  local a = events[i]
  -- EVENT_FIELDS: 1 kind 2 sim 3 session 4 start_day 5 start 6 win_start 7 win_end 8 hour
  -- 9 down 10 up 11 cum_down 12 cum_up 13 end 14 fleet 15 account 16 network
  -- 17 operator group 18 location group 19 imei
  local kind, sim = a[1], a[2]
  local entry = load_record(P .. ':m:s:' .. sim .. ':' .. a[4], a[3], fmt('%d', a[5]))
  local rec, base = entry.rec, entry.base
  entry.touched = false
  local counts = false
  if kind == 's' then
    describe(entry, 0, false, a)
  else
    local ws, we = a[6] - base, a[7] - base
    local down, up = a[9], a[10]
    if kind == 'u' then
      local list = parse_intervals(rec.cov)
      if not covered(list, ws, we) then
        local old_d, old_u = ended_share(rec)
        rec.cov = with_interval(list, ws, we)
        rec.sd = exact(rec.sd + down, 'session download')
        rec.su = exact(rec.su + up, 'session upload')
        bump(sim, a[14], a[15], a[16], a[8], down, up)
        move_ended_share(sim, rec, old_d, old_u)
        counts = true
      end
      describe(entry, 2 * we, false, a)
    else
      describe(entry, 2 * we + 1, true, a)
      -- new, or seen before only as a copy without cumulative totals (schema v1)
      if rec.eh == '' or (rec.cd == '' and a[11] ~= '') then
        local old_d, old_u = ended_share(rec)
        if rec.eh == '' then
          rec.eh, rec.ewd, rec.ewu = a[8], fmt('%d', down), fmt('%d', up)
          rec['end'] = fmt('%d', a[13] - base)
        end
        rec.cd, rec.cu = cumulative(a[11]), cumulative(a[12])
        move_ended_share(sim, rec, old_d, old_u)
        counts = true
      end
    end
  end
  if counts then
    counted = counted + 1
  elseif not entry.touched then
    unchanged = unchanged + 1
  end
  if (counts or entry.touched) and not entry.queued then
    entry.queued = true
    dirty[#dirty + 1] = entry
  end
end

-- ---- writes -------------------------------------------------------------------------------

-- A bucket hash's TTL restarts when it gains a field (a new hour or day), so it expires the
-- retention after the last period it holds; rewriting a field leaves the TTL alone.
-- HINCRBY refuses a total beyond 2^63 - 1; Redis does not undo a script's earlier writes,
-- so those are undone here before failing: the call counts everything or nothing. Any other
-- refusal (OOM, READONLY, MISCONF: Redis refuses a script's first write, so nothing is
-- undone then) is passed on as Redis gave it, so the caller sees an outage, not bad data.
local applied = {}
local function undo()
  for k = #applied, 1, -1 do
    local key, field, delta, created = applied[k][1], applied[k][2], applied[k][3], applied[k][4]
    if created then
      redis.call('HDEL', key, field)
    else
      redis.call('HINCRBY', key, field, fmt('%d', -delta))
    end
  end
end
for i = 1, #bucket_keys do
  local key = bucket_keys[i]
  local sums, fields, grew = bucket_sums[key], bucket_fields[key], false
  for j = 1, #fields do
    local delta = sums[fields[j]]
    if delta ~= 0 then
      local total = redis.pcall('HINCRBY', key, fields[j], fmt('%d', delta))
      if type(total) == 'table' then
        undo()
        local why = tostring(total.err)
        if why:find('overflow', 1, true) then
          error('usage bucket total refused by Redis (' .. why .. '): nothing counted', 0)
        end
        return redis.error_reply(why)
      end
      applied[#applied + 1] = {key, fields[j], delta, total == delta}
      if total == delta then grew = true end
    end
  end
  if grew then redis.call('EXPIRE', key, bucket_ttl[key]) end
end

-- A session hash's TTL restarts on every change of one of its records. A new hash takes
-- its defaults from the first record written to it.
local expiring = {}
for i = 1, #dirty do
  local entry = dirty[i]
  local rec, hash = entry.rec, entry.hash
  rec.sd, rec.su = fmt('%d', rec.sd), fmt('%d', rec.su)
  if hash.defaults == nil then
    local values = {}
    hash.defaults = {}
    for j = 1, #DEFAULTED do
      values[j] = rec[DEFAULTED[j]]
      hash.defaults[DEFAULTED[j]] = values[j]
    end
    redis.call('HSET', entry.key, entry.sid, pack_record(rec, hash.defaults),
      DEFAULTS, table.concat(values, '|'))
  else
    redis.call('HSET', entry.key, entry.sid, pack_record(rec, hash.defaults))
  end
  if not expiring[entry.key] then
    expiring[entry.key] = true
    redis.call('EXPIRE', entry.key, SESSION_TTL)
  end
end

return {counted, unchanged}
