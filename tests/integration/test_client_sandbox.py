"""The client against the real sandbox over HTTP on 127.0.0.1: auth, faults, paging, ids, host scoping."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient
from airflow_provider_modmed.errors import (
    AuthError,
    CapabilityError,
    ConflictError,
    ForbiddenError,
    ModMedError,
    NotFoundError,
    ServerError,
)
from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM
from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.conftest import sandbox_fixtures

pytestmark = pytest.mark.integration

PRESIGNED = "https://www.modmed.com/fhir/StructureDefinition/presigned-url"


#: a sandbox of this module's own: these tests create, update and delete resources and would otherwise change
#: what other modules' tests see in the session sandbox
own_sandbox, sb = sandbox_fixtures(patients=40, seed=7)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def prop_config(sb: SandboxServer, method: str = "password", **over: Any) -> ClientConfig:
    p = sb.credentials["proprietary"]
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": p["fhir_base"], "firm": "apiportal",
                              "api_key": p["api_key"], "auth_method": method, "max_retries": 4}
    if method == "password":
        values.update(username=p["username"], password=p["password"])
    else:
        values.update(client_id=p["client_id"], client_secret=p["client_secret"],
                      token_url=p["keycloak_token_url"])
    return ClientConfig(**{**values, **over})


def cert_config(sb: SandboxServer, kind: str = "private_key_jwt", **over: Any) -> ClientConfig:
    c = sb.credentials["certified"]
    d = c[kind]
    values: dict[str, Any] = {"track": "certified", "fhir_base": c["fhir_base"], "firm": "apiportal",
                              "client_id": d["client_id"], "max_retries": 4}
    if kind == "client_secret_post":
        values.update(auth_method="client_secret", client_secret=d["client_secret"])
    else:
        values.update(auth_method="private_key_jwt", private_key=d["private_key"], key_id=d["key_id"],
                      jwt_algorithm=d["algorithm"])
    return ClientConfig(**{**values, **over})


def client(config: ClientConfig, slept: list[float] | None = None) -> FhirClient:
    return FhirClient(config, sleep=slept.append if slept is not None else (lambda s: None))


def live_ids(sb: SandboxServer, rtype: str) -> list[str]:
    """The live ids of ``rtype`` by the sandbox's ground truth: the stored (proprietary) ids."""
    rows = httpx.get(f"{sb.api_url}/_sandbox/resources/{rtype}").json()
    return [r["id"] for r in rows if not r.get("deleted")]


def certified_ids(sb: SandboxServer, rtype: str) -> list[str]:
    """The same records as the certified track names them."""
    return [certified_id(i) for i in live_ids(sb, rtype)]


# -- each auth method: success and failure ---------------------------------------------------------

def test_password_grant(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        assert c.metadata()["resourceType"] == "CapabilityStatement"
        assert c.read("Patient", live_ids(sb, "Patient")[0])["resourceType"] == "Patient"


def test_password_grant_failures(sb: SandboxServer) -> None:
    with client(prop_config(sb, password="wrong")) as c, pytest.raises(AuthError) as err:
        c.read("Patient", "1")
    assert "invalid_grant" in str(err.value)
    with client(prop_config(sb, api_key="unknown-key")) as c, pytest.raises(ForbiddenError):
        c.read("Patient", "1")


def test_keycloak_client_credentials(sb: SandboxServer) -> None:
    with client(prop_config(sb, "client_secret")) as c:
        assert c.read("Patient", live_ids(sb, "Patient")[0])["resourceType"] == "Patient"
    with client(prop_config(sb, "client_secret", client_secret="wrong")) as c, pytest.raises(AuthError):
        c.read("Patient", "1")


@pytest.mark.parametrize("kind", ["private_key_jwt", "private_key_jwt_es384", "client_secret_post"])
def test_certified_auth_methods(sb: SandboxServer, kind: str) -> None:
    with client(cert_config(sb, kind)) as c:
        ids = [r["id"] for r in c.search("Immunization")]
    assert sorted(ids) == sorted(certified_ids(sb, "Immunization"))


@pytest.mark.parametrize(("kind", "over"), [
    ("private_key_jwt", {"key_id": "not-registered"}),
    ("private_key_jwt_es384", {"client_id": "nobody"}),
    ("client_secret_post", {"client_secret": "wrong"}),
])
def test_certified_auth_failures(sb: SandboxServer, kind: str, over: dict[str, Any]) -> None:
    with client(cert_config(sb, kind, **over)) as c, pytest.raises(AuthError) as err:
        c.read("Immunization", certified_ids(sb, "Immunization")[0])
    assert err.value.status_code in (400, 401)


def test_certified_assertion_signed_with_the_wrong_key(sb: SandboxServer) -> None:
    # the ES384 client's key presented under the RS384 client's kid: the signature cannot verify
    rs = sb.credentials["certified"]["private_key_jwt"]
    config = cert_config(sb, "private_key_jwt_es384", key_id=rs["key_id"], client_id=rs["client_id"])
    with client(config) as c, pytest.raises(AuthError):
        c.read("Immunization", "1.120182.1.1")


async def test_certified_async(sb: SandboxServer) -> None:
    async with AsyncFhirClient(cert_config(sb, "private_key_jwt_es384")) as c:
        ids = [r["id"] async for r in c.search("Immunization", count=5)]
        assert sorted(ids) == sorted(certified_ids(sb, "Immunization"))
        first = ids[0]
        assert "." in first
        assert (await c.read("Immunization", first))["id"] == first


# -- token expiry, refresh, re-auth ----------------------------------------------------------------

def test_token_expiry_mid_iteration(sb: SandboxServer) -> None:
    before = sb.stats().get("unauthorized", 0)
    seen: list[str] = []
    with client(prop_config(sb)) as c:
        for patient in c.search("Patient", count=5):
            seen.append(patient["id"])
            if len(seen) == 7:
                sb.faults(expire_tokens=True)
    assert sorted(seen) == sorted(live_ids(sb, "Patient"))
    assert sb.stats()["unauthorized"] == before + 1


def test_refresh_revoked_then_full_reauthentication(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        pid = live_ids(sb, "Patient")[0]
        c.read("Patient", pid)
        sb.faults(expire_tokens=True, revoke_refresh_tokens=True)
        assert c.read("Patient", pid)["id"] == pid


async def test_async_token_expiry_mid_iteration(sb: SandboxServer) -> None:
    seen: list[str] = []
    async with AsyncFhirClient(cert_config(sb, "private_key_jwt")) as c:
        async for obs in c.search("Observation", count=10):
            seen.append(obs["id"])
            if len(seen) == 12:
                sb.faults(expire_tokens=True)
    assert sorted(seen) == sorted(certified_ids(sb, "Observation"))


# -- 429 and 5xx -----------------------------------------------------------------------------------

def test_rate_storm_is_waited_out(sb: SandboxServer) -> None:
    slept: list[float] = []
    before = sb.stats().get("throttled", 0)
    with client(prop_config(sb), slept) as c:
        sb.faults(rate_storm=3)
        pid = live_ids(sb, "Patient")[0]
        assert c.read("Patient", pid)["id"] == pid
    assert sb.stats()["throttled"] - before == 3
    assert len(slept) == 3
    assert slept == sorted(slept)  # exponential backoff (no Retry-After from ModMed)


def test_5xx_retries_for_reads(sb: SandboxServer) -> None:
    slept: list[float] = []
    with client(prop_config(sb), slept) as c:
        pid = live_ids(sb, "Patient")[0]
        c.read("Patient", pid)
        sb.faults(fail_next={"status": 503, "count": 2})
        assert c.read("Patient", pid)["id"] == pid
        sb.faults(fail_next={"status": 502, "count": 2, "bodiless": True})
        assert len(list(c.search("Patient", count=50))) == len(live_ids(sb, "Patient"))
    assert len(slept) == 4


def test_5xx_exhausted_is_a_server_error(sb: SandboxServer) -> None:
    with client(prop_config(sb, max_retries=2)) as c:
        c.metadata()
        sb.faults(fail_next={"status": 500, "count": 5})
        with pytest.raises(ServerError) as err:
            c.read("Patient", "1")
    assert err.value.status_code == 500
    assert err.value.codes == ("transient",)


def test_plain_create_is_not_retried_but_conditional_is(sb: SandboxServer) -> None:
    marker = uuid.uuid4().hex
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": marker}],
               "name": [{"family": "Retry", "given": ["Test"]}], "gender": "female", "birthDate": "1980-01-01"}
    with client(prop_config(sb)) as c:
        c.metadata()
        count = len(live_ids(sb, "Patient"))
        sb.faults(fail_next={"status": 503, "count": 1})
        with pytest.raises(ServerError):
            c.create(patient)
        assert len(live_ids(sb, "Patient")) == count
        sb.faults(fail_next={"status": 503, "count": 1})
        created = c.create(patient, if_none_exist={"identifier": f"urn:test|{marker}"})
        again = c.create(patient, if_none_exist={"identifier": f"urn:test|{marker}"})
    assert again["id"] == created["id"]
    assert len(live_ids(sb, "Patient")) == count + 1


# -- paging quirks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 7, 50, None])
def test_paging_yields_every_patient_once(sb: SandboxServer, count: int | None) -> None:
    with client(prop_config(sb)) as c:
        ids = [p["id"] for p in c.search("Patient", count=count)]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(live_ids(sb, "Patient"))


def test_paging_with_optimization_disabled(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        ids = [p["id"] for p in c.search("Patient", count=6,
                                         headers={"Content-flag": "Pagination_optimization_disabled"})]
    assert sorted(ids) == sorted(live_ids(sb, "Patient"))


def _spy(c: FhirClient) -> list[httpx.Request]:
    seen: list[httpx.Request] = []
    c.http.event_hooks["request"].append(seen.append)
    return seen


def test_documentreference_pages_of_ten(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        seen = _spy(c)
        docs = list(c.search("DocumentReference", {"_count": 500}))
    counts = {r.url.params.get("_count") for r in seen if r.url.path.endswith("/DocumentReference")}
    assert counts == {"10"}
    assert sorted(d["id"] for d in docs) == sorted(live_ids(sb, "DocumentReference"))


def test_certified_paging(sb: SandboxServer) -> None:
    with client(cert_config(sb)) as c:
        ids = [r["id"] for r in c.search("Observation", count=7)]
    assert sorted(ids) == sorted(certified_ids(sb, "Observation"))


# -- ids, writes -----------------------------------------------------------------------------------

def test_composite_and_dotted_ids(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        assert c.read("Organization", "pay|7225")["id"] == "pay|7225"
        charge_id = next(i for i in live_ids(sb, "ChargeItem") if "|" in i)
        assert c.read("ChargeItem", charge_id)["id"] == charge_id
        with pytest.raises(NotFoundError):
            c.read("Organization", "pay|0")
        before = sb.stats()["requests"]
        with pytest.raises(ValueError, match="id"):
            c.read("Organization", "pay/../../7225")
        assert sb.stats()["requests"] == before


def test_capability_preflight_sends_nothing(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        before = sb.stats()["requests"]
        with pytest.raises(CapabilityError):
            c.read("Immunization", "1.120182.1.1")
        with pytest.raises(CapabilityError):
            list(c.search("Observation"))
    assert sb.stats()["requests"] == before


def test_empty_create_body_is_read_back(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        sb.faults(empty_create_body=True)
        created = c.create({"resourceType": "Patient", "name": [{"family": "Empty"}], "gender": "male",
                            "birthDate": "1970-01-01"})
    assert created["resourceType"] == "Patient"
    assert created["id"] in live_ids(sb, "Patient")


def test_update_if_match_and_delete(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        p = c.create({"resourceType": "Patient", "name": [{"family": "Upd"}], "gender": "male",
                      "birthDate": "1971-01-01"})
        version = p["meta"]["versionId"]
        p["gender"] = "female"
        updated = c.update(p, if_match=version)
        assert updated["meta"]["versionId"] != version
        with pytest.raises(ConflictError) as err:
            c.update(p, if_match=version)  # stale version
        assert err.value.status_code == 412
        c.delete("Patient", p["id"])
        with pytest.raises(NotFoundError):
            c.read("Patient", p["id"])


def test_chargeitem_transaction_id_duplicate(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c:
        template = c.read("ChargeItem", live_ids(sb, "ChargeItem")[0])
        charge = {k: v for k, v in template.items() if k not in ("id", "meta")}
        charge["identifier"] = [{"system": TRANSACTION_ID_SYSTEM, "value": uuid.uuid4().hex}]
        sb.faults(fail_next={"status": 503, "count": 1})
        created = c.create(charge)  # safe to retry: it carries a transactionId
        assert created["id"]
        with pytest.raises(ConflictError) as err:
            c.create(charge)
    assert "duplicate" in err.value.codes


# -- credentials never reach the storage host ------------------------------------------------------

def test_no_credentials_reach_the_storage_host(sb: SandboxServer) -> None:
    before = sb.stats().get("auth_headers_seen_by_storage", 0)
    with client(prop_config(sb)) as c:
        binary = c.create({"resourceType": "Binary", "contentType": "application/pdf"})
        url = next(e["valueUrl"] for e in binary.get("extension", []) if e.get("url") == PRESIGNED)
        assert httpx.URL(url).port != httpx.URL(sb.api_url).port
        answer = c.send(httpx.Request("PUT", url, content=b"%PDF-1.4 test",
                                      headers={"Content-Type": "application/pdf",
                                               "x-api-key": "copied-by-mistake"}))
        assert answer.status_code in (200, 201, 204)
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == before


async def test_no_credentials_reach_the_storage_host_async(sb: SandboxServer) -> None:
    before = sb.stats().get("auth_headers_seen_by_storage", 0)
    async with AsyncFhirClient(prop_config(sb)) as c:
        binary = await c.create({"resourceType": "Binary", "contentType": "application/pdf"})
        url = next(e["valueUrl"] for e in binary.get("extension", []) if e.get("url") == PRESIGNED)
        answer = await c.send(httpx.Request("PUT", url, content=b"%PDF-1.4 test"))
        assert answer.status_code in (200, 201, 204)
    assert sb.stats().get("auth_headers_seen_by_storage", 0) == before


def test_errors_carry_operation_outcome(sb: SandboxServer) -> None:
    with client(prop_config(sb)) as c, pytest.raises(ModMedError) as err:
        list(c.search("Patient", {"_lastUpdated": "ge2024-01-01"}))  # ModMed: gt, eq, le only
    assert err.value.status_code == 400
    assert err.value.codes
