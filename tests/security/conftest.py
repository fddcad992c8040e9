"""The security suite's sandbox: recognizable seeded secrets, so a leak anywhere can be found by value."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client import auth as auth_mod
from airflow_provider_modmed.client import limiter as limiter_mod
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import connections_env
from tests.reliability._plugin import figures, pytest_runtest_makereport

__all__ = ["figures", "pytest_runtest_makereport"]

#: every seeded secret starts with this: the scans also look for the bare marker
MARKER = "SEEDSECRET"
RUN = secrets.token_hex(4)
SEEDED = {
    "api_key": f"{MARKER}-apikey-{RUN}",
    "password": f"{MARKER}-password-{RUN}",
    "client_secret": f"{MARKER}-keycloak-{RUN}",
    "cert_client_secret": f"{MARKER}-certsecret-{RUN}",
}


@pytest.fixture(scope="package")
def seeded() -> Iterator[SandboxServer]:
    """A sandbox whose API key, password and client secrets are the recognizable values of SEEDED."""
    with SandboxServer(patients=12, seed=97, export_seconds=0.3, rate_limit_per_minute=100_000,
                       credential_overrides=dict(SEEDED)) as server:
        yield server


@pytest.fixture
def sb(seeded: SandboxServer) -> Iterator[SandboxServer]:
    seeded.reset_faults()
    yield seeded
    seeded.reset_faults()


@pytest.fixture(scope="package")
def modmed_connections(seeded: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    """The seeded sandbox's connections, plus three whose secrets are wrong (for failing runs)."""
    conns: dict[str, dict[str, Any]] = json.loads(json.dumps(seeded.credentials["airflow_connections"]))
    wrong_password = json.loads(json.dumps(conns["modmed_default"]))
    wrong_password["password"] = f"{MARKER}-wrongpassword-{RUN}"
    wrong_key = json.loads(json.dumps(conns["modmed_default"]))
    wrong_key["extra"]["api_key"] = f"{MARKER}-wrongapikey-{RUN}"
    wrong_secret = json.loads(json.dumps(conns["modmed_proprietary_cc"]))
    wrong_secret["extra"]["client_secret"] = f"{MARKER}-wrongsecret-{RUN}"
    conns.update(modmed_wrong_password=wrong_password, modmed_wrong_key=wrong_key,
                 modmed_wrong_secret=wrong_secret)
    with connections_env(conns):
        yield conns


@pytest.fixture(scope="session")
def airflow_db() -> str:
    from tests.airflow.conftest import airflow_cli

    airflow_cli("db", "migrate")
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_mod, "_caches", {})
    monkeypatch.setattr(limiter_mod, "_sync_storages", {})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA made for the module and a certificate it signed for 127.0.0.1/localhost: (cert, key, ca) paths."""
    from tests.security.servers import issue_certificate

    return issue_certificate(tmp_path_factory.mktemp("pki"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tls_sandbox(pki: tuple[Path, Path, Path]) -> Iterator[SandboxServer]:
    """The module's sandbox on https:// (both listeners), its certificate signed by ``pki``'s CA; seeded
    secrets; 6 patients."""
    cert, key, _ = pki
    with SandboxServer(patients=6, seed=41, export_seconds=0.2, rate_limit_per_minute=100_000,
                       credential_overrides=dict(SEEDED), tls_cert=cert, tls_key=key) as server:
        yield server
