"""Search results are checked (issue 13, item 4), over real HTTP against a fake FHIR server on 127.0.0.1
(tests/integration/search_server.py; the sandbox ignores ``_include``): included entries never reach the
matches (the client's iterator, NDJSON files, the change poll), and a match of another type fails."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from airflow_provider_modmed.client import AsyncFhirClient, FhirClient
from airflow_provider_modmed.client._flows import Included
from airflow_provider_modmed.client.changes import ChangeQuery, Cursor, poll_changes
from airflow_provider_modmed.client.ndjson import search_to_ndjson
from airflow_provider_modmed.errors import ModMedError
from tests.integration.search_server import ORG, SECRET_NAME, client_config, search_server
from tests.security.servers import LoopbackServer

pytestmark = pytest.mark.integration

INCLUDE = {"_include": "Patient:organization"}


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackServer]:
    with search_server() as s:
        yield s


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[FhirClient]:
    with FhirClient(client_config(server), sleep=lambda s: None) as c:
        yield c


def test_the_search_iterator_yields_matches_only_by_default(client: FhirClient) -> None:
    assert [(r["resourceType"], r["id"]) for r in client.search("Patient", INCLUDE)] == [
        ("Patient", "p1"), ("Patient", "p2"), ("Patient", "p3")]


def test_included_resources_are_yielded_marked_when_asked(client: FhirClient) -> None:
    found = list(client.search("Patient", INCLUDE, includes=True))
    assert [(type(r).__name__, r["resourceType"], r["id"]) for r in found] == [
        ("dict", "Patient", "p1"), ("dict", "Patient", "p2"), ("Included", "Organization", "org1"),
        ("Included", "Patient", "p9"), ("dict", "Patient", "p3"), ("Included", "Organization", "org1")]


def test_the_async_face_checks_the_same(server: LoopbackServer) -> None:
    async def run() -> tuple[list[str], list[bool]]:
        async with AsyncFhirClient(client_config(server)) as c:
            plain = [r["id"] async for r in c.search("Patient", INCLUDE)]
            marked = [isinstance(r, Included) async for r in c.search("Patient", INCLUDE, includes=True)]
            with pytest.raises(ModMedError, match="match of type Observation"):
                [r async for r in c.search("Patient", {"family": "wrong"})]
            return plain, marked

    plain, marked = anyio.run(run)
    assert plain == ["p1", "p2", "p3"] and marked == [False, False, True, True, False, True]


def test_a_wrong_type_match_fails_clearly_without_patient_data(client: FhirClient) -> None:
    with pytest.raises(ModMedError) as err:
        list(client.search("Patient", {"family": "wrong"}))
    assert str(err.value).startswith("search Patient answered a match of type Observation: a Patient search must "
                                     "return Patient resources (other types only as search.mode 'include')")
    assert SECRET_NAME not in str(err.value) and err.value.status_code == 200


def test_search_to_ndjson_separates_the_included_resources(client: FhirClient, tmp_path: Path) -> None:
    out = tmp_path / "Patient.ndjson"
    result = search_to_ndjson(client, "Patient", out, INCLUDE)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["p1", "p2", "p3"]
    org_file = tmp_path / "Patient.include.Organization.ndjson"
    assert [json.loads(x) for x in org_file.read_text().splitlines()] == [ORG]
    assert result.included == {"Organization": {"path": str(org_file), "count": 1},
                               "Patient": {"path": str(tmp_path / "Patient.include.Patient.ndjson"), "count": 1}}

    dropped = search_to_ndjson(client, "Patient", tmp_path / "d" / "Patient.ndjson", INCLUDE, includes="drop")
    assert dropped.count == 3 and dropped.included_dropped == 3 and dropped.included == {}
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["Patient.ndjson"]


def test_the_change_poll_does_not_count_included_entries(client: FhirClient) -> None:
    reported: list[dict[str, Any]] = []
    query = ChangeQuery.build("Patient", INCLUDE)
    result = poll_changes(client, query, Cursor.since("2024-03-01T00:00:00Z"), on_change=reported.append)
    assert sorted(c.id for c in result.changes) == ["p1", "p2", "p3"]  # not org1, not the included p9
    assert [r["resourceType"] for r in reported] == ["Patient"] * 3
    assert result.scanned == 3 and result.consistent


def test_the_change_poll_fails_on_a_wrong_type_match(client: FhirClient) -> None:
    with pytest.raises(ModMedError, match="match of type Observation") as err:
        poll_changes(client, ChangeQuery.build("Patient", {"family": "wrong"}), Cursor.since("2024-03-01T00:00:00Z"))
    assert SECRET_NAME not in str(err.value)
