"""ModMed's documented facts (reference/modmed-api.md) stated literally, not imported: profile.py holds them
once for the client, the connection form and the sandbox, so a wrong fact there must fail here."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from airflow_provider_modmed import profile
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox.credentials import credentials_document, make_credentials
from airflow_provider_modmed.sandbox.seed import generate


def test_hosts_and_url_layouts() -> None:
    assert profile.PROPRIETARY_ENVIRONMENTS == {
        "sandbox": "https://stage.ema-api.com/ema-dev/firm",
        "training": "https://stage.ema-api.com/ema-training/firm",
        "production": "https://mmapi.ema-api.com/ema-prod/firm",
    }
    assert profile.PUBLIC_SANDBOX_FIRM == "apiportal"
    assert profile.proprietary_fhir_base("https://h/ema-dev/firm/", "f") == "https://h/ema-dev/firm/f/ema/fhir/v2"
    assert profile.proprietary_grant_url("https://h/ema-dev/firm", "f") == "https://h/ema-dev/firm/f/ema/ws/oauth2/grant"
    assert profile.grant_url_of("https://h/x/f/ema/fhir/v2/") == "https://h/x/f/ema/ws/oauth2/grant"
    assert profile.grant_url_of("https://h/fhir/r4") is None
    assert profile.certified_fhir_base("acme") == "https://acme.mmi.prod.fhir.ema-api.com/fhir/r4"
    assert profile.KEYCLOAK_TOKEN_PATH == "/auth/realms/ema-fhir/protocol/openid-connect/token"
    assert profile.environment_path("training") == "/ema-training/firm"


@pytest.mark.parametrize(("track", "environment", "expected"), [
    ("proprietary", "sandbox", "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"),
    ("proprietary", "production", "https://mmapi.ema-api.com/ema-prod/firm/apiportal/ema/fhir/v2"),
    ("certified", "production", "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4"),
])
def test_the_hook_uses_the_published_urls(track: str, environment: str, expected: str) -> None:
    extra: dict[str, Any] = {"track": track, "environment": environment, "firm_url_prefix": "apiportal"}
    if track == "proprietary":
        extra["api_key"] = "k"
        config = config_from_connection(host=None, login="u", password="p", extra=extra)
        assert config.password_grant_url == expected.removesuffix("/fhir/v2") + "/ws/oauth2/grant"
    else:
        config = config_from_connection(host=None, login=None, password=None,
                                        extra={**extra, "auth_method": "client_secret", "client_id": "c",
                                               "client_secret": "s"})
    assert config.fhir_base == expected


def test_the_sandbox_serves_the_documented_layout() -> None:
    doc = credentials_document(make_credentials(seed=3), api_url="http://127.0.0.1:1", storage_url="http://s")
    p = doc["proprietary"]
    assert p["env_base"] == "http://127.0.0.1:1/ema-dev/firm"
    assert p["fhir_base"] == "http://127.0.0.1:1/ema-dev/firm/apiportal/ema/fhir/v2"
    assert p["token_url"] == "http://127.0.0.1:1/ema-dev/firm/apiportal/ema/ws/oauth2/grant"
    assert p["keycloak_token_url"] == "http://127.0.0.1:1/auth/realms/ema-fhir/protocol/openid-connect/token"
    assert doc["certified"]["fhir_base"].endswith("/apiportal/fhir/r4")


def test_the_sandbox_seeds_the_documented_systems() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    systems: set[str] = set()
    urls: set[str] = set()
    for r in generate(patients=3, seed=1, now=now):
        systems.update(i.get("system", "") for i in r.get("identifier") or ())
        categories = r.get("category") or []
        for c in categories if isinstance(categories, list) else [categories]:
            if isinstance(c, dict):  # AllergyIntolerance.category is a list of codes
                systems.update(x.get("system", "") for x in c.get("coding") or ())
        if r["resourceType"] == "ValueSet":
            urls.add(r["url"])
    assert {"https://www.modmed.com/fhir/transaction-id", "https://www.modmed.com/fhir/payer-id",
            "https://www.modmed.com/fhir/document-category"} <= systems
    assert urls == {"https://www.modmed.com/fhir/ValueSet/document-category",
                    "https://www.modmed.com/fhir/ValueSet/appointment-type"}
    assert profile.TRANSACTION_ID_SYSTEM == "https://www.modmed.com/fhir/transaction-id"
    assert profile.RECONCILIATION_EXTENSION == "https://www.modmed.com/fhir/StructureDefinition/reconciliation-id"
