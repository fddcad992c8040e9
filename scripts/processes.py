"""Long-running programs started for a demo, a test or ``make stack``: each in a process group of its own,
logged to a file, watched, and stopped together (SIGTERM, then SIGKILL).

Used by ``scripts/stack.py`` (the production-shaped stack), ``scripts/demo_changes.py`` (the demo's
triggerer, scheduler and api-server) and ``tests/airflow/test_changes_event_driven.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ProcessError(RuntimeError):
    """A program died, or a wait timed out; the message names it (and its log)."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on ``127.0.0.1:port``."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    killed: bool = False  # by kill(): not a death check_alive() reports


class ProcessGroups:
    """Programs by name, each in its own process group (``start_new_session``), logged to
    ``{logs}/{log_prefix}{name}.log``.

    ``mark`` is added to every program's environment (a way to find them all again); with
    ``tails_in_errors`` a death or a timeout carries the logs' last lines, else the log's path.
    """

    def __init__(self, logs: Path, *, log_prefix: str = "", mark: Mapping[str, str] | None = None,
                 tails_in_errors: bool = True) -> None:
        self.logs_dir = logs
        self.log_prefix = log_prefix
        self.mark = dict(mark or {})
        self.tails_in_errors = tails_in_errors
        self.procs: dict[str, _Proc] = {}

    def start(self, name: str, argv: list[str], *, env: Mapping[str, str], user: str | None = None,
              stop_signal: int = signal.SIGTERM, cwd: Path | None = None) -> None:
        """Start ``argv`` as ``name`` (``user``: as that user, which needs root; ``stop_signal``: what
        :meth:`stop` sends it first)."""
        log = self.logs_dir / f"{self.log_prefix}{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**env, **self.mark}, user=user, cwd=cwd)
        self.procs[name] = _Proc(name, popen, log, stop_signal)

    def check_alive(self) -> None:
        """Raise :class:`ProcessError` when a program died (one stopped by :meth:`kill` excepted)."""
        for proc in self.procs.values():
            if proc.popen.poll() is not None and not proc.killed:
                where = f"\n{self.tails([proc.name])}" if self.tails_in_errors else f": see {proc.log}"
                raise ProcessError(f"{proc.name} exited with {proc.popen.returncode}{where}")

    def wait_for(self, what: str, condition: Callable[[], T | None], timeout: float, poll: float = 0.5) -> T:
        """``condition()``'s first truthy value, asked every ``poll`` seconds while every program lives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            value = condition()
            if value:
                return value
            time.sleep(poll)
        tails = f"\n{self.tails()}" if self.tails_in_errors else ""
        raise ProcessError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")

    def tails(self, names: list[str] | None = None, lines: int = 25) -> str:
        """The last ``lines`` of each program's log."""
        parts = []
        for name in names or list(self.procs):
            log = self.procs[name].log
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {name} (last lines) ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def kill(self, name: str) -> None:
        """SIGKILL a program's whole process group (no cleanup), as when its machine dies."""
        proc = self.procs[name]
        proc.killed = True
        os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(30)

    def stop(self, grace: float = 30) -> None:
        """Every group gets its stop signal (the last started first), SIGKILL after ``grace`` seconds; then
        SIGKILL to every group again, for children that outlived their leader."""
        for proc in reversed(list(self.procs.values())):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, proc.stop_signal)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)


def run_checked(argv: list[str], env: Mapping[str, str], timeout: float, what: str) -> str:
    """Run a command to its end; its output, or :class:`ProcessError` with the output's last lines."""
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise ProcessError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout

