"""Shared operator helpers: masking of rendered values, JSON arguments, the _lastUpdated window and the
NDJSON writer (Airflow-free, used by the search operator)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.capabilities import DEFAULT, Track
from airflow_provider_modmed.client.ndjson import LastUpdatedWindow, parse_instant, search_pairs, write_ndjson
from airflow_provider_modmed.errors import ConfigurationError
from airflow_provider_modmed.operators._common import MASK, masked_shape, parse_json_arg, storage_dataset


@pytest.mark.parametrize(("value", "expected"), [
    ({"resourceType": "Patient", "id": "7", "name": [{"family": "X", "use": "official"}], "active": True},
     {"resourceType": "Patient", "id": "7", "name": [{"family": MASK, "use": "official"}], "active": True}),
    ([("family", "X"), ("_count", "5")], [["family", MASK], ["_count", "5"]]),
    ("family=X&_sort=-_lastUpdated", f"family={MASK}&_sort=-_lastUpdated"),
    ('{"resourceType": "Patient", "birthDate": "1970-01-01"}', {"resourceType": "Patient", "birthDate": MASK}),
    ("{broken json with Name", MASK),
    ("plain text with a name", MASK),
    ("x=1&{weird key}=2", f"x={MASK}&{MASK}={MASK}"),
    (None, None),
    (12345, MASK),
])
def test_masked_shape(value: Any, expected: Any) -> None:
    assert masked_shape(value, show_underscore_keys=True) == expected


def test_parse_json_arg() -> None:
    assert parse_json_arg('{"a": 1}', "x") == {"a": 1}
    assert parse_json_arg("identifier=a|b", "x") == "identifier=a|b"
    assert parse_json_arg({"a": 1}, "x") == {"a": 1}
    with pytest.raises(ConfigurationError, match=r"x is not valid JSON \(line 1 column 9\)") as info:
        parse_json_arg('{"name":Qwertyphi}', "x")
    assert "Qwertyphi" not in str(info.value)


def test_storage_dataset() -> None:
    assert storage_dataset("/tmp/a.ndjson") == ("file", "/tmp/a.ndjson")
    assert storage_dataset("file:///tmp/a.ndjson") == ("file", "/tmp/a.ndjson")
    assert storage_dataset("s3://conn@bucket/k/a.ndjson") == ("s3://bucket", "k/a.ndjson")
    assert storage_dataset("gs://bucket/a.ndjson") == ("gs://bucket", "a.ndjson")


def test_search_pairs() -> None:
    assert search_pairs("?family=a&given=b&given=c") == [("family", "a"), ("given", "b"), ("given", "c")]
    assert search_pairs({"given": ["b", "c"], "x": None}) == [("given", "b"), ("given", "c")]
    assert search_pairs([["a", 1]]) == [("a", "1")]
    assert search_pairs(None) == [] and search_pairs("") == []
    with pytest.raises(ConfigurationError):
        search_pairs(["abc"])  # type: ignore[list-item]


def test_parse_instant() -> None:
    utc = timezone.utc
    assert parse_instant("2026-03-10T06:00:00.25Z") == datetime(2026, 3, 10, 6, 0, 0, 250000, tzinfo=utc)
    assert parse_instant("2026-03-10T08:00:00+02:00") == datetime(2026, 3, 10, 6, tzinfo=utc)
    assert parse_instant("2026-03-10") == datetime(2026, 3, 10, tzinfo=utc)
    assert parse_instant(datetime(2026, 3, 10)) == datetime(2026, 3, 10, tzinfo=utc)
    with pytest.raises(ConfigurationError):
        parse_instant("soon")


def test_window_bounds_are_half_open() -> None:
    w = LastUpdatedWindow("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z")

    def at(text: str) -> dict[str, Any]:
        return {"meta": {"lastUpdated": text}}

    assert w.contains(at("2026-03-10T00:00:00.000Z")) is True
    assert w.contains(at("2026-03-10T23:59:59.999Z")) is True
    assert w.contains(at("2026-03-11T00:00:00.000Z")) is False
    assert w.contains(at("2026-03-09T23:59:59.999Z")) is False
    assert w.contains(at("2026-03-11T01:00:00+02:00")) is True  # 23:00Z on the 10th
    assert w.contains({"id": "1"}) is None


def test_open_windows() -> None:
    assert LastUpdatedWindow.of(None, "") is None
    since = LastUpdatedWindow.of("2026-03-10T12:00:00Z")
    assert since is not None
    assert since.search_params(Track.PROPRIETARY, DEFAULT, "Patient") == [("_lastUpdated", "gt2026-03-09")]
    assert since.search_params(Track.CERTIFIED, DEFAULT, "Patient") == [("_lastUpdated", "ge2026-03-10T12:00:00.000Z")]
    until = LastUpdatedWindow.of(None, "2026-03-10T00:00:00.000500Z")
    assert until is not None  # the exclusive end rounds up to the next millisecond; the filter is exact
    assert until.search_params(Track.CERTIFIED, DEFAULT, "Patient") == [("_lastUpdated", "lt2026-03-10T00:00:00.001Z")]
    assert until.search_params(Track.PROPRIETARY, DEFAULT, "Patient") == [("_lastUpdated", "le2026-03-10")]


def test_write_ndjson(tmp_path: Path) -> None:
    path = tmp_path / "out.ndjson"
    assert write_ndjson(iter([{"a": "é"}, {"b": 2}]), path) == 2
    assert [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] == [{"a": "é"}, {"b": 2}]
