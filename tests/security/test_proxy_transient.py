"""A proxy that answers ``CONNECT`` with 502/503/504 (it could not reach the server, or is busy): nothing
reached the server, so the client retries the tunnel, and a write is made once. A 403 (the proxy's
rules) is not retried. The proxy is a real one on loopback: it answers the first ``fail`` CONNECTs with
``status``, then tunnels bytes to the TLS sandbox."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modmed.client import FhirClient
from airflow_provider_modmed.errors import TransportError
from airflow_provider_modmed.hooks.connection import config_from_connection
from airflow_provider_modmed.sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


class FlakyProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy for CONNECT only: the first ``fail`` tunnels are answered ``status``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.status = "503 Service Unavailable"
        self.fail = 0
        self.connects: list[str] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Tunnel(socketserver.StreamRequestHandler):
    server: FlakyProxy

    def handle(self) -> None:
        line = self.rfile.readline().decode("latin-1")
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        method, target, _ = line.split(" ", 2)
        with self.server.lock:
            self.server.connects.append(f"{method} {target}")
            refuse = self.server.fail > 0
            self.server.fail -= refuse
        if method != "CONNECT" or refuse:
            self.wfile.write(f"HTTP/1.1 {self.server.status}\r\nContent-Length: 0\r\n\r\n".encode())
            return
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
            pump = threading.Thread(target=_pipe, args=(upstream, self.connection), daemon=True)
            pump.start()
            _pipe(self.connection, upstream)
            pump.join(5)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def proxy() -> Iterator[FlakyProxy]:
    server = FlakyProxy()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(sb: SandboxServer, proxy: FlakyProxy, pki: tuple[Path, Path, Path]) -> FhirClient:
    conn: dict[str, Any] = sb.credentials["airflow_connections"]["modmed_default"]
    config = config_from_connection(host=conn["host"], login=conn.get("login"), password=conn.get("password"),
                                    extra={**conn["extra"], "proxy": f"http://127.0.0.1:{proxy.port}",
                                           "ca_bundle": pki[2].read_text()}, max_retries=3)
    return FhirClient(config, sleep=lambda seconds: None)


@pytest.mark.parametrize("status", ["502 Bad Gateway", "503 Service Unavailable", "504 Gateway Timeout"])
def test_a_busy_proxy_is_retried_and_a_create_lands_once(
        tls_sandbox: SandboxServer, proxy: FlakyProxy, pki: tuple[Path, Path, Path], status: str) -> None:
    proxy.status, proxy.fail = status, 2
    patients_before = tls_sandbox.app_state.store.count("Patient")
    with client_for(tls_sandbox, proxy, pki) as client:
        created = client.create({"resourceType": "Patient", "name": [{"family": "Tunnel"}]})
    assert created["id"]
    assert tls_sandbox.app_state.store.count("Patient") == patients_before + 1  # once, not three times
    assert len(proxy.connects) >= 3 and proxy.fail == 0  # two refused tunnels, then the ones that opened
    assert {c.split(" ")[0] for c in proxy.connects} == {"CONNECT"}


def test_a_proxy_that_forbids_the_tunnel_is_not_retried(
        tls_sandbox: SandboxServer, proxy: FlakyProxy, pki: tuple[Path, Path, Path]) -> None:
    proxy.status, proxy.fail = "403 Forbidden", 10
    with client_for(tls_sandbox, proxy, pki) as client, pytest.raises(TransportError) as caught:
        client.read("Patient", "1")
    assert len(proxy.connects) == 1
    assert "refused the tunnel" in str(caught.value) and "403" in str(caught.value)
    assert "proxy" in str(caught.value)
