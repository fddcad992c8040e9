"""Every request goes through the client's httpx client, so its headers go out: a recording server on
127.0.0.1 sees ``User-Agent: airflow-provider-modmed/<version>`` and ``Accept-Encoding: gzip`` on the SMART
discovery, token, search, kick-off, status and file requests of both faces. It answers gzip-encoded search
pages and bulk files: they are decoded, and the bulk file is verified (line count) and hashed on the
decoded bytes."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed import __version__
from airflow_provider_modmed.client import AsyncFhirClient, ClientConfig, FhirClient
from airflow_provider_modmed.client.bulk import AsyncBulkExportClient, BulkExportClient, ExportRequest, PollPolicy
from tests.security.servers import LoopbackServer, fhir_json
from tests.security.test_bulk_hosts import PATIENTS, BulkServer

pytestmark = pytest.mark.integration

USER_AGENT = f"airflow-provider-modmed/{__version__}"
FAST = PollPolicy(min_wait=0, max_wait=0.01, initial_wait=0.01)


class RecordingFhirServer(BulkServer):
    """The security tests' Bulk Data server (SMART discovery, token, $export, status, one NDJSON file on the
    FHIR origin), plus a two-page Patient search; every body gzip-encoded when the request asks for it."""

    def __init__(self, server: LoopbackServer) -> None:
        super().__init__(server, [{"type": "Patient", "url": f"{server.url}/files/p.ndjson", "count": 5}], True)

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if path.startswith("/fhir/r4/Patient?"):
            ids = ["3"] if "page=2" in path else ["1", "2"]
            links = [] if "page=2" in path else [{"relation": "next", "url": f"{self.base}/Patient?page=2"}]
            status, extra, payload = fhir_json({"resourceType": "Bundle", "type": "searchset", "link": links,
                                                "entry": [{"resource": {"resourceType": "Patient", "id": i}}
                                                          for i in ids]})
        else:
            status, extra, payload = super().route(method, path, headers, body)
        if payload and "gzip" in headers.get("accept-encoding", ""):
            return status, {**extra, "Content-Encoding": "gzip"}, gzip.compress(payload)
        return status, extra, payload

    def requests_of(self, kind: str) -> list[dict[str, Any]]:
        tests = {
            "discovery": lambda r: r["path"].endswith("/.well-known/smart-configuration"),
            "token": lambda r: r["path"] == "/token",
            "search": lambda r: r["path"].startswith("/fhir/r4/Patient?"),
            "kick-off": lambda r: "/$export" in r["path"],
            "status": lambda r: r["path"] == "/fhir/r4/status/1" and r["method"] == "GET",
            "file": lambda r: r["path"] == "/files/p.ndjson",
        }
        return [r for r in self.server.requests if tests[kind](r)]


def config(base: str) -> ClientConfig:
    return ClientConfig(track="certified", fhir_base=base, firm="x", auth_method="client_secret", client_id="c",
                        client_secret="recording-secret", max_retries=0)


def check(server: RecordingFhirServer, patients: list[dict[str, Any]], result: dict[str, Any],
          folder: Path) -> None:
    assert [p["id"] for p in patients] == ["1", "2", "3"]  # two gzip pages, decoded
    for kind in ("discovery", "token", "search", "kick-off", "status", "file"):
        seen = server.requests_of(kind)
        assert seen, f"no {kind} request"
        for request in seen:
            assert request["headers"].get("user-agent") == USER_AGENT, (kind, request["headers"])
            assert request["headers"].get("accept-encoding") == "gzip", (kind, request["headers"])
    # the file came gzip-encoded: stored, counted and hashed as the NDJSON it holds
    stored = (folder / "output/Patient.0001.ndjson").read_bytes()
    assert stored == PATIENTS and result["resources"] == 5 and result["bytes"] == len(PATIENTS)
    digest = hashlib.sha256(PATIENTS).hexdigest()
    assert (folder / "SHA256SUMS").read_text() == f"{digest}  output/Patient.0001.ndjson\n"


def test_sync_face_sends_the_client_headers_everywhere_and_decodes_gzip(tmp_path: Path) -> None:
    with LoopbackServer() as loopback:
        server = RecordingFhirServer(loopback)
        with FhirClient(config(server.base), sleep=lambda s: None) as fhir:
            patients = list(fhir.search("Patient"))
            result = BulkExportClient(fhir, poll=FAST).export(ExportRequest(types=("Patient",)), tmp_path)
        check(server, patients, result, tmp_path)


async def test_async_face_sends_the_client_headers_everywhere_and_decodes_gzip(tmp_path: Path) -> None:
    async def no_sleep(_: float) -> None:
        return None

    with LoopbackServer() as loopback:
        server = RecordingFhirServer(loopback)
        async with AsyncFhirClient(config(server.base), sleep=no_sleep) as fhir:
            patients = [p async for p in fhir.search("Patient")]
            result = await AsyncBulkExportClient(fhir, poll=FAST).export(ExportRequest(types=("Patient",)),
                                                                         tmp_path)
        check(server, patients, result, tmp_path)
