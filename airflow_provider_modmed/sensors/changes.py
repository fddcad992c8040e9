"""ModMedChangesSensor: wait until resources of a type changed, then hand over a reference to the change set.

The sensor polls ``meta.lastUpdated`` (see ``docs/change-detection.md``) with the Airflow-free core in
:mod:`airflow_provider_modmed.client.changes`. When it finds changes it writes the changed resources as
NDJSON to an ``ObjectStoragePath`` and returns (to XCom) only a reference: ids, versions, count, the
file's path, the window and what the poll cost. Resources never go to XCom or to the logs.

Where the watermark comes from:

* **the data interval** (default): the window ``[data_interval_start, data_interval_end)``. A run waits
  until its window has settled (its end plus ``lookback`` on the worker's clock), polls it once and
  returns its change set; re-runs and backfills of an interval give the same answer. An empty window
  skips the task (``skip_when_empty``). ``since``/``until`` override the bounds.
* **a state file** (``state_path``): continuous polling. The cursor is kept per connection, resource type
  and search parameters in a small JSON file; it advances only after the change set was written.
* ``since`` alone: wait for the first changes after that instant (stateless).

Modes: ``poke`` and ``reschedule`` poll on the worker; ``deferrable=True`` polls once, then hands the
polling to :class:`~airflow_provider_modmed.triggers.changes.ModMedChangesTrigger` (same flow, async
client) and collects the change set in :meth:`execute_complete`. As Airflow's providers do, the default is
``[operators] default_deferrable`` (False unless the deployment, which knows it runs a triggerer, sets it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, ObjectStoragePath, PokeReturnValue, conf
from airflow.sdk.exceptions import AirflowSkipException

from airflow_provider_modmed.client.changes import (
    DEFAULT_LOOKBACK_SECONDS,
    ChangeQuery,
    Cursor,
    PollResult,
    changes_json,
    poll_changes,
)
from airflow_provider_modmed.client.instants import duration_ms, format_instant, now_ms, parse_bound_ms
from airflow_provider_modmed.client.ndjson import NdjsonWriter
from airflow_provider_modmed.errors import ConfigurationError, ModMedError
from airflow_provider_modmed.operators._common import (
    ModMedBaseOperator,
    output_base,
    parse_json_arg,
    storage_dataset,
)
from airflow_provider_modmed.triggers.changes import ModMedChangesTrigger

STATE_FORMAT = 1


def _compact(ms: int) -> str:
    return format_instant(ms).replace("-", "").replace(":", "")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


class StateConflictError(ModMedError):
    """The state file changed between this poll's read and its commit: another run advanced it."""


@dataclass
class _Plan:
    """Where one poke starts from: the query, the cursor and (continuous mode) the state file."""

    query: ChangeQuery
    cursor: Cursor
    mode: str  # "window" | "state" | "since"
    state_file: ObjectStoragePath | None = None
    generation: int = 0


class ModMedChangesSensor(ModMedBaseOperator, BaseSensorOperator):
    """Waits until ``resource_type`` resources changed, then returns a reference to the change set.

    Like the ModMed operators: errors no retry can fix (configuration, capability) fail the task at once,
    ``search_params`` values (patient data, possibly) are masked in the stored rendered templates, and
    OpenLineage sees the resource type as input and the change-set folder as output.

    :param resource_type: FHIR type to watch, e.g. ``Appointment`` (templated)
    :param modmed_conn_id: the ModMed connection (one per practice and track) (templated)
    :param search_params: extra search parameters narrowing what is watched, e.g. ``{"status": "booked"}``;
        on types without ``_lastUpdated`` they also narrow the scan (templated)
    :param since: window start (default ``data_interval_start``); with ``state_path``, where a cursor starts
        when there is no state file yet (templated)
    :param until: window end (default ``data_interval_end``) (templated)
    :param state_path: continuous mode: a folder (or a ``.json`` file) at an ObjectStoragePath URL keeping
        the cursor per connection, resource type and parameters (templated)
    :param output_path: a folder (or an ``.ndjson`` file) where change sets are written; default
        ``{[modmed] output_base}/{dag_id}/{run_id}/{task_id}/`` (``file:///tmp/modmed`` unless configured: set
        object storage on multi-worker deployments) (templated)
    :param lookback: seconds (or timedelta) of look-back: covers server clock skew and commit latency.
        Windows settle this long after their end; open cursors re-read this much overlap.
    :param page_size: ``_count`` per page (default: ModMed's maximum for the type)
    :param strategy: force ``"scan"``/``"day"``/``"instant"``; default from the track and capability matrix
    :param skip_when_empty: a settled window without changes skips the task (False: returns count 0)
    :param max_xcom_changes: at most this many ``{id, versionId, lastUpdated}`` in the returned reference
    :param deferrable: poll in the triggerer (default: ``[operators] default_deferrable``)
    """

    template_fields: Sequence[str] = ("resource_type", "modmed_conn_id", "search_params", "since", "until",
                                      "state_path", "output_path")
    template_fields_renderers = {"search_params": "json"}
    phi_template_fields: Sequence[str] = ("search_params",)
    ui_color = "#d7ecf4"

    def __init__(self, *, resource_type: str, modmed_conn_id: str = "modmed_default",
                 search_params: dict[str, Any] | None = None, since: str | datetime | None = None,
                 until: str | datetime | None = None, state_path: str | None = None,
                 output_path: str | None = None, lookback: timedelta | float = DEFAULT_LOOKBACK_SECONDS,
                 page_size: int | None = None, strategy: str | None = None, exact_paging: bool = True,
                 skip_when_empty: bool = True, max_xcom_changes: int = 1000,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
                 poke_interval: timedelta | float = 60.0, **kwargs: Any) -> None:
        super().__init__(modmed_conn_id=modmed_conn_id, poke_interval=poke_interval, **kwargs)
        if state_path is not None and until is not None:
            raise ConfigurationError("until closes a window; a state_path cursor is open-ended: set one of them")
        self.resource_type = resource_type
        self.search_params = search_params
        self.since = since
        self.until = until
        self.state_path = state_path
        self.output_path = output_path
        self.lookback = duration_ms(lookback) / 1000
        self.page_size = page_size
        self.strategy = strategy
        self.exact_paging = exact_paging
        self.skip_when_empty = skip_when_empty
        self.max_xcom_changes = max_xcom_changes
        self.deferrable = deferrable

    # -- where a poke starts -------------------------------------------------------------------------
    def _query(self) -> ChangeQuery:
        params = parse_json_arg(self.phi_value("search_params"), "search_params")
        return ChangeQuery.build(self.resource_type, params, lookback=self.lookback,
                                 page_size=self.page_size, strategy=self.strategy, exact_paging=self.exact_paging)

    def _plan(self, context: Any) -> _Plan:
        # a template rendered from an unset value gives "None" or "" (without render_template_as_native_obj)
        for name in ("since", "until", "state_path", "output_path"):
            if getattr(self, name) in ("", "None"):
                setattr(self, name, None)
        query = self._query()
        if self.state_path:
            state_file = self._state_file(query)
            if state_file.exists():
                state = json.loads(state_file.read_text())
                if state.get("format") != STATE_FORMAT:
                    raise ConfigurationError(f"{state_file} is not a ModMed change-detection state file")
                return _Plan(query, Cursor.from_json(state["cursor"]), "state", state_file,
                             int(state.get("generation", 0)))
            start = self.since or context.get("data_interval_start") or context.get("logical_date")
            cursor = Cursor(parse_bound_ms(start, "since") if start else now_ms())
            return _Plan(query, cursor, "state", state_file, 0)
        if self.since is not None and self.until is None:
            return _Plan(query, Cursor.since(self.since), "since")
        start = self.since if self.since is not None else context.get("data_interval_start")
        end = self.until if self.until is not None else context.get("data_interval_end")
        if start is None or end is None or parse_bound_ms(start, "since") >= parse_bound_ms(end, "until"):
            raise ConfigurationError(
                "the data interval is empty (a DAG with schedule=None?): set since/until, or state_path for "
                "continuous polling")
        return _Plan(query, Cursor.since(start, end), "window")

    def _state_file(self, query: ChangeQuery) -> ObjectStoragePath:
        base = str(self.state_path)
        if base.endswith(".json"):
            return ObjectStoragePath(base)
        name = f"{_safe(self.resource_type)}-{query.key()}.json"
        return ObjectStoragePath(base.rstrip("/") + f"/{_safe(self.modmed_conn_id)}/{name}")

    def _output(self, context: Any, plan: _Plan) -> ObjectStoragePath:
        if self.output_path and str(self.output_path).endswith(".ndjson"):
            return ObjectStoragePath(str(self.output_path))
        if self.output_path:
            folder = str(self.output_path).rstrip("/")
        else:  # like the search operator: [modmed] output_base/{dag_id}/{run_id}/{task_id}
            ti = context.get("ti")
            base = output_base()
            dag_id = getattr(ti, "dag_id", None) or getattr(self, "dag_id", None) or "dag"
            run_id = context.get("run_id") or getattr(ti, "run_id", None) or "run"
            folder = f"{base}/{_safe(dag_id)}/{_safe(run_id)}/{_safe(self.task_id)}"
        if plan.mode == "state":
            name = f"{_safe(self.resource_type)}-{plan.query.key()}-g{plan.generation + 1:06d}.ndjson"
        elif plan.mode == "window":
            assert plan.cursor.high_ms is not None
            name = (f"{_safe(self.resource_type)}-{plan.query.key()}-{_compact(plan.cursor.low_ms)}-"
                    f"{_compact(plan.cursor.high_ms)}.ndjson")
        else:
            name = f"{_safe(self.resource_type)}-{plan.query.key()}-since-{_compact(plan.cursor.low_ms)}.ndjson"
        return ObjectStoragePath(f"{folder}/{name}")

    def _settles_at_ms(self, plan: _Plan) -> int | None:
        return plan.cursor.settles_at_ms(plan.query.lookback_ms)

    # -- one poll, written out -------------------------------------------------------------------------
    def _collect(self, context: Any, plan: _Plan) -> dict[str, Any] | None:
        """Poll once; write and commit a non-empty change set and return its reference, else None.

        A settled window without changes raises ``AirflowSkipException`` (or returns an empty reference).
        """
        path = self._output(context, plan)
        sink = NdjsonWriter(path)
        try:
            track: str | None = self.track.value
            result = poll_changes(self.hook.get_conn(), plan.query, plan.cursor, on_change=sink.write,
                                  now_ms=now_ms())
        finally:
            sink.close()
            self._close_client()
        self.log.info("poll %s on %s: %s", self.resource_type, self.modmed_conn_id, json.dumps(result.summary()))
        if result.changes:
            generation = self._commit(plan, result, path) if plan.mode == "state" else None
            return self._reference(plan, result, path, track, generation)
        if plan.mode == "window":
            return self._empty(plan, result, track)
        return None

    def _commit(self, plan: _Plan, result: PollResult, written: ObjectStoragePath) -> int:
        """Save the advanced cursor, after the change set was written; refuse if another run moved it."""
        assert plan.state_file is not None
        state_file = plan.state_file
        current = json.loads(state_file.read_text()).get("generation", 0) if state_file.exists() else 0
        if int(current) != plan.generation:
            raise StateConflictError(
                f"{state_file} moved from generation {plan.generation} to {current} during this poll: another run "
                "of this sensor commits the same cursor (use max_active_runs=1); the change set stays at "
                f"{written} and the next poll starts from the newer state")
        generation = plan.generation + 1
        state = {"format": STATE_FORMAT, "conn_id": self.modmed_conn_id, "resource_type": self.resource_type,
                 "params": [list(p) for p in plan.query.params], "generation": generation,
                 "updated_at": format_instant(now_ms()), "last_change_set": str(written),
                 "last_count": len(result.changes), "cursor": result.cursor.to_json()}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = ObjectStoragePath(str(state_file) + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.rename(state_file)
        return generation

    def _reference(self, plan: _Plan, result: PollResult, path: ObjectStoragePath | None, track: str | None,
                   generation: int | None) -> dict[str, Any]:
        listed, truncated = changes_json(result.changes, self.max_xcom_changes)
        cursor = plan.cursor
        return {
            "conn_id": self.modmed_conn_id, "resource_type": self.resource_type, "track": track,
            "strategy": result.strategy.value, "count": len(result.changes), "changes": listed,
            "changes_truncated": truncated, "path": str(path) if path is not None else None,
            "window": {"start": format_instant(cursor.low_ms),
                       "end": format_instant(cursor.high_ms) if cursor.high_ms is not None else None},
            "watermark": format_instant(result.cursor.watermark_ms),
            "state_path": str(plan.state_file) if plan.state_file is not None else None, "generation": generation,
            "calls": result.calls, "pages": result.pages, "consistent": result.consistent,
        }

    def _empty(self, plan: _Plan, result: PollResult | None, track: str | None) -> dict[str, Any]:
        window = f"[{format_instant(plan.cursor.low_ms)}, {format_instant(plan.cursor.high_ms or 0)})"
        if self.skip_when_empty:
            raise AirflowSkipException(f"no {self.resource_type} changed in {window}")
        if result is None:
            return {"conn_id": self.modmed_conn_id, "resource_type": self.resource_type, "track": track, "count": 0,
                    "changes": [], "changes_truncated": False, "path": None,
                    "window": {"start": format_instant(plan.cursor.low_ms),
                               "end": format_instant(plan.cursor.high_ms or 0)}}
        return self._reference(plan, result, None, track, None)

    # -- the three modes -----------------------------------------------------------------------------
    def poke(self, context: Any) -> bool | PokeReturnValue:
        with self.fail_fast():
            plan = self._plan(context)
            settles = self._settles_at_ms(plan)
            if settles is not None and now_ms() < settles:
                self.log.info("window ends %s; it settles at %s", format_instant(plan.cursor.high_ms or 0),
                              format_instant(settles))
                return False
            reference = self._collect(context, plan)
        return PokeReturnValue(is_done=True, xcom_value=reference) if reference is not None else False

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        with self.fail_fast():
            plan = self._plan(context)
            settles = self._settles_at_ms(plan)
            if settles is None or now_ms() >= settles:
                reference = self._collect(context, plan)
                if reference is not None:
                    return reference
        self._defer(plan)
        return None

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        outputs = [storage_dataset(str(self.output_path))] if self.output_path else []
        return [(self.lineage_namespace(), self.resource_type)], outputs

    def _defer(self, plan: _Plan) -> None:
        settles = self._settles_at_ms(plan)
        trigger = ModMedChangesTrigger(
            resource_type=self.resource_type, cursor=plan.cursor.to_json(), modmed_conn_id=self.modmed_conn_id,
            search_params=[list(p) for p in plan.query.params], lookback=self.lookback, page_size=self.page_size,
            strategy=self.strategy, exact_paging=self.exact_paging, poll_interval=self.poke_interval,
            not_before=format_instant(settles) if settles is not None else None)
        timeout = timedelta(seconds=self.timeout) if self.timeout is not None else None
        self.defer(trigger=trigger, method_name="execute_complete", timeout=timeout)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        """Resume after the trigger: collect the change set on the worker (the trigger only detects)."""
        if not event or event.get("status") not in ("changed", "empty"):
            raise ModMedError(f"change detection failed in the triggerer: {event}")
        self.log.info("trigger: %s %s after %s poll(s), %s call(s)", event.get("count"), event.get("status"),
                      event.get("polls"), event.get("calls"))
        with self.fail_fast():
            plan = self._plan(context)  # a resumed task is a new process: rebuild from the template fields
            if event["status"] == "empty" and plan.mode == "window":
                return self._empty(plan, None, None)
            reference = self._collect(context, plan)
        if reference is not None:
            reference["trigger"] = {"polls": event.get("polls"), "calls": event.get("calls")}
            return reference
        self._defer(plan)  # what the trigger saw was committed by another run meanwhile: wait again
        return None
