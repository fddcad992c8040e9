"""FhirClient and AsyncFhirClient: the two faces that run every flow (:mod:`.drivers`).

Each FHIR method is one line: build a flow (validation and capability pre-flight happen here, before any
network call) and drive it. A face does the I/O of each step kind (:class:`~.drivers.Face`): ``send``
(every request rebuilt through the face's ``httpx`` client, so its headers apply: ``User-Agent`` and
``Accept-Encoding: gzip``), ``sleep``, ``fetch`` (stream a file into a sink) and ``parallel``. The faces
differ only in how they do it (``httpx.Client`` vs ``httpx.AsyncClient``, ``Retrying`` vs
``AsyncRetrying``, ``limits`` vs ``limits.aio``, threads vs an anyio task group).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
from tenacity import AsyncRetrying, Retrying

from airflow_provider_modmed import __version__
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client import drivers, egress, writes
from airflow_provider_modmed.client.auth import (
    TOKEN_REQUEST,
    ModMedAuth,
    async_credential_guard,
    auth_from_config,
    credential_guard,
)
from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.client.limiter import RateBudget
from airflow_provider_modmed.client.retry import (
    ATTEMPT,
    FLOW_RETRIES,
    NO_RESEND,
    describe,
    retry_kwargs,
    tls_verify_failure,
)
from airflow_provider_modmed.errors import TransportError

log = logging.getLogger("airflow_provider_modmed.client")

T = TypeVar("T")
Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | None
USER_AGENT = f"airflow-provider-modmed/{__version__}"
#: the headers of the faces' own httpx clients (every request, token requests included, carries them)
CLIENT_HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"}
#: headers of a flow's request that the rebuilt request computes again
_COMPUTED_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


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
                              "give the client its CA bundle (extra field \"ca_bundle\", or verify=<file>)")
    proxy = egress.proxy_failure(exc)
    if proxy is not None:
        return TransportError(f"{describe(request)}: {proxy}")
    if request.extensions.get(NO_RESEND):
        return TransportError(f"{describe(request)} got no answer ({type(exc).__name__}); not resent: the server "
                              "may have acted on it")
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

    def _client_kwargs(self, transport: Any, *, asynchronous: bool = False) -> dict[str, Any]:
        """The face's httpx client: TLS trust and proxy (:mod:`.egress`), timeout, no redirects, headers."""
        return {**egress.client_kwargs(self.config, transport, asynchronous=asynchronous),
                "timeout": self.config.timeout, "follow_redirects": False, "headers": CLIENT_HEADERS}

    def _build(self, request: httpx.Request) -> httpx.Request:
        """A flow's request rebuilt through the face's httpx client: its headers and timeout apply (the
        flow's headers win); method, URL, body and extensions are kept."""
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _COMPUTED_HEADERS]
        http: httpx.Client | httpx.AsyncClient = self.http  # type: ignore[attr-defined]
        return http.build_request(request.method, request.url, headers=headers, content=request.content,
                                  extensions=request.extensions)


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
        """Send one request through the httpx client: rate budget, auth, retries (a request marked
        ``NO_RESEND`` or ``FLOW_RETRIES`` is sent exactly once). Answers of any status are returned."""
        built = self._build(request)
        try:
            if built.extensions.get(NO_RESEND) or built.extensions.get(FLOW_RETRIES):
                return self._send_once(built)
            response: httpx.Response = Retrying(sleep=self._sleep, **self.retry_kwargs)(self._send_once, built)
        except httpx.RequestError as exc:
            raise _transport_error(built, exc) from exc
        return response

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    def fetch(self, step: drivers.Fetch) -> drivers.Fetched:
        """Stream one file into ``step.sink``: redirects followed, credentials per the auth's origin rule
        on every hop, the body decoded (gzip) so the sink verifies and hashes what the file holds."""
        with drivers.Download(step) as download:
            response = self.http.send(self._build(step.request), auth=self.auth, stream=True, follow_redirects=True)
            with contextlib.closing(response):
                if download.accept(response):
                    for chunk in response.iter_bytes():
                        download.write(chunk)
        return download.fetched

    def parallel(self, step: drivers.Parallel) -> list[Exception]:
        """Run ``step.flows`` in a pool of ``step.limit`` threads (sharing this client's connection pool),
        taking the next flow as a thread frees; answers the exceptions they raised."""
        failures: list[Exception] = []
        pending = iter(step.flows)
        with ThreadPoolExecutor(max_workers=step.limit, thread_name_prefix="modmed-flow") as pool:
            running = {pool.submit(self.run, flow) for flow in itertools.islice(pending, step.limit)}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if error is not None and not isinstance(error, Exception):
                        for other in running:
                            other.cancel()
                        raise error  # KeyboardInterrupt, SystemExit: stop, do not swallow
                    if error is not None:
                        failures.append(error)
                    following = next(pending, None)
                    if following is not None:
                        running.add(pool.submit(self.run, following))
        return failures

    def run(self, flow: drivers.Flow[T]) -> T:
        """Drive any flow (see :mod:`.drivers`) to its result."""
        return drivers.drive(flow, self)

    def iterate(self, flow: drivers.Flow[Any]) -> Iterator[Any]:
        """Drive a flow that emits values, yielding them one at a time."""
        return drivers.iterate(flow, self)

    # -- FHIR interactions: one line each --------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``)."""
        return self.run(flows.metadata(self.context))

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource; composite ids (``pay|7225``) are URL-encoded."""
        return self.run(flows.read(self.context, resource_type, resource_id))

    def search(self, resource_type: str, params: Params = None, *, count: int | None = None,
               headers: Mapping[str, str] | None = None, includes: bool = False) -> Iterator[dict[str, Any]]:
        """Iterate over every match, one resource at a time, following ``next`` links lazily; a match of
        another type fails. ``includes=True`` also yields included resources as ``flows.Included`` dicts."""
        return self.iterate(flows.search(self.context, resource_type, params, count, headers, includes=includes))

    def create(self, resource: Mapping[str, Any], if_none_exist: writes.Condition | None = None, *,
               transaction_id: str | None = None) -> dict[str, Any]:
        """Create (conditionally with ``if_none_exist``; a ChargeItem with its ``transaction_id``); returns
        the stored resource. See :func:`.writes.create`."""
        return self.run(writes.create(self.context, resource, if_none_exist, transaction_id))

    def update(self, resource: Mapping[str, Any], if_match: str | int | None = None, *,
               may_have_landed: bool = False) -> dict[str, Any]:
        """Update ``resource`` (it carries its ``id``); ``if_match`` is its expected ``versionId``.
        See :func:`.writes.update`."""
        return self.run(writes.update(self.context, resource, if_match, may_have_landed=may_have_landed))

    def patch(self, resource_type: str, resource_id: str, patch: writes.Patch,
              if_match: str | int | None = None, *, validate: bool = False) -> writes.PatchResult:
        """Read, apply ``patch`` (merge patch or ``current -> new``), write with ``If-Match``.
        See :func:`.writes.patch`."""
        return self.run(writes.patch(self.context, resource_type, resource_id, patch, if_match, validate=validate))

    def delete(self, resource_type: str, resource_id: str, *, missing_ok: bool = False) -> bool:
        """Delete one resource; returns whether it was there. See :func:`.writes.delete`."""
        return self.run(writes.delete(self.context, resource_type, resource_id, missing_ok))

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
                     else httpx.AsyncClient(**self._client_kwargs(transport, asynchronous=True)))
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
        """:meth:`FhirClient.send`, awaited."""
        built = self._build(request)
        try:
            if built.extensions.get(NO_RESEND) or built.extensions.get(FLOW_RETRIES):
                return await self._send_once(built)
            response: httpx.Response = await AsyncRetrying(sleep=self._asleep, **self.retry_kwargs)(
                self._send_once, built)
        except httpx.RequestError as exc:
            raise _transport_error(built, exc) from exc
        return response

    async def sleep(self, seconds: float) -> None:
        await self._asleep(seconds)

    async def fetch(self, step: drivers.Fetch) -> drivers.Fetched:
        """:meth:`FhirClient.fetch`, awaited (storage writes are blocking calls: fine on a worker)."""
        with drivers.Download(step) as download:
            response = await self.http.send(self._build(step.request), auth=self.auth, stream=True,
                                            follow_redirects=True)
            async with contextlib.aclosing(response):
                if download.accept(response):
                    async for chunk in response.aiter_bytes():
                        download.write(chunk)
        return download.fetched

    async def parallel(self, step: drivers.Parallel) -> list[Exception]:
        """Run ``step.flows`` as anyio tasks, ``step.limit`` at a time (each taken as a slot frees)."""
        failures: list[Exception] = []
        slots = anyio.Semaphore(step.limit)

        async def one(flow: drivers.Flow[Any]) -> None:
            try:
                await self.run(flow)
            except Exception as exc:
                failures.append(exc)
            finally:
                slots.release()

        async with anyio.create_task_group() as group:
            for flow in step.flows:
                await slots.acquire()
                group.start_soon(one, flow)
        return failures

    async def run(self, flow: drivers.Flow[T]) -> T:
        """Drive any flow to its result."""
        return await drivers.adrive(flow, self)

    def iterate(self, flow: drivers.Flow[Any]) -> AsyncIterator[Any]:
        """Drive a flow that emits values, yielding them one at a time."""
        return drivers.aiterate(flow, self)

    async def metadata(self) -> dict[str, Any]:
        """The server's CapabilityStatement."""
        return await self.run(flows.metadata(self.context))

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource."""
        return await self.run(flows.read(self.context, resource_type, resource_id))

    def search(self, resource_type: str, params: Params = None, *, count: int | None = None,
               headers: Mapping[str, str] | None = None, includes: bool = False) -> AsyncIterator[dict[str, Any]]:
        """``async for`` over every match; arguments are checked now, pages fetched lazily (``includes``: as
        :meth:`FhirClient.search`)."""
        return self.iterate(flows.search(self.context, resource_type, params, count, headers, includes=includes))

    async def create(self, resource: Mapping[str, Any], if_none_exist: writes.Condition | None = None, *,
                     transaction_id: str | None = None) -> dict[str, Any]:
        """Create (conditionally with ``if_none_exist``; a ChargeItem with its ``transaction_id``)."""
        return await self.run(writes.create(self.context, resource, if_none_exist, transaction_id))

    async def update(self, resource: Mapping[str, Any], if_match: str | int | None = None, *,
                     may_have_landed: bool = False) -> dict[str, Any]:
        """Update ``resource``; ``if_match`` is its expected ``versionId``."""
        return await self.run(writes.update(self.context, resource, if_match, may_have_landed=may_have_landed))

    async def patch(self, resource_type: str, resource_id: str, patch: writes.Patch,
                    if_match: str | int | None = None, *, validate: bool = False) -> writes.PatchResult:
        """Read, apply ``patch``, write with ``If-Match`` on the version read."""
        return await self.run(writes.patch(self.context, resource_type, resource_id, patch, if_match,
                                           validate=validate))

    async def delete(self, resource_type: str, resource_id: str, *, missing_ok: bool = False) -> bool:
        """Delete one resource; returns whether it was there."""
        return await self.run(writes.delete(self.context, resource_type, resource_id, missing_ok))

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncFhirClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
