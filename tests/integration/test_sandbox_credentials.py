"""Issue 15, items 1 and 11: what `modmed-sandbox credentials` prints works against the running sandbox,
and keys made by `modmed-sandbox keys` rotate against it (two kids registered, the old one retired).

Everything runs as users run it: the sandbox and the CLI in separate processes, over real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt

from airflow_provider_modmed.client.auth import token_cache
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.errors import AuthError
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox.certified_ids import certified_id, served_id
from airflow_provider_modmed.sandbox.keys import key_from_pem
from airflow_provider_modmed.sandbox.server import SandboxServer
from airflow_provider_modmed.sandbox.smart import ASSERTION_TYPE
from tests.conftest import free_port
from tests.integration.sandbox_process import CLI, serve

pytestmark = pytest.mark.integration



def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=check, timeout=120)


def config_for(conn: dict[str, Any]) -> ClientConfig:
    """The client configuration of one printed Airflow connection, as the hook maps it."""
    return config_from_connection(host=conn.get("host"), port=conn.get("port"), login=conn.get("login"),
                                  password=conn.get("password"), extra=conn["extra"])


def client_for(conn: dict[str, Any]) -> FhirClient:
    return FhirClient(config_for(conn))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[int]:
    """`modmed-sandbox serve --port P` (no --data-dir: its keys are generated at start), in its own process."""
    port = free_port()
    with serve(port, "--storage-port", str(free_port()), "--patients", "5", "--seed", "11",
               output=tmp_path / "serve.log"):
        yield port


def test_every_printed_connection_authenticates_against_the_running_sandbox(served: int) -> None:
    printed = json.loads(cli("credentials", "--json", "--port", str(served)).stdout)
    connections = printed["airflow_connections"]
    assert set(connections) == {"modmed_default", "modmed_proprietary_cc", "modmed_certified",
                                "modmed_certified_es384", "modmed_certified_secret"}
    stored_id = httpx.get(f"http://127.0.0.1:{served}/_sandbox/resources/Patient").json()[0]["id"]
    for conn_id, conn in connections.items():
        patient_id = served_id(conn["extra"]["track"], stored_id)  # each track names the Patient its own way
        with client_for(conn) as client:
            patient = client.read("Patient", patient_id)  # a token request first, then an authorised read
        assert patient["id"] == patient_id, conn_id
    stats = httpx.get(f"http://127.0.0.1:{served}/_sandbox/stats").json()
    assert stats.get("unauthorized", 0) == 0


def test_credentials_without_a_running_sandbox_says_to_start_it(tmp_path: Path) -> None:
    port = free_port()
    done = cli("credentials", "--json", "--port", str(port), check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert f"modmed-sandbox serve --port {port}" in done.stderr and "--data-dir" in done.stderr
    # with --data-dir the keys are on disk: the credentials of a sandbox started later with the same flags
    offline = cli("credentials", "--json", "--port", str(port), "--data-dir", str(tmp_path), "--seed", "4")
    assert "no sandbox answers" in offline.stderr
    conn = json.loads(offline.stdout)["airflow_connections"]["modmed_certified_es384"]
    with SandboxServer(port=port, storage_port=free_port(), patients=2, seed=4, data_dir=tmp_path), \
            client_for(conn) as client:
        assert client.search("Patient", count=1)


# -- item 11: keys for the certified track, and a rotation -------------------------------------------------


def certified_connection(sb: SandboxServer, client_id: str, pem_file: Path, kid: str, alg: str) -> dict[str, Any]:
    return {"conn_type": "modmed", "host": sb.credentials["certified"]["fhir_base"],
            "extra": {"track": "certified", "environment": "custom", "firm_url_prefix": "apiportal",
                      "auth_method": "private_key_jwt", "client_id": client_id, "key_id": kid,
                      "jwt_algorithm": alg, "private_key": pem_file.read_text(), "scope": "system/*.read"}}


def signed_assertion(pem_file: Path, kid: str, alg: str, client_id: str, aud: str) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 120, "iat": now, "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": alg, "kid": kid, "typ": "JWT"}, claims, key_from_pem(pem_file.read_bytes())[0],
                      algorithms=[alg])


def test_key_rotation_against_the_sandbox(sb: SandboxServer, tmp_path: Path) -> None:
    port = sb.api_url.rsplit(":", 1)[1]
    (tmp_path / "old.jwks.json").write_text(cli("keys", "new", "--alg", "ES384", "--kid", "app-2024",
                                                "--private-key-out", str(tmp_path / "old.pem")).stdout)
    (tmp_path / "new.jwks.json").write_text(cli("keys", "new", "--alg", "RS384", "--kid", "app-2025",
                                                "--private-key-out", str(tmp_path / "new.pem")).stdout)
    assert (tmp_path / "old.pem").stat().st_mode & 0o077 == 0
    assert "PRIVATE" not in (tmp_path / "old.jwks.json").read_text()
    old = certified_connection(sb, "rotating-app", tmp_path / "old.pem", "app-2024", "ES384")
    patient = certified_id("1")  # Patient 1 on the certified track
    new = certified_connection(sb, "rotating-app", tmp_path / "new.pem", "app-2025", "RS384")

    # 1. register both public keys (the JWKS handed to ModMed during the rotation)
    both = cli("keys", "jwks", str(tmp_path / "old.jwks.json"), str(tmp_path / "new.jwks.json")).stdout
    assert [k["kid"] for k in json.loads(both)["keys"]] == ["app-2024", "app-2025"]
    (tmp_path / "both.json").write_text(both)
    cli("keys", "register", "--client-id", "rotating-app", "--port", port, str(tmp_path / "both.json"))
    # 2. each key authenticates (the connection can be switched at any moment)
    for conn in (old, new):
        with client_for(conn) as client:
            assert client.read("Patient", patient)["id"] == patient
    # 3. retire the old kid: its assertions are refused, the new key still works
    retired = cli("keys", "jwks", str(tmp_path / "both.json"), "--retire", "app-2024").stdout
    (tmp_path / "retired.json").write_text(retired)
    cli("keys", "register", "--client-id", "rotating-app", "--port", port, str(tmp_path / "retired.json"))
    registered = httpx.get(f"{sb.api_url}/_sandbox/clients/rotating-app/jwks").json()
    assert [k["kid"] for k in registered["keys"]] == ["app-2025"]
    # a token issued before the retirement lives out its lifetime (as at ModMed); the next assertion signed
    # with the old key, once that token is gone, is refused
    old_config = config_for(old)
    token_cache(old_config.credential_key).clear()
    with FhirClient(old_config) as client, pytest.raises(AuthError) as refused:
        client.read("Patient", patient)
    assert "invalid_client" in str(refused.value) and "PRIVATE KEY" not in str(refused.value)
    token_url = sb.credentials["certified"]["token_url"]
    answer = httpx.post(token_url, data={
        "grant_type": "client_credentials", "scope": "system/*.read", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": signed_assertion(tmp_path / "old.pem", "app-2024", "ES384", "rotating-app", token_url)})
    assert answer.status_code == 401
    assert answer.json()["error_description"] == "client_assertion kid 'app-2024' is not in the registered JWKS"
    with client_for(new) as client:
        assert client.read("Patient", patient)["id"] == patient


def test_register_refuses_a_bad_jwks(sb: SandboxServer, tmp_path: Path) -> None:
    url = f"{sb.api_url}/_sandbox/clients/some-app/jwks"
    private = json.loads(cli("keys", "new", "--json").stdout)
    jwk = private["jwks"]["keys"][0]
    for body, fragment in (({"keys": [{**jwk, "alg": "RS256"}]}, "RS256"),
                           ({"keys": [jwk, jwk]}, "appears twice"),
                           ({"keys": [{k: v for k, v in jwk.items() if k != "kid"}]}, "kid")):
        refused = httpx.put(url, json=body)
        assert refused.status_code == 400 and fragment in refused.json()["error"]
    assert httpx.get(url).status_code == 404  # nothing was registered
    secret_client = sb.credentials["certified"]["client_secret_post"]["client_id"]
    assert httpx.put(f"{sb.api_url}/_sandbox/clients/{secret_client}/jwks", json=private["jwks"]).status_code == 400
