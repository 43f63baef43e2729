"""The worked example of docs/handlers.md, ``examples/fleet_counter``: a third-party handler
package installed into the test environment (``make install``), found by its entry point,
passing its own tests, and run by ``supersim-worker replay`` like any handler."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Final

from redis.asyncio import Redis
from supersim_fleet_counter import CounterSettings, count

from worker import keys
from worker.handlers import registry
from worker.testing.fleet import simulate_fleet

ROOT: Final = Path(__file__).resolve().parents[1]
EXAMPLE: Final = ROOT / "examples" / "fleet_counter"
BIN: Final = Path(sys.executable).parent
RUN_TIMEOUT: Final = 100.0
"""Seconds a command may take (the test's own limit is 120)."""


async def run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    """Run a command to its end; its output (stdout then stderr), asserting it exited 0."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(RUN_TIMEOUT):
        stdout, stderr = await process.communicate()
    output = stdout.decode() + stderr.decode()
    assert process.returncode == 0, output[-4000:]
    return output


def test_the_example_is_a_handler_found_by_its_entry_point() -> None:
    """``fleet_counter`` is chosen by name like a built-in, with its settings section."""
    assert registry.available()["fleet_counter"] == "supersim_fleet_counter:plugin"
    (chosen,) = registry.choose(["fleet_counter"])
    assert registry.section_name("fleet_counter", chosen.plugin) == "fleet_counter"
    assert chosen.settings == CounterSettings()


def test_the_guide_shows_the_example_as_it_is() -> None:
    """docs/handlers.md walks through the example's settings, handler and tests verbatim."""
    guide = (ROOT / "docs" / "handlers.md").read_text()
    package = EXAMPLE / "src" / "supersim_fleet_counter"
    for path in (
        package / "settings.py",
        package / "handler.py",
        EXAMPLE / "tests" / "test_fleet_counter.py",
    ):
        assert f"```python\n{path.read_text()}```" in guide, f"docs/handlers.md: update {path.name}"


async def test_the_example_passes_its_own_tests(redis_url: str) -> None:
    """Its tests, run from its own folder as its author would, use only the kit's fixtures."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    output = await run(
        [*pytest, "--supersim-redis-url", redis_url],
        cwd=EXAMPLE,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert " passed" in output
    assert " failed" not in output
    assert " skipped" not in output


async def test_replay_runs_the_example_and_counts_like_the_truth(
    tmp_path: Path, redis_url: str
) -> None:
    """``supersim-worker replay --handlers fleet_counter`` over a simulated file, with
    duplicates in both envelopes and shuffled records: every fleet's distinct events per
    kind equal the simulator's truth, and the settings come from the environment."""
    fleet = simulate_fleet(sims=40, hours=3, seed=11, duplicate_share=0.2, kore_share=0.5)
    path = fleet.write(tmp_path / "fleet.jsonl")
    stream = f"example-{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "SUPERSIM_LOG_LEVEL": "WARNING",
        "SUPERSIM_FLEET_COUNTER__TTL_DAYS": "2",
    }
    argv = [str(BIN / "supersim-worker"), "replay", str(path), "--handlers", "fleet_counter"]
    output = await run([*argv, "--stream", stream, "--shards", "3"], cwd=tmp_path, env=env)
    assert f"replayed {len(fleet.records)} records" in output

    prefix = keys.prefix(stream, "replay")
    expected = fleet.truth["events_by_fleet"]
    assert len(expected) == 3
    async with Redis.from_url(redis_url) as client:
        counted = {
            fleet_sid: {kind: await count(client, prefix, fleet_sid, kind) for kind in kinds}
            for fleet_sid, kinds in expected.items()
        }
        found = [key async for key in client.scan_iter(match=f"{prefix}:fc:*")]
        total = sum([await client.scard(key) for key in found])  # type: ignore[misc]
        ttls = [await client.ttl(key) for key in found]
    assert counted == expected
    assert total == fleet.truth["unique_events"]  # nothing else counted
    assert ttls
    assert all(0 < ttl <= 2 * 86_400 for ttl in ttls)
