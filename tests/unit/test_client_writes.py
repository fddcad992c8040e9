"""The safe-write flows (client/writes.py) fed canned httpx.Responses by hand: create (conditional,
ChargeItem transactionId and its 409 recovery), update (If-Match; a 412 on the first try against one
after a resend), patch (read-modify-write) and delete (404/410 on the first try against a resend)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from airflow_provider_modmed.capabilities import Capabilities, Track, Variant
from airflow_provider_modmed.client import writes
from airflow_provider_modmed.client._flows import FhirContext
from airflow_provider_modmed.client.drivers import Flow
from airflow_provider_modmed.client.retry import ATTEMPT, SAFE_TO_RETRY
from airflow_provider_modmed.errors import (
    AuthError,
    CapabilityError,
    ConfigurationError,
    ConflictError,
    ModMedError,
    NotFoundError,
    ServerError,
    ValidationError,
)
from airflow_provider_modmed.profile import TRANSACTION_ID_SYSTEM

BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
PROP = FhirContext(Track.PROPRIETARY, BASE)
CERT = FhirContext(Track.CERTIFIED, "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4")
PATIENT = {"resourceType": "Patient", "name": [{"family": "Qwertyphi", "given": ["Alpha"]}], "birthDate": "1971-02-03"}
CHARGE = {"resourceType": "ChargeItem", "status": "billable", "code": {"text": "99213"},
          "subject": {"reference": "Patient/1"}}

Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def stored(resource: dict[str, Any], rid: str = "9", version: str = "1") -> dict[str, Any]:
    return {**resource, "id": rid, "meta": {"versionId": version, "lastUpdated": "2026-01-02T03:04:05.000Z"}}


def resent(status: int, **kwargs: Any) -> Callable[[httpx.Request], httpx.Response]:
    """The answer to a resend: the face counted a second attempt of the request (its first answer was lost)."""
    def answer(request: httpx.Request) -> httpx.Response:
        request.extensions[ATTEMPT] = 2
        return httpx.Response(status, request=request, **kwargs)
    return answer


def first_try(status: int, **kwargs: Any) -> Callable[[httpx.Request], httpx.Response]:
    """The answer to the first attempt, as a face sends it (the attempt counted)."""
    def answer(request: httpx.Request) -> httpx.Response:
        request.extensions[ATTEMPT] = 1
        return httpx.Response(status, request=request, **kwargs)
    return answer


def by_hand(flow: Flow[Any], answers: list[Answer],
            seen: list[httpx.Request] | None = None) -> tuple[Any, list[httpx.Request]]:
    """Drive ``flow`` feeding ``answers`` in order: (result, requests seen); ``seen`` keeps the requests
    when the flow raises."""
    requests = seen if seen is not None else []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            return done.value, requests
        assert isinstance(step, httpx.Request), step
        requests.append(step)
        assert answers, f"the flow sent an unexpected {step.method} {step.url}"
        answer = answers.pop(0)
        out = answer(step) if callable(answer) else answer


def methods(requests: list[httpx.Request]) -> list[str]:
    return [r.method for r in requests]


# -- pre-flight and arguments: raised when the flow is built ------------------------------------------

@pytest.mark.parametrize(("ctx", "call"), [
    (CERT, lambda c: writes.create(c, {"resourceType": "Patient"})),  # certified is read-only
    (PROP, lambda c: writes.update(c, {"resourceType": "ChargeItem", "id": "1"})),  # create-only
    (PROP, lambda c: writes.update(c, {"resourceType": "Coverage", "id": "1"})),
    (PROP, lambda c: writes.delete(c, "Appointment", "1")),
    (PROP, lambda c: writes.patch(c, "ChargeItem", "1", {"status": "x"})),
    (CERT, lambda c: writes.patch(c, "Patient", "1", {"gender": "male"})),
])
def test_capability_preflight_raises_when_the_flow_is_built(ctx: FhirContext, call: Any) -> None:
    with pytest.raises(CapabilityError):
        call(ctx)


def test_published_variant_allows_coverage_update() -> None:
    ctx = FhirContext(Track.PROPRIETARY, BASE, Capabilities(Variant.PUBLISHED))
    flow = writes.update(ctx, {"resourceType": "Coverage", "id": "1"})
    assert next(flow).method == "PUT"


def test_update_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match=r"resource\['id'\]"):
        writes.update(PROP, {"resourceType": "Patient", "id": "1/../../2"})


@pytest.mark.parametrize(("call", "error", "needle"), [
    (lambda: writes.create(PROP, {"name": "x"}), ConfigurationError, "with a resourceType"),
    (lambda: writes.create(PROP, PATIENT, transaction_id="TX"), ConfigurationError,
     "transaction_id applies to ChargeItem only, not Patient"),
    (lambda: writes.create(PROP, {**CHARGE, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-1"}]},
                           transaction_id="TX-2"), ConfigurationError, "differs from the resource's"),
    (lambda: writes.update(PROP, stored(PATIENT), if_match='W/"1 OR 1"'), ConfigurationError,
     "if_match must be a version id"),
    (lambda: writes.patch(PROP, "Patient", "9", "gender=male"), ConfigurationError,  # type: ignore[arg-type]
     "merge patch dict or a callable"),
    (lambda: writes.patch(PROP, "Patient", "9/..", {"gender": "male"}), ValueError, "resource_id"),
    (lambda: writes.delete(PROP, "Patient", "a b"), ValueError, "not a valid FHIR id"),
])
def test_bad_arguments_raise_before_any_request(call: Any, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle) as info:
        call()
    assert "Qwertyphi" not in str(info.value)


@pytest.mark.parametrize(("given", "version"), [(3, "3"), ("3", "3"), ('"3"', "3"), ('W/"4"', "4"),
                                                (" W/\"1.2\" ", "1.2"), (None, None), ("", None)])
def test_version_of(given: Any, version: str | None) -> None:
    assert writes.version_of(given) == version


def test_json_merge_patch() -> None:
    assert writes.json_merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}, "f": [1]}) == \
        {"a": 1, "b": {"d": 3, "e": 4}, "f": [1]}
    assert writes.json_merge_patch({"a": 1}, {"a": [{"x": None}]}) == {"a": [{"x": None}]}


# -- create ----------------------------------------------------------------------------------------

def test_create_reads_back_an_empty_201_from_location() -> None:
    answers: list[Answer] = [
        httpx.Response(201, headers={"Location": f"{BASE}/Organization/pay%7C9/_history/1"}),
        httpx.Response(200, json={"resourceType": "Organization", "id": "pay|9"}),
    ]
    result, requests = by_hand(writes.create(PROP, {"resourceType": "Organization", "name": "X"}), answers)
    assert result["id"] == "pay|9"
    post, get = requests
    assert post.method == "POST"
    assert post.headers["Content-Type"] == "application/fhir+json"
    assert json.loads(post.content) == {"resourceType": "Organization", "name": "X"}
    assert get.method == "GET"
    assert get.url.raw_path.decode().endswith("/Organization/pay%7C9")


def test_create_of_a_write_only_type_does_not_read_back() -> None:
    answers: list[Answer] = [httpx.Response(201, headers={"Location": "Composition/31/_history/1"})]
    result, requests = by_hand(writes.create(PROP, {"resourceType": "Composition"}), answers)
    assert result == {"resourceType": "Composition", "id": "31"}
    assert len(requests) == 1


def test_create_relative_location() -> None:
    answers: list[Answer] = [httpx.Response(201, headers={"Location": "Patient/77/_history/1"}),
                             httpx.Response(200, json={"resourceType": "Patient", "id": "77"})]
    result, _ = by_hand(writes.create(PROP, {"resourceType": "Patient"}), answers)
    assert result["id"] == "77"


def test_create_refuses_foreign_location() -> None:
    with pytest.raises(ModMedError, match="outside"):
        by_hand(writes.create(PROP, {"resourceType": "Patient"}),
                [httpx.Response(201, headers={"Location": "https://evil.example/Patient/1"})])


def test_create_with_body_returns_it_and_conditional_is_safe_to_retry() -> None:
    flow = writes.create(PROP, {"resourceType": "Patient"}, if_none_exist={"identifier": "sys|1"})
    req = next(flow)
    assert req.headers["If-None-Exist"] == "identifier=sys%7C1"
    assert req.extensions[SAFE_TO_RETRY] is True
    with pytest.raises(StopIteration) as done:
        flow.send(httpx.Response(200, json={"resourceType": "Patient", "id": "5"}))
    assert done.value.value["id"] == "5"
    assert next(writes.create(PROP, {"resourceType": "Patient"})).extensions[SAFE_TO_RETRY] is False


def test_chargeitem_with_transaction_id_is_safe_to_retry() -> None:
    charge = {"resourceType": "ChargeItem", "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "tx-1"}]}
    assert next(writes.create(PROP, charge)).extensions[SAFE_TO_RETRY] is True
    charge["identifier"] = [{"system": "other", "value": "tx-1"}]
    assert next(writes.create(PROP, charge)).extensions[SAFE_TO_RETRY] is False


@pytest.mark.parametrize(("status", "cls"), [
    (400, ValidationError), (401, AuthError), (404, NotFoundError), (409, ConflictError),
    (422, ValidationError), (500, ServerError), (503, ServerError),
])
def test_errors_are_typed_and_carry_the_outcome_not_the_body(status: int, cls: type) -> None:
    secret_body = {"resourceType": "Patient", "name": [{"family": "Secretname"}]}
    flow = writes.create(PROP, secret_body)
    next(flow)
    with pytest.raises(cls) as err:
        flow.send(httpx.Response(status, json=outcome("invalid", "name.family is bad")))
    assert err.value.status_code == status
    assert err.value.codes == ("invalid",)
    assert str(err.value).endswith(f"(HTTP {status}) [error/invalid]")
    assert err.value.diagnostics() == ("name.family is bad",)  # on request only, never in the text
    assert "name.family is bad" not in str(err.value) and "name.family is bad" not in repr(err.value)
    assert "Secretname" not in str(err.value)


def test_transaction_id_makes_a_charge_item_conditional() -> None:
    result, requests = by_hand(writes.create(PROP, CHARGE, transaction_id="TX-42"),
                               [httpx.Response(201, json=stored(CHARGE, "CHG|5"))])
    assert result["id"] == "CHG|5"
    (post,) = requests
    assert {"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"} in json.loads(post.content)["identifier"]
    assert unquote(post.headers["If-None-Exist"]) == f"identifier={TRANSACTION_ID_SYSTEM}|TX-42"
    assert post.extensions[SAFE_TO_RETRY] is True
    assert "identifier" not in CHARGE  # the caller's dict is left alone


def test_an_explicit_condition_wins_over_the_transaction_id() -> None:
    post = next(writes.create(PROP, CHARGE, if_none_exist="identifier=urn:claim|7", transaction_id="TX-42"))
    assert post.headers["If-None-Exist"] == "identifier=urn:claim|7"
    assert {"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"} in json.loads(post.content)["identifier"]


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def test_a_duplicate_transaction_id_returns_the_existing_charge() -> None:
    existing = stored({**CHARGE, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"}]}, "CHG|3")
    result, requests = by_hand(writes.create(PROP, CHARGE, transaction_id="TX-42"), [
        httpx.Response(409, json=outcome("duplicate", "Duplicate transactionId")),
        httpx.Response(200, json=bundle(existing)),
    ])
    assert result == existing
    post, search = requests
    assert post.method == "POST"
    assert search.method == "GET" and search.url.path.endswith("/ChargeItem")
    assert search.url.params["identifier"] == f"{TRANSACTION_ID_SYSTEM}|TX-42"


@pytest.mark.parametrize("found", [
    [stored({**CHARGE, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-other"}]}, "CHG|9")],
    [stored(CHARGE, "CHG|8")],  # a server ignoring the identifier search
    [],
])
def test_a_search_answering_another_charge_is_not_taken_for_the_first_one(found: list[dict[str, Any]]) -> None:
    with pytest.raises(ConflictError, match="create ChargeItem failed") as err:
        by_hand(writes.create(PROP, CHARGE, transaction_id="TX-42"), [
            httpx.Response(409, json=outcome("duplicate", "Duplicate transactionId")),
            httpx.Response(200, json=bundle(*found)),
        ])
    assert err.value.status_code == 409 and err.value.codes == ("duplicate",)


def test_a_409_without_transaction_id_stays_a_conflict() -> None:
    charge = {**CHARGE, "identifier": [{"system": TRANSACTION_ID_SYSTEM, "value": "TX-42"}]}
    seen: list[httpx.Request] = []
    with pytest.raises(ConflictError):
        by_hand(writes.create(PROP, charge), [httpx.Response(409, json=outcome("duplicate", "dup"))], seen)
    assert methods(seen) == ["POST"]


# -- update ----------------------------------------------------------------------------------------

def test_update_sends_if_match_weak_etag() -> None:
    for given, sent in [(3, 'W/"3"'), ("3", 'W/"3"'), ('W/"4"', 'W/"4"'), ('"5"', 'W/"5"')]:
        req = next(writes.update(PROP, {"resourceType": "Patient", "id": "1"}, if_match=given))
        assert req.method == "PUT"
        assert req.headers["If-Match"] == sent
    assert "If-Match" not in next(writes.update(PROP, {"resourceType": "Patient", "id": "1"})).headers


def test_a_412_on_the_first_try_is_a_conflict_naming_the_versions() -> None:
    mine = {**stored(PATIENT, "9", "1"), "gender": "male"}
    theirs = {**stored(PATIENT, "9", "2"), "gender": "female"}
    seen: list[httpx.Request] = []
    with pytest.raises(ConflictError) as err:
        by_hand(writes.update(PROP, mine, if_match="1"), [
            first_try(412, json=outcome("conflict", "version moved")), httpx.Response(200, json=theirs)], seen)
    assert methods(seen) == ["PUT", "GET"]
    assert err.value.status_code == 412 and err.value.codes == ("conflict",)
    assert "changed since version 1 (now version 2); nothing was written" in str(err.value)
    assert "Qwertyphi" not in str(err.value) and "female" not in str(err.value)


def test_a_412_on_the_first_try_stays_a_conflict_even_with_the_same_content() -> None:
    mine = {**stored(PATIENT, "9", "1"), "gender": "male"}
    with pytest.raises(ConflictError, match=r"changed since version 1 \(now version 2\)"):
        by_hand(writes.update(PROP, mine, if_match="1"), [
            first_try(412, json=outcome("conflict", "version moved")),
            httpx.Response(200, json={**mine, "meta": {"versionId": "2"}})])


def test_a_412_on_a_resent_put_that_already_landed_is_success() -> None:
    mine = {**stored(PATIENT, "9", "1"), "gender": "male"}
    landed = {**mine, "meta": {"versionId": "2"}, "text": {"status": "generated", "div": "<div/>"}}
    result, requests = by_hand(writes.update(PROP, mine, if_match="1"), [
        resent(412, json=outcome("conflict", "version moved")), httpx.Response(200, json=landed)])
    assert result == landed
    assert methods(requests) == ["PUT", "GET"]
    assert requests[1].url.path.endswith("/Patient/9")


def test_a_412_on_a_resent_put_with_other_content_is_a_conflict() -> None:
    mine = {**stored(PATIENT, "9", "1"), "gender": "male"}
    with pytest.raises(ConflictError, match=r"changed since version 1 \(now version 3\); nothing was written"):
        by_hand(writes.update(PROP, mine, if_match="1"), [
            resent(412), httpx.Response(200, json={**stored(PATIENT, "9", "3"), "gender": "other"})])


def test_may_have_landed_treats_a_first_try_412_like_a_resend() -> None:
    mine = {**stored(PATIENT, "9", "1"), "gender": "male"}
    result, _ = by_hand(writes.update(PROP, mine, if_match="1", may_have_landed=True), [
        first_try(412), httpx.Response(200, json={**mine, "meta": {"versionId": "2"}})])
    assert result["meta"]["versionId"] == "2"


def test_a_412_on_a_deleted_resource_says_so_without_success() -> None:
    mine = stored(PATIENT, "9", "1")
    with pytest.raises(ConflictError, match=r"now version unknown"):
        by_hand(writes.update(PROP, mine, if_match="1"), [resent(412), httpx.Response(410)])


# -- patch -----------------------------------------------------------------------------------------

def test_patch_reads_merges_and_writes_with_if_match() -> None:
    current = {**stored(PATIENT, "9", "5"), "gender": "female", "telecom": [{"system": "phone", "value": "1"}]}
    result, requests = by_hand(writes.patch(PROP, "Patient", "9", {"gender": "male", "telecom": None}), [
        httpx.Response(200, json=current), lambda req: httpx.Response(200, json=stored(json.loads(req.content),
                                                                                      "9", "6"))])
    get, put = requests
    assert (get.method, put.method) == ("GET", "PUT")
    assert put.headers["If-Match"] == 'W/"5"'
    sent = json.loads(put.content)
    assert sent["gender"] == "male" and "telecom" not in sent and sent["name"] == PATIENT["name"]
    assert isinstance(result, writes.PatchResult)
    assert (result.changed, result.previous_version_id, result.resource["meta"]["versionId"]) == (True, "5", "6")


def test_a_callable_patch_gets_a_copy_of_the_current_resource() -> None:
    current = stored(PATIENT, "9", "5")

    def fix(resource: dict[str, Any]) -> dict[str, Any]:
        resource["name"][0]["family"] = "Asdfphi"
        return resource

    result, requests = by_hand(writes.patch(PROP, "Patient", "9", fix), [
        httpx.Response(200, json=current), httpx.Response(200, json=stored(PATIENT, "9", "6"))])
    assert json.loads(requests[1].content)["name"][0]["family"] == "Asdfphi"
    assert result.changed


def test_a_patch_that_changes_nothing_writes_nothing() -> None:
    current = {**stored(PATIENT, "9", "5"), "gender": "male"}
    result, requests = by_hand(writes.patch(PROP, "Patient", "9", lambda r: {**r, "gender": "male"}),
                               [httpx.Response(200, json=current)])
    assert methods(requests) == ["GET"]
    assert result == writes.PatchResult(current, False, "5")


def test_a_patch_meeting_a_concurrent_change_is_a_conflict() -> None:
    current = stored(PATIENT, "9", "5")
    seen: list[httpx.Request] = []
    with pytest.raises(ConflictError, match="nothing was written"):
        by_hand(writes.patch(PROP, "Patient", "9", {"gender": "male"}), [
            httpx.Response(200, json=current), first_try(412), httpx.Response(200, json=stored(PATIENT, "9", "6"))],
            seen)
    assert methods(seen) == ["GET", "PUT", "GET"]


def test_a_patch_with_an_expected_version_checks_it_before_writing() -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(ConflictError, match="at version 5, not the expected 4; nothing was written") as err:
        by_hand(writes.patch(PROP, "Patient", "9", {"gender": "male"}, if_match=4),
                [httpx.Response(200, json=stored(PATIENT, "9", "5"))], seen)
    assert err.value.status_code == 412
    assert methods(seen) == ["GET"]


@pytest.mark.parametrize(("patch", "validate", "error", "needle"), [
    (lambda r: {"resourceType": "Group"}, False, ConfigurationError, "must produce a Patient resource"),
    (lambda r: None, False, ConfigurationError, "must produce a Patient resource"),
    ({"gender": 5}, True, ValidationError, "Patient.gender"),
])
def test_a_bad_patch_result_is_refused_before_the_put(patch: Any, validate: bool, error: type, needle: str) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(error, match=needle):
        by_hand(writes.patch(PROP, "Patient", "9", patch, validate=validate),
                [httpx.Response(200, json=stored(PATIENT, "9", "5"))], seen)
    assert methods(seen) == ["GET"]


# -- delete ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "missing_ok", "present"), [
    (httpx.Response(204), False, True),
    (httpx.Response(200), False, True),
    (first_try(410), False, False),       # already deleted
    (first_try(404), True, False),        # never there, and that is fine
    (resent(404), False, True),           # the lost first answer deleted it
    (resent(410), False, True),
])
def test_delete(answer: Answer, missing_ok: bool, present: bool) -> None:
    result, requests = by_hand(writes.delete(PROP, "Patient", "9", missing_ok=missing_ok), [answer])
    assert result is present
    assert methods(requests) == ["DELETE"]
    assert requests[0].url.path.endswith("/Patient/9")


@pytest.mark.parametrize(("answer", "error"), [(first_try(404), NotFoundError), (httpx.Response(404), NotFoundError),
                                               (httpx.Response(500), ServerError)])
def test_delete_fails_on_a_first_try_404(answer: Answer, error: type) -> None:
    with pytest.raises(error):
        by_hand(writes.delete(PROP, "Patient", "9"), [answer])
