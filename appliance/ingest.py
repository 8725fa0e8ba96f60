"""Ingest: files and directories into a collection.

Each file is read, chunked, embedded and stored in one transaction. An unchanged file (same sha256 in
the same collection) is skipped; an edited file replaces its previous version; a file that cannot be
read is reported with the reason and the rest of the batch goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.documents import CODE_RE, Document, chunk_document, expand_paths, key_columns, read_document
from appliance.errors import IngestError
from appliance.manifest import sha256_file
from appliance.protocols import Embedder
from appliance.store import NewChunk, Store, embedding_text


@dataclass
class IngestReport:
    added: list[dict] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"added": self.added, "unchanged": self.unchanged, "failed": self.failed}


def _table_row(columns: list[str], row: dict[str, str]) -> dict:
    """Find the code and title of a reference-table row by column name, falling back to the pattern."""
    title_col, code_col = key_columns(columns)
    code = row.get(code_col, "") if code_col else ""
    if not code:
        found = next((CODE_RE.search(v) for v in row.values() if CODE_RE.search(v)), None)
        code = found.group(0) if found else ""
    return {"code": code.strip() or None, "title": row.get(title_col, "").strip() if title_col else None,
            "data": row}


def _chunks(doc: Document, limit: int) -> list[NewChunk]:
    chunks = chunk_document(doc, limit)
    if doc.table is None:
        return [NewChunk(c.position, c.heading, c.text) for c in chunks]
    return [NewChunk(c.position, c.heading, c.text, row=_table_row(doc.table.columns, doc.table.rows[c.row]))
            for c in chunks]


def _embed_with_progress(embedder: Embedder, chunks: list[NewChunk], report: Callable[[int], object],
                         batch: int = 512) -> np.ndarray:
    """Embed a document's chunks, reporting after each batch: a long file shows it is moving."""
    texts = [embedding_text(c.heading, c.text) for c in chunks]
    parts = []
    for start in range(0, len(texts), batch):
        parts.append(embedder.embed(texts[start:start + batch]))
        if len(texts) > batch:
            report(start + len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def ingest(store: Store, embedder: Embedder, paths: Iterable[Path], collection: str, *, max_bytes: int,
           chunk_chars: int, progress: Callable[[str, int, int], None] | None = None,
           source_name: Callable[[Path], str] | None = None) -> IngestReport:
    """`source_name`: what a file is recorded as (an upload: the path on the caller's side); default its
    absolute path."""
    store.ensure_embedder(embedder.name, embedder.dim, embedder.embed)
    files, missing = expand_paths(paths)
    report = IngestReport(failed=missing)
    for i, path in enumerate(files):
        source = source_name(path) if source_name else str(path.resolve())
        if progress:
            progress(source, i, len(files))
        try:
            digest = sha256_file(path)
            if store.find_document(collection, digest) is not None:
                report.unchanged.append(source)
                continue
            doc = read_document(path, max_bytes)
            chunks = _chunks(doc, chunk_chars)
            vectors = _embed_with_progress(embedder, chunks, lambda done, src=source, n=len(chunks), i=i: (
                progress and progress(f"{src} ({done}/{n} chunks)", i, len(files))))
            doc_id, replaced = store.add_document(collection, source, doc.title, doc.kind, digest,
                                                  path.stat().st_size, chunks, vectors)
            report.added.append({"doc_id": doc_id, "source": source, "title": doc.title, "kind": doc.kind,
                                 "chunks": len(chunks), "sha256": digest, "replaced": replaced})
        except IngestError as exc:  # named as the caller knows the file
            report.failed.append({"source": source, "error": str(exc).replace(str(path), source)})
        except OSError as exc:
            report.failed.append({"source": source, "error": f"{source}: cannot read ({exc.strerror})"})
    if progress:
        progress("", len(files), len(files))
    return report
