"""Render the RFP sources of bench/shred (Markdown, pages split by `---page---` lines) as the three
files a proposal team receives: Markdown text with "Page N of M" footers, a DOCX with page breaks,
Word lists and tables, and a PDF with one page per source page (run by hand; outputs are committed).

python bench/shred/render.py    # needs python-docx and fpdf2 (the [dev] extra) and DejaVu Sans
"""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
FONT = Path("/usr/share/fonts/truetype/dejavu")
PAGE = "---page---"


def pages(src: Path) -> list[str]:
    return [p.strip() for p in src.read_text().split(f"\n{PAGE}\n")]


def blocks(page: str):
    """(kind, level, content) for headings, paragraphs, bullets and tables (rows of cells)."""
    lines = page.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            yield "table", 0, rows
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            yield "heading", level, line.lstrip("#").strip()
            i += 1
        elif line.startswith("- "):
            yield "bullet", 0, line[2:].strip()
            i += 1
        else:
            para = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||- )", lines[i]):
                para.append(lines[i].strip())
                i += 1
            yield "para", 0, " ".join(para)


def to_markdown(src: Path, dst: Path) -> None:
    texts = pages(src)
    out = [f"{text}\n\nPage {n} of {len(texts)}\n" for n, text in enumerate(texts, start=1)]
    dst.write_text("\n".join(out))


def to_docx(src: Path, dst: Path) -> None:
    import docx

    document = docx.Document()
    document.core_properties.author = "bench/shred (fictional)"
    for n, page in enumerate(pages(src)):
        if n:
            document.add_page_break()
        for kind, level, content in blocks(page):
            if kind == "heading":
                document.add_heading(content, level=min(level, 3))
            elif kind == "bullet":
                document.add_paragraph(content, style="List Bullet")
            elif kind == "para":
                document.add_paragraph(content)
            else:
                table = document.add_table(rows=len(content), cols=len(content[0]))
                table.style = "Table Grid"
                for r, cells in enumerate(content):
                    for c, value in enumerate(cells[: len(content[0])]):
                        table.cell(r, c).text = value
    document.save(dst)


def _pdf():
    from fpdf import FPDF

    pdf = FPDF(format="Letter")
    pdf.set_creation_date(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    pdf.add_font("DejaVu", "", str(FONT / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(FONT / "DejaVuSans-Bold.ttf"))
    pdf.set_auto_page_break(False)
    return pdf


def _page(pdf, page: str, height: float) -> float:
    """One source page on one PDF page (Letter, or taller where the page's text needs it); returns
    where its text ended."""
    pdf.add_page(format=(215.9, height))
    for kind, level, content in blocks(page):
        if kind == "table":
            pdf.set_font("DejaVu", "", 8)
            with pdf.table(line_height=4) as table:
                for cells in content:
                    row = table.row()
                    for value in cells:
                        row.cell(value)
            pdf.ln(2)
            continue
        size = {1: 13, 2: 11}.get(level, 10) if kind == "heading" else 9
        pdf.set_font("DejaVu", "B" if kind == "heading" else "", size)
        text = f"\u2022 {content}" if kind == "bullet" else content
        pdf.multi_cell(0, 4.5, text, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1.5)
    return pdf.get_y()


def to_pdf(src: Path, dst: Path) -> int:
    texts = pages(src)
    pdf = _pdf()
    for n, page in enumerate(texts, start=1):
        needed = _page(_pdf(), page, 5000)  # measured on a page long enough for anything
        _page(pdf, page, max(279.4, needed + 25))
        pdf.set_y(-12)
        pdf.set_font("DejaVu", "", 8)
        pdf.cell(0, 5, f"Page {n} of {len(texts)}", align="C")
    pdf.output(str(dst))
    return pdf.pages_count


if __name__ == "__main__":
    for src in sorted(HERE.glob("*/rfp*.md")):
        if "." in src.stem:
            continue
        base = src.with_suffix("")
        to_markdown(src, base.with_suffix(".text.md"))
        to_docx(src, base.with_suffix(".docx"))
        count = to_pdf(src, base.with_suffix(".pdf"))
        want = len(pages(src))
        print(f"{src.relative_to(HERE)}: {want} pages; the PDF has {count}")
        if count != want:
            sys.exit(f"{src}: a page overflowed in the PDF; shorten it or shrink the font")
