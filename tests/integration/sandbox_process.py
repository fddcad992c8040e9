"""`modmed-sandbox serve` in a process of its own, as users run it: started, waited for, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

#: the CLI as ``python -m`` (the console script ``modmed-sandbox`` runs the same ``main``)
CLI = [sys.executable, "-m", "airflow_provider_modmed.sandbox.cli"]


@contextlib.contextmanager
def serve(port: int, *args: str, output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``modmed-sandbox serve --port PORT ARGS``, its stdout and stderr going to ``output``; yields once it answers."""
    with output.open("w") as log:
        proc = subprocess.Popen([*CLI, "serve", "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats", timeout=1)
                    break
                except httpx.TransportError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"modmed-sandbox did not start: {output.read_text()}")
                    time.sleep(0.1)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
