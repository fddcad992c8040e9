"""Request flows, written once and driven by a sync face and an async face.

A flow is a generator that yields steps and returns a result; it holds no client and never sleeps. The
step kinds and the drivers that run them live in :mod:`.drivers`.

Flow *constructors* (:func:`read`, :func:`search`, ...) validate their arguments and run the capability
pre-flight when called, before the first request exists; they return the generator.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote

import httpx

from airflow_provider_modmed.capabilities import DEFAULT, Capabilities, Interaction, ResourceSpec, Track
from airflow_provider_modmed.client.config import ClientConfig, origin
from airflow_provider_modmed.client.drivers import Emit, Flow, Step
from airflow_provider_modmed.client.drivers import Sleep as Sleep  # re-exported: flows and tests import it here
from airflow_provider_modmed.client.retry import WHAT
from airflow_provider_modmed.errors import ConfigurationError, ModMedError, error_for_status, json_body

log = logging.getLogger("airflow_provider_modmed.client")

T = TypeVar("T")

FHIR_JSON = "application/fhir+json"
ACCEPT_FHIR = {"Accept": FHIR_JSON}


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


#: FHIR's id rule, ``[A-Za-z0-9\-\.]{1,64}``, for one part; a part made only of dots (``.``, ``..``) is
#: refused, since a path normaliser (a proxy, the server) would read it as a dot-segment
_ID_PART = r"(?!\.+(?:\||\Z))[A-Za-z0-9\-.]{1,64}"
#: a FHIR id, or ModMed's composite ``prefix|id`` (``pay|7225``)
_ID_RE = re.compile(rf"{_ID_PART}(?:\|{_ID_PART})?")


def validate_id(resource_id: Any, field: str = "id") -> str:
    """Return ``resource_id`` if it is a FHIR id (letters, digits, ``-`` and ``.``, 1-64 long, so ``a..b``
    too) or a ModMed composite (``pay|7225``).

    Anything that could change the URL path (``/``, ``?``, ``#``, an id of dots only such as ``..``,
    whitespace, control characters, ...) is refused with :class:`InvalidIdError` (a ``ValueError`` and a
    :class:`ConfigurationError`) naming ``field``.
    """
    if not isinstance(resource_id, str) or not resource_id:
        raise InvalidIdError(f"{field} must be a non-empty string, got {type(resource_id).__name__}")
    if not _ID_RE.fullmatch(resource_id):
        raise InvalidIdError(
            f"{field} {resource_id[:80]!r} is not a valid FHIR id: use letters, digits, '-' and '.' "
            "(ModMed composites such as 'pay|7225' allowed); '/', '?', '#', '.' or '..' alone and spaces "
            "are refused"
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


#: search parameters: a dict (list values repeat), a list of ``(name, value)`` pairs or a query string
SearchParams = Mapping[str, Any] | Sequence[tuple[str, Any]] | str | None
#: what :func:`pages` hands each page to: ``(bundle, matches, included)`` -> steps to pass on (e.g. Emit)
PageHandler = Callable[[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]], Iterator[Step]]

#: a FHIR resource type name (what an answered ``resourceType`` must look like to be named in an error)
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{0,63}")


class Included(dict[str, Any]):
    """A resource that a search returned with ``search.mode = include`` (``_include``/``_revinclude``).

    It is the resource itself (a dict); the type marks it as not a match. :func:`search` emits these only
    when asked (``includes=True``), beside the matches, which stay plain dicts.
    """

    @property
    def resource_type(self) -> str:
        return str(self["resourceType"])


def search_pairs(params: SearchParams) -> list[tuple[str, str]]:
    """Search parameters as ``(name, value)`` string pairs, in order; list values repeat, None drops.

    Accepts a dict, a list of pairs or a query string (``"?family=a&given=b"``); anything else raises
    :class:`ConfigurationError`.
    """
    if params is None or params == "":
        return []
    if isinstance(params, str):
        return parse_qsl(params.lstrip("?"), keep_blank_values=False)
    items = params.items() if isinstance(params, Mapping) else params
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigurationError("search parameters must be a dict, a list of (name, value) pairs or a "
                                     "query string")
        key, value = item
        values = value if isinstance(value, (list, tuple)) else [value]
        pairs.extend((str(key), str(v)) for v in values if v is not None)
    return pairs


def page_size(ctx: FhirContext, resource_type: str, wanted: Any = None) -> int:
    """``_count`` to send: ``wanted`` (a positive integer) capped at the type's maximum on the track."""
    maximum = ctx.capabilities.max_count(ctx.track, resource_type)
    if wanted is None:
        return maximum
    try:
        wanted = int(wanted)
    except ValueError:
        raise ConfigurationError(f"_count must be a positive integer, got {wanted!r}") from None
    if wanted < 1:
        raise ConfigurationError(f"_count must be a positive integer, got {wanted}")
    return min(wanted, maximum)


def search_request(ctx: FhirContext, resource_type: str, pairs: Sequence[tuple[str, str]], what: str,
                   headers: Mapping[str, str] | None = None) -> httpx.Request:
    """The first page's GET ``[base]/Type?pairs``."""
    return _request("GET", resource_url(ctx, resource_type), what, params=list(pairs), headers=headers)


def search(ctx: FhirContext, resource_type: str, params: SearchParams = None,
           count: int | None = None, headers: Mapping[str, str] | None = None, *,
           includes: bool = False) -> Flow[int]:
    """Search ``resource_type``, emitting each match; returns how many matches were emitted.

    ``_count`` is the resource's maximum on the track (``capabilities.py``) unless ``count`` or a
    ``_count`` parameter asks for less. Pages are walked by :func:`pages`: every match is a
    ``resource_type`` (a match of another type raises :class:`ModMedError`). Included resources
    (``search.mode = include``) are left out and counted in the log, or, with ``includes=True``, emitted
    as :class:`Included` after each page's matches.
    """
    _check(ctx, resource_type, Interaction.SEARCH)
    pairs = search_pairs(params)
    asked = [v for k, v in pairs if k == "_count"]
    pairs = [(k, v) for k, v in pairs if k != "_count"]
    ctx.capabilities.require_search_params(ctx.track, resource_type, (k for k, _ in pairs))
    wanted = count if count is not None else (asked[-1] if asked else None)
    pairs.append(("_count", str(page_size(ctx, resource_type, wanted))))
    what = f"search {resource_type}"
    first = search_request(ctx, resource_type, pairs, what, headers)
    return _emit_pages(ctx, resource_type, first, what, headers, includes)


def _emit_pages(ctx: FhirContext, resource_type: str, first: httpx.Request, what: str,
                headers: Mapping[str, str] | None, includes: bool) -> Flow[int]:
    emitted = left_out = 0

    def emit(bundle: dict[str, Any], matches: list[dict[str, Any]],
             included: list[dict[str, Any]]) -> Iterator[Step]:
        nonlocal emitted, left_out
        for resource in matches:
            emitted += 1
            yield Emit(resource)
        if not includes:
            left_out += len(included)
            return
        for resource in included:
            yield Emit(Included(resource))

    count = yield from pages(ctx, first, what, emit, headers, resource_type=resource_type)
    log.info("modmed: %s: %d resources in %d pages", what, emitted, count)
    if left_out:
        log.info("modmed: %s: left out %d included resources (search.mode include)", what, left_out)
    return emitted


def split_entries(bundle: Mapping[str, Any], resource_type: str, what: str,
                  status_code: int = 200) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A searchset page's ``(matches, included)`` resources, by each entry's ``search.mode``.

    ``outcome`` entries are left out (so is an OperationOutcome without a mode, as some servers send).
    ``include`` entries are included resources, whatever their type. Every other entry (``match`` or no
    mode) is a match and must be a ``resource_type``: a match of another type raises :class:`ModMedError`
    naming the searched type and the type answered (nothing else of the entry), as a read does.
    """
    matches: list[dict[str, Any]] = []
    included: list[dict[str, Any]] = []
    for entry in bundle.get("entry") or ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        info = entry.get("search")
        mode = info.get("mode") if isinstance(info, Mapping) else None
        if mode == "outcome":
            continue
        answered = resource.get("resourceType")
        if not isinstance(answered, str) or not _TYPE_RE.fullmatch(answered):
            raise ModMedError(f"{what} answered an entry without a valid resourceType (searched "
                              f"{resource_type})", status_code=status_code)
        if mode is None and answered == "OperationOutcome" != resource_type:
            continue
        if mode == "include":
            included.append(resource)
        elif answered != resource_type:
            raise ModMedError(f"{what} answered a match of type {answered}: a {resource_type} search must "
                              f"return {resource_type} resources (other types only as search.mode "
                              "'include')", status_code=status_code)
        else:
            matches.append(resource)
    return matches, included


def pages(ctx: FhirContext, request: httpx.Request, what: str, on_page: PageHandler,
          headers: Mapping[str, str] | None = None, *, resource_type: str) -> Flow[int]:
    """Walk a ``resource_type`` search's pages from ``request``; returns how many pages were read.

    Each Bundle goes to ``on_page`` with its matches and its included resources (:func:`split_entries`:
    outcome entries left out, a match of another type than ``resource_type`` raises before any of the page
    is passed on); the steps ``on_page`` yields (e.g. ``Emit``) are passed on. ``next`` links are followed on the base's
    origin only (:func:`next_page_request`), never twice; the walk stops at the first page without
    entries (ModMed puts a ``next`` link on its last page and reports the page's size as ``total``).
    """
    count = 0
    visited: set[int] = set()
    while True:
        visited.add(hash(str(request.url)))
        response = yield request
        bundle = expect(response, (200,), what)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise ModMedError(f"{what} answered no Bundle", status_code=response.status_code)
        count += 1
        entries = bundle.get("entry") or []
        yield from on_page(bundle, *split_entries(bundle, resource_type, what, response.status_code))
        if not entries:
            break
        following = next_page_request(bundle, ctx.base, headers)
        del bundle, entries
        if following is None or hash(str(following.url)) in visited:
            break
        following.extensions[WHAT] = what
        request = following
    return count

