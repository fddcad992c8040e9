"""Search results streamed to an NDJSON file in constant memory, with an exact ``_lastUpdated`` window.

Airflow-free: the file is anything with ``open(mode)`` (``pathlib.Path``, Airflow's ``ObjectStoragePath``,
a ``UPath``). One resource is held at a time; what grows is the ``id -> version`` map of the
de-duplicating :class:`~airflow_provider_modmed.client.window.Tracker` and the capped list of ids returned.

The ``_lastUpdated`` window is a :class:`~airflow_provider_modmed.client.window.Window`: sent as the
track allows (exact on the certified track, widened to whole UTC days or a scan on the proprietary one)
and enforced exactly on ``meta.lastUpdated`` here. Rows are de-duplicated by id + version (a page read
twice while the data moved adds nothing; a newer version of a resource already written is written too).
Resources without a valid ``meta.lastUpdated`` cannot be placed in a window: they are kept (never lose
data) and counted as ``undated``.

Only matches of the searched type reach the file (a match of another type fails the search). Included
resources (``_include``/``_revinclude``, ``search.mode = include``) go to their own files beside it,
``{stem}.include.{Type}.ndjson`` (``includes="separate"``, the default), or are dropped and counted
(``includes="drop"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from airflow_provider_modmed.client._flows import Included, SearchParams, search_pairs
from airflow_provider_modmed.client.window import Change, Tracker, Window, strategy_for
from airflow_provider_modmed.errors import ConfigurationError, ModMedError

__all__ = [
    "DEFAULT_MAX_IDS",
    "INCLUDES",
    "ExportResult",
    "NdjsonWriter",
    "included_path",
    "prepare_parent",
    "search_to_ndjson",
    "write_ndjson",
]

log = logging.getLogger("airflow_provider_modmed.client")

#: ids listed in a result at most (the count is always exact)
DEFAULT_MAX_IDS = 10_000
#: what :func:`search_to_ndjson` does with included resources: their own files, or dropped with a count
INCLUDES = ("separate", "drop")


class _Openable(Protocol):
    def open(self, mode: str = ..., *args: Any, **kwargs: Any) -> Any: ...


@dataclass
class ExportResult:
    """What :func:`search_to_ndjson` wrote: path, exact count, ids (capped) and the run's statistics."""

    path: str
    resource_type: str
    #: rows written (one per id + version; resources without an id are all kept)
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
    #: ``exact``, ``widened`` or ``scan`` (:attr:`Strategy.mode`) when there is a window
    window_mode: str | None = None
    #: included resources written (``includes="separate"``): ``{Type: {"path", "count"}}``, de-duplicated
    included: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: included resources received and not written (``includes="drop"``)
    included_dropped: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts only (for logs): no ids, no resources."""
        return {"resource_type": self.resource_type, "count": self.count, "scanned": self.scanned,
                "duplicates": self.duplicates, "outside_window": self.outside_window, "undated": self.undated,
                "window_mode": self.window_mode,
                "included": {rt: entry["count"] for rt, entry in self.included.items()},
                "included_dropped": self.included_dropped}


class NdjsonWriter:
    """Writes resources to ``path``, one compact UTF-8 JSON object a line.

    The file (and its parent folder) is created by :meth:`open`, or lazily by the first :meth:`write`,
    so a writer that never writes leaves no file. Use it as a context manager.
    """

    def __init__(self, path: _Openable) -> None:
        self.path = path
        self.count = 0
        self._file: Any = None

    def open(self) -> NdjsonWriter:
        if self._file is None:
            prepare_parent(self.path)
            self._file = self.path.open("wb")
        return self

    def write(self, resource: Mapping[str, Any]) -> None:
        if self._file is None:
            self.open()
        self._file.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> NdjsonWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def write_ndjson(resources: Iterable[Mapping[str, Any]], path: _Openable) -> int:
    """Write ``resources`` to ``path`` (created even when empty); returns how many."""
    with NdjsonWriter(path).open() as out:
        for resource in resources:
            out.write(resource)
    return out.count


def prepare_parent(path: Any) -> None:
    """Create the parent folder of ``path`` when its file system has folders (a no-op elsewhere)."""
    parent = getattr(path, "parent", None)
    if parent is None or not hasattr(parent, "mkdir"):
        return
    with contextlib.suppress(FileExistsError):
        parent.mkdir(parents=True, exist_ok=True)


def included_path(path: Any, resource_type: str) -> Any:
    """Where ``includes="separate"`` writes included ``resource_type`` resources: beside ``path``, named
    ``{stem}.include.{Type}.ndjson`` (``Patient.ndjson`` -> ``Patient.include.Organization.ndjson``), a name
    that cannot be the main file's, whatever type is included (the searched type too)."""
    name = str(getattr(path, "name", "") or "")
    stem = name[: -len(".ndjson")] if name.endswith(".ndjson") else name
    if not stem or not callable(getattr(path, "with_name", None)):
        raise ConfigurationError("includes='separate' writes included resources beside the output file and needs "
                                 "a path with a file name (pathlib.Path, ObjectStoragePath); pass includes='drop'")
    return path.with_name(f"{stem}.include.{resource_type}.ndjson")


def search_to_ndjson(client: Any, resource_type: str, path: _Openable, params: SearchParams = None, *,
                     window: Window | None = None, count: int | None = None,
                     headers: Mapping[str, str] | None = None, max_ids: int = DEFAULT_MAX_IDS,
                     keep_resources: int = 0, includes: str = "separate") -> ExportResult:
    """Search ``resource_type`` through every page into ``path`` (NDJSON), de-duplicated by id + version.

    ``client`` is a :class:`~airflow_provider_modmed.client.FhirClient` (its search flow does the
    capability pre-flight before any request, and fails on a match of another type). With ``window``, the
    ``_lastUpdated`` bounds are sent as the track allows and enforced exactly here. ``keep_resources`` > 0
    also returns up to that many resources (opt-in: they are patient data). The file is written even when
    nothing matches (empty). Included resources never reach ``path``: with ``includes="separate"`` (the
    default) each type goes to :func:`included_path` (created only when one arrives; de-duplicated by id +
    version, no window), with ``"drop"`` they are counted in ``included_dropped``.
    """
    pairs = search_pairs(params)
    if max_ids < 0 or keep_resources < 0:
        raise ConfigurationError("max_ids and keep_resources must be >= 0")
    if includes not in INCLUDES:
        raise ConfigurationError(f"includes must be one of {', '.join(map(repr, INCLUDES))}, got {includes!r}")
    if includes == "separate":
        included_path(path, resource_type)  # a path that cannot take sibling files fails now, not mid-run
    result = ExportResult(path=str(path), resource_type=resource_type)
    if window is not None:
        if any(k.split(":")[0] == "_lastUpdated" for k, _ in pairs):
            raise ConfigurationError("pass the _lastUpdated bounds either in the search parameters or as the "
                                     "window (last_updated_start/end), not both")
        strategy = strategy_for(client.context.track, client.context.capabilities, resource_type)
        result.window_mode = strategy.mode
        pairs = [*pairs, *window.query(strategy)]
    matches: Iterator[dict[str, Any]] = client.search(resource_type, pairs, count=count, headers=headers,
                                                      includes=True)
    # the window is applied below (to count what falls outside); the tracker only de-duplicates
    tracker = Tracker()
    side: dict[str, tuple[NdjsonWriter, Tracker]] = {}
    closing = contextlib.ExitStack()

    def include(resource: Included) -> None:
        if includes == "drop":
            result.included_dropped += 1
            return
        rt = resource.resource_type
        if rt not in side:
            target = included_path(path, rt)
            side[rt] = (closing.enter_context(NdjsonWriter(target)), Tracker())
            result.included[rt] = {"path": str(target), "count": 0}
        writer, seen = side[rt]
        rid = resource.get("id")
        if isinstance(rid, str) and rid and not seen.offer(_observed(resource, rid)):
            return  # the same included resource on several pages
        writer.write(resource)
        result.included[rt]["count"] = writer.count

    def kept() -> Iterator[dict[str, Any]]:
        for resource in matches:
            if isinstance(resource, Included):
                include(resource)
                continue
            result.scanned += 1
            inside = window.contains(resource) if window is not None else True
            if inside is False:
                result.outside_window += 1
                continue
            rid = resource.get("id")
            first = isinstance(rid, str) and bool(rid) and rid not in tracker.seen
            if isinstance(rid, str) and rid and not tracker.offer(_observed(resource, rid)):
                result.duplicates += 1
                continue
            if inside is None:
                result.undated += 1
            if first and len(result.ids) < max_ids:
                result.ids.append(str(rid))
            elif first:
                result.ids_truncated = True
            if keep_resources:
                if len(result.resources) < keep_resources:
                    result.resources.append(resource)
                else:
                    result.resources_truncated = True
            yield resource

    with closing:  # the included files too, whatever happens
        result.count = write_ndjson(kept(), path)
    if result.included_dropped:
        log.info("modmed: dropped %d included resources of a %s search (includes='drop')", result.included_dropped,
                 resource_type)
    if result.undated:
        log.warning("modmed: %d %s resources carry no valid meta.lastUpdated; kept them (the window cannot "
                    "place them)", result.undated, resource_type)
    return result


def _observed(resource: Mapping[str, Any], rid: str) -> Change:
    """The (id, version) a search row stands for; one without a valid ``meta.lastUpdated`` is de-duplicated on
    ``meta.versionId`` alone (its time is taken as 0)."""
    try:
        return Change.of(resource)
    except ModMedError:  # undated: no time to place it
        meta = resource.get("meta")
        version = meta.get("versionId") if isinstance(meta, Mapping) else None
        return Change(rid, "" if version in (None, "") else str(version), 0)
