"""The service's engine: llama.cpp's own server as a supervised child, decoding several answers at once
while searches, document lists and audit reads go on; killed, it is noticed and restarted; a new
generation drains it and starts it on the new model. A real `appliance serve`, a real llama-server
built from the pinned sources (`make deps`), real HTTP clients."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from running import no_end, serving_copy, uds_client

from appliance.engine.server import find_binary

pytestmark = pytest.mark.skipif(find_binary() is None, reason="needs llama-server (`make deps` builds it)")

LONG = {
    "messages": [{"role": "user", "content": "Write a long staffing plan."}],
    "max_tokens": 500,
    "stream": True,
    "rag": False,
    "temperature": 0.0,
}


@pytest.fixture(scope="module")
def endless(demo_home) -> dict:
    """LONG with every control token banned: each answer runs to max_tokens, so the timing below does not
    hang on where this build's tiny model happens to stop (machines that train it differently differ)."""
    return dict(LONG, logit_bias=no_end(demo_home))


@pytest.fixture
def served(tmp_path, demo_home):
    with serving_copy(demo_home, tmp_path / "home", "--slots", "4") as served:
        yield served


def _engine_pid(service_pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"PPid:\t{service_pid}\n" in status and b"llama-server" in cmdline:
                return int(entry.name)
    raise AssertionError("no llama-server child")


@contextlib.contextmanager
def paused(pid: int):
    """The engine stopped (SIGSTOP) for the body: requests sent to it wait there, mid-answer, however fast
    this machine decodes, so what is measured meanwhile cannot depend on the answers' speed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_busy(sock: Path, n: int, timeout: float = 60) -> None:
    """Until `n` requests hold the engine (the service's status counts them)."""
    deadline = time.monotonic() + timeout
    with uds_client(sock) as http:
        while (busy := http.get("/appliance/status").json()["engine"]["busy"]) < n:
            assert time.monotonic() < deadline, f"{busy} of {n} requests reached the engine"
            time.sleep(0.05)


def timed_reads(sock: Path, rounds: int) -> list[float]:
    """Seconds for each of a search, a document list and an audit read, `rounds` times; a read that has
    not come back in 10 s fails the test (it waited behind something)."""
    seconds = []
    with uds_client(sock) as http:
        http.timeout = httpx.Timeout(10)
        for _ in range(rounds):
            for path, params in (
                ("/appliance/search", {"q": "cloud architect code"}),
                ("/appliance/documents", {}),
                ("/appliance/audit", {"limit": 5}),
            ):
                start = time.perf_counter()
                try:
                    assert http.get(path, params=params).status_code == 200
                except httpx.ReadTimeout:
                    raise AssertionError(f"{path} waited more than 10 s behind a generation") from None
                seconds.append(time.perf_counter() - start)
    return seconds


class Streams:
    """n streamed answers in threads; `started` once each has sent text, `ended` once each is done, with
    the moment of each one's first text and of its end."""

    def __init__(self, sock: Path, n: int, body: dict):
        self.sock, self.body = sock, body
        self.started = [threading.Event() for _ in range(n)]
        self.ended = [threading.Event() for _ in range(n)]
        self.first = [0.0] * n
        self.last = [0.0] * n
        self.results: list[dict] = [{} for _ in range(n)]
        self.pool = concurrent.futures.ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._one, i) for i in range(n)]

    def _one(self, i: int) -> None:
        text, final, error = [], None, None
        with uds_client(self.sock) as http, http.stream("POST", "/v1/chat/completions", json=self.body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    break
                piece = event["choices"][0]["delta"].get("content")
                if piece:
                    text.append(piece)
                    if not self.started[i].is_set():
                        self.first[i] = time.monotonic()
                        self.started[i].set()
                if event["choices"][0]["finish_reason"]:
                    final = event
        self.results[i] = {"text": "".join(text), "final": final, "error": error}
        self.last[i] = time.monotonic()
        self.started[i].set()
        self.ended[i].set()

    def wait(self, timeout: float = 300) -> list[dict]:
        for f in self.futures:
            f.result(timeout=timeout)
        self.pool.shutdown()
        return self.results


def test_four_answers_decode_together_and_nothing_waits_behind_them(served, endless):
    _, sock, proc = served
    with uds_client(sock) as http:  # the index and embedder loaded first, so what is timed below is waiting
        assert http.get("/appliance/search", params={"q": "warm up"}).status_code == 200
    with paused(_engine_pid(proc.pid)):  # the four are mid-answer for as long as the reads take
        streams = Streams(sock, 4, endless)
        wait_busy(sock, 4)
        reads = timed_reads(sock, 3)
        assert not any(e.is_set() for e in streams.ended)
    results = streams.wait()
    assert len(reads) == 9 and max(reads) < 2.0, reads  # answered while four answers were being generated
    assert all(r["error"] is None and r["final"] and r["text"] for r in results)
    assert [r["final"]["usage"]["completion_tokens"] for r in results] == [
        500
    ] * 4  # the bias held on the server
    # decoded together: each of the four had text before any of them had finished
    assert max(streams.first) < min(streams.last), (streams.first, streams.last)
    ids = [r["final"]["audit_id"] for r in results]
    with uds_client(sock) as http:
        rows = {
            r["id"]: r
            for r in http.get("/appliance/audit", params={"action": "ask", "limit": 10}).json()["rows"]
        }
        assert set(ids) <= set(rows) and http.get("/appliance/audit/verify").json()["intact"]  # no fork


def test_the_status_names_the_engine_and_what_holds_it(served, endless):
    _, sock, proc = served
    with uds_client(sock) as http:
        status = http.get("/appliance/status").json()
    assert status["engine"] == {
        "slots": 4,
        "busy": 0,
        "running": True,
        "generation": status["generation"],
        "starts": 1,
    }
    with paused(_engine_pid(proc.pid)):
        streams = Streams(sock, 2, endless)
        wait_busy(sock, 2)
    streams.wait()
    with uds_client(sock) as http:
        assert http.get("/appliance/status").json()["engine"]["busy"] == 0  # each let go once answered
    env = dict(os.environ, APPLIANCE_HOME=str(served[0]), APPLIANCE_SOCKET=str(sock))
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "engine      llama-server on 4 slots, 0 request(s) generating, started 1 time(s)" in out.stdout


def test_the_engine_killed_mid_answer_is_a_clear_error_then_it_answers_again(served, endless):
    _, sock, proc = served
    for _ in range(5):  # held (SIGSTOP) once its first tokens are out, so the kill lands mid-answer however
        streams = Streams(
            sock, 1, endless
        )  # fast this machine decodes; a stream that ended first is tried again
        assert streams.started[0].wait(120)
        engine = _engine_pid(proc.pid)
        os.kill(engine, signal.SIGSTOP)
        if not streams.ended[0].wait(1.0):  # still open a second after the engine stopped: mid-answer
            break
        os.kill(engine, signal.SIGCONT)
        streams.wait()
    os.kill(engine, signal.SIGKILL)
    result = streams.wait()[0]
    assert result["error"] and "engine server stopped" in result["error"]["message"]
    with uds_client(sock) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 4, "rag": False},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/appliance/status").json()["engine"]["starts"] == 2  # operators can see it happened
        failed = http.get("/appliance/audit", params={"action": "ask_failed"}).json()["rows"]
        assert failed and failed[0]["detail"]["tokens_sent"] >= 1  # the text the operator saw is on record
        assert "engine server stopped" in failed[0]["detail"]["error"]
    assert _engine_pid(proc.pid)  # a new one


def test_a_new_generation_drains_the_engine_and_restarts_it_on_the_new_model(
    served, tiny_generation, endless
):
    home, sock, proc = served
    with uds_client(sock) as http:
        before = http.get("/appliance/status").json()["generation"]
    old_engine = _engine_pid(proc.pid)
    for _ in range(5):  # two answers caught mid-stream: a fast engine may finish one before it is paused
        streams = Streams(sock, 2, endless)
        assert all(e.wait(120) for e in streams.started)
        os.kill(
            old_engine, signal.SIGSTOP
        )  # the two stay mid-answer, however fast this machine is, until SIGCONT
        time.sleep(0.3)  # what the engine wrote before the pause has reached the clients
        if not any(e.is_set() for e in streams.ended):
            break
        os.kill(old_engine, signal.SIGCONT)
        streams.wait()
    else:
        raise AssertionError("no two answers could be paused mid-stream")
    try:
        env = dict(
            os.environ, APPLIANCE_HOME=str(home)
        )  # another process switches `current`, as the USB import does
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "--local",
                "install-generation",
                "--unsigned",
                str(tiny_generation),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr

        def ask():  # asked while the two are mid-answer: waits for them, then the new model answers
            with uds_client(sock) as http:
                return http.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "Say OK."}],
                        "max_tokens": 4,
                        "rag": False,
                    },
                )

        pool = concurrent.futures.ThreadPoolExecutor(1)
        asked = pool.submit(ask)
        time.sleep(1.0)  # it has reached the engine's lease and is waiting there for the drain
        assert not asked.done() and not any(e.is_set() for e in streams.ended)
    finally:
        os.kill(old_engine, signal.SIGCONT)
    r = asked.result(120)
    pool.shutdown()
    assert r.status_code == 200 and r.json()["appliance"]["generation"] == before + 1
    results = streams.wait()
    assert all(x["error"] is None and x["final"] for x in results)  # none lost
    assert {x["final"]["appliance"]["generation"] for x in results} == {before}  # answered by the old model
    with uds_client(sock) as http:
        rows = {
            row["id"]: row for row in http.get("/appliance/audit", params={"action": "ask"}).json()["rows"]
        }
    for x in results:
        assert rows[x["final"]["audit_id"]]["generation"] == before
    assert rows[r.json()["audit_id"]]["generation"] == before + 1
    assert _engine_pid(proc.pid) != old_engine


def test_a_draft_gives_up_the_worker_while_the_engine_writes(served):
    """A draft is many generations; while the engine writes one, the worker serves others, so searches
    during a draft are not answered behind its generations."""
    _, sock, proc = served
    rfp = next(
        (Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus" / "rfps").glob("*.md")
    )
    with uds_client(sock) as http:
        assert http.get("/appliance/search", params={"q": "warm up"}).status_code == 200
    events = []

    def draft():
        with (
            uds_client(sock) as http,
            http.stream(
                "POST",
                "/appliance/draft",
                content=rfp.read_bytes(),
                params={"name": "rfp.md", "max_tokens": 120},
            ) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))

    thread = threading.Thread(target=draft)
    with paused(_engine_pid(proc.pid)):  # the draft's first generation waits in the engine
        thread.start()
        wait_busy(sock, 1)
        reads = timed_reads(sock, 2)
        assert thread.is_alive() and not any("result" in e for e in events)
    thread.join(600)
    assert "result" in events[-1], events[-1]
    assert len(reads) == 6 and sorted(reads)[len(reads) // 2] < 1.0, (
        reads
    )  # not behind the draft's generation
    assert events[-1]["result"]["requirements_found"] >= 5


def test_a_killed_service_takes_its_engine_with_it_and_the_next_start_cleans_up(tmp_path, demo_home):
    """kill -9 of the service once left llama-server running (545 MB) and its upload files behind."""
    import shutil

    from running import start_service, stop_service

    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    (home / ".upload-x1y2").mkdir()
    (home / ".upload-x1y2" / "proposal.md").write_text("an upload that was being ingested")
    sock = tmp_path / "api.sock"
    proc = start_service(home, sock, "--slots", "1")
    engine = _engine_pid(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{engine}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{engine}").exists(), "the engine outlived its service"
    left = home / "run" / f"engine-{proc.pid}"
    assert left.is_dir()
    sleeper = subprocess.Popen(
        ["sleep", "60"]
    )  # a pid file naming something that is not an engine: left alone
    try:
        (home / "run" / "engine-999999999").mkdir()
        (home / "run" / "engine-999999999" / "engine.pid").write_text(f"{sleeper.pid}\n")
        proc = start_service(home, sock, "--slots", "1")
        stop_service(proc, sock)
        err = proc.communicate()[1]
        assert not left.exists() and not (home / "run" / "engine-999999999").exists()
        assert not (home / ".upload-x1y2").exists() and "left by a service that was killed" in err
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_request_limits_follow_the_slots_the_engine_server_holds(demo_home, tmp_path):
    """n_ctx is decided once (manifest.context_tokens); the service's request limit follows the context
    each slot of the running llama-server reports (/props), not the in-process setting, so a request
    never asks for more than the prompt will be fitted to. A real llama-server on the demo generation."""
    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.engine.server import EngineServer
    from appliance.schemas import ChatRequest
    from appliance.service.errors import ApiError
    from appliance.service.openai import limits

    with Appliance(load_settings(home=demo_home, n_ctx=1024)) as app:
        assert app.context_tokens() == min(1024, app.installed.manifest.model.context_length)
        body = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=app.context_tokens() // 2)
        assert limits(app, body)[0] == app.context_tokens() // 2  # in process: the app's own context
        server = EngineServer(find_binary(), tmp_path / "engine", slots=1, n_ctx=256, threads=1)
        inst = app.installed
        try:
            server.start(inst, inst.template_path.read_text(), app.model_info())
            with httpx.Client(
                transport=httpx.HTTPTransport(uds=str(server.socket)), base_url="http://e"
            ) as http:
                served = http.get("/props").json()["default_generation_settings"]["n_ctx"]
            assert server.context == served == 256 == server.tokenizer.n_ctx
            with pytest.raises(ApiError, match="half the 256-token context"):
                limits(app, body, server)
            assert limits(app, body.model_copy(update={"max_tokens": 128}), server)[0] == 128
        finally:
            server.stop()


def test_an_unanswerable_question_is_answered_by_the_service_without_the_engine(demo_home, tmp_path):
    """A question naming what no document holds (and under a floor no sentence reaches), the service
    streams the appliance's own reply (no decode on llama-server) and the final chunk says it abstained;
    a question a reference row answers exactly still goes to the engine."""
    from appliance.retrieval.evidence import not_covered

    with serving_copy(demo_home, tmp_path / "home", "--slots", "1", config="abstain_below: 0.99\n") as (
        _,
        sock,
        _,
    ):
        body = {
            "messages": [{"role": "user", "content": "What was the value of our NASA contract?"}],
            "max_tokens": 16,
            "stream": True,
        }
        with uds_client(sock) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert text == not_covered(["NASA"])
        final = events[-1]
        assert final["abstained"] is True and final["usage"]["completion_tokens"] == 0
        assert final["citations"] == [] and final["evidence"] == []
        with uds_client(sock) as http:
            r = http.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "What is the code for a Cloud Architect?"}],
                    "max_tokens": 4,
                },
            )
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["abstained"] is False and data["usage"]["completion_tokens"] >= 1
            assert data["evidence"], "the supporting sentence rides beside the answer"
