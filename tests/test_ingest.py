"""Ingest: every supported format, bad files reported and skipped, nothing lost, unchanged files skipped."""

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from appliance.app import Appliance
from appliance.cli import cli
from appliance.config import load_settings
from appliance.errors import ExitCode


def _bad_files(tmp_path, scanned_pdf):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.pdf").write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01\x02")
    (bad / "empty.md").write_bytes(b"")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 64)
    with open(bad / "huge.txt", "w") as fh:  # 50 MB: over the default 25 MB limit
        line = "The contractor shall provide monthly status reports. " * 20 + "\n"
        while fh.tell() < 50_000_000:
            fh.write(line)
    shutil.copyfile(scanned_pdf, bad / "scanned.pdf")
    (bad / "good.md").write_text("# Fine\n\nA perfectly readable note about 15-9999.00 staffing.\n")
    return bad


def test_bad_files_are_reported_and_the_rest_ingested(home, tmp_path, scanned_pdf):
    bad = _bad_files(tmp_path, scanned_pdf)
    result = CliRunner().invoke(cli, ["--home", str(home), "ingest", str(bad), "--json"])
    assert result.exit_code == ExitCode.INGEST
    report = json.loads(result.stdout)
    errors = {item["source"].rsplit("/", 1)[-1]: item["error"] for item in report["failed"]}
    assert set(errors) == {"broken.pdf", "empty.md", "binary.txt", "huge.txt", "scanned.pdf"}
    assert "unreadable PDF" in errors["broken.pdf"]
    assert "empty file" in errors["empty.md"]
    assert "binary content" in errors["binary.txt"]
    assert "over the 25 MB limit" in errors["huge.txt"] and "APPLIANCE_MAX_FILE_MB" in errors["huge.txt"]
    assert "no extractable text" in errors["scanned.pdf"] and "OCR" in errors["scanned.pdf"]
    assert [a["source"].rsplit("/", 1)[-1] for a in report["added"]] == ["good.md"]
    with Appliance(load_settings(home=home)) as app:
        hits = app.search("15-9999.00")
        assert hits and "15-9999.00" in hits[0].text


def test_every_demo_format_is_ingested_with_chunks(home, corpus_copy):
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest([corpus_copy], "all")
        assert report.failed == []
        kinds = {a["kind"] for a in report.added}
        assert {"md", "txt", "docx", "pdf", "csv"} <= kinds
        assert all(a["chunks"] >= 1 for a in report.added)
        csv_doc = next(a for a in report.added if a["kind"] == "csv")
        assert csv_doc["chunks"] >= 40  # one chunk per labor category row
        # the DOCX headings survive as chunk headings
        docs = {d.source.rsplit("/", 1)[-1]: d for d in app.store.list_documents()}
        noaa = docs["2023-NOAA-cloud-migration.docx"]
        headings = [
            r[0]
            for r in app.store.conn.execute(
                "SELECT heading FROM chunks WHERE document_id = ? ORDER BY position", (noaa.id,)
            )
        ]
        assert "Wave Plan" in headings


def test_reingest_unchanged_is_a_noop_and_edit_replaces(home, tmp_path):
    note = tmp_path / "note.md"
    note.write_text("# Transition\n\nTransition-in takes 45 days.\n")
    with Appliance(load_settings(home=home)) as app:
        first = app.ingest([note], "notes")
        again = app.ingest([note], "notes")
        assert len(first.added) == 1 and again.added == [] and again.unchanged == [str(note.resolve())]
        note.write_text("# Transition\n\nTransition-in takes 30 days.\n")
        edited = app.ingest([note], "notes")
        assert edited.added[0]["replaced"] == [first.added[0]["doc_id"]]
        docs = app.store.list_documents("notes")
        assert len(docs) == 1
        assert "30 days" in app.search("transition days", collection="notes")[0].text
        assert all("45 days" not in h.text for h in app.search("45 days", k=20))


def test_docs_list_and_remove(home, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Help desk hours are 7am to 7pm Eastern.")
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "ingest", str(note)]).exit_code == 0
    listed = json.loads(runner.invoke(cli, ["--home", str(home), "docs", "list", "--json"]).stdout)
    assert len(listed["documents"]) == 1 and listed["documents"][0]["chunks"] == 1
    doc_id = listed["documents"][0]["id"]
    assert runner.invoke(cli, ["--home", str(home), "docs", "remove", str(doc_id)]).exit_code == 0
    assert (
        json.loads(runner.invoke(cli, ["--home", str(home), "docs", "list", "--json"]).stdout)["documents"]
        == []
    )
    with Appliance(load_settings(home=home)) as app:
        assert app.search("help desk hours") == []
    missing = runner.invoke(cli, ["--home", str(home), "docs", "remove", str(doc_id)])
    assert missing.exit_code == ExitCode.NOT_FOUND and "docs list" in missing.output


def test_committed_ingest_survives_a_killed_process(home, tmp_path):
    import subprocess
    import sys

    note = tmp_path / "kill.md"
    note.write_text("# Kill test\n\nThe escrow account is 7731.\n")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from appliance.app import Appliance\n"
        "from appliance.config import load_settings\n"
        "app = Appliance(load_settings(home=sys.argv[1]))\n"
        "app.ingest([Path(sys.argv[2])], 'default')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(home), str(note)], capture_output=True, timeout=120
    )
    assert proc.returncode == -9
    with Appliance(load_settings(home=home)) as app:
        assert [d.title for d in app.store.list_documents()] == ["Kill test"]
        assert "7731" in app.search("escrow account")[0].text


def test_xlsx_rows_are_looked_up_by_code(home, tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["LCAT Code", "Labor Category", "Education"])
    book.active.append(["15-1299.10", "Quantum Network Engineer", "PhD"])
    book.active.append(["15-1299.11", "Satellite Link Analyst", "BS"])
    book.save(tmp_path / "extra.xlsx")
    with Appliance(load_settings(home=home)) as app:
        assert app.ingest([tmp_path / "extra.xlsx"], "reference").failed == []
        rows = app.store.conn.execute("SELECT code, title FROM ref_rows ORDER BY code").fetchall()
        assert rows == [("15-1299.10", "Quantum Network Engineer"), ("15-1299.11", "Satellite Link Analyst")]
        hit = app.search("15-1299.11")[0]
        assert hit.exact and "Satellite Link Analyst" in hit.text


def test_a_batch_that_adds_nothing_creates_no_collection_and_duplicates_are_skipped(home, tmp_path):
    (tmp_path / "a.md").write_text("# Same\n\nIdentical content.")
    (tmp_path / "b.md").write_text("# Same\n\nIdentical content.")
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest([tmp_path / "missing.md"], "ghost")
        assert report.added == [] and len(report.failed) == 1
        assert "ghost" not in {c["name"] for c in app.store.collection_stats()}
        report = app.ingest([tmp_path / "a.md", tmp_path / "b.md"], "dups")
        assert len(report.added) == 1 and report.unchanged == []
        assert [(d["source"], d["same_as"]) for d in report.duplicates] == [
            (str((tmp_path / "b.md").resolve()), str((tmp_path / "a.md").resolve()))
        ]


def test_a_file_edited_to_equal_another_drops_its_old_text(home, tmp_path):
    """b.md edited so that its text is a.md's: its old text must not go on being served under its name."""
    (tmp_path / "a.md").write_text("# Alpha\n\nThe original alpha text.")
    (tmp_path / "b.md").write_text("# Beta\n\nThe beta text says the code is 11-1111.11.")
    with Appliance(load_settings(home=home)) as app:
        assert len(app.ingest([tmp_path], "edits").added) == 2
        (tmp_path / "b.md").write_text((tmp_path / "a.md").read_text())
        report = app.ingest([tmp_path / "b.md"], "edits")
        assert report.unchanged == [] and report.duplicates[0]["removed"]
        docs = app.store.list_documents("edits")
        assert [Path(d.source).name for d in docs] == ["a.md"]
        assert not any("11-1111.11" in h.text for h in app.search("beta text code", collection="edits"))
        removed = app.audit_rows("remove", limit=1)[0]["detail"]
        assert removed["reason"] == "duplicate" and removed["source"].endswith("b.md")
        assert app.ingest([tmp_path / "b.md"], "edits").duplicates  # still a duplicate, nothing removed twice


def test_a_long_table_shows_its_progress_moving(home, tmp_path, capsys):
    """A table's embedding is reported per batch, and the CLI's line shows the count move (it once
    printed "1100 chunks)" for every batch: the item held a '/', and only the name after it was shown)."""
    from appliance.cli import _Progress

    rows = "code,title\n" + "".join(f"15-{i:04d}.00,Role {i}\n" for i in range(1100))
    (tmp_path / "big.csv").write_text(rows)
    seen = []
    show = _Progress("ingesting")
    with Appliance(load_settings(home=home)) as app:
        app.ingest(
            [tmp_path / "big.csv"],
            "big",
            progress=lambda item, done, total: (seen.append(item), show(item, done, total)),
        )
    assert any(item.endswith("big.csv (chunk 512 of 1100)") for item in seen)
    lines = [line for line in capsys.readouterr().err.splitlines() if "chunk" in line]
    assert lines == [f"ingesting 0/1 big.csv (chunk {n} of 1100)" for n in (512, 1024, 1100)]


def test_a_link_loop_in_a_folder_is_refused_and_the_rest_ingested(home, tmp_path):
    """A folder holding links that lead nowhere (two files linked to each other, a folder linked to
    itself, a dangling link) once crashed `appliance ingest` with nothing ingested."""
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "notes.md").write_text("# Notes\n\nThe loop must not stop this note from being read.\n")
    (folder / "a.md").symlink_to(folder / "b.md")
    (folder / "b.md").symlink_to(folder / "a.md")
    (folder / "self").symlink_to(folder / "self")
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    result = CliRunner().invoke(cli, ["--home", str(home), "ingest", str(folder), "--json"])
    assert result.exit_code == ExitCode.INGEST, result.output
    report = json.loads(result.stdout)
    assert [Path(a["source"]).name for a in report["added"]] == ["notes.md"]
    refused = {Path(f["source"]).name: f["error"] for f in report["failed"]}
    assert set(refused) == {"a.md", "b.md", "self", "gone.txt"}
    assert all("leads nowhere" in e and "not followed" in e for e in refused.values())
    rows = json.loads(CliRunner().invoke(cli, ["--home", str(home), "audit", "list", "--json"]).stdout)[
        "rows"
    ]
    assert rows[0]["action"] == "ingest_refused" and rows[0]["detail"]["files"] == 4  # refusals are on record


def test_every_file_of_a_folder_is_accounted_for(home, tmp_path):
    """A folder with slides, images, an old Word file and a hidden note: each file not read is listed
    with its reason, in the output, the JSON and the audit row (they were once left out without a word)."""
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    (folder / "proposal.md").write_text("# Proposal\n\nWe delivered the records system on time.\n")
    for name in ("deck.pptx", "scan.png", "logo.svg", "sub/old.doc"):
        (folder / name).write_bytes(b"\x00binary")
    (folder / ".draft.md").write_text("# hidden\n")
    result = CliRunner().invoke(cli, ["--home", str(home), "ingest", str(folder)])
    assert result.exit_code == 0, result.output
    assert "1 added, 0 unchanged, 0 duplicates, 0 failed, 5 skipped" in result.output
    assert "scan.png: not a type read (.png)" in result.output
    assert ".draft.md: a hidden file: not read" in result.output
    report = json.loads(
        CliRunner().invoke(cli, ["--home", str(home), "ingest", str(folder), "--json"]).stdout
    )
    assert sorted(Path(s["source"]).name for s in report["skipped"]) == [
        ".draft.md",
        "deck.pptx",
        "logo.svg",
        "old.doc",
        "scan.png",
    ]
    rows = json.loads(CliRunner().invoke(cli, ["--home", str(home), "audit", "list", "--json"]).stdout)[
        "rows"
    ]
    skipped = next(r for r in rows if r["action"] == "ingest_skipped")
    assert skipped["detail"]["files"] == 5 and {"source", "reason"} <= set(skipped["detail"]["skipped"][0])
