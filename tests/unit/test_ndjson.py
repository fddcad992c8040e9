"""The client's search to NDJSON without a network: search parameters, the NDJSON writer, and
search_to_ndjson's window and de-duplication (by id + version) over canned pages; included resources in
their own files or dropped with a count, and a wrong-type match failing (the real search flow)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client import _flows as flows
from airflow_provider_modmed.client._flows import Emit, FhirContext, search_pairs
from airflow_provider_modmed.client.ndjson import NdjsonWriter, search_to_ndjson, write_ndjson
from airflow_provider_modmed.client.window import Window
from airflow_provider_modmed.errors import ConfigurationError, ModMedError


def test_search_pairs() -> None:
    assert search_pairs("?family=a&given=b&given=c") == [("family", "a"), ("given", "b"), ("given", "c")]
    assert search_pairs({"given": ["b", "c"], "x": None}) == [("given", "b"), ("given", "c")]
    assert search_pairs([["a", 1]]) == [("a", "1")]  # type: ignore[list-item]
    assert search_pairs(None) == [] and search_pairs("") == []
    with pytest.raises(ConfigurationError):
        search_pairs(["abc"])  # type: ignore[list-item]


def test_write_ndjson(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    assert write_ndjson(iter([{"a": "é"}, {"b": 2}]), path) == 2
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == [{"a": "é"}, {"b": 2}]
    empty = tmp_path / "sub" / "empty.ndjson"
    assert write_ndjson([], empty) == 0 and empty.read_text() == ""  # written even when empty


def test_the_writer_creates_its_file_with_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "changes.ndjson"
    with NdjsonWriter(path) as out:
        assert not path.exists()
        out.write({"resourceType": "Patient", "id": "1"})
    assert out.count == 1 and path.read_bytes() == b'{"resourceType":"Patient","id":"1"}\n'
    with NdjsonWriter(tmp_path / "never.ndjson"):
        pass
    assert not (tmp_path / "never.ndjson").exists()


class Client:
    """Just enough of FhirClient: a context and a search answering canned rows."""

    def __init__(self, track: Track, rows: list[dict[str, Any]]) -> None:
        self.context = FhirContext(track, "https://x.example/fhir")
        self.rows = rows
        self.asked: list[tuple[str, str]] = []

    def search(self, rt: str, params: list[tuple[str, str]], **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.asked = params
        return iter(self.rows)


def row(rid: str, version: str | None, lu: str | None) -> dict[str, Any]:
    meta = {k: v for k, v in (("versionId", version), ("lastUpdated", lu)) if v is not None}
    return {"resourceType": "Patient", "id": rid, "meta": meta}


def test_rows_are_deduplicated_by_id_and_version(tmp_path: Path) -> None:
    rows = [row("1", "1", "2026-03-10T01:00:00Z"), row("2", "1", "2026-03-10T02:00:00Z"),
            row("1", "1", "2026-03-10T01:00:00Z"),   # page read twice: a duplicate
            row("1", "2", "2026-03-10T03:00:00Z"),   # a newer version of 1: written too
            row("1", "1", "2026-03-10T01:00:00Z"),   # a stale replica of 1: not news
            row("3", None, None), row("3", None, None),   # undated: kept, de-duplicated on its version
            {"resourceType": "Patient"}]                 # no id: kept
    client = Client(Track.PROPRIETARY, rows)
    path = tmp_path / "p.ndjson"
    result = search_to_ndjson(client, "Patient", path, {"family": "F"}, max_ids=2)
    written = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r.get("id"), r.get("meta", {}).get("versionId")) for r in written] == [
        ("1", "1"), ("2", "1"), ("1", "2"), ("3", None), (None, None)]
    assert result.count == 5 and result.duplicates == 3 and result.scanned == 8
    assert result.ids == ["1", "2"] and result.ids_truncated  # each id listed once
    assert client.asked == [("family", "F")] and result.window_mode is None


def test_the_window_is_sent_per_track_and_enforced_exactly(tmp_path: Path) -> None:
    rows = [row("before", "1", "2026-03-09T23:59:59.999Z"), row("in", "1", "2026-03-10T12:00:00.000Z"),
            row("end", "1", "2026-03-11T00:00:00.000Z"), row("undated", "1", None)]
    window = Window.of("2026-03-10", "2026-03-11")
    for track, mode, asked in [
            (Track.PROPRIETARY, "widened", [("_lastUpdated", "gt2026-03-09"), ("_lastUpdated", "le2026-03-10")]),
            (Track.CERTIFIED, "exact", [("_lastUpdated", "ge2026-03-10T00:00:00.000Z"),
                                        ("_lastUpdated", "lt2026-03-11T00:00:00.000Z")])]:
        client = Client(track, rows)
        result = search_to_ndjson(client, "Patient", tmp_path / f"{track}.ndjson", window=window)
        assert client.asked == asked and result.window_mode == mode
        assert result.ids == ["in", "undated"] and result.outside_window == 2 and result.undated == 1
    with pytest.raises(ConfigurationError, match="not both"):
        search_to_ndjson(Client(Track.CERTIFIED, []), "Patient", tmp_path / "x.ndjson",
                         {"_lastUpdated": "gt2026-01-01"}, window=window)


# -- included resources and wrong-type matches (issue 13): the real search flow over canned pages --------

class FlowClient:
    """Just enough of FhirClient to run the real search flow over canned Bundles (no network)."""

    def __init__(self, *pages: dict[str, Any]) -> None:
        self.context = FhirContext(Track.PROPRIETARY, "https://x.example/fhir")
        self.pages = list(pages)
        self.sent: list[httpx.Request] = []

    def search(self, rt: str, params: Any = None, *, count: int | None = None, headers: Any = None,
               includes: bool = False) -> Iterator[dict[str, Any]]:
        flow = flows.search(self.context, rt, params, count, headers, includes=includes)
        out: Any = None
        while True:
            try:
                step = flow.send(out)
            except StopIteration:
                return
            out = None
            if isinstance(step, Emit):
                yield step.value
            else:
                self.sent.append(step)
                out = httpx.Response(200, json=self.pages.pop(0))


def page(entries: list[tuple[dict[str, Any], str | None]], next_page: int | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": f"https://x.example/fhir/Patient?page={next_page}"}] if next_page else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": r, **({"search": {"mode": m}} if m else {})} for r, m in entries]}


ORG = {"resourceType": "Organization", "id": "org1", "meta": {"versionId": "1"}}
PRACTITIONER = {"resourceType": "Practitioner", "id": "dr1"}


def include_pages() -> list[dict[str, Any]]:
    """Two pages of Patients with the same Organization included on both, a Practitioner and a Patient
    included (``_include=Patient:link``)."""
    return [page([(row("1", "1", None), "match"), (ORG, "include"), (row("2", "1", None), None),
                  (PRACTITIONER, "include"), (row("9", "1", None), "include")], next_page=2),
            page([(row("3", "1", None), "match"), (ORG, "include")])]


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_included_resources_go_to_their_own_files_by_default(tmp_path: Path) -> None:
    client = FlowClient(*include_pages())
    out = tmp_path / "run" / "Patient.ndjson"
    result = search_to_ndjson(client, "Patient", out, {"_include": ["Patient:organization", "Patient:link"]})
    assert [r["id"] for r in lines(out)] == ["1", "2", "3"] and result.count == 3 and result.scanned == 3
    assert result.ids == ["1", "2", "3"]
    org_file = tmp_path / "run" / "Patient.include.Organization.ndjson"
    assert lines(org_file) == [ORG]  # included on both pages, written once
    assert lines(tmp_path / "run" / "Patient.include.Patient.ndjson") == [row("9", "1", None)]
    assert result.included == {
        "Organization": {"path": str(org_file), "count": 1},
        "Practitioner": {"path": str(tmp_path / "run" / "Patient.include.Practitioner.ndjson"), "count": 1},
        "Patient": {"path": str(tmp_path / "run" / "Patient.include.Patient.ndjson"), "count": 1}}
    assert result.included_dropped == 0
    assert result.summary()["included"] == {"Organization": 1, "Practitioner": 1, "Patient": 1}
    assert client.sent[0].url.params.get_list("_include") == ["Patient:organization", "Patient:link"]


def test_included_resources_dropped_with_a_count(tmp_path: Path) -> None:
    out = tmp_path / "Patient.ndjson"
    result = search_to_ndjson(FlowClient(*include_pages()), "Patient", out, includes="drop")
    assert [r["id"] for r in lines(out)] == ["1", "2", "3"]
    assert result.included_dropped == 4 and result.included == {}  # every include received, repeats too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Patient.ndjson"]  # today's single file


def test_a_search_without_includes_writes_one_file(tmp_path: Path) -> None:
    result = search_to_ndjson(FlowClient(page([(row("1", "1", None), "match")])), "Patient",
                              tmp_path / "Patient.ndjson")
    assert result.count == 1 and result.included == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Patient.ndjson"]


def test_a_wrong_type_match_fails_and_never_reaches_the_file(tmp_path: Path) -> None:
    obs = {"resourceType": "Observation", "id": "o1", "subject": {"display": "Zebulon Quixote"}}
    out = tmp_path / "Patient.ndjson"
    with pytest.raises(ModMedError) as err:
        search_to_ndjson(FlowClient(page([(row("1", "1", None), "match"), (obs, None)])), "Patient", out)
    assert "Observation" in str(err.value) and "Patient search" in str(err.value)
    assert "Zebulon" not in str(err.value)
    assert out.read_text() == ""  # the page failed before any of it was passed on: not even Patient 1


def test_includes_argument_is_checked_before_any_request(tmp_path: Path) -> None:
    client = FlowClient()
    with pytest.raises(ConfigurationError, match="includes must be one of 'separate', 'drop'"):
        search_to_ndjson(client, "Patient", tmp_path / "x.ndjson", includes="merge")

    class NoSiblings:  # openable, but no file name to put included files beside
        def open(self, mode: str = "r") -> Any:
            raise AssertionError("not opened")

    with pytest.raises(ConfigurationError, match="includes='drop'"):
        search_to_ndjson(client, "Patient", NoSiblings())
    assert client.sent == []
