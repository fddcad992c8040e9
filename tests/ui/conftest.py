"""The Airflow UI (api-server) on a free loopback port, and Debian's Chromium driven by Playwright.

While the api-server boots, the session sandbox's connections are saved in its database the way
`make airflow` saves them (over a stale copy an earlier run left), so that costs the test no time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer
from scripts.airflow_ui import save_connections
from tests.airflow.conftest import AIRFLOW_BIN, airflow_db  # noqa: F401 - fixture re-export
from tests.conftest import free_port, require_binary

OUT = Path(__file__).resolve().parents[2] / "out" / "ui"


#: the host an earlier `make airflow` saved for modmed_default: a sandbox port that is gone
STALE_HOST = "http://127.0.0.1:9/ema-dev/firm"


@pytest.fixture(scope="module")
def saved_by_make_airflow(sandbox: SandboxServer, airflow_db: str) -> Iterator[Future[list[str]]]:  # noqa: F811
    """`make airflow`'s saving of the sandbox's connections, run in the background: first a stale
    modmed_default (an earlier run's), then every connection; the future holds the ids saved."""
    conns = sandbox.credentials["airflow_connections"]
    stale = {"modmed_default": {**conns["modmed_default"], "host": STALE_HOST, "password": "stale"}}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}

    def save_twice() -> list[str]:
        save_connections(stale, env)
        return save_connections(conns, env)

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(save_twice)


@pytest.fixture(scope="module")
def airflow_ui(airflow_db: str, saved_by_make_airflow: Future[list[str]]) -> Iterator[str]:  # noqa: F811
    port = free_port()
    env = {**os.environ, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
           "AIRFLOW__CORE__TEST_CONNECTION": "Enabled"}
    env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_")}
    OUT.mkdir(parents=True, exist_ok=True)
    log = (OUT.parent / "api-server.log").open("w")
    proc = subprocess.Popen([AIRFLOW_BIN, "api-server", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/api/v2/monitor/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"airflow api-server did not start; see {OUT.parent / 'api-server.log'}")
        time.sleep(0.5)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    chromium = require_binary("chromium")
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.set_default_timeout(30_000)
        yield page
        browser.close()
