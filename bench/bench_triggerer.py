#!/usr/bin/env python
"""Triggerer capacity: how many change streams (practice x resource type) one triggerer process watches.

    python bench/bench_triggerer.py                                # the full size: 5,000 streams, 60 s cadence
    python bench/bench_triggerer.py --streams 1000 --interval 10   # reduced (about 4 minutes)

A sandbox (``modmed-sandbox serve``) runs in its own process. For each mode a fresh Python process (the
"triggerer") imports Airflow and the provider, then runs ``--streams`` :class:`ModMedChangesEventTrigger`
poll loops in one asyncio event loop, as a triggerer's trigger runner does, through Airflow's connection
API (``AIRFLOW_CONN_*``). Streams spread over ``--connections`` connections (practices) and five resource
types; each trigger has ``share_stream=False`` so that every one is its own stream with its own poll loop
(many watchers of ONE stream share a loop: tests/airflow/test_triggerer_sharing.py counts that at the
sandbox). Starts are staggered over one cadence, as triggers arrive over time in a real triggerer.

Modes: ``shared`` (the provider as it is: one client, connection pool and TLS context per connection in
the event loop) and ``unshared`` (each trigger builds its own client: the code before sharing, put back
by this script; at its default of at most 300 streams, since building an ``httpx.AsyncClient`` costs
about 24 ms of CPU (its TLS context loads the CA bundle) on the event loop, so 1,000 triggers arriving
within a 10 s cadence keep the loop saturated and their polls never start on time). Figures per mode:

* RSS: after imports (baseline), peak (VmHWM), and (peak - baseline) / streams;
* CPU per idle poll: the process's CPU time over ``--measure`` cadences / the polls in them (nothing
  changes in the sandbox while measuring, so every poll is idle);
* lag: how late each poll starts against its cadence (``start - previous start - interval``; the loop
  sleeps one interval after a poll, so lag = the poll's own duration + the event loop's lateness),
  p50 / p99 / max; "within cadence" when the max lag stays under one interval;
* poll duration p50 / p99 and the sandbox's FHIR requests per poll.

No assertions: it prints a table, the ratios shared vs unshared, and a last ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parts import free_port  # noqa: E402

#: proprietary-track types that support ``_lastUpdated`` (no scans): the streams cycle over them
TYPES = ("Patient", "Appointment", "Encounter", "Practitioner", "Location")
#: the triggers' budget: high enough that the bench measures the triggerer, not the rate limit
BUDGET = 10_000_000


def proc_status(field: str) -> float:
    """A VmRSS / VmHWM figure of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- the triggerer process --------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import airflow.sdk  # noqa: F401  (what a triggerer has loaded before any trigger runs)

    from airflow_provider_modmed.hooks.modmed import ModMedHook
    from airflow_provider_modmed.triggers import changes as trig
    from airflow_provider_modmed.triggers.changes import ModMedChangesEventTrigger

    if args.mode == "unshared":  # the code before sharing: a client (pool, TLS context) per trigger
        @contextlib.asynccontextmanager
        async def own_client(conn_id: str) -> Any:
            client = await ModMedHook(conn_id).get_async_client()
            try:
                yield client
            finally:
                await client.aclose()

        trig._client = own_client

    interval = args.interval
    polls: list[tuple[float, float, float, int]] = []  # (start, lag, duration, changes) per poll
    last_start: dict[int, float] = {}
    started = [0]  # every poll, the first of each stream (its baseline) included
    original = trig.apoll_changes

    async def timed_poll(client: Any, query: Any, cursor: Any, **kwargs: Any) -> Any:
        task = id(asyncio.current_task())
        start = time.monotonic()
        started[0] += 1
        result = await original(client, query, cursor, **kwargs)
        previous = last_start.get(task)
        last_start[task] = start
        if previous is not None:
            polls.append((start, start - previous - interval, time.monotonic() - start, len(result.changes)))
        return result

    trig.apoll_changes = timed_poll
    baseline = proc_status("VmRSS")

    async def stream(i: int) -> None:
        await asyncio.sleep(i * interval / args.streams)  # staggered over one cadence
        trigger = ModMedChangesEventTrigger(
            resource_type=TYPES[i % len(TYPES)], modmed_conn_id=f"modmed_bench_{i % args.connections}",
            poll_interval=interval, lookback=1, share_stream=False)
        async for _ in trigger.run():
            pass

    async def main() -> dict[str, Any]:
        tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
        await asyncio.sleep(interval * 3)  # all started, each past its baseline and first lagged poll
        cpu0, t0, n0 = time.process_time(), time.monotonic(), len(polls)
        await asyncio.sleep(interval * args.measure)
        cpu1, t1, n1 = time.process_time(), time.monotonic(), len(polls)
        failed = [t for t in tasks if t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        window = polls[n0:n1]
        lags = [p[1] for p in window]
        durations = [p[2] for p in window]
        return {
            "mode": args.mode, "streams": args.streams, "connections": args.connections, "interval_s": interval,
            "rss_baseline_mb": round(baseline, 1), "rss_peak_mb": round(proc_status("VmHWM"), 1),
            "rss_per_stream_mb": round((proc_status("VmHWM") - baseline) / args.streams, 3),
            "polls": n1 - n0, "polls_with_changes": sum(1 for p in window if p[3]),
            "cpu_ms_per_poll": round((cpu1 - cpu0) * 1000 / max(1, n1 - n0), 3),
            "cpu_share": round((cpu1 - cpu0) / (t1 - t0), 3),
            "lag_p50_s": round(quantile(lags, 0.5), 3), "lag_p99_s": round(quantile(lags, 0.99), 3),
            "lag_max_s": round(max(lags, default=float("nan")), 3),
            "poll_p50_ms": round(quantile(durations, 0.5) * 1000, 1),
            "poll_p99_ms": round(quantile(durations, 0.99) * 1000, 1),
            "streams_stopped_early": len(failed), "polls_total": started[0],
        }

    print("CHILD " + json.dumps(asyncio.run(main())), flush=True)


# -- the orchestrator -------------------------------------------------------------------------------
def start_sandbox(workdir: Path, patients: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = Path(sys.executable).parent / "modmed-sandbox"
    proc = subprocess.Popen([str(binary), "serve", "--port", str(port), "--storage-port", str(free_port()),
                             "--patients", str(patients), "--rate-limit-per-minute", str(BUDGET)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "sandbox.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/_sandbox/credentials", timeout=2).status_code == 200:
                return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the sandbox did not start: see {workdir / 'sandbox.log'}")


def fhir_requests(url: str) -> int:
    return int(httpx.get(f"{url}/_sandbox/stats", timeout=10).json().get("requests:proprietary", 0))


def run_mode(mode: str, streams: int, args: argparse.Namespace, env: dict[str, str], url: str) -> dict[str, Any]:
    before = fhir_requests(url)
    out = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--streams", str(streams),
                          "--connections", str(args.connections), "--interval", str(args.interval),
                          "--measure", str(args.measure)], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")), None)
    if line is None:
        raise SystemExit(f"the {mode} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(line[len("CHILD "):])
    result["sandbox_requests"] = fhir_requests(url) - before
    result["requests_per_poll"] = round(result["sandbox_requests"] / max(1, result["polls_total"]), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000, help="change streams in the shared run")
    parser.add_argument("--unshared-streams", type=int, default=None,
                        help="streams in the unshared run (default: --streams, at most 300: beyond that, "
                             "building a client per trigger, ~24 ms of CPU each, saturates the event loop)")
    parser.add_argument("--connections", type=int, default=10, help="connections (practices) they spread over")
    parser.add_argument("--interval", type=float, default=60.0, help="poll cadence in seconds (ModMed: 60)")
    parser.add_argument("--measure", type=int, default=3, help="cadences measured after three of warm-up")
    parser.add_argument("--modes", default="unshared,shared")
    parser.add_argument("--patients", type=int, default=10, help="seeded patients in the sandbox")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="shared", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory(prefix="modmed-bench-triggerer-") as tmp:
        workdir = Path(tmp)
        sandbox, url = start_sandbox(workdir, args.patients)
        try:
            creds = httpx.get(f"{url}/_sandbox/credentials", timeout=10).json()
            base = creds["airflow_connections"]["modmed_default"]
            env = {**os.environ, "AIRFLOW_HOME": str(workdir / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
            for i in range(args.connections):  # one connection per "practice" (the sandbox serves one firm)
                conn = {**base, "extra": {**base["extra"], "rate_limit_per_minute": BUDGET}}
                env[f"AIRFLOW_CONN_MODMED_BENCH_{i}"] = json.dumps(conn)
            results = []
            for mode in args.modes.split(","):
                streams = args.streams if mode == "shared" else (args.unshared_streams or min(args.streams, 300))
                print(f"running {mode}: {streams} streams over {args.connections} connections, "
                      f"{args.interval:g} s cadence ...", flush=True)
                results.append(run_mode(mode, streams, args, env, url))
        finally:
            sandbox.terminate()
            sandbox.wait(20)

    cols = ("mode", "streams", "rss_baseline_mb", "rss_peak_mb", "rss_per_stream_mb", "cpu_ms_per_poll",
            "polls", "lag_p50_s", "lag_p99_s", "lag_max_s", "poll_p50_ms", "poll_p99_ms", "requests_per_poll",
            "streams_stopped_early")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]!s:>14}" for c in cols))
    by_mode = {r["mode"]: r for r in results}
    ratios: dict[str, float] = {}
    if {"shared", "unshared"} <= by_mode.keys():
        s, u = by_mode["shared"], by_mode["unshared"]
        ratios = {"rss_per_stream_unshared_over_shared": round(u["rss_per_stream_mb"] / s["rss_per_stream_mb"], 2),
                  "cpu_per_poll_unshared_over_shared": round(u["cpu_ms_per_poll"] / s["cpu_ms_per_poll"], 2)}
        print(f"RSS per stream: unshared / shared = {ratios['rss_per_stream_unshared_over_shared']}x; "
              f"CPU per idle poll: unshared / shared = {ratios['cpu_per_poll_unshared_over_shared']}x")
    for r in results:
        print(f"{r['mode']}: {'every poll within its cadence' if r['lag_max_s'] < r['interval_s'] else 'LATE polls'}"
              f" (max lag {r['lag_max_s']} s at a {r['interval_s']:g} s cadence); projected at 5,000 streams: "
              f"{r['rss_baseline_mb'] + 5000 * r['rss_per_stream_mb']:.0f} MB RSS")
    print("RESULT " + json.dumps({"runs": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
