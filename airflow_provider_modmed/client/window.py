"""``_lastUpdated`` windows: the one implementation of strategy, query, exact containment and de-duplication.

Used by the search to NDJSON (:mod:`~airflow_provider_modmed.client.ndjson`, the search operator) and by
change detection (:mod:`~airflow_provider_modmed.client.changes`, the sensor and the triggers).

A :class:`Window` is half-open, ``[start_ms, end_ms)`` on ``meta.lastUpdated`` in epoch milliseconds
(bounds floored to the millisecond, see :mod:`~airflow_provider_modmed.client.instants`); either bound may
be open. The server is asked for a superset of it, as the track and type allow (:class:`Strategy`,
``docs/reference/modmed-api.md``), and the client then keeps exactly what lies inside:

* ``INSTANT`` (certified track): ``_lastUpdated=ge<start>&_lastUpdated=lt<end>``, millisecond instants
  with ``Z``: the query is the window itself;
* ``DAY`` (proprietary track, types documenting ``_lastUpdated``): ModMed takes only ``gt``/``eq``/``le``
  with a ``yyyy-mm-dd`` day, so the query widens to whole UTC days:
  ``_lastUpdated=gt<start's day - 1>&_lastUpdated=le<day of end - 1 ms>``. This one form serves every
  window (``eq<d>`` means the same as ``gt<d-1>&le<d>`` but cannot express an open bound); a window
  ending exactly at midnight does not ask for the next day;
* ``SCAN`` (proprietary Condition, AllergyIntolerance, MedicationStatement, DocumentReference,
  ChargeItem: no ``_lastUpdated``): no time filter; every match is read and filtered here.

A :class:`Tracker` de-duplicates by id + version: a ``(id, versionId)`` already seen, or an older
version than one seen, is not news.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import Enum
from typing import Any

import pendulum

from airflow_provider_modmed.capabilities import Capabilities, Track
from airflow_provider_modmed.client.instants import (
    InvalidInstantError,
    format_instant,
    from_epoch_ms,
    instant_ms,
    parse_bound_ms,
    utc_day,
)
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

__all__ = ["Change", "Strategy", "Tracker", "Window", "is_newer", "last_updated_ms", "strategy_for"]


class Strategy(str, Enum):
    """How the server is asked for a window (the client always filters exactly afterwards)."""

    #: ``ge<instant>&lt<instant>``, millisecond precision (certified track)
    INSTANT = "instant"
    #: ``gt<day before>&le<last day>``: whole UTC days (proprietary track)
    DAY = "day"
    #: no ``_lastUpdated`` (ModMed has none for this type): every match is read
    SCAN = "scan"

    def __str__(self) -> str:
        return self.value

    @property
    def mode(self) -> str:
        """The search operator's name for it: ``exact``, ``widened`` or ``scan``."""
        return {"instant": "exact", "day": "widened", "scan": "scan"}[self.value]


def strategy_for(track: Track | str, capabilities: Capabilities, resource_type: str,
                 forced: Strategy | str | None = None) -> Strategy:
    """The strategy for ``resource_type`` on ``track``: ``forced`` if given, else from the capability matrix.

    Raises :class:`ConfigurationError` when a time filter is forced on a proprietary type without one.
    """
    track = Track(track)
    supported = track is Track.CERTIFIED or capabilities.supports_last_updated(track, resource_type)
    if forced is not None:
        strategy = Strategy(forced)
        if strategy is not Strategy.SCAN and not supported:
            raise ConfigurationError(f"ModMed has no _lastUpdated on {resource_type} (proprietary track): use "
                                     "the scan strategy")
        return strategy
    if track is Track.CERTIFIED:
        return Strategy.INSTANT
    return Strategy.DAY if supported else Strategy.SCAN


@dataclass(frozen=True)
class Window:
    """A half-open ``[start_ms, end_ms)`` window on ``meta.lastUpdated`` (epoch ms); None is an open bound."""

    start_ms: int | None = None
    end_ms: int | None = None

    def __post_init__(self) -> None:
        if self.start_ms is not None and self.end_ms is not None and self.end_ms < self.start_ms:
            raise ConfigurationError(f"the _lastUpdated window ends ({format_instant(self.end_ms)}) before it "
                                     f"starts ({format_instant(self.start_ms)})")

    @classmethod
    def of(cls, start: str | int | float | datetime | date | None = None,
           end: str | int | float | datetime | date | None = None) -> Window | None:
        """A window from user-given bounds (lenient, :func:`~.instants.parse_bound_ms`); None when both are
        empty (``None`` or ``""``)."""
        start = start if start not in (None, "") else None
        end = end if end not in (None, "") else None
        if start is None and end is None:
            return None
        return cls(None if start is None else parse_bound_ms(start, "the window start"),
                   None if end is None else parse_bound_ms(end, "the window end"))

    @property
    def start(self) -> pendulum.DateTime | None:
        return None if self.start_ms is None else from_epoch_ms(self.start_ms)

    @property
    def end(self) -> pendulum.DateTime | None:
        return None if self.end_ms is None else from_epoch_ms(self.end_ms)

    def contains_ms(self, lu_ms: int) -> bool:
        """Whether an epoch-ms ``lastUpdated`` lies in the window."""
        return (self.start_ms is None or lu_ms >= self.start_ms) and (self.end_ms is None or lu_ms < self.end_ms)

    def contains(self, resource: Mapping[str, Any]) -> bool | None:
        """Whether the resource's ``meta.lastUpdated`` lies in the window; None when it has no valid one."""
        lu = last_updated_ms(resource)
        return None if lu is None else self.contains_ms(lu)

    def query(self, strategy: Strategy) -> list[tuple[str, str]]:
        """The ``_lastUpdated`` parameters asking the server for (a superset of) the window."""
        out: list[tuple[str, str]] = []
        if strategy is Strategy.INSTANT:
            if self.start_ms is not None:
                out.append(("_lastUpdated", f"ge{format_instant(self.start_ms)}"))
            if self.end_ms is not None:
                out.append(("_lastUpdated", f"lt{format_instant(self.end_ms)}"))
        elif strategy is Strategy.DAY:
            if self.start_ms is not None:
                out.append(("_lastUpdated", f"gt{(utc_day(self.start_ms) - timedelta(days=1)).isoformat()}"))
            if self.end_ms is not None:
                out.append(("_lastUpdated", f"le{utc_day(self.end_ms - 1).isoformat()}"))
        return out

    def describe(self) -> str:
        start = "-inf" if self.start_ms is None else format_instant(self.start_ms)
        end = "+inf" if self.end_ms is None else format_instant(self.end_ms)
        return f"[{start}, {end})"


def last_updated_ms(resource: Mapping[str, Any]) -> int | None:
    """``meta.lastUpdated`` in epoch ms (strict: an instant with a zone); None when missing or invalid."""
    meta = resource.get("meta") if isinstance(resource, Mapping) else None
    raw = meta.get("lastUpdated") if isinstance(meta, Mapping) else None
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return instant_ms(raw, "meta.lastUpdated")
    except InvalidInstantError:
        return None


# -- one observed version, and the de-duplicating tracker -----------------------------------------------

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
        """The change a resource represents; raises :class:`ModMedError` without an id or a valid
        ``meta.lastUpdated``. Without ``meta.versionId`` the version is ``@<lastUpdated ms>``."""
        rid = resource.get("id")
        raw_meta = resource.get("meta")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        rtype = resource.get("resourceType", "resource")
        if not isinstance(rid, str) or not rid:
            raise ModMedError(f"a {rtype} in the search result has no id: change detection cannot track it")
        lu = meta.get("lastUpdated")
        if not isinstance(lu, str):
            raise ModMedError(f"{rtype}/{rid} has no meta.lastUpdated: change detection cannot place it in time")
        try:
            lu_ms = instant_ms(lu, f"{rtype}/{rid} meta.lastUpdated")
        except InvalidInstantError as exc:
            raise ModMedError(f"{exc}: change detection cannot place it in time") from None
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


class Tracker:
    """Exact window filter plus de-duplication by id + version, over one read (or a chain of polls).

    :param window: changes outside it are ignored (None: no filter, the caller places resources itself)
    :param seen: ``id -> (versionId, lastUpdated_ms)`` already reported (e.g. a cursor's)
    :param report: False records what it sees without reporting it (a baseline)
    """

    def __init__(self, window: Window | None = None, seen: Mapping[str, tuple[str, int]] | None = None, *,
                 report: bool = True) -> None:
        self.window = window
        self.report = report
        self.seen: dict[str, tuple[str, int]] = dict(seen or {})
        #: the changes reported, in the order offered
        self.new: list[Change] = []
        self.max_lu: int | None = max((lu for _, lu in self.seen.values()), default=None)

    def in_window(self, lu_ms: int) -> bool:
        return self.window is None or self.window.contains_ms(lu_ms)

    def offer(self, change: Change) -> bool:
        """Record ``change``; True when it is news to report (in the window, a new id + version)."""
        if not self.in_window(change.last_updated_ms):
            return False
        prev = self.seen.get(change.id)
        if prev is not None and not is_newer(change, prev):
            return False
        self.seen[change.id] = (change.version_id, change.last_updated_ms)
        if self.max_lu is None or change.last_updated_ms > self.max_lu:
            self.max_lu = change.last_updated_ms
        if not self.report:
            return False
        self.new.append(change)
        return True
