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
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(demo_home), ",".join(FORBIDDEN)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the socket block did not take effect, so the test proves nothing"
    assert out["forbidden"] == []
    assert out["sources"] >= 1
    assert out["tokens"] >= 1
    assert "15-1242.00" in out["first_hit"]


def test_builder_uses_only_the_appliances_contract_modules():
    """DESIGN section 2: builder -> appliance only through the contract (plus `embed` to check its export).
    `builder eval` alone also runs the appliance's own ingest, search and answer code (issue 3: accuracy
    is measured through what the operator will run). The feedback export's format and its check
    (`feedback`, with `identity` for the keys) are contract too: written on one side, read on the other."""
    import ast
    from pathlib import Path

    allowed = {"appliance.manifest", "appliance.prompt", "appliance.documents", "appliance.errors",
               "appliance.embed", "appliance.feedback", "appliance.identity"}
    eval_only = {"appliance.store", "appliance.ingest", "appliance.rag", "appliance.engine"}
    used = set()
    for path in (Path(__file__).resolve().parent.parent / "builder").rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("appliance"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("appliance")}
        used |= found - eval_only if path.name == "evaluate.py" else found
    assert used and used <= allowed, used - allowed
