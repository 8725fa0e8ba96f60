"""A real `appliance serve` process for tests (the service, the CLI and the operator UI through it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx


def start_service(home: Path, sock: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # serving, not only bound: the socket exists before uvicorn has started the app
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the service did not start"
        if sock.exists():
            try:
                with uds_client(sock) as http:
                    if http.get("/v1/models").status_code == 200:
                        return proc
            except httpx.TransportError:
                pass
        time.sleep(0.05)


def stop_service(proc: subprocess.Popen, sock: Path) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert not sock.exists()  # removed at shutdown


def uds_client(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://appliance", timeout=60)


class sqlite_rows:
    """The database of a home, opened read-only beside the running service."""

    def __init__(self, home: Path):
        import apsw

        self.conn = apsw.Connection(str(home / "appliance.db"), flags=apsw.SQLITE_OPEN_READONLY)

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()
