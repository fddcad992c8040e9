"""SMART backend services for the sandbox's certified track: discovery, token checks, scopes.

Pure module: no web framework. The routes turn :class:`OAuthError` into a JSON response
(``status`` + :meth:`OAuthError.to_dict`) and a successful :func:`issue_certified_token` into a token.

Checks follow SMART App Launch STU2 (backend services, client-confidential-asymmetric) and RFC 7523:
``private_key_jwt`` assertions signed RS384/ES384 (JWS: ES384 signatures are raw ``r||s``), ``kid``
required, ``iss`` = ``sub`` = client id, ``aud`` = the token URL exactly, ``exp`` at most 5 minutes
ahead, ``jti`` single use. Scopes must be read-only ``system/`` scopes, SMART v1 or v2 syntax.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError

from airflow_provider_modmed.capabilities import MATRIX, Interaction
from airflow_provider_modmed.sandbox.credentials import SandboxCredentials
from airflow_provider_modmed.sandbox.keys import verification_key

__all__ = [
    "ASSERTION_TYPE",
    "MAX_ASSERTION_LIFETIME",
    "SIGNING_ALGORITHMS",
    "OAuthError",
    "Scope",
    "issue_certified_token",
    "parse_scope",
    "scope_allows",
    "smart_configuration",
]

#: the only ``client_assertion_type`` accepted (RFC 7523)
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: the assertion signing algorithms SMART backend services require servers to support
SIGNING_ALGORITHMS = ("RS384", "ES384")
#: SMART: ``exp`` no more than five minutes in the future
MAX_ASSERTION_LIFETIME = 300
#: clock skew tolerated on ``exp``'s upper bound, ``nbf`` and ``iat``
LEEWAY = 10
#: ES384 JWS signatures are the raw 48-byte ``r`` and ``s`` concatenated (not DER)
_ES384_SIGNATURE_LENGTH = 96

_SCOPE_RE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Za-z]+)\.(?P<permissions>[A-Za-z*]+)"
    r"(?:\?(?P<query>.*))?$"
)
_V2_PERMISSIONS_RE = re.compile(r"^c?r?u?d?s?$")
_V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}
_READ_ONLY = frozenset("rs")


class OAuthError(Exception):
    """An OAuth 2.0 token error (RFC 6749 §5.2): answer ``status`` with :meth:`to_dict` as JSON."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description

    def to_dict(self) -> dict[str, str]:
        """The JSON body: ``{"error": ..., "error_description": ...}``."""
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class Scope:
    """One parsed SMART scope, e.g. ``system/Patient.rs`` or ``system/*.read``."""

    context: str
    resource_type: str
    #: SMART v2 letters this scope grants (v1 ``read`` -> ``rs``, ``write`` -> ``cud``, ``*`` -> all)
    permissions: frozenset[str]
    query: str | None = None

    @property
    def read_only_system(self) -> bool:
        """Whether the certified track may grant it: ``system/``, read/search only, no query filter."""
        return self.context == "system" and self.permissions <= _READ_ONLY and self.query is None


def parse_scope(scope: str) -> Scope | None:
    """Parse one SMART v1 or v2 resource scope; ``None`` when it is not one (e.g. ``openid``)."""
    m = _SCOPE_RE.match(scope)
    if m is None:
        return None
    raw = m["permissions"]
    if raw in _V1_PERMISSIONS:
        permissions = _V1_PERMISSIONS[raw]
    elif _V2_PERMISSIONS_RE.match(raw):
        permissions = frozenset(raw)
    else:
        return None
    return Scope(m["context"], m["resource"], permissions, m["query"])


def scope_allows(scopes: Iterable[str], resource_type: str, interaction: str) -> bool:
    """Whether granted ``scopes`` allow ``interaction`` on ``resource_type`` on the certified track.

    ``read`` needs ``r`` (v2) or ``.read`` (v1); ``search-type`` needs ``s`` or ``.read``. Every other
    interaction (writes, ...) is never allowed. Only ``system/`` scopes count; ``*`` matches any type.
    """
    if interaction == Interaction.READ:
        needed = "r"
    elif interaction in (Interaction.SEARCH, "search"):
        needed = "s"
    else:
        return False
    for raw in scopes:
        scope = parse_scope(raw)
        if (scope is not None and scope.read_only_system and needed in scope.permissions
                and scope.resource_type in ("*", resource_type)):
            return True
    return False


def _certified_readable_types() -> list[str]:
    return sorted(t for t, spec in MATRIX.items()
                  if spec.certified & {Interaction.READ, Interaction.SEARCH})


def smart_configuration(*, fhir_base: str, token_url: str) -> dict[str, Any]:
    """The SMART discovery document served at ``{fhir_base}/.well-known/smart-configuration``."""
    scopes = ["system/*.read", "system/*.rs"]
    for resource_type in _certified_readable_types():
        scopes += [f"system/{resource_type}.read", f"system/{resource_type}.rs"]
    return {
        "issuer": fhir_base.rstrip("/"),
        "token_endpoint": token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_post"],
        "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes,
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                         "permission-v1", "permission-v2"],
    }


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description)


def _check_scopes(raw: str | None) -> list[str]:
    requested = list(dict.fromkeys((raw or "").split()))
    if not requested:
        raise OAuthError(400, "invalid_scope", "scope is required, e.g. system/*.read")
    for scope in requested:
        parsed = parse_scope(scope)
        if parsed is None:
            raise OAuthError(400, "invalid_scope", f"scope {scope!r} is not a SMART system/ resource scope")
        if parsed.context != "system":
            raise OAuthError(400, "invalid_scope", f"scope {scope!r} is not a system/ scope "
                             "(backend services grant system/ scopes only)")
        if not parsed.permissions <= _READ_ONLY:
            raise OAuthError(400, "invalid_scope", f"scope {scope!r} asks for write access; the "
                             "certified API is read-only (system/*.read or system/*.rs)")
        if parsed.query is not None:
            raise OAuthError(400, "invalid_scope", f"scope {scope!r}: granular scopes (?query) are "
                             "not supported")
    return requested


def _authenticate_secret(form: Mapping[str, str], creds: SandboxCredentials) -> str:
    client_id = form.get("client_id") or ""
    if not client_id:
        raise _invalid_client("client_id is required with client_secret (client_secret_post)")
    if client_id in creds.client_jwks():
        raise _invalid_client(f"client {client_id!r} is registered for private_key_jwt, not "
                              "client_secret_post")
    if client_id != creds.cert_client_id:
        raise _invalid_client(f"unknown client_id {client_id!r}")
    if not hmac.compare_digest(form.get("client_secret", "").encode(), creds.cert_client_secret.encode()):
        raise _invalid_client("client_secret does not match")
    return client_id


def _b64_length(segment: str) -> int:
    try:
        return len(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return -1


def _registered_key(creds: SandboxCredentials, kid: str, iss: Any) -> tuple[str, dict[str, Any]] | None:
    """(client id, public JWK) registered under ``kid``; the ``iss`` client's key first if two share a kid."""
    matches = [(client_id, jwk) for client_id, keys in creds.client_jwks().items() for jwk in keys
               if jwk.get("kid") == kid]
    return next((m for m in matches if m[0] == iss), matches[0] if matches else None)


def _authenticate_assertion(form: Mapping[str, str], *, token_url: str, creds: SandboxCredentials,
                            now: float, seen_jti: MutableMapping[str, float]) -> str:
    assertion_type = form.get("client_assertion_type", "")
    if assertion_type != ASSERTION_TYPE:
        raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}"
                              + (f", not {assertion_type!r}" if assertion_type else ""))
    assertion = form.get("client_assertion", "")
    try:
        compact = jws.extract_compact(assertion.encode("ascii"))
    except (JoseError, ValueError, TypeError, UnicodeError, binascii.Error):
        raise _invalid_client("client_assertion is not a compact JWS (header.payload.signature)") from None
    header = compact.headers()
    try:
        claims = json.loads(compact.payload)
    except (ValueError, UnicodeError):
        claims = None
    if not isinstance(claims, dict):
        raise _invalid_client("client_assertion payload is not a JSON object")

    alg = header.get("alg")
    if alg not in SIGNING_ALGORITHMS:
        raise _invalid_client(f"client_assertion alg {alg!r} is not supported (RS384 or ES384)")
    kid = header.get("kid")
    if not kid:
        raise _invalid_client("client_assertion header has no kid")
    registered = _registered_key(creds, kid, claims.get("iss"))
    if registered is None:
        raise _invalid_client(f"client_assertion kid {kid!r} is not in the registered JWKS")
    registered_client, jwk = registered
    if alg != jwk["alg"]:
        raise _invalid_client(f"client_assertion alg {alg} does not match the algorithm registered for "
                              f"kid {kid!r} ({jwk['alg']})")
    if "jku" in header:
        raise _invalid_client("client_assertion jku header is not allowed: no JWKS URL is registered")
    typ = header.get("typ")
    if typ is not None and str(typ).upper() != "JWT":
        raise _invalid_client(f"client_assertion typ must be JWT, not {typ!r}")

    try:
        jwt.decode(assertion, verification_key(jwk), algorithms=[jwk["alg"]])
    except JoseError:
        hint = ""
        if alg == "ES384" and _b64_length(assertion.rsplit(".", 1)[-1]) != _ES384_SIGNATURE_LENGTH:
            hint = " (ES384 JWS signatures are the raw 96-byte r||s, not DER)"
        raise _invalid_client(f"client_assertion signature verification failed for kid {kid!r}{hint}"
                              ) from None

    iss, sub = claims.get("iss"), claims.get("sub")
    if not iss or not sub:
        raise _invalid_client("client_assertion needs both iss and sub (the client_id)")
    if iss != sub:
        raise _invalid_client("client_assertion iss and sub differ (both must be the client_id)")
    if iss != registered_client:
        raise _invalid_client(f"client_assertion iss {iss!r} is not the client registered for kid {kid!r}")
    form_client_id = form.get("client_id")
    if form_client_id and form_client_id != iss:
        raise _invalid_client("client_id does not match the client_assertion iss")

    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if token_url not in audiences:
        raise _invalid_client(f"client_assertion aud does not match the token endpoint ({token_url})")

    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise _invalid_client("client_assertion has no numeric exp")
    if exp <= now:
        raise _invalid_client("client_assertion has expired (exp is in the past)")
    if exp > now + MAX_ASSERTION_LIFETIME + LEEWAY:
        raise _invalid_client(f"client_assertion exp is more than {MAX_ASSERTION_LIFETIME} seconds in "
                              "the future")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > now + LEEWAY:
            raise _invalid_client(f"client_assertion {name} is in the future")

    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise _invalid_client("client_assertion has no jti")
    for seen, seen_exp in list(seen_jti.items()):
        if seen_exp < now:
            seen_jti.pop(seen, None)
    if jti in seen_jti:
        raise _invalid_client("client_assertion jti was already used (replay)")
    seen_jti[jti] = float(exp)
    return registered_client


def issue_certified_token(form: Mapping[str, str], *, token_url: str, creds: SandboxCredentials,
                          now: float, seen_jti: MutableMapping[str, float]) -> tuple[str, list[str]]:
    """Check a client_credentials token request; return (client_id, granted scopes) or raise OAuthError.

    ``form`` is the decoded form body; ``token_url`` the exact URL the request was posted to (the
    assertion's ``aud``); ``now`` the epoch time; ``seen_jti`` the server's replay memory (jti -> exp,
    updated and purged here; guard it with a lock when requests run concurrently).
    Client authentication is checked before the scope, so an unauthenticated caller learns nothing.
    """
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError(400, "invalid_request", "grant_type is required (client_credentials)")
    if grant_type != "client_credentials":
        raise OAuthError(400, "unsupported_grant_type",
                         f"grant_type {grant_type!r} is not supported; use client_credentials")
    has_secret = "client_secret" in form
    has_assertion = "client_assertion" in form
    if has_secret and has_assertion:
        raise OAuthError(400, "invalid_request",
                         "send either client_secret or client_assertion, not both")
    if has_assertion:
        client_id = _authenticate_assertion(form, token_url=token_url, creds=creds, now=now,
                                            seen_jti=seen_jti)
    elif has_secret:
        client_id = _authenticate_secret(form, creds)
    elif "client_assertion_type" in form:
        raise OAuthError(400, "invalid_request", "client_assertion_type without client_assertion")
    else:
        raise _invalid_client("no client authentication: send client_assertion (private_key_jwt) or "
                              "client_id + client_secret (client_secret_post)")
    return client_id, _check_scopes(form.get("scope"))
