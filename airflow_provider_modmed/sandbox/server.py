"""Run the sandbox: both listeners on loopback, in the foreground (CLI) or a background thread (tests).

Listening beyond loopback is refused unless ``allow_remote`` is set; the admin endpoints (``/_sandbox/*``)
then answer only requests carrying the admin token (:func:`check_bind`).

Usage from Python::

    with SandboxServer(patients=30, seed=1) as sb:
        httpx.get(sb.credentials["proprietary"]["fhir_base"] + "/metadata", ...)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from airflow_provider_modmed.client.config import is_loopback
from airflow_provider_modmed.sandbox.app import build_api_app, build_storage_app
from airflow_provider_modmed.sandbox.http import InjectedFault
from airflow_provider_modmed.sandbox.state import SandboxConfig, SandboxState
from airflow_provider_modmed.sandbox.store import Store

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says TCP; without it every answer waits ~40 ms on delayed ACKs
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _injected(exc: BaseException | None) -> bool:
    group = getattr(exc, "exceptions", None)  # an exception group (a task group ran the response)
    if isinstance(group, tuple) and group:
        return all(_injected(e) for e in group)
    return isinstance(exc, InjectedFault)


class InjectedFaultLog(logging.Filter):
    """Turns uvicorn's "Exception in ASGI application" + traceback for an injected fault into one line.

    A fault that cuts an answer mid-body has to raise after the response started (that is how an ASGI app
    makes the server drop the connection); uvicorn logs every such exception with its traceback, and a soak
    run with ``drop_next`` printed pages of them. Real application errors keep their traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if _injected(exc):
            record.msg, record.args = "%s", (str(exc),)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _log_injected_faults_as_one_line() -> None:
    """Install :class:`InjectedFaultLog` on uvicorn's error logger (once; after uvicorn configured logging)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, InjectedFaultLog) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(InjectedFaultLog())


class RemoteBindRefused(ValueError):
    """The sandbox was asked to listen beyond loopback without ``allow_remote`` (``--allow-remote``)."""


def check_bind(config: SandboxConfig) -> SandboxConfig:
    """THE rule for where the sandbox may listen, checked before any socket is bound.

    Loopback (127.0.0.0/8, ``::1``, ``localhost``): as configured, admin endpoints open. Any other address
    (``0.0.0.0`` included) exposes ``/_sandbox/*``, which returns every credential and writes resources:
    refused unless ``allow_remote``; then the admin endpoints require ``admin_token``, generated here
    unless given. Returns the config to run with.
    """
    if is_loopback(config.host):
        return config
    if not config.allow_remote:
        raise RemoteBindRefused(
            f"refusing to listen on {config.host!r}: beyond loopback the admin endpoints (/_sandbox/*: every "
            "credential, fault switches, resource writes) would be open to the network. Pass --allow-remote "
            "(SandboxServer(allow_remote=True)) to listen there with an admin token, or keep --host 127.0.0.1")
    if config.admin_token:
        return config
    return dataclasses.replace(config, admin_token=secrets.token_urlsafe(32))


def build_state(config: SandboxConfig) -> SandboxState:
    """Open (or create and seed) the stores and the credentials of every practice of one sandbox.

    Returns practice 1's state (the root); ``state.practices`` lists them all. Practice ``i`` keeps its
    SQLite file in ``data_dir/{firm}`` (practice 1: ``data_dir`` itself) and is seeded with ``seed + i - 1``.
    """
    from airflow_provider_modmed.sandbox.bulk import BulkExports
    from airflow_provider_modmed.sandbox.credentials import make_practice_credentials
    from airflow_provider_modmed.sandbox.seed import generate

    all_credentials = make_practice_credentials(firm=config.firm, practices=config.practices, seed=config.seed,
                                                data_dir=config.data_dir, overrides=config.credential_overrides)
    states: list[SandboxState] = []
    for number, credentials in enumerate(all_credentials, start=1):
        data_dir = config.data_dir if number == 1 or config.data_dir is None else config.data_dir / credentials.firm
        db_path: Path | None = None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            db_path = data_dir / "sandbox.sqlite3"
        store = Store(db_path)
        if store.is_empty():
            started = time.monotonic()
            n = store.load(generate(patients=config.patients, seed=config.seed + number - 1))
            log.info("seeded %d resources for %d patients of firm %s in %.1f s", n, config.patients,
                     credentials.firm, time.monotonic() - started)
        state = SandboxState(config, store, credentials, root=states[0] if states else None)
        store._clock = state.now_ms  # the fault clock offset applies to meta.lastUpdated
        state.exports = BulkExports(state)
        states.append(state)
    return states[0]


class SandboxServer:
    """Both sandbox listeners, run by uvicorn on one event loop."""

    def __init__(self, config: SandboxConfig | None = None, *, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, **overrides: Any) -> None:
        """``tls_cert``/``tls_key`` (PEM files, both or neither): serve both listeners over https."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("serving over TLS needs both a certificate and its key (tls_cert and tls_key)")
        config = config or SandboxConfig(port=0)
        self.config = dataclasses.replace(config, **overrides)
        self.tls = (str(tls_cert), str(tls_key)) if tls_cert is not None and tls_key is not None else None
        self.state: SandboxState | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[uvicorn.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _prepare(self) -> tuple[list[socket.socket], SandboxState]:
        self.config = check_bind(self.config)
        state = build_state(self.config)
        api_sock = _bind(self.config.host, self.config.port)
        storage_sock = _bind(self.config.host, self.config.storage_port)
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        scheme = "https" if self.tls else "http"
        state.api_url = f"{scheme}://{host}:{api_sock.getsockname()[1]}"
        state.storage_url = f"{scheme}://{host}:{storage_sock.getsockname()[1]}"
        self.state = state
        for app in (build_api_app(state), build_storage_app(state)):
            cfg = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                 timeout_keep_alive=30, limit_concurrency=None,
                                 ssl_certfile=self.tls[0] if self.tls else None,
                                 ssl_keyfile=self.tls[1] if self.tls else None)
            server = uvicorn.Server(cfg)
            self._servers.append(server)
        _log_injected_faults_as_one_line()
        return [api_sock, storage_sock], state

    async def serve(self) -> None:
        """Serve until cancelled (the CLI's foreground mode)."""
        sockets, _ = self._prepare()
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in zip(self._servers, sockets, strict=True)))

    def start(self) -> SandboxServer:
        sockets, _ = self._prepare()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                tasks = [loop.create_task(s.serve(sockets=[sock]))
                         for s, sock in zip(self._servers, sockets, strict=True)]
                loop.call_soon(ready.set)
                loop.run_until_complete(asyncio.gather(*tasks))
            except BaseException as exc:  # surfaced by start()/stop()
                self._error = exc
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="modmed-sandbox", daemon=True)
        self._thread.start()
        ready.wait(30)
        deadline = time.monotonic() + 30
        while not all(s.started for s in self._servers):
            if self._error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self.state is not None:
            for practice in self.state.practices:
                practice.store.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences for tests and the demo ---------------------------------------------------
    @property
    def _st(self) -> SandboxState:
        if self.state is None:
            raise RuntimeError("the sandbox is not started")
        return self.state

    @property
    def api_url(self) -> str:
        return self._st.api_url

    @property
    def storage_url(self) -> str:
        return self._st.storage_url

    @property
    def admin_token(self) -> str | None:
        """The token ``/_sandbox/*`` requires (``None``: open, as on loopback by default)."""
        return self.config.admin_token

    @property
    def credentials(self) -> dict[str, Any]:
        return self._st.credentials_document()

    @property
    def app_state(self) -> SandboxState:
        return self._st

    def faults(self, **values: Any) -> None:
        self._st.apply_faults(values)

    def reset_faults(self) -> None:
        self._st.reset_faults()

    def stats(self) -> dict[str, int]:
        return dict(self._st.stats)

    def reset_stats(self) -> None:
        self._st.stats.clear()
