"""The three-step upload flow fed canned answers by hand: category lookup, idempotency, presigned PUT
without credentials, re-request on expiry, and the pre-flight before any request."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.auth import NO_CREDENTIALS
from airflow_provider_modmed.client.documents import (
    DOCUMENT_CATEGORY_SYSTEM,
    PRESIGNED_URL_EXTENSION,
    UPLOAD_KEY_SYSTEM,
    DocumentUpload,
    category_coding,
    default_upload_key,
    guess_content_type,
    upload,
)
from airflow_provider_modmed.client.retry import SAFE_TO_RETRY
from airflow_provider_modmed.errors import CapabilityError, ConfigurationError, ModMedError, ValidationError
from tests.unit.test_client_writes import by_hand as run

BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
STORAGE = "https://storage.example.com/uploads/binary-{n}?X-Amz-Date=1&X-Amz-Signature=abc"
PROP = FhirContext(Track.PROPRIETARY, BASE)
CERT = FhirContext(Track.CERTIFIED, "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4")

VALUE_SET = {"resourceType": "ValueSet", "id": "document-category",
             "expansion": {"contains": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": "LAB", "display": "Lab Result"},
                                        {"system": DOCUMENT_CATEGORY_SYSTEM, "code": "INSURANCE",
                                         "display": "Insurance Card"}]}}


def empty_bundle() -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []}


def binary(n: int) -> dict[str, Any]:
    return {"resourceType": "Binary", "id": str(n), "contentType": "application/pdf",
            "extension": [{"url": PRESIGNED_URL_EXTENSION, "valueUrl": STORAGE.format(n=n)}]}


def expired() -> httpx.Response:
    return httpx.Response(403, content=b"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code>"
                                       b"<Message>Request has expired</Message></Error>")


def doc(**over: Any) -> DocumentUpload:
    values: dict[str, Any] = {"content": b"%PDF-1.4 test", "filename": "scan.pdf", "category": "Lab Result",
                              "patient_id": "12"}
    return DocumentUpload(**{**values, **over})


def created(body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(201, json={**body, "id": "77", "meta": {"versionId": "1"}})


def test_three_steps_in_order_with_no_credentials_on_the_put() -> None:
    d = doc()
    flow = upload(PROP, d)
    answers = [httpx.Response(200, json=VALUE_SET), httpx.Response(200, json=empty_bundle()),
               httpx.Response(201, json=binary(1)), httpx.Response(200)]
    requests: list[httpx.Request] = []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            result = done.value
            break
        requests.append(step)
        # the last request (the DocumentReference POST) is answered with what was sent
        out = answers.pop(0) if answers else created(json.loads(step.content))
    lookup, search, post_binary, put, post_doc = requests
    assert (lookup.method, lookup.url.path) == ("GET", "/ema-dev/firm/apiportal/ema/fhir/v2/ValueSet/document-category")
    assert search.url.params["identifier"].startswith(UPLOAD_KEY_SYSTEM + "|")
    assert post_binary.method == "POST" and post_binary.url.path.endswith("/Binary")
    assert json.loads(post_binary.content) == {"resourceType": "Binary", "contentType": "application/pdf"}
    assert post_binary.extensions[SAFE_TO_RETRY] is True
    assert put.method == "PUT" and str(put.url) == STORAGE.format(n=1)
    assert put.extensions[NO_CREDENTIALS] is True
    assert "authorization" not in put.headers and "x-api-key" not in put.headers
    assert put.content == b"%PDF-1.4 test" and put.headers["Content-Type"] == "application/pdf"
    body = json.loads(post_doc.content)
    key = default_upload_key(d.content, "scan.pdf", "12")
    assert body["identifier"] == [{"system": "filename", "value": "scan.pdf"},
                                  {"system": UPLOAD_KEY_SYSTEM, "value": key}]
    assert body["type"] == {"text": "application/pdf"} and body["status"] == "current"
    assert body["category"] == [{"coding": [{"system": DOCUMENT_CATEGORY_SYSTEM, "code": "LAB",
                                             "display": "Lab Result"}]}]
    assert body["subject"] == {"reference": "Patient/12"}
    assert body["content"][0]["attachment"]["url"] == STORAGE.format(n=1)
    assert post_doc.headers["If-None-Exist"] == "identifier=" + quote(f"{UPLOAD_KEY_SYSTEM}|{key}", safe="")
    assert (result.id, result.created, result.url_attempts, result.category_code) == ("77", True, 1, "LAB")


def test_an_expired_url_is_requested_again() -> None:
    flow = upload(PROP, doc(category={"code": "LAB"}, deduplicate=False))
    answers = [httpx.Response(201, json=binary(1)), expired(), httpx.Response(201, json=binary(2)),
               httpx.Response(200)]
    requests: list[httpx.Request] = []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            result = done.value
            break
        requests.append(step)
        out = answers.pop(0) if answers else created(json.loads(step.content))
    assert [r.method for r in requests] == ["POST", "PUT", "POST", "PUT", "POST"]
    assert str(requests[3].url) == STORAGE.format(n=2)
    assert json.loads(requests[4].content)["content"][0]["attachment"]["url"] == STORAGE.format(n=2)
    assert "If-None-Exist" not in requests[4].headers  # deduplicate=False
    assert result.url_attempts == 2


def test_expiry_gives_up_after_max_attempts() -> None:
    flow = upload(PROP, doc(category={"code": "LAB"}, deduplicate=False), max_url_attempts=2)
    with pytest.raises(ModMedError, match=r"the presigned URL expired .after 2 presigned URLs") as info:
        run(flow, [httpx.Response(201, json=binary(1)), expired(), httpx.Response(201, json=binary(2)), expired()])
    assert info.value.status_code == 403


def test_other_storage_refusals_fail_with_their_code() -> None:
    refused = httpx.Response(403, content=b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
    with pytest.raises(ModMedError, match="SignatureDoesNotMatch"):
        run(upload(PROP, doc(category={"code": "LAB"}, deduplicate=False)),
            [httpx.Response(201, json=binary(1)), refused])


def test_a_previous_upload_is_returned_without_uploading_again() -> None:
    from airflow_provider_modmed.client.documents import UPLOAD_KEY_SYSTEM, default_upload_key

    d = doc()
    key = default_upload_key(bytes(d.content), d.filename, d.patient_id)
    existing = {"resourceType": "DocumentReference", "id": "55", "meta": {"versionId": "1"},
                "identifier": [{"system": UPLOAD_KEY_SYSTEM, "value": key}]}
    found = {"resourceType": "Bundle", "type": "searchset", "total": 1,
             "entry": [{"resource": existing, "search": {"mode": "match"}}]}
    result, requests = run(upload(PROP, d), [httpx.Response(200, json=VALUE_SET), httpx.Response(200, json=found)])
    assert [r.method for r in requests] == ["GET", "GET"]
    assert (result.id, result.created, result.url_attempts) == ("55", False, 0)
    # a match without the key is not taken for this upload
    stranger = {**found, "entry": [{"resource": {**existing, "identifier": []}, "search": {"mode": "match"}}]}
    with pytest.raises(ModMedError, match="ignores the identifier"):
        run(upload(PROP, d), [httpx.Response(200, json=VALUE_SET), httpx.Response(200, json=stranger)])


def test_an_unknown_category_fails_before_anything_is_uploaded() -> None:
    with pytest.raises(ConfigurationError, match=r"'Radiology' is not in the firm's .*LAB \(Lab Result\)"):
        run(upload(PROP, doc(category="Radiology")), [httpx.Response(200, json=VALUE_SET)])


@pytest.mark.parametrize(("given", "code"), [("LAB", "LAB"), ("lab", "LAB"), ("insurance card", "INSURANCE")])
def test_category_by_code_or_display(given: str, code: str) -> None:
    assert category_coding(VALUE_SET, given)["code"] == code


def test_category_from_compose_when_there_is_no_expansion() -> None:
    vs = {"resourceType": "ValueSet", "compose": {"include": [{"system": "urn:s", "concept": [
        {"code": "C1", "display": "Consent Form"}]}]}}
    assert category_coding(vs, "Consent form") == {"system": "urn:s", "code": "C1", "display": "Consent Form"}


@pytest.mark.parametrize(("ctx", "d", "error", "needle"), [
    (CERT, doc(), CapabilityError, "track='proprietary'"),
    (PROP, doc(filename=""), ConfigurationError, "filename is required"),
    (PROP, doc(patient_id="1/../2"), ConfigurationError, "patient_id"),
    (PROP, doc(category=""), ConfigurationError, "category is required"),
    (PROP, doc(category={"display": "x"}), ConfigurationError, "needs a 'code'"),
    (PROP, doc(content="text"), ConfigurationError, "content must be bytes"),
])
def test_preflight_before_any_request(ctx: FhirContext, d: DocumentUpload, error: type[Exception],
                                      needle: str) -> None:
    with pytest.raises(error, match=needle):
        upload(ctx, d)  # raises when the flow is built: no request exists yet


def test_a_plain_http_storage_url_is_refused() -> None:
    plain = binary(1)
    plain["extension"][0]["valueUrl"] = "http://storage.example.com/u?sig=1"
    with pytest.raises(ModMedError, match="must be https"):
        run(upload(PROP, doc(category={"code": "LAB"}, deduplicate=False)), [httpx.Response(201, json=plain)])


def test_a_binary_without_url_is_an_error() -> None:
    with pytest.raises(ModMedError, match="no presigned upload URL"):
        run(upload(PROP, doc(category={"code": "LAB"}, deduplicate=False)),
            [httpx.Response(201, json={"resourceType": "Binary", "id": "1"})])


def test_the_document_reference_is_validated_before_anything_is_uploaded() -> None:
    flow = upload(PROP, doc(category={"code": "LAB"}, description={"not": "markdown"}))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"DocumentReference.description"):
        run(flow, [])


def test_content_type_and_keys() -> None:
    assert guess_content_type("scan.pdf") == "application/pdf"
    assert guess_content_type("photo.JPG") == "image/jpeg"
    assert guess_content_type("blob") == "application/octet-stream"
    a = default_upload_key(b"x", "a.pdf", "1")
    assert a == default_upload_key(b"x", "a.pdf", "1")
    assert len({a, default_upload_key(b"y", "a.pdf", "1"), default_upload_key(b"x", "b.pdf", "1"),
                default_upload_key(b"x", "a.pdf", None)}) == 4
