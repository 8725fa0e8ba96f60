"""Cutting a document into chunks: along headings and paragraphs for prose (each chunk keeps to one
section and carries its heading), one chunk per row for a table."""

from __future__ import annotations

import re
from dataclasses import dataclass

from appliance.documents.readers import Document, table_row_text


@dataclass
class Chunk:
    position: int
    heading: str
    text: str
    row: int | None = None  # row index for reference tables


# Markdown headings, and in plain text a short line such as "C.2 Requirements" or "SECTION L - ..."
# (a numbered paragraph that is a sentence, "C.2.1 The contractor shall ...", is not a heading).
_HEADING_RE = re.compile(
    r"^(#{1,6})\s+(.*)$|^([A-Z]\.\d+(?:\.\d+)*\.?\s+[A-Z][^.:;]{0,70})$|^(SECTION\s+[A-Z0-9]+[^.]{0,80})$|^(\d{1,2}\.\s+[A-Z][A-Z -]{2,70})$"
)


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
        return [
            Chunk(i, doc.title, table_row_text(doc.table, row), row=i) for i, row in enumerate(doc.table.rows)
        ]
    return chunk_text(doc.text, limit)
