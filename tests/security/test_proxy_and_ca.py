"""Egress as hospitals and vendors run it (issue 14, item 5): an HTTPS proxy and a private CA per connection.

The sandbox is served over TLS with a certificate of a CA made here (for 127.0.0.1/localhost); Debian's
tinyproxy runs on a free loopback port with Basic auth. Through the proxy, every https:// request (token,
FHIR, bulk status and files, presigned uploads) travels as a CONNECT tunnel, which tinyproxy's log shows;
the credentials-to-other-hosts rules hold (the object store sees no Authorization or x-api-key). A wrong
proxy, a wrong proxy password and a missing CA bundle each fail once, with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import AsyncFhirClient, ClientConfig, FhirClient
from airflow_provider_modmed.client.bulk import AsyncBulkExportClient, BulkExportClient, ExportRequest, PollPolicy
from airflow_provider_modmed.client.documents import upload_document
from airflow_provider_modmed.errors import TransportError
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox import cli
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import free_port
from tests.reliability._figures import Figures
from tests.security.conftest import MARKER, RUN, SEEDED
from tests.security.servers import issue_certificate
from tests.security.tinyproxy import Tinyproxy

pytestmark = pytest.mark.integration

PROXY_USER = "egress"
PROXY_PASSWORD = f"{MARKER}-proxy-{RUN}"
FAST = PollPolicy(min_wait=0, max_wait=0.05, initial_wait=0.05)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    with Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), user=PROXY_USER, password=PROXY_PASSWORD) as running:
        yield running


def ca_pem(pki: tuple[Path, Path, Path]) -> str:
    return pki[2].read_text()


def connection(sb: SandboxServer, name: str = "modmed_default", **extra: Any) -> ClientConfig:
    """The sandbox's Airflow connection ``name`` with ``extra`` added, mapped as the hook maps it."""
    conn = sb.credentials["airflow_connections"][name]
    return config_from_connection(host=conn["host"], login=conn.get("login"), password=conn.get("password"),
                                  extra={**conn["extra"], **extra}, max_retries=2)


def proxied(sb: SandboxServer, proxy: Tinyproxy, pki: tuple[Path, Path, Path], name: str = "modmed_default",
            **extra: Any) -> ClientConfig:
    return connection(sb, name, proxy=f"http://{PROXY_USER}@127.0.0.1:{proxy.port}", proxy_password=PROXY_PASSWORD,
                      ca_bundle=ca_pem(pki), **extra)


def origin_of(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.host}:{u.port}"


def new_requests(proxy: Tinyproxy, before: int) -> list[tuple[str, str]]:
    return proxy.requests()[before:]


def test_every_request_goes_through_the_proxy_and_storage_gets_no_credentials(
        tls_sandbox: SandboxServer, proxy: Tinyproxy, pki: tuple[Path, Path, Path], tmp_path: Path,
        figures: Figures) -> None:
    """Token, FHIR read/search, presigned upload, bulk kick-off/status/files: all tunnelled; the object store
    (another origin, reached through the same proxy) sees no Authorization or x-api-key."""
    sb = tls_sandbox
    sb.reset_stats()
    before = len(proxy.requests())
    config = proxied(sb, proxy, pki)
    assert config.ca_bundle and config.proxy and PROXY_PASSWORD not in repr(config)
    with FhirClient(config, sleep=lambda s: None) as client:
        patients = list(client.search("Patient", params={"_count": 2}))
        uploaded = upload_document(client, b"%PDF-1.4 through the proxy", filename="p.pdf", category="LAB",
                                   patient_id=patients[0]["id"])
    cert = proxied(sb, proxy, pki, "modmed_certified")
    with FhirClient(cert, sleep=lambda s: None) as client:
        result = BulkExportClient(client, poll=FAST).export(ExportRequest(types=("Patient",)), tmp_path / "sync")
    stats = sb.stats()
    seen = new_requests(proxy, before)
    assert len(patients) == 6 and uploaded.created and result["resources"] == 6
    assert {m for m, _ in seen} == {"CONNECT"}  # tunnels only: the proxy never read a header of ours
    assert {t for _, t in seen} == {origin_of(sb.api_url), origin_of(sb.storage_url)}
    assert stats["token_requests"] >= 2 and stats["uploads"] == 1 and stats["bulk_downloads"] >= 1
    assert stats.get("auth_headers_seen_by_storage", 0) == 0 and stats["storage_requests"] >= 2
    log = proxy.log()
    for secret in (*SEEDED.values(), PROXY_PASSWORD):
        assert secret not in log
    figures.record(connects=len(seen), storage_requests=stats["storage_requests"],
                   auth_headers_seen_by_storage=stats.get("auth_headers_seen_by_storage", 0))


async def test_the_async_face_goes_through_the_proxy_too(
        tls_sandbox: SandboxServer, proxy: Tinyproxy, pki: tuple[Path, Path, Path], tmp_path: Path) -> None:
    sb = tls_sandbox
    sb.reset_stats()
    before = len(proxy.requests())

    async def no_sleep(_: float) -> None:
        return None

    async with AsyncFhirClient(proxied(sb, proxy, pki, "modmed_certified_secret"), sleep=no_sleep) as client:
        result = await AsyncBulkExportClient(client, poll=FAST).export(ExportRequest(types=("Patient",)), tmp_path)
    seen = new_requests(proxy, before)
    assert result["resources"] == 6
    assert {t for m, t in seen if m == "CONNECT"} == {origin_of(sb.api_url), origin_of(sb.storage_url)}
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == 0


def test_an_unreachable_proxy_names_the_proxy_field_and_nothing_reaches_the_server(
        tls_sandbox: SandboxServer, pki: tuple[Path, Path, Path], figures: Figures) -> None:
    sb = tls_sandbox
    sb.reset_stats()
    port = free_port()  # nothing listens there
    config = connection(sb, proxy=f"http://{PROXY_USER}@127.0.0.1:{port}", proxy_password=PROXY_PASSWORD,
                        ca_bundle=ca_pem(pki))
    with FhirClient(config, sleep=lambda s: None) as client, pytest.raises(TransportError) as err:
        client.read("Patient", "1")
    message = str(err.value)
    assert f'could not reach the proxy http://127.0.0.1:{port} (extra field "proxy")' in message, message
    assert PROXY_PASSWORD not in message and PROXY_USER not in message
    assert sb.stats().get("requests", 0) == 0 and sb.stats().get("token_requests", 0) == 0  # not even the token
    figures.record(error=message)


def test_a_wrong_proxy_password_names_the_field_and_is_not_retried(
        tls_sandbox: SandboxServer, proxy: Tinyproxy, pki: tuple[Path, Path, Path], figures: Figures) -> None:
    sb = tls_sandbox
    before = len(proxy.requests())
    wrong = f"{MARKER}-wrongproxy-{RUN}"
    config = connection(sb, proxy=f"http://{PROXY_USER}@127.0.0.1:{proxy.port}", proxy_password=wrong,
                        ca_bundle=ca_pem(pki))
    with FhirClient(config, sleep=lambda s: None) as client, pytest.raises(TransportError) as err:
        client.read("Patient", "1")
    message = str(err.value)
    assert f"the proxy http://127.0.0.1:{proxy.port}" in message and "refused the tunnel" in message, message
    assert "401 Unauthorized" in message and "proxy_password" in message  # tinyproxy's answer to a bad password
    assert wrong not in message and PROXY_PASSWORD not in message
    assert len(new_requests(proxy, before)) == 1  # max_retries=2, yet one CONNECT: a refusal is not retried
    figures.record(error=message)


def test_without_the_ca_bundle_tls_fails_clearly_once(
        tls_sandbox: SandboxServer, proxy: Tinyproxy, pki: tuple[Path, Path, Path], figures: Figures) -> None:
    """Through the proxy, the sandbox's certificate (private CA) is checked end to end: untrusted without the
    bundle (one attempt, no HTTP request reached the sandbox); trusted with it, as PEM text or as a file."""
    sb = tls_sandbox
    sb.reset_stats()
    before = len(proxy.requests())
    config = connection(sb, proxy=f"http://{PROXY_USER}@127.0.0.1:{proxy.port}", proxy_password=PROXY_PASSWORD)
    with FhirClient(config, sleep=lambda s: None) as client, pytest.raises(TransportError) as err:
        client.read("Patient", "1")
    message = str(err.value)
    assert "TLS certificate failed verification" in message and 'extra field "ca_bundle"' in message, message
    assert len(new_requests(proxy, before)) == 1  # the handshake failed once: not retried
    assert sb.stats().get("token_requests", 0) == 0
    for bundle in (ca_pem(pki), str(pki[2])):  # PEM text, or a file on every worker
        trusted = connection(sb, proxy=f"http://{PROXY_USER}@127.0.0.1:{proxy.port}", proxy_password=PROXY_PASSWORD,
                             ca_bundle=bundle)
        with FhirClient(trusted, sleep=lambda s: None) as client:
            assert client.read("Patient", "1")["id"] == "1"
    figures.record(error=message)


def test_verify_with_a_ca_file_still_works_without_a_proxy(tls_sandbox: SandboxServer,
                                                            pki: tuple[Path, Path, Path]) -> None:
    config = dataclasses.replace(connection(tls_sandbox), verify=str(pki[2]))  # the client's own argument
    with FhirClient(config) as client:
        assert client.read("Patient", "1")["id"] == "1"


def test_plain_http_to_loopback_never_goes_through_the_proxy(sb: SandboxServer, proxy: Tinyproxy) -> None:
    """The http:// sandbox (loopback only) is reached directly: a proxy would read its headers in clear."""
    before = len(proxy.requests())
    config = connection(sb, proxy=f"http://{PROXY_USER}@127.0.0.1:{proxy.port}", proxy_password=PROXY_PASSWORD)
    with FhirClient(config) as client:
        assert client.read("Patient", "1")["id"] == "1"
    assert new_requests(proxy, before) == []


def test_the_proxy_password_is_masked_by_the_hook(seeded: SandboxServer) -> None:
    from airflow.sdk.log import mask_logs

    from airflow_provider_modmed.hooks.modmed import ModMedHook
    from tests.airflow.conftest import connections_env

    secret = f"{MARKER}-masked-proxy@{RUN}"
    base = seeded.credentials["airflow_connections"]["modmed_default"]
    conn = {**base, "extra": {**base["extra"], "proxy": "http://egress@127.0.0.1:3128", "proxy_password": secret}}
    with connections_env({"modmed_proxy_mask": conn}):
        config = ModMedHook("modmed_proxy_mask").config
    assert config.proxy is not None and "masked-proxy%40" in config.proxy  # URL-quoted into the user info
    line = mask_logs(None, "info", {"event": f"proxy {config.proxy} password {secret}"})["event"]
    assert secret not in line and "masked-proxy%40" not in line, line


def test_the_sandbox_cli_wants_both_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = tmp_path / "c.pem"
    assert cli.main(["serve", "--port", str(free_port()), "--tls-cert", str(cert)]) == 2
    assert "--tls-cert and --tls-key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        SandboxServer(tls_cert=cert)


def test_the_sandbox_over_tls_prints_https_urls(tls_sandbox: SandboxServer) -> None:
    doc = tls_sandbox.credentials
    assert doc["api_url"].startswith("https://127.0.0.1:") and doc["storage_url"].startswith("https://127.0.0.1:")
    assert json.dumps(doc["airflow_connections"]["modmed_default"]["host"]).startswith('"https://')


def test_the_credentials_command_asks_a_tls_sandbox_with_its_ca(
        tls_sandbox: SandboxServer, pki: tuple[Path, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    port = str(httpx.URL(tls_sandbox.api_url).port)
    assert cli.main(["credentials", "--json", "--port", port, "--tls-ca", str(pki[2])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["proprietary"]["fhir_base"].startswith(f"https://127.0.0.1:{port}/")
    assert doc["proprietary"]["api_key"] == tls_sandbox.credentials["proprietary"]["api_key"]
    # without the CA: plain http reaches nothing there, and the message says what to pass
    assert cli.main(["credentials", "--json", "--port", port]) == 1
    assert "pass --tls-ca" in capsys.readouterr().err
    # another CA: refused, named as a certificate problem (not as "no sandbox")
    _, _, other_ca = issue_certificate(tmp_path)
    assert cli.main(["credentials", "--json", "--port", port, "--tls-ca", str(other_ca)]) == 1
    assert "not signed by --tls-ca" in capsys.readouterr().err
