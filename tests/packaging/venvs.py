"""Helpers of the packaging tests: build the wheel, install it into a clean virtualenv with a given Airflow,
and drive that virtualenv's `airflow` and `modmed-sandbox` as a user would (no source tree on the path)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SMOKE_DAG = ROOT / "tests" / "airflow" / "dags" / "hook_dag.py"

#: prints the ModMed connection form as the installed Airflow's providers manager registered it
FORM_PROBE = """
import json
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
widgets = {k.removeprefix("extra__modmed__"): {"sensitive": w.is_sensitive,
                                               "label": w.field.get("schema", {}).get("title")}
           for k, w in pm.connection_form_widgets.items() if k.startswith("extra__modmed__")}
print("FORM=" + json.dumps({"widgets": widgets, "behaviour": pm.field_behaviours.get("modmed")}))
"""


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with the tail of its output when it exits non-zero."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(work: Path) -> Path:
    """The provider's wheel, built from the source tree into ``work/dist``."""
    run(sys.executable, "-m", "build", "--wheel", "--outdir", work / "dist", ROOT, cwd=work)
    return next((work / "dist").glob("airflow_provider_modmed-*.whl"))


def install(work: Path, wheel: Path, constraints: Path) -> Path:
    """A fresh virtualenv in ``work/venv`` holding the wheel, resolved under ``constraints``; its bin folder."""
    run(sys.executable, "-m", "venv", work / "venv", cwd=work)
    venv_bin = work / "venv" / "bin"
    run(venv_bin / "pip", "install", "-q", "--disable-pip-version-check", "-c", constraints, wheel, cwd=work)
    return venv_bin


def clean_env(work: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with the virtualenv first on PATH and nothing of ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"AIRFLOW_HOME": str(work / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "PATH": f"{work / 'venv' / 'bin'}:{env.get('PATH', '')}", **extra})
    return env


def airflow_version(venv_bin: Path, work: Path) -> str:
    """The Airflow version installed in the virtualenv."""
    return run(venv_bin / "python", "-c", "import airflow; print(airflow.__version__)", cwd=work,
               env=clean_env(work)).stdout.strip()


def connection_form(venv_bin: Path, work: Path) -> dict[str, Any]:
    """The ModMed form fields (name -> sensitive, label) and UI behaviour the installed Airflow registered."""
    out = run(venv_bin / "python", "-c", FORM_PROBE, cwd=work, env=clean_env(work)).stdout
    return dict(json.loads(next(line for line in out.splitlines() if line.startswith("FORM="))[5:]))


@contextmanager
def sandbox(venv_bin: Path, work: Path) -> Iterator[dict[str, Any]]:
    """The virtualenv's ``modmed-sandbox serve`` on free ports; yields its credentials (stopped on exit)."""
    port, storage = free_port(), free_port()
    proc = subprocess.Popen([venv_bin / "modmed-sandbox", "serve", "--port", str(port), "--storage-port",
                             str(storage), "--patients", "10"], cwd=work, env=clean_env(work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                creds = httpx.get(f"http://127.0.0.1:{port}/_sandbox/credentials", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "modmed-sandbox did not start"
                time.sleep(0.2)
        yield creds
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def run_smoke_dag(venv_bin: Path, work: Path, creds: dict[str, Any]) -> str:
    """``airflow dags test modmed_hook_smoke`` (both tracks through ModMedHook) with the sandbox's
    connections; returns its output."""
    dags = work / "dags"
    dags.mkdir(exist_ok=True)
    shutil.copy(SMOKE_DAG, dags / SMOKE_DAG.name)
    conns = {f"AIRFLOW_CONN_{cid.upper()}": json.dumps(c) for cid, c in creds["airflow_connections"].items()}
    env = clean_env(work, AIRFLOW__CORE__DAGS_FOLDER=str(dags), **conns)
    run(venv_bin / "airflow", "db", "migrate", cwd=work, env=env)
    result = run(venv_bin / "airflow", "dags", "test", "modmed_hook_smoke", cwd=work, env=env)
    return result.stdout + result.stderr


def check_registered(venv_bin: Path, work: Path) -> None:
    """The installed wheel is imported from the virtualenv (not the source tree) and Airflow lists it."""
    env = clean_env(work)
    where = run(venv_bin / "python", "-c", "import airflow_provider_modmed as m; print(m.__file__, m.__version__)",
                cwd=work, env=env).stdout
    assert str(work / "venv") in where and str(ROOT) not in where
    providers = run(venv_bin / "airflow", "providers", "list", cwd=work, env=env).stdout
    assert "airflow-provider-modmed" in providers


def check_connection_form(venv_bin: Path, work: Path) -> None:
    """Airflow registered every declared field of the ModMed form (secrets masked) and its UI behaviour."""
    from airflow_provider_modmed.connection_form import CONN_FIELDS, UI_FIELD_BEHAVIOUR

    form = connection_form(venv_bin, work)
    assert set(form["widgets"]) == set(CONN_FIELDS)
    for name, field in CONN_FIELDS.items():
        assert form["widgets"][name]["label"] == field["label"], name
        assert form["widgets"][name]["sensitive"] == (field["schema"].get("format") == "password"), name
    assert form["behaviour"] == json.loads(json.dumps({k.replace("-", "_"): v for k, v in UI_FIELD_BEHAVIOUR.items()}))
