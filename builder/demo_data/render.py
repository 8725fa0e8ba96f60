"""Render the Markdown sources of the demo's DOCX and PDF documents (run by hand; outputs are committed).

python builder/demo_data/render.py     # needs python-docx and fpdf2 (the [dev] extra)
"""

from pathlib import Path

HERE = Path(__file__).parent
TARGETS = {
    "2023-NOAA-cloud-migration.md": "corpus/proposals/2023-NOAA-cloud-migration.docx",
    "2023-GSA-data-analytics.md": "corpus/proposals/2023-GSA-data-analytics.pdf",
    "RFP-2025-DOT-service-desk.md": "corpus/rfps/RFP-2025-DOT-service-desk.docx",
    "RFP-2026-EPA-data-platform.md": "corpus/rfps/RFP-2026-EPA-data-platform.pdf",
}


def blocks(text: str):
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            yield "heading", level, block.lstrip("#").strip()
        elif block:
            yield "para", 0, " ".join(block.split("\n"))


def to_docx(src: Path, dst: Path) -> None:
    import docx

    document = docx.Document()
    document.core_properties.author = "Meridian Ridge Systems (fictional)"
    for kind, level, text in blocks(src.read_text()):
        if kind == "heading":
            document.add_heading(text, level=min(level, 3))
        else:
            document.add_paragraph(text)
    document.save(dst)


def to_pdf(src: Path, dst: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="Letter")
    pdf.set_creation_date(
        __import__("datetime").datetime(2025, 1, 1, tzinfo=__import__("datetime").timezone.utc)
    )
    pdf.add_page()
    for kind, level, text in blocks(src.read_text()):
        if kind == "heading":
            pdf.set_font("Helvetica", "B", {1: 15, 2: 13}.get(level, 11))
        else:
            pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(0, 6 if kind == "para" else 8, text)
        pdf.ln(2)
    pdf.output(str(dst))


if __name__ == "__main__":
    for name, target in TARGETS.items():
        src, dst = HERE / "sources" / name, HERE / target
        (to_docx if dst.suffix == ".docx" else to_pdf)(src, dst)
        print(f"{src.name} -> {dst.relative_to(HERE)}")
