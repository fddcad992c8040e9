"""Issue 15, item 10: the wheel on the oldest Airflow the package claims (pyproject's apache-airflow floor),
in a clean virtualenv: Airflow registers the provider and its connection form, and a DAG runs against the
sandbox. constraints-airflow-<floor>.txt pins that Airflow and a set of libraries it works with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.packaging.venvs import (
    ROOT,
    airflow_version,
    check_connection_form,
    check_registered,
    install,
    run_smoke_dag,
    sandbox,
)

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(1200)]  # a clean install on a busy machine


def claimed_floor() -> str:
    """The X.Y of ``apache-airflow>=X.Y`` in pyproject.toml."""
    found = re.search(r'"apache-airflow\s*>=\s*([0-9.]+)', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml declares no apache-airflow>= floor"
    return found.group(1)


def floor_constraints() -> Path:
    return Path(__file__).with_name(f"constraints-airflow-{claimed_floor()}.txt")


def test_the_constraints_pin_the_oldest_claimed_airflow() -> None:
    """Raising or lowering the floor in pyproject.toml needs constraints for that Airflow (the oldest
    release of it: >=3.2 claims 3.2.0)."""
    path = floor_constraints()
    assert path.exists(), f"{path.name}: constraints for apache-airflow>={claimed_floor()} are missing"
    pins = dict(line.split("==", 1) for line in path.read_text().splitlines() if "==" in line
                and not line.startswith("#"))
    floor = claimed_floor()
    assert pins["apache-airflow"] == (floor if floor.count(".") == 2 else f"{floor}.0")


@pytest.fixture(scope="module")
def oldest(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("oldest-airflow")
    return work, install(work, wheel, floor_constraints())


def test_the_wheel_works_on_the_oldest_claimed_airflow(oldest: tuple[Path, Path]) -> None:
    work, venv_bin = oldest
    floor = claimed_floor()
    assert airflow_version(venv_bin, work).startswith(f"{floor}."), "not the oldest claimed Airflow"
    check_registered(venv_bin, work)
    check_connection_form(venv_bin, work)
    with sandbox(venv_bin, work) as creds:
        output = run_smoke_dag(venv_bin, work, creds)
    assert "state=success" in output, output[-2000:]
