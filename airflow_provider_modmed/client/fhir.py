"""FhirClient and AsyncFhirClient: thin faces over the flows in :mod:`._flows`.

Each method is one line: build a flow (validation and capability pre-flight happen here, before any
network call) and drive it. The faces differ only in how they send (``httpx.Client`` vs
``httpx.AsyncClient``, ``Retrying`` vs ``AsyncRetrying``, ``limits`` vs ``limits.aio``) and sleep.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
from tenacity import AsyncRetrying, Retrying

from airflow_provider_modmed import __version__
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client.auth import (
    TOKEN_REQUEST,
    ModMedAuth,
    async_credential_guard,
    auth_from_config,
    credential_guard,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.limiter import RateBudget
from airflow_provider_modmed.client.retry import ATTEMPT, describe, retry_kwargs, tls_verify_failure
from airflow_provider_modmed.errors import TransportError

log = logging.getLogger("airflow_provider_modmed.client")

T = TypeVar("T")
Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None
USER_AGENT = f"airflow-provider-modmed/{__version__}"


class RedactQueryFilter(logging.Filter):
    """Drop query strings from httpx's own ``HTTP Request: GET <url>`` log lines: search values
    (names, birth dates, identifiers) are patient data. Installed on the ``httpx`` logger once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                str(a.copy_with(query=None)) + ("?<redacted>" if a.query else "")
                if isinstance(a, httpx.URL) else a
                for a in record.args
            )
        return True


def _redact_httpx_logs() -> None:
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, RedactQueryFilter) for f in httpx_log.filters):
        httpx_log.addFilter(RedactQueryFilter())


def _transport_error(request: httpx.Request, exc: httpx.RequestError) -> TransportError:
    tls = tls_verify_failure(exc)
    if tls is not None:
        return TransportError(f"{describe(request)}: the server's TLS certificate failed verification "
                              f"({tls.verify_message or tls.reason}); if the practice's server uses a private CA, "
                              "give the client its CA bundle (verify=<file>)")
    return TransportError(f"{describe(request)} got no answer ({type(exc).__name__})")


def _log_answer(request: httpx.Request, response: httpx.Response, started: float) -> None:
    log.debug("modmed: %s -> %d in %.3fs", describe(request), response.status_code,
              time.monotonic() - started)


class _Face:
    """What both faces share: config, FHIR context, auth flow, rate budget and retry policy."""

    def __init__(self, config: ClientConfig, auth: ModMedAuth | None, budget: RateBudget | None,
                 sleep: Callable[[float], Any], asleep: Callable[[float], Awaitable[Any]]) -> None:
        self.config = config
        self.context = flows.FhirContext.from_config(config)
        self.auth = auth if auth is not None else auth_from_config(config)
        self.budget = budget if budget is not None else RateBudget.from_config(
            config, sleep=sleep, asleep=asleep)
        self.retry_kwargs = retry_kwargs(config.max_retries)
        _redact_httpx_logs()

    def _counts_against_budget(self, request: httpx.Request) -> bool:
        """Every request ModMed counts: FHIR calls, token calls and resends after a 401 (they run as
        event hooks, so requests the auth flow makes are counted too); not presigned storage URLs."""
        return bool(request.extensions.get(TOKEN_REQUEST)) or self.auth.owns(request)

    def _client_kwargs(self, transport: Any) -> dict[str, Any]:
        verify: Any = self.config.verify
        if isinstance(verify, str):  # a CA bundle (file) or a directory of certificates
            verify = (ssl.create_default_context(capath=verify) if os.path.isdir(verify)
                      else ssl.create_default_context(cafile=verify))
        return {"timeout": self.config.timeout, "verify": verify, "transport": transport,
                "follow_redirects": False, "headers": {"User-Agent": USER_AGENT}}


class FhirClient(_Face):
    """Synchronous ModMed FHIR client (both tracks), usable without Airflow.

    ``http_client`` lets callers supply their own ``httpx.Client`` (e.g. Starlette's ``TestClient``);
    otherwise one is built from the config (TLS verified, no redirects). ``sleep`` is injectable.
    """

    def __init__(self, config: ClientConfig, *, http_client: httpx.Client | None = None,
                 transport: httpx.BaseTransport | None = None, auth: ModMedAuth | None = None,
                 budget: RateBudget | None = None, sleep: Callable[[float], Any] = time.sleep) -> None:
        super().__init__(config, auth, budget, sleep, anyio.sleep)
        self._sleep = sleep
        self._owns_http = http_client is None
        self.http = http_client if http_client is not None else httpx.Client(**self._client_kwargs(transport))
        hooks = self.http.event_hooks
        hooks["request"] = [*hooks.get("request", []), credential_guard(self.auth), self._spend_budget]
        self.http.event_hooks = hooks

    # -- I/O: the only sync-specific code --------------------------------------------------------

    def _spend_budget(self, request: httpx.Request) -> None:
        if self._counts_against_budget(request):
            self.budget.acquire()

    def _send_once(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        request.extensions[ATTEMPT] = request.extensions.get(ATTEMPT, 0) + 1
        response = self.http.send(request, auth=self.auth)
        _log_answer(request, response, started)
        return response

    def send(self, request: httpx.Request) -> httpx.Response:
        """Send one request: rate budget, auth, retries. Answers of any status are returned."""
        try:
            response: httpx.Response = Retrying(sleep=self._sleep, **self.retry_kwargs)(
                self._send_once, request)
        except httpx.RequestError as exc:
            raise _transport_error(request, exc) from exc
        return response

    def run(self, flow: flows.Flow[T]) -> T:
        """Drive any flow (see :mod:`._flows`) to its result."""
        return flows.drive(flow, self.send, self._sleep)

    def iterate(self, flow: flows.Flow[Any]) -> Iterator[Any]:
        """Drive a flow that emits values, yielding them one at a time."""
        return flows.iterate(flow, self.send, self._sleep)

    # -- FHIR interactions: one line each --------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``)."""
        return self.run(flows.metadata(self.context))

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource; composite ids (``pay|7225``) are URL-encoded."""
        return self.run(flows.read(self.context, resource_type, resource_id))

    def search(self, resource_type: str, params: Params = None, *, count: int | None = None,
               headers: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over every match, one resource at a time, following ``next`` links lazily."""
        return self.iterate(flows.search(self.context, resource_type, params, count, headers))

    def create(self, resource: Mapping[str, Any],
               if_none_exist: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create (conditionally with ``if_none_exist``); returns the stored resource."""
        return self.run(flows.create(self.context, resource, if_none_exist))

    def update(self, resource: Mapping[str, Any], if_match: str | int | None = None) -> dict[str, Any]:
        """Update ``resource`` (it carries its ``id``); ``if_match`` is its expected ``versionId``."""
        return self.run(flows.update(self.context, resource, if_match))

    def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete one resource."""
        return self.run(flows.delete(self.context, resource_type, resource_id))

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncFhirClient(_Face):
    """Asynchronous twin of :class:`FhirClient` (for triggers): same flows, awaited I/O."""

    def __init__(self, config: ClientConfig, *, http_client: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, auth: ModMedAuth | None = None,
                 budget: RateBudget | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = anyio.sleep) -> None:
        super().__init__(config, auth, budget, time.sleep, sleep)
        self._asleep = sleep
        self._owns_http = http_client is None
        self.http = (http_client if http_client is not None
                     else httpx.AsyncClient(**self._client_kwargs(transport)))
        hooks = self.http.event_hooks
        hooks["request"] = [*hooks.get("request", []), async_credential_guard(self.auth), self._spend_budget]
        self.http.event_hooks = hooks

    async def _spend_budget(self, request: httpx.Request) -> None:
        if self._counts_against_budget(request):
            await self.budget.aacquire()

    async def _send_once(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        request.extensions[ATTEMPT] = request.extensions.get(ATTEMPT, 0) + 1
        response = await self.http.send(request, auth=self.auth)
        _log_answer(request, response, started)
        return response

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send one request: rate budget, auth, retries. Answers of any status are returned."""
        try:
            response: httpx.Response = await AsyncRetrying(sleep=self._asleep, **self.retry_kwargs)(
                self._send_once, request)
        except httpx.RequestError as exc:
            raise _transport_error(request, exc) from exc
        return response

    async def run(self, flow: flows.Flow[T]) -> T:
        """Drive any flow to its result."""
        return await flows.adrive(flow, self.send, self._asleep)

    def iterate(self, flow: flows.Flow[Any]) -> AsyncIterator[Any]:
        """Drive a flow that emits values, yielding them one at a time."""
        return flows.aiterate(flow, self.send, self._asleep)

    async def metadata(self) -> dict[str, Any]:
        """The server's CapabilityStatement."""
        return await self.run(flows.metadata(self.context))

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource."""
        return await self.run(flows.read(self.context, resource_type, resource_id))

    def search(self, resource_type: str, params: Params = None, *, count: int | None = None,
               headers: Mapping[str, str] | None = None) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every match; arguments are checked now, pages fetched lazily."""
        return self.iterate(flows.search(self.context, resource_type, params, count, headers))

    async def create(self, resource: Mapping[str, Any],
                     if_none_exist: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create (conditionally with ``if_none_exist``); returns the stored resource."""
        return await self.run(flows.create(self.context, resource, if_none_exist))

    async def update(self, resource: Mapping[str, Any],
                     if_match: str | int | None = None) -> dict[str, Any]:
        """Update ``resource``; ``if_match`` is its expected ``versionId``."""
        return await self.run(flows.update(self.context, resource, if_match))

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete one resource."""
        return await self.run(flows.delete(self.context, resource_type, resource_id))

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncFhirClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
