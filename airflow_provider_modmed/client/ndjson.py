"""Search results streamed to an NDJSON file in constant memory, with an exact ``_lastUpdated`` window.

Airflow-free: the file is anything with ``open(mode)`` (``pathlib.Path``, Airflow's ``ObjectStoragePath``,
a ``UPath``). One resource is held at a time; what grows is the set of ids seen (for de-duplication)
and the capped list of ids returned.

The ``_lastUpdated`` window ``[start, end)`` is sent as each track allows, then enforced exactly on
``meta.lastUpdated``:

* certified track: ``_lastUpdated=ge<start>&_lastUpdated=lt<end>`` at full precision (mode ``exact``);
* proprietary track, types documenting ``_lastUpdated``: only ``gt``/``eq``/``le`` with a ``yyyy-mm-dd``
  day, so the query is widened to whole (UTC) days, ``gt<start day - 1>&le<end day>``, and the rows
  outside the window are dropped here (mode ``widened``);
* proprietary track, types without ``_lastUpdated`` (Condition, AllergyIntolerance, MedicationStatement,
  DocumentReference, ChargeItem): every match is read and filtered here (mode ``scan``).

Resources without ``meta.lastUpdated`` cannot be placed in a window: they are kept (never lose data)
and counted as ``undated``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Protocol

from airflow_provider_modmed.capabilities import Capabilities, Track
from airflow_provider_modmed.errors import ConfigurationError

__all__ = [
    "DEFAULT_MAX_IDS",
    "ExportResult",
    "LastUpdatedWindow",
    "parse_instant",
    "prepare_parent",
    "search_to_ndjson",
    "write_ndjson",
]

log = logging.getLogger("airflow_provider_modmed.client")

#: ids listed in a result at most (the count is always exact)
DEFAULT_MAX_IDS = 10_000

Params = Mapping[str, Any] | Sequence[tuple[str, Any]] | str | None


class _Openable(Protocol):
    def open(self, mode: str = ..., *args: Any, **kwargs: Any) -> Any: ...


def parse_instant(value: Any) -> datetime:
    """A timezone-aware UTC datetime from a datetime (naive = UTC), an ISO 8601 string or a date."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            import pendulum

            try:
                parsed = pendulum.parse(text)
            except ValueError:  # pendulum's ParserError is a ValueError
                raise ConfigurationError(f"{value!r} is not an ISO 8601 date-time") from None
            if not isinstance(parsed, datetime):
                raise ConfigurationError(f"{value!r} is not an ISO 8601 date-time") from None
            dt = parsed
    else:
        raise ConfigurationError(f"expected a date-time, got {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _iso_ms(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class LastUpdatedWindow:
    """A half-open ``[start, end)`` window on ``meta.lastUpdated``; either bound may be open (None)."""

    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        if self.start is None and self.end is None:
            raise ConfigurationError("a _lastUpdated window needs a start, an end, or both")
        start = parse_instant(self.start) if self.start is not None else None
        end = parse_instant(self.end) if self.end is not None else None
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)
        if start is not None and end is not None and end < start:
            raise ConfigurationError(f"the _lastUpdated window ends ({_iso_ms(end)}) before it starts "
                                     f"({_iso_ms(start)})")

    @classmethod
    def of(cls, start: Any = None, end: Any = None) -> LastUpdatedWindow | None:
        """A window, or None when both bounds are empty (``None`` or ``""``)."""
        start = start if start not in (None, "") else None
        end = end if end not in (None, "") else None
        if start is None and end is None:
            return None
        return cls(start, end)

    def mode(self, track: Track | str, capabilities: Capabilities, resource_type: str) -> str:
        """``exact`` (the server filters precisely), ``widened`` (whole days) or ``scan`` (no filter)."""
        if Track(track) is Track.CERTIFIED:
            return "exact"
        return "widened" if capabilities.supports_last_updated(track, resource_type) else "scan"

    def search_params(self, track: Track | str, capabilities: Capabilities,
                      resource_type: str) -> list[tuple[str, str]]:
        """The ``_lastUpdated`` parameters to send on ``track`` (``[]`` when the server cannot filter)."""
        mode = self.mode(track, capabilities, resource_type)
        params: list[tuple[str, str]] = []
        if mode == "exact":
            if self.start is not None:
                params.append(("_lastUpdated", f"ge{_iso_ms(self.start)}"))
            if self.end is not None:
                # round the exclusive end up to the millisecond: the exact bound is applied here
                end_ms = math.ceil(self.end.timestamp() * 1000)
                end = datetime.fromtimestamp(end_ms / 1000, tz=timezone.utc)
                params.append(("_lastUpdated", f"lt{_iso_ms(end)}"))
        elif mode == "widened":
            if self.start is not None:
                params.append(("_lastUpdated", f"gt{(self.start.date() - timedelta(days=1)).isoformat()}"))
            if self.end is not None:
                last_day = (self.end - timedelta(microseconds=1)).date()
                params.append(("_lastUpdated", f"le{last_day.isoformat()}"))
        return params

    def contains(self, resource: Mapping[str, Any]) -> bool | None:
        """Whether ``meta.lastUpdated`` lies in the window; None when the resource carries none."""
        raw = (resource.get("meta") or {}).get("lastUpdated") if isinstance(resource, Mapping) else None
        if not isinstance(raw, str) or not raw:
            return None
        try:
            when = parse_instant(raw)
        except ConfigurationError:
            return None
        if self.start is not None and when < self.start:
            return False
        return not (self.end is not None and when >= self.end)

    def describe(self) -> str:
        start = _iso_ms(self.start) if self.start is not None else "-inf"
        end = _iso_ms(self.end) if self.end is not None else "+inf"
        return f"[{start}, {end})"


def search_pairs(params: Params) -> list[tuple[str, str]]:
    """Search parameters as (name, value) pairs from a dict, a list of pairs or a query string."""
    if params is None or params == "":
        return []
    if isinstance(params, str):
        from urllib.parse import parse_qsl

        return parse_qsl(params.lstrip("?"), keep_blank_values=False)
    items = params.items() if isinstance(params, Mapping) else params
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigurationError("search parameters must be a dict, a list of (name, value) pairs or a "
                                     "query string")
        key, value = item
        values = value if isinstance(value, (list, tuple)) else [value]
        pairs.extend((str(key), str(v)) for v in values if v is not None)
    return pairs


@dataclass
class ExportResult:
    """What :func:`search_to_ndjson` wrote: path, exact count, ids (capped) and the run's statistics."""

    path: str
    resource_type: str
    count: int = 0
    ids: list[str] = field(default_factory=list)
    ids_truncated: bool = False
    resources: list[dict[str, Any]] = field(default_factory=list)
    resources_truncated: bool = False
    #: resources the server returned (before de-duplication and the window)
    scanned: int = 0
    duplicates: int = 0
    outside_window: int = 0
    undated: int = 0
    window_mode: str | None = None

    def summary(self) -> dict[str, Any]:
        """Counts only (for logs): no ids, no resources."""
        return {"resource_type": self.resource_type, "count": self.count, "scanned": self.scanned,
                "duplicates": self.duplicates, "outside_window": self.outside_window, "undated": self.undated,
                "window_mode": self.window_mode}


def write_ndjson(resources: Iterable[Mapping[str, Any]], path: _Openable) -> int:
    """Write ``resources`` to ``path``, one compact JSON object per line; returns how many."""
    n = 0
    with path.open("wb") as out:
        for resource in resources:
            out.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            n += 1
    return n


def prepare_parent(path: Any) -> None:
    """Create the parent folder of ``path`` when its file system has folders (a no-op elsewhere)."""
    parent = getattr(path, "parent", None)
    if parent is None or not hasattr(parent, "mkdir"):
        return
    with contextlib.suppress(FileExistsError):
        parent.mkdir(parents=True, exist_ok=True)


def search_to_ndjson(client: Any, resource_type: str, path: _Openable, params: Params = None, *,
                     window: LastUpdatedWindow | None = None, count: int | None = None,
                     headers: Mapping[str, str] | None = None, max_ids: int = DEFAULT_MAX_IDS,
                     keep_resources: int = 0) -> ExportResult:
    """Search ``resource_type`` through every page into ``path`` (NDJSON), de-duplicated by id.

    ``client`` is a :class:`~airflow_provider_modmed.client.FhirClient` (its search flow does the
    capability pre-flight before any request). With ``window``, the ``_lastUpdated`` bounds are sent as
    the track allows and enforced exactly here. ``keep_resources`` > 0 also returns up to that many
    resources (opt-in: they are patient data). The file is written even when nothing matches (empty).
    """
    pairs = search_pairs(params)
    if max_ids < 0 or keep_resources < 0:
        raise ConfigurationError("max_ids and keep_resources must be >= 0")
    result = ExportResult(path=str(path), resource_type=resource_type)
    if window is not None:
        if any(k.split(":")[0] == "_lastUpdated" for k, _ in pairs):
            raise ConfigurationError("pass the _lastUpdated bounds either in the search parameters or as the "
                                     "window (last_updated_start/end), not both")
        track = client.context.track
        caps = client.context.capabilities
        result.window_mode = window.mode(track, caps, resource_type)
        pairs = [*pairs, *window.search_params(track, caps, resource_type)]
    matches: Iterator[dict[str, Any]] = client.search(resource_type, pairs, count=count, headers=headers)
    seen: set[str] = set()
    prepare_parent(path)

    def kept() -> Iterator[dict[str, Any]]:
        for resource in matches:
            result.scanned += 1
            rid = resource.get("id")
            if isinstance(rid, str) and rid in seen:
                result.duplicates += 1
                continue
            if window is not None:
                inside = window.contains(resource)
                if inside is False:
                    result.outside_window += 1
                    continue
                if inside is None:
                    result.undated += 1
            if isinstance(rid, str):
                seen.add(rid)
                if len(result.ids) < max_ids:
                    result.ids.append(rid)
                else:
                    result.ids_truncated = True
            if keep_resources:
                if len(result.resources) < keep_resources:
                    result.resources.append(resource)
                else:
                    result.resources_truncated = True
            yield resource

    result.count = write_ndjson(kept(), path)
    if result.undated:
        log.warning("modmed: %d %s resources carry no meta.lastUpdated; kept them (the window cannot place "
                    "them)", result.undated, resource_type)
    return result
