#!/usr/bin/env python
"""The scale scenario on the production-shaped stack (scripts/scale.py), at the full size.

    python bench/bench_stack.py                        # 20 practices, ModMed's 1,000 calls/min per key
    python bench/bench_stack.py --rate-limit 12 --poll-interval 60   # a budget that binds (about 10 minutes)

Starts Postgres, Redis, moto S3, the sandbox serving ``--practices`` practices and a CeleryExecutor Airflow
(api-server, scheduler, dag-processor, triggerer, two workers); runs the watchers (practices x 3 types in
the triggerer), the many-practices DAG over every practice to S3 and the write-back DAG once per practice,
SIGKILLs one Celery worker mid-run, and prints the findings against the sandbox's ground truth: per API
key the calls, 429s and the most calls in any 60 s window; Appointments in S3 exactly once per practice;
write-back rows exactly once; wall times against pages / budget. The last line is ``RESULT {json}``.
No assertions (tests/stack/test_scale.py asserts the reduced size).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.scale import ScaleSize, run_scale
from scripts.stack import StackConfig, missing_parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--practices", type=int, default=20)
    parser.add_argument("--rate-limit", type=int, default=1000, help="calls per minute per API key")
    parser.add_argument("--poll-interval", type=float, default=15.0, help="the watchers' cadence (s)")
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--no-kill", action="store_true", help="do not kill a Celery worker")
    args = parser.parse_args()
    missing = missing_parts()
    if missing:
        print(f"skipped: the stack needs {', '.join(missing)} (make system-deps; make venv)")
        return 0
    size = StackConfig(practices=args.practices, rate_limit_per_minute=args.rate_limit, patients=args.patients,
                       watch_poll_interval=args.poll_interval, heartbeat_timeout=30)
    started = time.monotonic()
    f = run_scale(size, ScaleSize(kill_worker=not args.no_kill, timeout=1800),
                  report=lambda line: print(line, flush=True))
    many, wb, budget, kill, watchers = (f["many_practices"], f["write_back"], f["budget"], f["kill"],
                                        f["watchers"])
    per_firm = budget["per_firm"].values()
    print(f"\npractices: {size.practices}; budget {size.rate_limit_per_minute} calls/min per API key; "
          f"watchers {watchers['streams']} streams every {size.watch_poll_interval:g}s")
    print(f"stack up + scenario + stop: {time.monotonic() - started:.0f}s (scenario {f['wall_s']:.0f}s)")
    print(f"kill: {kill['killed']} with {kill.get('running_at_kill')} task instances running; "
          f"{kill.get('retried_task_instances')} task instances retried")
    print(f"per API key: calls {min(x['calls'] for x in per_firm)}-{max(x['calls'] for x in per_firm)}, "
          f"most in any 60 s window {budget['max_peak_window']} (budget {budget['limit_per_minute']}), "
          f"429s {budget['throttled']}")
    print(f"many-practices: {many['state']} in {many['wall_s']:.0f}s; {many['appointments']} appointments; "
          f"exactly once in S3 for {len(many['exact'])}/{many['practices']} practices")
    batch = f["batch"]
    print(f"many-practices + write-back batch: {batch['wall_s']:.0f}s wall for at most "
          f"{batch['most_calls_per_key']} calls per key; the budget alone needs {batch['budget_floor_s']:.0f}s")
    print(f"write-back: runs {wb['states']}; {wb['created']} rows created, {wb['duplicated']} duplicated, "
          f"{len(wb['incomplete'])} practices incomplete")
    print(f"watchers: {watchers['changed']} changes made, {watchers['recorded']} recorded in S3, "
          f"{len(watchers['missing'])} practices missing some")
    print("RESULT " + json.dumps(f, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
