"""The sandbox's certified track over real HTTP: SMART discovery and tokens, read-only US Core, scopes."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from airflow_provider_modmed.sandbox.certified_ids import certified_id
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


def assertion(client: dict[str, Any], aud: str, *, exp_in: int = 240, key: Any = None,
              kid: str | None = None) -> str:
    now = int(time.time())
    pem = client["private_key"]
    signing_key = key or (RSAKey if client["algorithm"] == "RS384" else ECKey).import_key(pem)
    header = {"alg": client["algorithm"], "kid": kid or client["key_id"], "typ": "JWT"}
    claims = {"iss": client["client_id"], "sub": client["client_id"], "aud": aud, "exp": now + exp_in,
              "iat": now, "jti": uuid.uuid4().hex}
    return jwt.encode(header, claims, signing_key, algorithms=["RS384", "ES384"])


def token_with_assertion(sb: SandboxServer, client: dict[str, Any], *, scope: str = "system/*.read",
                         **kw: Any) -> httpx.Response:
    cert = sb.credentials["certified"]
    aud = kw.pop("aud", cert["token_url"])
    return httpx.post(cert["token_url"], data={
        "grant_type": "client_credentials", "scope": scope,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion(client, aud, **kw)})


def secret_token(sb: SandboxServer, scope: str = "system/*.read") -> str:
    cert = sb.credentials["certified"]
    resp = httpx.post(cert["token_url"], data={"grant_type": "client_credentials", "scope": scope,
                                               **cert["client_secret_post"]})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def test_discovery_names_the_token_endpoint_and_methods(sb: SandboxServer) -> None:
    cert = sb.credentials["certified"]
    conf = httpx.get(cert["fhir_base"] + "/.well-known/smart-configuration").json()
    assert conf["token_endpoint"] == cert["token_url"]
    assert {"private_key_jwt", "client_secret_post"} <= set(conf["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384"} <= set(conf["token_endpoint_auth_signing_alg_values_supported"])


@pytest.mark.parametrize("client_name", ["private_key_jwt", "private_key_jwt_es384"])
def test_private_key_jwt_tokens_read_immunizations(sb: SandboxServer, client_name: str) -> None:
    client = sb.credentials["certified"][client_name]
    resp = token_with_assertion(sb, client)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"].lower() == "bearer" and body["expires_in"] == 1800
    bundle = httpx.get(sb.credentials["certified"]["fhir_base"] + "/Immunization",
                       headers={"Authorization": f"Bearer {body['access_token']}"}).json()
    assert bundle["entry"] and bundle["entry"][0]["resource"]["id"].startswith("1.120182.1.")


def test_assertion_checks_refuse_bad_signature_aud_and_expiry(sb: SandboxServer) -> None:
    client = sb.credentials["certified"]["private_key_jwt"]
    other_key = RSAKey.generate_key(2048)
    refusals = {
        "bad signature": token_with_assertion(sb, client, key=other_key),
        "wrong aud": token_with_assertion(sb, client, aud="https://elsewhere.example/token"),
        "expired": token_with_assertion(sb, client, exp_in=-30),
        "exp too far": token_with_assertion(sb, client, exp_in=3600),
        "unknown kid": token_with_assertion(sb, client, kid="nope"),
    }
    for what, resp in refusals.items():
        assert resp.status_code == 401, what
        assert resp.json()["error"] == "invalid_client", what


def test_write_scopes_and_bad_secrets_are_refused(sb: SandboxServer) -> None:
    cert = sb.credentials["certified"]
    creds = cert["client_secret_post"]
    write = httpx.post(cert["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.write",
                                                **creds})
    assert write.status_code == 400 and write.json()["error"] == "invalid_scope"
    wrong = httpx.post(cert["token_url"], data={"grant_type": "client_credentials", "scope": "system/*.read",
                                                "client_id": creds["client_id"], "client_secret": "wrong"})
    assert wrong.status_code == 401


def test_scopes_are_enforced_per_resource(sb: SandboxServer) -> None:
    base = sb.credentials["certified"]["fhir_base"]
    token = secret_token(sb, "system/Patient.read")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(base + "/Patient", headers=headers).status_code == 200
    assert httpx.get(base + "/Observation", headers=headers).status_code == 403
    v2 = {"Authorization": f"Bearer {secret_token(sb, 'system/Observation.rs')}"}
    vitals = httpx.get(base + "/Observation", params={"category": "vital-signs"}, headers=v2).json()
    assert vitals["entry"]
    assert all(any(c["code"] == "vital-signs" for cat in e["resource"]["category"] for c in cat["coding"])
               for e in vitals["entry"])


def test_certified_track_is_read_only_and_pages_with_standard_links(sb: SandboxServer) -> None:
    base = sb.credentials["certified"]["fhir_base"]
    headers = {"Authorization": f"Bearer {secret_token(sb)}"}
    resp = httpx.post(base + "/Patient", json={"resourceType": "Patient"}, headers=headers)
    assert resp.status_code == 405 and resp.json()["resourceType"] == "OperationOutcome"
    assert httpx.put(base + "/Patient/1", json={"resourceType": "Patient", "id": "1"},
                     headers=headers).status_code == 405
    first = httpx.get(base + "/Observation", params={"_count": 25}, headers=headers).json()
    truth = [r for r in sb.app_state.store.ground_truth("Observation") if not r["deleted"]]
    assert first["total"] == len(truth)
    seen: list[str] = []
    page: dict[str, Any] | None = first
    while page is not None:
        seen.extend(e["resource"]["id"] for e in page.get("entry") or [])
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        page = httpx.get(nxt[0], headers=headers).json() if nxt else None
    assert sorted(seen) == sorted(certified_id(r["id"]) for r in truth)


def test_certified_last_updated_takes_full_precision(sb: SandboxServer) -> None:
    base = sb.credentials["certified"]["fhir_base"]
    headers = {"Authorization": f"Bearer {secret_token(sb)}"}
    truth = sorted((r for r in sb.app_state.store.ground_truth("Immunization") if not r["deleted"]),
                   key=lambda r: r["lastUpdated"])
    pivot = truth[len(truth) // 2]["lastUpdated"]
    got = httpx.get(base + "/Immunization", params={"_lastUpdated": f"gt{pivot}", "_count": 100},
                    headers=headers).json()
    assert {e["resource"]["id"] for e in got.get("entry") or []} == {
        certified_id(r["id"]) for r in truth if r["lastUpdated"] > pivot}


def test_expired_certified_token_is_401(sb: SandboxServer) -> None:
    base = sb.credentials["certified"]["fhir_base"]
    headers = {"Authorization": f"Bearer {secret_token(sb)}"}
    patient = f"{base}/Patient/{certified_id('1')}"
    assert httpx.get(patient, headers=headers).status_code == 200
    sb.faults(expire_tokens=True)
    assert httpx.get(patient, headers=headers).status_code == 401
