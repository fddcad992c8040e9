"""ModMed's three-step document upload, written once as a flow and driven by both client faces.

1. ``POST [base]/Binary`` answers a presigned object-storage URL on another host, valid 5 minutes;
2. ``PUT`` the bytes to that URL, with **no** credentials (marked :data:`NO_CREDENTIALS`: neither the
   bearer token nor the API key goes to the storage host); an answer saying the URL expired makes the
   flow ask for a new URL (step 1 again), up to ``max_url_attempts`` times;
3. ``POST [base]/DocumentReference`` pointing at the URL, with the category from the firm's
   ``ValueSet/document-category`` and an optional patient.

Safe to retry: the DocumentReference carries an idempotency identifier (by default a digest of the
bytes, the file name and the patient). The flow first searches for it and, when a previous attempt
already created the document, returns that one without uploading again; the create itself is
conditional (``If-None-Exist``) on the same identifier, so a retry racing a lost answer matches too.

Usage::

    from airflow_provider_modmed.client.documents import upload_document

    with FhirClient(config) as client:
        result = upload_document(client, pdf_bytes, filename="scan.pdf", category="Insurance Card",
                                 patient_id="123")
        result.id  # the DocumentReference id
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from airflow_provider_modmed.capabilities import Interaction
from airflow_provider_modmed.client._flows import (
    FHIR_JSON,
    FhirContext,
    _check,
    _request,
    expect_resource,
    resource_url,
    search,
    validate_id,
)
from airflow_provider_modmed.client.auth import NO_CREDENTIALS
from airflow_provider_modmed.client.config import secure_url
from airflow_provider_modmed.client.drivers import Flow
from airflow_provider_modmed.client.retry import SAFE_TO_RETRY, WHAT
from airflow_provider_modmed.client.validation import validate_resource
from airflow_provider_modmed.client.writes import create, first
from airflow_provider_modmed.errors import ConfigurationError, ModMedError
from airflow_provider_modmed.profile import DOCUMENT_CATEGORY_SYSTEM, PRESIGNED_URL_EXTENSION

if TYPE_CHECKING:
    from airflow_provider_modmed.client.fhir import AsyncFhirClient, FhirClient

__all__ = [
    "DOCUMENT_CATEGORY_SYSTEM",
    "DOCUMENT_CATEGORY_VALUE_SET",
    "FILENAME_SYSTEM",
    "PRESIGNED_URL_EXTENSION",
    "UPLOAD_KEY_SYSTEM",
    "DocumentUpload",
    "UploadResult",
    "aupload_document",
    "category_coding",
    "default_upload_key",
    "document_reference",
    "guess_content_type",
    "upload",
    "upload_document",
]

log = logging.getLogger("airflow_provider_modmed.client")

#: the id of the firm's document-category ValueSet (its codes are in ``profile.DOCUMENT_CATEGORY_SYSTEM``,
#: used when a coding names no system; the presigned URL comes in ``profile.PRESIGNED_URL_EXTENSION``)
DOCUMENT_CATEGORY_VALUE_SET = "document-category"
#: ModMed's identifier system for the uploaded file's name
FILENAME_SYSTEM = "filename"
#: this provider's identifier system for an upload's idempotency key
UPLOAD_KEY_SYSTEM = "urn:airflow-provider-modmed:upload-key"
#: presigned URLs asked for before giving up (each expired PUT asks for a new one)
MAX_URL_ATTEMPTS = 3


@dataclass(frozen=True)
class DocumentUpload:
    """What to upload. Build it with :func:`upload_document` or directly (then call :func:`upload`)."""

    content: bytes
    filename: str
    #: a category code (``"LAB"``), a display name (``"Lab Result"``), or a full coding dict
    category: str | Mapping[str, Any]
    content_type: str = ""
    patient_id: str | None = None
    description: str | None = None
    #: identifies this upload across retries; default :func:`default_upload_key`
    idempotency_key: str | None = None
    #: search for (and conditionally create on) the idempotency key; False always uploads anew
    deduplicate: bool = True


@dataclass(frozen=True)
class UploadResult:
    """The outcome of an upload (no patient data: ids, sizes and counts)."""

    id: str
    version_id: str | None
    #: False when a DocumentReference with this upload's key already existed (a retried task)
    created: bool
    #: presigned URLs requested (1 unless one expired)
    url_attempts: int
    size: int
    content_type: str
    category_code: str
    idempotency_key: str

    def to_dict(self) -> dict[str, Any]:
        return {"resource_type": "DocumentReference", "id": self.id, "version_id": self.version_id,
                "created": self.created, "url_attempts": self.url_attempts, "size": self.size,
                "content_type": self.content_type, "category": self.category_code}


# -- pure helpers ----------------------------------------------------------------------------------

def guess_content_type(filename: str) -> str:
    """The MIME type ``mimetypes`` guesses from the file name, ``application/octet-stream`` otherwise."""
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def default_upload_key(content: bytes, filename: str, patient_id: str | None) -> str:
    """A stable key for "this file, under this name, for this patient": a SHA-256 hex digest."""
    h = hashlib.sha256()
    for part in (hashlib.sha256(content).hexdigest(), filename, patient_id or ""):
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def _concepts(value_set: Mapping[str, Any]) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    for item in (value_set.get("expansion") or {}).get("contains") or ():
        if isinstance(item, Mapping) and item.get("code"):
            found.append({"system": str(item.get("system") or ""), "code": str(item["code"]),
                          "display": str(item.get("display") or "")})
    for include in (value_set.get("compose") or {}).get("include") or ():
        system = str(include.get("system") or "") if isinstance(include, Mapping) else ""
        for concept in (include.get("concept") or ()) if isinstance(include, Mapping) else ():
            if isinstance(concept, Mapping) and concept.get("code"):
                found.append({"system": system, "code": str(concept["code"]),
                              "display": str(concept.get("display") or "")})
    return found


def category_coding(value_set: Mapping[str, Any], category: str) -> dict[str, str]:
    """The coding of ``category`` (a code or a display name, case-insensitive) in the firm's ValueSet.

    Raises :class:`ConfigurationError` listing the firm's categories when nothing matches.
    """
    concepts = _concepts(value_set)
    wanted = category.strip()
    for test in (lambda c: c["code"] == wanted,
                 lambda c: c["code"].lower() == wanted.lower(),
                 lambda c: c["display"].lower() == wanted.lower()):
        for concept in concepts:
            if test(concept):
                coding = {"system": concept["system"] or DOCUMENT_CATEGORY_SYSTEM, "code": concept["code"]}
                if concept["display"]:
                    coding["display"] = concept["display"]
                return coding
    offered = ", ".join(f"{c['code']} ({c['display']})" if c["display"] else c["code"] for c in concepts)
    raise ConfigurationError(f"category {wanted!r} is not in the firm's ValueSet/{DOCUMENT_CATEGORY_VALUE_SET}"
                             f"; use a code or display name from: {offered or 'none (the ValueSet is empty)'}")


def _coding_of(category: Mapping[str, Any]) -> dict[str, str]:
    coding = category.get("coding")
    if isinstance(coding, list) and coding and isinstance(coding[0], Mapping):
        category = coding[0]
    if not category.get("code"):
        raise ConfigurationError("category coding needs a 'code' (or pass the code or display name as a string)")
    out = {"system": str(category.get("system") or DOCUMENT_CATEGORY_SYSTEM), "code": str(category["code"])}
    if category.get("display"):
        out["display"] = str(category["display"])
    return out


def document_reference(*, url: str, doc: DocumentUpload, coding: Mapping[str, str], key: str) -> dict[str, Any]:
    """The DocumentReference of step 3 (ModMed's shape: filename identifier, MIME type as ``type.text``)."""
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "identifier": [{"system": FILENAME_SYSTEM, "value": doc.filename}],
        "type": {"text": doc.content_type},
        "category": [{"coding": [dict(coding)]}],
        "content": [{"attachment": {"url": url, "contentType": doc.content_type, "title": doc.filename,
                                    "size": len(doc.content)}}],
    }
    if doc.deduplicate:
        resource["identifier"].append({"system": UPLOAD_KEY_SYSTEM, "value": key})
    if doc.patient_id:
        resource["subject"] = {"reference": f"Patient/{doc.patient_id}"}
    if doc.description:
        resource["description"] = doc.description
    return resource


def presigned_url(binary: Mapping[str, Any]) -> str:
    """The presigned URL of a Binary answered by step 1."""
    for ext in binary.get("extension") or ():
        if isinstance(ext, Mapping) and ext.get("url") == PRESIGNED_URL_EXTENSION:
            value = ext.get("valueUrl") or ext.get("valueUri")
            if isinstance(value, str) and value:
                return value
    raise ModMedError("create Binary answered no presigned upload URL "
                      f"(extension {PRESIGNED_URL_EXTENSION})")


def _storage_error(response: httpx.Response) -> tuple[str, bool]:
    """(S3 error code or '', whether the answer says the URL expired)."""
    text = response.text[:2000] if response.content else ""
    code = ""
    if "<Code>" in text and "</Code>" in text:
        code = text.split("<Code>", 1)[1].split("</Code>", 1)[0][:64]
    expired = response.status_code in (400, 403) and ("expired" in text.lower() or code == "ExpiredToken")
    return code, expired


# -- the flow --------------------------------------------------------------------------------------

def upload(ctx: FhirContext, doc: DocumentUpload, *,
           max_url_attempts: int = MAX_URL_ATTEMPTS) -> Flow[UploadResult]:
    """The upload flow. Arguments and the capability pre-flight are checked now, before any request."""
    _check(ctx, "Binary", Interaction.CREATE)
    _check(ctx, "DocumentReference", Interaction.CREATE)
    if not isinstance(doc.content, (bytes, bytearray)):
        raise ConfigurationError(f"content must be bytes, got {type(doc.content).__name__}")
    if not doc.filename or not isinstance(doc.filename, str):
        raise ConfigurationError("filename is required: ModMed files the document under it")
    if doc.patient_id is not None:
        validate_id(doc.patient_id, "patient_id")
    if not doc.content_type:
        doc = dataclasses.replace(doc, content_type=guess_content_type(doc.filename))
    if isinstance(doc.category, str):
        if not doc.category.strip():
            raise ConfigurationError("category is required: a code or display name from the firm's "
                                     f"ValueSet/{DOCUMENT_CATEGORY_VALUE_SET}")
        _check(ctx, "ValueSet", Interaction.READ)
    elif isinstance(doc.category, Mapping):
        _coding_of(doc.category)
    else:
        raise ConfigurationError("category must be a code, a display name or a coding dict")
    if max_url_attempts < 1:
        raise ConfigurationError("max_url_attempts must be >= 1")
    return _upload(ctx, doc, max_url_attempts)


def _upload(ctx: FhirContext, doc: DocumentUpload, max_url_attempts: int) -> Flow[UploadResult]:
    key = doc.idempotency_key or default_upload_key(bytes(doc.content), doc.filename, doc.patient_id)
    # the category first: a wrong one must fail before anything is uploaded
    if isinstance(doc.category, str):
        response = yield _request("GET", resource_url(ctx, "ValueSet", DOCUMENT_CATEGORY_VALUE_SET),
                                  "read ValueSet")
        coding = category_coding(expect_resource(response, "read ValueSet/document-category"), doc.category)
    else:
        coding = _coding_of(doc.category)

    def result(resource: Mapping[str, Any], created: bool, attempts: int) -> UploadResult:
        return UploadResult(id=str(resource.get("id")), version_id=(resource.get("meta") or {}).get("versionId"),
                            created=created, url_attempts=attempts, size=len(doc.content),
                            content_type=doc.content_type, category_code=coding["code"], idempotency_key=key)

    # the DocumentReference is checked before anything is uploaded (the URL is filled in at step 3)
    validate_resource(document_reference(url="https://presigned.invalid/", doc=doc, coding=coding, key=key),
                      "DocumentReference", what="the DocumentReference built for the upload")
    condition = {"identifier": f"{UPLOAD_KEY_SYSTEM}|{key}"}
    if doc.deduplicate:
        existing = yield from first(search(ctx, "DocumentReference", condition, count=1))
        if existing is not None:
            carries_key = any(i.get("system") == UPLOAD_KEY_SYSTEM and i.get("value") == key
                              for i in existing.get("identifier") or ())
            if not carries_key:
                # a server that ignores the identifier search answers unrelated documents: uploading
                # could duplicate on retry, trusting the answer would return another patient's document
                raise ModMedError("the DocumentReference search by upload key answered a document without that "
                                  "key: the server ignores the identifier parameter, so a retry could not be "
                                  "detected; pass deduplicate=False to upload without the retry check")
            log.info("modmed: this document was uploaded before (a retried task?); not uploading it again")
            return result(existing, False, 0)

    attempts = 0
    while True:
        attempts += 1
        response = yield _request("POST", resource_url(ctx, "Binary"), "create Binary",
                                  headers={"Content-Type": FHIR_JSON},
                                  content=json.dumps({"resourceType": "Binary",
                                                      "contentType": doc.content_type}).encode(),
                                  # an unused presigned slot costs nothing: resending is harmless
                                  extensions={SAFE_TO_RETRY: True})
        url = presigned_url(expect_resource(response, "create Binary", ok=(200, 201)))
        secure_url(url, "to upload", "a presigned URL")
        put = httpx.Request("PUT", url, content=bytes(doc.content),
                            headers={"Content-Type": doc.content_type},
                            extensions={NO_CREDENTIALS: True, WHAT: "upload document bytes"})
        response = yield put
        if response.status_code in (200, 201, 204):
            break
        code, expired = _storage_error(response)
        if expired and attempts < max_url_attempts:
            log.warning("modmed: the presigned upload URL expired; requesting a new one (attempt %d of %d)",
                        attempts + 1, max_url_attempts)
            continue
        why = "the presigned URL expired" if expired else (code or "refused")
        raise ModMedError(f"upload document bytes failed: {why} (after {attempts} presigned URL"
                          f"{'s' if attempts > 1 else ''})", status_code=response.status_code)

    resource = document_reference(url=url, doc=doc, coding=coding, key=key)
    created = yield from create(ctx, resource, if_none_exist=condition if doc.deduplicate else None)
    return result(created, True, attempts)


# -- the two faces' entry points -------------------------------------------------------------------

def _doc(content: bytes, filename: str, category: str | Mapping[str, Any], **kwargs: Any) -> DocumentUpload:
    return DocumentUpload(content=content, filename=filename, category=category,
                          content_type=kwargs.pop("content_type", None) or "", **kwargs)


def upload_document(client: FhirClient, content: bytes, *, filename: str, category: str | Mapping[str, Any],
                    patient_id: str | None = None, content_type: str | None = None,
                    description: str | None = None, idempotency_key: str | None = None,
                    deduplicate: bool = True, max_url_attempts: int = MAX_URL_ATTEMPTS) -> UploadResult:
    """Upload ``content`` as a DocumentReference through the three steps (sync face)."""
    doc = _doc(content, filename, category, patient_id=patient_id, content_type=content_type,
               description=description, idempotency_key=idempotency_key, deduplicate=deduplicate)
    return client.run(upload(client.context, doc, max_url_attempts=max_url_attempts))


async def aupload_document(client: AsyncFhirClient, content: bytes, *, filename: str,
                           category: str | Mapping[str, Any], patient_id: str | None = None,
                           content_type: str | None = None, description: str | None = None,
                           idempotency_key: str | None = None, deduplicate: bool = True,
                           max_url_attempts: int = MAX_URL_ATTEMPTS) -> UploadResult:
    """Upload ``content`` as a DocumentReference through the three steps (async face)."""
    doc = _doc(content, filename, category, patient_id=patient_id, content_type=content_type,
               description=description, idempotency_key=idempotency_key, deduplicate=deduplicate)
    return await client.run(upload(client.context, doc, max_url_attempts=max_url_attempts))

