"""The client talks only to a service socket nobody else could have planted; the service listens only
where nobody else could. A planted socket in /tmp once received what root ingested next."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from appliance import service
from appliance.client import find_socket
from appliance.config import default_socket, untrusted_socket
from appliance.errors import ConfigError


def _listen(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    received = []

    def accept():
        try:
            conn, _ = sock.accept()
        except OSError:  # closed at the test's end with nobody having connected
            return
        received.append(conn.recv(100))
        conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return sock, received


def test_default_socket_is_never_in_a_shared_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    assert default_socket() == tmp_path / "home" / "run" / "appliance.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket() == tmp_path / "appliance.sock"


def test_a_socket_in_a_directory_others_can_write_is_not_used(monkeypatch, tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    planted, received = _listen(shared / "appliance.sock")
    try:
        monkeypatch.setenv("APPLIANCE_SOCKET", str(shared / "appliance.sock"))
        assert find_socket() is None
        assert "writable by other users" in capsys.readouterr().err
        assert received == []  # never even connected
        with pytest.raises(ConfigError, match="will not listen"):
            service.serve(None, shared / "other.sock")  # refused before anything is loaded
    finally:
        planted.close()


def test_a_socket_owned_by_another_user_is_not_used(monkeypatch, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a socket to another user")
    private = tmp_path / "run"
    private.mkdir(mode=0o755)
    planted, _ = _listen(private / "appliance.sock")
    try:
        os.chown(private / "appliance.sock", 65534, 65534)
        assert "belongs to uid 65534" in untrusted_socket(private / "appliance.sock")
        monkeypatch.setenv("APPLIANCE_SOCKET", str(private / "appliance.sock"))
        assert find_socket() is None
        os.chown(private / "appliance.sock", 0, 0)
        assert untrusted_socket(private / "appliance.sock") is None
        assert find_socket() == private / "appliance.sock"  # the same socket, ours: used
    finally:
        planted.close()


def test_a_link_to_a_planted_socket_is_judged_by_where_it_leads(monkeypatch, tmp_path, capsys):
    """A link in a directory only root can write, pointing at a socket planted in a world-writable one:
    the check once looked at the link and passed it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    trusted = tmp_path / "run"
    trusted.mkdir(mode=0o755)
    planted, received = _listen(shared / "evil.sock")
    try:
        (trusted / "appliance.sock").symlink_to(shared / "evil.sock")
        why = untrusted_socket(trusted / "appliance.sock")
        assert why and str(shared) in why and "writable by other users" in why
        monkeypatch.setenv("APPLIANCE_SOCKET", str(trusted / "appliance.sock"))
        assert find_socket() is None
        assert received == []
        (trusted / "loop.sock").symlink_to(trusted / "loop.sock")
        assert "cannot be resolved" in untrusted_socket(trusted / "loop.sock")
    finally:
        planted.close()


def test_a_directory_owned_by_a_stranger_proves_nothing(monkeypatch, tmp_path, capsys):
    """An attacker's own 0755 directory holding the attacker's socket once passed, because the socket's
    owner was the directory's owner. Only the caller, root and the service's user are trusted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give files to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    planted, received = _listen(theirs / "appliance.sock")
    try:
        os.chown(theirs, 65534, 65534)
        os.chown(theirs / "appliance.sock", 65534, 65534)
        monkeypatch.setenv("APPLIANCE_SERVICE_USER", "appliance-no-such-user")
        assert "belongs to uid 65534" in untrusted_socket(theirs / "appliance.sock")
        monkeypatch.setenv("APPLIANCE_SOCKET", str(theirs / "appliance.sock"))
        assert find_socket() is None and received == []
        # the same directory and socket, when uid 65534 is the configured service user: trusted
        monkeypatch.setenv("APPLIANCE_SERVICE_USER", "65534")
        assert untrusted_socket(theirs / "appliance.sock") is None
    finally:
        planted.close()


def test_what_listens_is_checked_not_only_the_path(monkeypatch, tmp_path, capsys):
    """A socket moved into a trusted directory and given to root still leads to whoever listens on it:
    the client asks the kernel who answered (SO_PEERCRED)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to listen as another user")
    top = Path(tempfile.mkdtemp(prefix="appliance-peer-"))
    try:
        top.chmod(0o755)
        theirs, trusted = top / "theirs", top / "run"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        trusted.mkdir(mode=0o755)
        listener = subprocess.Popen(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(4)\n"
                "print('up', flush=True)\ntime.sleep(60)",
                str(theirs / "s.sock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert listener.stdout.readline().strip() == "up"
            os.rename(theirs / "s.sock", trusted / "appliance.sock")
            os.chown(trusted / "appliance.sock", 0, 0)
            assert untrusted_socket(trusted / "appliance.sock") is None  # the path alone looks fine
            monkeypatch.setenv("APPLIANCE_SOCKET", str(trusted / "appliance.sock"))
            assert find_socket() is None
            assert "runs as uid 65534" in capsys.readouterr().err
        finally:
            listener.kill()
            listener.wait()
    finally:
        shutil.rmtree(top, ignore_errors=True)
