"""A worker process for the kill and load tests: runs one ModMed operator's ``execute`` and prints its result.

    python -m tests.reliability.worker '{"operator": "search", "kwargs": {...}, "window_seconds": 5}'

Connections come from ``AIRFLOW_CONN_*`` variables, as in a real worker. ``window_seconds`` shortens the
client's rate-budget window (``limiter.SAFETY_WINDOW_SECONDS``, 61 s in production) so a test can exhaust
and refill a budget in seconds; ``rate_limit_per_minute`` then counts per that window. The result is the
last line of stdout, prefixed ``RESULT``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class _TaskInstance:
    """What ``execute`` uses of ``context["ti"]`` outside a task runner."""

    map_index = -1

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("window_seconds"):
        from airflow_provider_modmed.client import limiter

        limiter.SAFETY_WINDOW_SECONDS = int(spec["window_seconds"])
    kind, kwargs = spec["operator"], dict(spec.get("kwargs") or {})
    op: Any
    if kind == "search":
        from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

        op = ModMedSearchResourcesOperator(task_id="search", **kwargs)
    elif kind == "create":
        from airflow_provider_modmed.operators.resources import ModMedCreateResourceOperator

        op = ModMedCreateResourceOperator(task_id="create", **kwargs)
    elif kind == "upload":
        from airflow_provider_modmed.operators.documents import ModMedDocumentUploadOperator

        op = ModMedDocumentUploadOperator(task_id="upload", **kwargs)
    elif kind == "bulk":
        from airflow_provider_modmed.operators.bulk_export import ModMedBulkExportOperator

        op = ModMedBulkExportOperator(task_id="bulk", **kwargs)
    else:
        raise SystemExit(f"unknown operator {kind!r}")
    ti = _TaskInstance(op.task_id)
    context = {"ti": ti, "run_id": spec.get("run_id", "manual__reliability"), "dag_run": None}
    started = time.monotonic()
    result = op.execute(context)
    return {"result": result, "xcom": ti.xcom, "seconds": round(time.monotonic() - started, 3)}


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    sys.stdout.flush()
    print("RESULT " + json.dumps(out, default=str), flush=True)
