"""Rate-budget use against the sandbox: how much of ModMed's per-key budget the client really uses.

Scenario 1: one process, the async client, 100 ms server latency, a 1,000/min budget.
Scenario 2: four worker processes sharing one Redis-backed budget.

Figure: budget use = calls answered 200 during the run divided by what the budget allows over the
run's length (budget x duration / window); targets >= 0.95 for one process and >= 0.90 for four; and
the number of 429s the sandbox answered (target: 0). The run lasts three windows and a bit, so the
first window's burst does not flatter the figure.
``--window 10`` shortens the server's window (the budget scales with it) for a quick run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parts import redis_server
from limits import RateLimitItemPerSecond

from airflow_provider_modmed.client import AsyncFhirClient, ClientConfig, RateBudget
from airflow_provider_modmed.sandbox.server import SandboxServer


async def hammer(config: ClientConfig, budget: RateBudget, seconds: float, concurrency: int) -> list[float]:
    """Send reads until the deadline; return the send time of each call."""
    sent: list[float] = []
    deadline = time.time() + seconds
    async with AsyncFhirClient(config, budget=budget) as client:
        async def one_worker() -> None:
            while time.time() < deadline:
                request = client.http.build_request("GET", f"{config.fhir_base}/Patient/1")
                response = await client.send(request)
                if response.status_code == 200:
                    sent.append(time.time())

        await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    return sent


def process_main(config: ClientConfig, storage: str, limit: int, window: int, seconds: float, concurrency: int,
                 out: Any) -> None:
    budget = RateBudget(RateLimitItemPerSecond(limit, window + 1), storage, config.budget_key)
    out.put(asyncio.run(hammer(config, budget, seconds, concurrency)))


def budget_use(sent: list[float], seconds: float, window: float, limit: int) -> float:
    return len(sent) / (limit * seconds / window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=60, help="server window, seconds (ModMed: 60)")
    parser.add_argument("--per-minute", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    limit = max(1, round(args.per_minute * args.window / 60))
    seconds = 3 * args.window + 3
    rows = []
    with SandboxServer(patients=2, rate_limit_per_minute=limit, rate_limit_window_seconds=args.window,
                       latency_ms=args.latency_ms) as sb, redis_server() as redis_url:
        conn = sb.credentials["proprietary"]
        config = ClientConfig(track="proprietary", fhir_base=conn["fhir_base"], firm="apiportal",
                              api_key=conn["api_key"], username=conn["username"], password=conn["password"],
                              max_retries=0)
        for name, procs, storage, concurrency in (("1 process, async, memory://", 1, "memory://", 8),
                                                  ("4 processes, redis://", 4, redis_url, 4)):
            time.sleep(args.window + 1 if rows else 0)  # let the server's window empty between scenarios
            sb.reset_stats()
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            workers = [ctx.Process(target=process_main, args=(config, storage, limit, args.window, seconds,
                                                              concurrency, out)) for _ in range(procs)]
            for w in workers:
                w.start()
            sent = [t for _ in workers for t in out.get(timeout=seconds + 120)]
            for w in workers:
                w.join(30)
            use = budget_use(sent, seconds, args.window, limit)
            throttled = sb.stats().get("throttled", 0)
            rows.append((name, len(sent), use, throttled))
            print(f"{name}: {len(sent)} calls in {seconds}s; used {use:.3f} of the budget "
                  f"({limit}/{args.window}s); 429s: {throttled}", flush=True)
    print("\nscenario | calls | budget use | 429s")
    for name, calls, use, throttled in rows:
        print(f"{name} | {calls} | {use:.3f} | {throttled}")


if __name__ == "__main__":
    main()
