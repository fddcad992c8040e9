"""`modmed-sandbox` as users run it: the CLI, its flags, the admin endpoints, persistence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cli_sandbox(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, storage = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "serve", "--port", str(port),
         "--storage-port", str(storage), "--patients", "12", "--seed", "3", "--data-dir", str(tmp_path),
         "--token-ttl", "1", "--rate-limit-per-minute", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats", timeout=1)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"modmed-sandbox did not start: {out}")
            time.sleep(0.1)
    yield port, tmp_path
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


def test_cli_serves_prints_credentials_and_expires_tokens(cli_sandbox: tuple[int, Path]) -> None:
    port, data_dir = cli_sandbox
    printed = subprocess.run([sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "credentials", "--json",
                              "--port", str(port), "--data-dir", str(data_dir), "--seed", "3"],
                             capture_output=True, text=True, check=True)
    creds = json.loads(printed.stdout)
    served = httpx.get(f"http://127.0.0.1:{port}/_sandbox/credentials").json()
    assert creds["proprietary"] == served["proprietary"]
    assert creds["certified"]["private_key_jwt"]["private_key"] == served["certified"]["private_key_jwt"]["private_key"]
    assert (data_dir / "rs384-private.pem").stat().st_mode & 0o077 == 0
    conn = creds["airflow_connections"]["modmed_default"]
    assert conn["extra"]["track"] == "proprietary" and conn["extra"]["api_key"] == creds["proprietary"]["api_key"]

    p = creds["proprietary"]
    token = httpx.post(p["token_url"], headers={"x-api-key": p["api_key"]}, data={
        "grant_type": "password", "username": p["username"], "password": p["password"]}).json()["access_token"]
    headers = {"x-api-key": p["api_key"], "Authorization": f"Bearer {token}"}
    assert httpx.get(p["fhir_base"] + "/Patient/1", headers=headers).status_code == 200
    time.sleep(1.2)  # --token-ttl 1
    assert httpx.get(p["fhir_base"] + "/Patient/1", headers=headers).status_code == 401


def test_admin_fault_endpoint_over_http(cli_sandbox: tuple[int, Path]) -> None:
    port, _ = cli_sandbox
    api = f"http://127.0.0.1:{port}"
    assert httpx.post(api + "/_sandbox/faults", json={"latency_ms": 150}).status_code == 200
    started = time.monotonic()
    httpx.get(api + "/ema-dev/firm/apiportal/ema/fhir/v2/metadata")
    assert time.monotonic() - started >= 0.15
    assert httpx.post(api + "/_sandbox/faults", json={"no_such_fault": 1}).status_code == 400
    assert httpx.delete(api + "/_sandbox/faults").json()["latency_ms"] == 0


def test_data_dir_keeps_state_across_restarts(tmp_path: Path) -> None:
    with SandboxServer(patients=5, data_dir=tmp_path) as first:
        first.app_state.store.create({"resourceType": "Patient", "name": [{"family": "Kept"}]})
        kept = first.app_state.store.count("Patient")
        key = first.credentials["certified"]["private_key_jwt"]["private_key"]
    with SandboxServer(patients=5, data_dir=tmp_path) as second:
        assert second.app_state.store.count("Patient") == kept == 6
        assert second.credentials["certified"]["private_key_jwt"]["private_key"] == key


def test_unknown_firm_and_environment_are_404(sb: SandboxServer) -> None:
    p = sb.credentials["proprietary"]
    other_firm = p["fhir_base"].replace("/apiportal/", "/otherfirm/")
    assert httpx.get(other_firm + "/metadata").status_code == 404
    assert httpx.get(p["fhir_base"].replace("ema-dev", "ema-nope") + "/metadata").status_code == 404
    assert httpx.get(p["fhir_base"].replace("ema-dev", "ema-training") + "/metadata").status_code == 200
