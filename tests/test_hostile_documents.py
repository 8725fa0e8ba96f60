"""Hostile documents: each is one IngestError naming the file, never a traceback that stops the batch."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from appliance.documents import MAX_HEADING_DEPTH, read_document
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
    path.write_text("code,title\n15-1252.00,\"" + "x" * 300_000 + "\"\n")
    with pytest.raises(IngestError, match="huge.csv: unreadable CSV"):
        read_document(path, LIMIT)


def test_truncated_xml_in_a_docx_or_xlsx_is_one_error(tmp_path):
    import openpyxl

    docx = _rewrite_member(CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx", tmp_path / "cut.docx",
                           "word/document.xml", 700)
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
    (batch / "huge.csv").write_text("code,title\n15-1252.00,\"" + "x" * 300_000 + "\"\n")
    _rewrite_member(CORPUS / "proposals" / "2023-NOAA-cloud-migration.docx", batch / "cut.docx",
                    "word/document.xml", 700)
    (batch / "later.txt").write_text("Another good document, after the bad ones.\n")
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest([batch], "batch")
    assert sorted(Path(a["source"]).name for a in report.added) == ["good.md", "later.txt"]
    assert sorted(Path(f["source"]).name for f in report.failed) == ["cut.docx", "huge.csv"]
