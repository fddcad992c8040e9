"""`make airflow`: the sandbox plus a local Airflow (UI, scheduler, triggerer) with ModMed connections ready.

Open http://127.0.0.1:8080 (no login: every user is admin). Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from airflow_provider_modmed.sandbox.server import SandboxServer

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    home = ROOT / ".airflow-home"
    home.mkdir(exist_ok=True)
    with SandboxServer(patients=100, seed=1, export_seconds=2) as sb:
        env = {**os.environ,
               "AIRFLOW_HOME": str(home),
               "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
               "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
               "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
               "AIRFLOW__MODMED__OUTPUT_BASE": f"file://{home / 'output'}",
               # `airflow standalone` starts its parts as `airflow ...` from PATH
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for conn_id, conn in sb.credentials["airflow_connections"].items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
        print(f"ModMed sandbox: {sb.api_url} (credentials: {sb.api_url}/_sandbox/credentials)")
        print(f"connections: {', '.join(sb.credentials['airflow_connections'])}")
        print("Airflow UI: http://127.0.0.1:8080 (Ctrl-C stops Airflow and the sandbox)", flush=True)
        airflow = str(Path(sys.executable).parent / "airflow")
        proc = subprocess.Popen([airflow, "standalone"], env=env, start_new_session=True)

        def stop(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return 1


if __name__ == "__main__":
    sys.exit(main())
