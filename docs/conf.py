"""Sphinx configuration: Markdown (MyST) pages, autodoc API reference, a generated capability matrix."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from airflow_provider_modmed import __version__  # noqa: E402
from airflow_provider_modmed.capabilities import DEFAULT, EXPORT_LEVELS  # noqa: E402

project = "airflow-provider-modmed"
author = "airflow-provider-modmed developers"
release = version = __version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "dev"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
html_theme = "furo"
html_title = f"ModMed provider {version}"
html_static_path = ["_static"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False
suppress_warnings = ["myst.xref_missing"]


def _capability_matrix() -> str:
    lines = [
        "| resource | profile row | proprietary | certified |",
        "| --- | --- | --- | --- |",
    ]
    for rt, label, prop, cert in DEFAULT.rows():
        lines.append(f"| `{rt}` | {label or ''} | {prop} | {cert} |")
    lines.append("")
    lines.append(f"Bulk Data `$export` levels ({', '.join(EXPORT_LEVELS)}): certified track only.")
    return "\n".join(lines) + "\n"


def _connection_fields() -> str:
    from airflow_provider_modmed.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR

    lines = ["| field (Extra key) | label in the form | default | secret | description |",
             "| --- | --- | --- | --- | --- |"]
    relabel = UI_FIELD_BEHAVIOUR["relabeling"]
    for std in ("host", "login", "password"):
        lines.append(f"| `{std}` (standard) | {relabel[std]} | | {'yes' if std == 'password' else ''} | "
                     f"{UI_FIELD_BEHAVIOUR['placeholders'][std]} |")
    for name, spec in CONN_FIELDS.items():
        schema = spec["schema"]
        default = schema.get("default", "")
        secret = "yes" if schema.get("format") == "password" else ""
        lines.append(f"| `{name}` | {spec['label']} | {default if default != '' else ''} | {secret} | "
                     f"{spec['description']} |")
    return "\n".join(lines) + "\n"


(Path(__file__).parent / "_generated").mkdir(exist_ok=True)
(Path(__file__).parent / "_generated" / "connection-fields.md").write_text(_connection_fields())
(Path(__file__).parent / "_generated" / "capability-matrix.md").write_text(_capability_matrix())
