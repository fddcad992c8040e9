"""Client configuration: plain values in, a validated :class:`ClientConfig` out.

The Airflow hook builds a :class:`ClientConfig` from a Connection; any other Python program builds one
directly. Validation errors name the field (and where it lives in an Airflow connection) and the fix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import httpx

from airflow_provider_modmed import profile
from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Track
from airflow_provider_modmed.client.egress import PEM_CERTIFICATE, PROXY_FIELD, ca_context
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

#: where each ClientConfig field lives in an Airflow connection (for error messages)
_WHERE: dict[str, str] = {
    "fhir_base": 'connection field "Host" (custom base URL) or extra "environment"',
    "firm": 'extra field "firm_url_prefix"',
    "track": 'extra field "track"',
    "auth_method": 'extra field "auth_method"',
    "api_key": 'extra field "api_key"',
    "username": 'connection field "Login"',
    "password": 'connection field "Password"',
    "client_id": 'extra field "client_id"',
    "client_secret": 'extra field "client_secret"',
    "private_key": 'extra field "private_key"',
    "key_id": 'extra field "key_id"',
    "jwt_algorithm": 'extra field "jwt_algorithm"',
    "scope": 'extra field "scope"',
    "token_url": 'extra field "token_url"',
    "rate_limit_per_minute": 'extra field "rate_limit_per_minute"',
    "rate_limit_storage_uri": 'extra field "rate_limit_storage_uri"',
    "timeout": 'extra field "timeout"',
    "proxy": PROXY_FIELD,
    "ca_bundle": 'extra field "ca_bundle"',
    "max_retries": 'argument "max_retries"',
}

JWT_ALGORITHMS = ("RS384", "ES384")

#: a firm URL prefix is one path segment of ModMed's URLs (``{env_base}/{firm}/ema/fhir/v2``)
_FIRM_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
#: ... and, on the certified track's published host, a DNS label (``https://{firm}.mmi.prod...``)
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class AuthMethod(str, Enum):
    """How the client obtains its bearer token."""

    #: proprietary track: OAuth2 password grant + ``x-api-key``, refresh token, re-auth on failure
    PASSWORD = "password"  # noqa: S105
    #: client_credentials with a client secret (Keycloak on the proprietary track, SMART
    #: ``client_secret_post``/``_basic`` on the certified track)
    CLIENT_SECRET = "client_secret"  # noqa: S105
    #: certified track: SMART backend services with a signed JWT assertion (RS384/ES384)
    PRIVATE_KEY_JWT = "private_key_jwt"

    def __str__(self) -> str:
        return self.value


_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_address("::1")


def _where(name: str) -> str:
    return f"({_WHERE[name]})" if name in _WHERE else ""


def is_loopback(host: str) -> bool:
    """True for exactly ``localhost``, 127.0.0.0/8 and ``::1``: the hosts that may use plain http.

    Other ``*.localhost`` names are refused (a resolver may send them anywhere), as are IPv4-mapped
    IPv6 forms (``::ffff:127.0.0.1``) and the unspecified address (``0.0.0.0``, ``::``).
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (address.version == 4 and address in _LOOPBACK_V4) or address == _LOOPBACK_V6


def origin(url: httpx.URL | str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` with the scheme's default port filled in."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    port = u.port or {"http": 80, "https": 443}.get(u.scheme, 0)
    return u.scheme, u.host, port


def is_secure(url: httpx.URL) -> bool:
    """The one transport rule: ``https://``, or plain ``http://`` to a loopback host (the sandbox)."""
    return url.scheme == "https" or (url.scheme == "http" and is_loopback(url.host))


def secure_url(url: str, refusing: str, rule: str) -> httpx.URL:
    """A URL a server handed us (bulk file, presigned upload), parsed, if :func:`is_secure`; else
    :class:`ModMedError`: ``"refusing {refusing} over http:// to 'host': {rule} must be https:// (http://
    only on loopback)"``. Patient data travels over these URLs."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise ModMedError(f"refusing {refusing}: {rule} is not a valid URL") from None
    if is_secure(parsed):
        return parsed
    raise ModMedError(f"refusing {refusing} over {parsed.scheme or 'no scheme'}:// to {parsed.host!r}: {rule} "
                      "must be https:// (http:// only on loopback)")


def check_url(name: str, value: str) -> str:
    """Validate a configured absolute http(s) URL (:func:`is_secure`), without query or fragment."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigurationError(f"{name} is not a valid URL {_where(name)}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"{name} must be an absolute https:// URL {_where(name)}, got scheme "
                    f"{url.scheme or 'none'!r}")
    if not is_secure(url):
        raise ConfigurationError(f"{name} uses plain http:// to {url.host!r} {_where(name)}: use https:// "
                    "(http:// is accepted only for loopback hosts such as the modmed-sandbox)")
    if url.query or url.fragment:
        raise ConfigurationError(f"{name} must not carry a query or fragment {_where(name)}")
    return value.rstrip("/")


def check_proxy(value: str) -> str:
    """Validate a proxy URL: ``http://`` or ``https://``, a host, and nothing after the port. The message shows
    ``scheme://host:port`` at most, never the user info (it may hold the proxy's password)."""
    where = _where("proxy")
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError):
        raise ConfigurationError(f"proxy is not a valid URL {where}: use http://host:port, e.g. "
                                 "http://proxy.hospital.internal:3128") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"proxy must be an http:// or https:// URL with a host {where}, e.g. "
                                 f"http://proxy.hospital.internal:3128; got scheme {url.scheme or 'none'!r}")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigurationError(f"proxy must be scheme://host:port with nothing after the port {where}")
    return value


def check_firm(firm: str, *, subdomain: bool = False) -> str:
    """Validate a firm URL prefix before any call: one URL path segment (letters, digits, ``-``, ``_``,
    ``.``; not ``.`` or ``..``); with ``subdomain`` (the certified track's host ``{firm}.mmi.prod...``)
    also a DNS label (letters, digits, inner ``-``, at most 63). Returns ``firm``."""
    where = _where("firm")
    if not _FIRM_SEGMENT.fullmatch(firm) or firm in (".", ".."):
        raise ConfigurationError(f"firm {where} must be the practice's URL prefix, one URL path segment of "
                                 f"letters, digits, '-', '_' or '.', got {firm!r}")
    if subdomain and not _DNS_LABEL.fullmatch(firm):
        raise ConfigurationError(f"firm {where} is the subdomain of the practice's certified host "
                                 f"({profile.CERTIFIED_BASE_TEMPLATE}), so it must be a DNS label: letters, digits "
                                 f"and '-' (not first or last), at most 63 characters, got {firm!r}")
    return firm


def secret_digest(*parts: str | None) -> str:
    """A short, stable, non-reversible digest of secrets: for cache and rate-budget keys, never logs."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part or "").encode())
        h.update(b"\x00")
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class ClientConfig:
    """Everything the client needs to talk to one practice on one track.

    Built from plain values (the Airflow hook builds it from a Connection). Secrets are excluded from
    ``repr``. :meth:`__post_init__` validates and raises :class:`ConfigurationError` naming the field.
    """

    track: Track | str
    fhir_base: str
    firm: str = ""
    auth_method: AuthMethod | str = AuthMethod.PASSWORD
    api_key: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    key_id: str | None = None
    jwt_algorithm: str = "RS384"
    scope: str | None = None
    token_url: str | None = None
    rate_limit_per_minute: int = 1000
    rate_limit_storage_uri: str = field(default="memory://", repr=False)  # may carry a Redis password
    timeout: float = 30.0
    verify: bool | str = True
    #: ``http://[user[:password]@]host:port`` (or ``https://``): every https:// request goes through it
    proxy: str | None = field(default=None, repr=False)  # may carry the proxy's password
    #: the CAs to trust instead of the system's: PEM text, or the path of a file or directory of them
    ca_bundle: str | None = field(default=None, repr=False)
    max_retries: int = 5
    capabilities: Capabilities = field(default=DEFAULT, repr=False)

    def __post_init__(self) -> None:
        try:
            track = Track(str(self.track).strip().lower())
        except ValueError:
            raise ConfigurationError(f"track must be 'proprietary' or 'certified' {_where('track')}, "
                                     f"got {self.track!r}") from None
        try:
            method = AuthMethod(str(self.auth_method).strip().lower())
        except ValueError:
            raise ConfigurationError(f"auth_method must be one of {', '.join(m.value for m in AuthMethod)} "
                                     f"{_where('auth_method')}, got {self.auth_method!r}") from None
        object.__setattr__(self, "track", track)
        object.__setattr__(self, "auth_method", method)
        object.__setattr__(self, "jwt_algorithm", str(self.jwt_algorithm or "RS384").strip().upper())
        if self.firm:
            check_firm(self.firm)
        if not self.fhir_base:
            raise ConfigurationError(f"fhir_base is required {_where('fhir_base')}")
        object.__setattr__(self, "fhir_base", check_url("fhir_base", self.fhir_base))
        if self.token_url:
            object.__setattr__(self, "token_url", check_url("token_url", self.token_url))
        self._check_auth(track, method)
        if not isinstance(self.rate_limit_per_minute, int) or self.rate_limit_per_minute < 1:
            raise ConfigurationError(f"rate_limit_per_minute must be a positive integer "
                                     f"{_where('rate_limit_per_minute')}, got {self.rate_limit_per_minute!r}")
        if "://" not in (self.rate_limit_storage_uri or ""):
            raise ConfigurationError("rate_limit_storage_uri must be a `limits` storage URI such as memory:// or "
                                     f"redis://host:6379/0 {_where('rate_limit_storage_uri')}")
        if not self.timeout or self.timeout <= 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds {_where('timeout')}")
        if self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0 {_where('max_retries')}")
        if isinstance(self.verify, str) and not os.path.exists(self.verify):
            raise ConfigurationError(f"verify names a CA bundle that does not exist: {self.verify!r} (a file or "
                                     "directory of CA certificates, or true/false)")
        if self.proxy:
            check_proxy(self.proxy)
        if self.ca_bundle:
            self._check_ca_bundle()

    def _check_ca_bundle(self) -> None:
        where = _where("ca_bundle")
        if self.verify is False:
            raise ConfigurationError(f"ca_bundle is set but verify is false {where}: a CA bundle is for verifying "
                                     "the server's certificate; keep verify true")
        if isinstance(self.verify, str):
            raise ConfigurationError(f"the CA bundle is given twice: in ca_bundle {where} and in verify="
                                     f"{self.verify!r}; give it once")
        bundle = self.ca_bundle or ""
        if PEM_CERTIFICATE not in bundle and not os.path.exists(bundle):
            raise ConfigurationError(f"ca_bundle {where} must be PEM certificates (-----BEGIN CERTIFICATE-----"
                                     "...) or the path of a file or directory of them; no such file: "
                                     f"{bundle[:120]!r}")
        try:
            ca_context(bundle)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigurationError(f"ca_bundle {where} holds no usable CA certificate "
                                     f"({type(exc).__name__}: {exc})") from None

    def _require(self, name: str, why: str) -> None:
        if not getattr(self, name):
            raise ConfigurationError(f"{name} is required {why} {_where(name)}")

    def _check_auth(self, track: Track, method: AuthMethod) -> None:
        if track is Track.PROPRIETARY:
            self._require("api_key", "for track='proprietary'")
            if method is AuthMethod.PASSWORD:
                self._require("username", "for auth_method='password'")
                self._require("password", "for auth_method='password'")
                if not self.token_url and profile.grant_url_of(self.fhir_base) is None:
                    raise ConfigurationError(
                        f"token_url is required for auth_method='password' when fhir_base does not end "
                        f"with {profile.PROPRIETARY_FHIR_SUFFIX} {_where('token_url')}")
            elif method is AuthMethod.CLIENT_SECRET:
                self._require("client_id", "for auth_method='client_secret'")
                self._require("client_secret", "for auth_method='client_secret'")
                self._require("token_url", "for auth_method='client_secret' on track='proprietary': the "
                              f"Keycloak realm token URL, e.g. ...{profile.KEYCLOAK_TOKEN_PATH}")
            else:
                raise ConfigurationError("auth_method='private_key_jwt' is for track='certified' (SMART backend "
                                         "services); the proprietary track uses 'password' or 'client_secret' "
                                         f"{_where('auth_method')}")
            return
        if method is AuthMethod.PASSWORD:
            raise ConfigurationError("auth_method='password' is for track='proprietary'; the certified track uses "
                                     f"'private_key_jwt' or 'client_secret' {_where('auth_method')}")
        self._require("client_id", f"for auth_method={method.value!r}")
        if method is AuthMethod.CLIENT_SECRET:
            self._require("client_secret", "for auth_method='client_secret'")
            return
        self._require("private_key", "for auth_method='private_key_jwt' (PEM, RSA or EC P-384)")
        self._require("key_id", "for auth_method='private_key_jwt' (the kid registered in your JWKS)")
        if self.jwt_algorithm not in JWT_ALGORITHMS:
            raise ConfigurationError(f"jwt_algorithm must be RS384 or ES384 {_where('jwt_algorithm')}, "
                                     f"got {self.jwt_algorithm!r}")
        load_signing_key(self.private_key or "", self.jwt_algorithm)

    # -- derived values ---------------------------------------------------------------------------

    @property
    def resolved_track(self) -> Track:
        """The track as a :class:`Track` (``track`` is normalised in ``__post_init__``)."""
        return Track(self.track)

    @property
    def resolved_auth_method(self) -> AuthMethod:
        """The auth method as an :class:`AuthMethod`."""
        return AuthMethod(self.auth_method)

    @property
    def password_grant_url(self) -> str:
        """The proprietary password-grant URL: ``token_url`` or derived from ``fhir_base``."""
        grant = self.token_url or profile.grant_url_of(self.fhir_base)
        if grant is None:
            raise ConfigurationError(f"no password grant URL: set token_url {_where('token_url')}")
        return grant

    @property
    def budget_key(self) -> str:
        """Rate-budget identity: firm plus a digest of the API key (or client id), never the key."""
        return f"{self.firm or '-'}:{secret_digest(self.api_key or self.client_id or self.fhir_base)}"

    @property
    def credential_key(self) -> str:
        """Token-cache identity: a digest of everything that yields a distinct token."""
        return secret_digest(str(self.track), str(self.auth_method), self.fhir_base, self.token_url,
                             self.api_key, self.username, self.password, self.client_id,
                             self.client_secret, self.private_key, self.key_id, self.jwt_algorithm,
                             self.scope)


def load_signing_key(pem: str, algorithm: str) -> Any:
    """Import a PEM private key as a joserfc key matching ``algorithm`` (RS384 -> RSA, ES384 -> P-384)."""
    from joserfc.errors import JoseError
    from joserfc.jwk import ECKey, RSAKey

    where = _where("private_key")
    try:
        if algorithm == "ES384":
            key: Any = ECKey.import_key(pem)
            if key.curve_name != "P-384":
                raise ConfigurationError(f"private_key is an EC {key.curve_name} key but ES384 needs P-384 {where}")
        else:
            key = RSAKey.import_key(pem)
    except ConfigurationError:
        raise
    except (JoseError, ValueError, TypeError) as exc:
        kind = "an EC P-384" if algorithm == "ES384" else "an RSA"
        raise ConfigurationError(f"private_key is not {kind} private key in PEM form for jwt_algorithm={algorithm!r} "
                                 f"{where} ({type(exc).__name__})") from None
    if not key.is_private:
        raise ConfigurationError(f"private_key holds a public key; a private key is needed {where}")
    return key
