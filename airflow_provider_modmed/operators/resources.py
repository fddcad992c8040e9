"""Operators for ModMed FHIR resources: create, read, update, delete and search (to NDJSON).

Every operator checks its arguments and the capability matrix for the connection's track in
``execute`` before any network call; errors no retry can fix (unknown type, refused interaction,
invalid resource, missing id) fail the task at once. Writes are safe to retry: conditional create
(``if_none_exist``, a ChargeItem's ``transaction_id``), ``If-Match`` updates. Nothing patient-related
is logged or pushed to XCom by default: operators return types, ids, versions, counts and paths.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client._flows import TRANSACTION_ID_SYSTEM, validate_id
from airflow_provider_modmed.client.ndjson import (
    DEFAULT_MAX_IDS,
    LastUpdatedWindow,
    prepare_parent,
    search_to_ndjson,
)
from airflow_provider_modmed.client.validation import validate_resource
from airflow_provider_modmed.errors import ConfigurationError, ConflictError, NotFoundError
from airflow_provider_modmed.operators._common import (
    ModMedBaseOperator,
    output_base,
    parse_json_arg,
    resource_summary,
    safe_segment,
    storage_dataset,
    storage_path,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = [
    "ModMedCreateResourceOperator",
    "ModMedDeleteResourceOperator",
    "ModMedReadResourceOperator",
    "ModMedSearchResourcesOperator",
    "ModMedUpdateResourceOperator",
    "json_merge_patch",
]

log = logging.getLogger(__name__)

#: extension carrying the reconciliation id of a created Coverage
RECONCILIATION_EXTENSION = "https://www.modmed.com/fhir/StructureDefinition/reconciliation-id"
#: where search output goes when neither ``output_path`` nor ``output_base`` is given; override it for a
#: deployment with ``[modmed] output_base`` (``AIRFLOW__MODMED__OUTPUT_BASE``), e.g. ``s3://bucket/modmed``
#: resources returned through XCom at most with ``return_resources=True``
DEFAULT_MAX_XCOM_RESOURCES = 100


def _resource_arg(value: Any, name: str = "resource") -> dict[str, Any]:
    value = parse_json_arg(value, name)
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a FHIR resource dict (or its JSON), got {type(value).__name__}")
    if not isinstance(value.get("resourceType"), str) or not value.get("resourceType"):
        raise ConfigurationError(f"{name} needs a resourceType")
    return copy.deepcopy(dict(value))


def _version_of(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    m = re.fullmatch(r'(?:W/)?"?([A-Za-z0-9.\-]{1,64})"?', text)
    if not m:
        raise ConfigurationError(f"{name} must be a version id such as 3 or W/\"3\", got {text[:40]!r}")
    return m.group(1)


def _without_meta(resource: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("meta", "text")}


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: objects merge recursively, ``None`` removes a key, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = json_merge_patch(out.get(key), value)
    return out


def _reconciliation_id(resource: Mapping[str, Any]) -> str | None:
    for ext in resource.get("extension") or ():
        if isinstance(ext, Mapping) and str(ext.get("url", "")).rstrip("/").endswith("/reconciliation-id"):
            value = ext.get("valueString") or ext.get("valueId") or (ext.get("valueIdentifier") or {}).get("value")
            if value:
                return str(value)
    return None


# -- create ----------------------------------------------------------------------------------------

class ModMedCreateResourceOperator(ModMedBaseOperator):
    """Create a FHIR resource on ModMed, safely retryable when given an ``If-None-Exist`` condition.

    :param resource: the resource (dict, or its JSON); templated.
    :param if_none_exist: conditional create, so a retried task never creates a duplicate: a search
        (dict or query string, e.g. ``{"identifier": "https://sys|123"}``) that finds the resource if it
        exists; ``True`` builds it from the resource's first identifier. Templated.
    :param transaction_id: ChargeItem only: ModMed's ``transactionId`` (an identifier with system
        ``https://www.modmed.com/fhir/transaction-id``), which ModMed uses to refuse duplicates. A
        duplicate answer (409) returns the existing ChargeItem, so a retry is safe. Templated.
    :param validate: validate the resource with ``fhir.resources.R4B`` first (default True).
    :param return_resource: also return the created resource (patient data!) under ``"resource"``.
    :return: ``{"resource_type", "id", "version_id", "last_updated"}`` (+ ``"reconciliation_id"`` for
        Coverage, + ``"resource"`` when asked).
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "resource", "if_none_exist", "transaction_id")
    template_fields_renderers = {"resource": "json", "if_none_exist": "json"}
    phi_template_fields = ("resource", "if_none_exist")

    def __init__(self, *, resource: dict[str, Any] | str, if_none_exist: dict[str, Any] | str | bool | None = None,
                 transaction_id: str | None = None, validate: bool = True, return_resource: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resource = resource
        self.if_none_exist = if_none_exist
        self.transaction_id = transaction_id
        self.validate = validate
        self.return_resource = return_resource
        self._resource_type: str | None = None

    def _prepare(self) -> tuple[dict[str, Any], str | dict[str, Any] | None]:
        resource = _resource_arg(self.phi_value("resource"))
        rt = resource["resourceType"]
        self._resource_type = rt
        self.preflight(rt, Interaction.CREATE)
        condition: Any = parse_json_arg(self.phi_value("if_none_exist"), "if_none_exist")
        if self.transaction_id not in (None, ""):
            if rt != "ChargeItem":
                raise ConfigurationError(f"transaction_id applies to ChargeItem only, not {rt}")
            txid = str(self.transaction_id)
            idents = resource.setdefault("identifier", [])
            present = [i for i in idents if isinstance(i, Mapping) and i.get("system") == TRANSACTION_ID_SYSTEM]
            if any(i.get("value") != txid for i in present):
                raise ConfigurationError("transaction_id differs from the resource's transaction-id identifier")
            if not present:
                idents.append({"system": TRANSACTION_ID_SYSTEM, "value": txid})
            if condition in (None, "", False):
                condition = {"identifier": f"{TRANSACTION_ID_SYSTEM}|{txid}"}
        if condition is True:
            ident = next((i for i in resource.get("identifier") or ()
                          if isinstance(i, Mapping) and i.get("value")), None)
            if ident is None:
                raise ConfigurationError("if_none_exist=True needs an identifier (with a value) on the resource")
            condition = {"identifier": f"{ident['system']}|{ident['value']}" if ident.get("system")
                         else str(ident["value"])}
        if condition in (None, "", False, {}):
            condition = None
        elif not isinstance(condition, (str, Mapping)):
            raise ConfigurationError("if_none_exist must be a search dict, a query string or True")
        if self.validate:
            validate_resource(resource, rt)
        return resource, condition

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            resource, condition = self._prepare()
        rt = resource["resourceType"]
        if condition is None and (self.retries or 0) > 0:
            log.warning("Creating %s without if_none_exist: if an answer is lost, the retry could create a "
                        "duplicate; pass if_none_exist (or transaction_id for a ChargeItem)", rt)
        client = self.hook.get_conn()

        def create() -> dict[str, Any]:
            try:
                return client.create(resource, if_none_exist=condition)
            except ConflictError as exc:
                if rt == "ChargeItem" and exc.status_code == 409 and self.transaction_id:
                    # ModMed refuses a second ChargeItem with this transactionId: the first one landed
                    found = next(iter(client.search(rt, {"identifier": f"{TRANSACTION_ID_SYSTEM}|"
                                                                       f"{self.transaction_id}"}, count=1)), None)
                    if found is not None and any(
                            i.get("system") == TRANSACTION_ID_SYSTEM and i.get("value") == self.transaction_id
                            for i in found.get("identifier") or ()):
                        log.info("ChargeItem with this transaction_id exists already (a retried task?); "
                                 "returning it")
                        return found
                raise

        with self.fail_fast():
            created = self.run_closing(create)
        out = resource_summary(created)
        if rt == "Coverage":
            out["reconciliation_id"] = _reconciliation_id(created)
        log.info("Created %s (conditional: %s)", rt, "yes" if condition else "no")
        log.debug("Created %s/%s version %s", rt, out["id"], out["version_id"])
        if self.return_resource:
            out["resource"] = created
        return out

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        rt = self._resource_type or _resource_arg(self.phi_value("resource"))["resourceType"]
        return [], [(self.lineage_namespace(), rt)]


# -- read ------------------------------------------------------------------------------------------

class ModMedReadResourceOperator(ModMedBaseOperator):
    """Read one resource. By default only its type, id, version and last update are returned.

    :param resource_type: e.g. ``"Patient"``; templated.
    :param resource_id: the id (ModMed composites such as ``pay|7225`` are fine); templated.
    :param output_path: write the resource as JSON to this path (local or object storage URL,
        templated) and return the path under ``"path"``.
    :param output_conn_id: Airflow connection for the object storage of ``output_path``.
    :param return_resource: also return the resource (patient data!) under ``"resource"``.
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "resource_type", "resource_id", "output_path")

    def __init__(self, *, resource_type: str, resource_id: str, output_path: str | None = None,
                 output_conn_id: str | None = None, return_resource: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.output_path = output_path
        self.output_conn_id = output_conn_id
        self.return_resource = return_resource

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            self.preflight(self.resource_type, Interaction.READ)
            resource_id = validate_id(_id_arg(self.resource_id), "resource_id")
            path = storage_path(self.output_path, self.output_conn_id) if self.output_path else None
        with self.fail_fast():
            resource = self.run_closing(lambda: self.hook.get_conn().read(self.resource_type, resource_id))
        out = resource_summary(resource)
        if path is not None:
            prepare_parent(path)
            with path.open("w", encoding="utf-8") as f:
                json.dump(resource, f, separators=(",", ":"), ensure_ascii=False)
            out["path"] = str(path)
        log.info("Read %s version %s", self.resource_type, out["version_id"])
        if self.return_resource:
            out["resource"] = resource
        return out

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        outputs = [storage_dataset(str(self.output_path))] if self.output_path else []
        return [(self.lineage_namespace(), self.resource_type)], outputs


def _id_arg(value: Any) -> Any:
    """An id argument as a string: native templating renders ``"{{ params.id }}"`` as an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else value


# -- update ----------------------------------------------------------------------------------------

class ModMedUpdateResourceOperator(ModMedBaseOperator):
    """Update a resource with ``If-Match``, so a change made by someone else is never overwritten.

    Two ways, both safe to retry:

    * ``resource=`` the full new resource (with its ``id``) and the version it is based on: ``if_match``
      or the resource's own ``meta.versionId`` (as read). A stale version fails the task at once (412:
      nothing was written).
    * ``patch=`` with ``resource_type`` and ``resource_id``: read the current resource, apply the patch
      (an RFC 7396 JSON merge patch dict, templated, or a callable ``current -> new``), write it with
      ``If-Match`` on the version read. A concurrent change fails the attempt with a ConflictError; the
      retry reads again and re-applies. With ``if_match``, the read version must equal it.

    :param validate: validate the new resource with ``fhir.resources.R4B`` first (default True).
    :param return_resource: also return the updated resource (patient data!) under ``"resource"``.
    :return: ``{"resource_type", "id", "version_id", "last_updated", "previous_version_id", "changed"}``.
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "resource", "patch", "resource_type", "resource_id",
                                      "if_match")
    template_fields_renderers = {"resource": "json", "patch": "json"}
    phi_template_fields = ("resource", "patch")

    def __init__(self, *, resource: dict[str, Any] | str | None = None,
                 patch: dict[str, Any] | str | Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 resource_type: str | None = None, resource_id: str | None = None,
                 if_match: str | int | None = None, validate: bool = True, return_resource: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resource = resource
        # a callable template field would be *called* by Airflow's renderer: keep callables aside
        self.patch_callable = patch if callable(patch) else None
        self.patch = None if callable(patch) else patch
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.if_match = if_match
        self.validate = validate
        self.return_resource = return_resource

    def _target(self) -> tuple[str, str, dict[str, Any] | None]:
        resource_value = self.phi_value("resource")
        patch_value = self.phi_value("patch") if self.patch is not None else self.patch_callable
        if (resource_value in (None, "")) == (patch_value in (None, "", {})):
            raise ConfigurationError("pass either resource= (the full new resource) or patch= (with "
                                     "resource_type and resource_id), not both and not neither")
        if resource_value not in (None, ""):
            resource = _resource_arg(resource_value)
            rt = resource["resourceType"]
            if self.resource_type and self.resource_type != rt:
                raise ConfigurationError(f"resource_type {self.resource_type!r} differs from the resource's "
                                         f"{rt!r}")
            rid = resource.get("id") or _id_arg(self.resource_id)
            if self.resource_id and resource.get("id") and resource["id"] != _id_arg(self.resource_id):
                raise ConfigurationError("resource_id differs from the resource's id")
            if not rid:
                raise ConfigurationError("the resource to update needs its id (resource['id'] or resource_id)")
            resource["id"] = validate_id(rid, "resource['id']")
            return rt, resource["id"], resource
        if not self.resource_type:
            raise ConfigurationError("patch= needs resource_type")
        if not self.resource_id:
            raise ConfigurationError("patch= needs resource_id")
        return self.resource_type, validate_id(_id_arg(self.resource_id), "resource_id"), None

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            rt, rid, resource = self._target()
            self.resource_type = rt
            self.preflight(rt, Interaction.UPDATE)
            expected = _version_of(self.if_match, "if_match")
            if resource is not None:
                based_on = expected or _version_of((resource.get("meta") or {}).get("versionId"),
                                                   "resource['meta']['versionId']")
                if based_on is None:
                    raise ConfigurationError(
                        "update needs the version the new resource is based on, so that a change made "
                        "meanwhile is not overwritten: pass if_match=<versionId>, keep meta.versionId from "
                        "the read, or use patch= (read-modify-write)")
                if self.validate:
                    validate_resource(resource, rt)
            patch = parse_json_arg(self.phi_value("patch"), "patch") if self.patch is not None else None
            if patch is not None and not isinstance(patch, Mapping):
                raise ConfigurationError("patch must be a JSON merge patch dict or a callable")
        client = self.hook.get_conn()

        def run() -> dict[str, Any]:
            if resource is not None:
                return self._put(client, resource, based_on, previous=based_on)
            current = client.read(rt, rid)
            version = (current.get("meta") or {}).get("versionId")
            if expected is not None and version != expected:
                raise ConflictError(f"update of {rt} refused: it is at version {version}, not the expected "
                                    f"{expected}; nothing was written", status_code=412)
            new = (self.patch_callable(copy.deepcopy(current)) if self.patch_callable is not None
                   else json_merge_patch(current, patch))
            if not isinstance(new, Mapping) or new.get("resourceType") != rt:
                raise ConfigurationError(f"the patch must produce a {rt} resource")
            new = dict(new)
            new["id"] = rid
            if _without_meta(new) == _without_meta(current):
                log.info("The patch changes nothing in %s; not writing", rt)
                return {**resource_summary(current), "previous_version_id": version, "changed": False,
                        "_resource": current}
            if self.validate:
                with self.fail_fast():
                    validate_resource(new, rt)
            return self._put(client, new, version, previous=version)

        # a stale explicit version cannot succeed on retry: fail fast; a patch re-reads on retry
        with self.fail_fast():
            try:
                out = self.run_closing(run)
            except ConflictError as exc:
                if resource is not None or expected is not None:
                    from airflow.sdk.exceptions import AirflowFailException

                    raise AirflowFailException(f"ConflictError: {exc}") from exc
                raise
        updated = out.pop("_resource")
        log.info("Updated %s: version %s -> %s", rt, out["previous_version_id"], out["version_id"])
        if self.return_resource:
            out["resource"] = updated
        return out

    def _put(self, client: Any, new: dict[str, Any], version: str | None, previous: str | None) -> dict[str, Any]:
        rt = new["resourceType"]
        try:
            updated = client.update(new, if_match=version)
        except ConflictError as exc:
            if exc.status_code != 412:
                raise
            current = client.read(rt, new["id"])
            if _without_meta(current) == _without_meta(new):
                # our write landed and its answer was lost; the resent PUT met its own new version
                log.info("The update of %s was already applied (a retried request); nothing more to do", rt)
                updated = current
            else:
                now = (current.get("meta") or {}).get("versionId")
                raise ConflictError(
                    f"update of {rt} refused (HTTP 412): it changed since version {version} (now version "
                    f"{now}); nothing was written. Read it again and re-apply the change (patch= does this "
                    "on retry)", status_code=412, issues=exc.issues) from exc
        return {**resource_summary(updated), "previous_version_id": previous, "changed": True,
                "_resource": updated}

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        rt = self.resource_type or _resource_arg(self.phi_value("resource"))["resourceType"]
        return [], [(self.lineage_namespace(), rt)]


# -- delete ----------------------------------------------------------------------------------------

class ModMedDeleteResourceOperator(ModMedBaseOperator):
    """Delete one resource, where the capability matrix allows it (Patients on the proprietary track).

    Idempotent: a resource already deleted (410) counts as deleted. ``missing_ok=True`` also accepts an
    id that never existed (404).
    """

    template_fields: Sequence[str] = ("modmed_conn_id", "resource_type", "resource_id")

    def __init__(self, *, resource_type: str, resource_id: str, missing_ok: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resource_type = resource_type
        self.resource_id = resource_id
        self.missing_ok = missing_ok

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            self.preflight(self.resource_type, Interaction.DELETE)
            rid = validate_id(_id_arg(self.resource_id), "resource_id")

        def delete() -> bool:
            try:
                self.hook.get_conn().delete(self.resource_type, rid)
            except NotFoundError as exc:
                if exc.status_code == 410 or self.missing_ok:
                    log.info("%s was already gone (HTTP %s)", self.resource_type, exc.status_code)
                    return False
                raise
            return True

        deleted_now = self.run_closing(delete)
        log.info("Deleted %s", self.resource_type)
        return {"resource_type": self.resource_type, "id": rid, "deleted": True, "was_present": deleted_now}

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        return [], [(self.lineage_namespace(), self.resource_type)]


# -- search ----------------------------------------------------------------------------------------

class ModMedSearchResourcesOperator(ModMedBaseOperator):
    """Search a resource type through every page into an NDJSON file; return its path, count and ids.

    Memory stays flat whatever the size: one resource at a time goes from the API to the file.
    Matches are de-duplicated by id within the run.

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
    :return: ``{"path", "count", "ids", "ids_truncated", "resource_type", "window"}``.
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
                 **kwargs: Any) -> None:
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

    def _default_path(self, context: Context) -> str:
        base = output_base(self.output_base)
        ti = context.get("ti")
        map_index = getattr(ti, "map_index", -1)
        task = safe_segment(self.task_id) + (f"_{map_index}" if map_index not in (None, -1) else "")
        run_id = context.get("run_id") or getattr(ti, "run_id", None) or "run"
        return "/".join([str(base).rstrip("/"), safe_segment(self.dag_id), safe_segment(run_id), task,
                         f"{safe_segment(self.resource_type)}.ndjson"])

    def _window(self, context: Context) -> LastUpdatedWindow | None:
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
        return LastUpdatedWindow.of(start, end)

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
            mode = window.mode(self.track, self.capabilities, rt)
            if mode == "scan":
                log.info("%s has no _lastUpdated search on the proprietary track: reading every match and "
                         "keeping those updated in %s", rt, window.describe())
            elif mode == "widened":
                log.info("Proprietary _lastUpdated is day-granular: asking for whole days and keeping the "
                         "%s updated in %s", rt, window.describe())
            else:
                log.info("Searching %s updated in %s", rt, window.describe())
        client = self.hook.get_conn()
        keep = self.max_xcom_resources if self.return_resources else 0
        with self.fail_fast():
            result = self.run_closing(lambda: search_to_ndjson(
                client, rt, path, params, window=window, count=self.count, headers=self.headers or None,
                max_ids=self.max_ids, keep_resources=keep))
        stats = result.summary()
        log.info("Wrote %d %s resources to %s (read %d, %d duplicates dropped, %d outside the window)",
                 result.count, rt, path, stats["scanned"], stats["duplicates"], stats["outside_window"])
        if result.ids_truncated:
            log.info("Returning the first %d of %d ids (max_ids); the file has them all", self.max_ids,
                     result.count)
        out: dict[str, Any] = {"path": str(path), "count": result.count, "ids": result.ids,
                               "ids_truncated": result.ids_truncated, "resource_type": rt,
                               "window": None if window is None else {
                                   "start": window.start.isoformat() if window.start else None,
                                   "end": window.end.isoformat() if window.end else None,
                                   "mode": result.window_mode}}
        if self.return_resources:
            if result.resources_truncated:
                log.warning("return_resources: returning %d of %d resources (max_xcom_resources); read the "
                            "file for all", len(result.resources), result.count)
            out["resources"] = result.resources
            out["resources_truncated"] = result.resources_truncated
        return out

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        outputs = [storage_dataset(str(self.output_path))] if self.output_path else []
        return [(self.lineage_namespace(), self.resource_type)], outputs

