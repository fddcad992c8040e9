"""The sandbox's FHIR request handlers, one per interaction, shared by both tracks."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response

from airflow_provider_modmed.capabilities import Interaction, Track
from airflow_provider_modmed.profile import (
    CONDITION_CLINICAL_STATUS_CODES,
    DOCUMENT_CATEGORY_SYSTEM,
    PRESIGNED_URL_EXTENSION,
    RECONCILIATION_EXTENSION,
    TRANSACTION_ID_SYSTEM,
)
from airflow_provider_modmed.sandbox.fhir_api import (
    bundle,
    check_interaction,
    parse_filters,
    parse_if_match,
    search,
    validate_resource,
)
from airflow_provider_modmed.sandbox.http import FhirError, fhir_response, read_json
from airflow_provider_modmed.sandbox.seed_codes import DOTTED_ID_PREFIX
from airflow_provider_modmed.sandbox.state import SandboxState
from airflow_provider_modmed.sandbox.store import Row

_ID_PREFIX = {"ChargeItem": "CHG|", "Immunization": DOTTED_ID_PREFIX}


def _etag(row: Row) -> dict[str, str]:
    return {"ETag": f'W/"{row.version}"', "Last-Modified": row.body["meta"]["lastUpdated"]}


def _location(fhir_base: str, row: Row) -> str:
    from urllib.parse import quote

    return f"{fhir_base}/{row.type}/{quote(row.id, safe='')}/_history/{row.version}"


async def read(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
    rt, rid = request.path_params["rtype"], request.path_params["rid"]
    check_interaction(track, rt, Interaction.READ)
    if rt == "DocumentReference" and rid.startswith(("note|", "ccda|")):
        return fhir_response(_special_document(state, rid, fhir_base))
    row = state.store.get(rt, rid)
    if row is None:
        raise FhirError(404, "not-found", f"Resource {rt}/{rid} is not known")
    if row.deleted:
        raise FhirError(410, "deleted", f"Resource {rt}/{rid} has been deleted")
    state.stats["served"] += 1
    return fhir_response(row.body, headers=_etag(row))


def _special_document(state: SandboxState, rid: str, fhir_base: str) -> dict[str, Any]:
    """ModMed's special reads: ``note|{visitId}`` (a visit's note) and ``ccda|{patientId}`` (a C-CDA)."""
    from airflow_provider_modmed.sandbox.store import Filter

    kind, _, ref_id = rid.partition("|")
    if kind == "note":
        rows, _ = state.store.search("DocumentReference", [Filter("encounter", (f"Encounter/{ref_id}",))], count=1)
        if not rows:
            raise FhirError(404, "not-found", f"No visit note for Encounter/{ref_id}")
        return rows[0].body
    patient = state.store.get("Patient", ref_id)
    if patient is None or patient.deleted:
        raise FhirError(404, "not-found", f"Patient/{ref_id} is not known")
    import base64

    ccda = (f'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
            f'<id extension="{ref_id}"/></patientRole></recordTarget></ClinicalDocument>').encode()
    return {"resourceType": "DocumentReference", "id": rid, "status": "current",
            "meta": patient.body["meta"],
            "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9",
                                 "display": "Summary of episode note"}]},
            "category": [{"coding": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": "CCDA",
                                      "display": "CCDA"}]}],
            "subject": {"reference": f"Patient/{ref_id}"},
            "content": [{"attachment": {"contentType": "application/xml",
                                        "data": base64.b64encode(ccda).decode()}}]}


async def search_type(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
    rt = request.path_params["rtype"]
    check_interaction(track, rt, Interaction.SEARCH)
    query = request.query_params
    if request.method == "POST":  # POST _search with a form body
        form = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        query = QueryParams([*query.multi_items(), *form])
    page = search(state, track, rt, query, str(request.url), flags=request.headers.get("content-flag", ""))
    state.stats["served"] += len(page.rows)
    return fhir_response(bundle(page, fhir_base))


async def create(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
    rt = request.path_params["rtype"]
    check_interaction(track, rt, Interaction.CREATE)
    body: Any = await read_json(request)
    if rt == "Binary":
        return await _create_binary(state, body, fhir_base)
    resource = validate_resource(body, rt)
    if_none_exist = request.headers.get("if-none-exist")
    if if_none_exist:
        conditions = parse_filters(QueryParams(if_none_exist))
        if not conditions:
            raise FhirError(400, "invalid", "If-None-Exist must hold a supported search, e.g. identifier=...")
        rows, total = state.store.search(rt, conditions, count=2, with_total=True)
        if total and total > 1:
            raise FhirError(412, "duplicate", f"If-None-Exist matched {total} {rt} resources")
        if rows:
            state.stats["conditional_create_matched"] += 1
            return fhir_response(rows[0].body, 200, {**_etag(rows[0]), "Location": _location(fhir_base, rows[0])})
    if rt == "Condition":
        _check_condition_codes(resource)
    if rt == "ChargeItem":
        _check_transaction_id(state, resource)
    if rt == "Coverage":
        rec = state.store.new_id("Coverage#reconciliation", "REC-")
        resource.setdefault("extension", []).append({"url": RECONCILIATION_EXTENSION, "valueString": rec})
    if rt == "DocumentReference":
        _check_attachment(state, resource)
    row = state.store.create(resource, id_prefix=_ID_PREFIX.get(rt, ""))
    state.stats[f"created:{rt}"] += 1
    headers = {**_etag(row), "Location": _location(fhir_base, row)}
    if state.faults.empty_create_body:
        return Response(b"", status_code=201, headers=headers)
    return fhir_response(row.body, 201, headers)


def _check_condition_codes(resource: dict[str, Any]) -> None:
    """ModMed's code conventions on Condition create: an upper-case clinical status (``ACTIVE``)."""
    status = resource.get("clinicalStatus")
    codings = status.get("coding") if isinstance(status, dict) else None
    for coding in codings or ():
        code = coding.get("code") if isinstance(coding, dict) else None
        if code not in CONDITION_CLINICAL_STATUS_CODES:
            hint = f" (ModMed's convention: '{code.upper()}')" if isinstance(code, str) and \
                code.upper() in CONDITION_CLINICAL_STATUS_CODES else ""
            raise FhirError(400, "code-invalid", f"Condition.clinicalStatus code '{code}' is not one of "
                            f"{', '.join(CONDITION_CLINICAL_STATUS_CODES)}{hint}")


def _check_transaction_id(state: SandboxState, resource: dict[str, Any]) -> None:
    for ident in resource.get("identifier") or ():
        if ident.get("system") == TRANSACTION_ID_SYSTEM and ident.get("value"):
            from airflow_provider_modmed.sandbox.store import Filter

            rows, _ = state.store.search("ChargeItem", [Filter("identifier", (
                f"{TRANSACTION_ID_SYSTEM}|{ident['value']}",))], count=1)
            if rows:
                raise FhirError(409, "duplicate", f"Duplicate transactionId; existing ChargeItem/{rows[0].id}")


def _check_attachment(state: SandboxState, resource: dict[str, Any]) -> None:
    for content in resource.get("content") or ():
        url = (content.get("attachment") or {}).get("url")
        if not url:
            continue
        if url.startswith(state.storage_url):
            key = url[len(state.storage_url):].split("?", 1)[0]
            if key not in state.uploads:
                raise FhirError(422, "invalid", "content.attachment.url: nothing was uploaded to this URL "
                                "(PUT the file to the presigned URL first)")


async def _create_binary(state: SandboxState, body: Any, fhir_base: str) -> Response:
    content_type = "application/octet-stream"
    if isinstance(body, dict):
        if body.get("resourceType") not in (None, "Binary"):
            raise FhirError(400, "invalid", "Binary body must be a Binary resource or empty")
        content_type = body.get("contentType") or content_type
    rid = state.store.new_id("Binary")
    # the storage listener is shared: a further practice's upload keys carry its firm
    url = state.presign(f"/uploads/binary-{rid}" if state.root is state else f"/uploads/{state.firm}-binary-{rid}")
    state.stats["presigned_issued"] += 1
    resource = {"resourceType": "Binary", "id": rid, "contentType": content_type,
                "extension": [{"url": PRESIGNED_URL_EXTENSION, "valueUrl": url}]}
    return fhir_response(resource, 201, {"Location": f"{fhir_base}/Binary/{rid}"})


async def update(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
    rt, rid = request.path_params["rtype"], request.path_params["rid"]
    check_interaction(track, rt, Interaction.UPDATE)
    resource = validate_resource(await read_json(request), rt)
    if resource.get("id") != rid:
        raise FhirError(400, "invalid", f"Resource id '{resource.get('id')}' does not match the URL id '{rid}'")
    expected = parse_if_match(request.headers.get("if-match"))
    with state.lock:
        current = state.store.get(rt, rid)
        if current is None or current.deleted:
            raise FhirError(404, "not-found", f"Resource {rt}/{rid} is not known")
        if expected is not None and expected != current.version:
            raise FhirError(412, "conflict", f"Version conflict: If-Match W/\"{expected}\" but {rt}/{rid} is "
                            f"at version {current.version}")
        row = state.store.update(resource)
    state.stats[f"updated:{rt}"] += 1
    return fhir_response(row.body, 200, {**_etag(row), "Location": _location(fhir_base, row)})


async def delete(state: SandboxState, track: Track, request: Request, fhir_base: str) -> Response:
    rt, rid = request.path_params["rtype"], request.path_params["rid"]
    check_interaction(track, rt, Interaction.DELETE)
    row = state.store.delete(rt, rid)
    if row is None and state.store.get(rt, rid) is None:
        raise FhirError(404, "not-found", f"Resource {rt}/{rid} is not known")
    state.stats[f"deleted:{rt}"] += 1
    return Response(b"", status_code=204)
