"""Patient data stays out of error text (issue 13, item 8). A server on 127.0.0.1 echoes what it was sent
in its OperationOutcome ``diagnostics`` (a name and a birth date), as real FHIR servers do, and in an OAuth
``error_description``. Neither reaches ``str(exc)``, ``repr(exc)``, the logs (caplog, DEBUG) or the event a
trigger stores in the metadata database; ``exc.diagnostics()`` returns them to code that asks."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from airflow_provider_modmed.client import AsyncFhirClient, ClientConfig, FhirClient
from airflow_provider_modmed.client.changes import Cursor
from airflow_provider_modmed.client.instants import instant_ms
from airflow_provider_modmed.errors import AuthError, Issue, ModMedError, ValidationError
from tests.security.servers import Answer, LoopbackServer, fhir_json, token_answer

pytestmark = pytest.mark.integration

NAME, BIRTH = "Echoedfamily Echoedgiven", "1961-03-14"
ECHO = f"Patient.name: '{NAME}' with birthDate {BIRTH} does not match the identifier on file"
DETAILS = f"no match for {NAME} ({BIRTH})"


def echoing_outcome(status: int, code: str = "invalid") -> Answer:
    return fhir_json({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": ECHO,
         "expression": [f"Patient.name.where(family='{NAME}')"]},
        {"severity": "warning", "code": "business-rule", "details": {"text": DETAILS}},
    ]}, status)


def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
    p = path.split("?", 1)[0]
    if p.endswith("/oauth2/grant"):
        return token_answer()
    if p.endswith("/export-status/1"):
        return echoing_outcome(500, "processing")  # a failed bulk job, not a transient one
    return echoing_outcome(422 if method == "POST" else 400)


def refusing_token(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
    return 401, {"Content-Type": "application/json"}, json.dumps(
        {"error": "invalid_grant", "error_description": f"no account for {NAME} born {BIRTH}"}).encode()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(route) as s:
        yield s


def config(server: LoopbackServer) -> ClientConfig:
    return ClientConfig(track="proprietary", fhir_base=f"{server.url}/firm/x/ema/fhir/v2", firm="x", api_key="k",
                        username="u", password="p", max_retries=0)


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        assert NAME.split()[0] not in text and BIRTH not in text, text


def assert_withheld(exc: ModMedError, caplog: pytest.LogCaptureFixture) -> None:
    assert_no_phi(str(exc), repr(exc), caplog.text)
    assert exc.diagnostics() == (ECHO, DETAILS)  # the structured data is all there, on request
    assert exc.issues[0].expression == (f"Patient.name.where(family='{NAME}')",)
    assert "[error/" in str(exc) and "[warning/business-rule]" in str(exc)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def test_a_failed_read_and_create_keep_the_echo_out_of_their_text(server: LoopbackServer,
                                                                  logs: pytest.LogCaptureFixture) -> None:
    with FhirClient(config(server), sleep=lambda s: None) as c:
        with pytest.raises(ModMedError) as read:
            c.read("Patient", "1")
        with pytest.raises(ValidationError) as create:
            c.create({"resourceType": "Patient", "name": [{"family": "Echoedfamily"}], "birthDate": BIRTH})
    assert str(read.value) == "read Patient failed (HTTP 400) [error/invalid] [warning/business-rule]"
    assert str(create.value).startswith("create Patient failed (HTTP 422) [error/invalid]")
    assert "read Patient" in logs.text  # the client did log (DEBUG): the check below looks at real output
    assert_withheld(read.value, logs)
    assert_withheld(create.value, logs)


async def test_the_async_face_too(server: LoopbackServer, logs: pytest.LogCaptureFixture) -> None:
    async def nap(seconds: float) -> None:
        return None

    async with AsyncFhirClient(config(server), sleep=nap) as c:
        with pytest.raises(ModMedError) as err:
            await c.read("Patient", "1")
    assert_withheld(err.value, logs)


def test_a_token_error_description_is_server_text_too(logs: pytest.LogCaptureFixture) -> None:
    with LoopbackServer(refusing_token) as s, FhirClient(config(s), sleep=lambda _: None) as c, \
            pytest.raises(AuthError) as err:
        c.read("Patient", "1")
    assert "invalid_grant" in str(err.value)  # the OAuth error code is shown: it is a code, not text
    assert_no_phi(str(err.value), repr(err.value), logs.text)
    assert err.value.diagnostics() == (f"no account for {NAME} born {BIRTH}",)


def test_a_hostile_code_is_not_shown_either() -> None:
    err = ModMedError("read Patient failed", 400, (Issue("error", f"{NAME} {BIRTH}"),))
    assert str(err) == "read Patient failed (HTTP 400) [error/?]"
    assert err.codes == (f"{NAME} {BIRTH}",)  # the structured value is kept as sent


async def test_the_changes_trigger_event_holds_no_echo(server: LoopbackServer, logs: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_modmed.triggers import changes as trig

    @contextlib.asynccontextmanager
    async def client(conn_id: str) -> AsyncIterator[AsyncFhirClient]:
        async with AsyncFhirClient(config(server)) as fhir:
            yield fhir

    monkeypatch.setattr(trig, "_client", client)
    trigger = trig.ModMedChangesTrigger(resource_type="Patient",
                                        cursor=Cursor(instant_ms("2026-05-04T10:00:00Z"), None, {}).to_json())
    events = [e.payload async for e in trigger.run()]
    assert [e["status"] for e in events] == ["error"] and events[0]["error"] == "ValidationError"
    assert "[error/invalid]" in events[0]["message"]
    assert_no_phi(json.dumps(events), logs.text)


async def test_the_bulk_trigger_event_holds_no_echo(server: LoopbackServer, logs: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_modmed.triggers import bulk_export as trig

    class Hook:
        def __init__(self, conn_id: str) -> None:
            pass

        @contextlib.asynccontextmanager
        async def shared_async_client(self) -> AsyncIterator[AsyncFhirClient]:
            async with AsyncFhirClient(config(server)) as fhir:
                yield fhir

    monkeypatch.setattr(trig, "ModMedHook", Hook)
    status_url = f"{server.url}/firm/x/ema/fhir/v2/export-status/1"
    trigger = trig.ModMedBulkExportTrigger(status_url=status_url, modmed_conn_id="x", min_poll_seconds=0,
                                           max_poll_errors=0)
    events = [e.payload async for e in trigger.run()]
    assert [e["status"] for e in events] == ["error"] and events[0]["status_code"] == 500
    assert "[error/processing]" in events[0]["message"]
    assert_no_phi(json.dumps(events), logs.text)
