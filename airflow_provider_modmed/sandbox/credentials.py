"""The sandbox's registered clients and secrets, and the credentials JSON it prints.

Pure module: no web framework. :func:`make_credentials` derives every secret from a seed (so tests and
docs can rely on stable values) and generates, or reuses from ``data_dir``, the two key pairs of the
certified track's ``private_key_jwt`` clients (RS384: RSA 2048; ES384: EC P-384).
:func:`credentials_document` renders the JSON described in ``docs/dev/sandbox-contract.md``
("The credentials JSON"), including ready-to-use Airflow connections and connection URIs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from joserfc.jwk import ECKey, RSAKey

from airflow_provider_modmed.profile import (
    CERTIFIED_FHIR_SUFFIX,
    KEYCLOAK_TOKEN_PATH,
    PUBLIC_SANDBOX_FIRM,
    environment_path,
    proprietary_fhir_base,
    proprietary_grant_url,
)
from airflow_provider_modmed.sandbox.keys import (
    InvalidKey,
    generate_key,
    public_jwk,
    public_jwks,
    thumbprint_kid,
    write_private_key,
)

__all__ = [
    "OVERRIDE_KEYS",
    "AsymmetricClient",
    "SandboxCredentials",
    "credentials_document",
    "make_credentials",
    "make_practice_credentials",
    "practice_connection_id",
    "practice_firms",
    "practices_document",
]

#: keys accepted by ``make_credentials(overrides=...)`` (CLI flags) -> SandboxCredentials field
OVERRIDE_KEYS: Mapping[str, str] = {
    "api_key": "api_key",
    "username": "username",
    "password": "password",
    "client_id": "cc_client_id",
    "client_secret": "cc_client_secret",
    "cert_client_id": "cert_client_id",
    "cert_client_secret": "cert_client_secret",
}

#: the scope the sandbox's certified Airflow connections ask for
DEFAULT_CERTIFIED_SCOPE = "system/*.read"

_RS384_FILE = "rs384-private.pem"
_ES384_FILE = "es384-private.pem"


@dataclass(frozen=True)
class AsymmetricClient:
    """A certified-track client that authenticates with a signed JWT assertion (``private_key_jwt``)."""

    client_id: str
    key_id: str
    #: "RS384" or "ES384": the only algorithm this client's assertions may use
    algorithm: str
    private_key_pem: str
    #: the public key as a JWK, with ``kid``, ``alg`` and ``use``
    public_jwk: dict[str, Any]
    #: where the private key is stored (``None`` when generated in memory)
    private_key_path: str | None = None


@dataclass(frozen=True)
class SandboxCredentials:
    """Everything the sandbox accepts: API key, users, OAuth clients and their keys."""

    firm: str
    # proprietary track, auth A (password grant + x-api-key)
    api_key: str
    username: str
    password: str
    # proprietary track, auth B (client_credentials at the Keycloak realm)
    cc_client_id: str
    cc_client_secret: str
    # certified track, client_secret_post
    cert_client_id: str
    cert_client_secret: str
    # certified track, private_key_jwt
    rs384: AsymmetricClient
    es384: AsymmetricClient
    #: JWKS registered at run time (``PUT /_sandbox/clients/{client_id}/jwks``): client id -> public JWKs.
    #: A client listed here authenticates with these keys only (the seeded two included, once re-registered)
    registered_jwks: dict[str, list[dict[str, Any]]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def asymmetric_clients(self) -> tuple[AsymmetricClient, ...]:
        """The seeded ``private_key_jwt`` clients (their private keys are printed in the credentials)."""
        return (self.rs384, self.es384)

    def jwks(self) -> dict[str, Any]:
        """The JWKS (public keys only) of both asymmetric clients."""
        return {"keys": [dict(c.public_jwk) for c in self.asymmetric_clients]}

    def client_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """Every ``private_key_jwt`` client's registered public keys: client id -> JWKs."""
        seeded = {c.client_id: [dict(c.public_jwk)] for c in self.asymmetric_clients}
        return {**seeded, **self.registered_jwks}

    def register_jwks(self, client_id: str, jwks: Any) -> list[dict[str, Any]]:
        """Register (or replace) the JWKS of ``client_id``, as a partner does with ModMed; returns its keys.

        Replacing is how a key is retired: the new JWKS no longer lists its ``kid``. Raises
        :class:`~airflow_provider_modmed.sandbox.keys.InvalidKey` for an unusable JWKS or client id.
        """
        if not client_id or client_id in (self.cert_client_id, self.cc_client_id):
            raise InvalidKey(f"client {client_id!r} cannot take a JWKS: it authenticates with a client secret")
        keys = public_jwks(jwks, where=f"JWKS of client {client_id!r}")
        self.registered_jwks[client_id] = keys
        return keys


def _secret(label: str, firm: str, seed: int) -> str:
    digest = hashlib.sha256(f"modmed-sandbox:{label}:{firm}:{seed}".encode()).hexdigest()
    return digest[:28]


def _load_or_generate(algorithm: str, data_dir: Path | None) -> tuple[RSAKey | ECKey, str | None]:
    filename = _RS384_FILE if algorithm == "RS384" else _ES384_FILE
    key_cls: type[RSAKey] | type[ECKey] = RSAKey if algorithm == "RS384" else ECKey
    if data_dir is None:
        return generate_key(algorithm), None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / filename
    if not path.exists():
        write_private_key(path, generate_key(algorithm).as_pem(private=True))
    try:
        key = key_cls.import_key(path.read_bytes())
    except Exception as exc:
        raise ValueError(f"{path} is not a valid {algorithm} private key (delete it to regenerate): "
                         f"{exc}") from exc
    if not key.is_private:
        raise ValueError(f"{path} holds a public key; the sandbox needs the {algorithm} private key")
    if isinstance(key, ECKey) and key.curve_name != "P-384":
        raise ValueError(f"{path} is an EC {key.curve_name} key; ES384 needs P-384")
    return key, str(path)


def _asymmetric_client(client_id: str, algorithm: str, data_dir: Path | None) -> AsymmetricClient:
    key, path = _load_or_generate(algorithm, data_dir)
    key_id = thumbprint_kid(key, algorithm, prefix="sbx-")
    return AsymmetricClient(
        client_id=client_id,
        key_id=key_id,
        algorithm=algorithm,
        private_key_pem=key.as_pem(private=True).decode("ascii"),
        public_jwk=public_jwk(key, kid=key_id, algorithm=algorithm),
        private_key_path=path,
    )


def make_credentials(*, firm: str = PUBLIC_SANDBOX_FIRM, seed: int = 0, data_dir: Path | None = None,
                     overrides: Mapping[str, str] | None = None, client_suffix: str = "") -> SandboxCredentials:
    """Build the sandbox's credentials.

    Secrets are derived from ``seed`` (same seed, same secrets). The two private keys are generated in
    memory, or with ``data_dir`` read from ``rs384-private.pem`` / ``es384-private.pem`` there (created
    with mode 0600 on first use), so printed credentials stay valid across restarts.
    ``overrides`` (keys :data:`OVERRIDE_KEYS`: ``api_key``, ``username``, ``password``, ``client_id``,
    ``client_secret``, ``cert_client_id``, ``cert_client_secret``) replace the derived values.
    ``client_suffix`` is appended to the user and client ids (a further practice's: ``-{firm}``).
    """
    unknown = sorted(set(overrides or {}) - set(OVERRIDE_KEYS))
    if unknown:
        raise ValueError(f"unknown credential override(s) {unknown}; allowed: {sorted(OVERRIDE_KEYS)}")
    creds = SandboxCredentials(
        firm=firm,
        api_key=f"sbx-apikey-{_secret('api-key', firm, seed)}",
        username=f"sbx-user{client_suffix}",
        password=f"sbx-password-{_secret('password', firm, seed)}",
        cc_client_id=f"sbx-keycloak-client{client_suffix}",
        cc_client_secret=f"sbx-secret-{_secret('keycloak-client-secret', firm, seed)}",
        cert_client_id=f"sbx-certified-secret-client{client_suffix}",
        cert_client_secret=f"sbx-secret-{_secret('certified-client-secret', firm, seed)}",
        rs384=_asymmetric_client(f"sbx-certified-rs384{client_suffix}", "RS384", data_dir),
        es384=_asymmetric_client(f"sbx-certified-es384{client_suffix}", "ES384", data_dir),
    )
    changes: dict[str, Any] = {OVERRIDE_KEYS[k]: v for k, v in (overrides or {}).items() if v is not None}
    return replace(creds, **changes) if changes else creds


def practice_firms(firm: str, practices: int) -> list[str]:
    """The firm URL prefixes of ``practices`` practices: ``firm``, then ``{firm}2``, ``{firm}3``, ..."""
    if practices < 1:
        raise ValueError(f"practices must be at least 1 (got {practices})")
    return [firm] + [f"{firm}{i}" for i in range(2, practices + 1)]


def make_practice_credentials(*, firm: str = PUBLIC_SANDBOX_FIRM, practices: int = 1, seed: int = 0,
                              data_dir: Path | None = None,
                              overrides: Mapping[str, str] | None = None) -> list[SandboxCredentials]:
    """The credentials of every practice: practice 1 as :func:`make_credentials` makes them (``overrides``
    apply to it only); practice ``i`` under firm ``{firm}{i}``, with secrets derived from its firm, user and
    client ids suffixed ``-{firm}{i}``, and its keys in ``data_dir/{firm}{i}``."""
    firms = practice_firms(firm, practices)
    first = make_credentials(firm=firm, seed=seed, data_dir=data_dir, overrides=overrides)
    return [first] + [make_credentials(firm=f, seed=seed, data_dir=data_dir / f if data_dir else None,
                                       client_suffix=f"-{f}") for f in firms[1:]]


def _connection_uri(conn: Mapping[str, Any]) -> str:
    """``conn`` as an Airflow connection URI, laid out as ``airflow.sdk.Connection.get_uri()`` lays it out.

    Built here, not by Airflow: ``modmed-sandbox`` must run without importing Airflow (which reads
    ``airflow.cfg`` and takes about a second). Tests parse every URI back with Airflow's two Connection
    classes (``tests/unit/test_sandbox_smart.py::test_connection_uris_round_trip``).
    """
    conn_type = str(conn["conn_type"])
    uri = f"{conn_type}://"
    host = str(conn.get("host") or "")
    scheme, sep, rest = host.partition("://")
    if sep and scheme != conn_type:  # Airflow keeps a host's own scheme in front of the quoted host
        uri, host = f"{uri}{scheme}://", rest
    login, password = conn.get("login"), conn.get("password")
    userinfo = (quote(login, safe="") if login is not None else "") + (
        f":{quote(password, safe='')}" if password is not None else "")
    uri += (f"{userinfo}@" if userinfo else "") + quote(host, safe="")
    extra: Mapping[str, Any] = conn.get("extra") or {}
    if not extra:
        return uri
    flat = all(isinstance(v, str) for v in extra.values())
    query = urlencode(extra) if flat else ""
    if not flat or dict(parse_qsl(query, keep_blank_values=True)) != dict(extra):
        query = urlencode({"__extra__": json.dumps(extra)})
    return f"{uri}/?{query}"


def credentials_document(creds: SandboxCredentials, *, api_url: str, storage_url: str,
                         env: str = "sandbox") -> dict[str, Any]:
    """The credentials JSON of the sandbox contract ("The credentials JSON").

    ``airflow_connections`` values use Airflow's JSON connection format (usable as
    ``AIRFLOW_CONN_<ID>``); ``airflow_connection_uris`` holds the same connections as URIs in the layout
    of ``airflow.sdk.Connection.get_uri()`` (built without importing Airflow). ``env`` names one of
    ModMed's environments (``sandbox``, ``training``, ``production``): the proprietary URLs use its path on
    loopback (``/ema-dev/firm``, ...).
    """
    api = api_url.rstrip("/")
    firm = creds.firm
    env_base = f"{api}{environment_path(env)}"
    proprietary_fhir = proprietary_fhir_base(env_base, firm)
    proprietary_token = proprietary_grant_url(env_base, firm)
    keycloak_token = f"{api}{KEYCLOAK_TOKEN_PATH}"
    certified_fhir = f"{api}/certified/{firm}{CERTIFIED_FHIR_SUFFIX}"
    certified_token = f"{api}/certified/{firm}/auth/token"

    def jwt_client(c: AsymmetricClient) -> dict[str, Any]:
        return {"client_id": c.client_id, "key_id": c.key_id, "algorithm": c.algorithm,
                "private_key": c.private_key_pem, "private_key_path": c.private_key_path}

    proprietary_extra = {"track": "proprietary", "environment": "custom", "firm_url_prefix": firm}
    certified_extra = {"track": "certified", "environment": "custom", "firm_url_prefix": firm}

    def jwt_connection(c: AsymmetricClient) -> dict[str, Any]:
        return {"conn_type": "modmed", "host": certified_fhir,
                "extra": {**certified_extra, "auth_method": "private_key_jwt", "client_id": c.client_id,
                          "private_key": c.private_key_pem, "key_id": c.key_id,
                          "jwt_algorithm": c.algorithm, "scope": DEFAULT_CERTIFIED_SCOPE}}

    connections: dict[str, dict[str, Any]] = {
        "modmed_default": {
            "conn_type": "modmed", "host": env_base, "login": creds.username, "password": creds.password,
            "extra": {**proprietary_extra, "auth_method": "password", "api_key": creds.api_key},
        },
        "modmed_proprietary_cc": {
            "conn_type": "modmed", "host": env_base,
            "extra": {**proprietary_extra, "auth_method": "client_secret", "client_id": creds.cc_client_id,
                      "client_secret": creds.cc_client_secret, "token_url": keycloak_token,
                      "api_key": creds.api_key},
        },
        "modmed_certified": jwt_connection(creds.rs384),
        "modmed_certified_es384": jwt_connection(creds.es384),
        "modmed_certified_secret": {
            "conn_type": "modmed", "host": certified_fhir,
            "extra": {**certified_extra, "auth_method": "client_secret", "client_id": creds.cert_client_id,
                      "client_secret": creds.cert_client_secret, "scope": DEFAULT_CERTIFIED_SCOPE},
        },
    }
    return {
        "firm_url_prefix": firm,
        "api_url": api,
        "storage_url": storage_url.rstrip("/"),
        "proprietary": {
            "env_base": env_base,
            "fhir_base": proprietary_fhir,
            "token_url": proprietary_token,
            "api_key": creds.api_key,
            "username": creds.username,
            "password": creds.password,
            "keycloak_token_url": keycloak_token,
            "client_id": creds.cc_client_id,
            "client_secret": creds.cc_client_secret,
        },
        "certified": {
            "fhir_base": certified_fhir,
            "token_url": certified_token,
            "client_secret_post": {"client_id": creds.cert_client_id,
                                   "client_secret": creds.cert_client_secret},
            "private_key_jwt": jwt_client(creds.rs384),
            "private_key_jwt_es384": jwt_client(creds.es384),
        },
        "airflow_connections": connections,
        "airflow_connection_uris": {cid: _connection_uri(c) for cid, c in connections.items()},
    }


def practice_connection_id(firm: str, track: str) -> str:
    """The Airflow connection id of one practice's track: ``modmed_<firm>_<track>`` (docs/deployment.md)."""
    return f"modmed_{firm}_{track}"


def practices_document(practices: list[SandboxCredentials], *, api_url: str,
                       storage_url: str) -> dict[str, Any]:
    """The credentials JSON of a sandbox serving ``practices`` (in order; the first is practice 1).

    One practice: exactly :func:`credentials_document`. Several: practice 1's document (today's keys and
    connection ids), plus ``practices``: each practice's ``firm_url_prefix``, ``proprietary`` and
    ``certified`` sections, and in ``airflow_connections`` one connection per practice and track,
    ``modmed_<firm>_proprietary`` (password grant) and ``modmed_<firm>_certified`` (private_key_jwt,
    RS384), practice 1 included.
    """
    docs = [credentials_document(c, api_url=api_url, storage_url=storage_url) for c in practices]
    first = docs[0]
    if len(docs) == 1:
        return first
    connections = dict(first["airflow_connections"])
    for doc in docs:
        firm, own = doc["firm_url_prefix"], doc["airflow_connections"]
        connections[practice_connection_id(firm, "proprietary")] = own["modmed_default"]
        connections[practice_connection_id(firm, "certified")] = own["modmed_certified"]
    return {
        **first,
        "practices": [{k: doc[k] for k in ("firm_url_prefix", "proprietary", "certified")} for doc in docs],
        "airflow_connections": connections,
        "airflow_connection_uris": {cid: _connection_uri(c) for cid, c in connections.items()},
    }
