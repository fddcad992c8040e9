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
from tests.integration.sandbox_process import serve

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cli_sandbox(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, storage = free_port(), free_port()
    data_dir = tmp_path / "data"
    with serve(port, "--storage-port", str(storage), "--patients", "12", "--seed", "3", "--data-dir", str(data_dir),
               "--token-ttl", "1", "--rate-limit-per-minute", "50", output=tmp_path / "serve.log"):
        yield port, data_dir


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
    assert httpx.get(api + "/_sandbox/faults").json()["latency_ms"] == 150  # GET reads, changes nothing
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


# -- off loopback (issue 13, item 10) ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])  # noqa: S104 - the point of the test
def test_cli_refuses_a_host_beyond_loopback_without_allow_remote(tmp_path: Path, host: str) -> None:
    data_dir = tmp_path / "state"
    done = subprocess.run([sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "serve", "--host", host,
                           "--port", str(free_port()), "--data-dir", str(data_dir), "--patients", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--allow-remote" in done.stderr and repr(host) in done.stderr
    assert "/_sandbox/" in done.stderr  # says what would be exposed
    assert not data_dir.exists()  # refused before seeding, keys or sockets
    assert "Bearer" not in done.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_keep_open_admin_endpoints(host: str) -> None:
    from airflow_provider_modmed.sandbox.server import check_bind
    from airflow_provider_modmed.sandbox.state import SandboxConfig

    config = SandboxConfig(host=host)
    assert check_bind(config) is config and config.admin_token is None


def test_allow_remote_generates_a_fresh_admin_token_unless_given() -> None:
    from airflow_provider_modmed.sandbox.server import RemoteBindRefused, check_bind
    from airflow_provider_modmed.sandbox.state import SandboxConfig

    with pytest.raises(RemoteBindRefused, match="--allow-remote"):
        check_bind(SandboxConfig(host="10.1.2.3"))
    first = check_bind(SandboxConfig(host="0.0.0.0", allow_remote=True)).admin_token  # noqa: S104
    second = check_bind(SandboxConfig(host="0.0.0.0", allow_remote=True)).admin_token  # noqa: S104
    assert first and second and first != second and len(first) >= 32
    assert check_bind(SandboxConfig(host="0.0.0.0", allow_remote=True,  # noqa: S104
                                    admin_token="given-token-1234")).admin_token == "given-token-1234"
    assert "given-token" not in repr(SandboxConfig(admin_token="given-token-1234"))


@pytest.fixture
def remote_cli_sandbox() -> Iterator[tuple[str, str]]:
    """`modmed-sandbox serve --host 0.0.0.0 --allow-remote`, reached on 127.0.0.1; yields (api, admin token)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_modmed.sandbox.cli", "serve", "--host", "0.0.0.0",  # noqa: S104
         "--allow-remote", "--port", str(port), "--storage-port", str(free_port()), "--patients", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        printed: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # the banner ends with the admin token line
            printed.append(line)
            if "Bearer" in line:
                break
        token = printed[-1].rsplit("Bearer ", 1)[-1].strip() if printed else ""
        if not token:
            pytest.fail(f"no admin token printed: {''.join(printed)} {proc.stderr.read() if proc.stderr else ''}")
        yield f"http://127.0.0.1:{port}", token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_allow_remote_admin_endpoints_need_the_printed_token(remote_cli_sandbox: tuple[str, str]) -> None:
    api, token = remote_cli_sandbox
    bearer = {"Authorization": f"Bearer {token}"}
    # without the token: 401; with a wrong one: 403; nothing is returned or written
    assert httpx.get(api + "/_sandbox/credentials").status_code == 401
    assert httpx.get(api + "/_sandbox/credentials", headers={"x-sandbox-admin-token": "wrong"}).status_code == 403
    assert httpx.get(api + "/_sandbox/stats", headers={"Authorization": "Bearer wrong"}).status_code == 403
    refused = httpx.post(api + "/_sandbox/resources/Patient", json={"name": [{"family": "Intruder"}]})
    assert refused.status_code == 401 and "api_key" not in refused.text
    assert httpx.post(api + "/_sandbox/faults", json={"latency_ms": 500}).status_code == 401
    assert httpx.get(api + "/_sandbox/anything").status_code == 401
    # with it (either header): everything works
    creds = httpx.get(api + "/_sandbox/credentials", headers={"x-sandbox-admin-token": token})
    assert creds.status_code == 200 and creds.json()["proprietary"]["api_key"]
    faults = httpx.post(api + "/_sandbox/faults", headers=bearer, json={}).json()
    assert faults["latency_ms"] == 0  # the refused POST did nothing
    rows = httpx.get(api + "/_sandbox/resources/Patient", headers=bearer).json()
    assert len(rows) == 4  # the refused create did nothing
    assert httpx.post(api + "/_sandbox/resources/Patient", headers=bearer,
                      json={"name": [{"family": "Admin"}]}).status_code == 201
    assert httpx.get(api + "/_sandbox/stats", headers=bearer).json()["admin_refused"] == 6
    # the FHIR API is not behind the admin token
    assert httpx.get(api + "/ema-dev/firm/apiportal/ema/fhir/v2/metadata").status_code == 200


# -- issue 15, item 8: no Airflow in the CLI; an injected fault is one log line ------------------------------

_NO_AIRFLOW = """
import contextlib, io, json, sys
from airflow_provider_modmed.sandbox import cli
from airflow_provider_modmed.sandbox.server import SandboxServer
for argv in (["--help"], ["serve", "--help"], ["credentials", "--help"], ["keys", "new", "--help"]):
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        cli.main(argv)
with SandboxServer(patients=2) as sb, contextlib.redirect_stdout(io.StringIO()) as out:
    assert cli.main(["credentials", "--json", "--port", sb.api_url.rsplit(":", 1)[1]]) == 0
    assert cli.main(["keys", "new", "--json"]) == 0
assert json.loads(out.getvalue().split("\\n}\\n")[0] + "}")["airflow_connection_uris"]["modmed_default"]
print(json.dumps(sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))))
"""


@pytest.fixture
def garbage_airflow_home(tmp_path: Path) -> dict[str, str]:
    """An environment whose AIRFLOW_HOME holds an airflow.cfg that Airflow cannot parse (and cannot read)."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    cfg = home / "airflow.cfg"
    cfg.write_bytes(b"[core\nthis is = not\x00 an ini file\n")
    cfg.chmod(0)
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(cfg)}


def test_the_cli_imports_no_airflow(garbage_airflow_home: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-c", _NO_AIRFLOW], capture_output=True, text=True, timeout=120,
                          env=garbage_airflow_home)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []  # serve, credentials and keys: not one airflow module


def test_modmed_sandbox_help_with_a_garbage_airflow_cfg(garbage_airflow_home: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("modmed-sandbox")
    for argv in ([str(script), "--help"], [str(script), "keys", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=garbage_airflow_home)
        assert done.returncode == 0, done.stderr
        assert "modmed-sandbox" in done.stdout and done.stderr == ""


def test_an_injected_drop_is_logged_as_one_line(tmp_path: Path) -> None:
    port = free_port()
    log_file = tmp_path / "serve.log"
    with serve(port, "--storage-port", str(free_port()), "--patients", "2", output=log_file):
        api = f"http://127.0.0.1:{port}"
        metadata = api + "/ema-dev/firm/apiportal/ema/fhir/v2/metadata"
        httpx.post(api + "/_sandbox/faults", json={"drop_next": 1}).raise_for_status()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(metadata)
        assert httpx.get(metadata).status_code == 200  # the next answer is whole
        assert httpx.get(api + "/_sandbox/stats").json()["dropped"] == 1
    output = log_file.read_text()
    assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    fault_lines = [line for line in output.splitlines() if "sandbox fault" in line]
    assert len(fault_lines) == 1 and "drop_next" in fault_lines[0], output


def test_injected_truncation_is_one_line_and_real_errors_keep_their_traceback() -> None:
    import logging

    from airflow_provider_modmed.sandbox.bulk import TruncatedDownload, _InjectedTruncation
    from airflow_provider_modmed.sandbox.server import InjectedFaultLog

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException as raised:  # captured for the record, as uvicorn does
            return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application\n",
                                     None, (type(raised), raised, raised.__traceback__))

    injected = record(_InjectedTruncation("sandbox fault: bulk download truncated mid-body (truncate_downloads)"))
    assert InjectedFaultLog().filter(injected)
    text = logging.Formatter("%(levelname)s %(message)s").format(injected)
    assert text == "WARNING sandbox fault: bulk download truncated mid-body (truncate_downloads)"
    for real in (TruncatedDownload("bulk file changed while it was being sent"), RuntimeError("a bug")):
        kept = record(real)
        assert InjectedFaultLog().filter(kept)
        assert "Traceback" in logging.Formatter().format(kept) and kept.levelno == logging.ERROR
