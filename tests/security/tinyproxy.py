"""Debian's tinyproxy on a free loopback port, with its config and log in a temporary folder."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, require_binary

#: tinyproxy's log line of each request it reads: ``Request (file descriptor 5): CONNECT 127.0.0.1:443 HTTP/1.1``
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


class Tinyproxy:
    """An HTTP proxy on 127.0.0.1 that tunnels CONNECT to any port; ``user``/``password`` turn on Basic auth."""

    def __init__(self, workdir: Path, *, user: str | None = None, password: str | None = None) -> None:
        self.binary = require_binary("tinyproxy")
        self.port = free_port()
        self.log_file = workdir / "tinyproxy.log"
        self.config = workdir / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", f'LogFile "{self.log_file}"',
                 "LogLevel Connect", f'PidFile "{workdir / "tinyproxy.pid"}"', "MaxClients 50", "Allow 127.0.0.1",
                 "DisableViaHeader Yes"]  # no ConnectPort line: CONNECT to every port (the sandbox's are random)
        if user and password:
            lines.append(f"BasicAuth {user} {password}")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Tinyproxy:
        self.proc = subprocess.Popen([self.binary, "-d", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"tinyproxy did not start: {self.log()[-500:]}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def requests(self) -> list[tuple[str, str]]:
        """``(method, target)`` of every request the proxy read, e.g. ``("CONNECT", "127.0.0.1:40251")``."""
        return _REQUEST.findall(self.log())
