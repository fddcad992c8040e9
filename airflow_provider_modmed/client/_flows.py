"""Request flows, written once and driven by a sync face and an async face.

A flow is a generator that yields steps and returns a result; it holds no client and never sleeps:

* ``httpx.Request``: the driver sends it (rate budget, retries, auth) and sends back the ``Response``;
* :class:`Sleep`: the driver sleeps (``time.sleep`` or ``anyio.sleep``) and sends back ``None``;
* :class:`Emit`: :func:`iterate`/:func:`aiterate` hand the value to the caller (one resource at a time).

Flow *constructors* (:func:`read`, :func:`search`, ...) validate their arguments and run the capability
pre-flight when called, before the first request exists; they return the generator.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode

import httpx

from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Interaction, ResourceSpec, Track
from airflow_provider_modmed.client.config import ClientConfig, origin
from airflow_provider_modmed.client.retry import SAFE_TO_RETRY, WHAT
from airflow_provider_modmed.errors import ConfigurationError, ModMedError, error_for_status

log = logging.getLogger("airflow_provider_modmed.client")

T = TypeVar("T")

FHIR_JSON = "application/fhir+json"
ACCEPT_FHIR = {"Accept": FHIR_JSON}
#: ModMed's identifier system for a ChargeItem's transactionId (duplicates are refused with 409)
TRANSACTION_ID_SYSTEM = "https://www.modmed.com/fhir/transaction-id"


@dataclass(frozen=True)
class Sleep:
    """A flow step: wait ``seconds`` before going on."""

    seconds: float


@dataclass(frozen=True)
class Emit:
    """A flow step: hand ``value`` to the caller of :func:`iterate`/:func:`aiterate`."""

    value: Any


Step = httpx.Request | Sleep | Emit
Flow = Generator[Step, Any, T]
Send = Callable[[httpx.Request], httpx.Response]
ASend = Callable[[httpx.Request], Awaitable[httpx.Response]]


# -- drivers -------------------------------------------------------------------------------------

def drive(flow: Flow[T], send: Send, sleep: Callable[[float], Any]) -> T:
    """Run ``flow`` to its result on the sync face."""
    out: Any = None
    try:
        while True:
            try:
                step = flow.send(out)
            except StopIteration as done:
                return done.value
            if isinstance(step, Emit):
                raise TypeError("drive() got an Emit step; use iterate() for flows that yield values")
            out = sleep(step.seconds) if isinstance(step, Sleep) else send(step)
    finally:
        flow.close()


async def adrive(flow: Flow[T], asend: ASend, asleep: Callable[[float], Awaitable[Any]]) -> T:
    """Run ``flow`` to its result on the async face."""
    out: Any = None
    try:
        while True:
            try:
                step = flow.send(out)
            except StopIteration as done:
                return done.value
            if isinstance(step, Emit):
                raise TypeError("adrive() got an Emit step; use aiterate() for flows that yield values")
            out = await asleep(step.seconds) if isinstance(step, Sleep) else await asend(step)
    finally:
        flow.close()


def iterate(flow: Flow[Any], send: Send, sleep: Callable[[float], Any]) -> Iterator[Any]:
    """Run ``flow`` on the sync face, yielding each :class:`Emit` value as it comes."""
    out: Any = None
    try:
        while True:
            try:
                step = flow.send(out)
            except StopIteration:
                return
            if isinstance(step, Emit):
                out = None
                yield step.value
            else:
                out = sleep(step.seconds) if isinstance(step, Sleep) else send(step)
    finally:
        flow.close()


async def aiterate(flow: Flow[Any], asend: ASend,
                   asleep: Callable[[float], Awaitable[Any]]) -> AsyncIterator[Any]:
    """Run ``flow`` on the async face, yielding each :class:`Emit` value as it comes."""
    out: Any = None
    try:
        while True:
            try:
                step = flow.send(out)
            except StopIteration:
                return
            if isinstance(step, Emit):
                out = None
                yield step.value
            else:
                out = await asleep(step.seconds) if isinstance(step, Sleep) else await asend(step)
    finally:
        flow.close()


# -- context, ids, URLs --------------------------------------------------------------------------

@dataclass(frozen=True)
class FhirContext:
    """What flows need to know about the server: track, FHIR base and capability matrix."""

    track: Track
    base: str
    capabilities: Capabilities = DEFAULT

    @classmethod
    def from_config(cls, config: ClientConfig) -> FhirContext:
        return cls(config.resolved_track, config.fhir_base, config.capabilities)


class InvalidIdError(ConfigurationError, ValueError):
    """A resource id that is not a FHIR id (or one of ModMed's ``prefix|id`` forms)."""


_ID_PART = r"[A-Za-z0-9\-.]{1,64}"
_ID_RE = re.compile(rf"{_ID_PART}(?:\|{_ID_PART})?")


def validate_id(resource_id: Any, field: str = "id") -> str:
    """Return ``resource_id`` if it is a FHIR id, ModMed composite (``pay|7225``) or dotted id.

    Anything that could change the URL path (``/``, ``?``, ``#``, ``..``, whitespace, ...) is refused
    with :class:`InvalidIdError` (a ``ValueError`` and a :class:`ConfigurationError`) naming ``field``.
    """
    if not isinstance(resource_id, str) or not resource_id:
        raise InvalidIdError(f"{field} must be a non-empty string, got {type(resource_id).__name__}")
    if not _ID_RE.fullmatch(resource_id) or ".." in resource_id or resource_id.strip(".") == "":
        raise InvalidIdError(
            f"{field} {resource_id[:80]!r} is not a valid FHIR id: use letters, digits, '-' and '.' "
            "(ModMed composites such as 'pay|7225' allowed); '/', '?', '#', '..' and spaces are refused"
        )
    return resource_id


def encode_id(resource_id: str, field: str = "id") -> str:
    """Validate and percent-encode an id as one path segment (``pay|7225`` -> ``pay%7C7225``)."""
    return quote(validate_id(resource_id, field), safe="")


def _check(ctx: FhirContext, resource_type: Any, interaction: Interaction) -> ResourceSpec:
    """The capability pre-flight: raises :class:`CapabilityError` before any request exists."""
    if not isinstance(resource_type, str):
        raise ConfigurationError(f"resource_type must be a string, got {type(resource_type).__name__}")
    return ctx.capabilities.check(ctx.track, resource_type, interaction)


def _request(method: str, url: str, what: str, *, headers: Mapping[str, str] | None = None,
             **kwargs: Any) -> httpx.Request:
    extensions = {WHAT: what, **kwargs.pop("extensions", {})}
    return httpx.Request(method, url, headers={**ACCEPT_FHIR, **(headers or {})},
                         extensions=extensions, **kwargs)


def resource_url(ctx: FhirContext, resource_type: str, resource_id: str | None = None) -> str:
    url = f"{ctx.base}/{resource_type}"
    return url if resource_id is None else f"{url}/{encode_id(resource_id)}"


def next_page_request(bundle: Mapping[str, Any], base: str,
                      headers: Mapping[str, str] | None = None) -> httpx.Request | None:
    """The request for the bundle's ``next`` link, or None when there is none.

    Relative links are resolved against ``base``. A link to another scheme, host or port than the base
    raises :class:`ModMedError` (following it would send credentials elsewhere or leave the server).
    """
    href = next((link.get("url") for link in bundle.get("link") or ()
                 if isinstance(link, Mapping) and link.get("relation") == "next"), None)
    if not href or not isinstance(href, str):
        return None
    base_url = httpx.URL(base.rstrip("/") + "/")
    url = base_url.join(href)
    if origin(url) != origin(base_url):
        scheme, host, port = origin(url)
        raise ModMedError(f"refusing a next link to {scheme}://{host}:{port}: it is outside the FHIR "
                          "base's origin")
    return httpx.Request("GET", url, headers={**ACCEPT_FHIR, **(headers or {})})


def parse_location(location: str, base: str) -> tuple[str, str]:
    """``(type, id)`` from a ``Location`` header (absolute or relative, ``_history`` dropped)."""
    base_url = httpx.URL(base.rstrip("/") + "/")
    url = base_url.join(location)
    if origin(url) != origin(base_url):
        raise ModMedError("the Location of a created resource is outside the FHIR base's origin")
    path = url.raw_path.decode("ascii").split("?", 1)[0]  # still percent-encoded: decode once
    segments = [unquote(s) for s in path.split("/") if s]
    if "_history" in segments:
        segments = segments[: segments.index("_history")]
    if len(segments) < 2:
        raise ModMedError("the Location header does not name a resource")
    return segments[-2], segments[-1]


# -- answers -------------------------------------------------------------------------------------

def json_body(response: httpx.Response) -> Any:
    """The JSON body, ``None`` when empty or not JSON (error bodies need not be JSON)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def expect(response: httpx.Response, ok: Sequence[int], what: str) -> Any:
    """The JSON body of a successful answer, or the typed error (OperationOutcome codes, no data)."""
    body = json_body(response)
    if response.status_code in ok:
        return body
    raise error_for_status(response.status_code, body, what)


def expect_resource(response: httpx.Response, what: str, ok: Sequence[int] = (200,),
                    resource_type: str | None = None) -> dict[str, Any]:
    body = expect(response, ok, what)
    if not isinstance(body, dict) or "resourceType" not in body:
        raise ModMedError(f"{what} answered no FHIR resource", status_code=response.status_code)
    if resource_type is not None and body["resourceType"] != resource_type:
        raise ModMedError(f"{what} answered a {str(body['resourceType'])[:64]}", status_code=response.status_code)
    return body


# -- FHIR flows ----------------------------------------------------------------------------------

def metadata(ctx: FhirContext) -> Flow[dict[str, Any]]:
    """GET ``[base]/metadata``: the CapabilityStatement."""
    return _one(_request("GET", f"{ctx.base}/metadata", "metadata"), "metadata")


def read(ctx: FhirContext, resource_type: str, resource_id: str) -> Flow[dict[str, Any]]:
    """GET ``[base]/Type/id``."""
    _check(ctx, resource_type, Interaction.READ)
    url = resource_url(ctx, resource_type, resource_id)
    what = f"read {resource_type}"
    return _one(_request("GET", url, what), what, resource_type)


def _one(request: httpx.Request, what: str, resource_type: str | None = None) -> Flow[dict[str, Any]]:
    response = yield request
    return expect_resource(response, what, resource_type=resource_type)


def _search_pairs(params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> list[tuple[str, str]]:
    items = params.items() if isinstance(params, Mapping) else (params or ())
    pairs: list[tuple[str, str]] = []
    for key, value in items:
        values = value if isinstance(value, (list, tuple)) else [value]
        pairs.extend((str(key), str(v)) for v in values if v is not None)
    return pairs


def search(ctx: FhirContext, resource_type: str,
           params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
           count: int | None = None, headers: Mapping[str, str] | None = None) -> Flow[int]:
    """Search ``resource_type``, emitting each resource; returns how many were emitted.

    ``_count`` is the resource's maximum on the track (``capabilities.py``) unless ``count`` or a
    ``_count`` parameter asks for less. Pages are followed through ``next`` links on the base's origin
    only; the walk stops at the first page without entries (ModMed puts a ``next`` link on its last page
    and reports the page's size as ``total``).
    """
    spec = _check(ctx, resource_type, Interaction.SEARCH)
    pairs = _search_pairs(params)
    asked = [v for k, v in pairs if k == "_count"]
    pairs = [(k, v) for k, v in pairs if k != "_count"]
    missing = [p for p in spec.required_search_params if not any(k.split(":")[0] == p for k, _ in pairs)]
    if missing and ctx.track is Track.PROPRIETARY:
        raise ConfigurationError(f"ModMed requires search parameter(s) {', '.join(missing)} on "
                                 f"{resource_type}")
    maximum = ctx.capabilities.max_count(ctx.track, resource_type)
    wanted = count if count is not None else (asked[-1] if asked else None)
    if wanted is not None:
        try:
            wanted = int(wanted)
        except ValueError:
            raise ConfigurationError(f"_count must be a positive integer, got {wanted!r}") from None
        if wanted < 1:
            raise ConfigurationError(f"_count must be a positive integer, got {wanted}")
    page_size = min(wanted, maximum) if wanted is not None else maximum
    pairs.append(("_count", str(page_size)))
    what = f"search {resource_type}"
    first = _request("GET", resource_url(ctx, resource_type), what, params=pairs, headers=headers)
    return _pages(ctx, first, what, headers)


def _pages(ctx: FhirContext, request: httpx.Request, what: str,
           headers: Mapping[str, str] | None) -> Flow[int]:
    emitted = pages = 0
    seen: set[int] = set()
    while True:
        seen.add(hash(str(request.url)))
        response = yield request
        bundle = expect(response, (200,), what)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise ModMedError(f"{what} answered no Bundle", status_code=response.status_code)
        pages += 1
        entries = bundle.get("entry") or []
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(resource, dict):
                continue
            if (entry.get("search") or {}).get("mode") == "outcome":
                continue
            emitted += 1
            yield Emit(resource)
        if not entries:
            break
        following = next_page_request(bundle, ctx.base, headers)
        del bundle, entries
        if following is None or hash(str(following.url)) in seen:
            break
        following.extensions[WHAT] = what
        request = following
    log.info("modmed: %s: %d resources in %d pages", what, emitted, pages)
    return emitted


def _is_safe_create(resource: Mapping[str, Any]) -> bool:
    if resource.get("resourceType") != "ChargeItem":
        return False
    return any(isinstance(i, Mapping) and i.get("system") == TRANSACTION_ID_SYSTEM and i.get("value")
               for i in resource.get("identifier") or ())


def _resource_type_of(resource: Any) -> str:
    if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
        raise ConfigurationError("resource must be a FHIR resource dict with a resourceType")
    return str(resource["resourceType"])


def create(ctx: FhirContext, resource: Mapping[str, Any],
           if_none_exist: str | Mapping[str, Any] | None = None) -> Flow[dict[str, Any]]:
    """POST ``[base]/Type``; conditional with ``If-None-Exist``.

    Returns the created (or, for a matching conditional create, the existing) resource. ModMed may
    answer 201 with an empty body and only a ``Location``: the resource is then read back from it.
    A POST is marked safe to retry only when it is conditional or is a ChargeItem with a transactionId.
    """
    resource_type = _check(ctx, _resource_type_of(resource), Interaction.CREATE).resource_type
    headers = {"Content-Type": FHIR_JSON}
    if if_none_exist:
        headers["If-None-Exist"] = (if_none_exist if isinstance(if_none_exist, str)
                                    else urlencode(_search_pairs(if_none_exist)))
    what = f"create {resource_type}"
    request = _request("POST", resource_url(ctx, resource_type), what, headers=headers,
                       content=json.dumps(resource, separators=(",", ":")).encode(),
                       extensions={SAFE_TO_RETRY: bool(if_none_exist) or _is_safe_create(resource)})
    return _write(ctx, request, resource_type, what, (200, 201))


def update(ctx: FhirContext, resource: Mapping[str, Any],
           if_match: str | int | None = None) -> Flow[dict[str, Any]]:
    """PUT ``[base]/Type/id``; with ``if_match`` the server refuses (412) if the version moved on."""
    resource_type = _check(ctx, _resource_type_of(resource), Interaction.UPDATE).resource_type
    url = resource_url(ctx, resource_type, validate_id(resource.get("id"), "resource['id']"))
    headers = {"Content-Type": FHIR_JSON}
    if if_match is not None:
        tag = str(if_match)
        headers["If-Match"] = tag if tag.startswith(("W/", '"')) else f'W/"{tag}"'
    what = f"update {resource_type}"
    request = _request("PUT", url, what, headers=headers,
                       content=json.dumps(resource, separators=(",", ":")).encode())
    return _write(ctx, request, resource_type, what, (200, 201))


def _write(ctx: FhirContext, request: httpx.Request, resource_type: str, what: str,
           ok: Sequence[int]) -> Flow[dict[str, Any]]:
    response = yield request
    body = expect(response, ok, what)
    if isinstance(body, dict) and body.get("resourceType") == resource_type:
        return body
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    if not location:
        raise ModMedError(f"{what} answered neither the resource nor a Location",
                          status_code=response.status_code)
    located_type, located_id = parse_location(location, ctx.base)
    if located_type != resource_type:
        raise ModMedError(f"{what} answered a Location for {located_type!r}")
    if not ctx.capabilities.allows(ctx.track, resource_type, Interaction.READ):
        return {"resourceType": resource_type, "id": located_id}  # write-only type: nothing to read
    log.debug("modmed: %s answered no body; reading it back", what)
    response = yield _request("GET", resource_url(ctx, resource_type, located_id), f"read {resource_type}")
    return expect_resource(response, f"read back after {what}", resource_type=resource_type)


def delete(ctx: FhirContext, resource_type: str, resource_id: str) -> Flow[None]:
    """DELETE ``[base]/Type/id``."""
    _check(ctx, resource_type, Interaction.DELETE)
    what = f"delete {resource_type}"
    return _delete(_request("DELETE", resource_url(ctx, resource_type, resource_id), what), what)


def _delete(request: httpx.Request, what: str) -> Flow[None]:
    response = yield request
    expect(response, (200, 202, 204), what)
    return None
