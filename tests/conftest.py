"""Shared fixtures: the sandbox on a free loopback port, and the missing-part policy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Airflow reads its home at first import: point it at a throw-away folder before anything imports it.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="modmed-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__TEST_CONNECTION", "Enabled")
# dag.test() serializes a DAG only when its file lies under the dags folder: the repo root holds both
# tests/airflow/dags and example_dags
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parent.parent))

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_binary(name: str) -> str:
    """The path of a program the test needs: skip on a laptop without it, fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package; `make system-deps` installs it as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def sandbox_fixtures(name: str = "own_sandbox", scope: str = "module",
                     after_each: Callable[[SandboxServer], None] | None = None, **options: Any) -> tuple[Any, Any]:
    """A sandbox of a module's (or package's) own, and the ``sb`` fixture over it::

        own_sandbox, sb = sandbox_fixtures(patients=12, seed=11)   # at the top of a test module

    ``name`` (started once per ``scope`` with ``options``; the rate limit defaults to 100,000 a minute) and
    ``sb``: that sandbox with faults cleared before and after each test, then ``after_each(sandbox)``
    (a check every test must leave true). Assign both to module names so pytest finds them.
    """
    options.setdefault("rate_limit_per_minute", 100_000)

    @pytest.fixture(scope=scope, name=name)  # type: ignore[call-overload]
    def started() -> Iterator[SandboxServer]:
        with SandboxServer(**options) as server:
            yield server

    @pytest.fixture(name="sb")
    def cleared(request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
        server: SandboxServer = request.getfixturevalue(name)
        server.reset_faults()
        yield server
        server.reset_faults()
        if after_each is not None:
            after_each(server)

    return started, cleared


#: one sandbox for the session (40 patients, fast bulk jobs); ``sb``: it with faults cleared around each test
sandbox, sb = sandbox_fixtures("sandbox", scope="session", patients=40, seed=7, export_seconds=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path, password: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's redis-server on a free loopback port (requiring ``password`` when given), once it answers."""
    binary = require_binary("redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir),
                             *(("--requirepass", password) if password else ())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"-NOAUTH" if password else b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, started and stopped by the test session."""
    proc, port = start_redis(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
