"""`make stack`: a production-shaped Airflow 3 on loopback, from a fresh clone, in one command.

* **Postgres** (Debian's ``postgresql``) as the metadata database and the Celery result backend;
* **Redis** (Debian's ``redis-server``, with a password) as the Celery broker (db 0) and the shared rate
  budget of every connection (db 1: ``rate_limit_storage_uri`` + ``rate_limit_storage_password``);
* **CeleryExecutor** (``apache-airflow-providers-celery``): an api-server, a scheduler, a dag-processor, a
  triggerer and two Celery workers, each a process group of its own;
* **S3 on loopback**: moto's server mode, reached through ``apache-airflow-providers-amazon`` (connection
  ``aws_default`` with its ``endpoint_url``), so ``ObjectStoragePath("s3://aws_default@modmed-stack/...")``
  works; ``[modmed] output_base`` points there;
* **the sandbox serving N practices** (``--practices``), with one Airflow connection per practice and
  track in the metadata database (``modmed_<firm>_proprietary``, ``modmed_<firm>_certified``; practice 1
  also as ``modmed_default``/``modmed_certified`` for the other example DAGs), the Variable
  ``modmed_practices`` listing the proprietary ones (the many-practices DAG) and
  ``[modmed] watch_practices`` the same list (the watchers DAGs).

Every DAG starts paused. Ctrl-C or SIGTERM stops all of it (SIGTERM to each process group, SIGKILL after
a grace period, Postgres by a fast shutdown) and removes the stack's folder: nothing is left running.

    .venv/bin/python scripts/stack.py --practices 20     # `make stack`
    .venv/bin/python scripts/stack.py --help

:class:`ProductionStack` is the same stack as a context manager (tests/stack/ and bench/bench_stack.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `scripts.*` imports from the repository
    sys.path.insert(0, str(ROOT))

from airflow_provider_modmed.sandbox.credentials import practice_connection_id  # noqa: E402
from airflow_provider_modmed.sandbox.server import SandboxServer  # noqa: E402
from scripts.airflow_ui import save_connections  # noqa: E402
from scripts.processes import ProcessError, ProcessGroups, free_port, listening, run_checked  # noqa: E402

BIN = Path(sys.executable).parent
AIRFLOW_BIN = str(BIN / "airflow")
BUCKET = "modmed-stack"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
#: what the watchers DAGs watch by default (``[modmed] watch_types``), per practice
WATCH_TYPES = ("Patient", "Appointment", "AllergyIntolerance")
#: every process of the stack carries its folder in this environment variable (what "nothing left" checks)
STACK_ENV = "MODMED_STACK_HOME"


class StackError(ProcessError):
    """A part of the stack is missing or did not start; the message names it."""


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs (``initdb``, ``postgres``), newest version first."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "postgres").exists():
            return folder
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise StackError("PostgreSQL's server is not installed: apt-get install postgresql (or `make system-deps`)")


def missing_parts() -> list[str]:
    """What the stack needs and this machine lacks (Debian packages, the venv's stack extra)."""
    missing = []
    try:
        postgres_bin()
    except StackError:
        missing.append("postgresql (Debian package)")
    if not shutil.which("redis-server"):
        missing.append("redis-server (Debian package)")
    if not (BIN / "moto_server").exists():
        missing.append("moto[server] (the [stack] extra)")
    for module in ("airflow.providers.celery", "airflow.providers.amazon", "s3fs", "psycopg2"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (the [stack] extra)")
    return missing


@dataclass
class StackConfig:
    """What :class:`ProductionStack` starts."""

    practices: int = 20
    workers: int = 2
    worker_concurrency: int = 4
    #: the sandbox's per-key budget, and each connection's ``rate_limit_per_minute``
    rate_limit_per_minute: int = 1000
    patients: int = 30
    seed: int = 1
    api_port: int = 0  # 0: a free port
    dags_folder: Path = ROOT / "example_dags"
    watch_types: str = ",".join(WATCH_TYPES)
    watch_poll_interval: float = 60.0
    #: seconds without a heartbeat before the scheduler fails a task whose worker died (Airflow: 300)
    heartbeat_timeout: int = 60
    extra_env: dict[str, str] = field(default_factory=dict)


class ProductionStack:
    """Postgres, Redis, moto S3, the multi-practice sandbox and a CeleryExecutor Airflow, on loopback.

    ``with ProductionStack(StackConfig(practices=5)) as stack:`` starts everything (or raises
    :class:`~scripts.processes.ProcessError` naming the part that did not start, with nothing left running)
    and stops it all on exit. ``stack.env`` is the Airflow environment (``stack.airflow(...)`` runs the CLI
    with it), ``stack.sandbox`` the sandbox, ``stack.practices`` its practices' connection ids and firms,
    ``stack.procs`` the programs (``check_alive``, ``wait_for``, ``kill``, ``tails``), ``stack.sql(...)``
    queries the metadata database, ``stack.s3()`` is a boto3 client of the object store.
    """

    def __init__(self, config: StackConfig | None = None, home: Path | None = None) -> None:
        self.config = config or StackConfig()
        self._own_home = home is None
        self.home = Path(home or tempfile.mkdtemp(prefix="modmed-stack-"))
        self.procs = ProcessGroups(self.home / "logs", mark={STACK_ENV: str(self.home)})
        self.sandbox: SandboxServer | None = None
        self.env: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self._pg_password = secrets.token_urlsafe(18)
        self._redis_password = secrets.token_urlsafe(18)
        self._s3_key, self._s3_secret = secrets.token_hex(8), secrets.token_urlsafe(18)  # moto takes any

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> ProductionStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, report: Callable[[str], None] = lambda line: None) -> None:
        missing = missing_parts()
        if missing:
            raise StackError(f"the stack needs: {', '.join(missing)} (make system-deps; make venv)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o755)  # Postgres (its own user under root) must reach its folder
        self.ports = {"postgres": free_port(), "redis": free_port(), "s3": free_port(),
                      "api": self.config.api_port or free_port()}
        started = time.monotonic()
        self._start_postgres()
        report(f"postgres   127.0.0.1:{self.ports['postgres']} (database airflow)")
        self._start_redis()
        report(f"redis      127.0.0.1:{self.ports['redis']} (broker db 0, rate budget db 1)")
        self._start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["s3"])])
        self._wait_port("s3", self.ports["s3"])
        self.s3().create_bucket(Bucket=BUCKET)
        report(f"s3 (moto)  http://127.0.0.1:{self.ports['s3']} (bucket {BUCKET})")
        self.sandbox = SandboxServer(practices=self.config.practices, patients=self.config.patients,
                                     seed=self.config.seed, export_seconds=2,
                                     rate_limit_per_minute=self.config.rate_limit_per_minute).start()
        report(f"sandbox    {self.sandbox.api_url} ({self.config.practices} practices)")
        self.env = self._airflow_env()
        self.airflow("db", "migrate", timeout=600)
        saved = save_connections(self._connections(), self.env)
        self.airflow("variables", "set", "modmed_practices", json.dumps(list(self.practices)))
        report(f"connections: {len(saved)} in the metadata database; Variable modmed_practices: "
               f"{len(self.practices)} practices")
        for component in COMPONENTS:
            args = [component, "--port", str(self.ports["api"])] if component == "api-server" else [component]
            if component in ("scheduler", "triggerer"):
                args.append("--skip-serve-logs")
            self._start(component, [AIRFLOW_BIN, *args])
        for i in range(1, self.config.workers + 1):
            self._start(f"worker{i}", [AIRFLOW_BIN, "celery", "worker", "--skip-serve-logs",
                                       "--concurrency", str(self.config.worker_concurrency),
                                       "--celery-hostname", f"worker{i}@%h"])
        self._wait_port("api-server", self.ports["api"], timeout=240)
        self.procs.wait_for("the api-server's health", self._healthy, timeout=240)
        report(f"airflow    http://127.0.0.1:{self.ports['api']} (CeleryExecutor: {', '.join(COMPONENTS)}, "
               f"{self.config.workers} Celery workers) up in {time.monotonic() - started:.0f}s")

    def stop(self) -> None:
        """Stop every process group (SIGTERM, then SIGKILL after 30 s), the sandbox, and remove the folder."""
        self.procs.stop(grace=30)
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    @property
    def practices(self) -> dict[str, str]:
        """The practices' proprietary connection ids, each with its firm (``{"modmed_apiportal2_proprietary":
        "apiportal2", ...}``), in the sandbox's order."""
        assert self.sandbox is not None
        return {practice_connection_id(p.firm, "proprietary"): p.firm for p in self.sandbox.app_state.practices}

    # -- using it -------------------------------------------------------------------------------
    def airflow(self, *args: str, timeout: float = 180) -> str:
        """Run the Airflow CLI against the stack; returns its output, raises ProcessError on failure."""
        return run_checked([AIRFLOW_BIN, *args], self.env, timeout, f"airflow {' '.join(args[:2])}")

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the metadata database."""
        conn = self._pg_connect("airflow")
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())

    def _pg_connect(self, dbname: str, **options: Any) -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.ports["postgres"], user="airflow",
                                password=self._pg_password, dbname=dbname, **options)

    def s3(self) -> Any:
        """A boto3 S3 client of the stack's object store."""
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.ports['s3']}", region_name="us-east-1",
                            aws_access_key_id=self._s3_key, aws_secret_access_key=self._s3_secret)

    def s3_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def s3_text(self, key: str) -> str:
        return str(self.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode())

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    # -- the parts --------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], user: str | None = None,
               stop_signal: int = signal.SIGTERM, env: dict[str, str] | None = None) -> None:
        self.procs.start(name, argv, env=env if env is not None else (self.env or os.environ), user=user,
                         stop_signal=stop_signal, cwd=self.home)

    def _as_postgres(self) -> str | None:
        """Postgres refuses to run as root: under root it runs as Debian's ``postgres`` user."""
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise StackError("running as root needs the 'postgres' user (Debian's postgresql package)") from exc
        return "postgres"

    def _start_postgres(self) -> None:
        pg = postgres_bin()
        data = self.home / "postgres"
        data.mkdir(mode=0o700)
        user = self._as_postgres()
        pwfile = data / "pw"
        pwfile.write_text(self._pg_password)
        if user:
            shutil.chown(data, user, user)
            shutil.chown(pwfile, user, user)
        init = subprocess.run([str(pg / "initdb"), "-D", str(data / "db"), "-U", "airflow", "--pwfile", str(pwfile),
                               "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"], user=user, capture_output=True,
                              text=True, check=False, timeout=120)
        pwfile.unlink()
        if init.returncode != 0:
            raise StackError(f"initdb failed (exit {init.returncode}):\n{init.stdout[-1500:]}\n{init.stderr[-1500:]}")
        self._start("postgres", [str(pg / "postgres"), "-D", str(data / "db"), "-p", str(self.ports["postgres"]),
                                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
                                 "-c", "max_connections=300", "-c", "fsync=off"],
                    user=user, stop_signal=signal.SIGINT, env={"PATH": os.environ.get("PATH", "")})
        self.procs.wait_for("postgres", self._postgres_ready, timeout=60)
        conn = self._pg_connect("postgres")
        conn.autocommit = True
        with contextlib.closing(conn), conn.cursor() as cur:
            cur.execute("CREATE DATABASE airflow")

    def _postgres_ready(self) -> bool:
        import psycopg2

        try:
            self._pg_connect("postgres", connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _start_redis(self) -> None:
        conf = self.home / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"port {self.ports['redis']}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n"
                        f"requirepass {self._redis_password}\ndir {self.home}\n")
        self._start("redis", [shutil.which("redis-server") or "redis-server", str(conf)])
        self._wait_port("redis", self.ports["redis"])

    def _redis_url(self, db: int, password: bool = True) -> str:
        auth = f":{self._redis_password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.ports['redis']}/{db}"

    def _connections(self) -> dict[str, dict[str, Any]]:
        """Every practice's two connections (and practice 1's under the sandbox's default names), each
        drawing from the shared Redis budget; and ``aws_default`` for the object store."""
        assert self.sandbox is not None
        served = self.sandbox.credentials["airflow_connections"]
        budget = {"rate_limit_storage_uri": self._redis_url(1, password=False),
                  "rate_limit_storage_password": self._redis_password,
                  "rate_limit_per_minute": self.config.rate_limit_per_minute}

        def with_budget(conn: dict[str, Any]) -> dict[str, Any]:
            extra = conn["extra"] if isinstance(conn["extra"], dict) else json.loads(conn["extra"])
            return {**conn, "extra": {**extra, **budget}}

        chosen = {conn_id: with_budget(served[conn_id]) for conn_id in ("modmed_default", "modmed_certified")}
        for firm in self.practices.values():
            for track, default in (("proprietary", "modmed_default"), ("certified", "modmed_certified")):
                conn_id = practice_connection_id(firm, track)
                # a one-practice sandbox names its connections only by the default names
                chosen[conn_id] = with_budget(served.get(conn_id, served[default]))
        chosen["aws_default"] = {"conn_type": "aws", "login": self._s3_key, "password": self._s3_secret,
                                 "extra": {"endpoint_url": f"http://127.0.0.1:{self.ports['s3']}",
                                           "region_name": "us-east-1"}}
        return chosen

    def _airflow_env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        home = self.home / "airflow"
        home.mkdir(exist_ok=True)
        pg = f"airflow:{self._pg_password}@127.0.0.1:{self.ports['postgres']}/airflow"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "AIRFLOW_VAR_"))}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}",
            "AIRFLOW__CELERY__BROKER_URL": self._redis_url(0),
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{pg}",
            # a killed worker's reserved message comes back after this long (Airflow's default: 6 hours)
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "300",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.config.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.ports['api']}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.config.heartbeat_timeout),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__MODMED__OUTPUT_BASE": f"s3://aws_default@{BUCKET}/out",
            "AIRFLOW__MODMED__WATCH_PRACTICES": ",".join(self.practices),
            "AIRFLOW__MODMED__WATCH_TYPES": self.config.watch_types,
            "MODMED_WATCH_POLL_INTERVAL": str(self.config.watch_poll_interval),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        env.update(self.config.extra_env)
        return env

    def _healthy(self) -> bool:
        import httpx

        try:
            health = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(health.get("metadatabase", {}).get("status") == "healthy")

    def _wait_port(self, name: str, port: int, timeout: float = 60) -> None:
        self.procs.wait_for(f"{name} on port {port}", lambda: listening(port), timeout)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--practices", type=int, default=20, help="practices the sandbox serves (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="the api-server's port (default 8080)")
    parser.add_argument("--poll-interval", type=float, default=60.0, help="the watchers' cadence in seconds")
    args = parser.parse_args(argv)
    config = StackConfig(practices=args.practices, workers=args.workers, api_port=args.port,
                         watch_poll_interval=args.poll_interval)
    stack = ProductionStack(config)
    with _signals_raise():
        try:
            stack.start(report=lambda line: print(line, flush=True))
            print(f"logs in {stack.home / 'logs'}; every DAG starts paused. Ctrl-C stops everything.", flush=True)
            while True:
                stack.procs.check_alive()
                time.sleep(2)
        except KeyboardInterrupt:
            print("stopping...", flush=True)
            return 0
        except ProcessError as exc:  # a part missing, or one that did not start or died
            print(f"stack: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
            print("stopped: nothing left running", flush=True)


if __name__ == "__main__":
    sys.exit(main())
