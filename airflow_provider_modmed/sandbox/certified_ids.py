"""The certified track's own ids: the one place where the sandbox translates between its two id spaces.

ModMed's ONC-certified API names records with dotted ids of its own (``1.120182.1.17082675``), not the
proprietary API's, so a DAG that reads both tracks joins them by identifier (the Patient's MRN), never by
id. The sandbox stores one practice, under the proprietary ids, and the certified track's boundary
(:func:`at_boundary`, and the bulk files through :func:`certify_json`) translates:

* a proprietary numeric id ``n`` is ``1.120182.2.<n>`` on the certified track (``Patient/5`` is
  ``Patient/1.120182.2.5``), a composite one ``kind|n`` is ``1.120182.2.<kind>.<n>``
  (``Organization/pay|7225`` is ``Organization/1.120182.2.pay.7225``);
* every other id is the same on both tracks: the dotted ``1.120182.1.<n>`` ids of the certified-only
  Immunizations and vital signs, and named ids such as ``Group/all-patients``.

Outgoing, the resource ids, every ``reference`` (``subject``, ``patient``, ``encounter``, ``performer``,
Group members, Provenance targets, ...), Bundle ``fullUrl`` s and the search parameters in Bundle links
carry certified ids. Incoming, the ids in paths (``{Type}/{id}``, ``Group/{id}/$export``) and in search
parameters (``_id``, ``patient``, ``subject``, ...) are read as certified ids: a proprietary id (``5``,
``Patient/5``) names nothing there, so a read answers 404 and a search matches nothing, as on ModMed.
Stored ids never start with ``1.120182.2.``, which keeps the mapping one-to-one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from airflow_provider_modmed.sandbox.http import FHIR_JSON, FhirError, fhir_response

__all__ = [
    "ID_PARAMS",
    "SHARED_ID_PREFIX",
    "at_boundary",
    "certified_id",
    "certified_reference",
    "certify",
    "certify_json",
    "proprietary_id",
    "proprietary_reference",
    "served_id",
]

#: certified id of a record that the proprietary track names too: ``1.120182.2.<proprietary id>``
SHARED_ID_PREFIX = "1.120182.2."
#: search parameters whose values name records, by id (``patient=1.120182.2.5``) or by reference
ID_PARAMS = frozenset({"_id", "patient", "subject", "actor", "beneficiary", "member", "encounter"})
#: what an incoming value that is no certified id becomes: a value no stored id or reference has
_UNKNOWN = "not-a-certified-id:"

_REFERENCE = re.compile(r"(?P<head>(?:[^?#]*/)?)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[^/?#]+)"
                        r"(?P<tail>/_history/[^/?#]+)?")
#: a ``reference`` member of compact JSON without escapes (what :func:`certify_json` rewrites)
_JSON_REFERENCE = re.compile(r'"reference":"([^"]*)"')


def _numeric(resource_id: str) -> bool:
    return resource_id.isascii() and resource_id.isdigit()


def _proprietary_shaped(resource_id: str) -> bool:
    """Numeric (``5``) or composite (``pay|7225``: one pipe, no dot or slash): ids the certified track renames."""
    if _numeric(resource_id):
        return True
    kind, bar, value = resource_id.partition("|")
    return bool(bar and kind and value) and "|" not in value and "." not in resource_id and "/" not in resource_id


def certified_id(resource_id: str) -> str:
    """The id the certified track serves for a record stored (and served by the proprietary track) as
    ``resource_id``: ``5`` -> ``1.120182.2.5``, ``pay|7225`` -> ``1.120182.2.pay.7225``; other ids as they are."""
    if _proprietary_shaped(resource_id):
        return SHARED_ID_PREFIX + resource_id.replace("|", ".")
    return resource_id


def served_id(track: str, stored_id: str) -> str:
    """The id under which ``track`` (``"proprietary"`` or ``"certified"``) serves a stored record."""
    return certified_id(stored_id) if str(track) == "certified" else stored_id


def proprietary_id(certified: str) -> str | None:
    """The stored id a certified id names (the inverse of :func:`certified_id`); ``None`` when ``certified``
    is no certified id, e.g. a proprietary ``5``."""
    if certified.startswith(SHARED_ID_PREFIX):
        rest = certified[len(SHARED_ID_PREFIX):]
        stored = rest if _numeric(rest) else rest.replace(".", "|", 1)
        return stored if _proprietary_shaped(stored) and certified_id(stored) == certified else None
    return None if _proprietary_shaped(certified) else certified


def _map_reference(reference: str, map_id: Callable[[str], str | None]) -> str | None:
    match = _REFERENCE.fullmatch(reference)
    if match is None:  # a contained (#x) or urn: reference, or no reference at all
        return reference
    mapped = map_id(match["id"])
    if mapped is None:
        return None
    return f"{match['head']}{match['type']}/{mapped}{match['tail'] or ''}"


def certified_reference(reference: str) -> str:
    """``Patient/5`` (relative, absolute, or versioned ``.../_history/2``) -> ``Patient/1.120182.2.5``."""
    return _map_reference(reference, certified_id) or reference


def proprietary_reference(reference: str) -> str | None:
    """The inverse of :func:`certified_reference`; ``None`` when it names no certified id."""
    return _map_reference(reference, proprietary_id)


def certify(node: Any, *, contained: bool = False) -> Any:
    """A copy of a FHIR JSON tree (a resource, a Bundle) with the certified track's ids: resource ids (not
    those of ``contained`` resources, which are local), every ``reference`` and ``fullUrl``, and the id
    search parameters of a Bundle's links."""
    if isinstance(node, list):
        return [certify(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("reference", "fullUrl") and isinstance(value, str):
            out[key] = certified_reference(value)
        elif key == "id" and isinstance(value, str) and "resourceType" in node and not contained:
            out[key] = certified_id(value)
        elif key == "contained" and isinstance(value, list):
            out[key] = [certify(item, contained=True) for item in value]
        elif key == "link" and node.get("resourceType") == "Bundle" and isinstance(value, list):
            out[key] = [{**link, "url": _certified_url(link["url"])} if isinstance(link.get("url"), str)
                        else link for link in value]
        else:
            out[key] = certify(value)
    return out


def certify_json(resource_id: str, text: str) -> str:
    """``json.dumps(certify(json.loads(text)), separators=(",", ":"))`` for one stored resource (compact
    JSON whose id is ``resource_id``), the bulk files' fast path: the references are rewritten in the text,
    and the id too when it occurs once; anything less plain (escapes, nested resources) goes through
    :func:`certify`."""
    if "\\" in text or text.count('"resourceType":') != 1 or '"fullUrl":' in text:
        return json.dumps(certify(json.loads(text)), separators=(",", ":"))
    text = _JSON_REFERENCE.sub(lambda m: f'"reference":"{certified_reference(m[1])}"', text)
    new_id = certified_id(resource_id)
    if new_id == resource_id:
        return text
    member = f'"id":"{resource_id}"'
    if text.count(member) != 1:
        return json.dumps(certify(json.loads(text)), separators=(",", ":"))
    return text.replace(member, f'"id":"{new_id}"')


# -- search parameters --------------------------------------------------------------------------------

def _proprietary_value(value: str) -> str:
    stored = proprietary_reference(value) if "/" in value else proprietary_id(value)
    return _UNKNOWN + value if stored is None else stored


def _certified_value(value: str) -> str:
    if value.startswith(_UNKNOWN):
        return value[len(_UNKNOWN):]
    return certified_reference(value) if "/" in value else certified_id(value)


def _map_query(items: Iterable[tuple[str, str]], map_value: Callable[[str], str]) -> list[tuple[str, str]]:
    return [(name, ",".join(map_value(v) for v in value.split(",")) if name.partition(":")[0] in ID_PARAMS
             else value) for name, value in items]


def _certified_url(url: str) -> str:
    base, sep, query = url.partition("?")
    if not sep:
        return url
    return f"{base}?{urlencode(_map_query(parse_qsl(query, keep_blank_values=True), _certified_value))}"


# -- the boundary -------------------------------------------------------------------------------------

async def _proprietary_request(request: Request) -> tuple[Request, list[tuple[str, str]]]:
    """The request with proprietary ids in its path parameters, query and ``_search`` form; and the
    (proprietary, certified) pairs of its path ids, to put error messages back in certified terms."""
    scope = dict(request.scope)
    renamed: list[tuple[str, str]] = []
    path_params = dict(request.path_params)
    for name, resource_type in (("rid", path_params.get("rtype", "")), ("gid", "Group")):
        if name in path_params:
            stored = _proprietary_value(path_params[name])
            renamed.append((f"{resource_type}/{stored}", f"{resource_type}/{path_params[name]}"))
            path_params[name] = stored
    scope["path_params"] = path_params
    query = request.query_params.multi_items()
    translated = _map_query(query, _proprietary_value)
    if translated != query:
        scope["query_string"] = urlencode(translated).encode()
    body = await request.body()
    if request.method == "POST" and request.url.path.endswith("/_search"):
        body = urlencode(_map_query(parse_qsl(body.decode(errors="replace"), keep_blank_values=True),
                                    _proprietary_value)).encode()

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive), renamed


def _certified_response(response: Response) -> Response:
    if response.media_type != FHIR_JSON or not response.body or response.status_code >= 300:
        return response
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
    return fhir_response(certify(json.loads(bytes(response.body))), response.status_code, headers)


async def at_boundary(request: Request, serve: Callable[[Request], Awaitable[Response]]) -> Response:
    """Serve a certified-track request with the track's own ids: ``serve`` (a handler shared with the
    proprietary track) gets the request in stored (proprietary) ids; its answer, and the message of a
    FhirError it raises, go out in certified ids."""
    inner, renamed = await _proprietary_request(request)
    try:
        response = await serve(inner)
    except FhirError as exc:
        for stored, certified in renamed:
            exc.diagnostics = re.sub(rf"{re.escape(stored)}(?![\w|.])", certified, exc.diagnostics)
        raise
    return _certified_response(response)
