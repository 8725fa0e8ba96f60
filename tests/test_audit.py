"""The audit log: every action recorded, the chain verifiable here and by the README's script."""

import json
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from appliance.app import Appliance
from appliance.cli import cli
from appliance.config import load_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def test_actions_are_recorded_and_the_chain_verifies(home, tmp_path, tiny_generation):
    note = tmp_path / "note.md"
    note.write_text("# Hours\n\nThe help desk is open 7am to 7pm.")
    assert _run(home, "ingest", str(note)).exit_code == 0
    asked = _run(home, "ask", "When is the help desk open?", "--json", "--max-tokens", "4")
    assert asked.exit_code == 0, asked.output
    answer = json.loads(asked.stdout)
    doc_id = json.loads(_run(home, "docs", "list", "--json").stdout)["documents"][0]["id"]
    assert _run(home, "docs", "remove", str(doc_id)).exit_code == 0
    assert _run(home, "install-generation", "--unsigned", str(tiny_generation)).exit_code == 0
    rows = json.loads(_run(home, "audit", "list", "--json").stdout)["rows"]
    assert [r["action"] for r in rows] == ["install", "remove", "ask", "ingest"]  # newest first
    ask = rows[2]
    assert ask["id"] == answer["audit_id"]
    assert ask["model_sha256"] == answer["model"]["sha256"] and ask["generation"] == 1
    assert ask["detail"]["chunks"] and all(len(c["doc_sha256"]) == 64 for c in ask["detail"]["chunks"])
    assert "question" not in ask["detail"] and len(ask["detail"]["question_sha256"]) == 64  # hashes only
    assert rows[0]["generation"] == 2 and rows[0]["user"]
    verified = _run(home, "audit", "verify")
    assert verified.exit_code == 0 and "intact: 4 rows" in verified.output


def test_full_text_when_configured(home, monkeypatch):
    monkeypatch.setenv("APPLIANCE_AUDIT_TEXT", "true")
    with Appliance(load_settings(home=home)) as app:
        result = app.ask("Which code is the Program Manager?", max_tokens=4)
    rows = json.loads(_run(home, "audit", "list", "--json").stdout)["rows"]
    assert rows[0]["detail"]["question"] == "Which code is the Program Manager?"
    assert rows[0]["detail"]["answer"] == result.answer


def _three_rows(home):
    with Appliance(load_settings(home=home)) as app:
        for i in range(3):
            app.audit("test", {"i": i})
        return app.settings.db_path


def test_altered_or_deleted_rows_are_named(home):
    import apsw

    db = _three_rows(home)
    conn = apsw.Connection(str(db))
    conn.execute("UPDATE audit SET detail = '{\"i\":99}' WHERE id = 2")
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "broken at row 2" in result.output
    conn.execute("UPDATE audit SET detail = '{\"i\":1}' WHERE id = 2")  # restored exactly: intact again
    assert _run(home, "audit", "verify").exit_code == 0
    conn.execute("DELETE FROM audit WHERE id = 2")
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "broken at row 3" in result.output
    conn.close()


def test_export_is_checked_by_the_readme_script(home, tmp_path):
    _three_rows(home)
    out = tmp_path / "audit.jsonl"
    assert _run(home, "audit", "export", "--out", str(out)).exit_code == 0
    script = re.search(r"## Checking an audit export.*?```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    assert len(script.splitlines()) <= 20
    (tmp_path / "check.py").write_text(script)
    ok = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and "3 rows, chain intact" in ok.stdout
    lines = out.read_text().splitlines()
    row = json.loads(lines[1])
    row["user"] = "mallory"
    lines[1] = json.dumps(row)
    out.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "chain broken at row 2" in bad.stderr


def test_two_processes_appending_at_once_keep_one_chain(home):
    script = ("import sys\nfrom appliance.app import Appliance\nfrom appliance.config import load_settings\n"
              "with Appliance(load_settings(home=sys.argv[1])) as app:\n"
              "    for i in range(40):\n        app.audit('load', {'writer': sys.argv[2], 'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), w], stderr=subprocess.PIPE, text=True)
             for w in ("a", "b")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    result = _run(home, "audit", "verify")
    assert result.exit_code == 0 and "intact: 80 rows" in result.output
