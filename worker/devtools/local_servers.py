"""Throwaway local servers: redis-server and moto_server on free loopback ports.

``replay`` runs against them when no Kinesis endpoint or Redis URL is given, and the test
suite starts them once per session::

    server = start_redis()
    try:
        ...  # use server.url
        server.flush()
    finally:
        server.stop()

Every server listens on 127.0.0.1 only, keeps its state in memory (or in a temporary
directory that ``stop()`` removes) and is terminated if this process dies.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import redis

from worker.errors import ConfigError

HOST = "127.0.0.1"
MOTO_EXTRA = "local"  # the install extra of pyproject.toml that provides moto_server
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


S = TypeVar("S", bound="ServerProcess")


class ServerError(ConfigError):
    """A local server is not installed, failed to start or did not become ready."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, even if killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _passes(check: Callable[[], bool]) -> bool:
    """``check()``, with any exception counting as "not yet"."""
    try:
        return check()
    except Exception:
        return False


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Call ``check`` until it returns True or ``timeout`` seconds pass; return the outcome.

    Exceptions raised by ``check`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while not _passes(check):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def http_answers(url: str) -> bool:
    """True if anything answers HTTP at ``url`` (any status code counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True


class ServerProcess:
    """A server running as a child process, with its stdout/stderr in a temporary directory."""

    name = "server"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.port: int = port or 0
        self.not_ready = ""
        """Why the readiness check last failed, when it can say (for the error message)."""
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sw-{self.name}-"))
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                # A pipe we close on stop() lets a child that watches stdin exit with us.
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        """The server's stdout and stderr so far, for error messages."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = path.read_text(errors="replace").strip() if path.exists() else ""
            parts.append(f"--- {label} ---\n{text or '(empty)'}")
        return "\n".join(parts)

    def wait_ready(self, check: Callable[[], bool], *, timeout: float) -> None:
        """Poll ``check`` until it passes; if the server exits or ``timeout`` s pass first,
        stop it and raise ServerError with its output."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if _passes(check):
                return
            time.sleep(0.05)
        code = self.process.poll()
        status = f"exited with code {code}" if code is not None else f"not ready in {timeout}s"
        if self.not_ready:
            status += f" ({self.not_ready})"
        message = f"{self.name} on port {self.port} {status}\n{self.output()}"
        self.stop()
        raise ServerError(message)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (kill it if it does not exit in ``timeout`` s) and clean up."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_on_free_port(start: Callable[[int], S], attempts: int = 3) -> S:
    """Call ``start(port)`` with fresh free ports, retrying if another process grabbed one."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except ServerError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# --- redis -----------------------------------------------------------------------------------


class RedisServer(ServerProcess):
    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def ping(self) -> bool:
        """True if this server answers on its port: the redis-server answering ``INFO
        server`` there is this child process, not another one (a redis-server another
        process started on the same port meanwhile) whose data a flush would wipe. A raw
        socket: redis-py would retry with backoff."""
        with socket.create_connection((HOST, self.port), timeout=1) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                reply += chunk
        for line in reply.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                pid = int(line.partition(b":")[2])
                if pid == self.process.pid:
                    return True
                self.not_ready = (
                    f"the redis-server answering on port {self.port} is process {pid}, not "
                    f"this child ({self.process.pid}): another one holds the port, or "
                    "REDIS_SERVER names a wrapper that does not exec redis-server"
                )
        return False

    def flush(self) -> None:
        """Delete every key in every database (FLUSHALL)."""
        with redis.Redis(host=HOST, port=self.port, socket_timeout=5) as client:
            client.flushall()


def start_redis(
    timeout: float = 15.0, port: int | None = None, extra: Sequence[str] = ()
) -> RedisServer:
    """Start an in-memory redis-server (no RDB/AOF) on a free port of 127.0.0.1 (or ``port``),
    with ``extra`` command-line options after the defaults."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server not found on PATH: run `make install`")

    def start(port: int) -> RedisServer:
        argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no", "--loglevel", "warning", *extra]
        server = RedisServer(argv, port=port)
        server.wait_ready(server.ping, timeout=timeout)
        return server

    return start(port) if port is not None else start_on_free_port(start)


# --- moto_server -----------------------------------------------------------------------------


class MotoServer(ServerProcess):
    name = "moto_server"

    def serving(self) -> bool:
        """True once this child says it listens on its port (werkzeug prints the line after
        binding; a port taken meanwhile makes it exit instead) and answers HTTP there, so
        another process's server on the same port never passes for this one."""
        bound = f"Running on {self.url}"
        said = "".join(
            path.read_text(errors="replace") if path.exists() else ""
            for path in (self.stderr_path, self.stdout_path)  # wherever its logging goes
        )
        return bound in said and http_answers(f"{self.url}/moto-api/")

    def reset(self) -> None:
        """Drop all state of all mocked services (POST /moto-api/reset)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise ServerError(f"moto reset answered HTTP {response.status}")


def start_moto(timeout: float = 60.0) -> MotoServer:
    """Start ``moto_server`` (this interpreter's, else the one on PATH) on a free port."""
    beside = Path(sys.executable).parent / "moto_server"
    binary = str(beside) if beside.exists() else shutil.which("moto_server")
    if binary is None:
        raise ServerError(
            f"moto_server is not installed (looked beside {sys.executable} and on PATH): "
            f"it comes with the `{MOTO_EXTRA}` extra, "
            f"pip install 'supersim-worker[{MOTO_EXTRA}]' (a checkout: make install)"
        )

    def start(port: int) -> MotoServer:
        server = MotoServer([binary, "-H", HOST, "-p", str(port)], port=port)
        server.wait_ready(server.serving, timeout=timeout)
        return server

    return start_on_free_port(start)
