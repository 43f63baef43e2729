"""Throwaway local servers for ``replay``: moto_server and redis-server on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ConfigError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalServer:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sw-")))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait(server: LocalServer, ready: Callable[[], bool], timeout: float = 30.0) -> LocalServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            if ready():
                return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise ConfigError(f"{server.name} did not start on {server.url}")


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: run `make install`")
    return found


def start_moto() -> LocalServer:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [_executable("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer("moto_server", url, process)

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as response:
            return bool(response.status == 200)

    return _wait(server, ready)


def start_redis() -> LocalServer:
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sw-redis-"))
    process = subprocess.Popen(
        [
            _executable("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer("redis-server", f"redis://127.0.0.1:{port}/0", process, workdir)

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    return _wait(server, ready)
