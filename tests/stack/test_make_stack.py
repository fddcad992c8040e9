"""`make stack` (scripts/stack.py) starts the whole production-shaped Airflow and SIGTERM stops all of it.

The script runs as `make stack` runs it; once it says it is up, the api-server answers on its port with a
healthy metadata database and the connections are in it; then SIGTERM, and afterwards no process of the
stack is left, its folder is gone and its ports are closed. Processes are followed by ancestry (some
rename themselves: Redis, Celery's pool) and by ``MODMED_STACK_HOME``, which every process it starts
carries."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scripts.processes import listening

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[str]:
    """Processes whose command line or environment holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if text.encode() in blob:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
            found.append(f"{proc.name}: {command!r}")
    return found


def stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every process under ``root`` (children, grandchildren...): pid -> start time (pids are reused)."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (info := stat(int(proc.name))) is not None:
            parents.setdefault(info[0], []).append((int(proc.name), info[1]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, started in parents.get(todo.pop(), []):
            found[pid] = started
            todo.append(pid)
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    return [pid for pid, started in processes.items() if (info := stat(pid)) is not None and info[1] == started]


def test_make_stack_starts_everything_and_sigterm_stops_all_of_it(stack_parts: None) -> None:
    proc = subprocess.Popen([sys.executable, "scripts/stack.py", "--practices", "2", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line or "stack:" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C stops everything" in out, out[-3000:]
        api = int(re.search(r"airflow\s+http://127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
        home = re.search(r"logs in (\S+)/logs", out).group(1)  # type: ignore[union-attr]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out)]
        assert "CeleryExecutor" in out and "2 Celery workers" in out
        health = httpx.get(f"http://127.0.0.1:{api}/api/v2/monitor/health", timeout=30).json()
        assert health["metadatabase"]["status"] == "healthy"
        assert health["triggerer"]["status"] is not None
        assert "connections: 7 in the metadata database" in out  # 2 practices x 2 tracks + 2 aliases + aws
        tree = descendants(proc.pid)
        # postgres, redis, moto, 4 components, 2 workers, and their children (Postgres's, the workers' pools)
        assert len(tree) >= 15, tree
        assert processes_mentioning(home)  # the stack's processes carry MODMED_STACK_HOME
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-3000:]
    assert "stopped: nothing left running" in rest
    deadline = time.monotonic() + 10
    while (still_running(tree) or processes_mentioning(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert still_running(tree) == []
    assert processes_mentioning(home) == []
    assert not Path(home).exists()
    assert [p for p in ports if listening(p)] == []
