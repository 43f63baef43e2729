"""Where metering's script spends its Lua: VM instructions per event, by line of metering.lua.

    python tests/bench/metering_lua_profile.py --lua-python PATH [--events 10000]
        [--batch 2500] [--top 40]

redis-server cannot say which line of a script its time goes to (callgrind sees only the
interpreter). So this runs ``metering.lua`` outside Redis, in Lua 5.1 (Redis' version)
from lupa (PyPI ``lupa``, installed in any virtualenv: pass its Python as ``--lua-python``),
under a count hook that notes the line of every VM instruction. The first ``--events``
connection events of a simulated stream (400 SIMs over 8 hours, seed 11, as
``metering_callgrind.py``) are encoded by the handler's own code in batches of ``--batch``;
Redis is stood in for by a Lua table store (``HMGET``, ``HGET``, ``HSET``, ``HDEL``,
``HINCRBY``, ``EXPIRE``), ``struct.unpack`` of the events and ``cjson.decode`` of the texts by
the values already unpacked in Python (their instructions count as "outside"). It prints
VM instructions per metered event after the first batch, the Redis commands the script
called, and the lines with the most instructions per event. VM instructions are not CPU:
a call into C (a string function, ``tonumber``, a Redis command) counts as one. A
development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

LUA_SIDE = r'''
import collections, pickle, sys
import lupa.lua51 as L

d = pickle.load(open(sys.argv[1], "rb"))
top = int(sys.argv[2])
rt = L.LuaRuntime(unpack_returned_tuples=True)
rt.execute(r"""
STORE, CALLS = {}, {}
local function hash(key)
  local t = STORE[key]
  if t == nil then t = {}; STORE[key] = t end
  return t
end
redis = {}
function redis.call(cmd, key, ...)
  CALLS[cmd] = (CALLS[cmd] or 0) + 1
  local a = {...}
  local t = hash(key)
  if cmd == 'HMGET' then
    local out = {}
    for i = 1, #a do out[i] = t[a[i]] or false end
    return out
  elseif cmd == 'HGET' then return t[a[1]] or false
  elseif cmd == 'HSET' then for i = 1, #a, 2 do t[a[i]] = a[i + 1] end; return 0
  elseif cmd == 'HDEL' then for i = 1, #a do t[a[i]] = nil end; return 0
  elseif cmd == 'HINCRBY' then
    local v = (tonumber(t[a[1]]) or 0) + tonumber(a[2])
    t[a[1]] = string.format('%d', v)
    return v
  elseif cmd == 'EXPIRE' then return 1
  end
  error('no stand-in for ' .. cmd)
end
redis.pcall = redis.call
function redis.error_reply(why) return {err = why} end
struct = {}
function struct.unpack(_, rows, at)  -- ARGV[5] is a table of unpacked events
  local r = rows[at]
  return r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13],
    r[14], r[15], r[16], r[17], r[18], r[19], r[20], r[21], at + 1
end
cjson = {decode = function(texts) return texts end}  -- ARGV[7] is a table already
function PROFILE(fn)
  local counts, getinfo = {}, debug.getinfo
  debug.sethook(function()
    local info = getinfo(2, 'Sl')
    local line = info.source == 'metering' and info.currentline or -1
    counts[line] = (counts[line] or 0) + 1
  end, '', 1)
  local ok, err = pcall(fn)
  debug.sethook()
  if not ok then error(err) end
  return counts
end
""")
g = rt.globals()
script = rt.eval("function(src) return loadstring(src, 'metering') end")(d["script"])
total, events = collections.Counter(), 0
for n, (rows, sids, texts) in enumerate(d["batches"]):
    g.KEYS = rt.table_from(["{bench}:m"])
    g.ARGV = rt.table_from(
        ["{bench}", "3024000", "36288000", "691200",
         rt.table_from([rt.table_from(row) for row in rows]), sids, rt.table_from(texts)]
    )
    counts = g.PROFILE(script)
    if n == 0:  # the first batch makes the first records, as in metering_callgrind.py
        for key in list(g.CALLS):
            g.CALLS[key] = 0
        continue
    events += len(rows)
    total.update(dict(counts.items()))
lines = d["script"].split("\n")
print(f"{events:,} metered events after the first batch, batches of {d['batch']:,}")
print(f"Lua VM instructions per event: {sum(total.values()) / events:,.0f}")
called = ", ".join(f"{k} {v / events:.2f}" for k, v in sorted(dict(g.CALLS.items()).items()))
print(f"Redis commands per event: {called}")
inside = sorted((c for line, c in total.items() if line > 0), reverse=True)
print(f"The costliest line: {inside[0] / sum(inside):.1%} of the script's own instructions; "
      f"the 10 costliest: {sum(inside[:10]) / sum(inside):.1%}; lines run: {len(inside)}")
print("| VM instructions per event | line | source |\n|---:|---:|---|")
for line, count in total.most_common(top):
    text = lines[line - 1].strip() if line > 0 else "(outside: the stand-ins)"
    print(f"| {count / events:.1f} | {line} | `{text[:90]}` |")
'''


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lua-python", required=True, help="a Python with lupa installed")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=2_500)
    parser.add_argument("--top", type=int, default=40, help="lines listed")
    args = parser.parse_args(argv)

    from worker.devtools.simulator import SimulationOptions, generate
    from worker.events.decode import decode
    from worker.events.records import ConnectionEvent
    from worker.handlers.metering import handler as metering

    records, _ = generate(SimulationOptions(sims=400, hours=8, seed=11))
    events = [e for e in map(decode, records) if isinstance(e, ConnectionEvent)]
    events = events[: args.events]
    texts = metering._Texts()
    batches = []
    for at in range(0, len(events), args.batch):
        encoded = metering.encode(events[at : at + args.batch], texts)
        rows = [list(event) for event in dict.fromkeys(encoded.events)]
        batches.append((rows, encoded.sids, encoded.texts))
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "args.pickle"
        dump.write_bytes(
            pickle.dumps(
                {"script": metering.load_script(), "batches": batches, "batch": args.batch}
            )
        )
        side = Path(tmp) / "lua_side.py"
        side.write_text(LUA_SIDE)
        return subprocess.run(
            [args.lua_python, str(side), str(dump), str(args.top)], check=False
        ).returncode


if __name__ == "__main__":
    sys.exit(main())
