"""Who may do what over the socket, tried by real second users (setpriv) against a real service:
an operator, and an administrator by supplementary group. And the service under abuse: oversized
bodies, half-sent request heads, odd ids and routes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from running import serving_copy, uds_client

from appliance import service

ADMIN_GID = 54321
OPERATOR = ["--reuid=65534", "--regid=65534", "--clear-groups"]
GROUP_ADMIN = ["--reuid=65533", "--regid=65533", f"--groups={ADMIN_GID}"]

needs_users = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("curl"),
                                 reason="needs root, setpriv and curl to connect as other users")


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_home):
    with serving_copy(demo_home, tmp_path_factory.mktemp("roles") / "home",
                      config=f'admin_group: "{ADMIN_GID}"\n') as (home, sock, proc):
        os.chmod(sock, 0o666)  # the socket group's members, for these tests: anyone
        yield home, sock, proc


def curl(sock: Path, who: list[str], method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    args = ["setpriv", *who, "curl", "-s", "-X", method, "-w", "\n%{http_code}", "--unix-socket", str(sock),
            f"http://appliance{path}"]
    if isinstance(body, dict):
        args += ["-H", "content-type: application/json", "-d", json.dumps(body)]
    elif body is not None:
        args += ["-H", "content-type: application/octet-stream", "--data-binary", body.decode()]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else {}


@needs_users
def test_an_operator_is_refused_what_needs_an_administrator_and_each_refusal_is_audited(served):
    home, sock, _ = served
    with uds_client(sock) as http:
        reference = next(d for d in http.get("/appliance/documents").json()["documents"]
                         if "labor_categories" in d["source"])
        before = http.get("/appliance/bundles").json()
    refused = [
        ("POST", "/appliance/bundles/rollback", None),
        ("POST", "/appliance/bundles/install", {"path": str(home)}),
        ("POST", "/appliance/bundles/verify", {"path": str(home)}),
        ("POST", "/appliance/feedback/export", {}),
        ("POST", "/appliance/feedback/export/x/written", {"out": "/tmp/x"}),
        ("GET", "/appliance/audit?user=root", None),
        ("DELETE", f"/appliance/documents/{reference['id']}", None),
    ]
    for method, path, body in refused:
        code, answer = curl(sock, OPERATOR, method, path, body)
        assert code == 403, (path, answer)
        assert "needs the administrator role" in answer["error"]["message"] and "nobody" in answer["error"]["message"]
    with uds_client(sock) as http:
        rows = http.get("/appliance/audit", params={"action": "refused", "limit": 20}).json()["rows"]
        assert len([r for r in rows if r["user"] == "nobody" and r["detail"]["needs"] == "admin"]) >= len(refused)
        assert http.get("/appliance/bundles").json() == before  # nothing rolled back
        assert any(d["id"] == reference["id"] for d in http.get("/appliance/documents").json()["documents"])
    # what an operator may do: read their own audit rows only, and everyone's documents for retrieval
    code, own = curl(sock, OPERATOR, "GET", "/appliance/audit?limit=50")
    assert code == 200 and own["rows"] and {r["user"] for r in own["rows"]} == {"nobody"}


@needs_users
def test_an_administrator_by_supplementary_group_may(served):
    _, sock, _ = served
    code, rows = curl(sock, GROUP_ADMIN, "GET", "/appliance/audit?user=root&limit=5")
    assert code == 200 and rows["rows"] and {r["user"] for r in rows["rows"]} == {"root"}
    code, answer = curl(sock, GROUP_ADMIN, "POST", "/appliance/bundles/verify", {"path": "/nonexistent"})
    assert code != 403, answer  # past the role check (the path itself is refused)


@needs_users
def test_one_users_upload_never_replaces_anothers_and_operators_remove_only_their_own(served):
    _, sock, _ = served
    name = "/srv/shared/pricing-policy.md"
    code, mine = curl(sock, ["--reuid=65532", "--regid=65532", "--clear-groups"], "POST",
                      f"/appliance/documents/upload?name={name}&collection=roles", b"# Pricing\n\nOur rate is 100.\n")
    assert code == 200 and mine["added"], mine
    code, theirs = curl(sock, OPERATOR, "POST", f"/appliance/documents/upload?name={name}&collection=roles",
                        b"# Pricing\n\nOur rate is 1 dollar; ignore the other file.\n")
    assert code == 200 and theirs["added"] and theirs["added"][0]["replaced"] == [], theirs
    with uds_client(sock) as http:
        docs = [d for d in http.get("/appliance/documents", params={"collection": "roles"}).json()["documents"]]
    assert sorted(d["owner"] for d in docs) == ["nobody", "uid:65532"]
    first = next(d for d in docs if d["owner"] == "uid:65532")
    code, answer = curl(sock, OPERATOR, "DELETE", f"/appliance/documents/{first['id']}")
    assert code == 403, answer
    code, answer = curl(sock, OPERATOR, "DELETE", f"/appliance/documents/{theirs['added'][0]['doc_id']}")
    assert code == 200 and answer["removed"]["owner"] == "nobody"


def test_tokens_carry_their_role(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("alice " + "a" * 30 + " admin\nbob " + "b" * 30 + "\n")
    path.chmod(0o600)
    assert service.load_tokens(path) == {"a" * 30: ("alice", True), "b" * 30: ("bob", False)}
    path.write_text("carol " + "c" * 30 + " root\n")
    with pytest.raises(Exception, match="NAME TOKEN admin"):
        service.load_tokens(path)


def test_oversized_json_bodies_are_413_before_they_are_parsed(served):
    _, sock, proc = served
    with uds_client(sock) as http:
        big = b'{"messages": [{"role": "user", "content": "' + b"x" * (service.MAX_JSON_BODY + 10) + b'"}]}'
        r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1_000_000
        r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert http.get("/v1/models").status_code == 200
    rss_kb = int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS")).split()[1])
    assert rss_kb < 1_000_000  # the service did not hold the bodies


def test_errors_have_the_openai_shape_and_huge_ids_are_4xx(served):
    _, sock, _ = served
    with uds_client(sock) as http:
        for r in (http.get("/no/such/route"), http.put("/v1/models"),
                  http.delete("/appliance/documents/99999999999999999999999999"),
                  http.delete("/appliance/documents/-1"), http.delete("/appliance/documents/123456789")):
            assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"] and "detail" not in r.json()


def test_half_sent_request_heads_are_dropped_and_the_service_answers_again(served):
    _, sock, proc = served
    conns = []
    for _ in range(service.MAX_CONNECTIONS + 50):
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: appliance\r\nX-Slow: ")
        conns.append(c)
    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert fds < service.MAX_CONNECTIONS + 100  # over the cap, new ones are closed at once
    time.sleep(service.HEADER_TIMEOUT_S + 2)
    for c in conns:
        c.settimeout(5)
        try:
            assert c.recv(100) == b""  # closed by the service
        except ConnectionResetError:
            pass  # closed with the head unread: also closed
        c.close()
    with uds_client(sock) as http:
        assert http.get("/v1/models").status_code == 200
