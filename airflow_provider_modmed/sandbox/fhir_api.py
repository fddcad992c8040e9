"""FHIR interactions of the sandbox, shared by both tracks: read, search, create, update, delete.

Each track differs only in what :class:`TrackRules` says: which interactions the capability matrix
allows, how ``_lastUpdated`` may be written, and how a search pages.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from airflow_provider_modmed.capabilities import DEFAULT, Interaction, Track
from airflow_provider_modmed.client.instants import day_start_ms, instant_ms
from airflow_provider_modmed.sandbox.http import FhirError
from airflow_provider_modmed.sandbox.state import SandboxState
from airflow_provider_modmed.sandbox.store import Filter, Row

PAGINATION_FLAG = "pagination_optimization_disabled"

#: search parameters the sandbox understands, and how it compares them
SEARCH_PARAMS: dict[str, str] = {
    "_id": "eq", "identifier": "eq", "patient": "eq", "subject": "eq", "beneficiary": "eq",
    "actor": "eq", "status": "eq", "category": "eq", "code": "eq", "type": "eq", "class": "eq",
    "appointment-type": "eq", "clinical-status": "eq", "vaccine-code": "eq", "reconciliationId": "eq",
    "name": "prefix", "family": "prefix", "given": "prefix", "birthdate": "date", "date": "date",
    "member": "eq",
}
CONTROL_PARAMS = {"_count", "page", "_getpagesoffset", "_lastUpdated", "_format", "_sort", "_total"}

_PROPRIETARY_LU = re.compile(r"^(gt|eq|le)(\d{4}-\d{2}-\d{2})$")
_CERTIFIED_LU = re.compile(r"^(eq|ne|gt|ge|lt|le|sa|eb)?(\d{4}(-\d{2}(-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2}))?)?)?)$")


def _range_of(value: str) -> tuple[int, int]:
    """The [start, end) in ms that a FHIR date/instant of some precision denotes."""
    if "T" in value:
        start = instant_ms(value, "_lastUpdated")
        frac = value.split("T", 1)[1]
        digits = len(frac.split(".", 1)[1].rstrip("Z").split("+")[0].split("-")[0]) if "." in frac else 0
        width = 1000 if digits == 0 else max(1, 10 ** (3 - min(digits, 3)))
        return start, start + width
    parts = [int(p) for p in value.split("-")]
    if len(parts) == 3:
        d = date(parts[0], parts[1], parts[2])
        return day_start_ms(d), day_start_ms(d + timedelta(days=1))
    if len(parts) == 2:
        d = date(parts[0], parts[1], 1)
        nxt = date(parts[0] + (parts[1] // 12), parts[1] % 12 + 1, 1)
        return day_start_ms(d), day_start_ms(nxt)
    return day_start_ms(date(parts[0], 1, 1)), day_start_ms(date(parts[0] + 1, 1, 1))


def last_updated_range(track: Track, resource_type: str, values: Sequence[str]) -> tuple[int | None, int | None]:
    """Turn ``_lastUpdated`` values into an [low, high) ms range, refusing what the track refuses."""
    low: int | None = None
    high: int | None = None
    if not values:
        return low, high
    if track is Track.PROPRIETARY and not DEFAULT.supports_last_updated(track, resource_type):
        raise FhirError(400, "not-supported",
                        f"Search parameter _lastUpdated is not supported for {resource_type}")
    for value in values:
        if track is Track.PROPRIETARY:
            m = _PROPRIETARY_LU.match(value)
            if not m:
                raise FhirError(400, "invalid",
                                f"Invalid _lastUpdated '{value}': use gt, eq or le with a date yyyy-mm-dd")
            prefix, text = m.group(1), m.group(2)
        else:
            m = _CERTIFIED_LU.match(value)
            if not m:
                raise FhirError(400, "invalid", f"Invalid _lastUpdated '{value}'")
            prefix, text = m.group(1) or "eq", m.group(2)
        try:
            start, end = _range_of(text)
        except ValueError:
            raise FhirError(400, "invalid", f"Invalid _lastUpdated date '{value}'") from None
        lo, hi = {"gt": (end, None), "ge": (start, None), "sa": (end, None), "lt": (None, start),
                  "eb": (None, start), "le": (None, end), "eq": (start, end)}.get(prefix, (None, None))
        if prefix == "ne":
            raise FhirError(400, "not-supported", "_lastUpdated prefix ne is not supported")
        if lo is not None:
            low = lo if low is None else max(low, lo)
        if hi is not None:
            high = hi if high is None else min(high, hi)
    return low, high


def parse_filters(query: QueryParams) -> list[Filter]:
    filters: list[Filter] = []
    for raw_name, value in query.multi_items():
        name, _, modifier = raw_name.partition(":")
        if name in CONTROL_PARAMS or name not in SEARCH_PARAMS:
            continue
        kind = SEARCH_PARAMS[name]
        values = tuple(v for v in value.split(",") if v)
        if not values:
            continue
        if name in ("subject", "actor", "beneficiary") and "/" not in values[0]:
            values = tuple(f"Patient/{v}" for v in values)
        if name == "patient":
            values = tuple(v.split("/", 1)[1] if v.startswith("Patient/") else v for v in values)
        if name in ("category", "code", "type", "name", "family", "given"):
            values = tuple(dict.fromkeys(x for v in values for x in (v, v.lower())))
        if kind == "prefix":
            filters.append(Filter(name, values, "eq" if modifier == "exact" else "prefix"))
        elif kind == "date":
            m = re.match(r"^(eq|gt|ge|lt|le)?(.+)$", values[0])
            assert m
            op = m.group(1) or "eq"
            filters.append(Filter(name, (m.group(2),), "prefix" if op == "eq" else op))
        else:
            filters.append(Filter(name, values))
    return filters


@dataclass
class SearchPage:
    """One page of search results with its paging links."""

    rows: list[Row]
    total: int | None
    links: dict[str, str]


def search(state: SandboxState, track: Track, resource_type: str, query: QueryParams, self_url: str,
           *, flags: str = "") -> SearchPage:
    """Run a search with the track's paging rules."""
    spec = DEFAULT.spec(resource_type)
    assert spec is not None
    missing = DEFAULT.missing_search_params(track, resource_type, query.keys())
    if missing:
        raise FhirError(400, "required", f"Search of {resource_type} requires parameter(s): "
                        + ", ".join(missing))
    lu = last_updated_range(track, resource_type, query.getlist("_lastUpdated"))
    filters = parse_filters(query)
    max_count = DEFAULT.max_count(track, resource_type)
    try:
        count = min(max(int(query.get("_count", max_count)), 1), max_count)
        page = max(int(query.get("page", "1")), 1)
        offset = max(int(query.get("_getpagesoffset", "0")), 0)
    except ValueError:
        raise FhirError(400, "invalid", "_count, page and _getpagesoffset must be integers") from None
    keep = [(k, v) for k, v in query.multi_items() if k not in ("page", "_getpagesoffset", "_count")]
    base = self_url.split("?", 1)[0]

    def link(**extra: Any) -> str:
        return f"{base}?{urlencode([*keep, ('_count', count), *extra.items()])}"

    if track is Track.PROPRIETARY:
        optimized = PAGINATION_FLAG not in flags.lower()
        rows, true_total = state.store.search(resource_type, filters, lu, offset=(page - 1) * count,
                                              count=count, with_total=not optimized)
        links = {"self": link(page=page)}
        if optimized:
            # ModMed's quirk: total is this page's size, and `next` is offered whenever the page had
            # entries, the last page included; the page after the last is empty, with no next.
            if rows:
                links["next"] = link(page=page + 1)
            return SearchPage(rows, len(rows), links)
        assert true_total is not None
        last_page = max(1, -(-true_total // count))
        if page < last_page:
            links["next"] = link(page=page + 1)
        links["last"] = link(page=last_page)
        return SearchPage(rows, true_total, links)
    rows, total = state.store.search(resource_type, filters, lu, offset=offset, count=count, with_total=True)
    assert total is not None
    links = {"self": link(_getpagesoffset=offset)}
    if offset + count < total:
        links["next"] = link(_getpagesoffset=offset + count)
    return SearchPage(rows, total, links)


def bundle(page: SearchPage, fhir_base: str) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        out["total"] = page.total
    out["link"] = [{"relation": rel, "url": url} for rel, url in page.links.items()]
    out["entry"] = [{"fullUrl": f"{fhir_base}/{r.type}/{r.id}", "resource": r.body,
                     "search": {"mode": "match"}} for r in page.rows]
    return out


def check_interaction(track: Track, resource_type: str, interaction: Interaction) -> None:
    """Refuse, as ModMed would, what the capability matrix does not allow on this track."""
    spec = DEFAULT.spec(resource_type)
    if spec is None:
        raise FhirError(404, "not-supported", f"Unknown resource type '{resource_type}'")
    if DEFAULT.allows(track, resource_type, interaction):
        return
    if not spec.interactions(track):
        other = "ONC-certified API" if track is Track.PROPRIETARY else "proprietary API"
        raise FhirError(403, "forbidden",
                        f"{resource_type} is not available on this API; it is served by the {other}")
    if track is Track.CERTIFIED and interaction in (Interaction.CREATE, Interaction.UPDATE, Interaction.DELETE):
        raise FhirError(405, "not-supported", f"The certified API is read-only: {interaction.value} "
                        f"on {resource_type} is not allowed")
    raise FhirError(405, "not-supported", f"Interaction {interaction.value} is not supported for "
                    f"{resource_type}")


def validate_resource(resource: Any, resource_type: str) -> dict[str, Any]:
    """Check the body of a write: JSON object of the right type that validates as FHIR R4(B)."""
    if not isinstance(resource, dict):
        raise FhirError(400, "structure", "Request body must be a FHIR resource (JSON object)")
    if resource.get("resourceType") != resource_type:
        raise FhirError(400, "invalid", f"resourceType must be '{resource_type}', got "
                        f"'{resource.get('resourceType')}'")
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors()[:10])
        raise FhirError(422, "invalid", f"{resource_type} failed validation: {problems}") from None
    return resource


def parse_if_match(value: str | None) -> int | None:
    if not value:
        return None
    m = re.match(r'^(W/)?"?(\d+)"?$', value.strip())
    if not m:
        raise FhirError(400, "invalid", f"If-Match must look like W/\"<version>\", got {value!r}")
    return int(m.group(2))
