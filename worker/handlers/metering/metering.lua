-- Usage metering: one atomic, idempotent call per batch (see worker/handlers/metering/handler.py).
--
-- KEYS[1]  any key under the prefix (routes the call to the prefix's Cluster slot)
-- ARGV[1]  key prefix, e.g. "{sw:stream:group}"
-- ARGV[2]  hourly bucket TTL (s)    ARGV[3] daily bucket TTL (s)    ARGV[4] session TTL (s)
-- ARGV[5]  the events, packed (handler._EVENT_FORMAT): EVENT_FIELDS in order, texts as
--          their numbers in ARGV[7]
-- ARGV[6]  session fields of standard sids, 17 bytes each (event field 20 numbers them)
-- ARGV[7]  the batch's texts: a JSON array, each distinct text once
--
-- Returns {events that counted bytes, events that changed nothing (duplicates)}.

local P = ARGV[1]
local HOUR_TTL, DAY_TTL, SESSION_TTL = ARGV[2], ARGV[3], ARGV[4]

local RECORD_FIELDS = {--[[RECORD_FIELDS]]}
local NFIELDS = #RECORD_FIELDS
local COMPONENTS = {--[[COMPONENTS]]}  -- record fields stored as slots (see records.py)
local CODES = {--[[COMPONENT_CODES]]}  -- their letters in the hash's field names
local COUNT = '--[[COUNT_FIELD]]'      -- how many own entries "~<code><n>" were handed out
local NONE = '--[[NONE_SLOT]]'         -- slot of an empty value
local LIMIT = --[[FIELD_LIMIT]]         -- longest record kept whole (bytes)
local COV_CODE, COV_REF = '--[[COVERAGE_CODE]]', '--[[COVERAGE_REF]]'
local HEAD, CODE_OF = {COUNT}, {cov = COV_CODE}  -- fields read with a hash's first record
for i = 1, #CODES do
  HEAD[#HEAD + 1] = '~' .. CODES[i]
  CODE_OF[COMPONENTS[i]] = CODES[i]
end

local fmt, floor, max = string.format, math.floor, math.max

-- Numbers in records are base 36 ("-" before a negative one): tonumber reads them in C;
-- written in chunks of two digits (0-1295), each made once per call.
local DIGIT = {}
for i = 0, 35 do DIGIT[i] = string.sub('0123456789abcdefghijklmnopqrstuvwxyz', i + 1, i + 1) end
local PAIR = setmetatable({}, {__index = function(t, k)
  local low = k % 36
  local text = DIGIT[(k - low) / 36] .. DIGIT[low]
  t[k] = text
  return text
end})
local function head(n)  -- 0 <= n < 1296, without a leading zero
  if n < 36 then return DIGIT[n] end
  return PAIR[n]
end
local function b36(n)
  if n < 0 then return '-' .. b36(-n) end
  if n < 1296 then return head(n) end
  -- Below 36^6 (2,176,782,336) the text is made in one concatenation: each string made
  -- costs Redis's Lua far more than the arithmetic.
  local low = n % 1296
  n = (n - low) / 1296
  if n < 1296 then return head(n) .. PAIR[low] end
  local mid = n % 1296
  n = (n - mid) / 1296
  if n < 1296 then return head(n) .. PAIR[mid] .. PAIR[low] end
  local text = PAIR[mid] .. PAIR[low]
  while n >= 1296 do
    low = n % 1296
    text = PAIR[low] .. text
    n = (n - low) / 1296
  end
  return head(n) .. text
end
local function n36(text)
  if text == nil or text == '' then return nil end
  if text:byte(1) == 45 then return -tonumber(text:sub(2), 36) end
  return tonumber(text, 36)
end

-- A session's field in its hash: a standard sid ("PI" and 32 lowercase hex digits) is
-- byte 255 and its 16 bytes, handed over in ARGV[6] (no text sid has byte 255: they are
-- UTF-8); any other sid is the field as it is.
local SIDS = ARGV[6]
local TEXTS = cjson.decode(ARGV[7])
local sid_fields = {}
local function session_field(sid, n)
  if n == 0 then return sid end
  local field = sid_fields[n]
  if field == nil then
    field = SIDS:sub(17 * n - 16, 17 * n)
    sid_fields[n] = field
  end
  return field
end

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

-- "YYYYMMDDHH" of the UTC hour holding Unix second t (civil_from_days, H. Hinnant).
local hour_names = {}
local function hour_name(t)
  local hours = floor(t / 3600)
  local name = hour_names[hours]
  if name ~= nil then return name end
  local days = floor(hours / 24)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  name = fmt('%04d%02d%02d%02d', y, m, d, hours - days * 24)
  hour_names[hours] = name
  return name
end

-- ---- buckets: summed per batch, written once per (key, field) at the end -----------------

-- One array per key: {key, ttl, field, sum, field, sum, ...}, fields in order of first use
-- (a key gets a field or two per hour of the batch, so a scan finds one at once).
local buckets, bucket_list = {}, {}

local function add(key, field, delta, ttl)
  local bucket = buckets[key]
  if bucket == nil then
    bucket = {key, ttl, field, exact(delta, 'batch total')}
    buckets[key] = bucket
    bucket_list[#bucket_list + 1] = bucket
    return
  end
  local n = #bucket
  for j = 3, n, 2 do
    if bucket[j] == field then
      bucket[j + 1] = exact(bucket[j + 1] + delta, 'batch total')
      return
    end
  end
  bucket[n + 1], bucket[n + 2] = field, exact(delta, 'batch total')
end

-- A bucket key's name, made each time it is needed rather than kept: expand_buckets sums
-- per (SIM, hour) and per (hour, fleet, account, network) first, so a name is needed about
-- once per such sum, and tables to keep names cost more than making them.
local PM = P .. ':m:'
local function key_name(kind, dim, id, period)
  return PM .. kind .. ':' .. dim .. ':' .. id .. ':' .. period
end

-- The parts of an hour "YYYYMMDDHH": its day and month (key suffixes) and the field names
-- of bytes down and up in the day's hourly hash (H, H + 100) and in the month's daily hash
-- (D, D + 100): small integers, which Redis keeps most compactly. Built once per hour.
local hour_parts = {}
local function parts_of(hour)
  local parts = hour_parts[hour]
  if parts == nil then
    local h, d = tonumber(hour:sub(9, 10)), tonumber(hour:sub(7, 8))
    parts = {hour:sub(1, 8), hour:sub(1, 6), fmt('%d', h), fmt('%d', h + 100),
      fmt('%d', d), fmt('%d', d + 100)}
    hour_parts[hour] = parts
  end
  return parts
end

local function bump_dim(dim, id, parts, down, up)
  local h, d = key_name('h', dim, id, parts[1]), key_name('d', dim, id, parts[2])
  if down ~= 0 then add(h, parts[3], down, HOUR_TTL); add(d, parts[5], down, DAY_TTL) end
  if up ~= 0 then add(h, parts[4], up, HOUR_TTL); add(d, parts[6], up, DAY_TTL) end
end

-- Adds (down, up) to the buckets of every dimension for the UTC hour ``hour``
-- ("YYYYMMDDHH"): in the day's hourly hash and the month's daily hash. Summed per (SIM,
-- hour) and per (hour, fleet, account, network) first, as many events of a batch share
-- them (see expand_buckets).
local groups, group_list = {}, {}  -- groups[hour][fleet][account][network]
local sim_hours, sim_hour_list = {}, {}  -- sim_hours[sim][hour]
local function child(parent, name)
  local found = parent[name]
  if found == nil then
    found = {}
    parent[name] = found
  end
  return found
end
local function bump(sim, fleet, account, network, hour, down, up)
  if down == 0 and up == 0 then return end
  local by_hour = child(sim_hours, sim)
  local sums = by_hour[hour]
  if sums == nil then
    sums = {sim, hour, 0, 0}
    by_hour[hour] = sums
    sim_hour_list[#sim_hour_list + 1] = sums
  end
  sums[3] = exact(sums[3] + down, 'batch total')
  sums[4] = exact(sums[4] + up, 'batch total')
  local by_network = child(child(child(groups, hour), fleet), account)
  local group = by_network[network]
  if group == nil then
    group = {hour, fleet, account, network, 0, 0}
    by_network[network] = group
    group_list[#group_list + 1] = group
  end
  group[5] = exact(group[5] + down, 'batch total')
  group[6] = exact(group[6] + up, 'batch total')
end

local function expand_buckets()
  for i = 1, #sim_hour_list do
    local sim, hour, down, up = unpack(sim_hour_list[i])
    if down ~= 0 or up ~= 0 then bump_dim('s', sim, parts_of(hour), down, up) end
  end
  for i = 1, #group_list do
    local hour, fleet, account, network, down, up = unpack(group_list[i])
    if down ~= 0 or up ~= 0 then
      local parts = parts_of(hour)
      if fleet ~= '' then bump_dim('f', fleet, parts, down, up) end
      if account ~= '' then bump_dim('a', account, parts, down, up) end
      bump_dim('n', network, parts, down, up)
    end
  end
end

-- ---- session records ----------------------------------------------------------------------

-- A record in memory: start (seconds after its day's midnight), opri, lpri, ipri, end
-- (numbers or nil), cov, ev (text), sd, su, ed, eu (numbers), and the COMPONENTS as text.
-- The session has seen its ended event exactly when opri is odd.

local records, hashes, dirty = {}, {}, {}

local function split(packed, names)
  local out, i = {}, 1
  for value in (packed .. '|'):gmatch('([^|]*)|') do
    out[names[i]] = value
    i = i + 1
  end
  for j = i, #names do out[names[j]] = '' end
  return out
end

-- Redis's Lua spends far more on making tables and strings than on reading them, and much on
-- a table grown key by key (each time its hash part doubles, it is rehashed): so records are
-- read with one match into a table built whole, and written from one array of their fields.
assert(table.concat(RECORD_FIELDS, ',') ==
  'start,opri,cov,sd,su,ed,eu,ev,end,fleet,account,op,loc,imei,lpri,ipri',
  'metering.lua reads RECORD_FIELDS in this order: update read_record and blank()')
assert(table.concat(COMPONENTS, ',') == 'fleet,account,op,loc,imei',
  'metering.lua names COMPONENTS in its tables: update load_record')
local RECORD_PATTERN = '^' .. string.rep('([^|]*)|?', NFIELDS - 1) .. '([^|]*)(.*)$'
local function read_record(packed)
  local start, opri, cov, sd, su, ed, eu, ev, end_, fleet, account, op, loc, imei, lpri, ipri,
    rest = packed:match(RECORD_PATTERN)
  if rest ~= '' then error('session record with more fields than this release knows', 0) end
  return {start = start, opri = opri, cov = cov, sd = sd, su = su, ed = ed, eu = eu, ev = ev,
    ['end'] = end_, fleet = fleet, account = account, op = op, loc = loc, imei = imei,
    lpri = lpri, ipri = ipri}
end
local FIELD = {}  -- a record field's position in RECORD_FIELDS
for i = 1, NFIELDS do FIELD[RECORD_FIELDS[i]] = i end

local function is_ended(rec)
  return rec.opri ~= nil and rec.opri % 2 == 1
end

-- Relative end of the first ended window seen (its priority is twice that, plus one).
local function ended_window_end(rec)
  return (rec.opri - 1) / 2
end

-- The packed record's fields as typed values (components still as slots), and those
-- values as read, so that packing reuses the text of the ones that did not change.
local PLAIN = {'start', 'opri', 'cov', 'sd', 'su', 'ed', 'eu'}
local function decode(stored)
  local rec = {
    start = n36(stored.start), opri = n36(stored.opri), cov = stored.cov,
    sd = n36(stored.sd) or 0, su = n36(stored.su) or 0,
    ed = n36(stored.ed) or 0, eu = n36(stored.eu) or 0, ev = stored.ev,
    -- set below or by load_record (named here so that the table is made at its size)
    ['end'] = nil, fleet = nil, account = nil, op = nil, loc = nil, imei = nil, lpri = nil,
    ipri = nil,
  }
  if is_ended(rec) then
    rec['end'] = n36(stored['end']) or ended_window_end(rec)
  end
  return rec
end

-- A record as written by the layout before this one (hash "P:m:s:<sim>:<day>", see
-- handler.LEGACY_FIELDS), with that hash's "~" defaults.
local LEGACY_FIELDS = {--[[LEGACY_FIELDS]]}
local function from_legacy(packed, defaults, day_start)
  local old = split(packed, LEGACY_FIELDS)
  local shared = split(defaults or '', {'og', 'loc', 'imei'})
  for _, name in ipairs({'og', 'loc', 'imei'}) do
    if old[name] == '=' then old[name] = shared[name] end
  end
  if old.lpri == '=' then old.lpri = old.opri end
  if old.ipri == '=' then old.ipri = old.opri end
  local fleet, account, op = old.og:match('^([^%^]*)%^([^%^]*)%^(.*)$')
  local rec = {
    start = tonumber(old.start) - day_start, opri = tonumber(old.opri),
    cov = (old.cov:gsub('[^:,]+', function(x)
      local n = tonumber(x)
      if n == nil or n ~= floor(n) or n >= EXACT or n <= -EXACT then
        error('legacy session record with a coverage bound that is not a whole number '
          .. 'below 2^53', 0)
      end
      return b36(n)
    end)),
    sd = tonumber(old.sd) or 0, su = tonumber(old.su) or 0, ed = 0, eu = 0, ev = '',
    fleet = fleet or '', account = account or '', op = op or '', loc = old.loc,
    imei = old.imei, lpri = tonumber(old.lpri), ipri = tonumber(old.ipri),
  }
  if rec.cov:find('^0:[^,]+$') then rec.cov = rec.cov:sub(3) end
  if old.eh ~= '' then
    rec['end'] = tonumber(old['end'])
    if old.cd ~= '' then
      rec.ed, rec.eu = tonumber(old.cd), tonumber(old.cu)
    else
      rec.ed, rec.eu, rec.ev = tonumber(old.ewd), tonumber(old.ewu), 'w'
    end
  end
  return rec
end

-- The record of session ``sid`` in the SIM-day hash ``key`` (SIM ``sim``, day ``day``),
-- cached for the batch; a record only the previous layout holds is read from its hash
-- there (and moved when written).
local function load_record(key, sim, day, sid, n, start)
  local field = session_field(sid, n)
  local of_key = child(records, key)
  local entry = of_key[field]
  if entry then return entry end
  local day_start = start - start % 86400
  local hash, packed = hashes[key], nil
  if hash == nil then
    local got = redis.call('HMGET', key, field, unpack(HEAD))
    packed = got[1]
    local defaults = {fleet = '', account = '', op = '', loc = '', imei = ''}
    for i = 1, #COMPONENTS do defaults[COMPONENTS[i]] = got[i + 2] or '' end
    hash = {count = tonumber(got[2]) or 0, defaults = defaults, counted = false,
      own_written = nil}
    hashes[key] = hash
  else
    packed = redis.call('HGET', key, field)
  end
  entry = {key = key, field = field, hash = hash, touched = false, queued = false, slots = {},
    stored = nil, read = nil, rec = nil, base = nil, cov = nil, cov_changed = nil,
    legacy = nil, sid = nil}
  local rec
  if packed then
    local stored = read_record(packed)
    rec = decode(stored)
    entry.stored = stored
    local wanted = {}
    if rec.cov:sub(1, 1) == COV_REF then
      entry.slots.cov = rec.cov:sub(2)
      wanted[1] = 'cov'
    end
    for i = 1, #COMPONENTS do
      local name, slot = COMPONENTS[i], stored[COMPONENTS[i]]
      if slot == '' then
        rec[name] = hash.defaults[name]
      elseif slot == NONE then
        rec[name] = ''
      else
        entry.slots[name] = slot
        wanted[#wanted + 1] = name
      end
    end
    local values
    if #wanted > 0 then
      local names = {}
      for i = 1, #wanted do
        names[i] = '~' .. CODE_OF[wanted[i]] .. entry.slots[wanted[i]]
      end
      values = redis.call('HMGET', key, unpack(names))
      for i = 1, #wanted do rec[wanted[i]] = values[i] or '' end
    end
    -- The values as read: the PLAIN fields', and a component's own entry (``values``), so
    -- that packing rewrites neither when it did not change.
    local read = {start = rec.start, opri = rec.opri, cov = rec.cov, sd = rec.sd, su = rec.su,
      ed = rec.ed, eu = rec.eu, fleet = nil, account = nil, op = nil, loc = nil, imei = nil}
    for i = 1, #wanted do
      local name, value = wanted[i], values[i]
      if name ~= 'cov' and type(value) == 'string' then read[name] = value end
    end
    entry.read = read
    rec.lpri = rec.loc ~= '' and (n36(stored.lpri) or rec.opri) or nil
    rec.ipri = rec.imei ~= '' and (n36(stored.ipri) or rec.opri) or nil
  else
    local legacy = P .. ':m:s:' .. sim .. ':' .. day
    local old = redis.call('HMGET', legacy, sid, '~')
    if old[1] then
      rec = from_legacy(old[1], old[2], day_start)
      entry.legacy, entry.sid = legacy, sid
    else
      rec = {start = start - day_start, cov = '', sd = 0, su = 0, ed = 0, eu = 0, ev = '',
        fleet = '', account = '', op = '', loc = '', imei = '', opri = nil, ['end'] = nil,
        lpri = nil, ipri = nil}
      for i = 1, #COMPONENTS do rec[COMPONENTS[i]] = '' end
    end
  end
  entry.rec = rec
  entry.base = day_start + rec.start
  of_key[field] = entry
  return entry
end

-- Updated windows counted: intervals [a, b] relative to the session start, "a:b,c:d" in
-- base 36; a single interval from 0 is written "b". Consecutive windows merge, so a
-- session seen in order keeps a single interval. An empty or inverted window (start >= end)
-- is only ever matched exactly.
local function parse_intervals(text)
  if text == '' then return {} end
  if not text:find(':', 1, true) then return {{0, n36(text)}} end
  local a, b = text:match('^(-?%w+):(-?%w+)$')
  if a then return {{n36(a), n36(b)}} end
  local list = {}
  for a, b in text:gmatch('(-?%w+):(-?%w+)') do list[#list + 1] = {n36(a), n36(b)} end
  return list
end

local function intervals_text(list)
  if #list == 1 and list[1][1] == 0 then return b36(list[1][2]) end
  local parts = {}
  for i = 1, #list do parts[i] = b36(list[i][1]) .. ':' .. b36(list[i][2]) end
  return table.concat(parts, ',')
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

-- The list with window [s, e] added (the list itself in the usual cases: the first window,
-- or the next one in order). The text is made once, when the record is written.
local function with_interval(list, s, e)
  if s < e then
    if #list == 0 then
      list[1] = {s, e}
      return list
    end
    if #list == 1 and list[1][1] < list[1][2] and list[1][2] == s then
      list[1][2] = e
      return list
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
  return out
end

-- A record's coverage as a list, parsed once per batch; coverage_text sets rec.cov from
-- it before the record is packed.
local function coverage(entry)
  local list = entry.cov
  if list == nil then
    list = parse_intervals(entry.rec.cov)
    entry.cov = list
  end
  return list
end

local function coverage_text(entry)
  if entry.cov_changed then
    entry.rec.cov = intervals_text(entry.cov)
    entry.cov_changed = false
  end
end

-- What the ended window is credited with: the session's cumulative bytes minus the
-- updated windows counted (v2), else the ended window's own bytes (v1); 0 before it.
local function ended_share(rec)
  if not is_ended(rec) then return 0, 0 end
  if rec.ev == '' then return max(rec.ed - rec.sd, 0), max(rec.eu - rec.su, 0) end
  return rec.ed, rec.eu
end

-- Credits the ended window's hour with the change of its share (was old_d, old_u), under
-- the ended event's fleet, account and network (the start of its operator group).
local function move_ended_share(sim, entry, old_d, old_u)
  local rec = entry.rec
  local d, u = ended_share(rec)
  if d == old_d and u == old_u then return end
  local hour = hour_name(entry.base + ended_window_end(rec))
  bump(sim, rec.fleet, rec.account, rec.op:match('^[^%^]*'), hour, d - old_d, u - old_u)
end

-- Descriptive fields come from the event with the highest priority (twice its window end,
-- plus one for the ended event), until the first ended event: it always sets the operator
-- group (fleet, account, network, radio, operator) and from then on nothing changes it,
-- not even a copy of the ended event naming another fleet, account or network. So the
-- ended share is always moved under the dimensions it was credited to. Location and IMEI
-- come from the highest-priority event that has one.
local function describe(entry, pri, ended, ev)
  -- A field that changes marks the record to be written (touched).
  local rec, touched = entry.rec, false
  local opri = rec.opri
  if (opri == nil or opri % 2 ~= 1) and (ended or opri == nil or pri >= opri) then
    local fleet, account, op = TEXTS[ev.fleet], TEXTS[ev.account], TEXTS[ev.group]
    if opri ~= pri then rec.opri, touched = pri, true end
    if rec.fleet ~= fleet then rec.fleet, touched = fleet, true end
    if rec.account ~= account then rec.account, touched = account, true end
    if rec.op ~= op then rec.op, touched = op, true end
  end
  local loc = TEXTS[ev.where]
  if loc ~= '' and (rec.lpri == nil or pri >= rec.lpri) then
    if rec.lpri ~= pri then rec.lpri, touched = pri, true end
    if rec.loc ~= loc then rec.loc, touched = loc, true end
  end
  local imei = TEXTS[ev.imei]
  if imei ~= '' and (rec.ipri == nil or pri >= rec.ipri) then
    if rec.ipri ~= pri then rec.ipri, touched = pri, true end
    if rec.imei ~= imei then rec.imei, touched = imei, true end
  end
  if touched then entry.touched = true end
end

-- ---- the batch ----------------------------------------------------------------------------

local counted, unchanged = 0, 0
local record_keys = {}  -- record_keys[sim][day]: the SIM-day hash's name
local EVENT_FORMAT = '--[[EVENT_FORMAT]]'
local KINDS = {[0] = 's', [1] = 'u', [2] = 'e'}
local blob, at = ARGV[5], 1
local ev = {}  -- the event's texts' numbers (see describe), one table for the batch
while at <= #blob do
  -- EVENT_FIELDS, texts as their numbers in TEXTS (session_field: ARGV[6])
  local code, sim, session, day, start, win_start, win_end, hour, down, up, cum_down,
    cum_up, end_t, fleet, account, network, group, where, imei, number, totals, next_at =
    struct.unpack(EVENT_FORMAT, blob, at)
  at = next_at
  local kind = KINDS[code]
  sim, day = TEXTS[sim], TEXTS[day]
  ev.fleet, ev.account, ev.group, ev.where, ev.imei = fleet, account, group, where, imei
  local by_day = child(record_keys, sim)
  local key = by_day[day]
  if key == nil then
    key = P .. ':m:r:' .. sim .. ':' .. day
    by_day[day] = key
  end
  local entry = load_record(key, sim, day, TEXTS[session], number, start)
  local rec, base = entry.rec, entry.base
  entry.touched = false
  local counts = false
  if kind == 's' then
    describe(entry, 0, false, ev)
  else
    local ws, we = win_start - base, win_end - base
    if kind == 'u' then
      local list = coverage(entry)
      if not covered(list, ws, we) then
        local old_d, old_u = ended_share(rec)
        entry.cov, entry.cov_changed = with_interval(list, ws, we), true
        rec.sd = exact(rec.sd + down, 'session download')
        rec.su = exact(rec.su + up, 'session upload')
        bump(sim, TEXTS[fleet], TEXTS[account], TEXTS[network], TEXTS[hour], down, up)
        move_ended_share(sim, entry, old_d, old_u)
        counts = true
      end
      describe(entry, 2 * we, false, ev)
    else
      local ended = is_ended(rec)
      describe(entry, 2 * we + 1, true, ev)
      -- new, or seen before only as a copy without cumulative totals (schema v1)
      if not ended or (rec.ev == 'w' and totals == 1) then
        local old_d, old_u
        if ended then
          old_d, old_u = ended_share(rec)
        else
          old_d, old_u = 0, 0
          rec['end'] = end_t - base
        end
        if totals == 1 then
          rec.ed, rec.eu, rec.ev = cum_down, cum_up, ''
        else
          rec.ed, rec.eu, rec.ev = down, up, 'w'
        end
        move_ended_share(sim, entry, old_d, old_u)
        counts = true
      end
    end
  end
  if counts then
    counted = counted + 1
  elseif not entry.touched then
    unchanged = unchanged + 1
  end
  if (counts or entry.touched or entry.legacy) and not entry.queued then
    entry.queued = true
    dirty[#dirty + 1] = entry
  end
end

-- ---- writes -------------------------------------------------------------------------------

expand_buckets()

-- A bucket hash's TTL restarts when it gains a field (a new hour or day), so it expires the
-- retention after the last period it holds; rewriting a field leaves the TTL alone.
-- HINCRBY refuses a total beyond 2^63 - 1; Redis does not undo a script's earlier writes,
-- so those are undone here before failing: the call counts everything or nothing (and TTLs
-- restart only once every sum is written). Any other
-- refusal (OOM, READONLY, MISCONF: Redis refuses a script's first write, so nothing is
-- undone then) is passed on as Redis gave it, so the caller sees an outage, not bad data.
local applied, napplied = {}, 0  -- key, field, delta, created: four entries per write
local function undo()
  for k = napplied - 3, 1, -4 do
    local key, field, delta, created = applied[k], applied[k + 1], applied[k + 2], applied[k + 3]
    if created then
      redis.call('HDEL', key, field)
    else
      redis.call('HINCRBY', key, field, fmt('%d', -delta))
    end
  end
end
local grown = {}  -- buckets that gained a field: their TTLs restart once every sum is written
for i = 1, #bucket_list do
  local bucket = bucket_list[i]
  local key, grew = bucket[1], false
  for j = 3, #bucket, 2 do
    local field, delta = bucket[j], bucket[j + 1]
    if delta ~= 0 then
      local total = redis.pcall('HINCRBY', key, field, fmt('%d', delta))
      if type(total) == 'table' then
        undo()
        local why = tostring(total.err)
        if why:find('overflow', 1, true) then
          error('usage bucket total refused by Redis (' .. why .. '): nothing counted', 0)
        end
        return redis.error_reply(why)
      end
      applied[napplied + 1], applied[napplied + 2] = key, field
      applied[napplied + 3], applied[napplied + 4] = delta, total == delta
      napplied = napplied + 4
      if total == delta then grew = true end
    end
  end
  if grew then grown[#grown + 1] = bucket end
end
for i = 1, #grown do redis.call('EXPIRE', grown[i][1], grown[i][2]) end

-- Session records. A component's first non-empty value written to a hash becomes its
-- default there; a record's value that differs from it is kept in an entry of the
-- record's own ("~<code><n>"), so every field stays short. A session hash's TTL restarts
-- on every change of one of its records.
local function number(value)
  if value == nil or value == 0 then return '' end
  return b36(value)
end

local function same(text) return text end
local ENCODE = {start = b36, opri = b36, cov = same, sd = number, su = number,
  ed = number, eu = number}

-- The record's fields in RECORD_FIELDS order, joined, without the empty ones at the end.
local function join(out)
  local n = NFIELDS
  while n > 0 and out[n] == '' do n = n - 1 end
  return table.concat(out, '|', 1, n)
end

local function blank()  -- a record's fields, all empty: one table made at its size
  return {'', '', '', '', '', '', '', '', '', '', '', '', '', '', '', ''}
end
assert(#blank() == NFIELDS, 'metering.lua: blank() must have NFIELDS fields')
local PLAIN_AT, COMPONENT_AT = {}, {}
for i = 1, #PLAIN do PLAIN_AT[i] = FIELD[PLAIN[i]] end
for i = 1, #COMPONENTS do COMPONENT_AT[i] = FIELD[COMPONENTS[i]] end
local END_AT, EV_AT, LPRI_AT, IPRI_AT, COV_AT = FIELD['end'], FIELD.ev, FIELD.lpri,
  FIELD.ipri, FIELD.cov

-- Notes a component's own entry written or deleted by this call in the hash.
local function wrote_own(hash, own)
  local written = hash.own_written
  if written == nil then
    written = {}
    hash.own_written = written
  end
  written[own] = true
end

local function pack(entry, writes)
  coverage_text(entry)
  local rec, hash, read, stored = entry.rec, entry.hash, entry.read, entry.stored
  local out = blank()
  out[EV_AT] = rec.ev
  for i = 1, #PLAIN do
    local name = PLAIN[i]
    if read and read[name] == rec[name] then
      out[PLAIN_AT[i]] = stored[name]
    else
      out[PLAIN_AT[i]] = ENCODE[name](rec[name])
    end
  end
  if is_ended(rec) and rec['end'] ~= ended_window_end(rec) then out[END_AT] = b36(rec['end']) end
  if rec.loc ~= '' and rec.lpri ~= rec.opri then out[LPRI_AT] = b36(rec.lpri) end
  if rec.imei ~= '' and rec.ipri ~= rec.opri then out[IPRI_AT] = b36(rec.ipri) end
  local slots, defaults, set, gone = entry.slots, hash.defaults, writes.set, writes.gone
  for i = 1, #COMPONENTS do
    local name = COMPONENTS[i]
    local value, slot, default = rec[name], slots[name], defaults[name]
    if value == '' or value == default or default == '' then
      if value == '' then
        out[COMPONENT_AT[i]] = NONE
      else
        out[COMPONENT_AT[i]] = ''
        if default == '' then
          defaults[name] = value
          set[#set + 1] = '~' .. CODES[i]
          set[#set + 1] = value
        end
      end
      if slot then
        local own = '~' .. CODES[i] .. slot
        gone[#gone + 1] = own
        wrote_own(hash, own)
        slots[name] = nil
      end
    else
      if slot == nil then
        hash.count = hash.count + 1
        hash.counted = true
        slot = fmt('%d', hash.count)
        slots[name] = slot
      end
      -- An own entry is written unless it holds the value already: read so by this call,
      -- and not written or deleted since (only a damaged hash has records sharing a slot).
      local own = nil
      if read and read[name] == value then
        local written = hash.own_written
        if written then
          own = '~' .. CODES[i] .. slot
          if not written[own] then own = nil end
        end
      else
        own = '~' .. CODES[i] .. slot
      end
      if own then
        set[#set + 1] = own
        set[#set + 1] = value
        wrote_own(hash, own)
      end
      out[COMPONENT_AT[i]] = slot
    end
  end
  local packed = join(out)
  local slot = entry.slots.cov
  if #packed > LIMIT and out[COV_AT]:find(',', 1, true) then
    -- Windows arrived out of order: the coverage moves to an entry of the record's own.
    if slot == nil then
      hash.count = hash.count + 1
      hash.counted = true
      slot = fmt('%d', hash.count)
      entry.slots.cov = slot
    end
    writes.set[#writes.set + 1] = '~' .. COV_CODE .. slot
    writes.set[#writes.set + 1] = out[COV_AT]
    out[COV_AT] = COV_REF .. slot
    packed = join(out)
  elseif slot and out[COV_AT]:sub(1, 1) ~= COV_REF then
    writes.gone[#writes.gone + 1] = '~' .. COV_CODE .. slot
    entry.slots.cov = nil
  end
  return packed
end

local expiring = {}
for i = 1, #dirty do
  local entry = dirty[i]
  local hash = entry.hash
  local writes = {set = {}, gone = {}}
  local packed = pack(entry, writes)
  if hash.counted then
    hash.counted = false
    writes.set[#writes.set + 1] = COUNT
    writes.set[#writes.set + 1] = fmt('%d', hash.count)
  end
  redis.call('HSET', entry.key, entry.field, packed, unpack(writes.set))
  if #writes.gone > 0 then redis.call('HDEL', entry.key, unpack(writes.gone)) end
  if entry.legacy then redis.call('HDEL', entry.legacy, entry.sid) end
  if not expiring[entry.key] then
    expiring[entry.key] = true
    redis.call('EXPIRE', entry.key, SESSION_TTL)
  end
end

return {counted, unchanged}
