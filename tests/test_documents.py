"""Reading and chunking documents."""

from pathlib import Path

import pytest

from appliance.documents.chunking import chunk_text
from appliance.documents.readers import expand_paths, parse_document, read_document
from appliance.errors import IngestError
from appliance.terminal import clean_text

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


def test_chunks_follow_headings_and_stay_under_the_limit():
    text = (
        "# Title\n\nIntro para.\n\n## Section A\n\n"
        + ("Sentence about staffing. " * 120)
        + "\n\n## Section B\n\nShort."
    )
    chunks = chunk_text(text, 500)
    assert all(len(c.text) <= 500 for c in chunks)
    assert [c.heading for c in chunks][0] == "Title"
    assert {c.heading for c in chunks} == {"Title", "Section A", "Section B"}
    assert chunks[-1].heading == "Section B" and chunks[-1].text == "Short."
    assert [c.position for c in chunks] == list(range(len(chunks)))


def test_numbered_requirement_is_not_mistaken_for_a_heading():
    chunks = chunk_text(
        "C.2 Requirements\n\nC.2.1 The contractor shall deliver a plan.\n\nC.2.2 The contractor "
        "shall report monthly.",
        1200,
    )
    assert len(chunks) == 1 and chunks[0].heading == "C.2 Requirements"
    assert "C.2.1" in chunks[0].text and "C.2.2" in chunks[0].text


def test_escape_sequences_and_controls_are_stripped():
    dirty = "ok\x1b[31mred\x1b[0m \x1b]0;title\x07bell\x00nul\u202eevil\r\nnext"
    assert clean_text(dirty) == "okred bellnulevil\nnext"


def test_reference_table_rows_and_pdf_docx_text():
    table = read_document(CORPUS / "reference" / "labor_categories.csv", 10**8).table
    assert table.columns == ["code", "title", "duties", "education", "years"]
    assert len(table.rows) >= 40
    pdf = read_document(CORPUS / "rfps" / "RFP-2026-EPA-data-platform.pdf", 10**8)
    assert "C.2.1" in pdf.text and pdf.kind == "pdf"
    docx = read_document(CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx", 10**8)
    assert "# Meridian Ridge Systems" in docx.text and "## Wave Plan" in docx.text


def test_windows_1252_text_is_read(tmp_path):
    path = tmp_path / "legacy.txt"
    path.write_bytes("Résumé of the café contract – phase 2".encode("cp1252"))
    assert read_document(path, 10**6).text == "Résumé of the café contract – phase 2"


def test_unsupported_type_names_the_supported_ones(tmp_path):
    path = tmp_path / "slides.pptx"
    path.write_bytes(b"PK")
    with pytest.raises(IngestError, match="supported: .csv, .docx"):
        read_document(path, 10**6)


def test_xlsx_reference_table(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Code", "Title", "Years"])
    sheet.append(["15-1299.08", "Computer Systems Engineer", 7])
    sheet.append([None, None, None])  # blank rows are dropped
    sheet.append(["13-1161.00", "Business Analyst", 3])
    book.save(tmp_path / "lcats.xlsx")
    doc = read_document(tmp_path / "lcats.xlsx", 10**6)
    assert doc.kind == "xlsx" and doc.table.columns == ["Code", "Title", "Years"]
    assert doc.table.rows[1] == {"Code": "13-1161.00", "Title": "Business Analyst", "Years": "3"}


def test_a_folder_hands_over_what_is_in_it_not_what_its_links_point_to(tmp_path):
    """A link inside an ingested folder that leads out of it (to /etc/shadow, to the appliance's key) is
    reported and never read; a link to a file inside the folder is an ordinary file."""
    folder, outside = tmp_path / "drop", tmp_path / "private"
    folder.mkdir()
    outside.mkdir()
    (folder / "notes.md").write_text("# Notes\n\nOur own text.\n")
    (outside / "secret.txt").write_text("not for this folder")
    (folder / "again.md").symlink_to(folder / "notes.md")
    (folder / "shadow.txt").symlink_to("/etc/shadow")
    (folder / "key.txt").symlink_to(outside / "secret.txt")
    (folder / "more").symlink_to(outside, target_is_directory=True)
    files, refused = expand_paths([folder])
    assert sorted(p.name for p in files) == ["again.md", "notes.md"]
    assert {Path(r["source"]).name for r in refused} == {"shadow.txt", "key.txt", "more"}
    assert all("outside" in r["error"] and "not followed" in r["error"] for r in refused)
    # named on its own, a file is the caller's choice (read with the caller's permissions)
    assert expand_paths([outside / "secret.txt"]) == ([outside / "secret.txt"], [])


def test_an_rfp_docx_keeps_its_requirement_table_under_its_heading(tmp_path):
    """Word RFPs put requirements in tables: read in document order, a table's rows sit under the
    heading above them, so each requirement keeps its section."""
    import docx

    from appliance.drafting.draft import parse_rfp

    d = docx.Document()
    d.add_heading("C.3 Technical Requirements", 1)
    d.add_paragraph("The requirements below apply to every phase of the task order.")
    table = d.add_table(rows=3, cols=2)
    for row, (ident, text) in zip(
        table.rows,
        [
            ("ID", "Requirement"),
            ("C.3.1", "The contractor shall migrate all case records."),
            ("C.3.2", "The contractor shall deliver monthly status reports."),
        ],
        strict=True,
    ):
        row.cells[0].text, row.cells[1].text = ident, text
    d.add_heading("C.4 Staffing", 1)
    d.add_paragraph("The contractor shall provide a Cloud Architect for the migration.")
    path = tmp_path / "rfp.docx"
    d.save(path)

    text = read_document(path, 10**8).text
    order = [
        text.index(s)
        for s in (
            "# C.3 Technical Requirements",
            "apply to every phase",
            "C.3.1",
            "C.3.2",
            "# C.4 Staffing",
            "Cloud Architect",
        )
    ]
    assert order == sorted(order), text
    _, shredded = parse_rfp(path, 10**8)
    where = {r.text: (r.id, r.section, r.heading) for r in shredded.requirements}
    assert where["The contractor shall migrate all case records."] == (
        "C.3.1",
        "C",
        "C.3 Technical Requirements",
    )
    assert where["The contractor shall deliver monthly status reports."] == (
        "C.3.2",
        "C",
        "C.3 Technical Requirements",
    )
    assert where["The contractor shall provide a Cloud Architect for the migration."] == (
        "C.u1",
        "C",
        "C.4 Staffing",
    )


def test_pages_survive_the_sandbox():
    """The page offsets the parser child reports reach the caller, checked: a PDF's pages, a DOCX's
    page breaks."""
    from appliance.documents.sandbox import Sandbox

    shred = Path(__file__).resolve().parent.parent / "bench" / "shred" / "tuned"
    with Sandbox() as sandbox:
        for name in ("rfp01.pdf", "rfp01.docx"):
            path = shred / name
            doc = sandbox.parse(path, path.read_bytes())
            assert doc.pages == parse_document(path, path.read_bytes()).pages and len(doc.pages) == 9
            assert doc.page_at(doc.text.index("SECTION M")) == 9


def test_a_parser_childs_page_offsets_are_checked():
    """The sandboxed child's answer is not trusted: malformed offsets are this file's error, and one
    page or none is no pages."""
    from appliance.documents.sandbox import checked_pages

    assert checked_pages({"text": "abc def", "pages": [0, 4]}, Path("x.pdf")) == [0, 4]
    assert checked_pages({"text": "abc", "pages": [0]}, Path("x.pdf")) == []
    for bad in (
        {"text": "abc", "pages": [0, 99]},
        {"text": "abc", "pages": [0, True]},
        {"text": "abc", "pages": [2, 1]},
        {"text": "abc", "pages": [1, 2]},
        {"text": 7, "pages": [0, 1]},
        {"text": "abc", "pages": "0,1"},
    ):
        with pytest.raises(IngestError, match="malformed page offsets"):
            checked_pages(bad, Path("x.pdf"))


def test_page_breaks_switched_off_are_not_breaks_and_too_many_pages_are_refused(tmp_path):
    import docx

    from appliance.documents.readers import MAX_PAGES

    d = docx.Document()
    d.add_paragraph("First.")
    d.add_paragraph("Second.").paragraph_format.page_break_before = False  # written as val="0"
    d.add_paragraph("Third.").paragraph_format.page_break_before = True
    d.add_paragraph("Fourth.")
    d.save(tmp_path / "x.docx")
    doc = read_document(tmp_path / "x.docx", 10**8)
    assert [doc.page_at(doc.text.index(w)) for w in ("First", "Second", "Third", "Fourth")] == [1, 1, 2, 2]
    (tmp_path / "many.txt").write_text("x\f" * (MAX_PAGES + 1))
    with pytest.raises(IngestError, match="pages"):
        read_document(tmp_path / "many.txt", 10**8)
