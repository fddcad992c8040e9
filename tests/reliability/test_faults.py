"""Faults from the sandbox's switches over real HTTP, each checked against the sandbox's ground truth:
the run ends with every id exactly once and nothing written twice, or fails with an error that says what
to do. These are end-to-end guarantees of a whole run (a search streamed to NDJSON, a conditional create,
a document upload), not single-call checks: those live in tests/integration/test_client_sandbox.py."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client.documents import UPLOAD_KEY_SYSTEM, upload_document
from airflow_provider_modmed.client.ndjson import search_to_ndjson
from airflow_provider_modmed.errors import ModMedError, RateLimitedError, ServerError, TransportError
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.seed import MRN_SYSTEM
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.reliability._figures import Figures
from tests.reliability.conftest import (
    Backoff,
    cert_config,
    client,
    is_page,
    live,
    ndjson_ids,
    on_request,
    prop_config,
)

pytestmark = pytest.mark.integration

PAGE = 4  # 40 patients in pages of 4: ten pages and the empty one after the last


def exactly_once(path: Path, truth: dict[str, str]) -> list[str]:
    ids = ndjson_ids(path)
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert sorted(ids) == sorted(truth), "ids lost or invented"
    return ids


def test_token_expiry_mid_paging(sb: SandboxServer, tmp_path: Path, figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        pages = on_request(c, is_page("Patient"), lambda: sb.faults(expire_tokens=True), times=5)
        result = search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    assert m["unauthorized"] == 1 and m["token_requests"] == 2  # the password grant, then one refresh
    figures.record(ids=result.count, pages=len(pages), duplicates=result.duplicates)


async def test_token_expiry_mid_paging_async_certified(sb: SandboxServer, figures: Figures) -> None:
    from airflow_provider_modmed.client.fhir import AsyncFhirClient

    seen: list[str] = []
    with figures.measure(sb) as m:
        async with AsyncFhirClient(cert_config(sb), sleep=_anosleep) as c:
            async for obs in c.search("Observation", count=25):
                seen.append(obs["id"])
                if len(seen) == 30:
                    sb.faults(expire_tokens=True)
    observations = [certified_id(rid) for rid in live(sb, "Observation")]  # the certified track's own ids
    assert sorted(seen) == sorted(observations) and len(seen) == len(set(seen))
    assert m["unauthorized"] == 1 and m["token_requests"] == 2  # a new signed assertion after the 401
    figures.record(ids=len(seen))


async def _anosleep(seconds: float) -> None:
    return None


def test_refresh_token_rejected_then_full_reauthentication(sb: SandboxServer, tmp_path: Path,
                                                           figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        on_request(c, is_page("Patient"), lambda: sb.faults(expire_tokens=True, revoke_refresh_tokens=True), times=3)
        result = search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    # the first grant, the refused refresh (401 invalid_grant), the new password grant
    assert m["token_requests"] == 3 and m["unauthorized"] == 1
    figures.record(ids=result.count)


def test_429_storm_without_retry_after_mid_paging(sb: SandboxServer, tmp_path: Path, figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    backoff = Backoff()
    with client(prop_config(sb), backoff) as c, figures.measure(sb) as m:
        on_request(c, is_page("Patient"), lambda: sb.faults(rate_storm=4), times=3)
        result = search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    assert m["throttled"] == 4 and m["client_retries"] == 4
    assert backoff.waits == sorted(backoff.waits) and backoff.waits[0] >= 0.5  # jittered exponential backoff
    figures.record(ids=result.count, backoff_asked=backoff.waits and [round(w, 2) for w in backoff.waits])


def test_a_429_storm_longer_than_the_retries_fails_clearly(sb: SandboxServer, figures: Figures) -> None:
    backoff = Backoff()
    with client(prop_config(sb, max_retries=3), backoff) as c, figures.measure(sb) as m:
        c.metadata()
        sb.faults(rate_storm=10)
        with pytest.raises(RateLimitedError) as err:
            list(c.search("Patient", count=PAGE))
    assert str(err.value) == "search Patient failed (HTTP 429) [error/throttled]"  # diagnostics: on request only
    assert err.value.diagnostics() == ("Rate limit exceeded",)
    assert m["throttled"] == 4 and len(backoff.waits) == 3
    figures.record(error=str(err.value))


@pytest.mark.parametrize(("status", "bodiless"), [(500, False), (502, True), (503, False), (503, True), (504, True)])
def test_5xx_bursts_mid_paging(sb: SandboxServer, tmp_path: Path, figures: Figures, status: int,
                               bodiless: bool) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        on_request(c, is_page("Patient"), lambda: sb.faults(
            fail_next={"status": status, "count": 3, "bodiless": bodiless}), times=2)
        result = search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    assert m["injected_failures"] == 3 and m["client_retries"] == 3
    figures.record(ids=result.count)


def test_5xx_on_the_token_endpoint_mid_paging(sb: SandboxServer, tmp_path: Path, figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        on_request(c, is_page("Patient"), lambda: sb.faults(
            expire_tokens=True, fail_next={"status": 503, "count": 2, "path": "/oauth2/grant"}), times=4)
        search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    assert m["injected_failures"] == 2


def drain_abandoned(latency: float) -> None:
    """The server still finishes the calls the client gave up on (each sleeps out its latency first): let them
    end here, or their answers would take the next test's one-shot faults (drop_next, malformed_next)."""
    import time

    time.sleep(latency + 0.2)


def test_read_timeouts_are_retried_until_the_server_is_fast_again(sb: SandboxServer, tmp_path: Path,
                                                                  figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    timer = threading.Timer(1.2, lambda: sb.faults(latency_ms=0))
    with client(prop_config(sb, timeout=0.3)) as c, figures.measure(sb) as m:
        def slow() -> None:
            sb.faults(latency_ms=700)  # longer than the client's 0.3 s timeout
            timer.start()
        on_request(c, is_page("Patient"), slow, times=3)
        try:
            result = search_to_ndjson(c, "Patient", out, count=PAGE)
        finally:
            timer.cancel()
    exactly_once(out, live(sb, "Patient"))
    assert m["client_retries"] >= 2 and m["retried_on"] == {"ReadTimeout": m["client_retries"]}
    figures.record(ids=result.count)
    drain_abandoned(0.7)


def test_a_server_slower_than_the_timeout_fails_clearly(sb: SandboxServer, figures: Figures) -> None:
    with client(prop_config(sb, timeout=0.2, max_retries=1)) as c, figures.measure(sb):
        c.metadata()
        sb.faults(latency_ms=500)
        with pytest.raises(TransportError) as err:
            c.read("Patient", "1")
    assert str(err.value) == "read Patient got no answer (ReadTimeout)"
    figures.record(error=str(err.value))
    drain_abandoned(0.5)


def test_a_dropped_search_page_is_fetched_again(sb: SandboxServer, tmp_path: Path, figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        on_request(c, is_page("Patient"), lambda: sb.faults(drop_next=2), times=3)
        result = search_to_ndjson(c, "Patient", out, count=PAGE)
    exactly_once(out, live(sb, "Patient"))
    assert m["dropped"] == 2 and m["client_retries"] == 2
    figures.record(ids=result.count)


def _patient(mrn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "name": [{"family": "Faulttest", "given": ["Dropped"]}], "gender": "female", "birthDate": "1980-02-02"}


def test_a_dropped_conditional_create_is_one_resource(sb: SandboxServer, figures: Figures) -> None:
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    before = live(sb, "Patient")
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        c.metadata()
        sb.faults(drop_next=1)  # the server creates the Patient, then the answer is cut mid-body
        created = c.create(_patient(mrn), if_none_exist={"identifier": f"{MRN_SYSTEM}|{mrn}"})
        again = c.create(_patient(mrn), if_none_exist={"identifier": f"{MRN_SYSTEM}|{mrn}"})  # a retried task
    new = set(live(sb, "Patient")) - set(before)
    assert new == {created["id"]} == {again["id"]}
    assert m["dropped"] == 1 and m["conditional_create_matched"] == 2
    figures.record(created=len(new))


def test_a_dropped_plain_create_is_not_resent_and_says_so(sb: SandboxServer, figures: Figures) -> None:
    before = live(sb, "Patient")
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        c.metadata()
        sb.faults(drop_next=1)
        with pytest.raises(TransportError) as err:
            c.create(_patient(f"MRN-{uuid.uuid4().hex[:8]}"))
    # the server did the work once; the client did not resend a non-idempotent POST (no duplicate)
    assert len(set(live(sb, "Patient")) - set(before)) == 1
    assert m["client_retries"] == 0
    assert str(err.value) == "create Patient got no answer (RemoteProtocolError)"
    figures.record(created=1, error=str(err.value))


def test_an_expired_presigned_url_is_requested_again(sb: SandboxServer, figures: Figures) -> None:
    content = f"%PDF-1.4 reliability {uuid.uuid4().hex}".encode()
    before = live(sb, "DocumentReference")
    with client(prop_config(sb)) as c, figures.measure(sb) as m:
        on_request(c, lambda r: r.method == "PUT" and r.url.port == _port(sb.storage_url),
                   lambda: sb.faults(expire_presigned=True))
        result = upload_document(c, content, filename="scan.pdf", category="LAB", patient_id="1")
        again = upload_document(c, content, filename="scan.pdf", category="LAB", patient_id="1")
    new = set(live(sb, "DocumentReference")) - set(before)
    assert new == {result.id} and again.id == result.id and not again.created
    assert result.url_attempts == 2 and m["storage_refused"] == 1 and m["uploads"] == 1
    assert m["presigned_issued"] == 2 and m.get("auth_headers_seen_by_storage", 0) == 0
    figures.record(documents_created=len(new), url_attempts=result.url_attempts)


def _port(url: str) -> int:
    import httpx

    return int(httpx.URL(url).port or 0)


# -- what the server sends back is wrong ------------------------------------------------------------

def test_malformed_json_on_a_search_page_fails_clearly_and_the_retry_completes(
        sb: SandboxServer, tmp_path: Path, figures: Figures) -> None:
    out = tmp_path / "patients.ndjson"
    with client(prop_config(sb)) as c, figures.measure(sb):
        on_request(c, is_page("Patient"), lambda: sb.faults(malformed_next=1), times=3)
        with pytest.raises(ModMedError) as err:
            search_to_ndjson(c, "Patient", out, count=PAGE)
        assert str(err.value) == "search Patient answered no Bundle (HTTP 200)"
        result = search_to_ndjson(c, "Patient", out, count=PAGE)  # the task's retry: the file is rewritten
    exactly_once(out, live(sb, "Patient"))
    figures.record(first_try=str(err.value), retry_ids=result.count)


def test_a_wrong_resource_type_on_a_search_page_fails_clearly(sb: SandboxServer, tmp_path: Path,
                                                             figures: Figures) -> None:
    with client(prop_config(sb)) as c:
        on_request(c, is_page("Patient"), lambda: sb.faults(wrong_type_next=1), times=2)
        with pytest.raises(ModMedError, match=r"^search Patient answered no Bundle"):
            search_to_ndjson(c, "Patient", tmp_path / "p.ndjson", count=PAGE)


def test_a_read_answering_another_resource_type_fails_clearly(sb: SandboxServer, figures: Figures) -> None:
    with client(prop_config(sb)) as c:
        c.metadata()
        sb.faults(wrong_type_next=1)
        with pytest.raises(ModMedError, match="read Patient answered a Basic"):
            c.read("Patient", "1")


def test_a_wrong_type_create_answer_fails_clearly_and_the_conditional_retry_finds_it(
        sb: SandboxServer, figures: Figures) -> None:
    mrn = f"MRN-{uuid.uuid4().hex[:8]}"
    before = live(sb, "Patient")
    with client(prop_config(sb)) as c:
        c.metadata()
        sb.faults(wrong_type_next=1)
        with pytest.raises(ModMedError) as err:
            c.create(_patient(mrn), if_none_exist={"identifier": f"{MRN_SYSTEM}|{mrn}"})
        created = c.create(_patient(mrn), if_none_exist={"identifier": f"{MRN_SYSTEM}|{mrn}"})
    assert str(err.value) == "create Patient answered neither the resource nor a Location (HTTP 201)"
    assert set(live(sb, "Patient")) - set(before) == {created["id"]}
    figures.record(first_try=str(err.value), created=1)


def test_5xx_exhausted_on_a_write_fails_clearly_and_writes_nothing(sb: SandboxServer, figures: Figures) -> None:
    before = live(sb, "Patient")
    with client(prop_config(sb, max_retries=2)) as c:
        c.metadata()
        sb.faults(fail_next={"status": 503, "count": 10})
        mrn = f"MRN-{uuid.uuid4().hex[:8]}"
        with pytest.raises(ServerError) as err:
            c.create(_patient(mrn), if_none_exist={"identifier": f"{MRN_SYSTEM}|{mrn}"})
    assert str(err.value) == "create Patient failed (HTTP 503) [error/transient]"
    assert err.value.diagnostics() == ("sandbox fault: injected HTTP 503",)
    assert live(sb, "Patient") == before
    figures.record(error=str(err.value))


def test_upload_key_is_what_makes_the_upload_idempotent(sb: SandboxServer) -> None:
    """The identifier the retry finds: one DocumentReference per key in the ground truth."""
    keys: dict[str, int] = {}
    for rid in live(sb, "DocumentReference"):
        row = sb.app_state.store.get("DocumentReference", rid)
        assert row is not None
        for ident in row.body.get("identifier") or ():
            if ident.get("system") == UPLOAD_KEY_SYSTEM:
                keys[ident["value"]] = keys.get(ident["value"], 0) + 1
    assert all(n == 1 for n in keys.values()), keys
