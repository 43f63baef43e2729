"""``supersim-worker replay``: a recorded file through the whole worker on a throwaway Kinesis."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

from events import make_record, make_sink_test_event, to_record

from worker.devtools.local_servers import MOTO_EXTRA
from worker.devtools.simulator import SimulationOptions, write


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


def test_replay_without_moto_server_names_the_install_extra(tmp_path: Path) -> None:
    """Where moto_server is not installed, replay exits 2 naming it and the extra providing it."""
    # A real virtualenv that sees this project's packages but has no moto_server in its bin/.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    paths = {"base": str(env_dir), "platbase": str(env_dir)}
    site_packages = Path(sysconfig.get_path("purelib", vars=paths))
    ours = sysconfig.get_path("purelib")
    (site_packages / "project.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    python = Path(sysconfig.get_path("scripts", vars=paths)) / "python"
    path = "/usr/bin:/bin"
    assert not (python.parent / "moto_server").exists()
    assert shutil.which("moto_server", path=path) is None
    out = tmp_path / "one.jsonl"
    out.write_bytes(make_record("attachment.accepted", seq=1) + b"\n")
    result = subprocess.run(
        [str(python), "-m", "worker", "replay", str(out)],
        capture_output=True,
        timeout=60,
        env={"PATH": path},
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr[-3000:]
    assert "moto_server is not installed" in stderr
    assert f"pip install 'supersim-worker[{MOTO_EXTRA}]'" in stderr


def test_the_extra_named_for_moto_server_provides_it() -> None:
    """The ``local`` extra pins moto[server] as ``dev`` did, and ``dev`` includes it."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert [r for r in extras[MOTO_EXTRA] if r.startswith("moto[server]")] == [
        "moto[server]==5.2.5"
    ]
    assert f"supersim-worker[{MOTO_EXTRA}]" in extras["dev"]
