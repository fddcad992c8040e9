"""ModMedHook end to end: connections from env JSON and from `airflow connections add`, the Test button's
method, the async client, and a real DAG run."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.hooks.modmed import ModMedHook
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import airflow_cli

pytestmark = [pytest.mark.airflow, pytest.mark.integration]


def live(store: Any, rt: str) -> int:
    return sum(1 for r in store.ground_truth(rt) if not r["deleted"])


@pytest.mark.parametrize("conn_id", ["modmed_default", "modmed_proprietary_cc", "modmed_certified",
                                     "modmed_certified_es384", "modmed_certified_secret"])
def test_every_auth_method_connects_and_searches(sb: SandboxServer, modmed_connections: dict[str, Any],
                                                 conn_id: str) -> None:
    hook = ModMedHook(conn_id)
    ok, message = hook.test_connection()
    assert ok, message
    assert "authenticated" in message
    assert sum(1 for _ in hook.search("Patient")) == live(sb.app_state.store, "Patient")
    hook.close()


def _with_env(monkeypatch: pytest.MonkeyPatch, conn: dict[str, Any]) -> ModMedHook:
    monkeypatch.setenv("AIRFLOW_CONN_MODMED_BROKEN", json.dumps(conn))
    return ModMedHook("modmed_broken")


def test_connection_failures_say_what_failed(sb: SandboxServer, modmed_connections: dict[str, Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    good = modmed_connections["modmed_default"]
    cases = {
        "API key": {**good, "extra": {**good["extra"], "api_key": "sbx-apikey-wrong-wrong-wrong"}},
        "Authentication failed": {**good, "password": "wrong-password"},
        "Could not reach": {**good, "host": "http://127.0.0.1:9/ema-dev/firm"},
        "firm_url_prefix": {**good, "extra": {**good["extra"], "firm_url_prefix": None}},
    }
    for needle, conn in cases.items():
        ok, message = _with_env(monkeypatch, conn).test_connection()
        assert not ok and needle in message, (needle, message)
        assert "sbx-apikey-wrong" not in message and "wrong-password" not in message
    cert = modmed_connections["modmed_certified_secret"]
    ok, message = _with_env(monkeypatch, {**cert, "extra": {**cert["extra"], "scope": "system/*.write"}}
                            ).test_connection()
    assert not ok and "invalid_scope" in message


def test_cli_added_connection_tests_green(sb: SandboxServer, airflow_db: str,
                                          modmed_connections: dict[str, Any]) -> None:
    conn = modmed_connections["modmed_default"]
    airflow_cli("connections", "delete", "modmed_cli", check=False)
    airflow_cli("connections", "add", "modmed_cli", "--conn-json", json.dumps(conn))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    result = airflow_cli("connections", "test", "modmed_cli", env=env, check=False)
    # the secrets the CLI prints must be masked or absent
    assert conn["extra"]["api_key"] not in result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Connection success!" in result.stdout
    hook_result = airflow_cli("connections", "get", "modmed_cli", "-o", "json")
    assert json.loads(hook_result.stdout)[0]["conn_type"] == "modmed"


def test_async_client_for_triggers(sb: SandboxServer, modmed_connections: dict[str, Any]) -> None:
    async def count() -> int:
        client = await ModMedHook("modmed_certified").get_async_client()
        async with client:
            return len([r async for r in client.search("Immunization")])

    assert asyncio.run(count()) == live(sb.app_state.store, "Immunization")


def test_hook_inside_a_real_dag_run(sb: SandboxServer, run_dag: Any) -> None:
    run = run_dag(Path(__file__).parent / "dags" / "hook_dag.py", "modmed_hook_smoke")
    assert run.state == "success"
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = {ti.task_id: ti for ti in session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id)}
        assert {t: ti.state for t, ti in tis.items()} == {"proprietary_patients": "success",
                                                          "certified_immunizations": "success"}
        counts = {t: ti.xcom_pull(task_ids=t, session=session) for t, ti in tis.items()}
    assert counts == {"proprietary_patients": live(sb.app_state.store, "Patient"),
                      "certified_immunizations": live(sb.app_state.store, "Immunization")}
