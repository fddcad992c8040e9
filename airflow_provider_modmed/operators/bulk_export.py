"""ModMedBulkExportOperator: FHIR Bulk Data ``$export`` on the certified track into object storage.

Deferrable by default: ``execute`` runs the capability pre-flight, kicks off (the one non-idempotent step)
on the worker, saves the status URL in the run folder's state file and defers to
:class:`~airflow_provider_modmed.triggers.bulk_export.ModMedBulkExportTrigger` with only the status URL,
the connection id and the poll policy. The trigger polls in the triggerer and yields one small event;
``execute_complete`` (also reached directly when an earlier try already saw the job complete) streams
the files to storage. Everything it needs is rebuilt from template fields and the state file: a resumed
task is a new process, and ``dag.test()`` drops ``defer(kwargs=...)``.

Run folder: ``{output_folder}/{run_id}/{task_id}[_{map_index}]`` (segments made path-safe, see
:meth:`~airflow_provider_modmed.operators._common.ModMedBaseOperator.task_folder`), so every try of one task
instance shares it: a retry resumes the saved job and skips files already stored and verified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.bulk import (
    ERROR_POLICIES,
    NDJSON,
    BulkExportClient,
    DownloadPolicy,
    ExportGoneError,
    ExportRequest,
    ExportRun,
    PollPolicy,
    apply_error_policy,
    export,
)
from airflow_provider_modmed.client.fhir import FhirClient
from airflow_provider_modmed.errors import ModMedError
from airflow_provider_modmed.hooks.modmed import ModMedHook
from airflow_provider_modmed.operators._common import ModMedBaseOperator, storage_dataset, storage_path
from airflow_provider_modmed.triggers.bulk_export import ModMedBulkExportTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


def _strings(value: Any, separator: str | None = None) -> tuple[str, ...]:
    """A templated list-ish value as a tuple of strings (a string is split on ``separator``, if any)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = value.split(separator) if separator else [value]
        return tuple(p.strip() for p in parts if p.strip())
    return tuple(str(v) for v in value)


class ModMedBulkExportOperator(ModMedBaseOperator):
    """Export FHIR data in bulk (Bulk Data Access IG v2) from ModMed's certified API into object storage.

    :param output_folder: an ``ObjectStoragePath`` (or URL string, e.g. ``s3://conn@bucket/modmed`` or
        ``file:///data/modmed``); templated. Files go under ``{output_folder}/{run_id}/{task_id}``
        (``{task_id}_{map_index}`` for a mapped task).
    :param modmed_conn_id: a certified-track ModMed connection (export is certified-only; a proprietary
        connection fails before any network call); templated
    :param export_level: ``system``, ``Patient`` or ``Group/<id>`` (or ``Group`` with ``group_id``); templated
    :param types: ``_type``, a list or comma-separated string of resource types; templated
    :param since: ``_since``, a FHIR instant with a zone (e.g. the previous manifest's ``transactionTime``)
        or an aware datetime; templated
    :param incremental: without ``since``, export changes since the data interval start
    :param type_filters: ``_typeFilter`` values (``Type?search``; experimental, servers may not support
        it); templated
    :param patients: Patient ids for ``patient`` (Patient/Group level; makes the kick-off a POST); templated
    :param lenient: send ``Prefer: handling=lenient`` (the server reports unsupported parameters in the
        error files instead of refusing); default: on when ``type_filters`` are given
    :param error_policy: what the manifest's ``error`` files with fatal/error issues do: ``fail`` (default;
        the files are stored first), ``warn`` or ``ignore``
    :param max_concurrent_downloads: files downloaded at once (memory: about 1 chunk + 1 line per file)
    :param download_retries: further tries per file (429/5xx, broken transfers, failed verification)
    :param min_poll_seconds: lower clamp of the server's Retry-After; ``max_poll_seconds`` the upper one
    :param max_restarts: kick-offs again when the job is gone (404/410), per run folder
    :param deferrable: poll in the triggerer (default) instead of holding a worker slot
    :param export_timeout: how long the export may run on the server (deferral timeout); on timeout the
        job is cancelled with DELETE
    :param cancel_on_kill: DELETE the job when the task is killed or times out

    Returns (XCom) a small dict: ``run_folder``, ``transaction_time``, ``output`` (per type: ``count`` and
    ``files``), ``resources``, ``deleted``, ``errors`` (counts by severity and code, files), ``files``,
    ``bytes``. Never resources.
    """

    template_fields: Sequence[str] = ("output_folder", "modmed_conn_id", "export_level", "group_id", "types",
                                      "since", "type_filters", "patients")
    ui_color = "#e3f1fb"

    def __init__(self, *, output_folder: Any, modmed_conn_id: str = ModMedHook.default_conn_name,
                 export_level: str = "system", group_id: str | None = None,
                 types: str | Sequence[str] | None = None, since: str | datetime | None = None,
                 incremental: bool = False, type_filters: str | Sequence[str] | None = None,
                 patients: str | Sequence[str] | None = None, output_format: str = NDJSON,
                 lenient: bool | None = None, error_policy: str = "fail", max_concurrent_downloads: int = 4,
                 download_retries: int = 3, min_poll_seconds: float = 1.0, max_poll_seconds: float = 600.0,
                 max_poll_errors: int = 10, max_restarts: int = 2, deferrable: bool = True,
                 export_timeout: timedelta | None = timedelta(hours=12), cancel_on_kill: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(modmed_conn_id=modmed_conn_id, **kwargs)
        if error_policy not in ERROR_POLICIES:
            raise ValueError(f"error_policy must be one of {', '.join(ERROR_POLICIES)}; got {error_policy!r}")
        self.output_folder = output_folder
        self.export_level = export_level
        self.group_id = group_id
        self.types = types
        self.since = since
        self.incremental = incremental
        self.type_filters = type_filters
        self.patients = patients
        self.output_format = output_format
        self.lenient = lenient
        self.error_policy = error_policy
        self.max_concurrent_downloads = max_concurrent_downloads
        self.download_retries = download_retries
        self.min_poll_seconds = min_poll_seconds
        self.max_poll_seconds = max_poll_seconds
        self.max_poll_errors = max_poll_errors
        self.max_restarts = max_restarts
        self.deferrable = deferrable
        self.export_timeout = export_timeout
        self.cancel_on_kill = cancel_on_kill
        # policies are validated now (at parse time), not at the first run
        self._policies()
        self._run: ExportRun | None = None
        self._result: dict[str, Any] | None = None

    # -- building blocks (rebuilt in every process: a resumed task is a new one) ---------------------
    def _policies(self) -> tuple[PollPolicy, DownloadPolicy]:
        poll = PollPolicy.between(self.min_poll_seconds, self.max_poll_seconds, self.max_poll_errors)
        return poll, DownloadPolicy(concurrency=self.max_concurrent_downloads, retries=self.download_retries)

    def _export_request(self, context: Context) -> ExportRequest:
        since: Any = self.since
        if (since is None or (isinstance(since, str) and since.strip() in ("", "None"))) and self.incremental:
            since = context.get("data_interval_start")
        type_filters = self.type_filters
        lenient = self.lenient if self.lenient is not None else bool(type_filters)
        return ExportRequest(level=self.export_level, group_id=self.group_id, types=_strings(self.types, ","),
                             since=since, type_filters=_strings(type_filters), output_format=self.output_format,
                             patients=_strings(self.patients, ","), lenient=lenient)

    def _folder(self, context: Context) -> Any:
        from airflow.sdk import ObjectStoragePath

        base = self.output_folder
        if not isinstance(base, ObjectStoragePath):
            base = storage_path(str(base))
        return base / self.task_folder(context)

    def _prepare(self, context: Context) -> tuple[ModMedHook, ExportRun]:
        """Pre-flight (no network), then the run folder and its state."""
        hook = self.hook
        request = self._export_request(context)
        request.preflight(FhirContext.from_config(hook.config))  # CapabilityError names the certified track
        self._run = ExportRun(self._folder(context), request)
        return hook, self._run

    def _bulk(self, hook: ModMedHook) -> BulkExportClient:
        poll, download = self._policies()
        return BulkExportClient(hook.get_conn(), poll=poll, download=download, max_restarts=self.max_restarts)

    def _trigger(self, status_url: str) -> ModMedBulkExportTrigger:
        return ModMedBulkExportTrigger(status_url=status_url, modmed_conn_id=self.modmed_conn_id,
                                       min_poll_seconds=self.min_poll_seconds,
                                       max_poll_seconds=self.max_poll_seconds, max_poll_errors=self.max_poll_errors,
                                       cancel_on_kill=self.cancel_on_kill)

    def _defer(self, status_url: str) -> None:
        self.log.info("modmed: deferring while the server prepares the export")
        self.defer(trigger=self._trigger(status_url), method_name="execute_complete",
                   timeout=self.export_timeout)

    # -- execution -----------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            return self.run_closing(lambda: self._execute(context))

    def _execute(self, context: Context) -> dict[str, Any]:
        hook, run = self._prepare(context)
        if run.state.stage == "complete" and run.state.result is not None:
            self.log.info("modmed: this export is already stored in %s", run.folder)
            return self._done(run.state.result)
        bulk = self._bulk(hook)
        if not self.deferrable:
            return self._done(bulk.run(export(bulk.context, run, bulk.poll_policy, bulk.download_policy,
                                              self.max_restarts, self.log)))
        status_url = bulk.start(run)
        if run.state.stage == "ready":  # an earlier try saw the job complete: download now
            return self._finish(bulk, run)
        self._defer(status_url)
        raise AssertionError("defer() returned")  # pragma: no cover

    def execute_complete(self, context: Context, event: Mapping[str, Any] | None = None,
                         **_: Any) -> dict[str, Any]:
        """Resume after the trigger: download on ``complete``, kick off again on ``gone``, fail on ``error``."""
        if not isinstance(event, Mapping) or "status" not in event:
            raise ModMedError(f"the bulk export resumed without a trigger event ({event!r:.200})")
        with self.fail_fast():
            return self.run_closing(lambda: self._resume(context, event))

    def _resume(self, context: Context, event: Mapping[str, Any]) -> dict[str, Any]:
        hook, run = self._prepare(context)
        if run.state.stage == "complete" and run.state.result is not None:
            return self._done(run.state.result)  # the job was released on the server after success
        status = event["status"]
        if run.state.status_url and event.get("status_url") not in (None, run.state.status_url):
            self.log.warning("modmed: the trigger event is for another status URL than the saved one; "
                             "using the saved one")
        if status == "complete":
            return self._finish(self._bulk(hook), run)
        if status == "gone":
            return self._restart(self._bulk(hook), run, str(event.get("message") or "job gone"))
        raise ModMedError(f"the bulk export failed while polling: {event.get('message')}",
                          status_code=event.get("status_code"))

    def _finish(self, bulk: BulkExportClient, run: ExportRun) -> dict[str, Any]:
        status_url = run.state.status_url
        if not status_url:
            return self._restart(bulk, run, "no saved status URL", count=False)
        try:
            result = bulk.finish(run, status_url, logger=self.log)
        except ExportGoneError as exc:
            return self._restart(bulk, run, exc)
        return self._done(result)

    def _restart(self, bulk: BulkExportClient, run: ExportRun, why: str | BaseException,
                 count: bool = True) -> dict[str, Any]:
        run.restart_if_allowed(self.max_restarts, why, count=count)  # the client's one restart policy
        self._defer(bulk.start(run))
        raise AssertionError("defer() returned")  # pragma: no cover

    def _done(self, result: dict[str, Any]) -> dict[str, Any]:
        self._result = result
        apply_error_policy(result, self.error_policy, self.log)
        return result

    # -- cancel: on_kill (killed, or execution_timeout on the worker) and deferral timeout ----------
    def on_kill(self) -> None:
        """Cancel the export on the server (``cancel_on_kill``), then close the client."""
        self._cancel("the task was killed")
        super().on_kill()

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        from airflow.sdk.exceptions import TaskDeferralTimeout

        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except TaskDeferralTimeout:
            try:
                self._prepare(context)
            except ModMedError as exc:  # pragma: no cover
                self.log.warning("modmed: cannot read the export state to cancel it: %s", exc)
            self._cancel(f"the export did not finish within export_timeout={self.export_timeout}")
            raise

    def _cancel(self, why: str) -> None:
        run, hook = self._run, self.__dict__.get("hook")
        if not self.cancel_on_kill or run is None or hook is None:
            return
        status_url = run.state.status_url
        if not status_url or run.state.stage not in ("kicked-off", "ready"):
            return
        try:
            # a client of its own: on_kill may interrupt the task's client mid-request
            config = dataclasses.replace(hook.config, max_retries=1)
            with FhirClient(config) as client:
                cancelled = BulkExportClient(client).cancel(status_url)
            run.cancelled()
            self.log.warning("modmed: %s: bulk export %s", why, "cancelled (DELETE)" if cancelled else "was gone")
        except Exception as exc:  # on_kill must not raise
            self.log.warning("modmed: %s; cancelling the bulk export failed: %s", why, exc)

    # -- lineage ---------------------------------------------------------------------------------------
    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(inputs, outputs): one per exported type, the practice's FHIR server -> the run folder's files."""
        result = self._result
        if not result:
            return [], []
        types = sorted(result.get("output") or {})
        folder = str(result["run_folder"]).rstrip("/")
        return ([(self.lineage_namespace(), t) for t in types],
                [storage_dataset(f"{folder}/output/{t}") for t in types])
