"""The rate budget: requests per minute per API key, enforced before a request is sent.

A `limits` moving window. ``memory://`` (the default) counts within one process; any other `limits`
storage URI (``redis://host:6379/0``) shares one budget across processes and workers. Over budget,
:meth:`RateBudget.acquire` sleeps until the window frees a slot: it waits, it never fails.

The budget is keyed by the firm plus a digest of the API key (never the key itself). The sync face
(`limits.strategies`) and the async face (`limits.aio.strategies`) apply the same policy; with
``memory://`` they keep separate counters (one per event loop for the async face). Messages and logs
show a storage URI as its scheme only (:func:`shown_storage_uri`): the URI may carry a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from limits import RateLimitItem, RateLimitItemPerSecond, parse
from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from airflow_provider_modmed.client.config import ClientConfig
from airflow_provider_modmed.errors import ConfigurationError, TransportError

log = logging.getLogger("airflow_provider_modmed.client")

_NAMESPACE = "modmed"
#: the length of our per-minute window, in seconds (see :meth:`RateBudget.from_config`)
SAFETY_WINDOW_SECONDS = 61
_MIN_WAIT = 0.005

_sync_storages: dict[str, Any] = {}
_async_storages: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.Lock()


def sync_storage_uri(uri: str) -> str:
    """The synchronous form of a `limits` storage URI (drops an ``async+`` prefix)."""
    return uri[len("async+"):] if uri.startswith("async+") else uri


def async_storage_uri(uri: str) -> str:
    """The ``async+`` form of a `limits` storage URI."""
    return uri if uri.startswith("async+") else f"async+{uri}"


def shown_storage_uri(uri: str) -> str:
    """How a storage URI appears in messages and logs: its scheme only (``redis://``), never host or password."""
    return f"{sync_storage_uri(uri).split('://', 1)[0]}://"


def storage_uri_passwords(uri: str) -> set[str]:
    """The secrets a storage URI carries, for masking: the password of its user info (``redis://:pw@host``)
    and of a ``password=`` query parameter, each as written and URL-decoded."""
    try:
        parts = urlsplit(uri)
        found = {parts.password or ""}
        query = parts.query
    except ValueError:  # a netloc urllib cannot parse (e.g. a bad IPv6 literal): take the user info as is
        userinfo = uri.split("://", 1)[-1].rpartition("@")[0]
        found, query = {userinfo.partition(":")[2]}, ""
    found.update(parse_qs(query).get("password", ()))
    return {form for value in found if value for form in (value, unquote(value))}


def _storage_options(uri: str) -> dict[str, Any]:
    options: dict[str, Any] = {"wrap_exceptions": True}  # storage failures surface as StorageError
    # limits' async redis storage defaults to coredis; fall back to redis-py (the [redis] extra)
    if uri.startswith("async+") and "redis" in uri.split("://", 1)[0] \
            and importlib.util.find_spec("coredis") is None:
        options["implementation"] = "redispy"
    return options


def _unreachable(uri: str, exc: StorageError) -> TransportError:
    cause = exc.storage_error
    return TransportError(f"rate-limit storage {shown_storage_uri(uri)} is unreachable "
                          f'(extra field "rate_limit_storage_uri"): {type(cause).__name__}')


@contextlib.contextmanager
def _reachable(uri: str) -> Iterator[None]:
    """Storage failures while acquiring surface as :class:`TransportError` naming the extra field."""
    try:
        yield
    except StorageError as exc:
        raise _unreachable(uri, exc) from exc


def _build(uri: str, options: dict[str, Any]) -> Any:
    try:
        return storage_from_string(uri, **options)
    except Exception as exc:  # limits raises its own ConfigurationError, or ImportError for drivers
        detail = str(exc).replace(uri, shown_storage_uri(uri))  # limits quotes the whole URI
        for secret in storage_uri_passwords(uri):
            detail = detail.replace(secret, "***")
        raise ConfigurationError(
            f"rate_limit_storage_uri {shown_storage_uri(uri)} cannot be used "
            f'(extra field "rate_limit_storage_uri"): {type(exc).__name__}: {detail}'
        ) from None


def _sync_storage(uri: str) -> Any:
    uri = sync_storage_uri(uri)
    with _registry_lock:
        storage = _sync_storages.get(uri)
        if storage is None:
            storage = _sync_storages[uri] = _build(uri, _storage_options(uri))
        return storage


def _async_storage(uri: str) -> Any:
    uri = async_storage_uri(uri)
    loop = asyncio.get_running_loop()
    with _registry_lock:
        per_loop = _async_storages.setdefault(loop, {})
        storage = per_loop.get(uri)
        if storage is None:
            storage = per_loop[uri] = _build(uri, _storage_options(uri))
        return storage


class RateBudget:
    """A moving-window request budget shared by every client using the same key and storage.

    ``rate`` is a `limits` rate string (``"1000/minute"``, ``"5/second"``) or item. ``key`` identifies
    the budget (use :attr:`ClientConfig.budget_key`: firm + API-key digest). ``sleep``/``asleep`` and
    ``clock`` are injectable for tests.
    """

    def __init__(self, rate: str | RateLimitItem = "1000/minute", storage_uri: str = "memory://",
                 key: str = "default", *, sleep: Callable[[float], None] = time.sleep,
                 asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.item: RateLimitItem = parse(rate) if isinstance(rate, str) else rate
        self.storage_uri = storage_uri
        self.key = key
        self._sleep = sleep
        self._asleep = asleep
        self._clock = clock
        self._limiter: MovingWindowRateLimiter | None = None

    @classmethod
    def from_config(cls, config: ClientConfig, **kwargs: Any) -> RateBudget:
        """The budget of one connection: ``rate_limit_per_minute`` on ``rate_limit_storage_uri``.

        The window is :data:`SAFETY_WINDOW_SECONDS` long rather than 60: ModMed counts a call when it
        arrives and we count it when we send it, so a window a second longer than the server's keeps
        scheduling jitter from ever turning into a 429 (at most 1.6% of the budget left unused).
        """
        item = RateLimitItemPerSecond(config.rate_limit_per_minute, SAFETY_WINDOW_SECONDS)
        return cls(item, config.rate_limit_storage_uri, config.budget_key, **kwargs)

    @property
    def _ids(self) -> tuple[str, str]:
        return _NAMESPACE, self.key

    def _wait_for(self, reset_time: float) -> float:
        return min(max(reset_time - self._clock(), _MIN_WAIT), float(self.item.get_expiry()))

    def _acquiring(self, limiter: Any, sleep: Callable[[float], Any]) -> Generator[Callable[[], Any], Any, float]:
        """THE acquire loop, for both faces: yields the I/O to do (hit, window stats, sleep) as calls that
        the sync face calls and the async face awaits; returns the seconds waited."""
        waited = 0.0
        while not (yield partial(limiter.hit, self.item, *self._ids)):
            stats = yield partial(limiter.get_window_stats, self.item, *self._ids)
            delay = self._wait_for(stats.reset_time)
            if waited == 0.0:
                log.info("modmed: rate budget %s spent; waiting %.2fs", self.item, delay)
            yield partial(sleep, delay)
            waited += delay
        return waited

    def acquire(self) -> float:
        """Take one request from the budget, sleeping while it is spent. Returns the seconds waited."""
        if self._limiter is None:
            self._limiter = MovingWindowRateLimiter(_sync_storage(self.storage_uri))
        steps, out = self._acquiring(self._limiter, self._sleep), None
        with _reachable(self.storage_uri):
            while True:
                try:
                    out = steps.send(out)()
                except StopIteration as done:
                    return float(done.value)

    async def aacquire(self) -> float:
        """Async :meth:`acquire` (``limits.aio``): awaits while the budget is spent."""
        limiter = AsyncMovingWindowRateLimiter(_async_storage(self.storage_uri))
        steps, out = self._acquiring(limiter, self._asleep), None
        with _reachable(self.storage_uri):
            while True:
                try:
                    out = await steps.send(out)()
                except StopIteration as done:
                    return float(done.value)

    def __repr__(self) -> str:
        return f"RateBudget({self.item}, storage={shown_storage_uri(self.storage_uri)})"
