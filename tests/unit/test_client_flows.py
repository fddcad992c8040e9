"""Flows fed canned httpx.Responses by hand, and the two drivers over the same flows."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client._flows import Emit, FhirContext
from airflow_provider_modmed.client.retry import WHAT
from airflow_provider_modmed.errors import (
    CapabilityError,
    ConfigurationError,
    ModMedError,
    ServerError,
)

BASE = "https://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2"
PROP = FhirContext(Track.PROPRIETARY, BASE)
CERT = FhirContext(Track.CERTIFIED, "https://apiportal.mmi.prod.fhir.ema-api.com/fhir/r4")


def bundle(ids: list[str], next_url: str | None = None, rtype: str = "Patient") -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle", "type": "searchset", "total": len(ids),
        "entry": [{"resource": {"resourceType": rtype, "id": i}, "search": {"mode": "match"}} for i in ids],
        "link": [{"relation": "self", "url": f"{BASE}/{rtype}"}],
    }
    if next_url:
        out["link"].append({"relation": "next", "url": next_url})
    return out


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


def by_hand(flow: flows.Flow[Any], answers: list[httpx.Response]) -> tuple[Any, list[httpx.Request], list[Any]]:
    """Drive ``flow`` feeding ``answers`` in order: (result, requests seen, emitted values)."""
    requests: list[httpx.Request] = []
    emitted: list[Any] = []
    out: Any = None
    while True:
        try:
            step = flow.send(out)
        except StopIteration as done:
            return done.value, requests, emitted
        out = None
        if isinstance(step, Emit):
            emitted.append(step.value)
        elif isinstance(step, httpx.Request):
            requests.append(step)
            out = answers.pop(0)


# -- read, ids -----------------------------------------------------------------------------------

def test_read_builds_one_get_and_returns_the_resource() -> None:
    result, requests, _ = by_hand(flows.read(PROP, "Patient", "12"),
                                  [httpx.Response(200, json={"resourceType": "Patient", "id": "12"})])
    assert result == {"resourceType": "Patient", "id": "12"}
    (req,) = requests
    assert req.method == "GET"
    assert str(req.url) == f"{BASE}/Patient/12"
    assert req.headers["Accept"] == "application/fhir+json"
    assert req.extensions[WHAT] == "read Patient"


@pytest.mark.parametrize(("rid", "encoded"), [
    ("pay|7225", "pay%7C7225"), ("CHG|123", "CHG%7C123"), ("note|991", "note%7C991"),
    ("1.120182.1.17082675", "1.120182.1.17082675"), ("abc-DEF-9", "abc-DEF-9"),
    ("a..b", "a..b"), (".a", ".a"), ("a.", "a."), ("pay|a..b", "pay%7Ca..b"),  # FHIR's id rule (issue 13)
])
def test_ids_are_encoded_as_one_segment(rid: str, encoded: str) -> None:
    assert flows.encode_id(rid) == encoded
    rtype = "Immunization" if "." in rid else "Organization"
    ctx = CERT if rtype == "Immunization" else PROP
    _, requests, _ = by_hand(flows.read(ctx, rtype, rid),
                             [httpx.Response(200, json={"resourceType": rtype, "id": rid})])
    assert requests[0].url.raw_path.decode().endswith(f"/{rtype}/{encoded}")


@pytest.mark.parametrize("rid", [
    "../Patient/1", "..", ".", "1/2", "1?x=2", "1#frag", "a b", "", "pay|72|25", "%2e%2e",
    "x" * 65, "1\n2", "Patient/1", "|1", "1|", "...", "pay|..", "..|1", "..\n", "1\t", "1\x00",
])
def test_hostile_ids_are_refused_before_any_request(rid: str) -> None:
    with pytest.raises(flows.InvalidIdError) as err:
        flows.read(PROP, "Patient", rid)
    assert isinstance(err.value, ValueError)
    assert isinstance(err.value, ConfigurationError)
    assert "id" in str(err.value)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        flows.read(PROP, "Patient", 12)  # type: ignore[arg-type]


# -- capability pre-flight -------------------------------------------------------------------------

@pytest.mark.parametrize(("ctx", "call"), [
    (PROP, lambda c: flows.read(c, "Immunization", "1")),           # certified only
    (PROP, lambda c: flows.search(c, "Nope")),
    (PROP, lambda c: flows.read(c, "Patient/../x", "1")),
])
def test_capability_preflight_raises_when_the_flow_is_built(ctx: FhirContext, call: Any) -> None:
    with pytest.raises(CapabilityError):
        call(ctx)


# -- search and paging ---------------------------------------------------------------------------

def test_search_sends_the_resources_max_count_unless_asked_less() -> None:
    first = next(flows.search(PROP, "Patient", {"family": "Smith"}))
    assert first.url.params["_count"] == "50"
    assert first.url.params["family"] == "Smith"
    assert next(flows.search(PROP, "Coverage")).url.params["_count"] == "100"
    assert next(flows.search(PROP, "DocumentReference", {"_count": 500})).url.params["_count"] == "10"
    assert next(flows.search(PROP, "Patient", {"_count": "7"})).url.params["_count"] == "7"
    assert next(flows.search(PROP, "Patient", count=3)).url.params["_count"] == "3"
    assert next(flows.search(CERT, "Immunization")).url.params["_count"] == "100"
    req = next(flows.search(PROP, "Patient", [("_lastUpdated", "gt2024-01-01"), ("_lastUpdated", "le2024-02-01")]))
    assert req.url.params.get_list("_lastUpdated") == ["gt2024-01-01", "le2024-02-01"]
    with pytest.raises(ConfigurationError, match="_count"):
        flows.search(PROP, "Patient", count=0)


def test_search_checks_required_params() -> None:
    with pytest.raises(ConfigurationError, match="patient"):
        flows.search(PROP, "Account")
    assert next(flows.search(PROP, "Account", {"patient": "Patient/1"})).method == "GET"


def test_paging_modmed_quirks_per_page_total_and_next_on_last_page() -> None:
    pages = [
        httpx.Response(200, json=bundle(["1", "2"], f"{BASE}/Patient?page=2&_count=2")),
        httpx.Response(200, json=bundle(["3", "4"], "Patient?page=3&_count=2")),      # relative
        httpx.Response(200, json=bundle(["5"], "/ema-dev/firm/apiportal/ema/fhir/v2/Patient?page=4")),
        httpx.Response(200, json=bundle([], None)),                                     # empty: stop
    ]
    # the last page with entries still carries a next link; page 4 answers empty without one
    result, requests, emitted = by_hand(flows.search(PROP, "Patient", count=2), pages)
    assert [r["id"] for r in emitted] == ["1", "2", "3", "4", "5"]
    assert result == 5
    assert [r.url.params.get("page") for r in requests] == [None, "2", "3", "4"]
    assert all(r.extensions[WHAT] == "search Patient" for r in requests)


def test_paging_stops_on_an_empty_page_even_with_a_next_link() -> None:
    pages = [httpx.Response(200, json=bundle(["1"], f"{BASE}/Patient?page=2")),
             httpx.Response(200, json=bundle([], f"{BASE}/Patient?page=3"))]
    result, requests, _ = by_hand(flows.search(PROP, "Patient"), pages)
    assert result == 1
    assert len(requests) == 2


def test_paging_stops_on_a_next_link_loop() -> None:
    loop = f"{BASE}/Patient?page=2"
    pages = [httpx.Response(200, json=bundle(["1"], loop)), httpx.Response(200, json=bundle(["2"], loop))]
    result, requests, _ = by_hand(flows.search(PROP, "Patient"), pages)
    assert (result, len(requests)) == (2, 2)


def test_paging_skips_outcome_entries() -> None:
    page = bundle(["1"])
    page["entry"].append({"resource": outcome("informational", "x"), "search": {"mode": "outcome"}})
    _, _, emitted = by_hand(flows.search(PROP, "Patient"), [httpx.Response(200, json=page)])
    assert [r["resourceType"] for r in emitted] == ["Patient"]


# -- search results are checked (issue 13) ---------------------------------------------------------

def with_entries(page: dict[str, Any], *extra: tuple[dict[str, Any], str | None]) -> dict[str, Any]:
    for resource, mode in extra:
        page["entry"].append({"resource": resource, **({"search": {"mode": mode}} if mode else {})})
    return page


ORG = {"resourceType": "Organization", "id": "org1", "name": "Clinic"}


@pytest.mark.parametrize("mode", ["match", None])
def test_a_match_of_another_type_fails_naming_both_types_and_no_data(mode: str | None) -> None:
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"display": "Zebulon Quixote"}}
    page = with_entries(bundle(["1"], f"{BASE}/Patient?page=2"), (obs, mode))
    flow = flows.search(PROP, "Patient")
    next(flow)
    with pytest.raises(ModMedError) as err:
        flow.send(httpx.Response(200, json=page))  # nothing of the page was emitted: it fails first
    assert str(err.value).startswith("search Patient answered a match of type Observation: a Patient search")
    assert "Zebulon" not in str(err.value) and "o1" not in str(err.value)


@pytest.mark.parametrize("rtype", [None, 7, "Observation/../x", "x" * 80])
def test_an_entry_without_a_valid_resource_type_fails_without_echoing_it(rtype: Any) -> None:
    page = with_entries(bundle(["1"]), ({"resourceType": rtype, "id": "o1"}, "include"))
    with pytest.raises(ModMedError, match="without a valid resourceType") as err:
        by_hand(flows.search(PROP, "Patient"), [httpx.Response(200, json=page)])
    assert "../x" not in str(err.value) and "xxxx" not in str(err.value)


def test_included_entries_are_left_out_by_default() -> None:
    linked = {"resourceType": "Patient", "id": "9"}  # _include=Patient:link: included, not a match
    pages = [httpx.Response(200, json=with_entries(bundle(["1", "2"], f"{BASE}/Patient?page=2"),
                                                   (ORG, "include"), (linked, "include"))),
             httpx.Response(200, json=with_entries(bundle(["3"]), (ORG, "include")))]
    result, requests, emitted = by_hand(flows.search(PROP, "Patient", {"_include": "Patient:organization"}), pages)
    assert [r["id"] for r in emitted] == ["1", "2", "3"]  # not the included Organization, nor included Patient 9
    assert result == 3 and len(requests) == 2
    assert requests[0].url.params["_include"] == "Patient:organization"


def test_included_entries_are_emitted_marked_when_asked() -> None:
    pages = [httpx.Response(200, json=with_entries(bundle(["1"], f"{BASE}/Patient?page=2"), (ORG, "include"))),
             httpx.Response(200, json=bundle(["2"]))]
    result, _, emitted = by_hand(flows.search(PROP, "Patient", includes=True), pages)
    assert [(type(r).__name__, r["id"]) for r in emitted] == [("dict", "1"), ("Included", "org1"), ("dict", "2")]
    assert isinstance(emitted[1], flows.Included) and emitted[1].resource_type == "Organization"
    assert emitted[1] == ORG and not isinstance(emitted[0], flows.Included)
    assert result == 2  # matches only


def test_an_operation_outcome_without_a_mode_is_not_a_match() -> None:
    page = with_entries(bundle(["1"]), (outcome("informational", "x"), None))
    _, _, emitted = by_hand(flows.search(PROP, "Patient"), [httpx.Response(200, json=page)])
    assert [r["resourceType"] for r in emitted] == ["Patient"]


def test_split_entries_sorts_matches_and_includes() -> None:
    page = with_entries(bundle(["1"]), ({"resourceType": "Patient", "id": "2"}, None), (ORG, "include"),
                        (outcome("warning", "x"), "outcome"))
    page["entry"] += ["junk", {"search": {"mode": "match"}}]  # no resource: skipped as before
    matches, included = flows.split_entries(page, "Patient", "search Patient")
    assert [r["id"] for r in matches] == ["1", "2"] and included == [ORG]


def test_paging_refuses_a_foreign_next_link() -> None:
    pages = [httpx.Response(200, json=bundle(["1"], "https://evil.example/fhir/Patient?page=2"))]
    with pytest.raises(ModMedError, match="outside"):
        by_hand(flows.search(PROP, "Patient"), pages)


def test_search_is_lazy_one_resource_at_a_time() -> None:
    flow = flows.search(PROP, "Patient")
    assert isinstance(next(flow), httpx.Request)
    step = flow.send(httpx.Response(200, json=bundle(["1", "2"], f"{BASE}/Patient?page=2")))
    assert isinstance(step, Emit)
    assert step.value["id"] == "1"
    assert isinstance(flow.send(None), Emit)
    nxt = flow.send(None)
    assert isinstance(nxt, httpx.Request)  # the second page is requested only now


@pytest.mark.parametrize(("href", "expected"), [
    (f"{BASE}/Patient?page=2", f"{BASE}/Patient?page=2"),
    ("Patient?page=2", f"{BASE}/Patient?page=2"),
    ("/ema-dev/firm/apiportal/ema/fhir/v2/Patient?page=2", f"{BASE}/Patient?page=2"),
    ("https://stage.ema-api.com:443/ema-dev/firm/apiportal/ema/fhir/v2/Patient?page=2",
     "https://stage.ema-api.com:443/ema-dev/firm/apiportal/ema/fhir/v2/Patient?page=2"),
])
def test_next_page_request_resolves_links(href: str, expected: str) -> None:
    req = flows.next_page_request({"link": [{"relation": "next", "url": href}]}, BASE)
    assert req is not None
    assert httpx.URL(str(req.url)) == httpx.URL(expected)


@pytest.mark.parametrize("href", [
    "http://stage.ema-api.com/ema-dev/firm/apiportal/ema/fhir/v2/Patient?page=2",   # scheme
    "https://stage.ema-api.com:8443/ema-dev/Patient",                              # port
    "https://evil.example/Patient", "//evil.example/Patient",                       # host
])
def test_next_page_request_refuses_other_origins(href: str) -> None:
    with pytest.raises(ModMedError):
        flows.next_page_request({"link": [{"relation": "next", "url": href}]}, BASE)


def test_next_page_request_none_without_next() -> None:
    assert flows.next_page_request({"link": [{"relation": "self", "url": BASE}]}, BASE) is None
    assert flows.next_page_request({}, BASE) is None


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"<html>Bad Gateway</html>", b"", b"{not json",
                                  b"<Error><Code>AccessDenied</Code></Error>"])
def test_non_json_error_bodies(body: bytes) -> None:
    flow = flows.read(PROP, "Patient", "1")
    next(flow)
    with pytest.raises(ServerError) as err:
        flow.send(httpx.Response(502, content=body, headers={"Content-Type": "text/html"}))
    assert err.value.status_code == 502
    assert err.value.codes == ()


def test_a_200_without_a_resource_is_an_error() -> None:
    flow = flows.read(PROP, "Patient", "1")
    next(flow)
    with pytest.raises(ModMedError, match="no FHIR resource"):
        flow.send(httpx.Response(200, content=b"<html/>"))
