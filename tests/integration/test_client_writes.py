"""Safe writes on both faces against the sandbox over real HTTP on 127.0.0.1, with the write landing and
its answer lost: the sandbox's drop fault cuts the next answer mid-body after the server acted (PUT,
POST); a DELETE answers 204 without a body, so its answer is lost by a transport that drops it after
the sandbox answered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.errors import ConflictError, NotFoundError
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import sandbox_fixtures
from tests.security.servers import LoopbackServer, fhir_json, token_answer

pytestmark = pytest.mark.integration

#: the documented system of a ChargeItem's transactionId (stated here, not imported: see profile.py)
TRANSACTION_ID = "https://www.modmed.com/fhir/transaction-id"


#: a sandbox of this module's own: these tests write
own_sandbox, sb = sandbox_fixtures(patients=12, seed=11)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


class LoseDeleteAnswer(httpx.HTTPTransport):
    """Sends every request; the answer to the first DELETE is read and then lost (the write landed)."""

    lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "DELETE" and not self.lost:
            self.lost += 1
            response.read()
            response.close()
            raise httpx.RemoteProtocolError("connection dropped before the answer", request=request)
        return response


class ALoseDeleteAnswer(httpx.AsyncHTTPTransport):
    """The async twin of :class:`LoseDeleteAnswer`."""

    lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.method == "DELETE" and not self.lost:
            self.lost += 1
            await response.aread()
            await response.aclose()
            raise httpx.RemoteProtocolError("connection dropped before the answer", request=request)
        return response


def config(sb: SandboxServer) -> ClientConfig:
    p = sb.credentials["proprietary"]
    return ClientConfig(track="proprietary", fhir_base=p["fhir_base"], firm="apiportal", api_key=p["api_key"],
                        username=p["username"], password=p["password"], max_retries=3)


class Face:
    """One call style for both faces: ``await face.call("update", ...)`` runs the sync or async client."""

    def __init__(self, client: FhirClient | AsyncFhirClient) -> None:
        self.client = client

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return await result if isinstance(self.client, AsyncFhirClient) else result


async def _no_sleep(seconds: float) -> None:
    return None


@pytest.fixture(params=["sync", "async"])
async def face(request: pytest.FixtureRequest, sb: SandboxServer) -> AsyncIterator[Face]:
    if request.param == "sync":
        with FhirClient(config(sb), transport=LoseDeleteAnswer(), sleep=lambda s: None) as c:
            yield Face(c)
    else:
        async with AsyncFhirClient(config(sb), transport=ALoseDeleteAnswer(), sleep=_no_sleep) as ac:
            yield Face(ac)


def truth(sb: SandboxServer, rt: str) -> dict[str, tuple[str, bool]]:
    return {r["id"]: (r["versionId"], r["deleted"]) for r in sb.app_state.store.ground_truth(rt)}


async def drop_next_answer(sb: SandboxServer, face: Face) -> int:
    """Drop the next answer with a body (after the server acted); returns the drops so far. The client
    holds its token first, so that the drop hits the write and not the token request."""
    await face.call("metadata")
    sb.faults(drop_next=1)
    return sb.stats().get("dropped", 0)


async def new_patient(face: Face) -> dict[str, Any]:
    marker = uuid.uuid4().hex[:12]
    return dict(await face.call("create", {"resourceType": "Patient", "name": [{"family": "Writesphi"}],
                                           "gender": "male", "birthDate": "1971-01-01",
                                           "identifier": [{"system": "urn:test", "value": marker}]},
                                if_none_exist={"identifier": f"urn:test|{marker}"}))


async def test_update_with_if_match_after_a_dropped_answer_returns_the_resource(sb: SandboxServer,
                                                                               face: Face) -> None:
    p = await new_patient(face)
    dropped = await drop_next_answer(sb, face)
    sb.app_state.recent_requests.clear()
    updated = await face.call("update", {**p, "gender": "female"}, if_match=p["meta"]["versionId"])
    assert sb.stats()["dropped"] == dropped + 1  # the first answer was lost
    # PUT (landed, answer dropped), PUT resent (412: the version moved on), GET (the same content)
    assert [raw.rsplit("/", 2)[-2:] for raw in sb.app_state.recent_requests] == [["Patient", p["id"]]] * 3
    assert updated["gender"] == "female" and updated["id"] == p["id"]
    assert truth(sb, "Patient")[p["id"]] == ("2", False)  # written once
    assert updated["meta"]["versionId"] == "2"


async def test_a_stale_version_is_a_conflict_and_changes_nothing(sb: SandboxServer, face: Face) -> None:
    p = await new_patient(face)
    await face.call("update", {**p, "gender": "female"}, if_match=p["meta"]["versionId"])
    with pytest.raises(ConflictError) as err:
        await face.call("update", {**p, "gender": "other"}, if_match=p["meta"]["versionId"])
    assert "changed since version 1 (now version 2); nothing was written" in str(err.value)
    assert "Writesphi" not in str(err.value)
    assert truth(sb, "Patient")[p["id"]] == ("2", False)
    assert sb.app_state.store.get("Patient", p["id"]).body["gender"] == "female"


async def test_patch_writes_only_a_change_and_checks_the_expected_version(sb: SandboxServer, face: Face) -> None:
    p = await new_patient(face)
    unchanged = await face.call("patch", "Patient", p["id"], {"gender": "male"})
    assert unchanged.changed is False and truth(sb, "Patient")[p["id"]] == ("1", False)
    result = await face.call("patch", "Patient", p["id"], {"telecom": [{"system": "phone", "value": "555"}]},
                             if_match="1")
    assert (result.changed, result.previous_version_id, result.resource["meta"]["versionId"]) == (True, "1", "2")
    stored = sb.app_state.store.get("Patient", p["id"]).body
    assert stored["telecom"] == [{"system": "phone", "value": "555"}] and stored["name"] == p["name"]
    with pytest.raises(ConflictError, match="at version 2, not the expected 1; nothing was written"):
        await face.call("patch", "Patient", p["id"], {"gender": "female"}, if_match="1")
    assert truth(sb, "Patient")[p["id"]] == ("2", False)


async def test_the_put_of_a_patch_after_a_dropped_answer(sb: SandboxServer, face: Face) -> None:
    p = await new_patient(face)

    def drop_then_change(current: dict[str, Any]) -> dict[str, Any]:
        sb.faults(drop_next=1)  # after the read: the PUT's answer is the one lost
        return {**current, "gender": "female"}

    dropped = sb.stats().get("dropped", 0)
    result = await face.call("patch", "Patient", p["id"], drop_then_change)
    assert sb.stats()["dropped"] == dropped + 1
    assert (result.changed, result.resource["meta"]["versionId"], result.resource["gender"]) == (True, "2", "female")
    assert truth(sb, "Patient")[p["id"]] == ("2", False)


def charge(sb: SandboxServer) -> dict[str, Any]:
    template = next(r.body for r in sb.app_state.store.search("ChargeItem", [], count=1)[0])
    return {k: v for k, v in template.items() if k not in ("id", "meta", "identifier")}


async def test_charge_transaction_id_after_a_dropped_answer_leaves_one(sb: SandboxServer, face: Face) -> None:
    txid = f"TX-{uuid.uuid4().hex[:10]}"
    before = truth(sb, "ChargeItem")
    dropped = await drop_next_answer(sb, face)
    matched = sb.stats().get("conditional_create_matched", 0)
    created = await face.call("create", charge(sb), transaction_id=txid)
    assert sb.stats()["dropped"] == dropped + 1
    assert sb.stats()["conditional_create_matched"] == matched + 1  # the resend found the first one
    again = await face.call("create", charge(sb), transaction_id=txid)  # a retried task
    new = {rid for rid in truth(sb, "ChargeItem") if rid not in before}
    assert new == {created["id"]} == {again["id"]}
    assert {"system": TRANSACTION_ID, "value": txid} in sb.app_state.store.get("ChargeItem", created["id"]).body[
        "identifier"]


async def test_charge_409_is_recovered_by_the_transaction_id(sb: SandboxServer, face: Face) -> None:
    """A condition that does not find the first ChargeItem (the caller's own, here a claim number the
    server does not index): the resend is refused with 409 and the ChargeItem is found by its key."""
    txid = f"TX-{uuid.uuid4().hex[:10]}"
    before = truth(sb, "ChargeItem")
    dropped = await drop_next_answer(sb, face)
    sb.app_state.recent_requests.clear()
    created = await face.call("create", charge(sb), if_none_exist={"identifier": "urn:claim|unknown"},
                              transaction_id=txid)
    assert sb.stats()["dropped"] == dropped + 1
    calls = [raw.split("/ema/fhir/v2/", 1)[-1].split("?")[0] for raw in sb.app_state.recent_requests]
    assert calls == ["ChargeItem", "ChargeItem", "ChargeItem"]  # POST, resent POST (409), search by the key
    assert f"identifier={TRANSACTION_ID.replace(':', '%3A').replace('/', '%2F')}%7C{txid}" in \
        sb.app_state.recent_requests[-1]
    new = {rid for rid in truth(sb, "ChargeItem") if rid not in before}
    assert new == {created["id"]}
    assert {"system": TRANSACTION_ID, "value": txid} in created["identifier"]
    with pytest.raises(ConflictError) as err:  # without the transaction_id, a duplicate stays a 409
        await face.call("create", {**charge(sb), "identifier": [{"system": TRANSACTION_ID, "value": txid}]})
    assert err.value.status_code == 409


async def test_delete_after_a_lost_answer(sb: SandboxServer, face: Face) -> None:
    p = await new_patient(face)
    assert await face.call("delete", "Patient", p["id"]) is True  # the answer was lost; the resend is answered
    assert truth(sb, "Patient")[p["id"]] == ("2", True)  # deleted once
    assert await face.call("delete", "Patient", "no-such-patient", missing_ok=True) is False


# -- a server that answers 404, not 410, for a deleted resource (issue 13, item 5) ------------------

class Answers404ForDeleted:
    """A loopback FHIR server that forgets deleted resources: a DELETE of one answers 404 (as some servers
    do), never 410. Patients ``p1``..``p3`` exist at the start."""

    def __init__(self) -> None:
        self.patients = {"p1", "p2", "p3"}
        self.deletes: list[tuple[str, int]] = []

    def __call__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        p = path.split("?", 1)[0]
        if p.endswith("/oauth2/grant"):
            return token_answer()
        if p.endswith("/metadata"):
            return fhir_json({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance"})
        rid = p.rsplit("/", 1)[-1]
        if method == "DELETE" and "/Patient/" in p:
            status = 204 if rid in self.patients else 404
            self.patients.discard(rid)
            self.deletes.append((rid, status))
            if status == 404:
                return fhir_json({"resourceType": "OperationOutcome",
                                  "issue": [{"severity": "error", "code": "not-found"}]}, 404)
            return 204, {}, b""
        return fhir_json({"resourceType": "OperationOutcome",
                          "issue": [{"severity": "error", "code": "not-supported"}]}, 400)


@pytest.fixture(params=["sync", "async"])
async def face404(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Face, Answers404ForDeleted]]:
    route = Answers404ForDeleted()
    with LoopbackServer(route) as server:
        cfg = ClientConfig(track="proprietary", fhir_base=f"{server.url}/firm/x/ema/fhir/v2", firm="x",
                           api_key="k", username="u", password="p", max_retries=3)
        if request.param == "sync":
            with FhirClient(cfg, transport=LoseDeleteAnswer(), sleep=lambda s: None) as c:
                yield Face(c), route
        else:
            async with AsyncFhirClient(cfg, transport=ALoseDeleteAnswer(), sleep=_no_sleep) as ac:
                yield Face(ac), route


async def test_delete_resent_after_a_lost_answer_takes_404_as_deleted(
        face404: tuple[Face, Answers404ForDeleted]) -> None:
    face, server = face404
    assert await face.call("delete", "Patient", "p1") is True  # first answer lost; the resend meets a 404
    assert server.deletes == [("p1", 204), ("p1", 404)]
    assert "p1" not in server.patients


async def test_delete_404_on_the_first_try_still_fails_unless_missing_ok(
        face404: tuple[Face, Answers404ForDeleted]) -> None:
    face, server = face404
    await face.call("delete", "Patient", "p2")  # uses up the one lost answer (see LoseDeleteAnswer)
    with pytest.raises(NotFoundError) as err:
        await face.call("delete", "Patient", "p2")  # answered on the first try: a real "not there"
    assert err.value.status_code == 404
    assert await face.call("delete", "Patient", "p2", missing_ok=True) is False
    assert await face.call("delete", "Patient", "p3") is True
    assert [s for _, s in server.deletes] == [204, 404, 404, 404, 204]
