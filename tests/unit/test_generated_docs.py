"""docs/_generated/ is committed (the docs read in the repository show it) and must match the code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DOCS = Path(__file__).resolve().parents[2] / "docs"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_pages", DOCS / "generate_pages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate_pages", module)
    spec.loader.exec_module(module)
    return module


def test_the_committed_pages_match_what_the_code_generates(tmp_path: Path) -> None:
    written = generator().write(tmp_path)
    assert {p.name for p in written} == {"connection-fields.md", "capability-matrix.md"}
    committed = DOCS / "_generated"
    for fresh in written:
        assert (committed / fresh.name).is_file(), f"docs/_generated/{fresh.name} is not committed"
        assert (committed / fresh.name).read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8"), (
            f"docs/_generated/{fresh.name} is stale: run `python docs/generate_pages.py` and commit it")
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in written)


def test_every_generated_page_is_included_and_not_ignored() -> None:
    for name in ("connection-fields.md", "capability-matrix.md"):
        assert sum(f"_generated/{name}" in page.read_text(encoding="utf-8") for page in DOCS.glob("*.md")) == 1
    ignored = (DOCS.parent / ".gitignore").read_text(encoding="utf-8").split()
    assert not any(line.rstrip("/") in ("docs/_generated", "_generated") for line in ignored)


def test_the_fields_page_lists_every_form_field_in_the_forms_order() -> None:
    from airflow_provider_modmed.connection_form import CONN_FIELDS

    page = generator().connection_fields()
    rows = [line.split("|")[1].strip() for line in page.splitlines()[2:]]
    assert rows == ["`host` (standard)", "`login` (standard)", "`password` (standard)", "`port` (standard)",
                    *(f"`{name}`" for name in CONN_FIELDS)]
    assert "Firm URL prefix (required)" in page
