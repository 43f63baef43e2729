"""``supersim-worker replay``: a recorded file through the whole worker on a throwaway Kinesis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from events import make_record, make_sink_test_event, to_record

from worker.cli.simulate import SimulationOptions, write


def test_replay_of_a_simulated_file_reports_every_record(tmp_path: Path, redis_url: str) -> None:
    """Replay starts moto_server, puts the file, reads it all and prints counts per kind."""
    out = tmp_path / "events.jsonl"
    write(SimulationOptions(sims=20, hours=1, seed=3, test_events=2), out)
    lines = out.read_bytes().splitlines()
    with out.open("ab") as handle:
        handle.write(b"this line is not json\n")
    result = subprocess.run(
        [sys.executable, "-m", "worker", "replay", str(out), "--shards", "2"],
        capture_output=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": redis_url, "SUPERSIM_LOG_LEVEL": "WARNING"},
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    stdout = result.stdout.decode()
    assert f"replayed {len(lines) + 1} records" in stdout
    counted = sum(
        int(line.split()[-1])
        for line in stdout.splitlines()[1:]
        if line.startswith("  ") and not line.strip().startswith(("skipped", "dead-lettered"))
    )
    assert "consumer group replay" in stdout.splitlines()[-1]
    assert "dead-lettered            1" in stdout
    assert "skipped                  2" in stdout
    assert counted == len(lines) - 2


def test_replay_into_kinesalite_with_endpoint_url(
    tmp_path: Path, kinesalite_endpoint: str, redis_url: str
) -> None:
    """--endpoint-url replays into another Kinesis (kinesalite here) instead of moto."""
    out = tmp_path / "few.jsonl"
    out.write_bytes(
        b"\n".join(
            [make_record("attachment.accepted", seq=i) for i in range(5)]
            + [to_record(make_sink_test_event("kore"))]
        )
        + b"\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "worker", "replay", str(out), "--endpoint-url", kinesalite_endpoint],
        capture_output=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "REDIS_URL": redis_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "attachment.accepted      5" in result.stdout.decode()
    assert "skipped                  1" in result.stdout.decode()
