"""Hostile documents: each is one IngestError naming the file, never a traceback that stops the batch."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from appliance.documents.readers import MAX_HEADING_DEPTH, read_document
from appliance.errors import IngestError

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"
LIMIT = 50_000_000


def _rewrite_member(src: Path, dst: Path, member: str, cut: int) -> Path:
    """A copy of a zip-based document with one member cut to its first `cut` bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, data[:cut] if item.filename == member else data)
    return dst


def test_a_csv_cell_past_the_field_limit_is_one_error(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text('code,title\n15-1252.00,"' + "x" * 300_000 + '"\n')
    with pytest.raises(IngestError, match="huge.csv: unreadable CSV"):
        read_document(path, LIMIT)


def test_truncated_xml_in_a_docx_or_xlsx_is_one_error(tmp_path):
    import openpyxl

    docx = _rewrite_member(
        CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx",
        tmp_path / "cut.docx",
        "word/document.xml",
        700,
    )
    with pytest.raises(IngestError, match="cut.docx: unreadable DOCX"):
        read_document(docx, LIMIT)
    book = openpyxl.Workbook()
    for i in range(50):
        book.active.append([f"15-12{i:02d}.00", f"Title {i}", "duties " * 20])
    book.save(tmp_path / "whole.xlsx")
    xlsx = _rewrite_member(tmp_path / "whole.xlsx", tmp_path / "cut.xlsx", "xl/worksheets/sheet1.xml", 900)
    with pytest.raises(IngestError, match="cut.xlsx: unreadable XLSX"):
        read_document(xlsx, LIMIT)


def test_a_heading_style_of_three_billion_levels_is_a_heading_not_gigabytes(tmp_path):
    import docx
    from docx.enum.style import WD_STYLE_TYPE

    document = docx.Document()
    document.styles.add_style("Heading 3000000000", WD_STYLE_TYPE.PARAGRAPH)
    for name in ("Heading 3000000000", "Heading 9"):
        document.add_paragraph(f"Styled {name}", style=name)
    document.add_paragraph("Body text under the headings.")
    document.save(tmp_path / "deep.docx")
    text = read_document(tmp_path / "deep.docx", LIMIT).text
    assert "# Styled Heading 3000000000" in text and len(text) < 200
    assert "#" * MAX_HEADING_DEPTH + " Styled Heading 9" in text and "#" * (MAX_HEADING_DEPTH + 1) not in text


def test_a_pdf_stream_that_inflates_past_pypdfs_limit_is_one_error(tmp_path):
    """A content stream that inflates to 120 MB from about 120 KB: one error for this file, never a
    traceback. (pypdf stops inflating at its 75 MB limit; its text extraction swallows the
    LimitReachedError and finds no text, so the PyPdfError catch in _read_pdf is not reached here.)"""
    import zlib

    from pypdf import PdfWriter
    from pypdf.generic import NameObject, NumberObject, StreamObject

    writer = PdfWriter()
    page = writer.add_blank_page(width=612, height=792)
    bomb = StreamObject()
    packer, chunk = zlib.compressobj(9), b"0 0 m " * 200_000
    bomb._data = b"".join(packer.compress(chunk) for _ in range(100)) + packer.flush()  # 120 MB from ~120 KB
    bomb[NameObject("/Filter")] = NameObject("/FlateDecode")
    bomb[NameObject("/Length")] = NumberObject(len(bomb._data))
    page[NameObject("/Contents")] = writer._add_object(bomb)
    writer.write(str(tmp_path / "bomb.pdf"))
    assert (tmp_path / "bomb.pdf").stat().st_size < 1_000_000
    with pytest.raises(IngestError, match="bomb.pdf: (unreadable PDF|the PDF has no extractable text)"):
        read_document(tmp_path / "bomb.pdf", LIMIT)


def test_one_hostile_file_in_a_batch_is_one_failure_and_the_rest_is_ingested(home, tmp_path):
    from appliance.app import Appliance
    from appliance.config import load_settings

    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "good.md").write_text("# Good\n\nA proposal paragraph about cloud landing zones.\n")
    (batch / "huge.csv").write_text('code,title\n15-1252.00,"' + "x" * 300_000 + '"\n')
    _rewrite_member(
        CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx", batch / "cut.docx", "word/document.xml", 700
    )
    (batch / "later.txt").write_text("Another good document, after the bad ones.\n")
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest([batch], "batch")
    assert sorted(Path(a["source"]).name for a in report.added) == ["good.md", "later.txt"]
    assert sorted(Path(f["source"]).name for f in report.failed) == ["cut.docx", "huge.csv"]


def _docx_with_body(path: Path, body_xml: bytes) -> Path:
    """A real DOCX (python-docx's own package) whose word/document.xml body is replaced."""
    import docx

    docx.Document().save(path.with_suffix(".tmp.docx"))
    with (
        zipfile.ZipFile(path.with_suffix(".tmp.docx")) as zin,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "word/document.xml":
                head = data[: data.index(b"<w:body>") + len(b"<w:body>")]
                data = head + body_xml + b"</w:body></w:document>"
            zout.writestr(item, data)
    path.with_suffix(".tmp.docx").unlink()
    return path


def test_a_docx_that_inflates_to_400_mb_is_refused_before_it_is_inflated(tmp_path):
    import tracemalloc

    text = b"<w:p><w:r><w:t>" + b"A" * 1_000_000 + b"</w:t></w:r></w:p>"
    bomb = _docx_with_body(tmp_path / "bomb.docx", text * 400)
    assert bomb.stat().st_size < 2_000_000
    tracemalloc.start()
    with pytest.raises(IngestError, match="bomb.docx: the DOCX would inflate to 401 MB"):
        read_document(bomb, LIMIT)
    assert tracemalloc.get_traced_memory()[1] < 20_000_000  # the peak: nothing inflated, no cap-sized buffer
    tracemalloc.stop()


def test_five_million_empty_paragraphs_are_counted_not_built(tmp_path):
    import time

    many = _docx_with_body(tmp_path / "many.docx", b"<w:p/>" * 5_000_000)
    start = time.perf_counter()
    with pytest.raises(IngestError, match="many.docx: more than 500000 paragraphs"):
        read_document(many, LIMIT)
    assert time.perf_counter() - start < 20


def test_one_xlsx_cell_at_xfd1048576_is_refused_from_the_sheet_xml(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Code", "Title"])
    book.active.append(["15-1252.00", "Software Developer"])
    book.active["XFD1048576"] = "far away"
    book.save(tmp_path / "far.xlsx")
    with pytest.raises(IngestError, match=r"far.xlsx: the first sheet spans 1048576 rows x 16384 columns"):
        read_document(far := tmp_path / "far.xlsx", LIMIT)
    assert far.stat().st_size < 10_000


def test_utf16_with_a_byte_order_mark_is_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("\ufeffStaffing note: the Program Manager is 11-9021.00.".encode("utf-16-le"))
    assert "11-9021.00" in read_document(path, LIMIT).text
    path.write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a lone surrogate after the mark
    with pytest.raises(IngestError, match="starts like UTF-16 but does not decode"):
        read_document(path, LIMIT)


def test_the_sandbox_bounds_what_a_parser_may_take(tmp_path):
    """What no reader-level cap foresees still ends as this file's error: a parse over the child's
    memory, one over its time; the next file parses in a fresh child."""
    from appliance.documents.sandbox import Sandbox

    good = CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx"
    rows = "code,title,duties\n" + "".join(
        f"15-{i:04d}.00,Title {i},{'word ' * 200}\n" for i in range(40_000)
    )
    (tmp_path / "wide.csv").write_text(rows)
    with Sandbox(memory_mb=256) as sandbox:
        with pytest.raises(IngestError, match="wide.csv: .*(256 MB|needs more than)"):
            sandbox.parse(tmp_path / "wide.csv", (tmp_path / "wide.csv").read_bytes())
        assert "Wave Plan" in sandbox.parse(good, good.read_bytes()).text
    slow = _docx_with_body(tmp_path / "slow.docx", b"<w:p><w:r><w:t>x</w:t></w:r></w:p>" * 400_000)
    with Sandbox(timeout_s=0.05) as sandbox:
        with pytest.raises(IngestError, match="slow.docx: parsing took longer than"):
            sandbox.parse(slow, slow.read_bytes())
        sandbox.timeout_s = 60
        assert "Wave Plan" in sandbox.parse(good, good.read_bytes()).text


def test_the_bytes_hashed_are_the_bytes_parsed(home, tmp_path):
    """A file rewritten in place while it is ingested: the sha256 recorded is always that of the text
    stored (hashing one read and parsing another mixed them in 8 of 63 ingests)."""
    import hashlib
    import threading

    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.documents.chunking import chunk_text

    path = tmp_path / "flip.md"
    versions = [(f"# Version {v}\n\n" + f"Version {v} text. " * 1500).encode() for v in "AB"]
    path.write_bytes(versions[0])
    expected = {
        hashlib.sha256(v).hexdigest(): [c.text for c in chunk_text(v.decode(), 1200)] for v in versions
    }
    stop = threading.Event()

    def flip():
        fd = os.open(path, os.O_WRONLY)
        n = 0
        while not stop.is_set():
            os.pwrite(fd, versions[n % 2], 0)  # same length, in place: a read may see either, or both
            n += 1
        os.close(fd)

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        with Appliance(load_settings(home=home)) as app:
            for i in range(15):
                app.ingest([path], f"flip{i}")
            checked = 0
            for doc in app.documents():
                stored = [
                    r[0]
                    for r in app.store.conn.execute(
                        "SELECT text FROM chunks WHERE document_id = ? ORDER BY position", (doc.id,)
                    )
                ]
                if doc.sha256 in expected:
                    assert stored == expected[doc.sha256], doc
                    checked += 1
                else:  # a torn read: its own hash, its own text, so neither version's text under a known hash
                    assert not any(stored == e for e in expected.values())
    finally:
        stop.set()
        writer.join()
    assert checked >= 3


def test_an_unreadable_folder_is_reported(tmp_path):
    """Run as another user (root reads every folder): a subfolder they cannot open is named, not skipped
    without a word."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    top = Path(tempfile.mkdtemp(prefix="appliance-walk-"))
    try:
        top.chmod(0o755)
        (top / "open.md").write_text("# Open\n\nx")
        (top / "locked").mkdir(mode=0o700)
        (top / "locked" / "a.md").write_text("# A\n\nx")
        script = (
            "import json, sys\nfrom pathlib import Path\nfrom appliance.documents.readers import expand_paths\n"
            "files, refused = expand_paths([Path(sys.argv[1])])\n"
            "print(json.dumps([[str(f) for f in files], refused]))"
        )
        out = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                script,
                str(top),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        files, refused = json.loads(out.stdout)
    finally:
        shutil.rmtree(top)
    assert files == [str(top / "open.md")]
    assert refused and "locked: folder not read (Permission denied)" in refused[0]["error"]


def test_file_names_cannot_drive_the_terminal_or_forge_lines(home, tmp_path):
    """A name holding an escape sequence (clear screen) and a newline with a fake FAILED line: every
    CLI command that prints it shows it inert, on its own line."""
    from click.testing import CliRunner

    from appliance.cli import cli

    evil = tmp_path / "q3\x1b[2J\x1b]0;owned\x07\nFAILED    everything else.md"
    evil.write_text("# Quarterly report\n\nThe quarterly staffing report is due on the fifth.")
    runner = CliRunner()
    outputs = [
        runner.invoke(cli, ["--home", str(home), *args])
        for args in (
            ["ingest", str(evil)],
            ["docs", "list"],
            ["search", "quarterly staffing report"],
            ["lookup", "q3"],
        )
    ]
    assert outputs[0].exit_code == 0, outputs[0].output
    for result in outputs:
        text = result.output
        assert "\x1b" not in text and "\x07" not in text
        assert not any(line.startswith("FAILED") for line in text.splitlines()), text
    assert "\\nFAILED" in outputs[1].output  # the newline shown, not obeyed


def test_a_pdf_whose_stream_inflates_to_84_mb_is_one_error(tmp_path):
    """120 KB on disk, 84 MB of content stream: pypdf's LimitReachedError (not a PdfReadError) is this
    file's error."""
    import zlib

    content = zlib.compress(b"BT /F1 12 Tf 72 720 Td " + b"(A) Tj " * 12_000_000 + b"ET", 9)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    pdf, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(pdf)
    pdf += b"xref\n0 6\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    pdf += b"trailer\n<< /Size 6 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    (tmp_path / "bomb.pdf").write_bytes(bytes(pdf))
    assert len(pdf) < 200_000
    with pytest.raises(IngestError, match="bomb.pdf: unreadable PDF \\(Limit reached while decompressing"):
        read_document(tmp_path / "bomb.pdf", LIMIT)


def test_an_rfp_to_draft_is_parsed_in_the_sandbox_too(home, tmp_path):
    """A drafted RFP is an upload like any other: parsed in the child under parse_memory_mb, so one that
    needs more is that RFP's error, not the service's memory."""
    from appliance.app import Appliance
    from appliance.config import load_settings

    rfp = tmp_path / "rfp.csv"
    rfp.write_text(
        "code,title,duties\n" + "".join(f"15-{i:04d}.00,Title {i},{'word ' * 200}\n" for i in range(40_000))
    )
    with (
        Appliance(load_settings(home=home, parse_memory_mb=256, max_file_mb=60)) as app,
        pytest.raises(IngestError, match="rfp.csv: parsing needs more than 256 MB"),
    ):
        app.draft(rfp, generator=object())  # refused before any generation


def test_a_small_csv_cannot_amplify_into_the_database(home, tmp_path):
    """The re-probe's 1.3 MB CSV (512 column names of 2,000 characters, sparse rows) took the service
    from 422 to 2,151 MB and the database from 72 to 693 MB. Column names are capped, empty cells are
    not stored, and a table's stored text is bounded by its file's size."""
    from appliance.app import Appliance
    from appliance.config import load_settings

    names = [f"c{i:03d}" + "h" * 1996 for i in range(512)]
    (tmp_path / "wide-names.csv").write_text(
        ",".join(names)
        + "\n"
        + "".join("," * (i % 512) + "15-1252.00" + "," * (511 - i % 512) + "\n" for i in range(240))
    )
    assert (tmp_path / "wide-names.csv").stat().st_size > 1_000_000
    names = [f"column {i:03d} " + "n" * 140 for i in range(100)]  # each under the cap, all repeated per row
    (tmp_path / "dense.csv").write_text(",".join(names) + "\n" + (",".join("x" * 100) + "\n") * 2000)
    sparse = (
        "code,title,notes,"
        + ",".join(f"extra{i}" for i in range(400))
        + "\n"
        + "".join(f"15-{i:04d}.00,Analyst {i},,{',' * 399}\n" for i in range(50))
    )
    (tmp_path / "sparse.csv").write_text(sparse)
    db = home / "appliance.db"
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest(
            [tmp_path / "wide-names.csv", tmp_path / "dense.csv", tmp_path / "sparse.csv"], "reference"
        )
        errors = {Path(f["source"]).name: f["error"] for f in report.failed}
        assert "column 1's name is 2000 characters (at most 200)" in errors["wide-names.csv"]
        assert "at most 16 times the file" in errors["dense.csv"]
        assert [Path(a["source"]).name for a in report.added] == ["sparse.csv"]
        stored = [json.loads(d) for (d,) in app.store.conn.execute("SELECT data FROM ref_rows")]
        assert len(stored) == 50 and all(set(d) == {"code", "title"} for d in stored)  # no empty cells kept
        assert app.lookup("15-0007.00")[0]["title"] == "Analyst 7"
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            assert Path(f"{db}{suffix}").stat().st_size < 20_000_000


def test_a_table_row_too_large_to_store_is_refused(tmp_path):
    names = ",".join(f"column {i:03d} " + "n" * 180 for i in range(200))
    (tmp_path / "fat.csv").write_text(names + "\n" + ",".join("y" * 200) + "\n")
    with pytest.raises(IngestError, match="fat.csv: row 2 holds .* characters with its column names"):
        read_document(tmp_path / "fat.csv", LIMIT)


def test_an_xlsx_is_measured_on_the_sheet_that_is_parsed(tmp_path):
    """The first sheet of the workbook stored as xl/worksheets/sheet2.xml: the size was once measured on
    sheet1.xml (another sheet), and 190,000 rows were silently cut to 1."""
    import openpyxl

    book = openpyxl.Workbook()
    big = book.active
    big.title = "Big"
    big.append(["Code", "Title"])
    for i in range(30):
        big.append([f"15-{i:04d}.00", f"Analyst {i}"])
    small = book.create_sheet("Small")
    small.append(["Code", "Title"])
    small.append(["99-0000.00", "Other"])
    book.save(tmp_path / "plain.xlsx")
    swap = {
        "xl/worksheets/sheet1.xml": "xl/worksheets/sheet2.xml",
        "xl/worksheets/sheet2.xml": "xl/worksheets/sheet1.xml",
    }
    with (
        zipfile.ZipFile(tmp_path / "plain.xlsx") as zin,
        zipfile.ZipFile(tmp_path / "swapped.xlsx", "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "xl/_rels/workbook.xml.rels":
                data = (
                    data.replace(b"sheet1.xml", b"sheetX.xml")
                    .replace(b"sheet2.xml", b"sheet1.xml")
                    .replace(b"sheetX.xml", b"sheet2.xml")
                )
            zout.writestr(swap.get(item.filename, item.filename), data)
    table = read_document(tmp_path / "swapped.xlsx", LIMIT).table
    assert len(table.rows) == 30 and table.rows[-1] == {"Code": "15-0029.00", "Title": "Analyst 29"}
