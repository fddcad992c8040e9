"""ModMedSearchResourcesOperator: a FHIR search through every page into an NDJSON file.

Arguments, validation, XCom and lineage only: the search, the ``_lastUpdated`` window and the
de-duplication are the client's (:func:`~airflow_provider_modmed.client.ndjson.search_to_ndjson`,
:mod:`~airflow_provider_modmed.client.window`). Nothing patient-related is logged or pushed to XCom by
default: the operator returns the file's path, the count and the ids.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client.ndjson import DEFAULT_MAX_IDS, search_to_ndjson
from airflow_provider_modmed.client.window import Strategy, Window, strategy_for
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.operators._common import (
    ModMedBaseOperator,
    output_base,
    parse_json_arg,
    safe_segment,
    storage_dataset,
    storage_path,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["DEFAULT_MAX_XCOM_RESOURCES", "ModMedSearchResourcesOperator"]

log = logging.getLogger(__name__)

#: resources returned through XCom at most with ``return_resources=True``
DEFAULT_MAX_XCOM_RESOURCES = 100


class ModMedSearchResourcesOperator(ModMedBaseOperator):
    """Search a resource type through every page into an NDJSON file; return its path, count and ids.

    Memory stays flat whatever the size: one resource at a time goes from the API to the file.
    Matches are de-duplicated by id + version within the run.

    :param resource_type: e.g. ``"Patient"``; templated.
    :param search_params: FHIR search parameters: a dict (lists for repeats), a list of pairs or a query
        string; templated. (``params`` is Airflow's own argument, hence the name.)
    :param output_path: the NDJSON file (a local path or an object storage URL such as
        ``s3://bucket/key.ndjson``); templated. Default:
        ``{output_base}/{dag_id}/{run_id}/{task_id}[_{map_index}]/{resource_type}.ndjson``.
    :param output_base: base of the default path; default ``[modmed] output_base`` or ``file:///tmp/modmed``.
    :param output_conn_id: Airflow connection of the object storage (e.g. ``aws_default``).
    :param last_updated_start: start (inclusive) of a ``meta.lastUpdated`` window; templated.
    :param last_updated_end: end (exclusive) of the window; templated.
    :param incremental: take the window from the run's data interval ``[start, end)``: idempotent,
        backfillable extracts. On the proprietary track ``_lastUpdated`` is day-granular (and missing on
        some types): the query is widened to whole days (or to every match) and the rows are filtered to
        the exact window on ``meta.lastUpdated``.
    :param count: page size (``_count``); default the type's maximum on the track.
    :param max_ids: ids listed in the result at most (default 10,000; ``ids_truncated`` says when more).
    :param return_resources: also return the resources (patient data!) under ``"resources"``.
    :param max_xcom_resources: at most this many resources are returned (``resources_truncated``).
    :param headers: extra request headers (e.g. ``{"Content-flag": "Referral"}``).
    :param includes: included resources (``_include``/``_revinclude``, ``search.mode = include``) never go
        to the main file: ``"separate"`` (default) writes each type beside it as
        ``{stem}.include.{Type}.ndjson`` (only when some arrive); ``"drop"`` counts and discards them.
    :return: ``{"path", "count", "ids", "ids_truncated", "resource_type", "window", "included",
        "included_dropped"}``; ``included`` is ``{Type: {"path", "count"}}``.
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "resource_type", "search_params", "output_path",
                                      "output_base", "last_updated_start", "last_updated_end")
    template_fields_renderers = {"search_params": "json"}
    phi_template_fields = ("search_params",)

    def __init__(self, *, resource_type: str,
                 search_params: dict[str, Any] | Sequence[tuple[str, Any]] | str | None = None,
                 output_path: str | None = None, output_base: str | None = None, output_conn_id: str | None = None,
                 last_updated_start: Any = None, last_updated_end: Any = None, incremental: bool = False,
                 count: int | None = None, max_ids: int = DEFAULT_MAX_IDS, return_resources: bool = False,
                 max_xcom_resources: int = DEFAULT_MAX_XCOM_RESOURCES, headers: Mapping[str, str] | None = None,
                 includes: str = "separate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resource_type = resource_type
        self.search_params = search_params
        self.output_path = output_path
        self.output_base = output_base
        self.output_conn_id = output_conn_id
        self.last_updated_start = last_updated_start
        self.last_updated_end = last_updated_end
        self.incremental = incremental
        self.count = count
        self.max_ids = max_ids
        self.return_resources = return_resources
        self.max_xcom_resources = max_xcom_resources
        self.headers = dict(headers or {})
        self.includes = includes
        self._included_paths: list[str] = []

    def _default_path(self, context: Context) -> str:
        base = output_base(self.output_base)
        ti = context.get("ti")
        map_index = getattr(ti, "map_index", -1)
        task = safe_segment(self.task_id) + (f"_{map_index}" if map_index not in (None, -1) else "")
        run_id = context.get("run_id") or getattr(ti, "run_id", None) or "run"
        return "/".join([str(base).rstrip("/"), safe_segment(self.dag_id), safe_segment(run_id), task,
                         f"{safe_segment(self.resource_type)}.ndjson"])

    def _window(self, context: Context) -> Window | None:
        start, end = self.last_updated_start, self.last_updated_end
        if self.incremental:
            if start not in (None, "") or end not in (None, ""):
                raise ConfigurationError("incremental=True takes the window from the data interval; do not also "
                                         "pass last_updated_start/last_updated_end")
            start, end = context.get("data_interval_start"), context.get("data_interval_end")
            if start is None or end is None:
                raise ConfigurationError("incremental=True needs a data interval (a DAG with a schedule); this "
                                         "run has none: pass last_updated_start/last_updated_end instead")
            if start == end:
                raise ConfigurationError(
                    "incremental=True got an empty data interval (start == end): in Airflow 3, '@daily' and "
                    "timedelta schedules (and manual runs) give runs no interval. Schedule with "
                    "CronDataIntervalTimetable or DeltaDataIntervalTimetable (from airflow.sdk), or pass "
                    "last_updated_start/last_updated_end")
        return Window.of(start, end)

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            spec = self.preflight(self.resource_type, Interaction.SEARCH)
            window = self._window(context)
            if self.max_ids < 0 or self.max_xcom_resources < 0:
                raise ConfigurationError("max_ids and max_xcom_resources must be >= 0")
            params = parse_json_arg(self.phi_value("search_params"), "search_params")
            target = self.output_path or self._default_path(context)
            self.output_path = str(target)
            path = storage_path(target, self.output_conn_id)
        rt = spec.resource_type
        if window is not None:
            strategy = strategy_for(self.track, self.capabilities, rt)
            if strategy is Strategy.SCAN:
                log.info("%s has no _lastUpdated search on the proprietary track: reading every match and "
                         "keeping those updated in %s", rt, window.describe())
            elif strategy is Strategy.DAY:
                log.info("Proprietary _lastUpdated is day-granular: asking for whole days and keeping the "
                         "%s updated in %s", rt, window.describe())
            else:
                log.info("Searching %s updated in %s", rt, window.describe())
        client = self.hook.get_conn()
        keep = self.max_xcom_resources if self.return_resources else 0
        with self.fail_fast():
            result = self.run_closing(lambda: search_to_ndjson(
                client, rt, path, params, window=window, count=self.count, headers=self.headers or None,
                max_ids=self.max_ids, keep_resources=keep, includes=self.includes))
        stats = result.summary()
        log.info("Wrote %d %s resources to %s (read %d, %d duplicates dropped, %d outside the window)",
                 result.count, rt, path, stats["scanned"], stats["duplicates"], stats["outside_window"])
        for included_type, written in result.included.items():
            log.info("Wrote %d included %s resources to %s", written["count"], included_type, written["path"])
        if result.included_dropped:
            log.info("Dropped %d included resources (includes='drop')", result.included_dropped)
        self._included_paths = [written["path"] for written in result.included.values()]
        if result.ids_truncated:
            log.info("Returning the first %d of %d ids (max_ids); the file has them all", self.max_ids,
                     result.count)
        out: dict[str, Any] = {"path": str(path), "count": result.count, "ids": result.ids,
                               "ids_truncated": result.ids_truncated, "resource_type": rt,
                               "window": None if window is None else {
                                   "start": window.start.isoformat() if window.start else None,
                                   "end": window.end.isoformat() if window.end else None,
                                   "mode": result.window_mode},
                               "included": result.included, "included_dropped": result.included_dropped}
        if self.return_resources:
            if result.resources_truncated:
                log.warning("return_resources: returning %d of %d resources (max_xcom_resources); read the "
                            "file for all", len(result.resources), result.count)
            out["resources"] = result.resources
            out["resources_truncated"] = result.resources_truncated
        return out

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        outputs = [storage_dataset(str(self.output_path))] if self.output_path else []
        outputs += [storage_dataset(p) for p in self._included_paths]
        return [(self.lineage_namespace(), self.resource_type)], outputs

