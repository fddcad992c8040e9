"""The built wheel, installed into a clean virtualenv with Airflow: registered with Airflow, typed, and
able to run DAGs against the sandbox it ships, without the source tree on the path."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.packaging.venvs import ROOT, check_connection_form, check_registered, install, run_smoke_dag, sandbox

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(1200)]  # a clean install on a busy machine


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(work folder, virtualenv bin) with the wheel and the Airflow of constraints.txt."""
    work = tmp_path_factory.mktemp("wheel")
    return work, install(work, wheel, ROOT / "constraints.txt")


def test_wheel_carries_types_version_and_entry_points(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "airflow_provider_modmed/py.typed" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "apache_airflow_provider" in entry_points and "modmed-sandbox" in entry_points
    assert not any(n.startswith(("tests/", "example_dags/")) for n in names)


def test_installed_wheel_registers_and_runs_a_dag_against_its_sandbox(installed: tuple[Path, Path]) -> None:
    work, venv_bin = installed
    check_registered(venv_bin, work)
    check_connection_form(venv_bin, work)
    with sandbox(venv_bin, work) as creds:
        output = run_smoke_dag(venv_bin, work, creds)
    assert "state=success" in output, output[-2000:]
