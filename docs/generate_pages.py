"""The pages generated from the code: docs/_generated/ (connection fields, the capability matrix).

They are committed, so the docs read in the repository show them; every Sphinx build (``make docs``)
rewrites them, and ``tests/unit/test_generated_docs.py`` fails when the committed files differ from
what the code generates. After changing the connection form or the capability matrix, run
``python docs/generate_pages.py`` and commit the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: where the pages live; the Markdown pages include them with ``{include} _generated/<name>``
GENERATED = Path(__file__).resolve().parent / "_generated"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cell(text: object) -> str:
    """Text as one Markdown table cell: no pipes, no raw HTML, no emphasis from ``*``."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def capability_matrix() -> str:
    """The capability matrix (resource x interaction x track) as a Markdown table."""
    from airflow_provider_modmed.capabilities import DEFAULT, EXPORT_LEVELS

    lines = [
        "| resource | profile row | proprietary | certified |",
        "| --- | --- | --- | --- |",
    ]
    for rt, label, prop, cert in DEFAULT.rows():
        lines.append(f"| `{rt}` | {label or ''} | {prop} | {cert} |")
    lines.append("")
    lines.append(f"Bulk Data `$export` levels ({', '.join(EXPORT_LEVELS)}): certified track only.")
    return "\n".join(lines) + "\n"


def connection_fields() -> str:
    """Every field of the connection form, in the form's order, as a Markdown table."""
    from airflow_provider_modmed.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR

    lines = ["| field (Extra key) | label in the form | default | secret | help text |",
             "| --- | --- | --- | --- | --- |"]
    relabel, placeholders = UI_FIELD_BEHAVIOUR["relabeling"], UI_FIELD_BEHAVIOUR["placeholders"]
    for std in ("host", "login", "password", "port"):
        secret = "yes" if std == "password" else ""
        lines.append(f"| `{std}` (standard) | {_cell(relabel[std])} | | {secret} | {_cell(placeholders[std])} |")
    for name, spec in CONN_FIELDS.items():
        schema = spec["schema"]
        label = spec["label"] + (" (required)" if "null" not in schema["type"] else "")
        secret = "yes" if schema.get("format") == "password" else ""
        lines.append(f"| `{name}` | {_cell(label)} | {_cell(schema.get('default', ''))} | {secret} | "
                     f"{_cell(spec['description'])} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> content of every generated page."""
    return {"connection-fields.md": connection_fields(), "capability-matrix.md": capability_matrix()}


def write(directory: Path = GENERATED) -> list[Path]:
    """Write every generated page into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        print(path.relative_to(ROOT))
