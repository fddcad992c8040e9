"""The client's search to NDJSON without a network: search parameters, the NDJSON writer, and
search_to_ndjson's window and de-duplication (by id + version) over canned pages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client._flows import FhirContext, search_pairs
from airflow_provider_modmed.client.ndjson import NdjsonWriter, search_to_ndjson, write_ndjson
from airflow_provider_modmed.client.window import Window
from airflow_provider_modmed.errors import ConfigurationError


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
