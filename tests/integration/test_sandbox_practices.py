"""A sandbox serving several practices (``--practices N``, ``SandboxServer(practices=N)``).

Each practice is a firm of its own: firm URL prefix, API key, users and clients, seeded data, tokens and
rate budget. One sandbox, one pair of listeners.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox.certified_ids import served_id
from airflow_provider_modmed.sandbox.server import SandboxServer
from airflow_provider_modmed.sandbox.state import key_label
from tests.conftest import free_port
from tests.integration.sandbox_process import CLI, serve

pytestmark = pytest.mark.integration

BUDGET = 5


@pytest.fixture(scope="module")
def two() -> Iterator[SandboxServer]:
    with SandboxServer(patients=4, seed=3, practices=2) as sb:
        yield sb


def grant(section: dict[str, Any]) -> str:
    resp = httpx.post(section["token_url"], headers={"x-api-key": section["api_key"]},
                      data={"grant_type": "password", "username": section["username"],
                            "password": section["password"]})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def get(section: dict[str, Any], token: str, path: str, api_key: str | None = None) -> httpx.Response:
    return httpx.get(f"{section['fhir_base']}/{path}",
                     headers={"x-api-key": api_key or section["api_key"], "Authorization": f"Bearer {token}"})


def config_for(conn: dict[str, Any]) -> ClientConfig:
    return config_from_connection(host=conn.get("host"), port=conn.get("port"), login=conn.get("login"),
                                  password=conn.get("password"), extra=conn["extra"])


def test_two_practices_have_distinct_firms_keys_credentials_and_data(two: SandboxServer) -> None:
    doc = two.credentials
    first, second = (p["proprietary"] for p in doc["practices"])
    assert [p["firm_url_prefix"] for p in doc["practices"]] == ["apiportal", "apiportal2"]
    assert first["fhir_base"].endswith("/ema-dev/firm/apiportal/ema/fhir/v2")
    assert second["fhir_base"].endswith("/ema-dev/firm/apiportal2/ema/fhir/v2")
    for field in ("api_key", "username", "password", "client_id", "client_secret"):
        assert first[field] != second[field], field
    certified = [p["certified"] for p in doc["practices"]]
    assert certified[0]["private_key_jwt"]["key_id"] != certified[1]["private_key_jwt"]["key_id"]
    # practice 1 is today's single practice: the top-level sections are its own
    assert doc["proprietary"] == first and doc["firm_url_prefix"] == "apiportal"

    states = two.app_state.practices
    assert [p.firm for p in states] == ["apiportal", "apiportal2"]
    names = [{json.dumps(r.body["name"]) for r in p.store.search("Patient", count=100)[0]} for p in states]
    assert names[0] != names[1]
    # the other practice's key, or its token, opens nothing here
    token1, token2 = grant(first), grant(second)
    assert get(first, token1, "Patient/1").status_code == 200
    assert get(first, token1, "Patient/1", api_key=second["api_key"]).status_code == 403
    assert get(first, token2, "Patient/1").status_code == 401
    served = [get(s, t, "Patient/1").json() for s, t in ((first, token1), (second, token2))]
    for patient, state in zip(served, states, strict=True):
        row = state.store.get("Patient", "1")
        assert row is not None and patient["name"] == row.body["name"]
    assert served[0]["name"] != served[1]["name"]


def test_the_rate_budget_is_per_firm() -> None:
    with SandboxServer(patients=2, seed=3, practices=2, rate_limit_per_minute=BUDGET,
                       rate_limit_window_seconds=3600) as sb:
        first, second = (p["proprietary"] for p in sb.credentials["practices"])
        _exhaust_one_practice_leaves_the_other(first, second)
        stats = sb.stats()
    keyed = {k: v for k, v in stats.items() if k.startswith("throttled:")}
    assert len(keyed) == 2 and all(v >= 1 for v in keyed.values())


def test_budget_figures_per_practice_calls_429s_and_the_fullest_window() -> None:
    """``SandboxState.budget_figures``: what the scale test (tests/stack/test_scale.py) holds to the budget."""
    with SandboxServer(patients=2, seed=3, practices=2, rate_limit_per_minute=BUDGET,
                       rate_limit_window_seconds=1.0) as sb:
        first, second = (p["proprietary"] for p in sb.credentials["practices"])
        token = grant(first)  # the grant is one call of the key's budget
        assert [get(first, token, "Patient/1").status_code for _ in range(BUDGET + 1)] == \
            [200] * (BUDGET - 1) + [429] * 2
        time.sleep(1.2)  # a new window: two more calls, the fullest window stays the first one
        assert [get(first, token, "Patient/1").status_code for _ in range(2)] == [200, 200]
        assert get(second, grant(second), "Patient/1").status_code == 200
        figures = sb.app_state.budget_figures()
        stats = sb.stats()
    assert figures == {
        "apiportal": {"calls": BUDGET + 2, "throttled": 2, "peak_window": BUDGET},
        "apiportal2": {"calls": 2, "throttled": 0, "peak_window": 2},
    }
    # the stats name a key by its digest, never by the key itself
    label = key_label(first["api_key"])
    assert stats[f"peak_window:{label}"] == BUDGET and stats[f"requests:{label}"] == BUDGET + 2
    assert not any(first["api_key"] in key for key in stats)


def _exhaust_one_practice_leaves_the_other(first: dict[str, Any], second: dict[str, Any]) -> None:
    token1, token2 = grant(first), grant(second)
    # the grant took one call of each key's budget
    assert [get(first, token1, "Patient/1").status_code for _ in range(BUDGET + 3)] == [200] * (BUDGET - 1) + [429] * 4
    # practice 1 is exhausted; practice 2's key still has its whole budget but one (its grant)
    assert [get(second, token2, "Patient/1").status_code for _ in range(BUDGET - 1)] == [200] * (BUDGET - 1)
    assert get(second, token2, "Patient/1").status_code == 429


def test_one_connection_per_practice_and_track_and_every_one_authenticates(tmp_path: Path) -> None:
    port = free_port()
    with serve(port, "--storage-port", str(free_port()), "--patients", "3", "--seed", "5", "--practices", "3",
               output=tmp_path / "serve.log"):
        printed = json.loads(subprocess.run([*CLI, "credentials", "--json", "--port", str(port)],
                                            capture_output=True, text=True, check=True, timeout=120).stdout)
        connections = printed["airflow_connections"]
        per_practice = {f"modmed_{firm}_{track}" for firm in ("apiportal", "apiportal2", "apiportal3")
                        for track in ("proprietary", "certified")}
        assert set(connections) == per_practice | {"modmed_default", "modmed_proprietary_cc", "modmed_certified",
                                                   "modmed_certified_es384", "modmed_certified_secret"}
        assert set(printed["airflow_connection_uris"]) == set(connections)
        read: dict[str, str] = {}
        for conn_id, conn in connections.items():
            firm = conn["extra"]["firm_url_prefix"]
            truth = httpx.get(f"http://127.0.0.1:{port}/_sandbox/resources/Patient", params={"firm": firm}).json()
            with FhirClient(config_for(conn)) as client:  # each track names the Patient its own way
                patient = client.read("Patient", served_id(conn["extra"]["track"], truth[0]["id"]))
            read[conn_id] = json.dumps(patient["name"])
        stats = httpx.get(f"http://127.0.0.1:{port}/_sandbox/stats").json()
    assert stats.get("unauthorized", 0) == 0
    # each practice's connections read that practice's own patient
    assert read["modmed_apiportal_proprietary"] == read["modmed_default"]
    assert len({read[f"modmed_{f}_proprietary"] for f in ("apiportal", "apiportal2", "apiportal3")}) == 3


def test_keycloak_clients_name_their_practice(two: SandboxServer) -> None:
    second = two.credentials["practices"][1]["proprietary"]
    resp = httpx.post(second["keycloak_token_url"], data={
        "grant_type": "client_credentials", "client_id": second["client_id"], "client_secret": second["client_secret"]})
    token = resp.json()["access_token"]
    first = two.credentials["practices"][0]["proprietary"]
    assert get(second, token, "Patient/1").status_code == 200
    assert get(first, token, "Patient/1").status_code == 401
    bad = httpx.post(second["keycloak_token_url"], data={
        "grant_type": "client_credentials", "client_id": second["client_id"], "client_secret": first["client_secret"]})
    assert bad.status_code == 401


def test_practices_below_one_are_refused(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "serve", "--port", str(free_port()), "--practices", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "--practices must be at least 1" in done.stderr
