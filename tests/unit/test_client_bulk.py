"""Bulk Data client: flows fed canned answers by hand, the NDJSON sink, the run state, and both faces
against a scripted Bulk Data server (httpx.MockTransport) that is not our sandbox."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import bulk
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.auth import NO_CREDENTIALS
from airflow_provider_modmed.client.bulk import (
    AsyncBulkExportClient,
    BulkExportClient,
    DownloadPolicy,
    ExportErrorsReported,
    ExportFailedError,
    ExportGoneError,
    ExportRequest,
    ExportRun,
    Fetch,
    Fetched,
    Manifest,
    ManifestItem,
    NdjsonSink,
    PollPolicy,
    VerificationError,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.drivers import Sleep
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client.retry import FLOW_RETRIES
from airflow_provider_modmed.errors import (
    AuthError,
    CapabilityError,
    ConfigurationError,
    ServerError,
    TransportError,
    ValidationError,
)

BASE = "https://fhir.example/r4"
TOKEN_URL = "https://fhir.example/auth/token"
STORAGE = "https://storage.example"
CERT = FhirContext(Track.CERTIFIED, BASE)
PROP = FhirContext(Track.PROPRIETARY, "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2")
TOKEN = "TOKEN-SECRET-VALUE"


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def by_hand(flow: Any, answers: list[Any]) -> tuple[Any, list[Any]]:
    """Drive a flow feeding ``answers`` to its requests/fetches: (result, steps seen)."""
    steps: list[Any] = []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            return done.value, steps
        steps.append(step)
        out = None if isinstance(step, Sleep) else answers.pop(0)


def outcome(code: str, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code}]}


# -- the kick-off request ------------------------------------------------------------------------

def test_kick_off_get_url_headers_and_encoding() -> None:
    req = ExportRequest(level="Group/cohort-a", types="Patient, Observation,Patient",
                        since="2024-01-01T00:00:00+05:00", type_filters=("Observation?code=a|b",))
    http = req.build(BASE)
    assert http.method == "GET"
    url = str(http.url)
    assert url.startswith(f"{BASE}/Group/cohort-a/$export?")
    assert "_since=2024-01-01T00%3A00%3A00%2B05%3A00" in url  # '+' percent-encoded
    query = parse_qs(urlsplit(url).query)
    assert query["_type"] == ["Patient,Observation"]  # one comma-joined value, duplicates dropped
    assert query["_outputFormat"] == ["application/fhir+ndjson"]
    assert query["_typeFilter"] == ["Observation?code=a|b"]
    assert http.headers["Accept"] == "application/fhir+json"
    assert http.headers["Prefer"] == "respond-async"
    assert http.extensions[bulk.NO_RESEND] is True
    assert ExportRequest(lenient=True).build(BASE).headers["Prefer"] == "respond-async, handling=lenient"
    assert str(ExportRequest().build(BASE).url).startswith(f"{BASE}/$export?")
    assert str(ExportRequest(level="Patient").build(BASE).url).startswith(f"{BASE}/Patient/$export?")


def test_kick_off_posts_only_for_patient_references() -> None:
    http = ExportRequest(level="Patient", patients=("Patient/1", "2"), since="2024-01-01T00:00:00Z",
                         types=("Patient",)).build(BASE)
    assert http.method == "POST" and http.headers["Content-Type"] == "application/fhir+json"
    body = json.loads(http.content)
    assert body["resourceType"] == "Parameters"
    params = {(p["name"], json.dumps({k: v for k, v in p.items() if k != "name"})) for p in body["parameter"]}
    assert ("_since", json.dumps({"valueInstant": "2024-01-01T00:00:00Z"})) in params
    assert ("patient", json.dumps({"valueReference": {"reference": "Patient/1"}})) in params
    assert ("patient", json.dumps({"valueReference": {"reference": "Patient/2"}})) in params


@pytest.mark.parametrize("kwargs", [
    {"level": "Encounter"},
    {"level": "Group"},  # no id
    {"level": "Group/../x"},
    {"level": "Patient", "group_id": "g"},
    {"since": "2024-01-01"},  # no time, no zone
    {"since": "2024-01-01T00:00:00"},  # no zone
    {"since": "2999-01-01T00:00:00Z"},  # future
    {"types": "Patient;DROP"},
    {"type_filters": ("code=1",)},
    {"types": ("Patient",), "type_filters": ("Observation?code=1",)},
    {"output_format": "text/csv"},
    {"patients": ("1",)},  # system level
])
def test_bad_requests_are_refused_before_any_request(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ExportRequest(**kwargs)


def test_since_forms() -> None:
    assert ExportRequest(since="2024-01-01 10:00:00+00:00").since == "2024-01-01T10:00:00+00:00"
    assert ExportRequest(since="2024-01-01T10:00:00.123456789-0700").since == "2024-01-01T10:00:00.123456789-0700"
    import pendulum

    assert ExportRequest(since=pendulum.datetime(2024, 1, 2, tz="UTC")).since == "2024-01-02T00:00:00Z"
    assert ExportRequest(since="").since is None and ExportRequest(since="None").since is None


def test_capability_preflight_names_the_certified_track() -> None:
    with pytest.raises(CapabilityError, match="certified"):
        bulk.kick_off(PROP, ExportRequest())
    with pytest.raises(CapabilityError, match="not served"):
        bulk.kick_off(CERT, ExportRequest(types=("Spaceship",)))


def test_kick_off_flow_answers_and_refusals() -> None:
    location = httpx.Response(202, headers={"Content-Location": "fhir-services/$export-status/9"})
    url, steps = by_hand(bulk.kick_off(CERT, ExportRequest()), [location])
    assert url == f"{BASE}/fhir-services/$export-status/9" and len(steps) == 1
    # 429: the server refused before acting, so wait its Retry-After and send again
    throttled = httpx.Response(429, headers={"Retry-After": "7"})
    url, steps = by_hand(bulk.kick_off(CERT, ExportRequest()), [throttled, location])
    assert [type(s).__name__ for s in steps] == ["Request", "Sleep", "Request"] and steps[1].seconds == 7
    # 5xx: a job may exist; the flow does not send again
    flow = bulk.kick_off(CERT, ExportRequest())
    with pytest.raises(ServerError, match="not resent"):
        by_hand(flow, [httpx.Response(503)])
    with pytest.raises(ValidationError) as info:
        by_hand(bulk.kick_off(CERT, ExportRequest()), [httpx.Response(400, json=outcome("not-supported"))])
    assert info.value.codes == ("not-supported",)


# -- status polling ------------------------------------------------------------------------------

MANIFEST: dict[str, Any] = {
    "transactionTime": "2024-05-01T10:00:00.000Z", "request": f"{BASE}/$export?_type=Patient",
    "requiresAccessToken": False, "futureKey": {"ignored": True},
    "output": [{"type": "Patient", "url": f"{STORAGE}/p1.ndjson?sig=abc", "count": 2, "extension": {"x": 1}},
               {"type": "Patient", "url": f"{STORAGE}/p2.ndjson?sig=abc"}],
    "error": [],
}


def poll(answers: list[httpx.Response], policy: PollPolicy | None = None) -> tuple[Any, list[Any]]:
    return by_hand(bulk.poll_status(f"{BASE}/status/1", policy or PollPolicy()), answers)


def test_poll_honours_retry_after_clamped_and_backs_off_without_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    answers = [
        httpx.Response(202, headers={"Retry-After": "5", "X-Progress": "50%\x1b[31m done" + "x" * 200}),
        httpx.Response(202, headers={"Retry-After": date}),
        httpx.Response(202, headers={"Retry-After": "86400"}),
        httpx.Response(202, headers={"Retry-After": "0"}),
        httpx.Response(202),
        httpx.Response(202),
        httpx.Response(200, json=MANIFEST, headers={"Expires": "Wed, 01 May 2024 11:00:00 GMT"}),
    ]
    manifest, steps = poll(answers, PollPolicy(min_wait=1, max_wait=600, initial_wait=2))
    sleeps = [s.seconds for s in steps if isinstance(s, Sleep)]
    assert sleeps[0] == 5
    assert 25 <= sleeps[1] <= 31  # HTTP-date form
    assert sleeps[2] == 600  # clamped to max_wait
    assert sleeps[3] == 2 * 1.5 ** 3  # Retry-After: 0 asks for no wait: the normal backoff instead
    assert sleeps[4] < sleeps[5]  # exponential backoff without Retry-After
    assert manifest.expires == "Wed, 01 May 2024 11:00:00 GMT"
    progress = [r.getMessage() for r in caplog.records if "in progress" in r.getMessage()]
    assert "(50%" in progress[0] and "\x1b" not in progress[0] and len(progress[0]) < 200


def test_poll_transient_failures_keep_polling_and_fatal_ones_fail() -> None:
    answers = [httpx.Response(503), httpx.Response(500, json=outcome("transient")),
               httpx.Response(429, headers={"Retry-After": "3"}), httpx.Response(504, text="<html>gateway</html>"),
               httpx.Response(200, json=MANIFEST)]
    manifest, steps = poll(answers)
    assert len(manifest.output) == 2 and sum(isinstance(s, Sleep) for s in steps) == 4
    with pytest.raises(ExportFailedError) as failed:
        poll([httpx.Response(500, json=outcome("processing"))])
    assert failed.value.codes == ("processing",)
    with pytest.raises(ExportFailedError):
        poll([httpx.Response(400)])
    with pytest.raises(ExportGoneError):
        poll([httpx.Response(404, json=outcome("not-found"))])
    with pytest.raises(ExportGoneError):
        poll([httpx.Response(410)])
    with pytest.raises(AuthError):
        poll([httpx.Response(401)])
    with pytest.raises(ServerError, match="kept failing"):
        poll([httpx.Response(503)] * 4, PollPolicy(max_errors=3))


def test_poll_transient_count_resets_on_progress() -> None:
    answers = [httpx.Response(503), httpx.Response(503), httpx.Response(202), httpx.Response(503),
               httpx.Response(503), httpx.Response(200, json=MANIFEST)]
    manifest, _ = poll(answers, PollPolicy(max_errors=2))
    assert manifest.transaction_time == "2024-05-01T10:00:00.000Z"


# -- the manifest --------------------------------------------------------------------------------

def test_manifest_is_read_leniently(caplog: pytest.LogCaptureFixture) -> None:
    m = Manifest.parse(MANIFEST, base=f"{BASE}/status/1")
    assert [i.name for i in m.output] == ["output/Patient.0001.ndjson", "output/Patient.0002.ndjson"]
    assert [i.count for i in m.output] == [2, None] and m.deleted == () and m.error == ()
    assert m.to_dict()["output"][0]["url"] == f"{STORAGE}/p1.ndjson"  # signature not stored
    relative = Manifest.parse({"transactionTime": "t", "requiresAccessToken": True,
                               "output": [{"type": "Observation", "url": "../files/o.ndjson"}],
                               "deleted": [{"type": "Bundle", "url": "d.ndjson", "count": 0}],
                               "error": [{"url": "e.ndjson"}]}, base=f"{BASE}/status/1")
    assert relative.output[0].url == f"{BASE}/files/o.ndjson"
    assert relative.error[0].type == "OperationOutcome"
    assert relative.error[0].name == "error/OperationOutcome.0001.ndjson"
    assert [i.section for i in relative.items] == ["output", "deleted", "error"]
    caplog.set_level(logging.WARNING)
    assert Manifest.parse({"output": []}).requires_access_token is True  # absent: token, own origin only
    assert "requiresAccessToken" in caplog.text
    for broken in ([], {"output": "x", "requiresAccessToken": False},
                   {"output": [{"type": "Patient"}], "requiresAccessToken": False},
                   {"output": [{"type": "../etc", "url": "u"}], "requiresAccessToken": False}):
        with pytest.raises(Exception, match="manifest"):
            Manifest.parse(broken)


# -- the NDJSON sink -----------------------------------------------------------------------------

def item(rtype: str = "Patient", count: int | None = None, section: str = "output",
         url: str = f"{STORAGE}/f.ndjson?sig=1") -> ManifestItem:
    return ManifestItem(section, rtype, url, count, f"{section}/{rtype}.0001.ndjson")


def feed(tmp_path: Path, it: ManifestItem, body: bytes, chunk: int = 7) -> NdjsonSink:
    sink = NdjsonSink(tmp_path, it)
    sink.open()
    try:
        for i in range(0, len(body), chunk):
            sink.write(body[i:i + chunk])
        sink.close()
    except VerificationError:
        sink.abort()
        raise
    return sink


def ndjson(*resources: dict[str, Any], eol: bytes = b"\n") -> bytes:
    return b"".join(json.dumps(r).encode() + eol for r in resources)


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096])
def test_sink_verifies_every_line_across_any_chunking(tmp_path: Path, chunk: int) -> None:
    body = ndjson(*({"resourceType": "Patient", "id": str(i), "name": "ü"} for i in range(5)), eol=b"\r\n")
    body += b"\n" + json.dumps({"resourceType": "Patient", "id": "last"}).encode()  # blank line, no final newline
    sink = feed(tmp_path, item(count=6), body, chunk)
    record = sink.commit()
    assert record.lines == 6 and record.bytes == len(body)
    assert (tmp_path / "output/Patient.0001.ndjson").read_bytes() == body
    assert not (tmp_path / "output/Patient.0001.ndjson.part").exists()
    import hashlib

    assert record.sha256 == hashlib.sha256(body).hexdigest() and record.source == f"{STORAGE}/f.ndjson"


@pytest.mark.parametrize(("body", "match"), [
    (b'{"resourceType":"Patient"}\n{"resourceType":"Patient"', "line 2 is not JSON"),
    (b'{"resourceType":"Observation","id":"1"}\n', "'Observation', expected 'Patient'"),
    (b'[1,2]\n', "no resourceType"),
    (b'{"resourceType":"Patient","x":"\xff"}\n', "not UTF-8"),
    (b'{"resourceType":"Patient"}\n', "has 1 resources but the manifest says 2"),
])
def test_sink_refuses_what_the_manifest_did_not_promise(tmp_path: Path, body: bytes, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        feed(tmp_path, item(count=2 if "manifest says" in match else None), body)
    assert list((tmp_path / "output").iterdir()) == []  # the partial file is gone
    # messages name the file and line, never content
    with pytest.raises(VerificationError) as info:
        feed(tmp_path, item(), b'{"resourceType":"Observation","name":"Secret Phi"}\n')
    assert "Phi" not in str(info.value)


def test_sink_bounds_line_length(tmp_path: Path) -> None:
    sink = NdjsonSink(tmp_path, item(), max_line_bytes=100)
    sink.open()
    for _ in range(10):
        sink.write(b"x" * 10)
    with pytest.raises(VerificationError, match="longer than 100"):
        sink.write(b"x" * 10)


def test_sink_tallies_error_files(tmp_path: Path) -> None:
    two = {"resourceType": "OperationOutcome",
           "issue": [outcome("forbidden")["issue"][0], {"severity": "information", "code": "informational"}]}
    body = ndjson(outcome("not-supported", "warning"), outcome("forbidden"), two)
    record = feed(tmp_path, item("OperationOutcome", section="error"), body).commit()
    assert record.issues == {"warning/not-supported": 1, "error/forbidden": 2, "information/informational": 1}


def test_error_policy() -> None:
    result = {"run_folder": "/x", "errors": {"count": 3, "fatal": 2, "by_code": {"forbidden": 2},
                                             "by_severity": {"error": 2, "warning": 1}, "files": ["e"]}}
    with pytest.raises(ExportErrorsReported, match="forbidden=2"):
        bulk.apply_error_policy(result, "fail")
    bulk.apply_error_policy(result, "warn")
    bulk.apply_error_policy(result, "ignore")
    bulk.apply_error_policy({**result, "errors": {**result["errors"], "fatal": 0}}, "fail")  # warnings only
    with pytest.raises(ConfigurationError):
        bulk.apply_error_policy(result, "explode")


# -- per-file download flow ----------------------------------------------------------------------

def test_file_request_credentials_rule() -> None:
    assert bulk.file_request(item(), False).extensions[NO_CREDENTIALS] is True
    req = bulk.file_request(item(), True)
    assert NO_CREDENTIALS not in req.extensions and req.headers["Accept"] == "application/fhir+ndjson"


def test_download_flow_retries_transient_and_broken_transfers(tmp_path: Path) -> None:
    run = ExportRun(tmp_path, ExportRequest())
    it = item(count=1)
    flow = bulk.download_file(run, it, False, DownloadPolicy(retries=3))
    steps: list[Any] = []
    out: Any = None
    script = [Fetched(503, retry_after=2), Fetched(None, "RemoteProtocolError"), Fetched(200)]
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            record = done.value
            break
        steps.append(step)
        if isinstance(step, Fetch):
            result = script.pop(0)
            if result.ok:
                step.sink.open()
                step.sink.write(b'{"resourceType":"Patient","id":"1"}\n')
                step.sink.close()
            out = result
        else:
            out = None
    assert [type(s).__name__ for s in steps] == ["Fetch", "Sleep", "Fetch", "Sleep", "Fetch"]
    assert steps[1].seconds == 2
    assert record.lines == 1 and run.record(it) == record
    with pytest.raises(bulk.DownloadError, match="HTTP 403"):
        by_hand(bulk.download_file(run, it, False), [Fetched(403)])
    with pytest.raises(bulk.DownloadError, match="after 2 attempt"):
        by_hand(bulk.download_file(run, it, False, DownloadPolicy(retries=1)), [Fetched(500), Fetched(500)])


# -- both faces against a scripted Bulk Data server ----------------------------------------------

class FakeBulkServer:
    """A Bulk Data v2 server that is not the sandbox: files on a foreign storage host (presigned), on the
    FHIR host (token required), and one redirect from the FHIR host to storage."""

    def __init__(self, requires_token: bool = False, polls: int = 2, patients: int = 5) -> None:
        self.requires_token = requires_token
        self.polls = polls
        self.requests: list[httpx.Request] = []
        self.kick_offs = 0
        self.deleted = 0
        self.fail_files: dict[str, list[int]] = {}
        self.patients = [{"resourceType": "Patient", "id": str(i)} for i in range(patients)]
        #: manifest entries as some servers write them: the error entry with another count (and type)
        self.error_entry: dict[str, Any] = {"type": "OperationOutcome"}
        self.patient_count: int | None = None  # None: the true count

    def files(self) -> dict[str, bytes]:
        return {"p.ndjson": ndjson(*self.patients),
                "o.ndjson": ndjson(*({"resourceType": "Observation", "id": f"o{i}"} for i in range(3))),
                "e.ndjson": ndjson(outcome("not-supported", "warning")),
                "d.ndjson": ndjson({"resourceType": "Bundle", "type": "transaction",
                                    "entry": [{"request": {"method": "DELETE", "url": "Patient/9"}}]})}

    def manifest(self) -> dict[str, Any]:
        # with requiresAccessToken true (Cerner-like): one file on the FHIR host, one that 307-redirects
        # from the FHIR host to storage; without: presigned storage URLs only
        signed = "?X-Sig=s3cr3t"
        observations = f"{BASE}/redirect/o.ndjson" if self.requires_token else f"{STORAGE}/bucket/o.ndjson{signed}"
        deleted = f"{BASE}/files/d.ndjson" if self.requires_token else f"{STORAGE}/bucket/d.ndjson{signed}"
        return {"transactionTime": "2024-05-01T10:00:00Z", "request": f"{BASE}/$export",
                "requiresAccessToken": self.requires_token, "someExtension": 1,
                "output": [{"type": "Patient", "url": f"{STORAGE}/bucket/p.ndjson{signed}",
                            "count": len(self.patients) if self.patient_count is None else self.patient_count},
                           {"type": "Observation", "url": observations}],
                "deleted": [{"type": "Bundle", "url": deleted}],
                "error": [{**self.error_entry, "url": f"{STORAGE}/bucket/e.ndjson?X-Sig=s3cr3t"}]}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url, path = request.url, request.url.path
        if str(url) == TOKEN_URL:
            return httpx.Response(200, json={"access_token": TOKEN, "token_type": "bearer", "expires_in": 300})
        name = path.rsplit("/", 1)[-1]
        if url.host == "storage.example":
            if "authorization" in request.headers:
                return httpx.Response(400, text="<Error>Only one auth mechanism allowed</Error>")
            return self._file(name)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json=outcome("login"))
        if path.endswith("/$export"):
            self.kick_offs += 1
            return httpx.Response(202, headers={"Content-Location": f"{BASE}/status/1"})
        if path == "/r4/status/1":
            if request.method == "DELETE":
                self.deleted += 1
                return httpx.Response(202, json=outcome("informational", "information"))
            if self.polls > 0:
                self.polls -= 1
                return httpx.Response(202, headers={"Retry-After": "1", "X-Progress": "working"})
            return httpx.Response(200, json=self.manifest())
        if path.startswith("/r4/redirect/"):
            return httpx.Response(307, headers={"Location": f"{STORAGE}/bucket/{name}?X-Sig=s3cr3t"})
        if path.startswith("/r4/files/"):
            return self._file(name)
        return httpx.Response(404)

    def _file(self, name: str) -> httpx.Response:
        failures = self.fail_files.get(name)
        if failures:
            return httpx.Response(failures.pop(0))
        return httpx.Response(200, content=self.files()[name], headers={"Content-Type": "application/fhir+ndjson"})

    def credential_leaks(self) -> list[str]:
        return [str(r.url) for r in self.requests if r.url.host != "fhir.example"
                and ("authorization" in r.headers or "x-api-key" in r.headers)]


def cert_config() -> ClientConfig:
    return ClientConfig(track="certified", fhir_base=BASE, auth_method="client_secret", client_id="c",
                        client_secret="S", token_url=TOKEN_URL, scope="system/*.read", max_retries=1)


@pytest.fixture
def server() -> FakeBulkServer:
    return FakeBulkServer()


def sync_client(server: FakeBulkServer, **kw: Any) -> BulkExportClient:
    fhir = FhirClient(cert_config(), transport=httpx.MockTransport(server), sleep=lambda s: None)
    return BulkExportClient(fhir, **kw)


def check_export(result: dict[str, Any], folder: Path, server: FakeBulkServer) -> None:
    assert result["output"]["Patient"] == {"count": len(server.patients), "files": ["output/Patient.0001.ndjson"]}
    assert result["output"]["Observation"]["count"] == 3
    assert result["deleted"] == {"count": 1, "files": ["deleted/Bundle.0001.ndjson"]}
    assert result["errors"]["by_code"] == {"not-supported": 1} and result["errors"]["fatal"] == 0
    assert result["transaction_time"] == "2024-05-01T10:00:00Z"
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 4 and all("  " in line for line in sums)
    stored = (folder / "manifest.json").read_text()
    assert "s3cr3t" not in stored and TOKEN not in stored
    assert TOKEN not in (folder / "_state/export.json").read_text()
    assert server.credential_leaks() == []
    assert server.kick_offs == 1 and server.deleted == 1  # released on the server after success


def test_sync_face_full_export(server: FakeBulkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = sync_client(server).export(ExportRequest(types=("Patient", "Observation")), tmp_path)
    check_export(result, tmp_path, server)
    assert TOKEN not in caplog.text and "s3cr3t" not in caplog.text and '"id"' not in caplog.text
    storage_hits = [r for r in server.requests if r.url.host == "storage.example"]
    assert len(storage_hits) == 4
    assert all(r.headers["Accept"] == "application/fhir+ndjson" for r in storage_hits)


def test_token_only_to_the_fhir_origin_when_required(tmp_path: Path) -> None:
    server = FakeBulkServer(requires_token=True)
    result = sync_client(server).export(ExportRequest(), tmp_path)
    check_export(result, tmp_path, server)
    on_fhir = [r for r in server.requests if r.url.path in ("/r4/files/d.ndjson", "/r4/redirect/o.ndjson")]
    assert len(on_fhir) == 2 and all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in on_fhir)
    # the 307 from the FHIR host was followed to storage, without the token (credential_leaks() is empty)
    assert {r.url.path for r in server.requests if r.url.host == "storage.example"} == {
        "/bucket/p.ndjson", "/bucket/o.ndjson", "/bucket/e.ndjson"}


async def test_async_face_full_export(server: FakeBulkServer, tmp_path: Path) -> None:
    async def no_sleep(_: float) -> None:
        return None

    async with AsyncFhirClient(cert_config(), transport=httpx.MockTransport(server), sleep=no_sleep) as fhir:
        result = await AsyncBulkExportClient(fhir, download=DownloadPolicy(concurrency=2)).export(
            ExportRequest(types=("Patient", "Observation")), tmp_path)
    check_export(result, tmp_path, server)


def test_retried_run_resumes_the_saved_job_and_skips_stored_files(server: FakeBulkServer, tmp_path: Path) -> None:
    request = ExportRequest(types=("Patient", "Observation"))
    client = sync_client(server)
    server.fail_files["o.ndjson"] = [403, 403]  # refused on the first pass and after a fresh manifest
    with pytest.raises(bulk.DownloadError, match="HTTP 403"):
        client.export(request, tmp_path)
    state = json.loads((tmp_path / "_state/export.json").read_text())
    assert state["stage"] == "ready" and state["status_url"] == f"{BASE}/status/1"
    assert server.kick_offs == 1 and server.deleted == 0
    fetched_before = sum(r.url.host == "storage.example" for r in server.requests)
    # tamper with one stored file: it must be fetched again; the others are skipped
    (tmp_path / "deleted/Bundle.0001.ndjson").write_bytes(b"")
    result = client.export(request, tmp_path)
    check_export(result, tmp_path, server)
    fetched_after = [r.url.path for r in server.requests if r.url.host == "storage.example"][fetched_before:]
    assert sorted(fetched_after) == ["/bucket/d.ndjson", "/bucket/o.ndjson"]
    # a third run: complete already, no network
    before = len(server.requests)
    assert client.export(request, tmp_path) == result and len(server.requests) == before


def test_expired_links_get_one_fresh_manifest(server: FakeBulkServer, tmp_path: Path) -> None:
    server.fail_files["p.ndjson"] = [403]
    result = sync_client(server).export(ExportRequest(), tmp_path)
    assert result["output"]["Patient"]["count"] == 5
    assert sum(r.url.path == "/r4/status/1" and r.method == "GET" for r in server.requests) == 4  # 2x202+2x200


def test_transient_file_failures_are_retried(server: FakeBulkServer, tmp_path: Path) -> None:
    server.fail_files["p.ndjson"] = [503, 429]
    result = sync_client(server, download=DownloadPolicy(retries=2, backoff=0)).export(ExportRequest(), tmp_path)
    assert result["output"]["Patient"]["count"] == 5


def test_broken_transfer_is_retried_from_scratch(tmp_path: Path) -> None:
    server = FakeBulkServer()
    cut = {"n": 1}
    original = server._file

    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b'{"resourceType":"Patient","id":"0"}\n{"resourceType":"Pat'
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def file(name: str) -> httpx.Response:
        if name == "p.ndjson" and cut["n"]:
            cut["n"] -= 1
            return httpx.Response(200, stream=Broken())
        return original(name)

    server._file = file  # type: ignore[method-assign]
    result = sync_client(server, download=DownloadPolicy(backoff=0)).export(ExportRequest(), tmp_path)
    assert result["output"]["Patient"]["count"] == 5
    lines = (tmp_path / "output/Patient.0001.ndjson").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["0", "1", "2", "3", "4"]


def test_gone_job_is_kicked_off_again_a_bounded_number_of_times(server: FakeBulkServer, tmp_path: Path) -> None:
    request = ExportRequest()
    run = ExportRun(tmp_path, request)
    run.kicked_off(f"{BASE}/status/expired")  # a saved job the server forgot
    client = sync_client(server, max_restarts=1)
    result = client.export(request, tmp_path)
    assert result["files"] == 4 and server.kick_offs == 1
    assert json.loads((tmp_path / "_state/export.json").read_text())["restarts"] == 1


def test_a_different_request_is_a_different_export(server: FakeBulkServer, tmp_path: Path) -> None:
    sync_client(server).export(ExportRequest(types=("Patient",)), tmp_path)
    assert (tmp_path / "output/Patient.0001.ndjson").exists()
    run = ExportRun(tmp_path, ExportRequest(types=("Observation",)))
    assert run.state.stage == "new" and not (tmp_path / "output/Patient.0001.ndjson").exists()


def test_cancel_flow() -> None:
    assert by_hand(bulk.cancel(f"{BASE}/status/1"), [httpx.Response(202)])[0] is True
    assert by_hand(bulk.cancel(f"{BASE}/status/1"), [httpx.Response(404)])[0] is False
    with pytest.raises(ServerError):
        by_hand(bulk.cancel(f"{BASE}/status/1"), [httpx.Response(500)])


def test_release_after_success_is_not_fatal(tmp_path: Path) -> None:
    server = FakeBulkServer()
    original = server.__call__

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(405, json=outcome("not-supported"))
        return original(request)

    fhir = FhirClient(cert_config(), transport=httpx.MockTransport(handler), sleep=lambda s: None)
    assert BulkExportClient(fhir).export(ExportRequest(), tmp_path)["files"] == 4


def test_kick_off_is_sent_once_even_on_5xx(tmp_path: Path) -> None:
    calls = {"export": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            return httpx.Response(200, json={"access_token": TOKEN, "token_type": "bearer"})
        calls["export"] += 1
        return httpx.Response(503)

    fhir = FhirClient(cert_config().__class__(**{**cert_config().__dict__, "max_retries": 5}),
                      transport=httpx.MockTransport(handler), sleep=lambda s: None)
    with pytest.raises(ServerError, match="not resent"):
        BulkExportClient(fhir).kick_off(ExportRequest())
    assert calls["export"] == 1


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_a_kick_off_without_answer_is_not_resent(face: str) -> None:
    calls = {"export": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            return httpx.Response(200, json={"access_token": TOKEN, "token_type": "bearer"})
        calls["export"] += 1
        raise httpx.ReadTimeout("no answer", request=request)

    config = cert_config().__class__(**{**cert_config().__dict__, "max_retries": 5})
    if face == "sync":
        with FhirClient(config, transport=httpx.MockTransport(handler), sleep=lambda s: None) as fhir, \
                pytest.raises(TransportError, match=r"ReadTimeout.*not resent"):
            BulkExportClient(fhir).kick_off(ExportRequest())
    else:
        async def no_sleep(_: float) -> None:
            return None

        async with AsyncFhirClient(config, transport=httpx.MockTransport(handler), sleep=no_sleep) as afhir:
            with pytest.raises(TransportError, match=r"ReadTimeout.*not resent"):
                await AsyncBulkExportClient(afhir).kick_off(ExportRequest())
    assert calls["export"] == 1


def test_the_restart_policy_counts_in_the_state_file(tmp_path: Path) -> None:
    run = ExportRun(tmp_path, ExportRequest())
    run.kicked_off(f"{BASE}/status/1")
    run.restart_if_allowed(1, "job gone")  # the one allowed restart: the job and its files are forgotten
    assert run.state.stage == "new" and run.state.status_url is None and run.state.restarts == 1
    run.restart_if_allowed(1, "no saved status URL", count=False)  # not counted
    run.kicked_off(f"{BASE}/status/2")
    gone = ExportGoneError("bulk export status: gone", status_code=410)
    with pytest.raises(ExportGoneError, match=r"max_restarts=1 kick-offs were already made") as err:
        ExportRun(tmp_path, ExportRequest()).restart_if_allowed(1, gone)  # read back from disk
    assert err.value.status_code == 410 and err.value.__cause__ is gone
    assert json.loads((tmp_path / "_state/export.json").read_text())["status_url"] == f"{BASE}/status/2"


class Tracker:
    """Flows for Parallel: counts how many run at once and how many were taken from the iterable."""

    def __init__(self) -> None:
        self.active = self.peak = self.created = 0
        self.lock = threading.Lock()

    def flows(self, n: int, failing: int) -> Iterator[Any]:
        for i in range(n):
            self.created += 1
            yield self.flow(i, failing)

    def flow(self, i: int, failing: int) -> Any:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield Sleep(0.005)
            if i == failing:
                raise bulk.DownloadError(f"file {i} failed")
        finally:
            with self.lock:
                self.active -= 1
        return i


def test_parallel_is_bounded_lazy_and_keeps_only_failures(server: FakeBulkServer) -> None:
    fhir = FhirClient(cert_config(), transport=httpx.MockTransport(server), sleep=time.sleep)
    tracker = Tracker()
    failures = fhir.run(_parallel_flow(tracker.flows(30, failing=7), limit=3))
    assert [str(f) for f in failures] == ["file 7 failed"]
    assert tracker.created == 30 and 1 < tracker.peak <= 3


async def test_async_parallel_is_bounded_and_keeps_only_failures(server: FakeBulkServer) -> None:
    async with AsyncFhirClient(cert_config(), transport=httpx.MockTransport(server)) as fhir:
        tracker = Tracker()
        failures = await fhir.run(_parallel_flow(tracker.flows(12, failing=0), limit=2))
    assert [str(f) for f in failures] == ["file 0 failed"]
    assert tracker.created == 12 and 1 < tracker.peak <= 2


def _parallel_flow(flows: Iterator[Any], limit: int) -> Any:
    failures = yield bulk.Parallel(flows, limit)
    return failures


def test_downloads_run_download_concurrency_at_a_time(tmp_path: Path) -> None:
    run = ExportRun(tmp_path, ExportRequest())
    flow = bulk.finish(run, f"{BASE}/status/1", download=DownloadPolicy(concurrency=3))
    next(flow)  # the status poll
    step = flow.send(httpx.Response(200, json={"transactionTime": "2024-05-01T10:00:00Z", "requiresAccessToken": False,
                                               "output": [{"type": "Patient", "url": f"{STORAGE}/p.ndjson"}]}))
    assert isinstance(step, bulk.Parallel) and step.limit == 3


# -- issue 13: counts that do not match ----------------------------------------------------------

def fetches(server: FakeBulkServer, name: str) -> int:
    return sum(r.url.path == f"/bucket/{name}" for r in server.requests)


@pytest.mark.parametrize("entry_type", ["OperationOutcome", "Patient"])
def test_an_error_file_count_that_differs_is_a_warning_and_the_error_policy_decides(
        server: FakeBulkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, entry_type: str) -> None:
    # the server copies the failed output file's count (and type) into the error entry; the file holds one line
    server.error_entry = {"type": entry_type, "count": len(server.patients)}
    caplog.set_level(logging.INFO)
    result = sync_client(server).export(ExportRequest(types=("Patient", "Observation")), tmp_path)
    assert fetches(server, "e.ndjson") == 1  # fetched once: a report is not verified against its count
    assert result["errors"]["files"] == ["error/OperationOutcome.0001.ndjson"]
    assert result["errors"]["count"] == 1 and result["errors"]["by_code"] == {"not-supported": 1}
    assert "holds 1 OperationOutcome line(s) but its manifest entry says count 5" in caplog.text
    check_export(result, tmp_path, server)
    bulk.apply_error_policy(result, "ignore")  # the error policy is reached, and decides
    # a resumed run keeps the stored error file (its checkpoint holds against the odd count)
    before = len(server.requests)
    run = ExportRun(tmp_path, ExportRequest(types=("Patient", "Observation")))
    assert run.pending(Manifest.parse(server.manifest())) == []
    assert len(server.requests) == before


def test_an_error_file_with_another_resource_type_still_fails_verification(tmp_path: Path) -> None:
    with pytest.raises(VerificationError, match="line 1 is 'Patient', expected 'OperationOutcome'"):
        feed(tmp_path, item("OperationOutcome", count=1, section="error"), ndjson({"resourceType": "Patient"}))


def test_an_output_count_that_differs_after_a_complete_transfer_fails_at_once(server: FakeBulkServer,
                                                                              tmp_path: Path) -> None:
    server.patient_count = 7  # the file holds 5
    with pytest.raises(VerificationError, match="has 5 resources but the manifest says 7") as failed:
        sync_client(server).export(ExportRequest(types=("Patient",)), tmp_path)
    assert "not fetched again" in str(failed.value)
    assert fetches(server, "p.ndjson") == 1  # the same bytes again would not change the count
    assert not (tmp_path / "output/Patient.0001.ndjson").exists()


def test_a_broken_transfer_is_fetched_once_more_then_a_wrong_count_fails_naming_both(tmp_path: Path) -> None:
    run = ExportRun(tmp_path, ExportRequest())
    fetched: list[Fetch] = []

    def answer(step: Fetch) -> Fetched:
        fetched.append(step)
        if len(fetched) == 1:
            return Fetched(None, "RemoteProtocolError")  # the transfer broke: fetch again
        step.sink.open()
        step.sink.write(b'{"resourceType":"Patient","id":"1"}\n')  # complete, but 1 line, not 3
        try:
            step.sink.close()
        except VerificationError as exc:
            step.sink.abort()
            return Fetched.failure(exc)
        return Fetched(200)

    def drive(flow: Any) -> Any:
        out: Any = None
        while True:
            step = flow.send(out)
            out = answer(step) if isinstance(step, Fetch) else None

    flow = bulk.download_file(run, item(count=3), False, DownloadPolicy(retries=3))
    with pytest.raises(VerificationError, match="has 1 resources but the manifest says 3"):
        drive(flow)
    assert len(fetched) == 2


def test_the_sink_gathers_small_chunks_into_blocks(tmp_path: Path) -> None:
    # one HTTP chunk per resource (some servers): written, hashed and checked per block, not per chunk
    lines = [json.dumps({"resourceType": "Patient", "id": str(i), "pad": "x" * 600}).encode() + b"\n"
             for i in range(2000)]
    sink = NdjsonSink(tmp_path, item(count=len(lines)), block_bytes=64 * 1024)
    sink.open()
    for line in lines:
        sink.write(line)
    sink.close()
    record = sink.commit()
    body = b"".join(lines)
    assert record.lines == 2000 and record.bytes == len(body)
    assert (tmp_path / "output/Patient.0001.ndjson").read_bytes() == body
    import hashlib

    assert record.sha256 == hashlib.sha256(body).hexdigest()
    assert sink.blocks <= len(body) // (64 * 1024) + 1 < len(lines) // 50  # ~22 blocks for 2000 chunks
    # large chunks pass through as they are, one block each
    big = NdjsonSink(tmp_path, item(count=len(lines)), block_bytes=64 * 1024)
    big.open()
    big.write(body)
    big.close()
    assert big.blocks == 1


# -- issue 13: one poll policy for the status URL -------------------------------------------------

def test_status_polls_are_left_to_the_poll_loop_and_no_answer_is_a_transient_error() -> None:
    flow = bulk.poll_status(f"{BASE}/status/1", PollPolicy(max_errors=2))
    request = next(flow)
    assert request.extensions[FLOW_RETRIES] is True  # the face sends it once: no generic retries
    sleep = flow.throw(TransportError("bulk export status got no answer (ReadTimeout)"))
    assert isinstance(sleep, Sleep)
    assert isinstance(flow.send(None), httpx.Request)
    assert isinstance(flow.send(httpx.Response(500, json=outcome("transient"))), Sleep)  # error 2 of 2
    assert isinstance(flow.send(None), httpx.Request)
    with pytest.raises(TransportError, match="kept failing \\(3 transient failures in a row"):
        flow.throw(TransportError("bulk export status got no answer (ConnectError)"))


class StatusServer:
    """A Bulk Data server whose status URL fails ``failures`` times (HTTP 500 or no answer), then answers
    the manifest of an export with no files; it counts what the status URL sees."""

    def __init__(self, failures: int, kind: str = "500") -> None:
        self.failures = failures
        self.kind = kind
        self.status_requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            return httpx.Response(200, json={"access_token": TOKEN, "token_type": "bearer", "expires_in": 300})
        self.status_requests += 1
        if self.status_requests <= self.failures:
            if self.kind == "drop":
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
            return httpx.Response(500, json=outcome("transient"))
        return httpx.Response(200, json={"transactionTime": "2024-05-01T10:00:00Z", "requiresAccessToken": False,
                                         "output": []})


@pytest.mark.parametrize("kind", ["500", "drop"])
@pytest.mark.parametrize("face", ["sync", "async"])
async def test_the_poll_loop_alone_decides_about_failed_status_polls(face: str, kind: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    config = dataclasses.replace(cert_config(), max_retries=5)  # the generic layer would retry 5 times

    async def no_sleep(_: float) -> None:
        return None

    async def poll(server: StatusServer, max_errors: int) -> Manifest:
        policy = PollPolicy(min_wait=0, max_wait=0, initial_wait=0, max_errors=max_errors)
        if face == "sync":
            with FhirClient(config, transport=httpx.MockTransport(server), sleep=lambda s: None) as fhir:
                return BulkExportClient(fhir, poll=policy).poll(f"{BASE}/status/1")
        async with AsyncFhirClient(config, transport=httpx.MockTransport(server), sleep=no_sleep) as afhir:
            return await AsyncBulkExportClient(afhir, poll=policy).poll(f"{BASE}/status/1")

    server = StatusServer(failures=3, kind=kind)
    manifest = await poll(server, max_errors=3)
    assert manifest.output == () and server.status_requests == 4  # 3 failures, each seen by the poll loop
    assert caplog.text.count("transient, polling again") == 3
    server = StatusServer(failures=3, kind=kind)
    with pytest.raises(TransportError if kind == "drop" else ServerError, match="kept failing"):
        await poll(server, max_errors=2)
    assert server.status_requests == 3  # max_poll_errors=2: the third failure ends the poll
