#!/usr/bin/env python
"""Search benchmark: every patient of a large practice to NDJSON through ModMedSearchResourcesOperator.

    python bench/bench_search_ndjson.py [--patients 50000] [--rate-limit 1000] [--data-dir DIR]

1. ``modmed-sandbox serve`` runs in its own process (seeding 50,000 patients takes ~30 s; with
   ``--data-dir`` the seeded store is kept and reused), rate-limited like ModMed (1,000 calls/min per API
   key by default).
2. This process runs the operator's ``execute`` (the code path of a real task: hook, connection, client,
   rate budget, paging, de-duplication, NDJSON writer) against it, with an Airflow connection given as an
   ``AIRFLOW_CONN_*`` variable.
3. Figures: peak memory growth of this process during the search (tracemalloc's peak of Python
   allocations, and the RSS high-water mark minus the RSS before; target < 100 MB), calls per minute
   against the budget, 429 answers (target 0: the client's own budget keeps it under the server's), and
   resources written vs the sandbox's ground truth.

No assertions: it prints the figures (and a last ``RESULT {json}`` line for tooling).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its high-water mark (``VmHWM``), in KiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs), so the peak is this run's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def start_sandbox(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    import httpx

    port = free_port()
    storage = free_port()
    cmd = [sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "serve", "--port", str(port),
           "--storage-port", str(storage), "--patients", str(args.patients), "--seed", "5",
           "--rate-limit-per-minute", str(args.rate_limit)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    log = (workdir / "sandbox.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/_sandbox/credentials"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the sandbox exited ({proc.returncode}); see {workdir / 'sandbox.log'}")
        try:
            credentials = httpx.get(url, timeout=2).json()
            break
        except httpx.HTTPError:
            if time.monotonic() - started > 600:
                proc.terminate()
                raise SystemExit("the sandbox did not start within 10 minutes") from None
            time.sleep(0.5)
    print(f"sandbox: {args.patients:,} patients ready in {time.monotonic() - started:.1f} s "
          f"(rate limit {args.rate_limit}/min)", flush=True)
    return proc, credentials


def stats(credentials: dict[str, Any]) -> dict[str, int]:
    import httpx

    return dict(httpx.get(credentials["api_url"] + "/_sandbox/stats", timeout=10).json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=50_000)
    parser.add_argument("--rate-limit", type=int, default=1000, help="calls/minute: server limit and client budget")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the seeded sandbox here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="modmed-bench-search-"))
    os.environ.setdefault("AIRFLOW_HOME", str(workdir / "airflow"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    proc, credentials = start_sandbox(args, workdir)
    try:
        conn = dict(credentials["airflow_connections"]["modmed_default"])
        conn["extra"] = {**conn["extra"], "rate_limit_per_minute": args.rate_limit}
        os.environ["AIRFLOW_CONN_MODMED_BENCH"] = json.dumps(conn)

        from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

        output = workdir / "Patient.ndjson"
        op = ModMedSearchResourcesOperator(task_id="bench", modmed_conn_id="modmed_bench", resource_type="Patient",
                                           output_path=str(output))
        op.hook.config  # read the connection before measuring  # noqa: B018
        before = stats(credentials)
        reset_hwm()
        rss_before = rss_kb()
        tracemalloc.start()
        traced_before, _ = tracemalloc.get_traced_memory()
        started = time.monotonic()
        result = op.execute({})
        elapsed = time.monotonic() - started
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_peak = rss_kb("VmHWM")
        after = stats(credentials)
    finally:
        proc.terminate()
        proc.wait(30)

    calls = after.get("requests:proprietary", 0) - before.get("requests:proprietary", 0)
    throttled = after.get("throttled", 0) - before.get("throttled", 0)
    per_minute = calls / elapsed * 60 if elapsed else 0.0
    traced_growth = (traced_peak - traced_before) / MB
    rss_growth = (rss_peak - rss_before) / 1024
    size = output.stat().st_size
    figures = {
        "patients": args.patients, "written": result["count"], "ids_returned": len(result["ids"]),
        "ids_truncated": result["ids_truncated"], "file_mb": round(size / MB, 1), "seconds": round(elapsed, 1),
        "calls": calls, "calls_per_minute": round(per_minute), "budget_per_minute": args.rate_limit,
        "throttled_429": throttled, "peak_python_alloc_growth_mb": round(traced_growth, 1),
        "peak_rss_growth_mb": round(rss_growth, 1), "target_mb": 100,
    }
    print(f"wrote {result['count']:,} of {args.patients:,} patients ({size / MB:.1f} MB NDJSON) in {elapsed:.1f} s")
    print(f"calls: {calls:,} in {elapsed:.1f} s = {per_minute:.0f}/min against a budget of {args.rate_limit}/min "
          f"(a moving window: runs under {args.rate_limit} calls go faster); 429 answers: {throttled}")
    print(f"peak memory growth: {traced_growth:.1f} MB of Python allocations (tracemalloc), "
          f"{rss_growth:.1f} MB RSS (target < 100 MB)")
    print("RESULT " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
