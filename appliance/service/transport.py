"""How callers reach the service: a Unix socket with peer credentials (SO_PEERCRED, SO_PEERGROUPS) and
the administrator role they give, bearer tokens on the optional TCP listener, bounded bodies, a
deadline for request heads and connections admitted per peer; and `serve`, which binds it all."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from appliance.app import Appliance
from appliance.errors import ApplianceError
from appliance.service.deps import PEER_KEY, admin_gid
from appliance.service.limits import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_JSON_BODY,
    MAX_PER_PEER,
    MAX_TCP_CONNECTIONS,
    NEW_PEER_RESERVE,
    SO_PEERGROUPS,
    TCP_HEADER_TIMEOUT_S,
    UPLOAD_ROUTES,
)


def _peer_groups(sock: socket.socket) -> list[int]:
    """The peer's supplementary groups as of connect() (SO_PEERGROUPS); [] where the kernel lacks it."""
    for size in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
            return list(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
        except OSError as exc:
            if exc.errno != 34:  # ERANGE: more groups than fit; try the kernel's maximum
                return []
    return []


def _peer(transport, admin_group: int | None) -> dict | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid:{uid}"
    groups = _peer_groups(sock)
    admin = uid in (os.getuid(), 0) or (admin_group is not None and admin_group in (gid, *groups))
    return {"pid": pid, "uid": uid, "gid": gid, "groups": groups, "user": name, "admin": admin}


class Admission:
    """The connections open, by peer (a socket peer's uid, a TCP address) and in all: one peer never
    holds more than MAX_PER_PEER, the last NEW_PEER_RESERVE socket connections go only to peers holding
    none, and TCP, whose callers are unknown until their token is read, has a budget of its own."""

    def __init__(self) -> None:
        self.held: collections.Counter = collections.Counter()
        self.unix = self.tcp = 0

    def admit(self, key: tuple) -> bool:
        held = self.held[key]
        if held >= MAX_PER_PEER:
            return False
        if key[0] == "tcp":
            if self.tcp >= MAX_TCP_CONNECTIONS:
                return False
            self.tcp += 1
        else:
            if self.unix >= MAX_CONNECTIONS or (held and self.unix >= MAX_CONNECTIONS - NEW_PEER_RESERVE):
                return False
            self.unix += 1
        self.held[key] += 1
        return True

    def release(self, key: tuple) -> None:
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]
        if key[0] == "tcp":
            self.tcp -= 1
        else:
            self.unix -= 1


def _peer_protocol(admin_group: int | None):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCredProtocol(H11Protocol):
        """h11 with the connecting process's credentials put into every request's scope, a deadline for
        the request head, and connections admitted per peer (appliance.service.transport.Admission):
        one refused is closed at once."""

        admission = Admission()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = _peer(transport, admin_group)
            address = transport.get_extra_info("peername")
            key = (
                ("uid", peer["uid"])
                if peer
                else ("tcp", address[0] if isinstance(address, tuple) else address)
            )
            if not PeerCredProtocol.admission.admit(key):
                transport.close()
                return
            self._admitted = key
            self._head_timeout = TCP_HEADER_TIMEOUT_S if peer is None else HEADER_TIMEOUT_S
            self._arm_head_deadline()
            inner = self.app

            async def with_peer(scope, receive, send):
                scope[PEER_KEY] = peer
                await inner(scope, receive, send)

            self.app = with_peer

        def _arm_head_deadline(self) -> None:
            """The next request head must be whole within the deadline: after connecting, and again after
            each response (one byte of a second head would otherwise hold a kept-alive connection)."""
            if getattr(self, "_head_deadline", None):
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(self._head_timeout, self._head_too_slow)

        def _head_too_slow(self) -> None:
            between = self.cycle is None or self.cycle.response_complete  # no request being answered
            if between and not self.transport.is_closing():
                self.transport.close()  # half a request head, and nothing since

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc) -> None:
            key, self._admitted = getattr(self, "_admitted", None), None
            if key is not None:
                PeerCredProtocol.admission.release(key)
            deadline = getattr(self, "_head_deadline", None)
            if deadline:
                deadline.cancel()
            super().connection_lost(exc)

    return PeerCredProtocol


def _bounded_bodies(inner):
    """Request heads over MAX_HEADERS or MAX_HEADER_BYTES are 431; JSON bodies over MAX_JSON_BODY are 413
    before the application parses them, and must arrive within BODY_TIMEOUT_S; uploads have their own
    limits (max_file_mb, upload slots, a minimum rate) in their routes."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return await inner(scope, receive, send)

        async def refuse(status: int, message: str, code: str):
            body = json.dumps({"error": {"message": message, "type": code, "code": code}}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body})

        headers = scope.get("headers") or []
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            return await refuse(
                431,
                f"the request has {len(headers)} headers of "
                f"{sum(len(k) + len(v) for k, v in headers)} bytes; at most {MAX_HEADERS} headers "
                f"of {MAX_HEADER_BYTES} bytes",
                "headers_too_large",
            )
        if scope["path"] in UPLOAD_ROUTES:
            return await inner(scope, receive, send)
        declared = dict(headers).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
            return await refuse(
                413, f"the request body is {int(declared)} bytes; at most {MAX_JSON_BODY}", "too_large"
            )
        body, more = bytearray(), True

        async def gather():
            nonlocal more
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                body.extend(message.get("body", b""))
                more = message.get("more_body", False)
                if len(body) > MAX_JSON_BODY:
                    return None
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            first = await asyncio.wait_for(gather(), BODY_TIMEOUT_S)
        except TimeoutError:
            return await refuse(
                408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s", "timeout"
            )
        if first is None:
            return await refuse(413, f"the request body is over {MAX_JSON_BODY} bytes", "too_large")
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return first
            return await receive()

        await inner(scope, replay, send)

    return app


def load_tokens(path: Path) -> dict[str, tuple[str, bool]]:
    """`NAME TOKEN [admin]` per line (# comments): token -> (name, administrator?); the file must be
    readable by its owner only."""
    from appliance.errors import ConfigError

    try:
        mode = path.stat().st_mode
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the token file ({exc.strerror})", "create it, mode 0600"
        ) from exc
    if mode & 0o077:
        raise ConfigError(f"{path}: readable by others (mode {mode & 0o777:o})", f"chmod 600 {path}")
    tokens = {}
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or len(parts[1]) < 24 or (len(parts) == 3 and parts[2] != "admin"):
            raise ConfigError(
                f"{path}:{n}: expected 'NAME TOKEN' or 'NAME TOKEN admin' with a token of at "
                "least 24 characters",
                "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
            )
        tokens[parts[1]] = (parts[0], len(parts) == 3)
    if not tokens:
        raise ConfigError(f"{path}: no tokens", "add a line 'NAME TOKEN'")
    return tokens


def _bearer_only(inner, tokens: dict[str, tuple[str, bool]]):
    """TCP connections (no peer credentials) must carry a known bearer token; its name is the user."""
    import hmac

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope.get(PEER_KEY) is None:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            entry = next((e for t, e in tokens.items() if given and hmac.compare_digest(t, given)), None)
            if entry is None:
                body = json.dumps(
                    {
                        "error": {
                            "message": "a bearer token is required over TCP",
                            "type": "authentication_error",
                            "code": "invalid_api_key",
                        }
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            scope[PEER_KEY] = {
                "user": f"token:{entry[0]}",
                "uid": None,
                "pid": None,
                "gid": None,
                "admin": entry[1],
            }
        await inner(scope, receive, send)

    return app


def serve(
    app: Appliance,
    socket_path: Path,
    queue_size: int = 4,
    on_ready: Callable[[], None] | None = None,
    tcp: tuple[str, int] | None = None,
    tokens: dict[str, tuple[str, bool]] | None = None,
) -> None:
    """Load the model, bind the socket (mode 0660: the appliance group may connect) and serve until stopped.

    `tcp` (off by default) also listens on HOST:PORT, where every request needs one of `tokens`."""
    import uvicorn

    from appliance.config import untrusted_socket
    from appliance.errors import ConfigError

    if tcp and not tokens:
        raise ConfigError(
            "TCP listening needs bearer tokens", "pass --token-file FILE (lines 'NAME TOKEN', mode 0600)"
        )

    socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    why = untrusted_socket(socket_path)  # before anything is loaded
    if why:
        raise ConfigError(
            f"will not listen on {socket_path}: {why}",
            "give --socket a path in a directory only the service's user can write",
        )
    # Before anything is touched: a second service on this socket (and home) must not clean up after the first.
    if socket_path.exists() or socket_path.is_symlink():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(socket_path))
            raise ApplianceError(
                f"{socket_path}: another appliance service is listening",
                "stop it first, or give --socket another path",
            )
        except (ConnectionRefusedError, FileNotFoundError):
            socket_path.unlink()  # left by a service that was killed
        finally:
            probe.close()
    if not logging.getLogger("appliance").handlers:  # stderr: journald keeps it under systemd
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("appliance").addHandler(handler)
        logging.getLogger("appliance").setLevel(logging.INFO)
    app.recover()
    from appliance.engine.server import EngineServer

    for what in EngineServer.clean_stale(app.settings.home / "run") + app.clean_uploads():
        logging.getLogger("appliance").warning("left by a service that was killed: %s", what)
    app.ready_index()
    engine_server = _engine_server(app)
    if engine_server is None:
        _ = app.engine  # load the model before the first request, so a broken one fails at start
    # TCP first: once the Unix socket exists, clients may rely on every listener being there.
    tcp_sock = socket.create_server(tcp, backlog=128) if tcp else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(socket_path))
    finally:
        os.umask(old)
    sock.listen(128)  # clients that find the socket wait in the backlog instead of being refused
    # uvicorn re-raises SIGTERM after its shutdown, so the socket goes in the lifespan's shutdown step.
    from appliance.service import make_api

    def shutdown():
        socket_path.unlink(missing_ok=True)
        if engine_server is not None:
            engine_server.stop()

    api = make_api(app, queue_size, on_shutdown=shutdown, engine_server=engine_server)
    sockets = [sock, *([tcp_sock] if tcp_sock else [])]
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # room for MAX_CONNECTIONS and the model's files
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    config = uvicorn.Config(
        _bearer_only(_bounded_bodies(api), tokens or {}),
        http=_peer_protocol(admin_gid(app.settings.admin_group)),
        log_level="warning",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    if on_ready:
        on_ready()
    try:
        server.run(sockets=sockets)
    finally:
        if engine_server is not None:
            engine_server.stop()
        for s in sockets:
            s.close()
        if socket_path.exists():
            socket_path.unlink()


def _engine_server(app: Appliance):
    """llama.cpp's server for generation (appliance.engine.server), started on the current generation
    so a broken model fails at start; None when the setting or a missing binary says in-process."""
    from appliance.engine.server import EngineServer, find_binary
    from appliance.errors import ConfigError

    settings = app.settings
    if settings.engine == "inprocess":
        return None
    binary = find_binary(settings.engine_binary)
    if binary is None:
        if settings.engine == "server":
            raise ConfigError(
                "engine=server but no llama-server binary was found",
                "build it with `make deps`, or set APPLIANCE_ENGINE_BINARY",
            )
        logging.getLogger("appliance").warning(
            "no llama-server found: answers are generated one at a time "
            "in this process (`make deps` builds the server)"
        )
        return None
    run_dir = settings.home / "run" / f"engine-{os.getpid()}"
    engine_server = EngineServer(
        binary,
        run_dir,
        slots=settings.slots,
        n_ctx=settings.n_ctx,
        threads=settings.threads,
        mmap=settings.mmap,
        queue=settings.queue,
    )
    inst = app.installed
    engine_server.start(inst, (inst.path / inst.manifest.chat_template).read_text(), app.model_info())
    return engine_server
