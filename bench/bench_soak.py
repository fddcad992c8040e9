"""Soak: many task processes against several practices for minutes, under a rain of faults.

Each practice is its own sandbox (its own API key) with a short rate window; every worker process runs
``ModMedSearchResourcesOperator.execute`` in a loop (as Airflow workers running many DAG runs would), all
sharing one Redis budget per API key through their connection's ``rate_limit_storage_uri``. A fault thread
keeps switching the sandbox's faults (429 storms without Retry-After, bursts of 5xx, dropped answers, expired
tokens, latency spikes). Every search's NDJSON file is checked against the sandbox's ground truth.

Figures: task runs, runs with every id exactly once, task retries (a run whose first try failed is tried once
more, as ``retries=1`` does), calls, calls per window against the budget, 429s earned
by exceeding the budget (target 0; injected storms are counted apart), client retries, faults injected.

    python bench/bench_soak.py                       # 3 minutes, 2 practices x 3 workers
    python bench/bench_soak.py --minutes 10 --practices 4 --workers 4
    python bench/run.py soak -- --minutes 1          # through the bench runner
Writes the figures to out/bench-soak.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

WINDOW = 10  # the sandbox's rate window (s); the client's is one second longer, as 61 s against 60 s


def child(spec: dict[str, Any]) -> None:
    """A worker: run the search operator until the deadline; print one JSON summary line."""
    import logging

    from airflow_provider_modmed.client import limiter

    limiter.SAFETY_WINDOW_SECONDS = WINDOW + 1
    from airflow_provider_modmed.operators.resources import ModMedSearchResourcesOperator

    retries = {"n": 0}

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "; retry " in record.getMessage():
                retries["n"] += 1

    logging.getLogger("airflow_provider_modmed.client").addHandler(Count())
    expected = sorted(spec["expected"])
    runs = exact = failed = task_retries = 0
    errors: dict[str, int] = {}
    while time.time() < spec["deadline"]:
        out = Path(spec["folder"]) / f"run-{runs:05d}.ndjson"
        runs += 1
        for attempt in (1, 2):  # the task's own retry (retries=1), as Airflow would run it
            op = ModMedSearchResourcesOperator(task_id="soak", modmed_conn_id=spec["conn_id"],
                                               resource_type="Patient", output_path=str(out), count=spec["page"])
            try:
                op.execute({"run_id": f"soak_{runs}"})
                break
            except Exception as exc:  # counted; the second attempt is the task retry
                key = f"{type(exc).__name__}: {str(exc)[:80]}"
                errors[key] = errors.get(key, 0) + 1
                if attempt == 2:
                    failed += 1
                else:
                    task_retries += 1
        else:
            continue
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()]
        exact += sorted(ids) == expected and len(ids) == len(set(ids))
        out.unlink()
    print("SUMMARY " + json.dumps({"runs": runs, "exact": exact, "failed": failed, "task_retries": task_retries,
                                   "retries": retries["n"], "errors": errors}), flush=True)


def fault_rain(sandboxes: list[Any], stop: threading.Event, injected: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    while not stop.wait(rng.uniform(0.5, 2.0)):
        sb = rng.choice(sandboxes)
        kind = rng.choice(["rate_storm", "fail_next", "drop_next", "expire_tokens", "latency"])
        injected[kind] = injected.get(kind, 0) + 1
        if kind == "rate_storm":
            sb.faults(rate_storm=rng.randint(1, 3))
        elif kind == "fail_next":
            sb.faults(fail_next={"status": rng.choice([500, 502, 503, 504]), "count": rng.randint(1, 3),
                                 "bodiless": rng.random() < 0.5})
        elif kind == "drop_next":
            sb.faults(drop_next=1)
        elif kind == "expire_tokens":
            sb.faults(expire_tokens=True)
        else:
            sb.faults(latency_ms=200)
            threading.Timer(1.0, lambda s=sb: s.faults(latency_ms=0)).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--practices", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3, help="worker processes per practice")
    parser.add_argument("--limit", type=int, default=60, help=f"calls per {WINDOW} s window per API key")
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--page", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    import logging
    import tempfile

    from _parts import redis_server

    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # the dropped answers are on purpose

    from airflow_provider_modmed.sandbox.app import _key_label
    from airflow_provider_modmed.sandbox.server import SandboxServer

    seconds = args.minutes * 60
    with redis_server() as redis_url, tempfile.TemporaryDirectory() as tmp:
        sandboxes = [SandboxServer(patients=args.patients, seed=1000 + n, rate_limit_per_minute=args.limit,
                                   rate_limit_window_seconds=WINDOW).start() for n in range(args.practices)]
        try:
            env = dict(os.environ)
            env.setdefault("AIRFLOW_HOME", str(Path(tmp) / "airflow-home"))
            procs = []
            deadline = time.time() + seconds
            for n, sb in enumerate(sandboxes):
                conn = json.loads(json.dumps(sb.credentials["airflow_connections"]["modmed_default"]))
                conn["extra"].update(rate_limit_per_minute=args.limit, rate_limit_storage_uri=redis_url)
                env[f"AIRFLOW_CONN_MODMED_SOAK_{n}"] = json.dumps(conn)
                expected = [r["id"] for r in sb.app_state.store.ground_truth("Patient") if not r["deleted"]]
                for w in range(args.workers):
                    folder = Path(tmp) / f"p{n}w{w}"
                    folder.mkdir()
                    spec = {"conn_id": f"modmed_soak_{n}", "deadline": deadline, "folder": str(folder),
                            "page": args.page, "expected": expected}
                    procs.append((n, subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)],
                                                      env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                                      stderr=subprocess.DEVNULL, text=True)))
            stop, injected = threading.Event(), {}
            rain = threading.Thread(target=fault_rain, args=(sandboxes, stop, injected, args.seed), daemon=True)
            started = time.monotonic()
            rain.start()
            summaries: list[tuple[int, dict[str, Any]]] = []
            for n, proc in procs:
                out, _ = proc.communicate(timeout=seconds + 300)
                line = next((x for x in reversed(out.splitlines()) if x.startswith("SUMMARY ")), None)
                summaries.append((n, json.loads(line[8:]) if line else {"runs": 0, "exact": 0, "failed": -1}))
            stop.set()
            rain.join()
            elapsed = time.monotonic() - started
            practices = []
            for n, sb in enumerate(sandboxes):
                stats = sb.stats()
                mine = [s for p, s in summaries if p == n]
                over_budget = sum(v for k, v in stats.items() if k.startswith("throttled:"))
                label = _key_label(sb.credentials["proprietary"]["api_key"])
                calls = stats.get(f"requests:{label}", 0)
                practices.append({
                    "practice": n, "workers": len(mine), "runs": sum(s["runs"] for s in mine),
                    "exactly_once": sum(s["exact"] for s in mine),
                    "failed_runs": sum(max(s["failed"], 0) for s in mine),
                    "calls": calls, "calls_per_window": round(calls / elapsed * WINDOW, 1),
                    "budget_per_window": args.limit, "429_over_budget": over_budget,
                    "429_injected_storms": stats.get("throttled", 0) - over_budget,
                    "client_retries": sum(s.get("retries", 0) for s in mine),
                    "task_retries": sum(s.get("task_retries", 0) for s in mine),
                    "errors": {k: v for s in mine for k, v in (s.get("errors") or {}).items()},
                })
        finally:
            for sb in sandboxes:
                sb.stop()
    figures = {"minutes": args.minutes, "seconds": round(elapsed, 1), "practices": practices,
               "faults_injected": injected}
    print(f"soak: {args.practices} practices x {args.workers} workers, {elapsed:.0f} s, faults {injected}")
    print("| practice | task runs | exactly once | task retries | failed after retry | calls | calls/window (budget) "
          "| 429 over budget | injected 429 | client retries |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in practices:
        print(f"| {p['practice']} | {p['runs']} | {p['exactly_once']} | {p['task_retries']} | {p['failed_runs']} | "
              f"{p['calls']} | {p['calls_per_window']} ({p['budget_per_window']}) | {p['429_over_budget']} | "
              f"{p['429_injected_storms']} | {p['client_retries']} |")
    out = ROOT / "out" / "bench-soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    ok = all(p["429_over_budget"] == 0 and p["runs"] == p["exactly_once"] + p["failed_runs"] and p["runs"] > 0
             for p in practices)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
