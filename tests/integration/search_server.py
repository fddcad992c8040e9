"""A small fake FHIR server on 127.0.0.1 for search answers the sandbox does not give: ``_include`` entries
(``search.mode = include``, over two pages, the same Organization on both) and a wrong-type match (a Patient
search answering an Observation). Proprietary layout and password grant, so the client and Airflow
connections use it like ModMed. (The sandbox ignores ``_include``: sandbox/fhir_api.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

from airflow_provider_modmed.client import ClientConfig
from tests.security.servers import Answer, LoopbackServer, fhir_json, token_answer

FIRM = "x"
FHIR_PATH = f"/ema-dev/firm/{FIRM}/ema/fhir/v2"
#: a patient datum the wrong-type answer carries: it must never reach an error text
SECRET_NAME = "Zebulon-Quixote"
LU = "2024-03-02T10:00:00.000Z"


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1", "lastUpdated": LU},
            "managingOrganization": {"reference": "Organization/org1"}}


ORG = {"resourceType": "Organization", "id": "org1", "meta": {"versionId": "1", "lastUpdated": LU}, "name": "Clinic"}
LINKED = {**patient("p9"), "name": [{"family": "Linked"}]}  # a Patient included by _include=Patient:link


def entry(resource: dict[str, Any], mode: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"fullUrl": f"{resource['resourceType']}/{resource.get('id', '-')}", "resource": resource}
    if mode is not None:
        out["search"] = {"mode": mode}
    return out


def searchset(entries: list[dict[str, Any]], next_url: str | None = None, total: int | None = None) -> dict[str, Any]:
    """A searchset page; ``total`` counts matches only (FHIR), over the whole result set."""
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries) if total is None else total,
            "link": links, "entry": entries}


def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
    parts = urlsplit(path)
    query = parse_qs(parts.query)
    if parts.path.endswith("/oauth2/grant"):
        return token_answer()
    if method == "GET" and parts.path == f"{FHIR_PATH}/Patient":
        if query.get("family") == ["wrong"]:  # a wrong-type match: an Observation with no search.mode
            return fhir_json(searchset([entry(patient("p1"), "match"), entry(
                {"resourceType": "Observation", "id": "o1", "subject": {"display": SECRET_NAME}}, None)]))
        if query.get("page") == ["2"]:
            return fhir_json(searchset([entry(patient("p3"), "match"), entry(ORG, "include")], total=3))
        if "_include" in query:
            return fhir_json(searchset(
                [entry(patient("p1"), "match"), entry(ORG, "include"), entry(patient("p2"), None),
                 entry(LINKED, "include"),
                 entry({"resourceType": "OperationOutcome", "issue": []}, "outcome")],
                f"{FHIR_PATH}/Patient?page=2", total=3))
        return fhir_json(searchset([entry(patient("p1"), "match")]))
    return fhir_json({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]},
                     404)


@contextlib.contextmanager
def search_server() -> Iterator[LoopbackServer]:
    with LoopbackServer(route) as server:
        yield server


def client_config(server: LoopbackServer) -> ClientConfig:
    return ClientConfig(track="proprietary", fhir_base=f"{server.url}{FHIR_PATH}", firm=FIRM, api_key="k",
                        username="u", password="p", max_retries=0)


def airflow_connection(server: LoopbackServer) -> dict[str, Any]:
    """The server as an Airflow connection (JSON form, for ``AIRFLOW_CONN_*``)."""
    return {"conn_type": "modmed", "host": f"{server.url}/ema-dev/firm", "login": "u", "password": "p",
            "extra": {"track": "proprietary", "environment": "custom", "firm_url_prefix": FIRM,
                      "auth_method": "password", "api_key": "k"}}
