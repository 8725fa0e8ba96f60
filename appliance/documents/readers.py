"""Reading documents: a file's text, and a table's rows (cutting them into chunks: `chunking`).

`read_document(path)` returns the text of a txt, md, pdf, docx, csv or xlsx file (tables also as
rows), or raises `IngestError` naming what is wrong with the file: empty, binary, no extractable text
(a scanned PDF), unreadable, too large. `parse_document(path, data)` does the same for bytes already
read (the bytes that were hashed are the bytes that are parsed). `chunk_text` cuts text along
headings and paragraphs.

Every file may be hostile, so nothing here grows without a bound: a zip's members are measured
before anything is inflated (MAX_UNZIPPED), DOCX and XLSX XML is read as a stream with entities off,
and paragraphs, table rows, cells, heading depth and extracted text are capped. What no cap can
foresee (a parser's own runaway) is for `appliance.documents.sandbox`, which runs these functions in a child
process with memory and time limits.
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.documents.columns import Columns, detect
from appliance.errors import IngestError
from appliance.terminal import clean_text

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
TABLE_SUFFIXES = {".csv", ".xlsx"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES | {".pdf", ".docx"}

# Identifiers in the style of SOC / O*NET codes: 15-1252 or 15-1252.00
CODE_RE = re.compile(r"\b\d{2}-\d{4}(?:\.\d{2})?\b")


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, str]]

    @functools.cached_property
    def roles(self) -> Columns:
        """Which column is the code, the title, the duties ... (appliance.documents.columns)."""
        return detect(self.columns, self.rows)

    def use_mapping(self, mapping: dict[str, str]) -> Columns:
        """The roles as `mapping` ({role: column}) names them, detection for the rest, from now on
        (IngestError naming the columns when the mapping names one the table lacks)."""
        self.__dict__["roles"] = detect(self.columns, self.rows, mapping)
        return self.roles


@dataclass
class Document:
    path: Path
    kind: str
    title: str
    text: str
    table: Table | None = None
    # Where each page's text begins in `text` (offsets, non-decreasing; the first is 0), where the file
    # has pages: a PDF's pages, a DOCX's page breaks, a text file's form feeds. Empty: one page.
    pages: list[int] = field(default_factory=list)

    def page_at(self, offset: int) -> int | None:
        """The page (1-based) on which `offset` of the text lies; None when the file has no pages."""
        return bisect.bisect_right(self.pages, offset) if self.pages else None


MAX_UNZIPPED = 256_000_000  # all members of a DOCX/XLSX, as their headers declare, before any is read
MAX_XML_PART = 64_000_000  # one XML part (document.xml, a sheet)
MAX_ZIP_MEMBERS = 10_000
MAX_PARAGRAPHS = 500_000  # a 2,000-page document has about 40,000
MAX_TABLE_ROWS = 200_000
MAX_COLUMNS = 512
MAX_CELLS = 5_000_000  # rows x columns a sheet's cells span
MAX_HEADER_CHARS = 200  # a column name; a longer one is a paragraph in the header row
MAX_ROW_CHARS = 32_000  # one table row as stored (its cells and their column names)
TABLE_GROWTH = 16  # a table's stored text may be this many times its file (column names repeat per row)
MAX_TEXT_CHARS = 64_000_000  # text extracted from one file


def _decode(data: bytes, path: Path) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with its byte-order mark: NULs are expected
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise IngestError(
                f"{path}: starts like UTF-16 but does not decode ({exc.reason})", "save it as UTF-8 text"
            ) from exc
    if b"\x00" in data[:65536]:
        raise IngestError(
            f"{path}: binary content (NUL bytes) in a text file",
            "convert it to text, or give the file its real extension",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    text = data.decode("cp1252", errors="replace")
    # Mostly undecodable bytes is a binary file in disguise, not an odd encoding.
    if text.count("\ufffd") > max(8, len(text) // 100):
        raise IngestError(
            f"{path}: not readable as text (neither UTF-8 nor Windows-1252)", "save it as UTF-8 text"
        )
    return text


def _title_from(text: str, path: Path) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return path.stem


MAX_HEADING_DEPTH = 6  # Markdown's deepest heading


def _read_pdf(path: Path, data: bytes) -> list[str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise IngestError(f"{path}: the PDF is encrypted", "save an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except IngestError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:  # LimitReachedError: a stream bomb
        raise IngestError(
            f"{path}: unreadable PDF ({exc})", "re-export it from the source application"
        ) from exc
    _check_text_size(sum(len(p) for p in pages), path)
    if not any(p.strip() for p in pages):
        raise IngestError(
            f"{path}: the PDF has no extractable text (a scanned image?)",
            "run OCR on it first and ingest the result",
        )
    return pages


MAX_PAGES = 100_000


def paged(pages: list[str], path: Path) -> tuple[str, list[int]]:
    """Pages' text cleaned (`clean_text`) and joined by blank lines, with where each page begins; an
    empty page holds no offset of its own."""
    if len(pages) > MAX_PAGES:
        raise IngestError(f"{path}: more than {MAX_PAGES} pages", "split the document")
    text, starts = "", []
    for page in pages:
        page = clean_text(page).strip()
        if page and text:
            text += "\n\n"
        starts.append(len(text))
        text += page
    return text, starts


def _check_text_size(chars: int, path: Path) -> None:
    if chars > MAX_TEXT_CHARS:
        raise IngestError(
            f"{path}: more than {MAX_TEXT_CHARS // 1_000_000} million characters of text",
            "split the document; a file that inflates this far may be a decompression bomb",
        )


def _open_zip(path: Path, data: bytes, what: str):
    """The zip, once its members' declared sizes are known to be bounded (a few KB can declare GBs)."""
    import zipfile

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise IngestError(
            f"{path}: unreadable {what} (not a zip package: {exc})",
            "re-save it from the application that made it",
        ) from exc
    total = sum(m.file_size for m in members)
    if len(members) > MAX_ZIP_MEMBERS or total > MAX_UNZIPPED:
        raise IngestError(
            f"{path}: the {what} would inflate to {total / 1e6:.0f} MB in {len(members)} parts "
            f"(at most {MAX_UNZIPPED / 1e6:.0f} MB, {MAX_ZIP_MEMBERS} parts)",
            "a file this small inflating this far is a decompression bomb; re-save the real one",
        )
    return zf


def _xml_events(zf, name: str, path: Path, what: str, tag: str | None = None):
    """Stream (event, element) over one XML part: entities and network off, its inflated size bounded."""
    from lxml import etree

    try:
        info = zf.getinfo(name)
    except KeyError as exc:
        raise IngestError(
            f"{path}: the {what} has no {name}", "re-save it from the application that made it"
        ) from exc
    if info.file_size > MAX_XML_PART:
        raise IngestError(
            f"{path}: {name} would inflate to {info.file_size / 1e6:.0f} MB (at most "
            f"{MAX_XML_PART / 1e6:.0f} MB)",
            "split the document",
        )
    return etree.iterparse(
        zf.open(info),
        events=("end",),
        tag=tag,
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
    )


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _docx_styles(zf, path: Path) -> dict[str, str]:
    """Paragraph style id -> lower-case name ("Heading2" -> "heading 2")."""
    if "word/styles.xml" not in zf.namelist():
        return {}
    names = {}
    for _, style in _xml_events(zf, "word/styles.xml", path, "DOCX", f"{_W}style"):
        name = style.find(f"{_W}name")
        if name is not None and len(names) < 10_000:
            names[style.get(f"{_W}styleId", "")] = (name.get(f"{_W}val") or "").lower()
        style.clear()
    return names


def _docx_text(element) -> str:
    parts = []
    for node in element.iter(f"{_W}t", f"{_W}tab", f"{_W}br", f"{_W}cr"):
        parts.append(node.text or "" if node.tag == f"{_W}t" else "\t" if node.tag == f"{_W}tab" else "\n")
    return "".join(parts)


def _heading_depth(style: str) -> int | None:
    if style == "title":
        return 1
    if not style.startswith("heading"):
        return None
    level = style.removeprefix("heading").strip()
    return min(int(level), MAX_HEADING_DEPTH) if level.isdigit() and len(level) < 4 else 1


_BREAKS = (f"{_W}br", f"{_W}lastRenderedPageBreak", f"{_W}pageBreakBefore")


def _page_break(element) -> str | None:
    """Where a page break in a paragraph or table row puts the element: "before" (the break comes
    before any of its text: the element starts the next page), "after" (the next element does), or
    None. Explicit breaks, `pageBreakBefore`, and the breaks Word recorded when it last laid the
    document out (`lastRenderedPageBreak`)."""
    text_seen = False
    for node in element.iter(f"{_W}t", *_BREAKS):
        if node.tag == f"{_W}t":
            text_seen = text_seen or bool((node.text or "").strip())
        elif node.tag == f"{_W}pageBreakBefore" and node.get(f"{_W}val", "1").lower() in (
            "0",
            "false",
            "off",
        ):
            continue  # written as switched off
        elif node.tag != f"{_W}br" or node.get(f"{_W}type") == "page":
            return "after" if text_seen else "before"
    return None


def _read_docx(path: Path, data: bytes) -> tuple[list[str], Table | None]:
    """Body paragraphs (headings as Markdown) and tables as `a | b` rows, in document order, one string
    per page, read as a stream: memory follows the largest table, not the file."""
    from lxml import etree

    zf = _open_zip(path, data, "DOCX")
    lines: list[str] = []
    pages: list[list[str]] = [lines]

    def turn(where: str | None) -> None:
        nonlocal lines
        if where == "before" and lines:
            lines = []
            pages.append(lines)

    def add(line: str) -> None:
        nonlocal chars
        lines.append(line)
        chars += len(line) + 2
        _check_text_size(chars, path)

    chars = paragraphs = rows = 0
    try:
        styles = _docx_styles(zf, path)
        for _, element in _xml_events(zf, "word/document.xml", path, "DOCX"):
            if element.tag == f"{_W}p":
                paragraphs += 1
                if paragraphs > MAX_PARAGRAPHS:
                    raise IngestError(f"{path}: more than {MAX_PARAGRAPHS} paragraphs", "split the document")
            parent = element.getparent()
            if parent is None or parent.tag != f"{_W}body":
                continue  # inside a table or a content control: read with its top-level element
            if element.tag == f"{_W}p":
                text = _docx_text(element).strip()
                where = _page_break(element)
                turn(where)
                if text:
                    style_el = element.find(f"{_W}pPr/{_W}pStyle")
                    style = styles.get(style_el.get(f"{_W}val", ""), "") if style_el is not None else ""
                    depth = _heading_depth(style)  # "Heading 3000000000" is not 3 GB of '#'
                    listed = element.find(f"{_W}pPr/{_W}numPr") is not None or style.startswith("list")
                    # a Word list item keeps a marker, as it has on the page: "- "
                    add("#" * depth + " " + text if depth else "- " + text if listed else text)
                turn("before" if where == "after" or (where == "before" and not text) else None)
            elif element.tag == f"{_W}tbl":
                for tr in element.iter(f"{_W}tr"):
                    rows += 1
                    if rows > MAX_TABLE_ROWS:
                        raise IngestError(
                            f"{path}: more than {MAX_TABLE_ROWS} table rows", "split the document"
                        )
                    cells = [
                        " ".join(_docx_text(p).strip() for p in tc.iter(f"{_W}p")).strip()
                        for tc in tr.iterchildren(f"{_W}tc")
                    ]
                    where = _page_break(tr)
                    turn(where)
                    add(" | ".join(cells[:MAX_COLUMNS]))
                    turn("before" if where == "after" else None)
            element.clear()
            while element.getprevious() is not None:  # what was read is let go
                del parent[0]
    except etree.XMLSyntaxError as exc:
        raise IngestError(
            f"{path}: unreadable DOCX (broken XML: {exc})", "re-save it from Word or LibreOffice"
        ) from exc
    except (OSError, EOFError, ValueError) as exc:  # a damaged deflate stream, a bad CRC
        raise IngestError(
            f"{path}: unreadable DOCX ({type(exc).__name__}: {exc})", "re-save it from Word or LibreOffice"
        ) from exc
    return ["\n\n".join(page) for page in pages], None


def _rows_to_table(rows: list[list[str]], path: Path) -> Table:
    rows = [[(c or "").strip() for c in r[:MAX_COLUMNS]] for r in rows if any((c or "").strip() for c in r)]
    if len(rows) < 2:
        raise IngestError(
            f"{path}: a table needs a header row and at least one data row", "check the file's contents"
        )
    header = [h or f"column_{i + 1}" for i, h in enumerate(rows[0])]
    long = next((i for i, h in enumerate(header) if len(h) > MAX_HEADER_CHARS), None)
    if long is not None:
        raise IngestError(
            f"{path}: column {long + 1}'s name is {len(header[long])} characters (at most "
            f"{MAX_HEADER_CHARS}): the first row must hold column names",
            "put a header row of short column names first",
        )
    # Empty cells are not kept: a sparse row costs what it holds, not the width of the table.
    records = [{h: v for h, v in zip(header, r, strict=False) if v} for r in rows[1:]]
    for n, record in enumerate(records, start=2):
        size = sum(len(h) + len(v) for h, v in record.items())
        if size > MAX_ROW_CHARS:
            raise IngestError(
                f"{path}: row {n} holds {size} characters with its column names (at most {MAX_ROW_CHARS})",
                "a cell that holds a whole document belongs in a .txt or .md file",
            )
    return Table(columns=header, rows=records)


def _read_csv(path: Path, data: bytes) -> Table:
    text = _decode(data, path)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = []
        for row in csv.reader(io.StringIO(text), dialect):
            rows.append(row)
            if len(rows) > MAX_TABLE_ROWS + 1:
                raise IngestError(f"{path}: more than {MAX_TABLE_ROWS} rows", "split the table")
    except csv.Error as exc:  # a cell over csv.field_size_limit(), a stray NUL, ...
        raise IngestError(
            f"{path}: unreadable CSV ({exc})",
            "check the file; one cell may hold a whole document, which belongs in a .txt or .md file",
        ) from exc
    return _rows_to_table(rows, path)


_CELL_REF_RE = re.compile(r"^([A-Z]{1,3})(\d{1,7})$")
_S = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


def _column_number(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n


_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"


def _first_sheet(zf, path: Path) -> str:
    """The part of the workbook's first sheet, the one openpyxl reads (`worksheets[0]`): the first
    <sheet> of xl/workbook.xml through its relationship, not the first file name (sheet2.xml may come
    first in the workbook, and a sheet measured must be the sheet parsed)."""
    first = next(
        (el.get(_REL) for _, el in _xml_events(zf, "xl/workbook.xml", path, "XLSX", f"{_S}sheet")), None
    )
    rels = "xl/_rels/workbook.xml.rels"
    if first and rels in zf.namelist():
        for _, rel in _xml_events(zf, rels, path, "XLSX"):
            if rel.get("Id") == first and rel.get("Target"):
                target = rel.get("Target")
                return target.lstrip("/") if target.startswith("/") else f"xl/{target}"
    raise IngestError(f"{path}: the XLSX has no worksheet", "re-save it from the spreadsheet application")


def _xlsx_extent(zf, path: Path) -> tuple[int, int, int]:
    """(rows, columns, cells) the first sheet's cells span, counted from its XML before openpyxl reads it:
    openpyxl fills every gap, so one cell at XFD1048576 would be 17 billion empty cells."""
    max_row = max_col = cells = 0
    row = 0
    for _, element in _xml_events(zf, _first_sheet(zf, path), path, "XLSX"):
        if element.tag == f"{_S}row":
            row = int(element.get("r") or row + 1) if (element.get("r") or "1").isdigit() else row + 1
            col = 0
            for cell in element.iterchildren(f"{_S}c"):
                cells += 1
                match = _CELL_REF_RE.match(cell.get("r") or "")
                col = _column_number(match.group(1)) if match else col + 1
                max_col = max(max_col, col)
            max_row = max(max_row, row)
            if max_row > MAX_TABLE_ROWS or max_col > MAX_COLUMNS or cells > MAX_CELLS:
                break
            element.clear()
            while element.getprevious() is not None:
                del element.getparent()[0]
    return max_row, max_col, cells


def _read_xlsx(path: Path, data: bytes) -> Table:
    import zipfile

    import openpyxl
    from lxml import etree

    zf = _open_zip(path, data, "XLSX")
    try:
        rows_n, cols_n, cells = _xlsx_extent(zf, path)
    except etree.XMLSyntaxError as exc:
        raise IngestError(
            f"{path}: unreadable XLSX (broken XML: {exc})", "re-save it from the spreadsheet application"
        ) from exc
    if rows_n > MAX_TABLE_ROWS or cols_n > MAX_COLUMNS or rows_n * cols_n > MAX_CELLS:
        raise IngestError(
            f"{path}: the first sheet spans {rows_n} rows x {cols_n} columns (at most "
            f"{MAX_TABLE_ROWS} rows, {MAX_COLUMNS} columns, {MAX_CELLS} cells)",
            "delete stray cells far from the table (Ctrl+End shows the last one), or split it",
        )
    try:  # read-only workbooks parse as they are read: a truncated sheet fails in the loop
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
        try:
            sheet = book.worksheets[0]
            rows = [
                ["" if v is None else str(v) for v in row]
                for row in sheet.iter_rows(max_row=max(rows_n, 1), max_col=max(cols_n, 1), values_only=True)
            ]
        finally:
            book.close()
    except (
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        OSError,
        SyntaxError,
        EOFError,
    ) as exc:  # SyntaxError: XML
        raise IngestError(
            f"{path}: unreadable XLSX ({type(exc).__name__}: {exc})",
            "re-save it from the spreadsheet application",
        ) from exc
    return _rows_to_table(rows, path)


def table_row_text(table: Table, row: dict[str, str]) -> str:
    """A row as its chunk: "column: value" lines, the title first and its code right after it, then the
    rest in the table's order. A model asked for a category's code then finds it just after the title
    it looks for, and one asked what a code stands for finds the title in the same place in the row."""
    title, code = table.roles.title, table.roles.code
    ordered = [c for c in (title, code) if c] + [c for c in table.columns if c not in (title, code)]
    return "\n".join(f"{c}: {row.get(c, '')}" for c in ordered if row.get(c, ""))


def expand_paths(paths: Iterable[Path], passed: list[dict] | None = None) -> tuple[list[Path], list[dict]]:
    """Files to ingest (directories recursively, supported types only) and what cannot be: paths that do
    not exist, folders that cannot be read, and links inside a folder that lead out of it (a folder
    hands over what is in it; a link to /etc/shadow or another user's file is reported, never followed -
    name its target to ingest it). `passed`, when given, collects the files of a folder left out on
    purpose ({source, reason}: a type not read, a hidden file); hidden folders are not entered."""
    import os

    files: list[Path] = []
    refused: list[dict] = []

    def unreadable(exc: OSError) -> None:
        where = exc.filename or "?"
        refused.append(
            {
                "source": str(where),
                "error": f"{where}: folder not read ({exc.strerror}); its files were skipped",
            }
        )

    for path in paths:
        if path.is_dir():
            root = path.resolve()
            for here, dirs, names in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names) + [d for d in dirs if Path(here, d).is_symlink()]:
                    p = Path(here) / name
                    if name.startswith("."):
                        if passed is not None and p.suffix.lower() in SUPPORTED_SUFFIXES:
                            passed.append({"source": str(p), "reason": "a hidden file: not read"})
                        continue
                    if p.is_symlink():
                        try:
                            target = p.resolve(strict=True)
                        except (
                            OSError,
                            RuntimeError,
                        ):  # a loop (RuntimeError before Python 3.13), or dangling
                            if p.suffix.lower() in SUPPORTED_SUFFIXES or not p.suffix:
                                refused.append(
                                    {
                                        "source": str(p),
                                        "error": f"{p}: a link that leads nowhere (a "
                                        "loop, or its target is gone); not followed",
                                    }
                                )
                            continue
                        if not target.is_relative_to(root):
                            if target.is_dir() or p.suffix.lower() in SUPPORTED_SUFFIXES:
                                refused.append(
                                    {
                                        "source": str(p),
                                        "error": f"{p}: a link to {target}, outside "
                                        f"{path}; not followed (name the target itself to ingest it)",
                                    }
                                )
                            continue
                    if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES:
                        files.append(p)
                    elif passed is not None and p.is_file():
                        passed.append(
                            {"source": str(p), "reason": f"not a type read ({p.suffix or 'no extension'})"}
                        )
        elif path.is_file():
            files.append(path)
        else:
            refused.append({"source": str(path), "error": f"{path}: no such file or directory"})
    return list(dict.fromkeys(files)), refused


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refused when empty or over `max_bytes` (read once: what is hashed is what is parsed)."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(
            f"{path}: unsupported file type '{suffix or '(none)'}'",
            f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )
    try:
        with open(path, "rb") as fh:  # read(n) allocates n first: ask for what the file holds, not the cap
            import os

            data = fh.read(min(os.fstat(fh.fileno()).st_size, max_bytes) + 1)
    except PermissionError as exc:
        raise IngestError(f"{path}: permission denied", "make the file readable by this user") from exc
    except OSError as exc:
        raise IngestError(f"{path}: cannot read ({exc.strerror})", "check the path and permissions") from exc
    if not data:
        raise IngestError(f"{path}: empty file", "nothing to ingest; remove it or fill it")
    if len(data) > max_bytes:
        raise IngestError(
            f"{path}: over the {max_bytes / 1e6:.0f} MB limit",
            "split the file, or raise APPLIANCE_MAX_FILE_MB",
        )
    return data


def read_document(path: Path, max_bytes: int, sandbox=None) -> Document:
    """`sandbox` (an appliance.documents.sandbox.Sandbox): parse there; None parses here (trusted files only:
    the builder's own corpus)."""
    data = read_bytes(path, max_bytes)
    return sandbox.parse(path, data) if sandbox is not None else parse_document(path, data)


def parse_document(path: Path, data: bytes) -> Document:
    """The document in `data`; `path` gives its type and is named in errors."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(
            f"{path}: unsupported file type '{suffix or '(none)'}'",
            f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )
    if not data:
        raise IngestError(f"{path}: empty file", "nothing to ingest; remove it or fill it")
    table, pages = None, []
    if suffix in TEXT_SUFFIXES:
        text = _decode(data, path)
        if "\f" in text:  # form feeds: a text export of a paged document
            text, pages = paged(text.split("\f"), path)
    elif suffix == ".pdf":
        text, pages = paged(_read_pdf(path, data), path)
    elif suffix == ".docx":
        docx_pages, table = _read_docx(path, data)
        text, pages = paged(docx_pages, path)
    else:
        table = _read_csv(path, data) if suffix == ".csv" else _read_xlsx(path, data)
        text = "\n\n".join(table_row_text(table, r) for r in table.rows)
        if len(text) > TABLE_GROWTH * len(data) + 1_000_000:
            raise IngestError(
                f"{path}: the table's {len(data)} bytes make {len(text)} characters of rows with "
                f"their column names (at most {TABLE_GROWTH} times the file)",
                "shorten the column names, or remove empty columns",
            )
    _check_text_size(len(text), path)
    if not pages:  # paged text is clean already, and its offsets stay true
        text = clean_text(text)
    if not text.strip():
        raise IngestError(f"{path}: no text in the file", "nothing to ingest")
    kind = {".markdown": "md", ".text": "txt"}.get(suffix, suffix.lstrip("."))
    title = path.stem if table is not None else _title_from(text, path)
    return Document(
        path=path,
        kind=kind,
        title=clean_text(title),
        text=text,
        table=table,
        pages=pages if len(pages) > 1 else [],
    )
