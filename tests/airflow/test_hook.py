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


def test_the_hook_registers_the_storage_password_with_the_masker(modmed_connections: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13, item 9: a Redis password, in the URI or in its secret field, is masked in task logs."""
    from airflow.sdk.log import mask_logs

    good = modmed_connections["modmed_default"]
    in_uri, in_field = "storage-pw-in-uri-4411", "storage@pw/field-4412"
    cases = {"modmed_pw_uri": {"rate_limit_storage_uri": f"redis://:{in_uri}@127.0.0.1:6379/0"},
             "modmed_pw_field": {"rate_limit_storage_uri": "redis://127.0.0.1:6379/0",
                                 "rate_limit_storage_password": in_field}}
    for conn_id, extra in cases.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({**good, "extra": {**good["extra"], **extra}}))
        uri = ModMedHook(conn_id).config.rate_limit_storage_uri
        line = mask_logs(None, "info", {"event": f"storage {uri}; config {ModMedHook(conn_id).config!r}"})["event"]
        assert "storage redis://:***@127.0.0.1:6379/0" in line, line
        assert in_uri not in line and "4412" not in line


def test_the_storage_password_field_is_sensitive_for_airflow(airflow_db: str) -> None:
    """The form marks it secret, and the REST API answers '***' for it (Airflow masks the name)."""
    from airflow.api_fastapi.core_api.datamodels.connections import ConnectionResponse
    from airflow.providers_manager import ProvidersManager

    widget = ProvidersManager().connection_form_widgets["extra__modmed__rate_limit_storage_password"]
    assert widget.is_sensitive
    extra = {"rate_limit_storage_uri": "redis://redis.example:6379/0", "rate_limit_storage_password": "rest-pw-4413"}
    shown = ConnectionResponse(conn_id="c", conn_type="modmed", description=None, host=None, login=None, schema=None,
                               port=None, password=None, extra=json.dumps(extra), team_name=None)
    assert json.loads(shown.extra or "{}") == {**extra, "rate_limit_storage_password": "***"}


# -- issue 15, item 6: Test-connection messages say what happened ------------------------------------------------


@pytest.mark.parametrize("conn_id", ["modmed_default", "modmed_proprietary_cc", "modmed_certified",
                                     "modmed_certified_secret"])
def test_an_unknown_firm_prefix_is_named_not_the_credentials(sb: SandboxServer, modmed_connections: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch, conn_id: str) -> None:
    """The sandbox answers 404 at the grant URL (and every other URL) of a firm it does not know."""
    good = modmed_connections[conn_id]
    extra = {**good["extra"], "firm_url_prefix": "nosuchfirm"}
    host = good["host"].replace(f"/{good['extra']['firm_url_prefix']}/", "/{firm}/")  # certified: the FHIR base
    ok, message = _with_env(monkeypatch, {**good, "host": host, "extra": extra}).test_connection()
    assert not ok
    assert "404" in message and "firm_url_prefix ('Firm URL prefix') 'nosuchfirm'" in message, message
    assert "Authentication failed" not in message and "credentials" not in message, message


def test_a_wrong_token_url_is_named_not_the_firm(sb: SandboxServer, modmed_connections: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    good = modmed_connections["modmed_proprietary_cc"]
    extra = {**good["extra"], "token_url": good["extra"]["token_url"].replace("/ema-fhir/", "/no-such-realm/")}
    ok, message = _with_env(monkeypatch, {**good, "extra": extra}).test_connection()
    assert not ok and "token_url ('Token URL')" in message and "firm_url_prefix" not in message, message


def test_an_unreachable_redis_names_the_storage_field_and_calls_nothing(
        sb: SandboxServer, modmed_connections: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    good = modmed_connections["modmed_default"]
    extra = {**good["extra"], "rate_limit_storage_uri": f"redis://127.0.0.1:{port}/0",
             "rate_limit_storage_password": "redis-pw-5521"}
    before = sb.app_state.stats["requests"]
    ok, message = _with_env(monkeypatch, {**good, "extra": extra}).test_connection()
    assert not ok
    assert "rate_limit_storage_uri ('Rate-limit storage URI')" in message, message
    assert not message.startswith("Could not reach ModMed"), message
    assert "redis-pw-5521" not in message and str(port) not in message  # the URI shows as its scheme only
    assert sb.app_state.stats["requests"] == before  # the budget is taken before the token call


def test_a_firm_prefix_with_a_space_fails_before_any_call(sb: SandboxServer, modmed_connections: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good = modmed_connections["modmed_default"]
    before = sb.app_state.stats["requests"]
    ok, message = _with_env(monkeypatch, {**good, "extra": {**good["extra"], "firm_url_prefix": "my practice"}}
                            ).test_connection()
    assert not ok and message.startswith("Connection is misconfigured") and "'my practice'" in message, message
    assert sb.app_state.stats["requests"] == before


# -- issue 15, item 4: the list row's Test and the Port field (Airflow 3.3.2) -------------------------------------


def _row_test(conn_id: str, stored: dict[str, Any]) -> Any:
    """Call Airflow's POST /connections/test route with the body the list row's Test button builds from the
    stored connection (ui/src: ``port: Number(connection.port)``, the masked password ``***``)."""
    from airflow.api_fastapi.core_api.datamodels.connections import ConnectionBody
    from airflow.api_fastapi.core_api.routes.public.connections import test_connection as test_route

    class Admin:
        def is_authorized_connection(self, **_: Any) -> bool:
            return True

    port = stored.get("port")
    body = ConnectionBody.model_validate({
        "connection_id": conn_id, "conn_type": "modmed", "description": "", "host": stored.get("host") or "",
        "login": stored.get("login") or "", "password": "***" if stored.get("password") else "",
        "port": int(port) if port else 0, "schema": "", "extra": json.dumps(stored["extra"])})
    return test_route(body, user=None, auth_manager=Admin())  # type: ignore[arg-type]


def _store(conn_id: str, conn: dict[str, Any] | None) -> None:
    """Save a connection in the metadata database (replacing one of that id), as the UI's form does;
    ``None`` only deletes it."""
    from airflow.models import Connection
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(Connection).filter(Connection.conn_id == conn_id).delete()
        if conn is not None:
            session.add(Connection(conn_id=conn_id, conn_type="modmed", host=conn.get("host"),
                                   login=conn.get("login"), password=conn.get("password"), port=conn.get("port"),
                                   extra=json.dumps(conn["extra"])))


def test_the_list_rows_test_works_once_port_repeats_the_urls_port(sb: SandboxServer, airflow_db: str,
                                                                  modmed_connections: dict[str, Any]) -> None:
    """An empty Port goes out as 0 against the stored null: Airflow answers 400 before the hook runs. A Port
    equal to the port written in the Custom base URL is accepted by the hook, and the row's Test then works."""
    from fastapi import HTTPException

    good = modmed_connections["modmed_default"]
    url_port = int(sb.api_url.rsplit(":", 1)[1])
    try:
        _store("modmed_row", good)
        with pytest.raises(HTTPException) as refused:
            _row_test("modmed_row", good)
        assert refused.value.status_code == 400 and "differs from the stored connection" in str(refused.value.detail)
        _store("modmed_row", {**good, "port": url_port})
        answer = _row_test("modmed_row", {**good, "port": url_port})
        assert answer.status, answer.message
    finally:
        _store("modmed_row", None)
