"""Ingest: files and directories into a collection.

Each file is read once (the bytes hashed are the bytes parsed), parsed in the sandbox, chunked,
embedded and stored with its audit row in one transaction: a batch stopped anywhere leaves no document
without its row. An unchanged file (same sha256 under the same name and owner) is skipped; an edited
file replaces the owner's previous version (never another user's); a file whose new content equals
another document's drops its own old version and is reported as a duplicate (content is stored once
per collection); a file that cannot be read is reported with the reason and the rest goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

import numpy as np

from appliance.documents.chunking import chunk_document
from appliance.documents.readers import CODE_RE, Document, Table, expand_paths, read_bytes
from appliance.documents.sandbox import Sandbox
from appliance.errors import IngestError
from appliance.protocols import Embedder
from appliance.retrieval.store import NewChunk, Store, embedding_text
from appliance.schemas import IngestReport


def _table_row(table: Table, row: dict[str, str]) -> dict:
    """The code and title of a reference-table row by the table's detected columns
    (appliance.documents.columns), the code falling back to the pattern anywhere in the row."""
    code = table.roles.get(row, "code")
    if not code:
        found = next((CODE_RE.search(v) for v in row.values() if CODE_RE.search(v)), None)
        code = found.group(0) if found else ""
    return {"code": code or None, "title": table.roles.get(row, "title") or None, "data": row}


def _chunks(doc: Document, limit: int) -> list[NewChunk]:
    chunks = chunk_document(doc, limit)
    if doc.table is None:
        return [NewChunk(c.position, c.heading, c.text) for c in chunks]
    return [
        NewChunk(c.position, c.heading, c.text, row=_table_row(doc.table, doc.table.rows[c.row]))
        for c in chunks
    ]


def _embed_with_progress(
    embedder: Embedder, chunks: list[NewChunk], report: Callable[[int], object], batch: int = 512
) -> np.ndarray:
    """Embed a document's chunks, reporting after each batch: a long file shows it is moving."""
    texts = [embedding_text(c.heading, c.text) for c in chunks]
    parts = []
    for start in range(0, len(texts), batch):
        parts.append(embedder.embed(texts[start : start + batch]))
        if len(texts) > batch:
            report(start + len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def ingest(
    store: Store,
    embedder: Embedder,
    paths: Iterable[Path],
    collection: str,
    *,
    max_bytes: int,
    chunk_chars: int,
    progress: Callable[[str, int, int], None] | None = None,
    source_name: Callable[[Path], str] | None = None,
    owner: str | None = None,
    admin: bool = False,
    record: Callable[[str, dict], object] | None = None,
    sandbox: Sandbox | None = None,
    committed: Callable[[], object] | None = None,
    aside: Callable[[], ContextManager] | None = None,
) -> IngestReport:
    """`source_name`: what a file is recorded as (an upload: the path on the caller's side); default its
    absolute path. `owner`: whose documents these are (`admin`: also owner of documents from before
    owners were kept). `record(action, detail)` writes the audit row inside each document's
    transaction; `committed()` runs after each file (the audit head's checkpoint). `sandbox`: where files are parsed (one is started for the batch when None).
    `aside()`: held while a file is parsed and embedded, the long part that touches neither the store
    nor the audit log (the service gives up its worker's turn there, so searches and answers go on)."""
    store.ensure_embedder(embedder.name, embedder.dim, embedder.embed)
    skipped: list[dict] = []
    files, missing = expand_paths(paths, skipped)
    report = IngestReport(failed=missing, skipped=skipped)
    own_sandbox = sandbox is None
    sandbox = sandbox or Sandbox()
    try:
        for i, path in enumerate(files):
            source = source_name(path) if source_name else str(path.resolve())
            if progress:
                progress(source, i, len(files))
            try:
                _one(
                    store,
                    embedder,
                    path,
                    source,
                    collection,
                    report,
                    max_bytes=max_bytes,
                    chunk_chars=chunk_chars,
                    owner=owner,
                    admin=admin,
                    record=record,
                    sandbox=sandbox,
                    aside=aside or contextlib.nullcontext,
                    progress=lambda done, n, src=source, i=i: (
                        progress and progress(f"{src} (chunk {done} of {n})", i, len(files))
                    ),
                )
            except IngestError as exc:  # named as the caller knows the file
                report.failed.append({"source": source, "error": str(exc).replace(str(path), source)})
            else:
                if committed:
                    committed()
    finally:
        if own_sandbox:
            sandbox.close()
    if progress:
        progress("", len(files), len(files))
    return report


def _known(
    store: Store,
    source: str,
    collection: str,
    digest: str,
    report: IngestReport,
    *,
    owner: str | None,
    admin: bool,
    record,
) -> bool:
    """Whether this content is in the collection already: unchanged under this name and owner, or a
    duplicate of another document (this name's older text is then removed). Reported either way."""
    same = store.find_document(collection, digest)
    if same is None:
        return False
    if same.source == source and (same.owner == owner or (admin and same.owner is None)):
        report.unchanged.append(source)
        return True
    # The same text is already here under another name: this name's old text must not stay.
    old = store.earlier_versions(collection, source, owner, admin, digest)
    if old:
        store.remove_versions(
            old,
            record
            and (
                lambda: record(
                    "remove",
                    {
                        "collection": collection,
                        "source": source,
                        "doc_ids": old,
                        "reason": "duplicate",
                        "same_as": same.id,
                        "sha256": digest,
                    },
                )
            ),
        )
    report.duplicates.append({"source": source, "same_as": same.source, "doc_id": same.id, "removed": old})
    return True


def _one(
    store: Store,
    embedder: Embedder,
    path: Path,
    source: str,
    collection: str,
    report: IngestReport,
    *,
    max_bytes: int,
    chunk_chars: int,
    owner: str | None,
    admin: bool,
    record,
    sandbox: Sandbox,
    aside: Callable[[], ContextManager],
    progress: Callable[[int, int], object],
) -> None:
    data = read_bytes(path, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if _known(store, source, collection, digest, report, owner=owner, admin=admin, record=record):
        return
    with aside():
        doc = sandbox.parse(path, data)
        chunks = _chunks(doc, chunk_chars)
        vectors = _embed_with_progress(embedder, chunks, lambda done: progress(done, len(chunks)))
    # The store may have moved on while this file was parsed and embedded aside (appliance.service).
    if store.embedder_id()[0] not in (None, embedder.name):
        raise IngestError(
            f"{path}: a new model with another embedder was installed while this file was read",
            "send it again",
        )
    if _known(store, source, collection, digest, report, owner=owner, admin=admin, record=record):
        return
    item = {"source": source, "title": doc.title, "kind": doc.kind, "chunks": len(chunks), "sha256": digest}
    if doc.table is not None and collection not in store.reference:
        item["note"] = (
            f"a table outside the reference collections ({', '.join(store.reference)}): searched as "
            "text, never used for lookups, code checks or staffing"
        )

    def audited(doc_id: int, replaced: list[int]) -> None:
        item.update(doc_id=doc_id, replaced=replaced)
        if record:
            record(
                "ingest",
                {
                    "collection": collection,
                    "source": source,
                    "sha256": digest,
                    "doc_id": doc_id,
                    "chunks": len(chunks),
                    "replaced": replaced,
                },
            )

    store.add_document(
        collection,
        source,
        doc.title,
        doc.kind,
        digest,
        len(data),
        chunks,
        vectors,
        owner=owner,
        admin=admin,
        record=audited,
    )
    report.added.append({"doc_id": item.pop("doc_id"), **item})
