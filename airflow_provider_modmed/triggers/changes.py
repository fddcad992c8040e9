"""Triggers for ModMed change detection: one for the deferrable sensor, one for asset watchers.

Both poll with :func:`~airflow_provider_modmed.client.changes.apoll_changes`: the same flow the
sensor's poke drives synchronously. Both yield small JSON (counts, ids, versions, instants), never
resources.

* :class:`ModMedChangesTrigger` (deferrable :class:`~airflow_provider_modmed.sensors.changes.ModMedChangesSensor`)
  carries the sensor's cursor in its kwargs, so a triggerer restart rebuilds it and polls from the same
  watermark. It fires once, when the cursor has news (or, for a closed window, once the window settled).
* :class:`ModMedChangesEventTrigger` (``AssetWatcher``) fires an event per poll that found changes. Its
  cursor lives in the watched asset's ``asset_state_store`` (Airflow 3.3). Watchers on the same
  connection, resource type, parameters and cadence share one poll loop through Airflow's shared
  streams; each applies the shared snapshots to its own cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from airflow_provider_modmed.client._flows import search_pairs
from airflow_provider_modmed.client.changes import (
    DEFAULT_LOOKBACK_SECONDS,
    Change,
    ChangeQuery,
    Cursor,
    InconsistentPagingError,
    PollResult,
    advance,
    apoll_changes,
    changes_json,
    iter_rows,
)
from airflow_provider_modmed.client.instants import format_instant, instant_ms, now_ms, parse_bound_ms
from airflow_provider_modmed.errors import ModMedError, RateLimitedError, ServerError, TransportError

if TYPE_CHECKING:
    from airflow_provider_modmed.client.fhir import AsyncFhirClient

#: errors worth another poll (the client already retried the call itself)
TRANSIENT_ERRORS: tuple[type[ModMedError], ...] = (ServerError, RateLimitedError, TransportError,
                                                   InconsistentPagingError)
DEFAULT_CONN_ID = "modmed_default"


def _pairs(search_params: Any) -> list[list[str]]:
    """Search parameters in a deterministic JSON-friendly form: sorted ``[[name, value], ...]``."""
    return [list(pair) for pair in sorted(search_pairs(search_params))]


def _query(resource_type: str, search_params: Sequence[Sequence[str]], lookback: float, page_size: int | None,
           strategy: str | None, exact_paging: bool) -> ChangeQuery:
    return ChangeQuery.build(resource_type, [(k, v) for k, v in search_params], lookback=lookback,
                             page_size=page_size, strategy=strategy, exact_paging=exact_paging)


def error_event(exc: BaseException, **extra: Any) -> dict[str, Any]:
    """The event of a failed trigger: the error's type and message (typed errors carry no data)."""
    return {"status": "error", "error": type(exc).__name__, "message": str(exc)[:2000], **extra}


def _client(conn_id: str) -> contextlib.AbstractAsyncContextManager[AsyncFhirClient]:
    """The connection's client shared by every trigger of the event loop (one pool and TLS context per
    connection, not per trigger; see :meth:`ModMedHook.shared_async_client`)."""
    from airflow_provider_modmed.hooks.modmed import ModMedHook

    return ModMedHook(conn_id).shared_async_client()


class ModMedChangesTrigger(BaseTrigger):
    """Polls until the sensor's cursor has new changes (or its closed window settled), then fires once.

    The event is ``{"status": "changed"|"empty", "count", "polls", "calls", "watermark"}`` or
    ``{"status": "error", ...}``. The sensor then collects the change set on the worker from the
    same cursor (writing resources is the worker's job, not the triggerer's).

    :param cursor: the sensor's :class:`~airflow_provider_modmed.client.changes.Cursor` as JSON
    :param not_before: ISO instant; the first poll waits until then (a closed window's settle time)
    :param max_consecutive_failures: transient poll failures in a row before the trigger gives up
    """

    def __init__(self, *, resource_type: str, cursor: dict[str, Any], modmed_conn_id: str = DEFAULT_CONN_ID,
                 search_params: Any = None, lookback: float = DEFAULT_LOOKBACK_SECONDS,
                 page_size: int | None = None, strategy: str | None = None, exact_paging: bool = True,
                 poll_interval: float = 60.0, not_before: str | None = None,
                 max_consecutive_failures: int = 5) -> None:
        super().__init__()
        self.resource_type = resource_type
        self.cursor = cursor
        self.modmed_conn_id = modmed_conn_id
        self.search_params = _pairs(search_params)
        self.lookback = float(lookback)
        self.page_size = page_size
        self.strategy = strategy
        self.exact_paging = exact_paging
        self.poll_interval = float(poll_interval)
        self.not_before = not_before
        self.max_consecutive_failures = max_consecutive_failures
        # checked now, in the worker, rather than in the triggerer
        self.query = _query(resource_type, self.search_params, self.lookback, page_size, strategy, exact_paging)
        Cursor.from_json(cursor)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "resource_type": self.resource_type, "cursor": self.cursor, "modmed_conn_id": self.modmed_conn_id,
            "search_params": self.search_params, "lookback": self.lookback, "page_size": self.page_size,
            "strategy": self.strategy, "exact_paging": self.exact_paging, "poll_interval": self.poll_interval,
            "not_before": self.not_before, "max_consecutive_failures": self.max_consecutive_failures,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if self.not_before:
            wait = (instant_ms(self.not_before, "not_before") - now_ms()) / 1000
            if wait > 0:
                self.log.info("waiting %.1fs for the window to settle", wait)
                await asyncio.sleep(wait)
        cursor = Cursor.from_json(self.cursor)
        polls = calls = failures = 0
        async with _client(self.modmed_conn_id) as client:
            while True:
                try:
                    result: PollResult = await apoll_changes(client, self.query, cursor, now_ms=now_ms())
                except TRANSIENT_ERRORS as exc:
                    failures += 1
                    if failures >= self.max_consecutive_failures:
                        yield TriggerEvent(error_event(exc, polls=polls, calls=calls))
                        return
                    self.log.warning("poll %s failed (%d in a row): %s", self.resource_type, failures, exc)
                    await asyncio.sleep(self.poll_interval)
                    continue
                except ModMedError as exc:  # configuration, capability, auth: polling again will not help
                    yield TriggerEvent(error_event(exc, polls=polls, calls=calls))
                    return
                failures = 0
                polls += 1
                calls += result.calls
                self.log.info("poll %d of %s: %s", polls, self.resource_type, json.dumps(result.summary()))
                if result.changes or cursor.is_window:
                    yield TriggerEvent({"status": "changed" if result.changes else "empty",
                                        "count": len(result.changes), "polls": polls, "calls": calls,
                                        "watermark": format_instant(result.cursor.watermark_ms)})
                    return
                cursor = result.cursor
                await asyncio.sleep(self.poll_interval)


class ModMedChangesEventTrigger(BaseEventTrigger):
    """Fires an asset event whenever resources of ``resource_type`` change (``AssetWatcher``).

    The event payload is small JSON: ``{"conn_id", "resource_type", "count", "changes": [{"id",
    "versionId", "lastUpdated"}, ...] (at most max_changes_in_event), "truncated", "from", "to",
    "calls"}``; the DAG run reads the resources itself (by id, or by the ``from``/``to`` window).

    Kwargs are the watcher's identity (Airflow hashes them): keep them deterministic. The cursor lives
    in the asset's ``asset_state_store`` (when Airflow provides one), so a triggerer restart resumes
    where it stopped; without a store the watcher starts "from now" (or from ``since``). A watcher that
    serves several assets (the same kwargs on each) keeps its cursor in the one named by ``state_asset``;
    without it the cursor stays in memory (a warning says so).

    :param since: ISO instant; with no saved cursor, report every change from then on. Default: only
        changes after the watcher's first poll.
    :param share_stream: share one poll loop with sibling watchers of the same connection, type,
        parameters and cadence (Airflow's shared streams); False gives this watcher its own loop
    :param state_asset: name of the watched asset whose state store keeps the cursor, when the watcher
        serves several assets; not needed for one
    """

    #: prefix of the asset_state_store key holding the cursor
    STATE_KEY = "modmed_changes"

    def __init__(self, *, resource_type: str, modmed_conn_id: str = DEFAULT_CONN_ID, search_params: Any = None,
                 poll_interval: float = 60.0, lookback: float = DEFAULT_LOOKBACK_SECONDS,
                 page_size: int | None = None, strategy: str | None = None, exact_paging: bool = True,
                 since: str | None = None, max_changes_in_event: int = 100, share_stream: bool = True,
                 max_consecutive_failures: int = 5, state_asset: str | None = None) -> None:
        super().__init__()
        self.state_asset = state_asset
        self.resource_type = resource_type
        self.modmed_conn_id = modmed_conn_id
        self.search_params = _pairs(search_params)
        self.poll_interval = float(poll_interval)
        self.lookback = float(lookback)
        self.page_size = page_size
        self.strategy = strategy
        self.exact_paging = exact_paging
        self.since = since
        self.max_changes_in_event = max_changes_in_event
        self.share_stream = share_stream
        self.max_consecutive_failures = max_consecutive_failures
        self.query = _query(resource_type, self.search_params, self.lookback, page_size, strategy, exact_paging)
        if since is not None:
            parse_bound_ms(since, "since")

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "resource_type": self.resource_type, "modmed_conn_id": self.modmed_conn_id,
            "search_params": self.search_params, "poll_interval": self.poll_interval, "lookback": self.lookback,
            "page_size": self.page_size, "strategy": self.strategy, "exact_paging": self.exact_paging,
            "since": self.since, "max_changes_in_event": self.max_changes_in_event,
            "share_stream": self.share_stream, "max_consecutive_failures": self.max_consecutive_failures,
            "state_asset": self.state_asset,
        })

    # -- the shared poll loop -----------------------------------------------------------------------
    def shared_stream_key(self) -> Hashable | None:
        """Watchers that would send the same requests at the same cadence share one loop."""
        if not self.share_stream:
            return None
        return ("modmed-changes", self.modmed_conn_id, self.resource_type, self.query.key(), self.poll_interval,
                self.lookback, self.page_size, self.strategy, self.exact_paging, self.max_consecutive_failures)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Poll forever from a fresh cursor, yielding every in-window change of each poll as a snapshot.

        A snapshot is ``{"covered_from_ms", "next_low_ms", "observed": [[id, versionId, lastUpdated_ms]],
        "consistent", "calls", "poll"}``. Uses only the fields of :meth:`shared_stream_key`.
        """
        query = _query(kwargs["resource_type"], kwargs.get("search_params") or [], kwargs.get("lookback",
                       DEFAULT_LOOKBACK_SECONDS), kwargs.get("page_size"), kwargs.get("strategy"),
                       kwargs.get("exact_paging", True))
        interval = float(kwargs.get("poll_interval", 60.0))
        max_failures = int(kwargs.get("max_consecutive_failures", 5))
        async with _client(kwargs.get("modmed_conn_id", DEFAULT_CONN_ID)) as client:
            cursor = Cursor.fresh(now_ms(), query.lookback_ms)
            polls = failures = 0
            while True:
                try:
                    result = await apoll_changes(client, query, cursor, now_ms=now_ms(), keep_observed=True)
                except TRANSIENT_ERRORS:
                    failures += 1
                    if failures >= max_failures:
                        raise
                    await asyncio.sleep(interval)
                    continue
                failures = 0
                polls += 1
                cursor = result.cursor
                yield {"covered_from_ms": result.covered_from_ms, "next_low_ms": cursor.low_ms,
                       "observed": [c.to_row() for c in result.observed], "consistent": result.consistent,
                       "calls": result.calls, "poll": polls}
                await asyncio.sleep(interval)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """Apply each snapshot to this watcher's own cursor; fire when it holds news.

        A watcher whose cursor starts before the snapshot's coverage (it resumed from its state store
        after a pause, or has ``since``) first catches up with a poll of its own.
        """
        cursor = await self._load_cursor()
        client: AsyncFhirClient | None = None
        unsaved: Cursor | None = None
        async with contextlib.AsyncExitStack() as held:  # the catch-up client, taken when first needed
            async for snapshot in shared_stream:
                if unsaved is not None:  # saved one poll after its event went out: repeat rather than lose
                    await self._save_cursor(unsaved)
                    unsaved = None
                now = now_ms()
                covered = int(snapshot["covered_from_ms"])
                next_low = int(snapshot["next_low_ms"])
                calls = int(snapshot.get("calls", 0))
                if cursor is None:  # fresh watcher, nothing to catch up: this snapshot is the baseline
                    cursor = Cursor(covered, baseline=True)
                if covered > cursor.low_ms:
                    if client is None:
                        client = await held.enter_async_context(_client(self.modmed_conn_id))
                    result = await apoll_changes(client, self.query, cursor, now_ms=now)
                    new = list(result.changes)
                    calls += result.calls
                    cursor = advance(result.cursor, next_low) if result.consistent else result.cursor
                    self.log.info("caught up from %s: %s", format_instant(result.covered_from_ms),
                                  json.dumps(result.summary()))
                else:
                    was_baseline = cursor.baseline
                    tracker = cursor.tracker()
                    for change in iter_rows(snapshot["observed"]):
                        tracker.offer(change)
                    new = sorted(tracker.new, key=lambda c: (c.last_updated_ms, c.id))
                    cursor = cursor.after(tracker, self.query.lookback_ms, now_ms=now,
                                          consistent=bool(snapshot["consistent"]), at_least_ms=next_low)
                    if was_baseline:
                        unsaved = cursor
                if new:
                    yield TriggerEvent(self._payload(new, calls, shared=self.shared_stream_key() is not None))
                    unsaved = cursor
        # an unsaved cursor is dropped on purpose at exit: its event may not be stored yet, and repeating
        # an event after a restart is better than losing one

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Standalone loop (no shared-stream manager, or ``share_stream=False``): same code, own poll."""
        async for event in self.filter_shared_stream(type(self).open_shared_stream(self.serialize()[1])):
            yield event

    # -- events and state ---------------------------------------------------------------------------
    def _payload(self, new: list[Change], calls: int, shared: bool) -> dict[str, Any]:
        listed, truncated = changes_json(new, self.max_changes_in_event)
        return {"conn_id": self.modmed_conn_id, "resource_type": self.resource_type, "count": len(new),
                "changes": listed, "truncated": truncated, "from": new[0].last_updated,
                "to": new[-1].last_updated, "calls": calls, "shared": shared}

    @property
    def state_key(self) -> str:
        return f"{self.STATE_KEY}.{self.modmed_conn_id}.{self.resource_type}.{self.query.key()}"

    def _state(self) -> Any:
        """The state store holding the cursor, through Airflow's public API: the store itself for one
        watched asset, ``store[Asset.ref(name=state_asset)]`` for several; None without a store."""
        store = self.asset_state_store
        if store is None or not self.state_asset:
            return store
        from airflow.sdk import Asset

        return store[Asset.ref(name=self.state_asset)]

    def _without_store(self, exc: ValueError) -> None:
        """Several watched assets and no ``state_asset``: keep the cursor in memory from now on."""
        self.log.warning("the cursor is kept in memory only (a triggerer restart starts afresh): %s; pass "
                         "state_asset=<name of one watched asset> to keep it in that asset's state store", exc)
        self.asset_state_store = None

    async def _load_cursor(self) -> Cursor | None:
        state = self._state()
        try:
            saved = await state.aget(self.state_key, None) if state is not None else None
        except ValueError as exc:
            self._without_store(exc)
            saved = None
        if isinstance(saved, dict):
            self.log.info("resuming from the saved cursor (low %s)", saved.get("low"))
            return Cursor.from_json(saved)
        return Cursor.since(self.since) if self.since else None

    async def _save_cursor(self, cursor: Cursor) -> None:
        state = self._state()
        try:
            if state is not None:
                await state.aset(self.state_key, cursor.to_json())
        except ValueError as exc:
            self._without_store(exc)
