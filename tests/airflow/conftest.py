"""Airflow fixtures: a migrated SQLite metadata DB, the sandbox's connections, and running DAGs for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.server import SandboxServer

AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


def airflow_cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the `airflow` command of this virtualenv with the test environment."""
    return subprocess.run([AIRFLOW_BIN, *args], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """`airflow db migrate` once per session, on SQLite under the test AIRFLOW_HOME."""
    airflow_cli("db", "migrate")
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(scope="session")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    """The sandbox's ready-made connections, as AIRFLOW_CONN_* variables (Airflow's JSON form)."""
    conns: dict[str, dict[str, Any]] = sandbox.credentials["airflow_connections"]
    names = [f"AIRFLOW_CONN_{conn_id.upper()}" for conn_id in conns]
    for name, conn in zip(names, conns.values(), strict=True):
        os.environ[name] = json.dumps(conn)
    yield conns
    for name in names:
        os.environ.pop(name, None)


def load_dag(path: Path, dag_id: str) -> Any:
    """Parse a DAG file as Airflow does (DagBag) and return the DAG with that id."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path), safe_mode=False)
    if bag.import_errors:
        raise AssertionError(f"import errors in {path}: {bag.import_errors}")
    dag = bag.dags.get(dag_id)
    if dag is None:
        raise LookupError(f"no DAG {dag_id!r} in {path}; found {sorted(bag.dags)}")
    return dag


@pytest.fixture
def run_dag(airflow_db: str, modmed_connections: dict[str, Any],
            monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run a DAG file for real with ``dag.test()`` (SQLite, in-process); returns the DagRun."""

    def run(path: Path, dag_id: str, **test_kwargs: Any) -> Any:
        dag = load_dag(path, dag_id)
        return dag.test(**test_kwargs)

    return run
