"""Change detection on ``meta.lastUpdated``: the Airflow-free core of sensors, triggers and watchers.

One poll is one flow (:func:`poll`), written once and driven by both faces: :func:`poll_changes` (sync:
a sensor's poke) and :func:`apoll_changes` (async: triggers and asset watchers). See
``docs/change-detection.md`` for the strategy, its cost in calls and its guarantees; in short:

* A :class:`Cursor` is the watermark: an inclusive lower bound ``low_ms`` on ``meta.lastUpdated``, an
  optional exclusive upper bound ``high_ms`` (a closed window, e.g. a data interval), and ``seen``: the
  ``id -> (versionId, lastUpdated)`` of every change already reported whose ``lastUpdated`` is at or
  after ``low_ms``. It is small JSON (it travels in trigger kwargs and state files).
* The server is asked for a superset of the window (:class:`Strategy`): full-precision instants on the
  certified track, whole UTC days on the proprietary track (``gt``/``le`` + ``yyyy-mm-dd`` only), or no
  time filter at all where ModMed has no ``_lastUpdated`` (a scan). The client then filters exactly on
  ``meta.lastUpdated`` and drops what ``seen`` already holds: a change is a new ``(id, versionId)``.
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
import re
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any

import httpx

from airflow_provider_modmed.capabilities import Interaction, Track
from airflow_provider_modmed.client._flows import (
    ACCEPT_FHIR,
    Emit,
    FhirContext,
    Flow,
    expect,
    next_page_request,
    resource_url,
)
from airflow_provider_modmed.client.retry import WHAT
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

if TYPE_CHECKING:
    from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient

#: default look-back: covers server clock skew and commit latency (seconds)
DEFAULT_LOOKBACK_SECONDS = 120.0
#: a cursor with no history starts this far before the client's clock (plus the look-back) and records
#: what it finds there as already seen (a baseline), so a server clock behind the client's is tolerated
BASELINE_SLACK_MS = 3_600_000
#: ModMed's header that makes the proprietary track report true totals and drop `next` on the last page
EXACT_PAGING_HEADER = {"Content-flag": "Pagination_optimization_disabled"}
#: parameters the poll owns; callers may not pass them
RESERVED_PARAMS = frozenset({"_lastUpdated", "_count", "page", "_getpagesoffset", "_sort"})

_DAY_MS = 86_400_000


class Strategy(str, Enum):
    """How a poll asks the server for the window (the client always filters exactly afterwards)."""

    #: ``_lastUpdated=ge<instant>[&lt<instant>]``, millisecond precision (certified track)
    INSTANT = "instant"
    #: ``_lastUpdated=gt<day before>[&le<last day>]`` or ``eq<day>``: whole UTC days (proprietary track)
    DAY = "day"
    #: no ``_lastUpdated`` (ModMed refuses it for this type): every poll reads the whole result set
    SCAN = "scan"

    def __str__(self) -> str:
        return self.value


class InconsistentPagingError(ModMedError):
    """A closed window's result set kept changing while it was paged; retry the poll later."""


# -- time ------------------------------------------------------------------------------------------

_INSTANT_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?\s*(Z|z|[+-]\d{2}:?\d{2})?$")


def parse_instant_ms(value: str | int | float | datetime | date) -> int:
    """A FHIR instant (any offset, any number of fraction digits), a date, a datetime or epoch ms -> epoch ms.

    Sub-millisecond digits are truncated (floored), which keeps inclusive lower bounds exact. A value
    without an offset is taken as UTC.
    """
    if isinstance(value, bool):
        raise ConfigurationError(f"not an instant: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, datetime):
        dt = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return _floor_ms(dt)
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()) * 1000
    if not isinstance(value, str):
        raise ConfigurationError(f"not an instant: {type(value).__name__}")
    match = _INSTANT_RE.match(value.strip())
    if not match:
        raise ConfigurationError(f"not a FHIR instant: {value[:40]!r}")
    day, hh, mm, ss, frac, tz = match.groups()
    micros = int(((frac or "") + "000000")[:6])
    text = f"{day}T{hh or '00'}:{mm or '00'}:{ss or '00'}.{micros:06d}"
    if tz and tz not in ("Z", "z"):
        text += tz if ":" in tz else f"{tz[:3]}:{tz[3:]}"
    else:
        text += "+00:00"
    try:
        return _floor_ms(datetime.fromisoformat(text))
    except ValueError:
        raise ConfigurationError(f"not a FHIR instant: {value[:40]!r}") from None


def _floor_ms(dt: datetime) -> int:
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def format_instant(ms: int) -> str:
    """Epoch ms -> FHIR instant with millisecond precision in UTC (``2026-05-04T10:11:12.345Z``)."""
    dt = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ms)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def utc_day(ms: int) -> date:
    """The UTC calendar day an epoch-ms instant falls on."""
    return date(1970, 1, 1) + timedelta(days=ms // _DAY_MS)


def to_ms(value: timedelta | float | int) -> int:
    """A duration (timedelta or seconds) -> milliseconds."""
    if isinstance(value, timedelta):
        return int(value.total_seconds() * 1000)
    return int(float(value) * 1000)


# -- values ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One observed version of one resource: what change detection reports (never the resource)."""

    id: str
    version_id: str
    last_updated_ms: int

    @property
    def last_updated(self) -> str:
        return format_instant(self.last_updated_ms)

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "versionId": self.version_id, "lastUpdated": self.last_updated}

    def to_row(self) -> list[Any]:
        """Compact form for streams: ``[id, versionId, lastUpdated_ms]``."""
        return [self.id, self.version_id, self.last_updated_ms]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Change:
        return cls(str(row[0]), str(row[1]), int(row[2]))

    @classmethod
    def of(cls, resource: Mapping[str, Any]) -> Change:
        """The change a resource represents; raises :class:`ModMedError` without id or ``meta.lastUpdated``."""
        rid = resource.get("id")
        raw_meta = resource.get("meta")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        rtype = resource.get("resourceType", "resource")
        if not isinstance(rid, str) or not rid:
            raise ModMedError(f"a {rtype} in the search result has no id: change detection cannot track it")
        lu = meta.get("lastUpdated")
        if not isinstance(lu, str):
            raise ModMedError(f"{rtype}/{rid} has no meta.lastUpdated: change detection cannot place it in time")
        lu_ms = parse_instant_ms(lu)
        version = meta.get("versionId")
        return cls(rid, str(version) if version not in (None, "") else f"@{lu_ms}", lu_ms)


def is_newer(change: Change, seen: tuple[str, int]) -> bool:
    """Whether ``change`` is a version not yet reported, given the ``(versionId, lastUpdated)`` seen."""
    version, lu = seen
    if change.version_id == version:
        return False
    if change.version_id.isdigit() and version.isdigit():
        return int(change.version_id) > int(version)  # a stale replica's older version is not news
    return change.last_updated_ms >= lu


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
    def since(cls, start: str | int | datetime, until: str | int | datetime | None = None) -> Cursor:
        """Everything changed at or after ``start`` (and before ``until`` for a closed window)."""
        return cls(parse_instant_ms(start), None if until is None else parse_instant_ms(until))

    @classmethod
    def fresh(cls, now_ms: int, lookback_ms: int) -> Cursor:
        """A start "from now on": the first poll is a baseline (nothing reported) reaching back an hour."""
        return cls(now_ms - lookback_ms - BASELINE_SLACK_MS, baseline=True)

    @property
    def is_window(self) -> bool:
        return self.high_ms is not None

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
    def build(cls, resource_type: str, params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
              *, lookback: timedelta | float = DEFAULT_LOOKBACK_SECONDS, page_size: int | None = None,
              strategy: Strategy | str | None = None, exact_paging: bool = True) -> ChangeQuery:
        """Build from friendly values: params as a mapping (list values repeat) and lookback in seconds."""
        return cls(resource_type, normalize_params(params), to_ms(lookback), page_size,
                   Strategy(strategy) if strategy else None, exact_paging)

    def strategy_on(self, ctx: FhirContext) -> Strategy:
        if self.strategy is not None:
            return self.strategy
        if ctx.track is Track.CERTIFIED:
            return Strategy.INSTANT
        if ctx.capabilities.supports_last_updated(ctx.track, self.resource_type):
            return Strategy.DAY
        return Strategy.SCAN

    def key(self) -> str:
        """A short stable digest of type + params (names state files and shared streams)."""
        raw = json.dumps([self.resource_type, sorted(self.params)], separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


def normalize_params(params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, str], ...]:
    """Search parameters as a sorted tuple of string pairs (list values become repeated pairs)."""
    items = params.items() if isinstance(params, Mapping) else (params or ())
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        pairs.extend((str(key), str(v)) for v in values if v is not None)
    return tuple(sorted(pairs))


def last_updated_params(strategy: Strategy, cursor: Cursor) -> list[tuple[str, str]]:
    """The ``_lastUpdated`` search parameters that ask the server for (a superset of) the cursor's window."""
    if strategy is Strategy.SCAN:
        return []
    if strategy is Strategy.INSTANT:
        out = [("_lastUpdated", f"ge{format_instant(cursor.low_ms)}")]
        if cursor.high_ms is not None:
            out.append(("_lastUpdated", f"lt{format_instant(cursor.high_ms)}"))
        return out
    first = utc_day(cursor.low_ms)
    if cursor.high_ms is None:
        return [("_lastUpdated", f"gt{(first - timedelta(days=1)).isoformat()}")]
    last = utc_day(cursor.high_ms - 1)
    if last == first:
        return [("_lastUpdated", f"eq{first.isoformat()}")]
    return [("_lastUpdated", f"gt{(first - timedelta(days=1)).isoformat()}"), ("_lastUpdated", f"le{last.isoformat()}")]


# -- the de-duplicating tracker (shared by polls and shared-stream subscribers) -----------------------

class Tracker:
    """Applies observed changes to a cursor: exact window filter, de-duplication, then the next cursor.

    :param now_ms: the client's clock; an open cursor never advances past ``now_ms - lookback`` (a
        record stamped far in the future by a wrong server clock cannot push the watermark past writes
        still to come). ``None``: no such cap.
    """

    def __init__(self, cursor: Cursor, lookback_ms: int, now_ms: int | None = None) -> None:
        self.cursor = cursor
        self.lookback_ms = lookback_ms
        self.now_ms = now_ms
        self.seen: dict[str, tuple[str, int]] = dict(cursor.seen)
        self.new: list[Change] = []
        self.max_lu: int | None = max((lu for _, lu in cursor.seen.values()), default=None)

    def in_window(self, lu_ms: int) -> bool:
        return lu_ms >= self.cursor.low_ms and (self.cursor.high_ms is None or lu_ms < self.cursor.high_ms)

    def offer(self, change: Change) -> bool:
        """Record ``change``; True when it is news to report."""
        if not self.in_window(change.last_updated_ms):
            return False
        prev = self.seen.get(change.id)
        if prev is not None and not is_newer(change, prev):
            return False
        self.seen[change.id] = (change.version_id, change.last_updated_ms)
        if self.max_lu is None or change.last_updated_ms > self.max_lu:
            self.max_lu = change.last_updated_ms
        if self.cursor.baseline:
            return False
        self.new.append(change)
        return True

    def next_cursor(self, consistent: bool = True, at_least_ms: int | None = None) -> Cursor:
        """The cursor after this poll. An open cursor moves its lower bound up only after a consistent
        poll: to ``lookback`` before the latest ``lastUpdated`` seen (capped by the client's clock), or to
        ``at_least_ms`` when the caller knows everything before it has been read."""
        low = self.cursor.low_ms
        if consistent and self.cursor.high_ms is None:
            if self.max_lu is not None:
                top = self.max_lu if self.now_ms is None else min(self.max_lu, self.now_ms)
                low = max(low, top - self.lookback_ms)
            if at_least_ms is not None:
                low = max(low, at_least_ms)
        return advance(Cursor(self.cursor.low_ms, self.cursor.high_ms, self.seen), low)


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
    spec = ctx.capabilities.spec(query.resource_type)
    if ctx.track is Track.PROPRIETARY and spec is not None:
        missing = [p for p in spec.required_search_params if not any(k.split(":")[0] == p for k, _ in query.params)]
        if missing:
            raise ConfigurationError(f"ModMed requires search parameter(s) {', '.join(missing)} on "
                                     f"{query.resource_type}")
    strategy = query.strategy_on(ctx)
    if strategy is not Strategy.SCAN and ctx.track is Track.PROPRIETARY \
            and not ctx.capabilities.supports_last_updated(ctx.track, query.resource_type):
        raise ConfigurationError(f"ModMed has no _lastUpdated on {query.resource_type} (proprietary track): "
                                 "use the scan strategy")
    maximum = ctx.capabilities.max_count(ctx.track, query.resource_type)
    page_size = min(query.page_size, maximum) if query.page_size else maximum
    pairs = [*query.params, *last_updated_params(strategy, cursor), ("_count", str(page_size))]
    exact = ctx.track is Track.PROPRIETARY and query.exact_paging
    headers = dict(EXACT_PAGING_HEADER) if exact else {}
    # true totals: the certified track reports them; the proprietary one only with the header
    totals_are_true = exact or ctx.track is Track.CERTIFIED
    what = f"poll {query.resource_type} changes"
    url = httpx.URL(resource_url(ctx, query.resource_type), params=pairs)
    return _poll(ctx, query, cursor, strategy, url, headers, what, totals_are_true, now_ms, keep_observed,
                 max_restarts)


def _poll(ctx: FhirContext, query: ChangeQuery, cursor: Cursor, strategy: Strategy, url: httpx.URL,
          headers: Mapping[str, str], what: str, totals_are_true: bool, now_ms: int | None,
          keep_observed: bool, max_restarts: int) -> Flow[PollResult]:
    tracker = Tracker(cursor, query.lookback_ms, now_ms)
    observed: dict[tuple[str, str], Change] = {}
    calls = pages = scanned = restarts = 0
    while True:
        request = httpx.Request("GET", url, headers={**ACCEPT_FHIR, **headers}, extensions={WHAT: what})
        visited: set[str] = set()
        totals: list[int] = []
        ids: set[str] = set()
        while True:
            visited.add(str(request.url))
            response = yield request
            calls += 1
            bundle = expect(response, (200,), what)
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise ModMedError(f"{what} answered no Bundle", status_code=response.status_code)
            pages += 1
            total = bundle.get("total")
            if totals_are_true and isinstance(total, int) and not isinstance(total, bool):
                totals.append(total)
            entries = [e for e in bundle.get("entry") or () if isinstance(e, Mapping)
                       and isinstance(e.get("resource"), dict) and (e.get("search") or {}).get("mode") != "outcome"]
            for entry in entries:
                resource = entry["resource"]
                change = Change.of(resource)
                scanned += 1
                ids.add(change.id)
                if keep_observed and tracker.in_window(change.last_updated_ms):
                    observed[(change.id, change.version_id)] = change
                if tracker.offer(change):
                    yield Emit(resource)
            if not entries:
                break
            following = next_page_request(bundle, ctx.base, headers)
            if following is None or str(following.url) in visited:
                break
            following.extensions[WHAT] = what
            request = following
        consistent = paging_consistent(totals, len(ids))
        if consistent or cursor.high_ms is None or restarts >= max_restarts:
            break
        restarts += 1  # a closed window gets no second chance: read it again now
    if not consistent and cursor.high_ms is not None:
        raise InconsistentPagingError(
            f"{what}: the result set kept changing while it was paged ({restarts + 1} attempts); retry later")
    changes = tuple(sorted(tracker.new, key=lambda c: (c.last_updated_ms, c.id)))
    return PollResult(changes, tracker.next_cursor(consistent), strategy, calls, pages, scanned, consistent,
                      restarts, cursor.low_ms, tuple(observed.values()))


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
