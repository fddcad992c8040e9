"""The built wheel, installed into a clean virtualenv with Airflow: registered with Airflow, typed, and
able to run DAGs against the sandbox it ships, without the source tree on the path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "build", "--wheel", "--outdir", work / "dist", ROOT, cwd=work)
    wheel = next((work / "dist").glob("airflow_provider_modmed-*.whl"))
    run(sys.executable, "-m", "venv", work / "venv", cwd=work)
    pip = work / "venv" / "bin" / "pip"
    run(pip, "install", "-q", "--disable-pip-version-check", "-c", ROOT / "constraints.txt", wheel, cwd=work)
    return work, wheel


def clean_env(work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"AIRFLOW_HOME": str(work / "airflow-home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "PATH": f"{work / 'venv' / 'bin'}:{env.get('PATH', '')}", **extra})
    return env


def test_wheel_carries_types_version_and_entry_points(installed: tuple[Path, Path]) -> None:
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "airflow_provider_modmed/py.typed" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "apache_airflow_provider" in entry_points and "modmed-sandbox" in entry_points
    assert not any(n.startswith(("tests/", "example_dags/")) for n in names)


def test_installed_wheel_registers_and_runs_a_dag_against_its_sandbox(installed: tuple[Path, Path]) -> None:
    work, _ = installed
    venv_bin = work / "venv" / "bin"
    env = clean_env(work)
    where = run(venv_bin / "python", "-c", "import airflow_provider_modmed as m; print(m.__file__, m.__version__)",
                cwd=work, env=env).stdout
    assert str(work / "venv") in where and str(ROOT) not in where
    providers = run(venv_bin / "airflow", "providers", "list", cwd=work, env=env).stdout
    assert "airflow-provider-modmed" in providers

    port, storage = free_port(), free_port()
    sandbox = subprocess.Popen([venv_bin / "modmed-sandbox", "serve", "--port", str(port), "--storage-port",
                                str(storage), "--patients", "10"], cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                creds = httpx.get(f"http://127.0.0.1:{port}/_sandbox/credentials", timeout=2).json()
                break
            except httpx.TransportError:
                assert sandbox.poll() is None and time.monotonic() < deadline, "modmed-sandbox did not start"
                time.sleep(0.2)
        dags = work / "dags"
        dags.mkdir(exist_ok=True)
        shutil.copy(ROOT / "tests" / "airflow" / "dags" / "hook_dag.py", dags / "hook_dag.py")
        conns = {f"AIRFLOW_CONN_{cid.upper()}": json.dumps(c) for cid, c in creds["airflow_connections"].items()}
        env = clean_env(work, AIRFLOW__CORE__DAGS_FOLDER=str(dags), **conns)
        run(venv_bin / "airflow", "db", "migrate", cwd=work, env=env)
        result = run(venv_bin / "airflow", "dags", "test", "modmed_hook_smoke", cwd=work, env=env)
        assert "state=success" in result.stdout + result.stderr, result.stdout[-2000:]
    finally:
        os.killpg(sandbox.pid, signal.SIGTERM)
        sandbox.wait(10)
