"""Reading documents and cutting them into chunks.

`read_document(path)` returns the text of a txt, md, pdf, docx, csv or xlsx file (tables also as
rows), or raises `IngestError` naming what is wrong with the file: empty, binary, no extractable text
(a scanned PDF), unreadable, too large. `chunk_text` cuts text along headings and paragraphs.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import IngestError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
TABLE_SUFFIXES = {".csv", ".xlsx"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES | {".pdf", ".docx"}

# Identifiers in the style of SOC / O*NET codes: 15-1252 or 15-1252.00
CODE_RE = re.compile(r"\b\d{2}-\d{4}(?:\.\d{2})?\b")

_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def clean_text(text: str) -> str:
    """Strip terminal escape sequences and control characters; keep newlines and tabs."""
    text = _ANSI_RE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    return unicodedata.normalize("NFC", text)


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, str]]


@dataclass
class Document:
    path: Path
    kind: str
    title: str
    text: str
    table: Table | None = None


def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data[:65536]:
        raise IngestError(f"{path}: binary content (NUL bytes) in a text file",
                          "convert it to text, or give the file its real extension")
    for encoding in ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    text = data.decode("cp1252", errors="replace")
    # Mostly undecodable bytes is a binary file in disguise, not an odd encoding.
    if text.count("\ufffd") > max(8, len(text) // 100):
        raise IngestError(f"{path}: not readable as text (neither UTF-8 nor Windows-1252)",
                          "save it as UTF-8 text")
    return text


def _title_from(text: str, path: Path) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return path.stem


MAX_HEADING_DEPTH = 6  # Markdown's deepest heading


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise IngestError(f"{path}: the PDF is encrypted", "save an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except IngestError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:  # LimitReachedError: a stream bomb
        raise IngestError(f"{path}: unreadable PDF ({exc})", "re-export it from the source application") from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text.strip():
        raise IngestError(f"{path}: the PDF has no extractable text (a scanned image?)",
                          "run OCR on it first and ingest the result")
    return text


def _read_docx(path: Path) -> tuple[str, Table | None]:
    import zipfile

    import docx

    try:  # python-docx parses lazily: a truncated part can fail anywhere below
        document = docx.Document(str(path))
        lines: list[str] = []
        for para in document.paragraphs:
            text = para.text.strip()
            if not text:
                continue
            style = (para.style.name or "").lower() if para.style is not None else ""
            if style.startswith("heading"):
                level = style.removeprefix("heading").strip()
                depth = min(int(level), MAX_HEADING_DEPTH) if level.isdigit() and len(level) < 4 else 1
                lines.append("#" * depth + " " + text)  # "Heading 3000000000" is not 3 GB of '#'
            elif style == "title":
                lines.append("# " + text)
            else:
                lines.append(text)
        for table in document.tables:
            for row in table.rows:
                lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, SyntaxError) as exc:  # SyntaxError: broken XML
        raise IngestError(f"{path}: unreadable DOCX ({type(exc).__name__}: {exc})",
                          "re-save it from Word or LibreOffice") from exc
    return "\n\n".join(lines), None


def _rows_to_table(rows: list[list[str]], path: Path) -> Table:
    rows = [[(c or "").strip() for c in r] for r in rows if any((c or "").strip() for c in r)]
    if len(rows) < 2:
        raise IngestError(f"{path}: a table needs a header row and at least one data row",
                          "check the file's contents")
    header = [h or f"column_{i + 1}" for i, h in enumerate(rows[0])]
    records = [dict(zip(header, r + [""] * (len(header) - len(r)), strict=False)) for r in rows[1:]]
    return Table(columns=header, rows=records)


def _read_csv(path: Path) -> Table:
    text = _decode(path.read_bytes(), path)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as exc:  # a cell over csv.field_size_limit(), a stray NUL, ...
        raise IngestError(f"{path}: unreadable CSV ({exc})", "check the file; one cell may hold a whole "
                          "document, which belongs in a .txt or .md file") from exc
    return _rows_to_table(rows, path)


def _read_xlsx(path: Path) -> Table:
    import zipfile

    import openpyxl

    try:  # read-only workbooks parse as they are read: a truncated sheet fails in the loop
        book = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
        try:
            sheet = book.worksheets[0]
            rows = [["" if v is None else str(v) for v in row] for row in sheet.iter_rows(values_only=True)]
        finally:
            book.close()
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, SyntaxError) as exc:  # SyntaxError: broken XML
        raise IngestError(f"{path}: unreadable XLSX ({type(exc).__name__}: {exc})",
                          "re-save it from the spreadsheet application") from exc
    return _rows_to_table(rows, path)


# Reference-table columns that name a row and give its code, by header (case-insensitive).
TITLE_COLUMNS = ("title", "labor category", "name", "category")
CODE_COLUMNS = ("code", "soc code", "onet code", "o*net code", "lcat code", "labor category code")


def key_columns(columns: list[str]) -> tuple[str | None, str | None]:
    """(title column, code column) of a reference table, by header name."""
    lowered = {c.lower().strip(): c for c in columns}
    return (next((lowered[c] for c in TITLE_COLUMNS if c in lowered), None),
            next((lowered[c] for c in CODE_COLUMNS if c in lowered), None))


def table_row_text(columns: list[str], row: dict[str, str]) -> str:
    """A row as its chunk: "column: value" lines, the title first and its code right after it, then the
    rest in the table's order. A model asked for a category's code then finds it just after the title
    it looks for, and one asked what a code stands for finds the title in the same place in the row."""
    title, code = key_columns(columns)
    ordered = [c for c in (title, code) if c] + [c for c in columns if c not in (title, code)]
    return "\n".join(f"{c}: {row.get(c, '')}" for c in ordered if row.get(c, ""))


def expand_paths(paths: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Files to ingest (directories recursively, supported types only) and what cannot be: paths that do
    not exist, and links inside a folder that lead out of it (a folder hands over what is in it; a link
    to /etc/shadow or another user's file is reported, never followed - name its target to ingest it)."""
    files: list[Path] = []
    refused: list[dict] = []
    for path in paths:
        if path.is_dir():
            root = path.resolve()
            for p in sorted(path.rglob("*")):
                if any(part.startswith(".") for part in p.relative_to(path).parts):
                    continue
                if p.is_symlink() and not p.resolve().is_relative_to(root):
                    if p.is_dir() or p.suffix.lower() in SUPPORTED_SUFFIXES:
                        refused.append({"source": str(p), "error": f"{p}: a link to {p.resolve()}, outside "
                                        f"{path}; not followed (name the target itself to ingest it)"})
                    continue
                if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES:
                    files.append(p)
        elif path.is_file():
            files.append(path)
        else:
            refused.append({"source": str(path), "error": f"{path}: no such file or directory"})
    return list(dict.fromkeys(files)), refused


def read_document(path: Path, max_bytes: int) -> Document:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(f"{path}: unsupported file type '{suffix or '(none)'}'",
                          f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})", "check the path and permissions") from exc
    if size == 0:
        raise IngestError(f"{path}: empty file", "nothing to ingest; remove it or fill it")
    if size > max_bytes:
        raise IngestError(f"{path}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit",
                          "split the file, or raise APPLIANCE_MAX_FILE_MB")
    table = None
    try:
        if suffix in TEXT_SUFFIXES:
            text = _decode(path.read_bytes(), path)
        elif suffix == ".pdf":
            text = _read_pdf(path)
        elif suffix == ".docx":
            text, table = _read_docx(path)
        else:
            table = _read_csv(path) if suffix == ".csv" else _read_xlsx(path)
            text = "\n\n".join(table_row_text(table.columns, r) for r in table.rows)
    except PermissionError as exc:
        raise IngestError(f"{path}: permission denied", "make the file readable by this user") from exc
    text = clean_text(text)
    if not text.strip():
        raise IngestError(f"{path}: no text in the file", "nothing to ingest")
    kind = {".markdown": "md", ".text": "txt"}.get(suffix, suffix.lstrip("."))
    title = path.stem if table is not None else _title_from(text, path)
    return Document(path=path, kind=kind, title=clean_text(title), text=text, table=table)


@dataclass
class Chunk:
    position: int
    heading: str
    text: str
    row: int | None = None  # row index for reference tables


# Markdown headings, and in plain text a short line such as "C.2 Requirements" or "SECTION L - ..."
# (a numbered paragraph that is a sentence, "C.2.1 The contractor shall ...", is not a heading).
_HEADING_RE = re.compile(r"^(#{1,6})\s+(.*)$|^([A-Z]\.\d+(?:\.\d+)*\.?\s+[A-Z][^.:;]{0,70})$|^(SECTION\s+[A-Z0-9]+[^.]{0,80})$|^(\d{1,2}\.\s+[A-Z][A-Z -]{2,70})$")


def _split_long(paragraph: str, limit: int) -> list[str]:
    if len(paragraph) <= limit:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    out, buf = [], ""
    for sentence in sentences:
        while len(sentence) > limit:  # a run-on line with no sentence ends
            cut = sentence.rfind(" ", 0, limit)
            cut = cut if cut > limit // 2 else limit
            if buf:
                out.append(buf)
                buf = ""
            out.append(sentence[:cut])
            sentence = sentence[cut:].lstrip()
        if buf and len(buf) + 1 + len(sentence) > limit:
            out.append(buf)
            buf = sentence
        else:
            buf = f"{buf} {sentence}".strip()
    if buf:
        out.append(buf)
    return out


def chunk_text(text: str, limit: int) -> list[Chunk]:
    """Chunks that keep to one section: headings start a new chunk and are carried as context."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        first, _, rest = block.partition("\n")
        match = _HEADING_RE.match(first.strip())
        if match:
            heading = next(g for g in match.groups()[1:] if g).strip()
            sections.append((heading, []))
            block = rest.strip()
            if not block:
                continue
        sections[-1][1].append(block)
    chunks: list[Chunk] = []
    for heading, paragraphs in sections:
        buf = ""
        pieces = [piece for p in paragraphs for piece in _split_long(p, limit)]
        for piece in pieces:
            if buf and len(buf) + 2 + len(piece) > limit:
                chunks.append(Chunk(len(chunks), heading, buf))
                buf = piece
            else:
                buf = f"{buf}\n\n{piece}" if buf else piece
        if buf:
            chunks.append(Chunk(len(chunks), heading, buf))
        elif heading and not paragraphs:
            chunks.append(Chunk(len(chunks), heading, heading))
    return chunks


def chunk_document(doc: Document, limit: int) -> list[Chunk]:
    if doc.table is not None:
        return [Chunk(i, doc.title, table_row_text(doc.table.columns, row), row=i)
                for i, row in enumerate(doc.table.rows)]
    return chunk_text(doc.text, limit)
