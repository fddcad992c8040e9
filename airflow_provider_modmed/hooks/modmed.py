"""ModMedHook: one Airflow connection per practice and track -> a configured ModMed FHIR client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from functools import cached_property
from typing import Any

import httpx
from airflow.sdk import BaseHook
from limits.errors import StorageError

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import AsyncFhirClient, ClientConfig, FhirClient
from airflow_provider_modmed.client.config import is_loopback
from airflow_provider_modmed.client.limiter import storage_uri_passwords
from airflow_provider_modmed.connection_form import CONN_FIELDS, CONN_TYPE, HOOK_NAME, HOST_LABEL
from airflow_provider_modmed.errors import (
    AuthError,
    ConfigurationError,
    ForbiddenError,
    ModMedError,
    TransportError,
)
from airflow_provider_modmed.hooks.connection import config_from_connection


def _mask(config: ClientConfig) -> None:
    """Register the connection's secrets with Airflow's masker (a PEM key line by line too, and the password
    inside the rate-limit storage URI and the proxy URL, as written there and decoded)."""
    from airflow.sdk.log import mask_secret

    for value in (config.api_key, config.password, config.client_secret, config.private_key,
                  *sorted(storage_uri_passwords(config.rate_limit_storage_uri)),
                  *sorted(storage_uri_passwords(config.proxy or ""))):
        if value:
            mask_secret(value)
    if config.private_key:
        for line in config.private_key.splitlines():
            if len(line) > 8 and "PRIVATE KEY" not in line:
                mask_secret(line)


@dataclasses.dataclass(eq=False)
class _SharedClient:
    """One shared async client and how many users hold it (see :meth:`ModMedHook.shared_async_client`)."""

    config: ClientConfig
    client: AsyncFhirClient
    users: int = 0


#: per event loop: connection id -> the shared clients in use (one per configuration of that connection)
_shared_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, list[_SharedClient]]] = (
    weakref.WeakKeyDictionary())


class ModMedHook(BaseHook):
    """Talks to one ModMed practice on one API track, configured by an Airflow connection.

    The connection's Extra holds ``track``, ``environment``, ``firm_url_prefix``, ``auth_method``,
    ``api_key``, ``client_id``, ``client_secret``, ``private_key``, ``key_id``, ``jwt_algorithm``,
    ``scope``, ``token_url``, ``rate_limit_per_minute``, ``rate_limit_storage_uri``,
    ``rate_limit_storage_password``, ``timeout``, ``proxy``, ``proxy_password`` and ``ca_bundle``;
    ``login``/``password`` are the password-grant username and password and ``host`` a custom base URL.

    :param modmed_conn_id: the connection id (one per practice and track)
    :param config_overrides: values that win over the connection's (e.g. ``rate_limit_per_minute``)
    """

    conn_name_attr = "modmed_conn_id"
    default_conn_name = "modmed_default"
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, modmed_conn_id: str = default_conn_name, **config_overrides: Any) -> None:
        super().__init__()
        self.modmed_conn_id = modmed_conn_id
        self.config_overrides = config_overrides
        self._client: FhirClient | None = None

    # -- configuration ----------------------------------------------------------------------------
    @staticmethod
    def _config_of(conn: Any, extra: Mapping[str, Any], overrides: Mapping[str, Any]) -> ClientConfig:
        config = config_from_connection(host=conn.host, port=conn.port, login=conn.login, password=conn.password,
                                        extra=extra, **overrides)
        _mask(config)
        return config

    @cached_property
    def config(self) -> ClientConfig:
        """The validated client configuration (reads the connection once)."""
        conn = self.get_connection(self.modmed_conn_id)
        return self._config_of(conn, conn.extra_dejson, self.config_overrides)

    async def aget_config(self) -> ClientConfig:
        """The configuration read with Airflow's async connection API (for triggers)."""
        conn = await self.aget_connection(self.modmed_conn_id)
        extra_attr = getattr(conn, "aextra_dejson", None)
        extra = await extra_attr() if callable(extra_attr) else conn.extra_dejson
        return self._config_of(conn, extra, self.config_overrides)

    @property
    def track(self) -> Track:
        return self.config.resolved_track

    @property
    def targets_loopback(self) -> bool:
        """True when the connection points at a loopback host (e.g. the modmed-sandbox); no network call."""
        return is_loopback(httpx.URL(self.config.fhir_base).host)

    # -- clients ----------------------------------------------------------------------------------
    def get_conn(self) -> FhirClient:
        """The synchronous client of this connection (created once, closed by :meth:`close`)."""
        if self._client is None:
            self._client = FhirClient(self.config)
        return self._client

    async def get_async_client(self) -> AsyncFhirClient:
        """A new async client (callers close it with ``aclose()`` or ``async with``)."""
        return AsyncFhirClient(await self.aget_config())

    @contextlib.asynccontextmanager
    async def shared_async_client(self) -> AsyncIterator[AsyncFhirClient]:
        """The async client of this connection shared within the running event loop (``async with``).

        Every user of the same connection and configuration in one event loop (the triggers of a
        triggerer) gets the same :class:`AsyncFhirClient`: one httpx connection pool and one TLS context
        per connection instead of one per trigger. The client is closed when its last user leaves; a
        connection edited meanwhile gets a new client for new users (the old one serves its users out).
        Users must not close it themselves.
        """
        config = await self.aget_config()
        per_conn = _shared_clients.setdefault(asyncio.get_running_loop(), {})
        entries = per_conn.setdefault(self.modmed_conn_id, [])
        entry = next((e for e in entries if e.config == config), None)
        if entry is None:
            entry = _SharedClient(config, AsyncFhirClient(config))
            entries.append(entry)
        entry.users += 1
        try:
            yield entry.client
        finally:
            entry.users -= 1
            if entry.users == 0:
                entries.remove(entry)
                if not entries and per_conn.get(self.modmed_conn_id) is entries:
                    del per_conn[self.modmed_conn_id]
                await entry.client.aclose()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- conveniences (thin: the client does the work) ---------------------------------------------
    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return self.get_conn().read(resource_type, resource_id)

    def search(self, resource_type: str, params: Any = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return self.get_conn().search(resource_type, params, **kwargs)

    def create(self, resource: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self.get_conn().create(resource, **kwargs)

    def update(self, resource: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        return self.get_conn().update(resource, **kwargs)

    def delete(self, resource_type: str, resource_id: str) -> None:
        self.get_conn().delete(resource_type, resource_id)

    # -- the UI's Test button and `airflow connections test` ---------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        """Authenticate and make one cheap call; say what failed in terms the user can act on."""
        started = time.monotonic()
        try:
            config = self.config
        except ModMedError as exc:
            return False, f"Connection is misconfigured: {exc}"
        where = f"ModMed {config.resolved_track.value} API for firm {config.firm!r} at {config.fhir_base}"
        try:
            # one quick retry at most: the Test button should answer in seconds, not minutes
            with FhirClient(dataclasses.replace(config, max_retries=min(config.max_retries, 1))) as client:
                first = next(iter(client.search("Patient", count=1)), None)
        except ModMedError as exc:
            return False, _failure(config, where, exc)
        elapsed = (time.monotonic() - started) * 1000
        found = "a Patient" if first is not None else "no Patient"
        return True, f"Connected to {where}: authenticated and searched Patient ({found}) in {elapsed:.0f} ms"


def _field(name: str) -> str:
    """A connection field as the user finds it: its Extra key and its label in the form."""
    return f"{name} ({CONN_FIELDS[name]['label']!r})"


def _failure(config: ClientConfig, where: str, exc: ModMedError) -> str:
    """The Test button's message for a failed test: what happened, and which field to look at."""
    if isinstance(exc, TransportError) and isinstance(exc.__cause__, StorageError):
        return (f"The rate-limit storage is unreachable, so {where} was not called: check "
                f"{_field('rate_limit_storage_uri')} (start that Redis, correct the URI, or use memory://). {exc}")
    if exc.status_code == 404:
        if isinstance(exc, AuthError) and config.token_url:
            return (f"The token endpoint of {where} answered 404 Not Found: check {_field('token_url')}. {exc}")
        return (f"{where} answered 404 Not Found: ModMed knows no practice with {_field('firm_url_prefix')} "
                f"{config.firm!r} there. Use the prefix ModMed handed you with the API key for this practice, and "
                f"check {_field('environment')} or host ({HOST_LABEL!r}). {exc}")
    if isinstance(exc, ConfigurationError):
        return f"Connection is misconfigured: {exc}"
    if isinstance(exc, ForbiddenError):
        hint = (f"the API key ({_field('api_key')}) was refused" if config.resolved_track is Track.PROPRIETARY
                else "the client lacks a scope or the practice has not enabled it (consent)")
        return f"Forbidden (403) by {where}: {hint}. {exc}"
    if isinstance(exc, AuthError):
        return (f"Authentication failed against {where}: check the {config.resolved_auth_method.value} "
                f"credentials. {exc}")
    if isinstance(exc, TransportError):
        return f"Could not reach {where} (DNS, TLS, refused connection or timeout): {exc}"
    return f"{where} answered an error: {exc}"
