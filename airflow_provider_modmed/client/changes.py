"""Change detection on ``meta.lastUpdated``: the Airflow-free core of sensors, triggers and watchers.

One poll is one flow (:func:`poll`), written once and driven by both faces: :func:`poll_changes` (sync:
a sensor's poke) and :func:`apoll_changes` (async: triggers and asset watchers). See
``docs/change-detection.md`` for the strategy, its cost in calls and its guarantees; in short:

* A :class:`Cursor` is the watermark: an inclusive lower bound ``low_ms`` on ``meta.lastUpdated``, an
  optional exclusive upper bound ``high_ms`` (a closed window, e.g. a data interval), and ``seen``: the
  ``id -> (versionId, lastUpdated)`` of every change already reported whose ``lastUpdated`` is at or
  after ``low_ms``. It is small JSON (it travels in trigger kwargs and state files).
* The server is asked for a superset of the window and the client keeps exactly what lies inside, de-duplicated
  by id + version: both are :mod:`~airflow_provider_modmed.client.window` (full-precision instants on the
  certified track, whole UTC days on the proprietary track, or a scan where ModMed has no ``_lastUpdated``).
* An open cursor advances to ``max(lastUpdated observed) - lookback`` (never past the client's clock
  minus ``lookback``): everything in the look-back overlap is read again and de-duplicated, so a write
  that lands late, in the same millisecond, at the boundary or behind a skewed clock is still caught.
* Paging is checked: when the server reports true totals (certified ``Bundle.total``; proprietary with
  ``Content-flag: Pagination_optimization_disabled``) a result set that shrank or moved while the poll
  was paging marks the poll inconsistent. An open cursor then keeps its lower bound (the next poll reads
  the same range again); a closed window is re-read at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.capabilities import Interaction, Track
from airflow_provider_modmed.client._flows import (
    Emit,
    FhirContext,
    Flow,
    SearchParams,
    page_size,
    pages,
    search_pairs,
    search_request,
)
from airflow_provider_modmed.client.drivers import Step
from airflow_provider_modmed.client.instants import duration_ms, format_instant, parse_bound_ms
from airflow_provider_modmed.client.window import Change, Strategy, Tracker, Window, strategy_for
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

if TYPE_CHECKING:
    from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient

__all__ = [
    "DEFAULT_LOOKBACK_SECONDS",
    "Change",
    "ChangeQuery",
    "Cursor",
    "InconsistentPagingError",
    "PollResult",
    "Strategy",
    "Tracker",
    "advance",
    "apoll_changes",
    "changes_json",
    "iter_rows",
    "paging_consistent",
    "poll",
    "poll_changes",
]

#: default look-back: covers server clock skew and commit latency (seconds)
DEFAULT_LOOKBACK_SECONDS = 120.0
#: a cursor with no history starts this far before the client's clock (plus the look-back) and records
#: what it finds there as already seen (a baseline), so a server clock behind the client's is tolerated
BASELINE_SLACK_MS = 3_600_000
#: ModMed's header that makes the proprietary track report true totals and drop `next` on the last page
EXACT_PAGING_HEADER = {"Content-flag": "Pagination_optimization_disabled"}
#: parameters the poll owns; callers may not pass them
RESERVED_PARAMS = frozenset({"_lastUpdated", "_count", "page", "_getpagesoffset", "_sort"})


class InconsistentPagingError(ModMedError):
    """A closed window's result set kept changing while it was paged; retry the poll later."""


# -- values ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cursor:
    """Where change detection stands (see the module docstring). Immutable; JSON via :meth:`to_json`."""

    low_ms: int
    high_ms: int | None = None
    seen: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    #: the next poll records what it finds as seen without reporting it (a fresh start "from now")
    baseline: bool = False

    def __post_init__(self) -> None:
        if self.high_ms is not None and self.high_ms <= self.low_ms:
            raise ConfigurationError(
                f"empty window: {format_instant(self.low_ms)} is not before {format_instant(self.high_ms)}")

    @classmethod
    def since(cls, start: str | int | datetime | date, until: str | int | datetime | date | None = None) -> Cursor:
        """Everything changed at or after ``start`` (and before ``until`` for a closed window); the bounds
        are user-given (lenient: :func:`~.instants.parse_bound_ms`)."""
        return cls(parse_bound_ms(start, "since"), None if until is None else parse_bound_ms(until, "until"))

    @classmethod
    def fresh(cls, now_ms: int, lookback_ms: int) -> Cursor:
        """A start "from now on": the first poll is a baseline (nothing reported) reaching back an hour."""
        return cls(now_ms - lookback_ms - BASELINE_SLACK_MS, baseline=True)

    @property
    def is_window(self) -> bool:
        return self.high_ms is not None

    @property
    def window(self) -> Window:
        """The ``[low_ms, high_ms)`` window this cursor covers."""
        return Window(self.low_ms, self.high_ms)

    def tracker(self) -> Tracker:
        """A tracker over this cursor's window that knows what it has seen (a baseline reports nothing)."""
        return Tracker(self.window, self.seen, report=not self.baseline)

    def after(self, tracker: Tracker, lookback_ms: int, *, now_ms: int | None = None, consistent: bool = True,
              at_least_ms: int | None = None) -> Cursor:
        """The cursor once ``tracker`` (from :meth:`tracker`) has seen a poll.

        An open cursor moves its lower bound up only after a consistent poll: to ``lookback_ms`` before the
        latest ``lastUpdated`` seen, capped by the client's clock ``now_ms`` (a record stamped far in the
        future by a wrong server clock cannot push it past writes still to come), or to ``at_least_ms``
        when the caller knows everything before it has been read.
        """
        low = self.low_ms
        if consistent and self.high_ms is None:
            if tracker.max_lu is not None:
                top = tracker.max_lu if now_ms is None else min(tracker.max_lu, now_ms)
                low = max(low, top - lookback_ms)
            if at_least_ms is not None:
                low = max(low, at_least_ms)
        return advance(Cursor(self.low_ms, self.high_ms, tracker.seen), low)

    @property
    def watermark_ms(self) -> int:
        """The latest ``lastUpdated`` reported so far (``low_ms`` when none)."""
        return max((lu for _, lu in self.seen.values()), default=self.low_ms)

    def settles_at_ms(self, lookback_ms: int) -> int | None:
        """When (client clock) a closed window can no longer gain changes: its end plus the look-back."""
        return None if self.high_ms is None else self.high_ms + lookback_ms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"low_ms": self.low_ms, "low": format_instant(self.low_ms),
                               "seen": {k: [v, lu] for k, (v, lu) in sorted(self.seen.items())}}
        if self.high_ms is not None:
            out["high_ms"] = self.high_ms
            out["high"] = format_instant(self.high_ms)
        if self.baseline:
            out["baseline"] = True
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Cursor:
        try:
            seen = {str(k): (str(v[0]), int(v[1])) for k, v in (data.get("seen") or {}).items()}
            high = data.get("high_ms")
            return cls(int(data["low_ms"]), None if high is None else int(high), seen, bool(data.get("baseline")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigurationError(f"not a change-detection cursor: {exc!r}") from None


@dataclass(frozen=True)
class ChangeQuery:
    """What to watch: a resource type, optional extra search parameters, look-back and page size."""

    resource_type: str
    params: tuple[tuple[str, str], ...] = ()
    lookback_ms: int = int(DEFAULT_LOOKBACK_SECONDS * 1000)
    page_size: int | None = None
    #: force a strategy (e.g. SCAN); None picks it from the capability matrix
    strategy: Strategy | None = None
    #: on the proprietary track, ask for true totals (saves the trailing empty page, enables the paging check)
    exact_paging: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.resource_type, str) or not self.resource_type:
            raise ConfigurationError("resource_type must be a FHIR resource type such as 'Patient'")
        if self.lookback_ms < 0:
            raise ConfigurationError("lookback must not be negative")
        if self.page_size is not None and self.page_size < 1:
            raise ConfigurationError("page_size must be a positive integer")
        bad = sorted({k.split(":")[0] for k, _ in self.params} & RESERVED_PARAMS)
        if bad:
            raise ConfigurationError(f"search parameter(s) {', '.join(bad)} are set by change detection; "
                                     "remove them from the parameters")

    @classmethod
    def build(cls, resource_type: str, params: SearchParams = None,
              *, lookback: timedelta | float = DEFAULT_LOOKBACK_SECONDS, page_size: int | None = None,
              strategy: Strategy | str | None = None, exact_paging: bool = True) -> ChangeQuery:
        """Build from friendly values: params as a mapping (list values repeat) and lookback in seconds."""
        return cls(resource_type, tuple(sorted(search_pairs(params))), duration_ms(lookback), page_size,
                   Strategy(strategy) if strategy else None, exact_paging)

    def strategy_on(self, ctx: FhirContext) -> Strategy:
        """The forced strategy, or the one the track and capability matrix give (refused where impossible)."""
        return strategy_for(ctx.track, ctx.capabilities, self.resource_type, self.strategy)

    def key(self) -> str:
        """A short stable digest of type + params (names state files and shared streams)."""
        raw = json.dumps([self.resource_type, sorted(self.params)], separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


def advance(cursor: Cursor, low_ms: int) -> Cursor:
    """``cursor`` with its lower bound raised to ``low_ms`` (never lowered) and ``seen`` pruned to match."""
    low = max(cursor.low_ms, low_ms)
    if cursor.high_ms is not None and low >= cursor.high_ms:
        raise ConfigurationError("cannot advance a closed window past its end")
    seen = {k: v for k, v in cursor.seen.items() if v[1] >= low}
    return Cursor(low, cursor.high_ms, seen, baseline=False)


# -- the poll flow ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PollResult:
    """What one poll found and cost. ``changes`` are the new versions, oldest first by ``lastUpdated``."""

    changes: tuple[Change, ...]
    cursor: Cursor
    strategy: Strategy
    #: requests the poll sent (pages, restarts included; token requests and transport retries excluded)
    calls: int
    pages: int
    #: resources the server returned (before the exact window filter)
    scanned: int
    #: False when the result set moved while paging (see the module docstring)
    consistent: bool
    restarts: int
    #: the inclusive lower bound this poll covered (for shared-stream subscribers)
    covered_from_ms: int
    #: every in-window change observed, new or not (only with ``keep_observed=True``)
    observed: tuple[Change, ...] = ()

    def summary(self) -> dict[str, Any]:
        """Small JSON for logs and events (no ids)."""
        return {"new": len(self.changes), "calls": self.calls, "pages": self.pages, "scanned": self.scanned,
                "consistent": self.consistent, "restarts": self.restarts, "strategy": self.strategy.value,
                "watermark": format_instant(self.cursor.watermark_ms)}


def poll(ctx: FhirContext, query: ChangeQuery, cursor: Cursor, *, now_ms: int | None = None,
         keep_observed: bool = False, max_restarts: int = 2) -> Flow[PollResult]:
    """One poll as a flow: yields requests, ``Emit(resource)`` for each new change; returns a :class:`PollResult`.

    Arguments and the capability matrix are checked now, before any request exists.
    """
    ctx.capabilities.check(ctx.track, query.resource_type, Interaction.SEARCH)
    ctx.capabilities.require_search_params(ctx.track, query.resource_type, (k for k, _ in query.params))
    strategy = query.strategy_on(ctx)
    pairs = [*query.params, *cursor.window.query(strategy),
             ("_count", str(page_size(ctx, query.resource_type, query.page_size)))]
    exact = ctx.track is Track.PROPRIETARY and query.exact_paging
    headers = dict(EXACT_PAGING_HEADER) if exact else {}
    # true totals: the certified track reports them; the proprietary one only with the header
    totals_are_true = exact or ctx.track is Track.CERTIFIED
    return _poll(ctx, query, cursor, strategy, pairs, headers, totals_are_true, now_ms, keep_observed,
                 max_restarts)


def _poll(ctx: FhirContext, query: ChangeQuery, cursor: Cursor, strategy: Strategy, pairs: list[tuple[str, str]],
          headers: Mapping[str, str], totals_are_true: bool, now_ms: int | None,
          keep_observed: bool, max_restarts: int) -> Flow[PollResult]:
    what = f"poll {query.resource_type} changes"
    tracker = cursor.tracker()
    observed: dict[tuple[str, str], Change] = {}
    totals: list[int] = []
    ids: set[str] = set()
    scanned = 0

    def on_page(bundle: dict[str, Any], resources: list[dict[str, Any]],
                included: list[dict[str, Any]]) -> Iterator[Step]:
        # matches only: an included resource (search.mode include) is no change of this type
        nonlocal scanned
        total = bundle.get("total")
        if totals_are_true and isinstance(total, int) and not isinstance(total, bool):
            totals.append(total)
        for resource in resources:
            change = Change.of(resource)
            scanned += 1
            ids.add(change.id)
            if keep_observed and tracker.in_window(change.last_updated_ms):
                observed[(change.id, change.version_id)] = change
            if tracker.offer(change):
                yield Emit(resource)

    calls = restarts = 0
    while True:
        totals.clear()
        ids.clear()
        request = search_request(ctx, query.resource_type, pairs, what, headers)
        calls += yield from pages(ctx, request, what, on_page, headers, resource_type=query.resource_type)
        consistent = paging_consistent(totals, len(ids))
        if consistent or cursor.high_ms is None or restarts >= max_restarts:
            break
        restarts += 1  # a closed window gets no second chance: read it again now
    if not consistent and cursor.high_ms is not None:
        raise InconsistentPagingError(
            f"{what}: the result set kept changing while it was paged ({restarts + 1} attempts); retry later")
    changes = tuple(sorted(tracker.new, key=lambda c: (c.last_updated_ms, c.id)))
    next_cursor = cursor.after(tracker, query.lookback_ms, now_ms=now_ms, consistent=consistent)
    return PollResult(changes, next_cursor, strategy, calls, calls, scanned, consistent, restarts, cursor.low_ms,
                      tuple(observed.values()))


def paging_consistent(totals: Sequence[int], distinct_ids: int) -> bool:
    """Whether a paged read saw the whole result set, judged from the true totals of its pages.

    A total that went down means something left the set (a later page shifted, so an entry may have been
    skipped); fewer distinct ids than the last total means something moved past the read position. With
    no true totals there is nothing to check.
    """
    if not totals:
        return True
    if any(later < earlier for earlier, later in itertools.pairwise(totals)):
        return False
    return distinct_ids >= totals[-1]


# -- the two faces ---------------------------------------------------------------------------------

def _capture(flow: Flow[PollResult], box: list[PollResult]) -> Generator[Any, Any, None]:
    box.append((yield from flow))


def poll_changes(client: FhirClient, query: ChangeQuery, cursor: Cursor, *,
                 on_change: Callable[[dict[str, Any]], Any] | None = None, now_ms: int | None = None,
                 keep_observed: bool = False) -> PollResult:
    """Sync face: run one poll with ``client``, handing each new changed resource to ``on_change``."""
    box: list[PollResult] = []
    flow = poll(client.context, query, cursor, now_ms=now_ms, keep_observed=keep_observed)
    for resource in client.iterate(_capture(flow, box)):
        if on_change is not None:
            on_change(resource)
    return box[0]


async def apoll_changes(client: AsyncFhirClient, query: ChangeQuery, cursor: Cursor, *,
                        on_change: Callable[[dict[str, Any]], Any] | None = None, now_ms: int | None = None,
                        keep_observed: bool = False) -> PollResult:
    """Async face of :func:`poll_changes` (triggers): the same flow, awaited I/O."""
    box: list[PollResult] = []
    flow = poll(client.context, query, cursor, now_ms=now_ms, keep_observed=keep_observed)
    resources: AsyncIterator[Any] = client.iterate(_capture(flow, box))
    async for resource in resources:
        if on_change is not None:
            on_change(resource)
    return box[0]


def changes_json(changes: Iterable[Change], limit: int | None = None) -> tuple[list[dict[str, str]], bool]:
    """``[{id, versionId, lastUpdated}]`` for XCom or events, at most ``limit``; and whether it was cut."""
    out: list[dict[str, str]] = []
    for change in changes:
        if limit is not None and len(out) >= limit:
            return out, True
        out.append(change.to_json())
    return out, False


def iter_rows(rows: Iterable[Sequence[Any]]) -> Iterator[Change]:
    """Changes from their compact ``[id, versionId, lastUpdated_ms]`` rows."""
    return (Change.from_row(r) for r in rows)
