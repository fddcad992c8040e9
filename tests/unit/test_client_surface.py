"""The Airflow-free client's public surface: every exported name exists, and importing the whole client
package (every module of it) loads nothing from Airflow."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import airflow_provider_modmed.client as client


def test_every_exported_name_exists() -> None:
    missing = [name for name in client.__all__ if not hasattr(client, name)]
    assert missing == []
    assert {"FhirClient", "AsyncFhirClient", "drive", "adrive", "PatchResult", "Included"} <= set(client.__all__)


def test_client_modules_import_nothing_from_airflow() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(client.__path__, client.__name__ + "."))
    assert "airflow_provider_modmed.client.bulk.flows" in modules and len(modules) > 15
    for name in modules:  # each imports on its own
        importlib.import_module(name)
    script = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
              "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
