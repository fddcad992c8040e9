#!/usr/bin/env python
"""Bulk export benchmark: our export + streaming download vs curl fetching the same files, and our memory.

    python bench/bench_bulk_export.py [--gb 1.0] [--concurrency 4] [--rounds 2] [--data-dir DIR]

1. Prepare (in a subprocess, cached in ``--data-dir``): a sandbox SQLite store holding at least ``--gb`` of
   certified-track resources. Seeding 100k+ patients through the seeder takes minutes, so a small practice
   is seeded (``--base-patients``) and its rows are replicated in SQL under new ids (system-level exports
   only select on type and ``seq``; the search-parameter table is not needed). Bench-only: it writes the
   sandbox's table directly.
2. Serve it with ``modmed-sandbox serve`` in its own process (the client must not share a GIL with it).
3. Per round: kick off a system-level ``$export`` and poll it (our client), then fetch every file of the
   manifest with ``curl --parallel`` (same concurrency), then let our client store the same files
   (streamed, every line verified, sha256, temp file + rename, checkpoints). Throughput ratio =
   curl time / our time for the same bytes (target >= 0.8). The best round of each is compared.
4. Peak memory: this process's peak RSS (``ru_maxrss``) around our downloads (target < 200 MB whatever the
   export size). The sandbox and curl run in other processes and are not counted.
5. Chunk sizes (``--chunks``, on by default): some servers send one HTTP chunk per resource (~700 bytes).
   With the sandbox's ``bulk_chunk_lines`` fault at 1 (small chunks) and 0 (large chunks), each with and
   without its ``bulk_gzip`` fault, one fresh export each: a bare httpx stream of every file (read and
   dropped: the floor the HTTP stack sets) and then our client storing the same files. Figures are this
   process's CPU seconds per GB of NDJSON, and ratios to the bare httpx stream of small chunks.

No assertions: it prints the figures. Nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- 1. prepare the store (runs in a subprocess) -----------------------------------------------------

def prepare(data_dir: Path, gb: float, base_patients: int) -> None:
    from airflow_provider_modmed.capabilities import MATRIX
    from airflow_provider_modmed.sandbox.seed import generate
    from airflow_provider_modmed.sandbox.store import Store

    marker = data_dir / f"bench-{gb:g}gb-{base_patients}.ok"
    if marker.exists():
        print(f"prepare: reusing {data_dir}", flush=True)
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    started = time.monotonic()
    store = Store(data_dir / "sandbox.sqlite3")
    store.load(generate(patients=base_patients, seed=1))
    db = store._db  # bench-only: replicate rows in SQL (see the module docstring)
    certified = [t for t, spec in MATRIX.items() if spec.certified]
    marks = ",".join("?" * len(certified))
    count, size = db.execute(f"SELECT COUNT(*), SUM(LENGTH(body)) FROM resources WHERE type IN ({marks})",  # noqa: S608
                             certified).fetchone()
    copies = max(0, int(gb * 1e9 / size + 0.999) - 1)
    max_seq = db.execute("SELECT MAX(seq) FROM resources").fetchone()[0]
    print(f"prepare: {count} base resources ({size / 1e6:.1f} MB certified) x {copies + 1} copies", flush=True)
    db.execute("BEGIN")
    for k in range(1, copies + 1):
        # '{"resourceType":"T","id":"X"...' -> '{"resourceType":"T","id":"X-cK"...'
        db.execute(
            f"""INSERT INTO resources (type, id, seq, version, lu_ms, deleted, body)
                SELECT type, id || '-c{k}', seq + {k * max_seq}, version, lu_ms, deleted,
                       '{{"resourceType":"' || type || '","id":"' || id || '-c{k}"' ||
                       substr(body, length('{{"resourceType":"' || type || '","id":"' || id || '"') + 1)
                FROM resources WHERE seq <= {max_seq} AND type IN ({marks})""", certified)  # noqa: S608
    db.execute("COMMIT")
    total = db.execute(f"SELECT COUNT(*), SUM(LENGTH(body)) FROM resources WHERE type IN ({marks})",  # noqa: S608
                       certified).fetchone()
    store.close()
    marker.write_text(json.dumps({"resources": total[0], "bytes": total[1]}))
    print(f"prepare: {total[0]} resources, {total[1] / 1e9:.2f} GB of NDJSON in {time.monotonic() - started:.0f} s",
          flush=True)


# -- 2. the sandbox in its own process ---------------------------------------------------------------

def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return int(port)
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")


def start_sandbox(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    port = free_port_pair()
    proc = subprocess.Popen([sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "serve",
                             "--data-dir", str(data_dir), "--port", str(port), "--export-seconds", "0.5",
                             "--rate-limit-per-minute", "1000000", "--presign-ttl", "3600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    api = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            return proc, httpx.get(f"{api}/_sandbox/credentials", timeout=2).json()
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start") from None
            time.sleep(0.2)


# -- 3. the measurements ---------------------------------------------------------------------------------

def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def curl_fetch(urls: list[str], folder: Path, concurrency: int) -> tuple[float, int]:
    folder.mkdir(parents=True)
    config = folder / "curl.cfg"
    with config.open("w") as fh:
        for i, url in enumerate(urls):
            fh.write(f'url = "{url}"\noutput = "{folder}/{i}.ndjson"\n')
    started = time.monotonic()
    subprocess.run(["curl", "--parallel", "--parallel-max", str(concurrency), "--no-progress-meter", "--silent",
                    "--show-error", "--fail", "-H", "Accept: application/fhir+ndjson", "--config", str(config)],
                   check=True)
    elapsed = time.monotonic() - started
    size = sum(p.stat().st_size for p in folder.glob("*.ndjson"))
    shutil.rmtree(folder)
    return elapsed, size


def set_faults(api: str, **faults: Any) -> None:
    httpx.post(f"{api}/_sandbox/faults", json=faults, timeout=10).raise_for_status()


def bare_httpx(urls: list[str], concurrency: int, gzip: bool) -> tuple[float, int]:
    """CPU seconds of a bare httpx stream of every file (``iter_bytes``, dropped), and the decoded bytes."""
    headers = {"Accept": "application/fhir+ndjson", "Accept-Encoding": "gzip" if gzip else "identity"}
    with httpx.Client(timeout=120) as http:
        def one(url: str) -> int:
            size = 0
            with http.stream("GET", url, headers=headers) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    size += len(chunk)
            return size

        cpu = time.process_time()
        with ThreadPoolExecutor(concurrency) as pool:
            size = sum(pool.map(one, urls))
        return time.process_time() - cpu, size


def chunk_sizes(client: Any, api: str, work: Path, concurrency: int) -> None:
    """Step 5: CPU per GB with small and large chunks, with and without gzip, bare httpx vs ours (and ours
    with ``block_bytes=1``: every network chunk written, hashed and checked as it comes, as before)."""
    from airflow_provider_modmed.client.bulk import BulkExportClient, DownloadPolicy, ExportRequest, ExportRun

    per_chunk = BulkExportClient(client.client, poll=client.poll_policy,
                                 download=DownloadPolicy(concurrency=concurrency, block_bytes=1))
    figures: dict[tuple[str, str, str], float] = {}
    size = 0

    def ready(bulk: Any, label: str) -> tuple[list[str], str, Any]:
        """A fresh export (each finish() releases its job): its file URLs, status URL and run folder."""
        request = ExportRequest()
        status_url = bulk.kick_off(request)
        urls = [i.url for i in bulk.poll(status_url).items]
        run = ExportRun(work / label, request)
        run.kicked_off(status_url)
        return urls, status_url, run

    for gzip in (False, True):
        enc = "gzip" if gzip else "identity"
        for chunks, lines in (("small", 1), ("large", 0)):
            set_faults(api, bulk_chunk_lines=lines, bulk_gzip=gzip)
            clients = [("ours", client)] + ([("ours, block_bytes=1", per_chunk)] if chunks == "small" else [])
            for n, (who, bulk) in enumerate(clients):
                urls, status_url, run = ready(bulk, f"chunks-{chunks}-{enc}-{n}")
                if n == 0:
                    bare_cpu, size = bare_httpx(urls, concurrency, gzip)
                    figures["bare httpx", chunks, enc] = bare_cpu / (size / 1e9)
                cpu = time.process_time()
                result = bulk.finish(run, status_url)
                cpu = time.process_time() - cpu
                shutil.rmtree(run.folder)
                assert result["bytes"] == size, (result["bytes"], size)
                figures[who, chunks, enc] = cpu / (size / 1e9)
            print(f"chunks {chunks} ({enc}): " + ", ".join(
                f"{who} {figures[who, chunks, enc]:.1f} s/GB" for who in ("bare httpx", *(w for w, _ in clients))),
                flush=True)
    set_faults(api, bulk_chunk_lines=0, bulk_gzip=False)
    print()
    print(f"client CPU per GB of NDJSON ({size / 1e6:.0f} MB, concurrency {concurrency}); ratio to the bare "
          "httpx stream of small chunks (the floor)")
    rows = (("bare httpx", "small"), ("ours", "small"), ("ours, block_bytes=1", "small"), ("bare httpx", "large"),
            ("ours", "large"))
    for enc in ("identity", "gzip"):
        floor = figures["bare httpx", "small", enc]
        for who, chunks in rows:
            value = figures[who, chunks, enc]
            print(f"  {enc:8}  {who:19}  {chunks} chunks  {value:5.1f} s/GB  {value / floor:4.2f}x")
    for enc in ("identity", "gzip"):
        print(f"  {enc:8}  ours small / ours large chunks  "
              f"{figures['ours', 'small', enc] / figures['ours', 'large', enc]:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="NDJSON to export (default 1.0)")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel downloads, ours and curl's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-patients", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "modmed-bench-bulk")
    shm = Path("/dev/shm")
    parser.add_argument("--work-dir", type=Path, default=shm if shm.is_dir() else None,
                        help="where both curl and we write the files (default: /dev/shm, so the VM's disk "
                        "writeback does not decide the result)")
    parser.add_argument("--pin", action="store_true", help="pin the sandbox to CPU 0 and this process and "
                        "curl to the other CPUs (models a remote server)")
    parser.add_argument("--no-chunks", dest="chunks", action="store_false",
                        help="skip step 5 (small vs large HTTP chunks, with and without gzip)")
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = args.data_dir / f"{args.gb:g}gb"
    if args.prepare_only:
        prepare(data_dir, args.gb, args.base_patients)
        return 0
    if shutil.which("curl") is None:
        print("curl is not installed")
        return 2
    # the store is built in a subprocess so its memory does not count as ours
    subprocess.run([sys.executable, __file__, "--prepare-only", "--gb", str(args.gb), "--base-patients",
                    str(args.base_patients), "--data-dir", str(args.data_dir)], check=True)

    from airflow_provider_modmed.client.bulk import (
        BulkExportClient,
        DownloadPolicy,
        ExportRequest,
        ExportRun,
        PollPolicy,
    )
    from airflow_provider_modmed.client.config import ClientConfig
    from airflow_provider_modmed.client.fhir import FhirClient

    proc, creds = start_sandbox(data_dir)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(tid), {cpus[0]})
        os.sched_setaffinity(0, set(cpus[1:]))  # inherited by curl
    work = Path(tempfile.mkdtemp(prefix="modmed-bench-", dir=args.work_dir))
    rows: list[dict[str, float]] = []
    try:
        c = creds["certified"]
        key = c["private_key_jwt"]
        config = ClientConfig(track="certified", fhir_base=c["fhir_base"], auth_method="private_key_jwt",
                              client_id=key["client_id"], private_key=key["private_key"], key_id=key["key_id"],
                              scope="system/*.read", timeout=120)
        baseline = rss_mb()
        with FhirClient(config) as fhir:
            client = BulkExportClient(fhir, poll=PollPolicy(min_wait=0.2, max_wait=1.0),
                                      download=DownloadPolicy(concurrency=args.concurrency))
            for n in range(1, args.rounds + 1):
                request = ExportRequest()
                started = time.monotonic()
                status_url = client.kick_off(request)
                manifest = client.poll(status_url)
                server = time.monotonic() - started
                urls = [i.url for i in manifest.items]
                curl_s, curl_bytes = curl_fetch(urls, work / f"curl-{n}", args.concurrency)
                folder = work / f"ours-{n}"
                run = ExportRun(folder, request)
                run.kicked_off(status_url)
                started, cpu = time.monotonic(), time.process_time()
                result = client.finish(run, status_url)
                ours_s, cpu = time.monotonic() - started, time.process_time() - cpu
                shutil.rmtree(folder)
                row = {"round": n, "files": len(urls), "bytes": result["bytes"], "curl_bytes": curl_bytes,
                       "resources": result["resources"], "server_s": server, "curl_s": curl_s, "ours_s": ours_s,
                       "cpu_s": cpu, "rss_mb": rss_mb()}
                rows.append(row)
                print(f"round {n}: {len(urls)} files, {result['bytes'] / 1e9:.2f} GB, {result['resources']} "
                      f"resources | server job {server:.1f} s | curl {curl_s:.1f} s "
                      f"({curl_bytes / curl_s / 1e6:.0f} MB/s) | ours {ours_s:.1f} s "
                      f"({result['bytes'] / ours_s / 1e6:.0f} MB/s, CPU {cpu:.1f} s) | ratio {curl_s / ours_s:.2f} | "
                      f"peak RSS {row['rss_mb']:.0f} MB", flush=True)
            if args.chunks:
                chunk_sizes(client, creds["api_url"], work, args.concurrency)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    if not rows:
        return 0
    best_curl = min(r["curl_s"] for r in rows)
    best_ours = min(r["ours_s"] for r in rows)
    size = rows[0]["bytes"]
    ratio = best_curl / best_ours
    median = statistics.median(r["curl_s"] / r["ours_s"] for r in rows)
    peak = max(r["rss_mb"] for r in rows)
    load = os.getloadavg()[0]
    print()
    print(f"machine              {os.cpu_count()} CPUs, load average {load:.1f}{', pinned' if args.pin else ''}; "
          f"files written to {args.work_dir or tempfile.gettempdir()}")
    print(f"export size          {size / 1e9:.2f} GB NDJSON, {rows[0]['resources']:.0f} resources, "
          f"{rows[0]['files']:.0f} files, concurrency {args.concurrency}")
    print(f"server job (kick-off + polls)  {min(r['server_s'] for r in rows):.1f} s")
    print(f"curl --parallel      {size / best_curl / 1e6:.0f} MB/s  ({best_curl:.1f} s, best round)")
    print(f"ours (stream+verify+sha256+rename+checkpoint)  {size / best_ours / 1e6:.0f} MB/s  ({best_ours:.1f} s, "
          f"best round; client CPU {min(r['cpu_s'] for r in rows) / (size / 1e9):.1f} s per GB)")
    print(f"throughput ratio     {ratio:.2f} best/best, {median:.2f} median of paired rounds "
          f"(target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    print(f"peak RSS             {peak:.0f} MB (baseline after imports {baseline:.0f} MB; target < 200 MB: "
          f"{'met' if peak < 200 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
