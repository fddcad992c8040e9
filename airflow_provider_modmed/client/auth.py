"""httpx auth flows for ModMed's three auth methods, with one shared token cache per credential set.

Each flow is written once, as :meth:`ModMedAuth.auth_flow`: a generator that yields the token request
(and SMART discovery) itself and does no I/O of its own. Besides requests it yields two small I/O steps:
take the cache's renewal lock (single flight) and read a token answer's body (FHIR answers stay unread so
downloads can stream). The two drivers (:meth:`~ModMedAuth.sync_auth_flow`,
:meth:`~ModMedAuth.async_auth_flow`) differ only in running those steps: a ``threading.Lock`` and
``Response.read`` for the sync face, an ``anyio.Lock`` and ``Response.aread`` for the async face. Token
requests carry the ``User-Agent`` and ``Accept-Encoding`` of the request that needed the token.

* :class:`PasswordGrantAuth`: the proprietary password grant + ``x-api-key``; refresh_token when the
  token expires or a call answers 401; full re-authentication when the refresh fails.
* :class:`ClientCredentialsAuth`: proprietary client_credentials with a client secret (Keycloak);
  ``x-api-key`` still on FHIR calls.
* :class:`SmartBackendAuth`: certified track, SMART backend services: discovery through
  ``.well-known/smart-configuration``, then ``private_key_jwt`` (RS384/ES384, ``kid``, fresh ``jti``,
  ``exp`` = now + 240 s) or ``client_secret_post``/``client_secret_basic``.

Tokens are renewed shortly before ``expires_in`` runs out (when the server says) and once on 401.
The bearer token and the API key go only to the FHIR base's origin (scheme, host, port): never to
presigned URLs, to storage hosts, to requests marked :data:`NO_CREDENTIALS` or across redirects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc7523 import private_key_jwt_sign

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client.config import (
    AuthMethod,
    ClientConfig,
    check_url,
    load_signing_key,
    origin,
)
from airflow_provider_modmed.client.retry import TOKEN_REQUEST, WHAT, describe
from airflow_provider_modmed.errors import AuthError, ConfigurationError, ModMedError, error_for_status, json_body

log = logging.getLogger("airflow_provider_modmed.client")

#: request extension: never attach credentials to this request (e.g. bulk files with
#: ``requiresAccessToken: false`` on the FHIR host itself)
NO_CREDENTIALS = "modmed.no_credentials"
#: headers that carry credentials
CREDENTIAL_HEADERS = ("Authorization", "x-api-key")
#: the client's headers a token request copies from the request that needed the token
CLIENT_HEADERS = ("User-Agent", "Accept-Encoding")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: lifetime of a SMART client assertion (the spec allows at most 300 s)
ASSERTION_LIFETIME = 240
#: renew this many seconds before ``expires_in`` runs out (at most a quarter of the lifetime)
MAX_LEEWAY = 30.0

TokenFlow = Generator[httpx.Request, httpx.Response, OAuth2Token]


# -- the token cache -----------------------------------------------------------------------------

class TokenCache:
    """The token state of one credential set, shared by every client and request that uses it.

    Holds the current token (an authlib :class:`OAuth2Token`), the SMART discovery document, and the
    locks that make renewal single-flight: one ``threading.Lock`` for sync callers, one ``anyio.Lock``
    per event loop for async callers.
    """

    def __init__(self) -> None:
        self.token: OAuth2Token | None = None
        self.leeway: float = 0.0
        self.discovery: dict[str, Any] | None = None
        self.thread_lock = threading.Lock()
        self._registry_lock = threading.Lock()  # guards the per-loop lock table only
        self._async_locks: weakref.WeakKeyDictionary[Any, anyio.Lock] = weakref.WeakKeyDictionary()
        self._default_async_lock: anyio.Lock | None = None

    def usable(self, stale: str | None = None) -> OAuth2Token | None:
        """The cached token if it is not expiring and is not ``stale`` (the one a 401 refused)."""
        token = self.token
        if token is None:
            return None
        if stale is not None and token.get("access_token") == stale:
            return None
        if token.is_expired(leeway=self.leeway):  # None (unknown expiry) counts as valid
            return None
        return token

    def store(self, token: OAuth2Token) -> None:
        """Keep ``token``; renew it ``leeway`` seconds before it expires."""
        expires_in = token.get("expires_in")
        try:
            self.leeway = min(MAX_LEEWAY, float(expires_in) / 4) if expires_in else 0.0
        except (TypeError, ValueError):
            self.leeway = 0.0
        self.token = token

    def clear(self) -> None:
        """Forget the token (and discovery); the next call authenticates again."""
        self.token = None
        self.discovery = None

    def async_lock(self) -> anyio.Lock:
        """The async lock of the running event loop."""
        try:
            loop: Any = asyncio.get_running_loop()
        except RuntimeError:  # another async library: one lock
            if self._default_async_lock is None:
                self._default_async_lock = anyio.Lock()
            return self._default_async_lock
        with self._registry_lock:
            lock = self._async_locks.get(loop)
            if lock is None:
                lock = self._async_locks[loop] = anyio.Lock()
            return lock


_caches: dict[str, TokenCache] = {}
_caches_lock = threading.Lock()


def token_cache(key: str) -> TokenCache:
    """The process-wide :class:`TokenCache` for a credential digest (:attr:`ClientConfig.credential_key`)."""
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = TokenCache()
        return cache


# -- helpers -------------------------------------------------------------------------------------

def token_error(response: httpx.Response, what: str) -> ModMedError:
    """The typed error for a failed token (or discovery) answer: its text shows the OAuth ``error`` code;
    the ``error_description`` (server text) only :meth:`~..errors.ModMedError.diagnostics` returns."""
    return error_for_status(response.status_code, json_body(response), what, auth=True)


def parse_token(response: httpx.Response, what: str) -> OAuth2Token:
    """An :class:`OAuth2Token` from a token answer, or the typed error."""
    body = json_body(response)
    if response.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
        if response.status_code == 200:
            raise AuthError(f"{what} answered no access_token", status_code=200)
        raise token_error(response, what)
    token_type = str(body.get("token_type") or "bearer")
    if token_type.lower() != "bearer":
        raise AuthError(f"{what} answered token_type {token_type!r}; only bearer tokens are supported")
    return OAuth2Token.from_dict(dict(body))


def _token_request(url: str, form: Mapping[str, str], what: str,
                   headers: Mapping[str, str] | None = None) -> httpx.Request:
    return httpx.Request(
        "POST", url, data=dict(form),
        headers={"Accept": "application/json", **(headers or {})},
        extensions={TOKEN_REQUEST: True, WHAT: what},
    )


def strip_credentials(request: httpx.Request) -> None:
    """Remove ``Authorization`` and ``x-api-key`` from ``request``."""
    for name in CREDENTIAL_HEADERS:
        request.headers.pop(name, None)


class AuthIo:
    """A step of :meth:`ModMedAuth.auth_flow` that is not a request: I/O its driver runs, sync or async."""

    def run(self) -> Any:
        raise NotImplementedError

    async def arun(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Lock(AuthIo):
    """Take the cache's renewal lock (the thread lock, or the event loop's ``anyio.Lock``); answers the
    function that releases it."""

    cache: TokenCache

    def run(self) -> Callable[[], None]:
        self.cache.thread_lock.acquire()
        return self.cache.thread_lock.release

    async def arun(self) -> Callable[[], None]:
        lock = self.cache.async_lock()
        await lock.acquire()
        return lock.release


@dataclass(frozen=True)
class Read(AuthIo):
    """Read a token answer's body (before the flow parses it)."""

    response: httpx.Response

    def run(self) -> bytes:
        return self.response.read()

    async def arun(self) -> bytes:
        return await self.response.aread()


AuthStep = httpx.Request | AuthIo


def _advance(flow: Generator[AuthStep, Any, None], answer: Any) -> AuthStep | None:
    try:
        return flow.send(answer)
    except StopIteration:
        return None


def carry_client_settings(source: httpx.Request, target: httpx.Request) -> None:
    """Give ``target`` (a token request, built by the flow) what the face's httpx client gave ``source``
    (the request that needed the token): the :data:`CLIENT_HEADERS` and the timeout."""
    for name in CLIENT_HEADERS:
        if name in source.headers and name not in target.headers:
            target.headers[name] = source.headers[name]
    if "timeout" in source.extensions:
        target.extensions.setdefault("timeout", source.extensions["timeout"])


# -- the flows -----------------------------------------------------------------------------------

class ModMedAuth(httpx.Auth):
    """Base of the three auth methods: bearer (+ ``x-api-key``) for the FHIR origin only.

    Subclasses implement :meth:`fetch` (the token requests, as a generator). Everything else (cache,
    single-flight renewal, 401 handling, host scoping) is here, once.
    """

    requires_request_body = False
    #: token answers are read by the drivers; FHIR answers are left unread so downloads can stream
    requires_response_body = False

    def __init__(self, fhir_base: str, *, api_key: str | None = None, cache: TokenCache | None = None):
        self.fhir_base = fhir_base.rstrip("/")
        self.origin = origin(self.fhir_base)
        self.api_key = api_key
        self.cache = cache if cache is not None else TokenCache()

    def owns(self, request: httpx.Request) -> bool:
        """Whether credentials may go with ``request``: the FHIR origin, and not opted out."""
        return origin(request.url) == self.origin and not request.extensions.get(NO_CREDENTIALS)

    def apply(self, request: httpx.Request, token: OAuth2Token) -> None:
        request.headers["Authorization"] = f"Bearer {token['access_token']}"
        if self.api_key:
            request.headers["x-api-key"] = self.api_key

    def fetch(self, previous: OAuth2Token | None) -> TokenFlow:
        """Yield the token request(s) and return a new token; ``previous`` is the one being replaced."""
        raise NotImplementedError
        yield  # pragma: no cover

    def renew(self, stale: str | None) -> TokenFlow:
        """Under the lock: re-check (someone may have renewed meanwhile), else fetch and store."""
        token = self.cache.usable(stale)
        if token is not None:
            return token
        token = yield from self.fetch(self.cache.token)
        self.cache.store(token)
        log.debug("modmed: new token for %s://%s", self.origin[0], self.origin[1])
        return token

    def auth_flow(  # type: ignore[override]  # also yields AuthIo steps, run by the drivers below
        self, request: httpx.Request
    ) -> Generator[AuthStep, Any, None]:
        if not self.owns(request):
            strip_credentials(request)
            yield request
            return
        stale: str | None = None
        for attempt in (1, 2):
            token = self.cache.usable(stale)
            if token is None:
                token = yield from self._token_phase(stale, request)
            self.apply(request, token)
            response = yield request
            if response.status_code != 401 or attempt == 2:
                return
            stale = token["access_token"]
            log.info("modmed: %s answered 401; renewing the token and retrying once", describe(request))

    def _token_phase(self, stale: str | None, trigger: httpx.Request) -> Generator[AuthStep, Any, OAuth2Token]:
        """:meth:`renew` under the cache's lock, each token answer read, each token request carrying the
        client headers of ``trigger``."""
        release = yield Lock(self.cache)
        try:
            renewal: TokenFlow = self.renew(stale)
            answer: Any = None
            while True:
                try:
                    token_request = renewal.send(answer)
                except StopIteration as done:
                    token: OAuth2Token = done.value
                    return token
                carry_client_settings(trigger, token_request)
                answer = yield token_request
                yield Read(answer)
        finally:
            release()

    # the two drivers: httpx's loop, plus running the AuthIo steps on their face

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        with contextlib.closing(self.auth_flow(request)) as flow:
            step = _advance(flow, None)
            while step is not None:
                step = _advance(flow, (yield step) if isinstance(step, httpx.Request) else step.run())

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        with contextlib.closing(self.auth_flow(request)) as flow:
            step = _advance(flow, None)
            while step is not None:
                step = _advance(flow, (yield step) if isinstance(step, httpx.Request) else await step.arun())


class PasswordGrantAuth(ModMedAuth):
    """Proprietary track, auth A: OAuth2 password grant at ``.../ema/ws/oauth2/grant`` + ``x-api-key``.

    ``expires_in`` is often missing, so a 401 means "expired": refresh with the refresh token (which
    stays the same), and when the refresh is refused, authenticate again with username and password.
    """

    def __init__(self, fhir_base: str, token_url: str, *, api_key: str, username: str, password: str,
                 cache: TokenCache | None = None) -> None:
        super().__init__(fhir_base, api_key=api_key, cache=cache)
        self.token_url = token_url
        self._username = username
        self._password = password

    def _grant(self, form: Mapping[str, str], what: str) -> httpx.Request:
        return _token_request(self.token_url, form, what, {"x-api-key": self.api_key or ""})

    def fetch(self, previous: OAuth2Token | None) -> TokenFlow:
        refresh_token = previous.get("refresh_token") if previous else None
        if refresh_token:
            response = yield self._grant({"grant_type": "refresh_token", "refresh_token": refresh_token},
                                         "refresh grant")
            if response.status_code == 200:
                token = parse_token(response, "refresh grant")
                if not token.get("refresh_token"):
                    token["refresh_token"] = refresh_token
                return token
            if response.status_code not in (400, 401):
                raise token_error(response, "refresh grant")
            log.info("modmed: refresh token refused (HTTP %d); authenticating again",
                     response.status_code)
        response = yield self._grant(
            {"grant_type": "password", "username": self._username, "password": self._password},
            "password grant",
        )
        return parse_token(response, "password grant")


class ClientCredentialsAuth(ModMedAuth):
    """Proprietary track, auth B: client_credentials + client secret at the Keycloak realm token URL.

    No refresh token: a new grant before ``expires_in`` runs out and after a 401. ``x-api-key`` still
    goes on every FHIR call (not to the token URL).
    """

    def __init__(self, fhir_base: str, token_url: str, *, client_id: str, client_secret: str,
                 api_key: str | None = None, scope: str | None = None,
                 cache: TokenCache | None = None) -> None:
        super().__init__(fhir_base, api_key=api_key, cache=cache)
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope

    def fetch(self, previous: OAuth2Token | None) -> TokenFlow:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self._client_secret}
        if self.scope:
            form["scope"] = self.scope
        response = yield _token_request(self.token_url, form, "client_credentials grant")
        return parse_token(response, "client_credentials grant")


class SmartBackendAuth(ModMedAuth):
    """Certified track: SMART Backend Services (client_credentials with a signed JWT, or a secret).

    Discovery (``{base}/.well-known/smart-configuration``) gives the token endpoint, the supported
    auth methods and signing algorithms, and whether the server speaks SMART v2 scopes. With a private
    key, each token request carries a fresh assertion: ``iss`` = ``sub`` = client_id, ``aud`` = the token
    endpoint, ``kid`` and ``typ`` headers, a new ``jti``, ``exp`` = now + 240 s. With a secret, it uses
    ``client_secret_post`` unless the server only offers ``client_secret_basic``.
    """

    def __init__(self, fhir_base: str, client_id: str, *, private_key: str | None = None,
                 key_id: str | None = None, algorithm: str = "RS384", client_secret: str | None = None,
                 token_url: str | None = None, scope: str | None = None,
                 cache: TokenCache | None = None) -> None:
        super().__init__(fhir_base, cache=cache)
        if (private_key is None) == (client_secret is None):
            raise ConfigurationError("SmartBackendAuth needs exactly one of private_key or client_secret")
        if private_key is not None and not key_id:
            raise ConfigurationError('key_id is required for private_key_jwt (extra field "key_id")')
        self.client_id = client_id
        self.algorithm = algorithm
        self.key_id = key_id
        self._key = load_signing_key(private_key, algorithm) if private_key is not None else None
        self._client_secret = client_secret
        self.token_url = token_url
        self.scope = scope

    @property
    def discovery_url(self) -> str:
        return f"{self.fhir_base}/.well-known/smart-configuration"

    def discover(self) -> Generator[httpx.Request, httpx.Response, dict[str, Any]]:
        """The SMART configuration (cached); ``{}`` when absent but ``token_url`` is configured."""
        if self.cache.discovery is not None:
            return self.cache.discovery
        response = yield httpx.Request(
            "GET", self.discovery_url, headers={"Accept": "application/json"},
            extensions={TOKEN_REQUEST: True, WHAT: "SMART discovery"},
        )
        body = json_body(response)
        if response.status_code == 200 and isinstance(body, dict):
            self.cache.discovery = body
            return body
        if response.status_code >= 500 or response.status_code == 429:
            raise token_error(response, "SMART discovery")
        if self.token_url:
            self.cache.discovery = {}
            return {}
        raise ConfigurationError(
            f"no SMART configuration at {{fhir_base}}/.well-known/smart-configuration (HTTP "
            f"{response.status_code}): set the token endpoint in extra field \"token_url\"",
            status_code=response.status_code,
        )

    def assertion(self, token_url: str) -> str:
        """A fresh signed client assertion (new ``jti`` on every call)."""
        return str(private_key_jwt_sign(
            self._key, self.client_id, token_url, alg=self.algorithm,
            header={"kid": self.key_id, "typ": "JWT"}, expires_in=ASSERTION_LIFETIME,
        ))

    def fetch(self, previous: OAuth2Token | None) -> TokenFlow:
        config: dict[str, Any] = {}
        if not (self.token_url and self.scope):
            config = yield from self.discover()
        token_url = self.token_url or str(config.get("token_endpoint") or "")
        if not token_url:
            raise ConfigurationError('the SMART configuration names no token_endpoint: set extra field '
                                     '"token_url"')
        token_url = check_url("token_url", token_url)
        methods = config.get("token_endpoint_auth_methods_supported")
        scope = self.scope or ("system/*.rs" if "permission-v2" in (config.get("capabilities") or ())
                               else "system/*.read")
        form = {"grant_type": "client_credentials", "scope": scope}
        headers: dict[str, str] = {}
        if self._key is not None:
            if methods and "private_key_jwt" not in methods:
                raise ConfigurationError(f"the server does not accept private_key_jwt (it offers "
                                         f"{', '.join(methods)}): change extra field \"auth_method\"")
            algs = config.get("token_endpoint_auth_signing_alg_values_supported")
            if algs and self.algorithm not in algs:
                raise ConfigurationError(f"the server does not accept {self.algorithm} assertions (it "
                                         f"offers {', '.join(algs)}): change extra field \"jwt_algorithm\"")
            form.update(client_assertion_type=CLIENT_ASSERTION_TYPE,
                        client_assertion=self.assertion(token_url))
        elif methods and "client_secret_post" not in methods and "client_secret_basic" in methods:
            pair = f"{quote(self.client_id, safe='')}:{quote(self._client_secret or '', safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form.update(client_id=self.client_id, client_secret=self._client_secret or "")
        response = yield _token_request(token_url, form, "SMART token request", headers)
        return parse_token(response, "SMART token request")


def auth_from_config(config: ClientConfig) -> ModMedAuth:
    """The auth flow for ``config``, sharing the process-wide token cache of its credential set."""
    cache = token_cache(config.credential_key)
    method = config.resolved_auth_method
    if method is AuthMethod.PASSWORD:
        return PasswordGrantAuth(config.fhir_base, config.password_grant_url, api_key=config.api_key or "",
                                 username=config.username or "", password=config.password or "",
                                 cache=cache)
    if config.resolved_track is Track.PROPRIETARY:
        return ClientCredentialsAuth(config.fhir_base, config.token_url or "",
                                     client_id=config.client_id or "",
                                     client_secret=config.client_secret or "", api_key=config.api_key,
                                     scope=config.scope, cache=cache)
    if method is AuthMethod.PRIVATE_KEY_JWT:
        return SmartBackendAuth(config.fhir_base, config.client_id or "", private_key=config.private_key,
                                key_id=config.key_id, algorithm=config.jwt_algorithm,
                                token_url=config.token_url, scope=config.scope, cache=cache)
    return SmartBackendAuth(config.fhir_base, config.client_id or "", client_secret=config.client_secret,
                            token_url=config.token_url, scope=config.scope, cache=cache)


def credential_guard(auth: ModMedAuth) -> Callable[[httpx.Request], None]:
    """An httpx ``request`` event hook (runs on every hop, redirects included) that removes credentials
    from any request not bound for the FHIR origin. Token requests are left alone (httpx itself drops
    ``Authorization`` on cross-origin redirects)."""

    def guard(request: httpx.Request) -> None:
        if not request.extensions.get(TOKEN_REQUEST) and not auth.owns(request):
            strip_credentials(request)

    return guard


def async_credential_guard(auth: ModMedAuth) -> Callable[[httpx.Request], Any]:
    """:func:`credential_guard` for ``httpx.AsyncClient`` (its hooks are awaited)."""
    guard = credential_guard(auth)

    async def aguard(request: httpx.Request) -> None:
        guard(request)

    return aguard
