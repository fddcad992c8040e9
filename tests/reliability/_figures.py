"""The figures of the fault and abuse suite: what each test measured, written to ``out/reliability-figures.json``.

A test asks for the ``figures`` fixture and records what it measured::

    with figures.measure(sb):          # sandbox counters, client retries and wall time, before/after
        ...
    figures.record(ids=40, duplicates=0)

After each test the figures (with the test's outcome) are merged into ``out/reliability-figures.json``
(gitignored), keyed by the test's node id, so a partial run keeps the other tests' figures. Render the
table rows of ``docs/reliability.md`` from it with::

    .venv/bin/python -m tests.reliability._figures            # markdown: test | outcome | figures
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "out" / "reliability-figures.json"

#: sandbox counters worth reporting (deltas over a measured block)
COUNTERS = ("requests", "token_requests", "throttled", "unauthorized", "injected_failures", "dropped",
            "injected:malformed_next", "injected:wrong_type_next", "uploads", "presigned_issued",
            "storage_refused", "auth_headers_seen_by_storage", "conditional_create_matched",
            "exports_started", "truncated_downloads", "storage_requests")

_RETRY = re.compile(r"modmed: .* got (.+); retry \d+ in ([0-9.]+)s")


class _RetryCounter(logging.Handler):
    """Counts the client's ``retry N in Xs`` warnings (and the backoff they announce)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retries = 0
        self.backoff = 0.0
        self.why: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            match = _RETRY.match(record.getMessage())
        except Exception:  # a log record that cannot format is not ours
            return
        if match:
            self.retries += 1
            self.backoff += float(match.group(2))
            self.why[match.group(1)] = self.why.get(match.group(1), 0) + 1


class Figures:
    """The figures of one test."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.values: dict[str, Any] = {}

    def record(self, **values: Any) -> None:
        self.values.update(values)

    @contextlib.contextmanager
    def measure(self, *sandboxes: Any, prefix: str = "") -> Iterator[dict[str, Any]]:
        """Record the sandbox counter deltas, client retries and wall time of the block."""
        before = [sb.stats() for sb in sandboxes]
        counter = _RetryCounter()
        logger = logging.getLogger("airflow_provider_modmed.client")
        logger.addHandler(counter)
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        started = time.monotonic()
        out: dict[str, Any] = {}
        try:
            yield out
        finally:
            out["seconds"] = round(time.monotonic() - started, 2)
            logger.removeHandler(counter)
            logger.setLevel(old_level)
            out["client_retries"] = counter.retries
            if counter.why:
                out["retried_on"] = dict(sorted(counter.why.items()))
            if counter.backoff:
                out["backoff_seconds"] = round(counter.backoff, 2)
            for name in COUNTERS:
                delta = sum(int(sb.stats().get(name, 0)) - int(b.get(name, 0))
                            for sb, b in zip(sandboxes, before, strict=True))
                if delta:
                    out[name] = delta
            self.values.update({f"{prefix}{k}": v for k, v in out.items()})


def save(nodeid: str, figures: Figures | None, outcome: str) -> None:
    """Merge one test's figures and outcome into :data:`OUT` (atomic replace)."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(OUT.read_text())
    except (OSError, ValueError):
        data = {}
    tests = data.setdefault("tests", {})
    tests[nodeid] = {"outcome": outcome, "figures": figures.values if figures else {},
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data["updated"] = tests[nodeid]["finished"]
    data["python"] = sys.version.split()[0]
    data["cpus"] = os.cpu_count()
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(OUT)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(path: Path = OUT) -> str:
    """Markdown rows ``test | outcome | figures`` of the last run."""
    data = json.loads(path.read_text())
    rows = ["| test | outcome | figures of the last run |", "| --- | --- | --- |"]
    for nodeid, entry in sorted(data["tests"].items()):
        figures = "; ".join(f"{k}: {_short(v)}" for k, v in sorted(entry["figures"].items()))
        path, _, name = nodeid.partition("::")
        rows.append(f"| `{Path(path).stem}::{name}` | {entry['outcome']} | {figures or '-'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
