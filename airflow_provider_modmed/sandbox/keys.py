"""Key pairs and JWKS for the certified track's ``private_key_jwt`` clients (``modmed-sandbox keys``).

Pure module: no web framework, no Airflow. Registering with ModMed's certified API means making a key pair,
keeping the private key (it goes into the connection's ``private_key``) and handing over the public JWKS.
The same rules serve the sandbox: its own two clients' keys (:mod:`.credentials`) and the JWKS a test or a
user registers at run time (``PUT /_sandbox/clients/{client_id}/jwks``) are checked by :func:`public_jwks`.

Rotation: register a JWKS holding the old and the new public key (:func:`combine_jwks`), switch the
connection to the new ``private_key`` and ``key_id``, then register a JWKS without the old ``kid``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

__all__ = [
    "ALGORITHMS",
    "InvalidKey",
    "combine_jwks",
    "generate_key",
    "key_from_pem",
    "public_jwk",
    "public_jwks",
    "thumbprint_kid",
    "verification_key",
    "write_private_key",
]

#: the ``private_key_jwt`` signing algorithms of SMART backend services, with the key each needs
ALGORITHMS: Mapping[str, str] = {"RS384": "RSA 2048", "ES384": "EC P-384"}

#: JWK members that belong to a private key only: never part of a published JWKS
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class InvalidKey(ValueError):
    """A key or JWKS that cannot be used (wrong type, curve, algorithm, duplicate ``kid``)."""


def generate_key(algorithm: str) -> RSAKey | ECKey:
    """A new private key for ``algorithm``: RSA 2048 for RS384, EC P-384 for ES384."""
    if algorithm == "RS384":
        return RSAKey.generate_key(2048, private=True)
    if algorithm == "ES384":
        return ECKey.generate_key("P-384", private=True)
    raise InvalidKey(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def thumbprint_kid(key: RSAKey | ECKey, algorithm: str, prefix: str = "") -> str:
    """A ``kid`` derived from the key's RFC 7638 thumbprint: ``{prefix}{alg}-{8 hex digits}``."""
    raw = key.thumbprint()
    digest = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return f"{prefix}{algorithm.lower()}-{digest[:8]}"


def public_jwk(key: RSAKey | ECKey, *, kid: str, algorithm: str) -> dict[str, Any]:
    """The public half of ``key`` as a JWK with ``kid``, ``alg`` and ``use: sig``."""
    jwk = {str(k): v for k, v in key.as_dict(private=False).items()}
    jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return jwk


def _checked(jwk: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One JWK of a JWKS, checked and reduced to its public members."""
    if not isinstance(jwk, Mapping):
        raise InvalidKey(f"{where}: a JWK must be a JSON object")
    kid, alg = jwk.get("kid"), jwk.get("alg")
    if not isinstance(kid, str) or not kid:
        raise InvalidKey(f"{where}: every key needs a kid (the assertion header names it)")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise InvalidKey(f"{where}: key {kid!r} has alg {alg!r}; use one of {', '.join(ALGORITHMS)}")
    public = {k: v for k, v in jwk.items() if k not in _PRIVATE_MEMBERS}
    try:
        key = verification_key(public)
    except (JoseError, ValueError, TypeError) as exc:
        raise InvalidKey(f"{where}: key {kid!r} is not a valid {ALGORITHMS[alg]} public key "
                        f"({type(exc).__name__})") from None
    if isinstance(key, ECKey) and key.curve_name != "P-384":
        raise InvalidKey(f"{where}: key {kid!r} is on curve {key.curve_name}; ES384 needs P-384")
    return public


def verification_key(jwk: Mapping[str, Any]) -> RSAKey | ECKey:
    """The public key of one registered JWK, of the type its ``alg`` needs."""
    if jwk.get("alg") == "ES384":
        if jwk.get("kty") != "EC":
            raise ValueError("ES384 needs kty EC")
        return ECKey.import_key(dict(jwk))
    if jwk.get("kty") != "RSA":
        raise ValueError("RS384 needs kty RSA")
    return RSAKey.import_key(dict(jwk))


def public_jwks(doc: Any, *, where: str = "JWKS") -> list[dict[str, Any]]:
    """The keys of a JWKS (``{"keys": [...]}``) or of one JWK, checked; private members are dropped.

    Raises :class:`InvalidKey` naming the offending ``kid`` on a key without ``kid``, with an ``alg`` other
    than RS384/ES384, of the wrong type or curve, or a ``kid`` given twice.
    """
    if isinstance(doc, Mapping) and "keys" in doc:
        raw = doc["keys"]
    elif isinstance(doc, Mapping) and "kty" in doc:
        raw = [doc]
    else:
        raise InvalidKey(f'{where}: expected a JWKS ({{"keys": [...]}}) or one JWK')
    if not isinstance(raw, list) or not raw:
        raise InvalidKey(f"{where}: the JWKS holds no keys")
    keys = [_checked(jwk, where) for jwk in raw]
    kids = [k["kid"] for k in keys]
    duplicate = next((kid for kid in kids if kids.count(kid) > 1), None)
    if duplicate is not None:
        raise InvalidKey(f"{where}: kid {duplicate!r} appears twice; each key needs its own kid")
    return keys


def combine_jwks(sources: Iterable[list[dict[str, Any]]], *, retire: Iterable[str] = ()) -> dict[str, Any]:
    """One JWKS of every key in ``sources`` (in order) minus the ``kid``s in ``retire``.

    The same key listed twice is kept once; two different keys under one ``kid`` are refused.
    """
    retired = set(retire)
    out: dict[str, dict[str, Any]] = {}
    for keys in sources:
        for jwk in keys:
            seen = out.get(jwk["kid"])
            if seen is not None and seen != jwk:
                raise InvalidKey(f"kid {jwk['kid']!r} names two different keys; give the new key a new kid")
            out[jwk["kid"]] = jwk
    unknown = sorted(retired - set(out))
    if unknown:
        raise InvalidKey(f"cannot retire {unknown}: no such kid among {sorted(out)}")
    kept = [jwk for kid, jwk in out.items() if kid not in retired]
    if not kept:
        raise InvalidKey("retiring every key would leave the client unable to authenticate")
    return {"keys": kept}


def key_from_pem(pem: str | bytes, *, where: str = "PEM") -> tuple[RSAKey | ECKey, str]:
    """A PEM key (private or public) and the algorithm it signs with: RSA -> RS384, EC P-384 -> ES384."""
    for key_cls, algorithm in ((RSAKey, "RS384"), (ECKey, "ES384")):
        try:
            key: RSAKey | ECKey = key_cls.import_key(pem)
        except (JoseError, ValueError, TypeError):
            continue
        if isinstance(key, ECKey) and key.curve_name != "P-384":
            raise InvalidKey(f"{where}: an EC {key.curve_name} key; ES384 needs P-384")
        return key, algorithm
    raise InvalidKey(f"{where}: not an RSA or EC P-384 key in PEM form")


def write_private_key(path: Path, pem: bytes) -> bool:
    """Create ``path`` (mode 0600) holding ``pem`` unless it exists; True when this call wrote it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process just wrote
        except FileExistsError:
            return False
        except OSError:  # filesystems without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
