"""FhirClient and AsyncFhirClient against a scripted ModMed (httpx.MockTransport), same flows."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError, NotFoundError

BASE = "https://api.example/ema-dev/firm/apiportal/ema/fhir/v2"
GRANT = "https://api.example/ema-dev/firm/apiportal/ema/ws/oauth2/grant"


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def config(**over: Any) -> ClientConfig:
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": BASE, "firm": "apiportal",
                              "api_key": "API-KEY-SECRET", "username": "u", "password": "PW-SECRET",
                              "max_retries": 1, **over}
    return ClientConfig(**values)


class FakeModMed:
    """Just enough ModMed: password grant, Patient search with its paging quirks, read, create."""

    def __init__(self, patients: int = 5, empty_create: bool = False) -> None:
        self.patients = {str(i): {"resourceType": "Patient", "id": str(i),
                                  "name": [{"family": f"Phi{i}name"}]} for i in range(1, patients + 1)}
        self.orgs = {"pay|7225": {"resourceType": "Organization", "id": "pay|7225"}}
        self.empty_create = empty_create
        self.tokens = 0
        self.valid: set[str] = set()
        self.requests: list[httpx.Request] = []

    def expire(self) -> None:
        self.valid.clear()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if str(request.url) == GRANT:
            self.tokens += 1
            tok = f"tok{self.tokens}"
            self.valid.add(tok)
            return httpx.Response(200, json={"access_token": tok, "refresh_token": "r", "token_type": "Bearer"})
        assert request.headers.get("x-api-key") == "API-KEY-SECRET"
        if request.headers.get("Authorization", "")[7:] not in self.valid:
            return httpx.Response(401, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "login"}]})
        path = request.url.raw_path.decode().split("?")[0][len("/ema-dev/firm/apiportal/ema/fhir/v2/"):]
        if path == "Patient" and request.method == "GET":
            return self._page(request)
        if path == "Patient" and request.method == "POST":
            new_id = str(len(self.patients) + 1)
            self.patients[new_id] = {"resourceType": "Patient", "id": new_id}
            if self.empty_create:
                return httpx.Response(201, headers={"Location": f"{BASE}/Patient/{new_id}/_history/1"})
            return httpx.Response(201, json=self.patients[new_id])
        rtype, _, encoded = path.partition("/")
        store = self.patients if rtype == "Patient" else self.orgs
        resource = store.get(unquote(encoded))
        if resource is None:
            return httpx.Response(404, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "not-found"}]})
        return httpx.Response(200, json=resource)

    def _page(self, request: httpx.Request) -> httpx.Response:
        q = parse_qs(request.url.query.decode())
        page, count = int(q.get("page", ["1"])[0]), int(q["_count"][0])
        ids = sorted(self.patients, key=int)[(page - 1) * count: page * count]
        body: dict[str, Any] = {"resourceType": "Bundle", "total": len(ids),
                                "entry": [{"resource": self.patients[i]} for i in ids], "link": []}
        if ids:  # ModMed: a next link on every page with entries, the last one included
            body["link"].append({"relation": "next", "url": f"{BASE}/Patient?page={page + 1}&_count={count}"})
        return httpx.Response(200, json=body)


def explode(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request may be sent, got {request.method}")


# -- pre-flight ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda c: c.read("Immunization", "1"),
    lambda c: c.search("Observation", {"category": "vital-signs"}),
    lambda c: c.update({"resourceType": "ChargeItem", "id": "1"}),
    lambda c: c.delete("Encounter", "1"),
    lambda c: c.create({"resourceType": "Encounter"}),
    lambda c: c.read("NotAType", "1"),
    lambda c: c.patch("ChargeItem", "1", {"status": "billed"}),
])
def test_capability_preflight_sends_nothing(call: Any) -> None:
    with FhirClient(config(), transport=httpx.MockTransport(explode)) as c, pytest.raises(CapabilityError):
        call(c)


@pytest.mark.parametrize("call", [
    lambda c: c.read("Immunization", "1"),
    lambda c: c.search("Observation"),
    lambda c: c.update({"resourceType": "Coverage", "id": "1"}),
    lambda c: c.patch("Encounter", "1", {"status": "finished"}),
    lambda c: c.delete("Encounter", "1"),
])
async def test_async_capability_preflight_sends_nothing(call: Any) -> None:
    async def attempt(c: AsyncFhirClient) -> None:
        result = call(c)  # search() raises here, at call time; coroutines raise when awaited
        if hasattr(result, "__await__"):
            await result

    async with AsyncFhirClient(config(), transport=httpx.MockTransport(explode)) as c:
        with pytest.raises(CapabilityError):
            await attempt(c)


def test_hostile_id_sends_nothing() -> None:
    with FhirClient(config(), transport=httpx.MockTransport(explode)) as c, pytest.raises(ValueError, match="id"):
        c.read("Patient", "1/../../../admin")


# -- one fake, both faces --------------------------------------------------------------------------

def test_sync_client_end_to_end() -> None:
    fake = FakeModMed(patients=7, empty_create=True)
    with FhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        assert [p["id"] for p in c.search("Patient", count=3)] == [str(i) for i in range(1, 8)]
        assert c.read("Organization", "pay|7225")["id"] == "pay|7225"
        assert any(r.url.raw_path.endswith(b"/Organization/pay%7C7225") for r in fake.requests)
        created = c.create({"resourceType": "Patient"})
        assert created["id"] == "8"
        with pytest.raises(NotFoundError):
            c.read("Patient", "999")
    assert fake.tokens == 1


async def test_async_client_end_to_end() -> None:
    fake = FakeModMed(patients=7, empty_create=True)
    async with AsyncFhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        assert [p["id"] async for p in c.search("Patient", count=3)] == [str(i) for i in range(1, 8)]
        assert (await c.read("Organization", "pay|7225"))["id"] == "pay|7225"
        assert (await c.create({"resourceType": "Patient"}))["id"] == "8"
        with pytest.raises(NotFoundError):
            await c.read("Patient", "999")
    assert fake.tokens == 1


def test_token_expiry_mid_iteration_refreshes_and_continues() -> None:
    fake = FakeModMed(patients=6)
    with FhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        seen = []
        for patient in c.search("Patient", count=2):
            seen.append(patient["id"])
            if len(seen) == 3:
                fake.expire()  # the server forgets every token between pages
        assert seen == ["1", "2", "3", "4", "5", "6"]
    grants = [parse_qs(r.content.decode())["grant_type"][0] for r in fake.requests if str(r.url) == GRANT]
    assert grants == ["password", "refresh_token"]


async def test_async_token_expiry_mid_iteration() -> None:
    fake = FakeModMed(patients=6)
    async with AsyncFhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        seen = []
        async for patient in c.search("Patient", count=2):
            seen.append(patient["id"])
            if len(seen) == 3:
                fake.expire()
    assert seen == ["1", "2", "3", "4", "5", "6"]
    assert fake.tokens == 2


def test_search_iterator_is_lazy() -> None:
    fake = FakeModMed(patients=6)
    with FhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        it = c.search("Patient", count=2)
        assert fake.requests == []  # nothing sent until iteration starts
        next(it)
        assert sum(1 for r in fake.requests if r.url.path.endswith("/Patient")) == 1


def test_presigned_urls_get_no_credentials_through_the_client() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with FhirClient(config(), transport=httpx.MockTransport(handler)) as c:
        c.send(httpx.Request("PUT", "https://storage.example/up?X-Amz-Signature=s", content=b"pdf",
                             headers={"x-api-key": "API-KEY-SECRET"}))
    (only,) = seen
    assert "Authorization" not in only.headers
    assert "x-api-key" not in only.headers


def test_a_supplied_http_client_is_guarded_and_left_open() -> None:
    http = httpx.Client(transport=httpx.MockTransport(FakeModMed()))
    with FhirClient(config(), http_client=http) as c:
        assert c.read("Patient", "1")["id"] == "1"
        assert len(http.event_hooks["request"]) == 2  # credential guard + rate budget
    assert not http.is_closed
    http.close()


def test_logs_hold_no_secrets_bodies_or_query_values(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeModMed(patients=3)
    caplog.set_level(logging.DEBUG)
    with FhirClient(config(), transport=httpx.MockTransport(fake)) as c:
        list(c.search("Patient", {"family": "Querysecret"}))
        c.read("Patient", "2")
        fake.expire()
        c.read("Patient", "3")
    text = caplog.text
    assert "search Patient" in text
    for secret in ("API-KEY-SECRET", "PW-SECRET", "tok1", "Phi1name", "Querysecret", "Bearer"):
        assert secret not in text


def test_token_calls_and_401_resends_spend_the_budget_but_storage_calls_do_not() -> None:
    from airflow_provider_modmed.client.limiter import RateBudget

    spent: list[int] = []

    class CountingBudget(RateBudget):
        def acquire(self) -> float:
            spent.append(1)
            return 0.0

    fake = FakeModMed(patients=3)
    with FhirClient(config(), transport=httpx.MockTransport(fake), budget=CountingBudget()) as c:
        c.read("Patient", "1")  # token + read
        assert len(spent) == 2
        fake.expire()
        c.read("Patient", "2")  # read (401) + refresh + resend
        assert len(spent) == 5
        with pytest.raises(AssertionError):  # the fake asserts an API key: the storage call carries none
            c.http.get("https://storage.example.org/upload?sig=1")
        assert len(spent) == 5


# -- safe writes on both faces: a lost answer to a write that landed -------------------------------

class LosingModMed(FakeModMed):
    """FakeModMed with versioned Patient updates and deletes, losing the answer to the first write of
    each kind after applying it (what a dropped connection does)."""

    def __init__(self) -> None:
        super().__init__(patients=3)
        for p in self.patients.values():
            p["meta"] = {"versionId": "1"}
        self.lost: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method not in ("PUT", "DELETE") or str(request.url) == GRANT:
            return super().__call__(request)
        self.requests.append(request)
        rid = request.url.path.rsplit("/", 1)[-1]
        current = self.patients.get(rid)
        if request.method == "DELETE":
            if current is None:
                return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
            del self.patients[rid]
            answer = httpx.Response(204)
        elif request.headers.get("If-Match") != f'W/"{current["meta"]["versionId"]}"':
            return httpx.Response(412, json={"resourceType": "OperationOutcome",
                                             "issue": [{"severity": "error", "code": "conflict"}]})
        else:
            new = json.loads(request.content)
            new["meta"] = {"versionId": str(int(current["meta"]["versionId"]) + 1)}
            self.patients[rid] = new
            answer = httpx.Response(200, json=new)
        if request.method not in self.lost:
            self.lost.add(request.method)
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        return answer


def test_writes_survive_a_lost_answer_on_the_sync_face() -> None:
    fake = LosingModMed()
    with FhirClient(config(max_retries=2), transport=httpx.MockTransport(fake), sleep=lambda s: None) as c:
        p = c.read("Patient", "1")
        updated = c.update({**p, "gender": "female"}, if_match=p["meta"]["versionId"])
        assert (updated["gender"], updated["meta"]["versionId"]) == ("female", "2")
        result = c.patch("Patient", "1", {"gender": "male"})
        assert (result.changed, result.previous_version_id, result.resource["meta"]["versionId"]) == (True, "2", "3")
        assert c.delete("Patient", "2") is True  # the resend met 404: the lost first answer deleted it
        assert c.delete("Patient", "2", missing_ok=True) is False
        with pytest.raises(NotFoundError):
            c.delete("Patient", "2")
        with pytest.raises(ConfigurationError, match="if_match must be a version id"):
            c.update(p, if_match="1, *")
    assert [r.method for r in fake.requests if r.method in ("PUT", "DELETE")] == \
        ["PUT", "PUT", "PUT", "DELETE", "DELETE", "DELETE", "DELETE"]


async def test_writes_survive_a_lost_answer_on_the_async_face() -> None:
    fake = LosingModMed()

    async def no_sleep(seconds: float) -> None:
        return None

    async with AsyncFhirClient(config(max_retries=2), transport=httpx.MockTransport(fake), sleep=no_sleep) as c:
        p = await c.read("Patient", "1")
        updated = await c.update({**p, "gender": "female"}, if_match='W/"1"')
        assert updated["meta"]["versionId"] == "2"
        result = await c.patch("Patient", "1", lambda r: {**r, "gender": "female"})
        assert result.changed is False and result.resource["meta"]["versionId"] == "2"
        assert await c.delete("Patient", "3") is True
    assert "3" not in fake.patients
