"""The sandbox's credentials and SMART backend-services checks (pure functions, no HTTP)."""

from __future__ import annotations

import base64
import json
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from airflow_provider_modmed.sandbox.credentials import (
    AsymmetricClient,
    SandboxCredentials,
    credentials_document,
    make_credentials,
)
from airflow_provider_modmed.sandbox.smart import (
    ASSERTION_TYPE,
    OAuthError,
    issue_certified_token,
    scope_allows,
    smart_configuration,
)

API = "http://127.0.0.1:8899"
STORAGE = "http://127.0.0.1:8900"
TOKEN_URL = f"{API}/certified/apiportal/auth/token"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def creds() -> SandboxCredentials:
    return make_credentials(seed=7)


@pytest.fixture(scope="module")
def other_rsa() -> RSAKey:
    return RSAKey.generate_key(2048, private=True)


def _sign(client: AsymmetricClient, *, header: dict[str, Any] | None = None,
          claims: dict[str, Any] | None = None, key: Any = None, drop: tuple[str, ...] = ()) -> str:
    """A valid assertion for ``client`` at NOW, with ``header``/``claims`` overrides."""
    h: dict[str, Any] = {"alg": client.algorithm, "kid": client.key_id, "typ": "JWT"}
    h.update(header or {})
    c: dict[str, Any] = {"iss": client.client_id, "sub": client.client_id, "aud": TOKEN_URL,
                         "exp": int(NOW) + 240, "jti": uuid.uuid4().hex}
    c.update(claims or {})
    for name in drop:
        h.pop(name, None)
        c.pop(name, None)
    signing_key = key if key is not None else (
        RSAKey.import_key(client.private_key_pem) if client.algorithm == "RS384"
        else ECKey.import_key(client.private_key_pem))
    return jwt.encode(h, c, signing_key, algorithms=[h["alg"]])


def _form(assertion: str, scope: str = "system/*.read", **extra: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, **extra}


def _issue(form: dict[str, str], creds: SandboxCredentials, *, now: float = NOW,
           seen: dict[str, float] | None = None) -> tuple[str, list[str]]:
    return issue_certified_token(form, token_url=TOKEN_URL, creds=creds, now=now,
                                 seen_jti={} if seen is None else seen)


def _refused(form: dict[str, str], creds: SandboxCredentials, **kw: Any) -> OAuthError:
    with pytest.raises(OAuthError) as info:
        _issue(form, creds, **kw)
    return info.value


# --- credentials -------------------------------------------------------------------------------------


def test_make_credentials_is_deterministic_per_seed() -> None:
    a, b, c = make_credentials(seed=1), make_credentials(seed=1), make_credentials(seed=2)
    fields = ("api_key", "username", "password", "cc_client_id", "cc_client_secret", "cert_client_id",
              "cert_client_secret")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    for f in ("api_key", "password", "cc_client_secret", "cert_client_secret"):
        assert getattr(a, f) != getattr(c, f)
        assert len(getattr(a, f)) >= 20
    assert a.api_key.startswith("sbx-apikey-")
    assert a.cc_client_secret.startswith("sbx-secret-")
    assert a.cert_client_secret.startswith("sbx-secret-")
    assert a.cc_client_secret != a.cert_client_secret
    # keys generated in memory: fresh per call, not written anywhere
    assert a.rs384.private_key_path is None
    assert a.es384.private_key_path is None


def test_make_credentials_overrides() -> None:
    creds = make_credentials(overrides={"api_key": "k" * 24, "client_id": "my-cc", "client_secret": "s" * 24,
                                        "cert_client_id": "my-cert", "username": "u", "password": "p"})
    assert (creds.api_key, creds.cc_client_id, creds.cc_client_secret, creds.cert_client_id,
            creds.username, creds.password) == ("k" * 24, "my-cc", "s" * 24, "my-cert", "u", "p")
    with pytest.raises(ValueError, match="unknown credential override"):
        make_credentials(overrides={"apikey": "x"})


def test_key_types_and_jwks(creds: SandboxCredentials) -> None:
    rsa_key = RSAKey.import_key(creds.rs384.private_key_pem)
    assert rsa_key.is_private
    assert rsa_key.private_key is not None
    assert rsa_key.private_key.key_size == 2048
    ec_key = ECKey.import_key(creds.es384.private_key_pem)
    assert ec_key.curve_name == "P-384"
    assert creds.rs384.key_id.startswith("sbx-rs384-")
    assert creds.es384.key_id.startswith("sbx-es384-")
    jwks: Any = creds.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [creds.rs384.key_id, creds.es384.key_id]
    assert [k["alg"] for k in jwks["keys"]] == ["RS384", "ES384"]
    for k in jwks["keys"]:
        assert "d" not in k  # public only
    KeySet.import_key_set(jwks)  # a valid JWKS


def test_keys_persist_in_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "state"
    first = make_credentials(data_dir=data)
    for name, client in (("rs384-private.pem", first.rs384), ("es384-private.pem", first.es384)):
        path = data / name
        assert client.private_key_path == str(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == client.private_key_pem
    assert sorted(p.name for p in data.iterdir()) == ["es384-private.pem", "rs384-private.pem"]
    second = make_credentials(data_dir=data)
    assert second.rs384 == first.rs384
    assert second.es384 == first.es384
    # an assertion signed with the persisted key is accepted by a restarted sandbox
    assert _issue(_form(_sign(first.rs384)), second)[0] == first.rs384.client_id


def test_corrupt_key_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "rs384-private.pem").write_text("not a key")
    with pytest.raises(ValueError, match=r"rs384-private\.pem is not a valid RS384 private key"):
        make_credentials(data_dir=tmp_path)


def test_credentials_document_layout(creds: SandboxCredentials) -> None:
    doc = credentials_document(creds, api_url=API, storage_url=STORAGE)
    assert set(doc) == {"firm_url_prefix", "api_url", "storage_url", "proprietary", "certified",
                        "airflow_connections", "airflow_connection_uris"}
    assert (doc["firm_url_prefix"], doc["api_url"], doc["storage_url"]) == ("apiportal", API, STORAGE)
    assert doc["proprietary"] == {
        "env_base": f"{API}/ema-dev/firm",
        "fhir_base": f"{API}/ema-dev/firm/apiportal/ema/fhir/v2",
        "token_url": f"{API}/ema-dev/firm/apiportal/ema/ws/oauth2/grant",
        "api_key": creds.api_key, "username": creds.username, "password": creds.password,
        "keycloak_token_url": f"{API}/auth/realms/ema-fhir/protocol/openid-connect/token",
        "client_id": creds.cc_client_id, "client_secret": creds.cc_client_secret,
    }
    cert = doc["certified"]
    assert cert["fhir_base"] == f"{API}/certified/apiportal/fhir/r4"
    assert cert["token_url"] == TOKEN_URL
    assert cert["client_secret_post"] == {"client_id": creds.cert_client_id,
                                          "client_secret": creds.cert_client_secret}
    for key, client in (("private_key_jwt", creds.rs384), ("private_key_jwt_es384", creds.es384)):
        assert cert[key] == {"client_id": client.client_id, "key_id": client.key_id,
                             "algorithm": client.algorithm, "private_key": client.private_key_pem,
                             "private_key_path": None}
    conns = doc["airflow_connections"]
    assert set(conns) == {"modmed_default", "modmed_proprietary_cc", "modmed_certified",
                          "modmed_certified_es384", "modmed_certified_secret"}
    assert set(doc["airflow_connection_uris"]) == set(conns)
    default = conns["modmed_default"]
    assert (default["conn_type"], default["host"], default["login"], default["password"]) == (
        "modmed", f"{API}/ema-dev/firm", creds.username, creds.password)
    assert default["extra"] == {"track": "proprietary", "environment": "custom",
                                "firm_url_prefix": "apiportal", "auth_method": "password",
                                "api_key": creds.api_key}
    assert conns["modmed_proprietary_cc"]["extra"] == {
        "track": "proprietary", "environment": "custom", "firm_url_prefix": "apiportal",
        "auth_method": "client_secret", "client_id": creds.cc_client_id,
        "client_secret": creds.cc_client_secret, "token_url": doc["proprietary"]["keycloak_token_url"],
        "api_key": creds.api_key}
    assert conns["modmed_certified"]["host"] == cert["fhir_base"]
    assert conns["modmed_certified"]["extra"] == {
        "track": "certified", "environment": "custom", "firm_url_prefix": "apiportal",
        "auth_method": "private_key_jwt", "client_id": creds.rs384.client_id,
        "private_key": creds.rs384.private_key_pem, "key_id": creds.rs384.key_id,
        "jwt_algorithm": "RS384", "scope": "system/*.read"}
    assert conns["modmed_certified_es384"]["extra"]["jwt_algorithm"] == "ES384"
    assert conns["modmed_certified_es384"]["extra"]["key_id"] == creds.es384.key_id
    secret = conns["modmed_certified_secret"]["extra"]
    assert (secret["auth_method"], secret["client_id"], secret["client_secret"]) == (
        "client_secret", creds.cert_client_id, creds.cert_client_secret)
    json.dumps(doc)  # serializable


def test_credentials_document_env(creds: SandboxCredentials) -> None:
    doc = credentials_document(creds, api_url=API + "/", storage_url=STORAGE, env="training")
    assert doc["api_url"] == API
    assert doc["proprietary"]["fhir_base"] == f"{API}/ema-training/firm/apiportal/ema/fhir/v2"


@pytest.mark.parametrize("module", ["airflow.sdk", "airflow.models.connection"])
def test_connection_uris_round_trip(creds: SandboxCredentials, module: str) -> None:
    import importlib

    connection_cls = importlib.import_module(module).Connection
    doc = credentials_document(creds, api_url=API, storage_url=STORAGE)
    for conn_id, uri in doc["airflow_connection_uris"].items():
        expected = doc["airflow_connections"][conn_id]
        conn = connection_cls.from_uri(uri, conn_id=conn_id) if module == "airflow.sdk" else (
            connection_cls(conn_id=conn_id, uri=uri))
        assert conn.conn_type == "modmed"
        assert conn.host == expected["host"]
        assert conn.login == expected.get("login")
        assert conn.password == expected.get("password")
        assert conn.port is None
        assert conn.extra_dejson == expected["extra"], conn_id


# --- discovery and scopes ----------------------------------------------------------------------------


def test_smart_configuration() -> None:
    doc = smart_configuration(fhir_base=f"{API}/certified/apiportal/fhir/r4", token_url=TOKEN_URL)
    assert doc["token_endpoint"] == TOKEN_URL
    assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt", "client_secret_post"]
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert set(doc["capabilities"]) == {"client-confidential-asymmetric", "client-confidential-symmetric",
                                        "permission-v1", "permission-v2"}
    scopes = doc["scopes_supported"]
    assert {"system/*.read", "system/*.rs", "system/Patient.read", "system/Patient.rs",
            "system/Observation.rs", "system/Immunization.read"} <= set(scopes)
    assert "system/Appointment.read" not in scopes  # proprietary-only type
    assert all(s.startswith("system/") for s in scopes)


@pytest.mark.parametrize(
    ("scopes", "resource_type", "interaction", "allowed"),
    [
        (["system/*.read"], "Patient", "read", True),
        (["system/*.read"], "Observation", "search-type", True),
        (["system/Patient.read"], "Patient", "read", True),
        (["system/Patient.read"], "Patient", "search-type", True),
        (["system/Patient.read"], "Observation", "read", False),
        (["system/*.rs"], "Condition", "read", True),
        (["system/*.rs"], "Condition", "search-type", True),
        (["system/Patient.rs"], "Patient", "search-type", True),
        (["system/Observation.r"], "Observation", "read", True),
        (["system/Observation.r"], "Observation", "search-type", False),
        (["system/Observation.s"], "Observation", "search-type", True),
        (["system/Observation.s"], "Observation", "read", False),
        (["system/Patient.rs", "system/Observation.r"], "Observation", "read", True),
        (["system/*.read"], "Patient", "create", False),
        (["system/*.read"], "Patient", "update", False),
        (["system/*.read"], "Patient", "delete", False),
        (["system/*.cruds"], "Patient", "create", False),
        (["system/*.write"], "Patient", "update", False),
        (["system/*.write"], "Patient", "read", False),
        (["user/*.read"], "Patient", "read", False),
        (["patient/Patient.rs"], "Patient", "read", False),
        (["system/Patient.sr"], "Patient", "read", False),  # v2 letters out of order: not a scope
        (["openid", "offline_access"], "Patient", "read", False),
        ([], "Patient", "read", False),
    ],
)
def test_scope_allows(scopes: list[str], resource_type: str, interaction: str, allowed: bool) -> None:
    assert scope_allows(scopes, resource_type, interaction) is allowed


def test_scope_allows_takes_interaction_enum() -> None:
    from airflow_provider_modmed.capabilities import Interaction

    assert scope_allows(["system/*.rs"], "Patient", Interaction.READ)
    assert scope_allows(["system/*.rs"], "Patient", Interaction.SEARCH)
    assert not scope_allows(["system/*.rs"], "Patient", Interaction.CREATE)


# --- token: success ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rs384", "es384"])
def test_private_key_jwt_signed_by_authlib(creds: SandboxCredentials, which: str) -> None:
    client: AsymmetricClient = getattr(creds, which)
    key = RSAKey.import_key(client.private_key_pem) if which == "rs384" else (
        ECKey.import_key(client.private_key_pem))
    assertion = private_key_jwt_sign(key, client.client_id, TOKEN_URL,
                                     alg=client.algorithm, header={"kid": client.key_id, "typ": "JWT"},
                                     expires_in=240)
    seen: dict[str, float] = {}
    client_id, scopes = _issue(_form(assertion, "system/Patient.rs system/*.read"), creds,
                               now=time.time(), seen=seen)
    assert client_id == client.client_id
    assert scopes == ["system/Patient.rs", "system/*.read"]
    assert len(seen) == 1


@pytest.mark.parametrize("which", ["rs384", "es384"])
def test_private_key_jwt_signed_by_joserfc(creds: SandboxCredentials, which: str) -> None:
    client: AsymmetricClient = getattr(creds, which)
    # client_id in the form is optional, and accepted when it matches iss
    assert _issue(_form(_sign(client), client_id=client.client_id), creds) == (
        client.client_id, ["system/*.read"])


def test_client_secret_post(creds: SandboxCredentials) -> None:
    form = {"grant_type": "client_credentials", "scope": "system/*.rs system/*.rs",
            "client_id": creds.cert_client_id, "client_secret": creds.cert_client_secret}
    assert _issue(form, creds) == (creds.cert_client_id, ["system/*.rs"])


def test_exp_within_leeway_is_accepted(creds: SandboxCredentials) -> None:
    assert _issue(_form(_sign(creds.rs384, claims={"exp": int(NOW) + 305})), creds)


def test_aud_as_list(creds: SandboxCredentials) -> None:
    assert _issue(_form(_sign(creds.rs384, claims={"aud": [TOKEN_URL]})), creds)


# --- token: refusals ---------------------------------------------------------------------------------


def test_bad_signature(creds: SandboxCredentials, other_rsa: RSAKey) -> None:
    err = _refused(_form(_sign(creds.rs384, key=other_rsa)), creds)
    assert (err.status, err.error) == (401, "invalid_client")
    assert "signature verification failed" in err.description
    assert err.to_dict() == {"error": "invalid_client", "error_description": err.description}


def test_es384_der_signature_is_refused_with_a_hint(creds: SandboxCredentials) -> None:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "ES384", "kid": creds.es384.key_id, "typ": "JWT"}).encode())
    payload = b64(json.dumps({"iss": creds.es384.client_id, "sub": creds.es384.client_id,
                              "aud": TOKEN_URL, "exp": int(NOW) + 60, "jti": "der"}).encode())
    key = serialization.load_pem_private_key(creds.es384.private_key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA384()))
    err = _refused(_form(f"{header}.{payload}.{b64(der)}"), creds)
    assert err.error == "invalid_client"
    assert "not DER" in err.description


@pytest.mark.parametrize(
    ("claims", "drop", "message"),
    [
        ({"aud": f"{TOKEN_URL}/"}, (), "aud does not match the token endpoint"),
        ({"aud": f"{API}/certified/apiportal/fhir/r4"}, (), "aud does not match the token endpoint"),
        ({"exp": int(NOW) - 1}, (), "expired"),
        ({"exp": int(NOW) + 600}, (), "more than 300 seconds"),
        ({}, ("exp",), "no numeric exp"),
        ({"exp": "soon"}, (), "no numeric exp"),
        ({}, ("jti",), "no jti"),
        ({"sub": "someone-else"}, (), "iss and sub differ"),
        ({}, ("sub",), "needs both iss and sub"),
        ({"iss": "sbx-certified-es384", "sub": "sbx-certified-es384"}, (), "is not the client registered"),
        ({"nbf": int(NOW) + 120}, (), "nbf is in the future"),
    ],
)
def test_claim_refusals(creds: SandboxCredentials, claims: dict[str, Any], drop: tuple[str, ...],
                        message: str) -> None:
    err = _refused(_form(_sign(creds.rs384, claims=claims, drop=drop)), creds)
    assert (err.status, err.error) == (401, "invalid_client")
    assert message in err.description


def test_reused_jti(creds: SandboxCredentials) -> None:
    seen: dict[str, float] = {}
    assertion = _sign(creds.es384, claims={"jti": "once"})
    _issue(_form(assertion), creds, seen=seen)
    err = _refused(_form(assertion), creds, seen=seen)
    assert err.error == "invalid_client"
    assert "jti was already used" in err.description
    # a fresh assertion reusing the jti is refused too
    err = _refused(_form(_sign(creds.es384, claims={"jti": "once"})), creds, seen=seen)
    assert "jti was already used" in err.description


def test_seen_jti_is_purged_after_expiry(creds: SandboxCredentials) -> None:
    seen = {"old": NOW - 1, "live": NOW + 100}
    _issue(_form(_sign(creds.rs384)), creds, seen=seen)
    assert "old" not in seen
    assert "live" in seen
    assert len(seen) == 2


def test_failed_assertion_does_not_burn_its_jti(creds: SandboxCredentials) -> None:
    seen: dict[str, float] = {}
    _refused(_form(_sign(creds.rs384, claims={"jti": "j1", "aud": "http://elsewhere"})), creds, seen=seen)
    assert seen == {}


@pytest.mark.parametrize(
    ("header", "drop", "message"),
    [
        ({}, ("kid",), "header has no kid"),
        ({"kid": "sbx-rs384-00000000"}, (), "is not in the registered JWKS"),
        ({"jku": "https://example.com/jwks.json"}, (), "jku header is not allowed"),
        ({"typ": "JOSE+JSON"}, (), "typ must be JWT"),
    ],
)
def test_header_refusals(creds: SandboxCredentials, header: dict[str, Any], drop: tuple[str, ...],
                         message: str) -> None:
    err = _refused(_form(_sign(creds.rs384, header=header, drop=drop)), creds)
    assert (err.status, err.error) == (401, "invalid_client")
    assert message in err.description


def test_alg_rs256_is_refused(creds: SandboxCredentials) -> None:
    key = RSAKey.import_key(creds.rs384.private_key_pem)
    err = _refused(_form(_sign(creds.rs384, header={"alg": "RS256"}, key=key)), creds)
    assert err.error == "invalid_client"
    assert "alg 'RS256' is not supported" in err.description


def test_alg_not_the_registered_one(creds: SandboxCredentials) -> None:
    # signed ES384 but naming the RS384 client's kid
    key = ECKey.import_key(creds.es384.private_key_pem)
    err = _refused(_form(_sign(creds.rs384, header={"alg": "ES384"}, key=key)), creds)
    assert err.error == "invalid_client"
    assert "does not match the algorithm registered" in err.description


def test_unsigned_none_alg_is_refused(creds: SandboxCredentials) -> None:
    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    token = f"{b64({'alg': 'none', 'kid': creds.rs384.key_id})}.{b64({'iss': 'x'})}."
    assert "alg 'none' is not supported" in _refused(_form(token), creds).description


@pytest.mark.parametrize("assertion", ["", "garbage", "a.b.c", "a.b.c.d.e", "é.é.é"])
def test_malformed_assertion(creds: SandboxCredentials, assertion: str) -> None:
    err = _refused(_form(assertion), creds)
    assert (err.status, err.error) == (401, "invalid_client")


def test_wrong_assertion_type(creds: SandboxCredentials) -> None:
    form = _form(_sign(creds.rs384))
    form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"
    err = _refused(form, creds)
    assert (err.status, err.error) == (401, "invalid_client")
    assert "client_assertion_type must be" in err.description


def test_form_client_id_must_match_iss(creds: SandboxCredentials) -> None:
    err = _refused(_form(_sign(creds.rs384), client_id=creds.es384.client_id), creds)
    assert "client_id does not match" in err.description


@pytest.mark.parametrize(
    ("client_id", "secret", "message"),
    [
        (None, "wrong-secret-wrong-secret", "does not match"),
        ("nobody", None, "unknown client_id"),
        ("", None, "client_id is required"),
        ("sbx-certified-rs384", None, "registered for private_key_jwt"),
    ],
)
def test_client_secret_refusals(creds: SandboxCredentials, client_id: str | None, secret: str | None,
                                message: str) -> None:
    form = {"grant_type": "client_credentials", "scope": "system/*.read",
            "client_id": creds.cert_client_id if client_id is None else client_id,
            "client_secret": creds.cert_client_secret if secret is None else secret}
    err = _refused(form, creds)
    assert (err.status, err.error) == (401, "invalid_client")
    assert message in err.description


def test_proprietary_client_is_not_a_certified_client(creds: SandboxCredentials) -> None:
    form = {"grant_type": "client_credentials", "scope": "system/*.read",
            "client_id": creds.cc_client_id, "client_secret": creds.cc_client_secret}
    assert _refused(form, creds).error == "invalid_client"


def test_no_client_authentication(creds: SandboxCredentials) -> None:
    err = _refused({"grant_type": "client_credentials", "scope": "system/*.read", "client_id": "x"}, creds)
    assert (err.status, err.error) == (401, "invalid_client")


def test_secret_and_assertion_together(creds: SandboxCredentials) -> None:
    form = _form(_sign(creds.rs384), client_id=creds.cert_client_id,
                 client_secret=creds.cert_client_secret)
    err = _refused(form, creds)
    assert (err.status, err.error) == (400, "invalid_request")


def test_assertion_type_without_assertion(creds: SandboxCredentials) -> None:
    form = _form("")
    del form["client_assertion"]
    assert (_refused(form, creds).status, _refused(form, creds).error) == (400, "invalid_request")


@pytest.mark.parametrize(("grant_type", "error"), [("password", "unsupported_grant_type"),
                                                   ("authorization_code", "unsupported_grant_type"),
                                                   ("", "invalid_request")])
def test_grant_type(creds: SandboxCredentials, grant_type: str, error: str) -> None:
    form = _form(_sign(creds.rs384))
    form["grant_type"] = grant_type
    err = _refused(form, creds)
    assert (err.status, err.error) == (400, error)


@pytest.mark.parametrize(
    "scope",
    ["", "   ", "system/*.write", "system/Patient.cruds", "system/*.*", "system/Patient.rsu",
     "user/*.read", "patient/Patient.rs", "openid", "system/*.read offline_access",
     "system/Observation.rs?category=vital-signs", "system/Patient.sr"],
)
def test_scope_refusals(creds: SandboxCredentials, scope: str) -> None:
    err = _refused(_form(_sign(creds.rs384), scope=scope), creds)
    assert (err.status, err.error) == (400, "invalid_scope")


def test_missing_scope(creds: SandboxCredentials) -> None:
    form = _form(_sign(creds.rs384))
    del form["scope"]
    err = _refused(form, creds)
    assert (err.status, err.error) == (400, "invalid_scope")
    assert "scope is required" in err.description


def test_client_is_authenticated_before_the_scope_is_checked(creds: SandboxCredentials,
                                                             other_rsa: RSAKey) -> None:
    err = _refused(_form(_sign(creds.rs384, key=other_rsa), scope="system/*.write"), creds)
    assert err.error == "invalid_client"


# --- JWKS registered at run time (issue 15, item 11) ----------------------------------------------------------


def test_registered_jwks_authenticate_and_a_replaced_jwks_retires_a_kid() -> None:
    from airflow_provider_modmed.sandbox.keys import generate_key, public_jwk

    creds = make_credentials(seed=9)  # its own: registration changes the credentials
    old_key, new_key = generate_key("ES384"), generate_key("RS384")
    old = AsymmetricClient("app", "k-old", "ES384", old_key.as_pem(private=True).decode(),
                           public_jwk(old_key, kid="k-old", algorithm="ES384"))
    new = AsymmetricClient("app", "k-new", "RS384", new_key.as_pem(private=True).decode(),
                           public_jwk(new_key, kid="k-new", algorithm="RS384"))
    assert "not in the registered JWKS" in _refused(_form(_sign(old)), creds).description
    creds.register_jwks("app", {"keys": [old.public_jwk, new.public_jwk]})
    assert _issue(_form(_sign(old)), creds)[0] == "app"
    assert _issue(_form(_sign(new)), creds)[0] == "app"
    # a kid another client also registered: the key of the client named by iss is the one checked
    creds.register_jwks("other-app", {"keys": [{**new.public_jwk, "kid": "k-old"}]})
    assert _issue(_form(_sign(old)), creds)[0] == "app"
    refused = _refused(_form(_sign(old, claims={"iss": "other-app", "sub": "other-app"})), creds)
    assert "alg ES384 does not match" in refused.description  # other-app's k-old is an RS384 key
    creds.register_jwks("other-app", {"keys": [{**new.public_jwk, "kid": "k-other"}]})
    creds.register_jwks("app", {"keys": [new.public_jwk]})  # retire k-old
    refused = _refused(_form(_sign(old)), creds)
    assert refused.description == "client_assertion kid 'k-old' is not in the registered JWKS"
    assert _issue(_form(_sign(new)), creds)[0] == "app"
    # a private_key_jwt client cannot fall back to a client secret
    secret_form = {"grant_type": "client_credentials", "scope": "system/*.read", "client_id": "app",
                   "client_secret": "x"}
    assert "registered for private_key_jwt" in _refused(secret_form, creds).description
