"""Sphinx configuration: Markdown (MyST) pages, autodoc API reference, the pages generated from the code
(docs/generate_pages.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # generate_pages.py beside this file

from generate_pages import write as write_generated_pages  # noqa: E402

from airflow_provider_modmed import __version__  # noqa: E402

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


# docs/_generated/ (connection fields, capability matrix) is committed; each build rewrites it from the code
write_generated_pages()
