"""ModMedDocumentUploadOperator without a network: the file (local path, file:// URL or ObjectStoragePath),
its checks before any call, what is pushed, and lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_modmed.capabilities import Track
from airflow_provider_modmed.client.documents import UploadResult
from airflow_provider_modmed.operators import documents as documents_mod
from airflow_provider_modmed.operators.documents import ModMedDocumentUploadOperator
from tests.unit.test_operators_resources import FakeHook, fake_openlineage, pairs  # noqa: F401


class FakeTI:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    path = tmp_path / "Lab Report.PDF"
    path.write_bytes(b"%PDF-1.4 lab")
    return path


def wire(op: ModMedDocumentUploadOperator, monkeypatch: pytest.MonkeyPatch,
         track: Track = Track.PROPRIETARY) -> list[dict[str, Any]]:
    op.__dict__["hook"] = FakeHook(track, object())  # upload_document is replaced: no client calls
    calls: list[dict[str, Any]] = []

    def fake_upload(c: Any, content: bytes, **kwargs: Any) -> UploadResult:
        calls.append({"content": content, **kwargs})
        return UploadResult(id="88", version_id="1", created=True, url_attempts=1, size=len(content),
                            content_type=kwargs["content_type"], category_code="LAB", idempotency_key="k")

    monkeypatch.setattr(documents_mod, "upload_document", fake_upload)
    return calls


@pytest.mark.parametrize("as_", ["str", "file_url", "object_storage", "pathlike"])
def test_the_file_is_read_from_any_kind_of_path(pdf: Path, monkeypatch: pytest.MonkeyPatch, as_: str) -> None:
    file_path: Any = {"str": str(pdf), "file_url": f"file://{pdf}", "object_storage": ObjectStoragePath(f"file://{pdf}"),
                      "pathlike": pdf}[as_]
    op = ModMedDocumentUploadOperator(task_id="u", file_path=file_path, category="LAB", patient_id=7)
    calls = wire(op, monkeypatch)
    ti = FakeTI()
    out = op.execute({"ti": ti})  # type: ignore[arg-type]
    (call,) = calls
    assert call["content"] == b"%PDF-1.4 lab" and call["filename"] == "Lab Report.PDF"
    assert call["content_type"] == "application/pdf" and call["patient_id"] == "7"
    assert ti.pushed == {"document_reference_id": "88"}
    assert out["id"] == "88" and out["resource_type"] == "DocumentReference"


def test_explicit_name_and_type_win(pdf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    op = ModMedDocumentUploadOperator(task_id="u", file_path=str(pdf), category={"code": "LAB"},
                                      filename="report.txt", content_type="application/x-custom",
                                      idempotency_key="run-1", deduplicate=False)
    calls = wire(op, monkeypatch)
    op.execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert calls[0]["filename"] == "report.txt" and calls[0]["content_type"] == "application/x-custom"
    assert calls[0]["idempotency_key"] == "run-1" and calls[0]["deduplicate"] is False


@pytest.mark.parametrize(("kwargs", "track", "needle"), [
    ({"file_path": "/nope/scan.pdf"}, Track.PROPRIETARY, "file_path '/nope/scan.pdf' does not exist"),
    ({"file_path": ""}, Track.PROPRIETARY, "file_path is required"),
    ({"category": ""}, Track.PROPRIETARY, "category is required"),
    ({"patient_id": "a b"}, Track.PROPRIETARY, "patient_id 'a b' is not a valid FHIR id"),
    ({"max_bytes": 3}, Track.PROPRIETARY, "more than max_bytes=3"),
    ({}, Track.CERTIFIED, "create on Binary on the certified track: use a connection with track='proprietary'"),
])
def test_bad_input_fails_before_any_call(pdf: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any],
                                         track: Track, needle: str) -> None:
    op = ModMedDocumentUploadOperator(**{"task_id": "u", "file_path": str(pdf), "category": "LAB", **kwargs})
    calls = wire(op, monkeypatch, track)
    with pytest.raises(AirflowFailException, match=needle):
        op.execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert calls == []


def test_a_folder_is_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    op = ModMedDocumentUploadOperator(task_id="u", file_path=str(tmp_path), category="LAB")
    wire(op, monkeypatch)
    with pytest.raises(AirflowFailException, match="is not a file"):
        op.execute({"ti": FakeTI()})  # type: ignore[arg-type]


def test_the_description_stays_out_of_rendered_templates(pdf: Path) -> None:
    op = ModMedDocumentUploadOperator(task_id="u", file_path=str(pdf), category="LAB",
                                      description="Scan for {{ params.name }}")
    op.render_template_fields({"params": {"name": "Wanda Phi"}})
    assert op.description == "***" and op.phi_value("description") == "Scan for Wanda Phi"


def test_lineage(pdf: Path, fake_openlineage: None) -> None:  # noqa: F811
    op = ModMedDocumentUploadOperator(task_id="u", file_path=f"s3://bucket/in/{pdf.name}", category="LAB")
    op.__dict__["hook"] = FakeHook(Track.PROPRIETARY, object())
    lineage = op.get_openlineage_facets_on_complete(None)
    assert pairs(lineage.inputs) == [("s3://bucket", f"in/{pdf.name}")]
    assert pairs(lineage.outputs) == [("modmed://stage.ema-api.com/apiportal", "DocumentReference")]
