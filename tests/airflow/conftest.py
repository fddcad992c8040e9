"""Airflow fixtures: a migrated SQLite metadata DB, the sandbox's connections, and running DAGs for real."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.sandbox.certified_ids import served_id
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


@contextlib.contextmanager
def connections_env(conns: dict[str, dict[str, Any]]) -> Iterator[dict[str, dict[str, Any]]]:
    """Set connections (Airflow's JSON form) as AIRFLOW_CONN_* variables, restoring the old ones after."""
    saved = {f"AIRFLOW_CONN_{c.upper()}": os.environ.get(f"AIRFLOW_CONN_{c.upper()}") for c in conns}
    for conn_id, conn in conns.items():
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    try:
        yield conns
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sandbox_connections(sandbox: SandboxServer) -> contextlib.AbstractContextManager[dict[str, dict[str, Any]]]:
    """A sandbox's ready-made connections as AIRFLOW_CONN_* variables (see :func:`connections_env`)."""
    return connections_env(sandbox.credentials["airflow_connections"])


def served(conn_id: str, stored_id: str) -> str:
    """The id under which a ready-made connection's track serves a stored record (the sandbox's ground truth
    holds the proprietary ids; the certified track has ids of its own)."""
    return served_id("certified" if conn_id.startswith("modmed_certified") else "proprietary", stored_id)


@pytest.fixture(scope="session")
def modmed_connections(sandbox: SandboxServer) -> Iterator[dict[str, dict[str, Any]]]:
    """The session sandbox's connections, as AIRFLOW_CONN_* variables (Airflow's JSON form)."""
    with sandbox_connections(sandbox) as conns:
        yield conns


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
