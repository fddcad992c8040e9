"""The fault suite's sandbox (its own: faults and writes stay here), client configs and fault timing helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import connections_env
from tests.conftest import sandbox_fixtures
from tests.reliability._plugin import figures, pytest_runtest_makereport

__all__ = ["figures", "pytest_runtest_makereport"]


#: this suite's own sandbox (40 patients, fast bulk jobs); ``sb``: it with faults cleared around each test
sandbox, sb = sandbox_fixtures("sandbox", scope="package", patients=40, seed=11, export_seconds=0.3)


@pytest.fixture(scope="package")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    """The suite sandbox's Airflow connections as AIRFLOW_CONN_* variables (restored afterwards)."""
    conns: dict[str, dict[str, Any]] = sandbox.credentials["airflow_connections"]
    with connections_env(conns):
        yield conns


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token cache or rate-limit storage carried over from another test."""
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


def prop_config(sb: SandboxServer, method: str = "password", **over: Any) -> ClientConfig:
    p = sb.credentials["proprietary"]
    values: dict[str, Any] = {"track": "proprietary", "fhir_base": p["fhir_base"], "firm": "apiportal",
                              "api_key": p["api_key"], "auth_method": method}
    if method == "password":
        values.update(username=p["username"], password=p["password"])
    else:
        values.update(client_id=p["client_id"], client_secret=p["client_secret"],
                      token_url=p["keycloak_token_url"])
    return ClientConfig(**{**values, **over})


def cert_config(sb: SandboxServer, **over: Any) -> ClientConfig:
    c = sb.credentials["certified"]
    d = c["private_key_jwt"]
    values: dict[str, Any] = {"track": "certified", "fhir_base": c["fhir_base"], "firm": "apiportal",
                              "client_id": d["client_id"], "auth_method": "private_key_jwt",
                              "private_key": d["private_key"], "key_id": d["key_id"], "jwt_algorithm": d["algorithm"]}
    return ClientConfig(**{**values, **over})


class Backoff:
    """An injected ``sleep``: records the waits the client asks for, and waits for none of them."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)

    @property
    def total(self) -> float:
        return round(sum(self.waits), 2)


def client(config: ClientConfig, backoff: Backoff | None = None) -> FhirClient:
    return FhirClient(config, sleep=backoff if backoff is not None else (lambda s: None))


def on_request(c: FhirClient, when: Callable[[httpx.Request], bool], action: Callable[[], Any],
               times: int = 1) -> list[httpx.Request]:
    """Run ``action`` just before the n-th request matching ``when`` is sent (n = ``times``-th match, once).

    Returns the list of matching requests seen (for counting pages). Installed first among the event hooks,
    so the fault is switched on before the request leaves.
    """
    seen: list[httpx.Request] = []

    def hook(request: httpx.Request) -> None:
        if when(request):
            seen.append(request)
            if len(seen) == times:
                action()

    c.http.event_hooks["request"] = [hook, *c.http.event_hooks["request"]]
    return seen


def is_page(resource_type: str) -> Callable[[httpx.Request], bool]:
    """A search page of ``resource_type`` (first page or a ``next`` link)."""
    def match(request: httpx.Request) -> bool:
        return request.method == "GET" and request.url.path.endswith(f"/{resource_type}")
    return match


def live(sb: SandboxServer, rt: str) -> dict[str, str]:
    """Ground truth: id -> versionId of the resources of ``rt`` that are not deleted."""
    return {r["id"]: r["versionId"] for r in sb.app_state.store.ground_truth(rt) if not r["deleted"]}


def ndjson_ids(path: Any) -> list[str]:
    text = Path(str(path).removeprefix("file://")).read_text()
    return [json.loads(line)["id"] for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """`airflow db migrate` once per session, on SQLite under the test AIRFLOW_HOME."""
    from tests.airflow.conftest import airflow_cli

    airflow_cli("db", "migrate")
    return os.environ["AIRFLOW_HOME"]
