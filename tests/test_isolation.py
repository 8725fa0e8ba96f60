"""The appliance never imports the training stack, and answers with the network unreachable."""

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ["torch", "transformers", "peft", "trl", "mergekit", "textual", "sentence_transformers"]

SCRIPT = textwrap.dedent("""
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("outbound network blocked by the test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    try:
        socket.create_connection(("203.0.113.1", 80))
        blocked = False
    except OSError:
        blocked = True

    from appliance.app import Appliance
    from appliance.cli import cli  # the CLI module too: everything an operator runs
    from appliance.config import load_settings

    with Appliance(load_settings(home=sys.argv[1])) as app:
        result = app.ask("What is the code for the Database Administrator labor category?", max_tokens=8)
        hits = app.search("15-1242.00")
    forbidden = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))
    print(json.dumps({"blocked": blocked, "forbidden": forbidden, "sources": len(result.sources),
                      "first_hit": hits[0].text, "tokens": result.timing["tokens"]}))
""")


def test_appliance_imports_no_training_stack_and_works_offline(demo_home):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(demo_home), ",".join(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the socket block did not take effect, so the test proves nothing"
    assert out["forbidden"] == []
    assert out["sources"] >= 1
    assert out["tokens"] >= 1
    assert "15-1242.00" in out["first_hit"]


def test_imports_keep_to_the_contracts_in_pyproject():
    """docs/architecture.md section 2: tui -> appliance <- builder, and the builder only through the
    appliance's contract modules; the contracts are `[tool.importlinter]` in pyproject.toml, the same
    that `make lint` checks."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "4 kept, 0 broken" in proc.stdout


def test_the_database_is_read_and_written_only_by_its_owners():
    """Each table has one owner: retrieval/store.py (collections, documents, chunks, vectors, conversations
    and messages), records/audit.py (the audit log), records/feedback.py (feedback); the schema is
    retrieval/migrations.py. Nothing else (not the Appliance, not the service) runs SQL; bundles/staging.py
    only integrity-checks the reference.db a bundle carries before it is attached."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "appliance"
    running_sql = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"\.execute(many)?\(", p.read_text())
    }
    assert running_sql == {
        "retrieval/store.py",
        "records/audit.py",
        "records/feedback.py",
        "bundles/staging.py",
    }, running_sql
    bundle_sql = re.findall(r'\.execute\("([^"]*)', (root / "bundles" / "staging.py").read_text())
    assert bundle_sql == ["PRAGMA integrity_check"]
