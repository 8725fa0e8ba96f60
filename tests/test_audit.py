"""The audit log: every action recorded, the chain verifiable here and by the README's script."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.app import Appliance
from appliance.cli import cli
from appliance.config import load_settings
from appliance.errors import ExitCode

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
    # newest first; the first checkpoint created the appliance's signing key, audited too
    assert [r["action"] for r in rows] == ["install", "remove", "ask", "ingest", "identity"]
    ask = rows[2]
    assert ask["id"] == answer["audit_id"]
    assert ask["model_sha256"] == answer["model"]["sha256"] and ask["generation"] == 1
    assert ask["detail"]["chunks"] and all(len(c["doc_sha256"]) == 64 for c in ask["detail"]["chunks"])
    assert "question" not in ask["detail"] and len(ask["detail"]["question_sha256"]) == 64  # hashes only
    assert rows[0]["generation"] == 2 and rows[0]["user"]
    verified = _run(home, "audit", "verify")
    assert verified.exit_code == 0 and "intact: 5 rows" in verified.output


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
    conn.execute("UPDATE audit SET detail = '{\"i\":0}' WHERE id = 2")  # restored exactly: intact again
    assert _run(home, "audit", "verify").exit_code == 0
    conn.execute("DELETE FROM audit WHERE id = 2")
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "broken at row 3" in result.output
    conn.close()


def _rows(conn):
    return [list(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]


def test_cut_rebuilt_or_restored_logs_are_caught_by_the_signed_checkpoints(home, tmp_path):
    """What a valid chain alone cannot show: the last rows deleted, every row deleted, the chain rebuilt
    after an edit, an older copy of the database put back. Each contradicts a signed checkpoint."""
    import apsw

    from appliance.records import audit

    db = _three_rows(home)  # rows: 1 identity (the key created), then 2-4 test
    snapshot = tmp_path / "old.db"
    conn = apsw.Connection(str(db))
    with apsw.Connection(str(snapshot)) as copy:  # an older copy, taken now
        with copy.backup("main", conn, "main") as b:
            b.step()
    keep = _rows(conn)
    assert _run(home, "audit", "verify").exit_code == 0
    with Appliance(load_settings(home=home)) as app:
        app.audit("test", {"i": 3})  # row 5, checkpointed

    conn.execute("DELETE FROM audit WHERE id = 5")  # the last row cut: a valid chain of 4
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "row 5 to 5 are missing" in result.output.replace("rows", "row")

    conn.execute("DELETE FROM audit")  # everything
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "rows 1 to 5 are missing" in result.output

    # rebuilt: row 3 edited and every hash after it recomputed, so the chain itself is valid
    prev = audit.GENESIS
    for row in keep[:4] + [[5, "2026-01-01T00:00:00Z", "root", "test", None, None, '{"i":3}', "", "", None]]:
        entry = dict(zip(audit._COLUMNS, row, strict=True))
        if entry["id"] == 3:
            entry["detail"] = '{"i":"edited"}'
        entry["prev_hash"], entry["row_hash"] = prev, audit._row_hash(prev, entry)
        prev = entry["row_hash"]
        conn.execute(
            "INSERT INTO audit VALUES (:id, :time, :user, :action, :model_sha256, :generation, :detail, "
            ":prev_hash, :row_hash, :signature)",
            entry,
        )
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "broken" not in result.output and "was rewritten" in result.output
    conn.close()

    shutil.copy(snapshot, db)  # an older copy of the whole database put back
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "rows 5 to 5 are missing" in result.output

    checkpoints = home / audit.CHECKPOINTS  # the checkpoints forged by someone without the key
    lines = checkpoints.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["rows"] = 4
    checkpoints.write_text("\n".join(lines[:-1] + [json.dumps(forged)]) + "\n")
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "not signed by this appliance's key" in result.output
    checkpoints.unlink()  # or removed
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "no checkpoint file" in result.output


def test_verify_against_an_export_names_the_head_it_expects(home, tmp_path):
    import apsw

    db = _three_rows(home)
    out = tmp_path / "audit.jsonl"
    assert _run(home, "audit", "export", "--out", str(out)).exit_code == 0
    result = _run(home, "audit", "verify", "--against", str(out))
    assert result.exit_code == 0 and "matches the export" in result.output
    head = json.loads(out.read_text().splitlines()[3])["row_hash"]
    with apsw.Connection(str(db)) as conn:
        conn.execute("DELETE FROM audit WHERE id >= 4")
    (home / "audit" / "checkpoints").write_text("")  # even with the local anchors gone too
    result = _run(home, "audit", "verify", "--against", str(out))
    assert result.exit_code == 1 and "rows 4 to 4 are missing" in result.output and head[:16] in result.output


def test_a_missing_audit_table_is_a_clear_error_and_nothing_is_answered(home, tmp_path):
    import apsw

    db = _three_rows(home)
    with apsw.Connection(str(db)) as conn:
        conn.execute("DROP TABLE audit")
    asked = _run(home, "ask", "When is the help desk open?", "--max-tokens", "4")
    assert asked.exit_code == int(ExitCode.STORE) and "audit log cannot be written" in asked.output
    assert "Traceback" not in asked.output and not asked.stdout.strip()
    note = tmp_path / "n.md"
    note.write_text("# N\n\nText.")
    ingested = _run(home, "ingest", str(note))
    assert ingested.exit_code == int(ExitCode.STORE) and "audit" in ingested.output
    with Appliance(load_settings(home=home)) as app:
        assert app.documents() == []  # nothing stored unaudited
    verified = _run(home, "audit", "verify")
    assert verified.exit_code == int(ExitCode.STORE) and "audit table is missing" in verified.output


def test_export_is_checked_by_the_readme_script(home, tmp_path):
    _three_rows(home)
    out = tmp_path / "audit.jsonl"
    assert _run(home, "audit", "export", "--out", str(out)).exit_code == 0
    script = re.search(
        r"## Checking an audit export.*?```python\n(.*?)```", README.read_text(), re.DOTALL
    ).group(1)
    assert len(script.splitlines()) <= 20
    (tmp_path / "check.py").write_text(script)
    ok = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(out)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "4 rows, chain intact" in ok.stdout  # identity, then the three
    lines = out.read_text().splitlines()
    assert sum('"checkpoint"' in line for line in lines) >= 4
    cut = [line for line in lines if json.loads(line).get("id") != 4]  # the last row dropped, anchors kept
    (tmp_path / "cut.jsonl").write_text("\n".join(cut) + "\n")
    bad = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "cut.jsonl")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "rows cut or replaced" in bad.stderr
    row = json.loads(lines[1])
    row["user"] = "mallory"
    lines[1] = json.dumps(row)
    out.write_text("\n".join(lines) + "\n")
    bad = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(out)], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "chain broken at row 2" in bad.stderr


def test_two_processes_appending_at_once_keep_one_chain(home):
    script = (
        "import sys\nfrom appliance.app import Appliance\nfrom appliance.config import load_settings\n"
        "with Appliance(load_settings(home=sys.argv[1])) as app:\n"
        "    for i in range(40):\n        app.audit('load', {'writer': sys.argv[2], 'i': i})\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(home), w], stderr=subprocess.PIPE, text=True)
        for w in ("a", "b")
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    result = _run(home, "audit", "verify")
    assert result.exit_code == 0 and "intact: 81 rows" in result.output  # and the identity row


def test_a_batch_killed_midway_leaves_no_document_without_its_audit_row(home, tmp_path):
    """kill -9 during a batch: each stored document has its audit row (they commit together), and
    re-running adds the rest."""
    import os
    import signal
    import time

    import apsw

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        (folder / f"note{i:02d}.md").write_text(f"# Note {i}\n\n" + f"Paragraph {i} about staffing. " * 400)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "--home", str(home), "ingest", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = home / "appliance.db"
    deadline = time.monotonic() + 120
    stored = 0
    while stored < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            with apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY) as conn:
                stored = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        except apsw.Error:
            pass
    assert proc.poll() is None, "the batch finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Appliance(load_settings(home=home)) as app:
        docs = {d.id for d in app.documents()}
        audited = {r["detail"]["doc_id"] for r in app.audit_rows("ingest", limit=1000)}
        assert 3 <= len(docs) < 60 and docs == audited
        assert app.audit_verify().intact  # anchored after each document
    rerun = _run(home, "ingest", str(folder))
    assert rerun.exit_code == 0
    with Appliance(load_settings(home=home)) as app:
        assert len(app.documents()) == 60 == len(app.audit_rows("ingest", limit=1000))
        assert app.audit_verify().intact


def _forge_rows(db, count: int) -> None:
    """What someone who can write the database but not read the key can do: rows with a valid chain."""
    import apsw

    from appliance.records import audit

    with apsw.Connection(str(db)) as conn:
        for _ in range(count):
            last_id, prev = conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            row = {
                "id": last_id + 1,
                "time": "2026-01-01T00:00:00Z",
                "user": "alice",
                "action": "ask",
                "model_sha256": None,
                "generation": 1,
                "detail": '{"forged":true}',
                "prev_hash": prev,
            }
            row["row_hash"] = audit._row_hash(prev, row)
            conn.execute(
                "INSERT INTO audit(id, time, user, action, model_sha256, generation, detail, prev_hash, "
                "row_hash) VALUES (:id, :time, :user, :action, :model_sha256, :generation, :detail, "
                ":prev_hash, :row_hash)",
                row,
            )


def test_rows_the_appliance_did_not_write_are_reported_and_never_extended_or_anchored(home):
    """Forged rows with a valid chain after the last checkpoint once passed verify, and the service's next
    real row signed a checkpoint over them."""
    from appliance.errors import StoreError
    from appliance.records import audit

    db = _three_rows(home)
    checkpoints = home / audit.CHECKPOINTS
    _forge_rows(db, 2)
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1, result.output
    assert "2 row(s) after the newest checkpoint (row 4) carry no signature" in result.output
    assert "from row 5" in result.output
    anchored = checkpoints.read_text()
    with Appliance(load_settings(home=home)) as app:
        try:
            app.audit("test", {"i": "after the forgery"})
            raise AssertionError("a forged head was extended")
        except StoreError as exc:
            assert "head was not written by this appliance (row 6 carries no signature" in exc.message
        assert len(app.audit_rows(limit=100)) == 6  # nothing appended
    assert checkpoints.read_text() == anchored  # nothing anchored over the forged rows
    asked = _run(home, "ask", "When is the help desk open?", "--max-tokens", "4")
    assert asked.exit_code == int(ExitCode.STORE) and "not written by this appliance" in asked.output
    import apsw

    with apsw.Connection(str(db)) as conn:  # the administrator removes what verify named
        conn.execute("DELETE FROM audit WHERE id > 4")
    assert _run(home, "audit", "verify").exit_code == 0
    with Appliance(load_settings(home=home)) as app:
        app.audit("test", {"i": "resumed"})
        assert app.audit_verify().intact
    # A forged head carrying a real row's hash and signature, and a log cut back to an older signed head:
    # neither is extended.
    with apsw.Connection(str(db)) as conn:
        real = conn.execute("SELECT row_hash, signature FROM audit WHERE id = 3").fetchone()
        prev = conn.execute("SELECT row_hash FROM audit WHERE id = 5").fetchone()[0]
        conn.execute(
            "INSERT INTO audit VALUES (6, '2026-01-01T00:00:00Z', 'alice', 'ask', NULL, 1, '{}', ?, ?, ?)",
            (prev, *real),
        )
    with Appliance(load_settings(home=home)) as app, pytest.raises(StoreError, match="hash or its link"):
        app.audit("test", {"i": "after a copied signature"})
    with apsw.Connection(str(db)) as conn:
        conn.execute("DELETE FROM audit WHERE id >= 5")  # row 5 was checkpointed
    with Appliance(load_settings(home=home)) as app, pytest.raises(StoreError, match="rows were cut"):
        app.audit("test", {"i": "after a cut"})


def test_an_emptied_checkpoint_file_is_no_better_than_a_removed_one(home):
    from appliance.records import audit

    _three_rows(home)
    (home / audit.CHECKPOINTS).write_text("\n\n")
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1 and "no checkpoint file" in result.output


def test_a_replaced_public_key_does_not_vouch_for_its_own_checkpoints(home):
    """Someone without the key replaces identity/appliance.pub with their own and re-signs every
    checkpoint: the public key is checked against the private key and the log's record of it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.bundles import identity
    from appliance.records import audit

    _three_rows(home)
    theirs = Ed25519PrivateKey.generate()
    forger = identity.Identity(
        identity.key_id(theirs.public_key()),
        identity.public_pem(theirs.public_key()),
        home / "identity",
        theirs,
    )
    lines = (home / audit.CHECKPOINTS).read_text().splitlines()
    resigned = []
    for line in lines:
        cp = json.loads(line)
        resigned.append(
            json.dumps(
                {
                    **cp,
                    "key_id": forger.key_id,
                    "signature": forger.sign(audit._signed(cp["rows"], cp["head"], cp["time"])),
                },
                sort_keys=True,
            )
        )
    (home / audit.CHECKPOINTS).write_text("\n".join(resigned) + "\n")
    (home / "identity" / identity.PUBLIC).write_text(forger.public_pem)
    result = _run(home, "audit", "verify")
    assert result.exit_code == 1, result.output
    assert "not the public half of identity/appliance.key" in result.output
    assert "not the one audit row 1 recorded" in result.output
    # and where the private key cannot be read (an operator's view), the log's own record still catches it
    with Appliance(load_settings(home=home)) as app:
        entries = list(audit.rows(app.store.conn))
    verdict = audit.verify(entries, resigned, forger.public)
    assert not verdict.intact and any("audit row 1 recorded" in p for p in verdict.problems)
