"""Operators for ModMed FHIR resources: create, read, update, delete and search (to NDJSON).

Every operator checks its arguments and the capability matrix for the connection's track in
``execute`` before any network call; errors no retry can fix (unknown type, refused interaction,
invalid resource, missing id) fail the task at once. Writes are safe to retry by the rules of the
client's write flows (:mod:`airflow_provider_modmed.client.writes`): conditional create
(``if_none_exist``, a ChargeItem's ``transaction_id``), ``If-Match`` updates, read-modify-write patches,
idempotent deletes. Nothing patient-related is logged or pushed to XCom by default: operators return
types, ids, versions, counts and paths.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client._flows import validate_id
from airflow_provider_modmed.client.ndjson import prepare_parent
from airflow_provider_modmed.client.validation import validate_resource
from airflow_provider_modmed.client.writes import PatchResult, json_merge_patch, version_of, with_transaction_id
from airflow_provider_modmed.errors import ConfigurationError, ConflictError
from airflow_provider_modmed.operators._common import (
    ModMedBaseOperator,
    parse_json_arg,
    resource_summary,
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
    "json_merge_patch",  # lives in client.writes; still importable from here
]

log = logging.getLogger(__name__)

def _resource_arg(value: Any, name: str = "resource") -> dict[str, Any]:
    value = parse_json_arg(value, name)
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a FHIR resource dict (or its JSON), got {type(value).__name__}")
    if not isinstance(value.get("resourceType"), str) or not value.get("resourceType"):
        raise ConfigurationError(f"{name} needs a resourceType")
    return copy.deepcopy(dict(value))


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

    def _prepare(self) -> tuple[dict[str, Any], str | dict[str, Any] | None, str | None]:
        """The resource (with its transactionId identifier), the If-None-Exist condition, the transaction id."""
        resource = _resource_arg(self.phi_value("resource"))
        rt = resource["resourceType"]
        self._resource_type = rt
        self.preflight(rt, Interaction.CREATE)
        condition: Any = parse_json_arg(self.phi_value("if_none_exist"), "if_none_exist")
        txid = None if self.transaction_id in (None, "") else str(self.transaction_id)
        if txid is not None:  # checked and added here (validated below); the flow makes the condition
            resource = with_transaction_id(resource, txid)
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
        return resource, condition, txid

    def execute(self, context: Context) -> dict[str, Any]:
        with self.fail_fast():
            resource, condition, txid = self._prepare()
        rt = resource["resourceType"]
        conditional = condition is not None or txid is not None
        if not conditional and (self.retries or 0) > 0:
            log.warning("Creating %s without if_none_exist: if an answer is lost, the retry could create a "
                        "duplicate; pass if_none_exist (or transaction_id for a ChargeItem)", rt)
        client = self.hook.get_conn()
        with self.fail_fast():
            created = self.run_closing(lambda: client.create(resource, condition, transaction_id=txid))
        out = resource_summary(created)
        if rt == "Coverage":
            out["reconciliation_id"] = _reconciliation_id(created)
        log.info("Created %s (conditional: %s)", rt, "yes" if conditional else "no")
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
            expected = version_of(self.if_match, "if_match")
            based_on: str | None = None
            patch: Any = None
            if resource is not None:
                based_on = expected or version_of((resource.get("meta") or {}).get("versionId"),
                                                  "resource['meta']['versionId']")
                if based_on is None:
                    raise ConfigurationError(
                        "update needs the version the new resource is based on, so that a change made "
                        "meanwhile is not overwritten: pass if_match=<versionId>, keep meta.versionId from "
                        "the read, or use patch= (read-modify-write)")
                if self.validate:
                    validate_resource(resource, rt)
            else:
                patch = self.patch_callable or parse_json_arg(self.phi_value("patch"), "patch")
                if not callable(patch) and not isinstance(patch, Mapping):
                    raise ConfigurationError("patch must be a JSON merge patch dict or a callable")
        client = self.hook.get_conn()
        # a retried task repeats a PUT that may have landed: a 412 is then read back like a resend's
        retried = int(getattr(context.get("ti"), "try_number", 1) or 1) > 1

        def run() -> PatchResult:
            if resource is not None:
                updated = client.update(resource, if_match=based_on, may_have_landed=retried)
                return PatchResult(updated, True, based_on)
            return client.patch(rt, rid, patch, if_match=expected, validate=self.validate)

        # a stale explicit version cannot succeed on retry: fail fast; a patch re-reads on retry
        with self.fail_fast():
            try:
                result = self.run_closing(run)
            except ConflictError as exc:
                if resource is not None or expected is not None:
                    from airflow.sdk.exceptions import AirflowFailException

                    raise AirflowFailException(f"ConflictError: {exc}") from exc
                raise
        out = {**resource_summary(result.resource), "previous_version_id": result.previous_version_id,
               "changed": result.changed}
        log.info("Updated %s: version %s -> %s", rt, out["previous_version_id"], out["version_id"])
        if self.return_resource:
            out["resource"] = result.resource
        return out

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
        was_present = self.run_closing(
            lambda: self.hook.get_conn().delete(self.resource_type, rid, missing_ok=self.missing_ok))
        log.info("Deleted %s", self.resource_type)
        return {"resource_type": self.resource_type, "id": rid, "deleted": True, "was_present": was_present}

    def lineage_datasets(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        return [], [(self.lineage_namespace(), self.resource_type)]


from airflow_provider_modmed.operators.search import ModMedSearchResourcesOperator  # noqa: E402  (moved; still importable here)
