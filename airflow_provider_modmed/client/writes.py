"""Safe writes as request flows: create, update, patch and delete, with their resend rules.

Written once and served by both faces (``FhirClient``/``AsyncFhirClient`` run them) and by the
operators. Like every flow (:mod:`._flows`), a write flow yields ``httpx.Request`` steps and returns a
result; its constructor validates the arguments and runs the capability pre-flight before any request
exists. The rules that make a write safe to repeat:

* **create**: conditional with ``If-None-Exist``; a ChargeItem's ``transaction_id`` becomes its
  identifier (``profile.TRANSACTION_ID_SYSTEM``) and the condition, and a 409 (ModMed refuses a second
  ChargeItem with that transactionId) finds the existing one by that identifier and returns it; only a
  match that carries the key is trusted.
* **update**: ``If-Match`` on the version the new resource is based on. A 412 on a *resent* PUT
  (:func:`~airflow_provider_modmed.client.retry.was_resent`: the earlier attempt may have landed and its
  answer been lost) reads the resource back: the same content (``meta`` and ``text`` aside) means our
  write landed, and it is returned. Otherwise a :class:`ConflictError` names the versions.
* **patch**: read, check the expected version, apply an RFC 7396 merge patch (or a function of the
  current resource), skip the write when nothing changes, and PUT with ``If-Match`` on the version read.
* **delete**: 410 means already deleted. After a resend whose earlier attempt may have landed (its
  answer lost; a 429 or a connect error does not count), 404 and 410 both mean our earlier attempt
  deleted it: servers differ in which they answer for a deleted resource. A 404 on the first try fails
  unless ``missing_ok``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client._flows import (
    FHIR_JSON,
    FhirContext,
    _check,
    _request,
    expect,
    expect_resource,
    json_body,
    parse_location,
    read,
    resource_url,
    search,
    search_pairs,
    validate_id,
)
from airflow_provider_modmed.client.drivers import Emit, Flow
from airflow_provider_modmed.client.retry import SAFE_TO_RETRY, was_resent
from airflow_provider_modmed.client.validation import validate_resource
from airflow_provider_modmed.errors import ConfigurationError, ConflictError, ModMedError, error_for_status
from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM

__all__ = [
    "TRANSACTION_ID_SYSTEM",
    "Condition",
    "Patch",
    "PatchResult",
    "create",
    "delete",
    "first",
    "json_merge_patch",
    "patch",
    "resource_type_of",
    "transaction_id_of",
    "update",
    "version_of",
    "with_transaction_id",
    "without_meta",
]

log = logging.getLogger("airflow_provider_modmed.client")

#: an RFC 7396 JSON merge patch, or a function of the current resource returning the new one
Patch = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]
#: an ``If-None-Exist`` search: a query string, a dict or (name, value) pairs
Condition = str | Mapping[str, Any] | Sequence[tuple[str, Any]]

_VERSION_RE = re.compile(r'(?:W/)?"?([A-Za-z0-9.\-]{1,64})"?')


@dataclass(frozen=True)
class PatchResult:
    """What :func:`patch` did: the resource as stored now, and whether it was written."""

    resource: dict[str, Any]
    #: False when the patch changed nothing (no request was written)
    changed: bool
    #: the version the patch was applied to
    previous_version_id: str | None


# -- pure helpers ----------------------------------------------------------------------------------

def version_of(value: Any, name: str = "if_match") -> str | None:
    """The version id in ``3``, ``"3"`` or an ETag ``W/"3"``; None for None or ``""``.

    Anything else raises :class:`ConfigurationError` naming ``name`` (it would go into a header).
    """
    if value is None or value == "":
        return None
    text = str(value).strip()
    m = _VERSION_RE.fullmatch(text)
    if not m:
        raise ConfigurationError(f"{name} must be a version id such as 3 or W/\"3\", got {text[:40]!r}")
    return m.group(1)


def _version_id(resource: Mapping[str, Any]) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    return None if version is None else str(version)


def without_meta(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The resource without ``meta`` and ``text`` (what the server sets): its content, for comparison."""
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


def resource_type_of(resource: Any) -> str:
    """The ``resourceType`` of a resource dict; :class:`ConfigurationError` when there is none."""
    if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
        raise ConfigurationError("resource must be a FHIR resource dict with a resourceType")
    return str(resource["resourceType"])


def transaction_id_of(resource: Mapping[str, Any]) -> str | None:
    """The transactionId a ChargeItem carries (its identifier in ``TRANSACTION_ID_SYSTEM``), if any."""
    if resource.get("resourceType") != "ChargeItem":
        return None
    return next((str(i["value"]) for i in resource.get("identifier") or ()
                 if isinstance(i, Mapping) and i.get("system") == TRANSACTION_ID_SYSTEM and i.get("value")), None)


def with_transaction_id(resource: Mapping[str, Any], transaction_id: str) -> dict[str, Any]:
    """A copy of the ChargeItem ``resource`` carrying ``transaction_id`` as its transactionId identifier.

    Raises :class:`ConfigurationError` for another resource type, or when the resource already carries a
    different transactionId.
    """
    rt = resource_type_of(resource)
    if rt != "ChargeItem":
        raise ConfigurationError(f"transaction_id applies to ChargeItem only, not {rt}")
    out = copy.deepcopy(dict(resource))
    idents = out.setdefault("identifier", [])
    present = [i for i in idents if isinstance(i, Mapping) and i.get("system") == TRANSACTION_ID_SYSTEM]
    if any(i.get("value") != transaction_id for i in present):
        raise ConfigurationError("transaction_id differs from the resource's transaction-id identifier")
    if not present:
        idents.append({"system": TRANSACTION_ID_SYSTEM, "value": transaction_id})
    return out


def _carries(resource: Mapping[str, Any], system: str, value: str) -> bool:
    return any(isinstance(i, Mapping) and i.get("system") == system and i.get("value") == value
               for i in resource.get("identifier") or ())


def _body(resource: Mapping[str, Any]) -> bytes:
    return json.dumps(resource, separators=(",", ":")).encode()


def first(sub: Flow[Any]) -> Flow[dict[str, Any] | None]:
    """Run a search sub-flow until its first resource (passing its requests up); None if it has none."""
    sent: Any = None
    try:
        while True:
            try:
                step = sub.send(sent)
            except StopIteration:
                return None
            if isinstance(step, Emit):
                return dict(step.value)
            sent = yield step
    finally:
        sub.close()


# -- the answer of a write -------------------------------------------------------------------------

def _written(ctx: FhirContext, response: httpx.Response, resource_type: str, what: str) -> Flow[dict[str, Any]]:
    """The resource a successful write answered; ModMed may answer 201 with only a ``Location``, which
    is then read back (unless the type cannot be read)."""
    body = expect(response, (200, 201), what)
    if isinstance(body, dict) and body.get("resourceType") == resource_type:
        return body
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    if not location:
        raise ModMedError(f"{what} answered neither the resource nor a Location", status_code=response.status_code)
    located_type, located_id = parse_location(location, ctx.base)
    if located_type != resource_type:
        raise ModMedError(f"{what} answered a Location for {located_type!r}")
    if not ctx.capabilities.allows(ctx.track, resource_type, Interaction.READ):
        return {"resourceType": resource_type, "id": located_id}  # write-only type: nothing to read
    log.debug("modmed: %s answered no body; reading it back", what)
    response = yield _request("GET", resource_url(ctx, resource_type, located_id), f"read {resource_type}")
    return expect_resource(response, f"read back after {what}", resource_type=resource_type)


# -- create ----------------------------------------------------------------------------------------

def create(ctx: FhirContext, resource: Mapping[str, Any], if_none_exist: Condition | None = None,
           transaction_id: str | None = None) -> Flow[dict[str, Any]]:
    """POST ``[base]/Type``; conditional with ``If-None-Exist``. Returns the stored resource.

    ``transaction_id`` (ChargeItem only) is added as the transactionId identifier, makes the condition
    when none is given, and a 409 then returns the ChargeItem found under it. A POST is marked safe to
    retry only when it is conditional or is a ChargeItem carrying a transactionId.
    """
    resource_type = _check(ctx, resource_type_of(resource), Interaction.CREATE).resource_type
    txid = None if transaction_id in (None, "") else str(transaction_id)
    if txid is not None:
        resource = with_transaction_id(resource, txid)
        if not if_none_exist:
            if_none_exist = {"identifier": f"{TRANSACTION_ID_SYSTEM}|{txid}"}
    headers = {"Content-Type": FHIR_JSON}
    if if_none_exist:
        headers["If-None-Exist"] = (if_none_exist if isinstance(if_none_exist, str)
                                    else urlencode(search_pairs(if_none_exist)))
    what = f"create {resource_type}"
    safe = bool(if_none_exist) or transaction_id_of(resource) is not None
    request = _request("POST", resource_url(ctx, resource_type), what, headers=headers, content=_body(resource),
                       extensions={SAFE_TO_RETRY: safe})
    return _create(ctx, request, resource_type, what, txid)


def _create(ctx: FhirContext, request: httpx.Request, resource_type: str, what: str,
            txid: str | None) -> Flow[dict[str, Any]]:
    response = yield request
    if response.status_code == 409 and txid is not None:
        conflict = error_for_status(409, json_body(response), what)
        # ModMed refuses a second ChargeItem with this transactionId: an earlier attempt created it
        found = yield from first(search(ctx, resource_type, {"identifier": f"{TRANSACTION_ID_SYSTEM}|{txid}"},
                                        count=1))
        if found is None or not _carries(found, TRANSACTION_ID_SYSTEM, txid):
            raise conflict  # nothing found, or a server ignoring the search: the match is not trusted
        log.info("modmed: a %s with this transaction_id exists already (an earlier attempt); returning it",
                 resource_type)
        return found
    return (yield from _written(ctx, response, resource_type, what))


# -- update and patch ------------------------------------------------------------------------------

def update(ctx: FhirContext, resource: Mapping[str, Any], if_match: str | int | None = None, *,
           may_have_landed: bool = False) -> Flow[dict[str, Any]]:
    """PUT ``[base]/Type/id``; with ``if_match`` (the expected ``versionId``) the server refuses with
    412 if the version moved on.

    A 412 on a resent PUT is read back: the same content means our write landed (it is returned).
    ``may_have_landed=True`` treats a 412 on the first try the same way (the caller repeats a write
    that may have landed, e.g. a retried task). Any other 412 raises :class:`ConflictError` naming the
    versions: nothing was written.
    """
    resource_type = _check(ctx, resource_type_of(resource), Interaction.UPDATE).resource_type
    resource_id = validate_id(resource.get("id"), "resource['id']")
    version = version_of(if_match, "if_match")
    return _update(ctx, dict(resource), resource_type, resource_id, version, may_have_landed)


def _update(ctx: FhirContext, resource: dict[str, Any], resource_type: str, resource_id: str,
            version: str | None, may_have_landed: bool = False) -> Flow[dict[str, Any]]:
    what = f"update {resource_type}"
    headers = {"Content-Type": FHIR_JSON}
    if version is not None:
        headers["If-Match"] = f'W/"{version}"'
    response = yield _request("PUT", resource_url(ctx, resource_type, resource_id), what, headers=headers,
                              content=_body(resource))
    if response.status_code != 412 or version is None:
        return (yield from _written(ctx, response, resource_type, what))
    conflict = error_for_status(412, json_body(response), what)
    current: dict[str, Any] | None = None
    if ctx.capabilities.allows(ctx.track, resource_type, Interaction.READ):
        answer = yield _request("GET", resource_url(ctx, resource_type, resource_id), f"read {resource_type}")
        if answer.status_code == 200:
            current = expect_resource(answer, f"read back after {what}", resource_type=resource_type)
    if current is not None and (may_have_landed or was_resent(response)) \
            and without_meta(current) == without_meta(resource):
        log.info("modmed: %s was already applied (the answer to an earlier attempt was lost)", what)
        return current
    now = "unknown" if current is None else _version_id(current)
    raise ConflictError(f"update of {resource_type} refused: it changed since version {version} (now version "
                        f"{now}); nothing was written. Read it again and re-apply the change (a patch does "
                        "this)", status_code=412, issues=conflict.issues)


def patch(ctx: FhirContext, resource_type: str, resource_id: str, patch: Patch,
          if_match: str | int | None = None, *, validate: bool = False) -> Flow[PatchResult]:
    """Read-modify-write: read the resource, apply ``patch``, PUT it with ``If-Match`` on the version read.

    ``patch`` is an RFC 7396 merge patch dict or a function ``current -> new``. With ``if_match`` the
    version read must equal it (else :class:`ConflictError`, nothing written). A patch that changes
    nothing writes nothing. A concurrent change between the read and the PUT raises
    :class:`ConflictError`; calling again reads anew. ``validate`` checks the new resource with
    ``fhir.resources.R4B`` before it is written.
    """
    spec = _check(ctx, resource_type, Interaction.UPDATE)
    _check(ctx, resource_type, Interaction.READ)
    resource_id = validate_id(resource_id, "resource_id")
    expected = version_of(if_match, "if_match")
    if not callable(patch) and not isinstance(patch, Mapping):
        raise ConfigurationError("patch must be a JSON merge patch dict or a callable current -> new")
    return _patch(ctx, spec.resource_type, resource_id, patch, expected, validate)


def _patch(ctx: FhirContext, resource_type: str, resource_id: str, patch: Patch, expected: str | None,
           validate: bool) -> Flow[PatchResult]:
    current = yield from read(ctx, resource_type, resource_id)
    version = _version_id(current)
    if expected is not None and version != expected:
        raise ConflictError(f"update of {resource_type} refused: it is at version {version}, not the expected "
                            f"{expected}; nothing was written", status_code=412)
    new = patch(copy.deepcopy(current)) if callable(patch) else json_merge_patch(current, patch)
    if not isinstance(new, Mapping) or new.get("resourceType") != resource_type:
        raise ConfigurationError(f"the patch must produce a {resource_type} resource")
    new = {**new, "id": resource_id}
    if without_meta(new) == without_meta(current):
        log.info("modmed: the patch changes nothing in %s; not writing", resource_type)
        return PatchResult(current, False, version)
    if validate:
        validate_resource(new, resource_type)
    updated = yield from _update(ctx, new, resource_type, resource_id, version)
    return PatchResult(updated, True, version)


# -- delete ----------------------------------------------------------------------------------------

def delete(ctx: FhirContext, resource_type: str, resource_id: str, missing_ok: bool = False) -> Flow[bool]:
    """DELETE ``[base]/Type/id``; returns whether the resource was there to delete.

    410 means already deleted (False). A 404 or 410 answering a resend means the earlier attempt, whose
    answer was lost, deleted it (True). A 404 on the first try raises :class:`NotFoundError` unless
    ``missing_ok`` (then False).
    """
    _check(ctx, resource_type, Interaction.DELETE)
    what = f"delete {resource_type}"
    return _delete(_request("DELETE", resource_url(ctx, resource_type, resource_id), what), what, missing_ok)


def _delete(request: httpx.Request, what: str, missing_ok: bool) -> Flow[bool]:
    response = yield request
    status, resent = response.status_code, was_resent(response)
    if status == 410 or (status == 404 and (resent or missing_ok)):
        log.info("modmed: %s: already gone (HTTP %d%s)", what, status, " after a resend" if resent else "")
        return resent
    expect(response, (200, 202, 204), what)
    return True
