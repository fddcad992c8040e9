"""Redis, which holds the rate budget shared by every worker, goes away mid-run.

Decision: fail clearly. A worker that silently fell back to a budget of its own would multiply the request
rate by the number of workers and earn the practice's API key 429s (or a suspension); so the limiter raises
``TransportError`` naming the extra field ``rate_limit_storage_uri`` and sends nothing more, the task fails
(and is retried by Airflow's own retries, not by the client), and the next run works once Redis is back."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.ndjson import search_to_ndjson
from airflow_provider_modmed.errors import TransportError
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import free_port, require_binary
from tests.reliability._figures import Figures
from tests.reliability.conftest import client, is_page, live, ndjson_ids, on_request, prop_config

pytestmark = pytest.mark.integration

DAGS = Path(__file__).parent / "dags" / "reliability_dags.py"


class Redis:
    """A redis-server of this test's own (the session's is shared by other tests): stop and start it."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # gone at once, as a crashed or unreachable Redis
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_gone_mid_search_fails_clearly_and_sends_nothing_more(sb: SandboxServer, redis: Redis,
                                                                     tmp_path: Path, figures: Figures) -> None:
    config = prop_config(sb, rate_limit_storage_uri=redis.url)
    sent_after_kill: list[int] = []

    def kill() -> None:
        redis.stop()
        sent_after_kill.append(sb.stats()["requests"])

    with client(config) as c, figures.measure(sb) as m:
        pages = on_request(c, is_page("Patient"), kill, times=4)
        started = time.monotonic()
        with pytest.raises(TransportError) as err:
            search_to_ndjson(c, "Patient", tmp_path / "p.ndjson", count=4)
        failed_after = time.monotonic() - started
    assert str(err.value) == ('rate-limit storage redis:// is unreachable (extra field "rate_limit_storage_uri"): '
                              "ConnectionError")
    # the 4th page was about to spend the budget when Redis went: it was never sent, nor anything after it
    assert sb.stats()["requests"] == sent_after_kill[0]
    assert len(pages) == 4 and m["client_retries"] == 0
    # no fallback: a new client in this process refuses too, until Redis is back
    with client(config) as c, pytest.raises(TransportError):
        c.read("Patient", "1")
    redis.start()
    with client(config) as c:
        result = search_to_ndjson(c, "Patient", tmp_path / "p.ndjson", count=4)
    assert sorted(ndjson_ids(tmp_path / "p.ndjson")) == sorted(live(sb, "Patient"))
    figures.record(pages_before_failure=3, seconds_to_fail=round(failed_after, 2), ids_after_redis_back=result.count,
                   error=str(err.value))


def test_redis_gone_fails_the_task_with_an_actionable_message(sb: SandboxServer, redis: Redis, tmp_path: Path,
                                                              airflow_db: str, modmed_connections: Any,
                                                              monkeypatch: pytest.MonkeyPatch, capfd: Any,
                                                              caplog: Any, figures: Figures) -> None:
    from tests.airflow.conftest import load_dag

    conn = json.loads(json.dumps(modmed_connections["modmed_default"]))
    conn["extra"]["rate_limit_storage_uri"] = redis.url
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_REDIS", json.dumps(conn))
    dag = load_dag(DAGS, "modmed_reliability_search")
    out = tmp_path / "patients.ndjson"
    conf = {"conn_id": "modmed_redis", "output_path": str(out)}
    run = dag.test(run_conf=conf)
    assert run.state == "success"
    redis.stop()
    capfd.readouterr()
    before = sb.stats()["requests"]
    run = dag.test(run_conf=conf)
    assert run.state == "failed"
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert 'rate-limit storage redis:// is unreachable (extra field "rate_limit_storage_uri")' in logs
    calls_while_down = sb.stats()["requests"] - before
    assert calls_while_down == 0  # not one call without the shared budget
    redis.start()
    run = dag.test(run_conf=conf)
    assert run.state == "success"
    assert sorted(ndjson_ids(out)) == sorted(live(sb, "Patient"))
    figures.record(calls_while_redis_down=calls_while_down, task_states="success, failed (Redis down), success")


def test_an_unreachable_redis_at_start_fails_before_any_call(sb: SandboxServer, figures: Figures) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    before = sb.stats()["requests"]
    started = time.monotonic()
    with client(prop_config(sb, rate_limit_storage_uri=dead)) as c, pytest.raises(TransportError) as err:
        c.read("Patient", "1")
    assert "rate_limit_storage_uri" in str(err.value)
    assert sb.stats()["requests"] == before
    figures.record(seconds_to_fail=round(time.monotonic() - started, 2))


def test_async_face_fails_the_same_way(sb: SandboxServer, figures: Figures) -> None:
    import asyncio

    from airflow_provider_modmed.client.fhir import AsyncFhirClient

    dead = f"redis://127.0.0.1:{free_port()}/0"
    before = sb.stats()["requests"]

    async def read() -> None:
        async with AsyncFhirClient(prop_config(sb, rate_limit_storage_uri=dead)) as c:
            await c.read("Patient", "1")

    with pytest.raises(TransportError, match='extra field "rate_limit_storage_uri"'):
        asyncio.run(read())
    assert sb.stats()["requests"] == before
    figures.record(calls=0)
