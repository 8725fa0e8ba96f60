"""A real `appliance serve` process for tests (the service, the CLI and the operator UI through it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from appliance.bundles.generations import current


def start_service(home: Path, sock: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


@contextlib.contextmanager
def serving_copy(source: Path, home: Path, *args: str, config: str = ""):
    """`appliance serve` over a copy of the home `source` (with `config` as its config.yaml), on a socket
    outside pytest's private tmp tree, so other OS users can reach it: yields (home, socket, process)."""
    shutil.copytree(source, home, symlinks=True)
    if config:
        (home / "config.yaml").write_text(config)
    sockdir = Path(tempfile.mkdtemp(prefix="appliance-test-"))
    sockdir.chmod(0o711)
    sock = sockdir / "api.sock"
    proc = start_service(home, sock, *args)
    try:
        yield home, sock, proc
    finally:
        stop_service(proc, sock)
        shutil.rmtree(sockdir, ignore_errors=True)


def vocabulary(home: Path) -> list[tuple[str, int]]:
    """Each token of the model installed in `home`, by id: (its text, its gguf.TokenType)."""
    from gguf import GGUFReader

    fields = GGUFReader(current(home).model_path).fields
    texts, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    return [
        (bytes(texts.parts[t]).decode(errors="replace"), int(types.parts[k][0]))
        for t, k in zip(texts.data, types.data, strict=True)
    ]


def no_end(home: Path) -> dict[str, float]:
    """A chat request's logit_bias that bans every control token of the model installed in `home` (its
    end of turn and end of text among them): the answer runs to max_tokens, wherever the tiny test model,
    trained afresh on each machine, would have stopped."""
    from gguf import TokenType

    banned = [i for i, (_, kind) in enumerate(vocabulary(home)) if kind == TokenType.CONTROL]
    assert banned, "the model has control tokens"
    return {str(t): -100 for t in banned}


def a_word_token(home: Path) -> tuple[int, str]:
    """A token of the model installed in `home` that is a plain lower-case word, and its text."""
    for i, (text, _) in enumerate(vocabulary(home)):
        if len(text) >= 3 and text.isascii() and text.isalpha() and text.islower():
            return i, text
    raise AssertionError("no plain word in the vocabulary")
