"""Bulk export against a hostile Bulk Data server on loopback: output files on another origin, manifests that say
``requiresAccessToken`` true or false, plain-http file URLs, and files with bad NDJSON lines. Credentials go only
to the FHIR server's own origin (and not even there for ``requiresAccessToken: false``); a bad line fails the
file with an error naming the file and the line, and leaves no file under its final name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import ClientConfig, FhirClient
from airflow_provider_modmed.client.bulk import (
    BulkExportClient,
    DownloadPolicy,
    ExportRequest,
    PollPolicy,
    VerificationError,
)
from airflow_provider_modmed.errors import ModMedError
from tests.reliability._figures import Figures
from tests.security.servers import LoopbackServer

pytestmark = pytest.mark.integration

SECRET = "hostile-bulk-client-secret"
PATIENTS = b"".join(json.dumps({"resourceType": "Patient", "id": str(i)}).encode() + b"\n" for i in range(1, 6))


def json_answer(body: Any, status: int = 200, **headers: str) -> Any:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode()


class BulkServer:
    """A Bulk Data server (SMART discovery, token, $export, status) whose manifest lists ``files``."""

    def __init__(self, server: LoopbackServer, files: list[dict[str, Any]], requires_access_token: bool) -> None:
        self.server, self.files, self.requires = server, files, requires_access_token
        server.route = self.route

    @property
    def base(self) -> str:
        return f"{self.server.url}/fhir/r4"

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        p = path.split("?", 1)[0]
        if p.endswith("/.well-known/smart-configuration"):
            return json_answer({"token_endpoint": f"{self.server.url}/token",
                                "token_endpoint_auth_methods_supported": ["client_secret_post"],
                                "grant_types_supported": ["client_credentials"]})
        if p == "/token":
            return json_answer({"access_token": "hostile-bulk-token", "token_type": "bearer", "expires_in": 300})
        if p.endswith("/$export"):
            return 202, {"Content-Location": f"{self.base}/status/1"}, b""
        if p.endswith("/status/1"):
            if method == "DELETE":
                return 202, {}, b""
            return json_answer({"transactionTime": "2026-01-01T00:00:00Z", "request": f"{self.base}/$export",
                                "requiresAccessToken": self.requires, "output": self.files, "error": []})
        if p.startswith("/files/"):
            return 200, {"Content-Type": "application/fhir+ndjson"}, PATIENTS
        return 404, {}, b""


def client(base: str, **kwargs: Any) -> BulkExportClient:
    config = ClientConfig(track="certified", fhir_base=base, firm="x", auth_method="client_secret", client_id="c",
                          client_secret=SECRET, max_retries=0)
    fhir = FhirClient(config, sleep=lambda s: None, **kwargs)
    return BulkExportClient(fhir, poll=PollPolicy(min_wait=0, max_wait=0.01, initial_wait=0.01),
                            download=DownloadPolicy(retries=0, max_line_bytes=4096))


@pytest.mark.parametrize("requires", [True, False])
def test_files_on_another_origin_get_no_credentials(tmp_path: Path, requires: bool, figures: Figures) -> None:
    with LoopbackServer() as storage, LoopbackServer() as fhir_server:
        storage.route = lambda m, p, h, b: (200, {}, PATIENTS)
        BulkServer(fhir_server, [{"type": "Patient", "url": f"{storage.url}/files/p.ndjson", "count": 5}], requires)
        bulk = client(f"{fhir_server.url}/fhir/r4")
        result = bulk.export(ExportRequest(types=("Patient",)), tmp_path)
        bulk.client.close()
        assert result["resources"] == 5
        assert len(storage.requests) == 1 and storage.credentials_seen() == []
        assert fhir_server.credentials_seen()  # the FHIR server did get the token
    figures.record(files=1, credentials_seen_by_storage=0)


def test_files_on_the_fhir_origin_get_no_token_when_the_manifest_says_so(tmp_path: Path, figures: Figures) -> None:
    with LoopbackServer() as fhir_server:
        server = BulkServer(fhir_server, [], False)
        server.files = [{"type": "Patient", "url": f"{fhir_server.url}/files/p.ndjson", "count": 5}]
        bulk = client(server.base)
        bulk.export(ExportRequest(types=("Patient",)), tmp_path)
        bulk.client.close()
        file_gets = [r for r in fhir_server.requests if r["path"].startswith("/files/")]
        assert len(file_gets) == 1
        assert not {"authorization", "x-api-key"} & set(file_gets[0]["headers"])
    figures.record(credentials_on_file_request=0)


def test_a_plain_http_file_url_on_another_host_is_refused_before_sending(tmp_path: Path) -> None:
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:  # never the network: the request is only recorded
        sent.append(request)
        return httpx.Response(200, content=PATIENTS)

    with LoopbackServer() as fhir_server:
        server = BulkServer(fhir_server, [{"type": "Patient", "url": "http://storage.example.com/p.ndjson"}], False)
        http = httpx.Client(mounts={"all://storage.example.com": httpx.MockTransport(record)})
        bulk = client(server.base, http_client=http)
        try:
            with pytest.raises(ModMedError, match="http://"):
                bulk.export(ExportRequest(types=("Patient",)), tmp_path)
        finally:
            http.close()
    assert sent == []


BAD_FILES = {
    "not JSON": (b'{"resourceType":"Patient","id":"1"}\n{not json\n', "line 2 is not JSON"),
    "wrong type": (b'{"resourceType":"Patient","id":"1"}\n{"resourceType":"Observation","id":"2"}\n',
                   "line 2 is 'Observation', expected 'Patient'"),
    "not an object": (b'{"resourceType":"Patient","id":"1"}\n[1,2]\n', "line 2 is no resourceType"),
    "not UTF-8": (b'{"resourceType":"Patient","id":"\xff\xfe"}\n', "is not UTF-8"),
    "line too long": (b'{"resourceType":"Patient","id":"' + b"x" * 300_000 + b'"}\n', "has a line longer than 4096"),
    "count mismatch": (PATIENTS[: PATIENTS.index(b"\n") + 1], "has 1 resources but the manifest says 5"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_ndjson_lines_fail_the_file_clearly_and_leave_no_final_file(tmp_path: Path, case: str,
                                                                      figures: Figures) -> None:
    payload, expected = BAD_FILES[case]
    with LoopbackServer() as storage, LoopbackServer() as fhir_server:
        storage.route = lambda m, p, h, b: (200, {}, payload)
        BulkServer(fhir_server, [{"type": "Patient", "url": f"{storage.url}/files/p.ndjson", "count": 5}], False)
        bulk = client(f"{fhir_server.url}/fhir/r4")
        with pytest.raises(VerificationError) as err:
            bulk.export(ExportRequest(types=("Patient",)), tmp_path)
        bulk.client.close()
    if case == "count mismatch":  # a complete transfer: the same bytes again would not change the count
        assert len(storage.requests) == 1
    message = str(err.value)
    assert message.startswith("bulk file output/Patient.0001.ndjson") and expected in message, message
    assert not (tmp_path / "output" / "Patient.0001.ndjson").exists()
    assert not list(tmp_path.rglob("*.part"))
    assert "xxxxxxxx" not in message and "Observation\",\"id\":\"2" not in message  # no data echoed
    figures.record(error=message)
