"""A Redis password for the shared rate budget (``redis://:secret@host/0`` in ``rate_limit_storage_uri``, or
the secret field ``rate_limit_storage_password``) never reaches the task log, any file Airflow writes, XCom,
or an exception message (issue 13, item 9). The DAG's tasks print their configuration on purpose; a run
with a wrong Redis password fails naming the storage's scheme only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from airflow.sdk.log import mask_logs

from airflow_provider_modmed.client import FhirClient
from airflow_provider_modmed.errors import ModMedError
from airflow_provider_modmed.hooks.modmed import ModMedHook
from airflow_provider_modmed.sandbox.server import SandboxServer
from tests.airflow.conftest import connections_env, load_dag
from tests.conftest import start_redis
from tests.reliability._figures import Figures
from tests.security.conftest import MARKER, RUN
from tests.security.test_no_leaks import _files, _stored, leaks

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

DAG = Path(__file__).parent / "dags" / "storage_password_dag.py"
#: two Redis passwords, one for each way of giving it; the second has characters a URI must quote
IN_URI = f"{MARKER}-redisuri-{RUN}"
IN_FIELD = f"{MARKER}-redis@field/{RUN}"
WRONG = f"{MARKER}-rediswrong-{RUN}"


@pytest.fixture(scope="module")
def redis_conns(seeded: SandboxServer, modmed_connections: dict[str, Any],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Connections to the seeded sandbox whose rate budget lives in a Redis requiring a password: one with the
    password inside the URI, one with it in the secret field, one with a wrong password in the field."""
    proc_uri, port_uri = start_redis(tmp_path_factory.mktemp("redis-uri"), IN_URI)
    proc_field, port_field = start_redis(tmp_path_factory.mktemp("redis-field"), IN_FIELD)
    base = modmed_connections["modmed_default"]

    def conn(**extra: Any) -> dict[str, Any]:
        return {**base, "extra": {**base["extra"], **extra}}

    conns = {
        "modmed_redis_in_uri": conn(rate_limit_storage_uri=f"redis://:{IN_URI}@127.0.0.1:{port_uri}/0"),
        "modmed_redis_field": conn(rate_limit_storage_uri=f"redis://127.0.0.1:{port_field}/0",
                                   rate_limit_storage_password=IN_FIELD),
        "modmed_redis_wrong": conn(rate_limit_storage_uri=f"redis://127.0.0.1:{port_field}/0",
                                   rate_limit_storage_password=WRONG),
    }
    try:
        with connections_env(conns):
            yield conns
    finally:
        for proc in (proc_uri, proc_field):
            proc.terminate()
            proc.wait(10)


def test_a_redis_password_never_reaches_logs_files_xcom_or_exceptions(
        redis_conns: dict[str, Any], airflow_db: str, capfd: Any, caplog: Any, figures: Figures) -> None:
    import logging

    started = time.time()
    caplog.set_level(logging.INFO)  # the levels a production deployment logs at (docs/reliability.md)
    capfd.readouterr()
    run = load_dag(DAG, "modmed_storage_password").test()
    captured = capfd.readouterr()
    # pytest's caplog handler sees the records before Airflow's masking; a task log holds them as Airflow's
    # masking processor leaves them (the processor of every task log line, in a deployed task too)
    task_log = mask_logs(None, "info", {"event": caplog.text})["event"]
    output = captured.out + captured.err
    states = _task_states(run)
    # the password reached Redis both ways (the budget was taken), and a wrong one failed the task
    assert states == {"password_in_uri": "success", "password_field": "success", "wrong_password": "failed"}
    assert "rate-limit storage: redis://:***@127.0.0.1:" in task_log  # the tasks logged their configuration
    # ClientConfig's repr leaves the storage URI out altogether (a plain Python program has no masker)
    config_lines = [line for line in task_log.splitlines() if "modmed config ClientConfig(" in line]
    assert len(config_lines) == 3 and not any("rate_limit_storage_uri" in line for line in config_lines)
    assert "rate-limit storage redis:// is unreachable" in output  # the failure names the scheme only

    messages: list[str] = []
    for conn_id in redis_conns:
        try:
            with FhirClient(ModMedHook(conn_id).config) as client:
                client.read("Patient", "1")
        except ModMedError as exc:
            messages += [str(exc), repr(exc), repr(exc.args)]
    assert any("unreachable" in m for m in messages)  # the wrong password failed here too

    secrets = {"password in the URI": IN_URI, "password in the field": IN_FIELD,
               "password in the field, URL-quoted": quote(IN_FIELD, safe=""), "wrong password": WRONG}
    assert leaks(secrets, {"planted": f"redis://:{IN_URI}@h"}, marker=False) == {"planted": ["password in the URI"]}
    haystacks: dict[str, str | bytes] = {"Airflow's output": output, "task log": task_log, **_stored([run]),
                                         "exception messages": "\n".join(messages)}
    files = _files(Path(os.environ["AIRFLOW_HOME"]), since=started - 1)
    assert leaks(secrets, haystacks) == {}
    assert leaks(secrets, dict(files)) == {}
    figures.record(redis_passwords=len(secrets), files=len(files),
                   bytes_scanned=sum(len(v) for v in haystacks.values()) + sum(len(v) for v in files.values()),
                   leaks=0)


def _task_states(run: Any) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskInstance).filter(TaskInstance.dag_id == run.dag_id,
                                                  TaskInstance.run_id == run.run_id)
        return {t.task_id: str(t.state) for t in rows}


def test_the_connections_json_holds_the_passwords(redis_conns: dict[str, Any]) -> None:
    """The scan above is not vacuous: the connections it ran on do carry the passwords."""
    text = json.dumps(redis_conns)
    assert IN_URI in text and IN_FIELD in text and WRONG in text
