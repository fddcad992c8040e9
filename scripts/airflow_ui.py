"""`make airflow`: the sandbox plus a local Airflow (UI, scheduler, triggerer) with ModMed connections ready.

The sandbox's connections are saved in Airflow's metadata database (not passed as ``AIRFLOW_CONN_*``
variables, which the UI does not list), so Admin -> Connections shows them and each can be opened,
edited and tested. Each run replaces them (the sandbox listens on a new port every time); other
connections are left alone.

Open http://127.0.0.1:8080 (no login: every user is admin). Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_modmed.sandbox.server import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


def for_the_ui(conn: Mapping[str, Any]) -> dict[str, Any]:
    """A connection (Airflow's JSON form) as the metadata database stores it, ready for the list-row Test.

    Airflow 3.3.2's list-row Test sends ``port: 0`` for a connection whose Port is empty and the server
    refuses it ("Bad Request"): the Port is filled with the port already written in the Host URL.
    """
    stored = {key: value for key, value in conn.items() if key != "extra"}
    if conn.get("port") is None and conn.get("host"):
        port = urlsplit(str(conn["host"])).port
        if port is not None:
            stored["port"] = port
    if "extra" in conn:
        extra = conn["extra"]
        stored["extra"] = extra if isinstance(extra, str) else json.dumps(extra)
    return stored


def save_connections(connections: Mapping[str, Mapping[str, Any]], env: Mapping[str, str]) -> list[str]:
    """Create or update ``connections`` in the metadata database of ``env["AIRFLOW_HOME"]``.

    Runs ``airflow connections import --overwrite`` (the database must be migrated): a connection with
    the same id is replaced, others are kept. The file it reads holds secrets, so it lives in a private
    temporary folder only while the command runs. Returns the ids saved; raises ``RuntimeError`` naming
    the ids Airflow did not import (never their values).
    """
    doc = {conn_id: for_the_ui(conn) for conn_id, conn in connections.items()}
    with tempfile.TemporaryDirectory(prefix="modmed-connections-") as folder:
        path = Path(folder) / "connections.json"
        path.touch(mode=0o600)
        path.write_text(json.dumps(doc))
        done = subprocess.run([AIRFLOW_BIN, "connections", "import", "--overwrite", str(path)],
                              env=dict(env), capture_output=True, text=True, timeout=180, check=False)
    imported = {line.removeprefix("Imported connection ").strip() for line in done.stdout.splitlines()
                if line.startswith("Imported connection ")}
    missing = sorted(set(doc) - imported)
    if done.returncode != 0 or missing:
        raise RuntimeError(f"airflow connections import did not save {', '.join(missing) or 'the connections'} "
                           f"(exit code {done.returncode}); run `airflow db migrate` under AIRFLOW_HOME="
                           f"{env.get('AIRFLOW_HOME')} and retry")
    return sorted(imported)


def airflow_env(home: Path, connection_ids: list[str]) -> dict[str, str]:
    """The environment of `make airflow`'s Airflow: no ``AIRFLOW_CONN_*`` variable shadows a saved connection."""
    shadowing = {f"AIRFLOW_CONN_{conn_id.upper()}" for conn_id in connection_ids}
    return {**{k: v for k, v in os.environ.items() if k not in shadowing},
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__MODMED__OUTPUT_BASE": f"file://{home / 'output'}",
            # `airflow standalone` starts its parts as `airflow ...` from PATH
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def main() -> int:
    home = ROOT / ".airflow-home"
    home.mkdir(exist_ok=True)
    with SandboxServer(patients=100, seed=1, export_seconds=2) as sb:
        connections = sb.credentials["airflow_connections"]
        env = airflow_env(home, list(connections))
        print(f"ModMed sandbox: {sb.api_url} (credentials: {sb.api_url}/_sandbox/credentials)", flush=True)
        subprocess.run([AIRFLOW_BIN, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        saved = save_connections(connections, env)
        print(f"connections (Admin -> Connections): {', '.join(saved)}")
        print("Airflow UI: http://127.0.0.1:8080 (Ctrl-C stops Airflow and the sandbox)", flush=True)
        proc = subprocess.Popen([AIRFLOW_BIN, "standalone"], env=env, start_new_session=True)

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
