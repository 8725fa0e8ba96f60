"""The appliance database (the only module that loads sqlite-vec).

One SQLite file through apsw: collections, documents keyed by their content's sha256, chunks with
their position, an FTS5 index over the chunk text, a `vec0` table of chunk vectors sharing the chunk's
rowid, and reference-table rows (labor categories and the like) kept as structured data. WAL with
`synchronous=FULL`: a committed ingest survives a crash. Schema changes are ordered, named migrations.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import apsw
import numpy as np

from appliance.bundles.manifest import utc_stamp
from appliance.errors import NotFoundError, StoreError
from appliance.retrieval import migrations
from appliance.retrieval.titles import TitleIndex
from appliance.schemas import DocumentRow


def _now() -> str:
    return utc_stamp()


TERM_COUNTS_KEPT = 100_000  # remembered chunk counts of words (Store.term_document_counts), at most


@dataclass
class ChunkRow:
    chunk_id: int
    doc_id: int
    source: str
    title: str
    heading: str
    position: int
    text: str
    doc_sha256: str
    collection: str
    owner: str | None = None  # who added the document: an upload's name alone could be anyone's path


@dataclass
class NewChunk:
    position: int
    heading: str
    text: str
    row: dict | None = None  # a reference-table row: {"code", "title", "data"}


class _VectorCache:
    """All chunk vectors as one float32 matrix, for processes that search many times.

    sqlite-vec's KNN (no SIMD in the PyPI build) scans 100k x 384 floats in about 55 ms on the
    development machine; a BLAS matrix-vector product over the same vectors takes about 10 ms. The
    database stays the source of truth: the cache is rebuilt after any commit, ours or another
    process's (`PRAGMA data_version`).
    """

    def __init__(self, conn: apsw.Connection, dim: int):
        rows = conn.execute("SELECT rowid, collection_id, embedding FROM chunk_vectors").fetchall()
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.collections = np.array([r[1] for r in rows], dtype=np.int64)
        self.matrix = (
            np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            if rows
            else np.zeros((0, dim), dtype=np.float32)
        )

    def search(self, vector: np.ndarray, k: int, collection_id: int | None) -> list[tuple[int, float]]:
        ids, matrix = self.ids, self.matrix
        if collection_id is not None:
            mask = self.collections == collection_id
            ids, matrix = ids[mask], matrix[mask]
        if len(ids) == 0:
            return []
        similarity = matrix @ vector.astype(np.float32)
        k = min(k, len(ids))
        top = np.argpartition(-similarity, k - 1)[:k]
        top = top[np.argsort(-similarity[top])]
        return [(int(ids[i]), float(1.0 - similarity[i])) for i in top]  # cosine distance, as vec0


def make_private(path: Path, mode: int) -> str | None:
    """Take group and other permissions off `path` (to `mode`) if it has any; what was repaired, or None.
    StoreError when it cannot be: a home or database others may read is not run on."""
    try:
        found = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if not stat.S_IMODE(found) & 0o077:
        return None
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise StoreError(
            f"{path} is open to other users (mode {stat.filemode(found)}) and cannot be made private "
            f"({exc.strerror})",
            f"run `chmod {mode:o} {path}` as its owner",
        ) from exc
    return f"{path}: mode {stat.filemode(found)} -> {stat.filemode(stat.S_IFMT(found) | mode)}"


def private_files(path: Path) -> list[str]:
    """The database and its -wal and -shm files readable by their owner only (created so when new;
    SQLite gives -wal and -shm the database's mode); what was repaired. The database holds every
    conversation, audit row and document: a role check is worth nothing if its file can be read."""
    os.close(
        os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    )  # the mode applies only where it creates the file
    names = (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return [done for name in names if (done := make_private(name, 0o600))]


class Store:
    """A connection to the appliance database; use as a context manager.

    `cache_vectors=True` keeps the vectors in memory for fast repeated searches (the service, the
    operator UI); one-shot commands leave it off and let vec0 scan. `reference`: the collections whose
    table rows are the reference (lookups, code checks, staffing); rows of tables elsewhere are kept
    but never consulted as the reference.
    """

    def __init__(self, path: Path, cache_vectors: bool = False, reference: Sequence[str] = ("reference",)):
        import sqlite_vec

        self.cache_vectors = cache_vectors
        self.reference = tuple(reference)
        self._cache: _VectorCache | None = None
        self._term_counts: dict[str, int] = {}
        self._titles: TitleIndex | None = None
        self._seen_version: int | None = None

        path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = private_files(path)
        try:
            self.conn = apsw.Connection(str(path))
            self.conn.set_busy_timeout(10_000)
            self.conn.enable_load_extension(True)
            self.conn.load_extension(sqlite_vec.loadable_path())
            self.conn.enable_load_extension(False)
            self._use_wal()
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA trusted_schema=OFF")
            self._migrate()
        except apsw.Error as exc:
            raise StoreError(
                f"{path}: cannot open the database ({exc})",
                "check the disk and permissions; restore from backup if it is corrupt",
            ) from exc
        self.path = path

    def _use_wal(self, wait_s: float = 10.0) -> None:
        """Switch to WAL. SQLite answers BUSY at once, without the busy handler, when another process is
        creating or converting the same file, so two processes opening a new database together retry."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except apsw.BusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        """Apply pending migrations under the write lock: two processes opening a new database at
        once (the service and a CLI command) must not both apply the same one."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)"
            )
            done = {row[0] for row in self.conn.execute("SELECT name FROM _migrations")}
            for name, sql in migrations.MIGRATIONS:
                if name not in done:
                    self.conn.execute(sql)
                    self.conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, _now()))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # -- conversations (the operator UI's history) ----------------------------------------------
    def new_conversation(self, user: str) -> int:
        with self.conn:
            self.conn.execute("INSERT INTO conversations(started, user) VALUES (?, ?)", (_now(), user))
            return self.conn.last_insert_rowid()

    def conversation_user(self, conversation_id: int) -> str | None:
        """Who started a conversation; None when there is no such conversation."""
        row = self.conn.execute("SELECT user FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return row[0] if row else None

    def add_message(self, conversation_id: int, role: str, content: str, audit_id: int | None = None) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT INTO messages(conversation_id, role, content, audit_id, time) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, audit_id, _now()),
            )

    def answered_turn(self, audit_id: int) -> tuple[str | None, str] | None:
        """(question, answer) of the stored turn whose answer is audit row `audit_id`; None when that
        answer was not kept in a conversation."""
        stored = self.conn.execute(
            "SELECT conversation_id, id, content FROM messages WHERE audit_id = ? AND role = 'assistant'",
            (audit_id,),
        ).fetchone()
        if stored is None:
            return None
        asked = self.conn.execute(
            "SELECT content FROM messages WHERE conversation_id = ? AND id < ? AND "
            "role = 'user' ORDER BY id DESC LIMIT 1",
            (stored[0], stored[1]),
        ).fetchone()
        return (asked[0] if asked else None), stored[2]

    def messages(self, conversation_id: int, limit: int = 1000) -> list[dict]:
        """The newest `limit` messages of a conversation, oldest first."""
        rows = self.conn.execute(
            "SELECT role, content, audit_id, time FROM messages WHERE conversation_id = ? "
            "ORDER BY id DESC LIMIT ?",
            (conversation_id, limit),
        ).fetchall()
        return [{"role": r, "content": c, "audit_id": a, "time": t} for r, c, a, t in reversed(rows)]

    def conversations(self, user: str | None = None, limit: int = 50) -> list[dict]:
        sql = (
            "SELECT c.id, c.started, c.user, (SELECT content FROM messages m WHERE m.conversation_id = c.id "
            "ORDER BY m.id LIMIT 1), (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) "
            "FROM conversations c" + (" WHERE c.user = ?" if user else "") + " ORDER BY c.id DESC LIMIT ?"
        )
        args = (user, limit) if user else (limit,)
        return [
            {"id": i, "started": s, "user": u, "first": f or "", "messages": n}
            for i, s, u, f, n in self.conn.execute(sql, args)
        ]

    def migrations(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT name FROM _migrations ORDER BY name")]

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- vectors ------------------------------------------------------------------------------
    def embedder_id(self) -> tuple[str | None, int | None]:
        dim = self.get_meta("embedder_dim")
        return self.get_meta("embedder_name"), int(dim) if dim else None

    def ensure_embedder(
        self,
        name: str,
        dim: int,
        embed: Callable[[list[str]], np.ndarray],
        progress: Callable[[int, int], None] | None = None,
        batch: int = 256,
    ) -> int:
        """Make the vector index match this embedder; re-embed every chunk if it changed.

        Returns the number of chunks re-embedded (0 when the index already matches).
        """
        if self.embedder_id() == (name, dim):
            return 0
        total = self.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        with self.conn:
            self.conn.execute("DROP TABLE IF EXISTS chunk_vectors")
            self.conn.execute(
                f"CREATE VIRTUAL TABLE chunk_vectors USING vec0("
                f"collection_id INTEGER PARTITION KEY, embedding float[{int(dim)}] distance_metric=cosine)"
            )
            done = 0
            rows = self.conn.execute(
                "SELECT c.id, d.collection_id, c.heading, c.text FROM chunks c "
                "JOIN documents d ON d.id = c.document_id ORDER BY c.id"
            ).fetchall()
            for start in range(0, len(rows), batch):
                part = rows[start : start + batch]
                vectors = embed([embedding_text(h, t) for _, _, h, t in part])
                self.conn.executemany(
                    "INSERT INTO chunk_vectors(rowid, collection_id, embedding) VALUES (?, ?, ?)",
                    [
                        (cid, coll, v.astype(np.float32).tobytes())
                        for (cid, coll, _, _), v in zip(part, vectors, strict=True)
                    ],
                )
                done += len(part)
                if progress:
                    progress(done, total)
            self._set_meta("embedder_name", name)
            self._set_meta("embedder_dim", str(dim))
        self._forget()
        return total

    # -- collections and documents -----------------------------------------------------------
    def collection_id(self, name: str, create: bool = False) -> int:
        row = self.conn.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()
        if row:
            return row[0]
        if not create:
            raise NotFoundError(
                f"no collection named '{name}'", "see `appliance status` for the collections that exist"
            )
        self.conn.execute("INSERT INTO collections(name, created) VALUES (?, ?)", (name, _now()))
        return self.conn.last_insert_rowid()

    def find_document(self, collection: str, sha256: str) -> DocumentRow | None:
        """The document with this content in this collection, if there is one (content is stored once
        per collection)."""
        row = self.conn.execute(
            "SELECT d.id FROM documents d JOIN collections c ON c.id = d.collection_id "
            "WHERE c.name = ? AND d.sha256 = ?",
            (collection, sha256),
        ).fetchone()
        return self.list_documents(doc_id=row[0])[0] if row else None

    @staticmethod
    def _owned(owner: str | None, admin: bool) -> tuple[str, tuple]:
        """SQL (and its arguments) for documents that are `owner`'s; `admin`: also those ingested
        before owners were recorded (an administrator's)."""
        return ("(owner = ?" + (" OR owner IS NULL)" if admin else ")"), (owner,))

    def earlier_versions(
        self, collection: str, source: str, owner: str | None, admin: bool = False, sha256: str | None = None
    ) -> list[int]:
        """Ids of `owner`'s documents recorded under `source` in `collection` (other than `sha256`)."""
        owned, args = self._owned(owner, admin)
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT d.id FROM documents d JOIN collections c ON c.id = d.collection_id "
                f"WHERE c.name = ? AND d.source = ? AND d.sha256 IS NOT ? AND {owned}",
                (collection, source, sha256, *args),
            )
        ]

    def add_document(
        self,
        collection: str,
        source: str,
        title: str,
        kind: str,
        sha256: str,
        size: int,
        chunks: Sequence[NewChunk],
        vectors: np.ndarray,
        owner: str | None = None,
        admin: bool = False,
        record: Callable[[int, list[int]], object] | None = None,
    ) -> tuple[int, list[int]]:
        """Insert a document, its chunks, FTS rows, vectors and table rows in one transaction.

        The owner's document already in the collection under the same source path with different
        content is replaced (the file was edited); another user's never is. `record(doc_id, replaced)`
        runs inside the transaction (the audit row: the document and its row commit together).
        Returns (document id, ids of documents it replaced).
        """
        if self.embedder_id()[1] is None:
            raise StoreError("the vector index has not been set up", "call ensure_embedder first")
        if len(chunks) != len(vectors):
            raise StoreError("chunk and vector counts differ", "this is a bug; please report it")
        try:
            return self._add_document(
                collection, source, title, kind, sha256, size, chunks, vectors, owner, admin, record
            )
        except apsw.Error as exc:  # SQLite has rolled the transaction back (disk full, I/O, read-only)
            raise StoreError(
                f"{self.path}: the database could not be written ({exc}); nothing of {source} was kept",
                "free disk space or fix permissions, then ingest again",
            ) from exc

    def remove_versions(self, doc_ids: Iterable[int], record: Callable[[], object] | None = None) -> None:
        """Delete documents (an edited file's old version) in one transaction with `record`."""
        with self.conn:
            for doc_id in doc_ids:
                self._delete_document(doc_id)
            if record:
                record()
        self._forget()

    def _add_document(
        self,
        collection: str,
        source: str,
        title: str,
        kind: str,
        sha256: str,
        size: int,
        chunks: Sequence[NewChunk],
        vectors: np.ndarray,
        owner: str | None,
        admin: bool,
        record: Callable[[int, list[int]], object] | None,
    ) -> tuple[int, list[int]]:
        with self.conn:
            coll = self.collection_id(collection, create=True)
            replaced = self.earlier_versions(collection, source, owner, admin, sha256)
            for doc_id in replaced:
                self._delete_document(doc_id)
            self.conn.execute(
                "INSERT INTO documents(collection_id, source, title, kind, sha256, size, ingested, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (coll, source, title, kind, sha256, size, _now(), owner),
            )
            doc_id = self.conn.last_insert_rowid()
            for chunk, vector in zip(chunks, vectors, strict=True):
                self.conn.execute(
                    "INSERT INTO chunks(document_id, position, heading, text) VALUES (?, ?, ?, ?)",
                    (doc_id, chunk.position, chunk.heading, chunk.text),
                )
                chunk_id = self.conn.last_insert_rowid()
                self.conn.execute(
                    "INSERT INTO chunk_fts(rowid, heading, text) VALUES (?, ?, ?)",
                    (chunk_id, chunk.heading, chunk.text),
                )
                self.conn.execute(
                    "INSERT INTO chunk_vectors(rowid, collection_id, embedding) VALUES (?, ?, ?)",
                    (chunk_id, coll, vector.astype(np.float32).tobytes()),
                )
                if chunk.row is not None:
                    self.conn.execute(
                        "INSERT INTO ref_rows(document_id, chunk_id, row_index, code, title, data) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            doc_id,
                            chunk_id,
                            chunk.position,
                            chunk.row.get("code"),
                            chunk.row.get("title"),
                            json.dumps(chunk.row["data"]),
                        ),
                    )
            if record:
                record(doc_id, replaced)
        self._forget()
        return doc_id, replaced

    def _forget(self) -> None:
        """Drop what was derived from the old contents (our own commits call this directly)."""
        self._cache = None
        self._term_counts = {}
        self._titles = None

    def _follow_other_writers(self) -> None:
        """Another connection's commit bumps PRAGMA data_version: then forget what we derived."""
        version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._seen_version:
            self._forget()
            self._seen_version = version

    def _delete_document(self, doc_id: int) -> None:
        ids = [r[0] for r in self.conn.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))]
        for chunk_id in ids:
            self.conn.execute("DELETE FROM chunk_fts WHERE rowid = ?", (chunk_id,))
            self.conn.execute("DELETE FROM chunk_vectors WHERE rowid = ?", (chunk_id,))
        self.conn.execute("DELETE FROM ref_rows WHERE document_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def document(self, doc_id: int) -> DocumentRow:
        docs = self.list_documents(doc_id=doc_id) if 0 < doc_id < 1 << 63 else []
        if not docs:
            raise NotFoundError(f"no document with id {doc_id}", "see `appliance docs list` for ids")
        return docs[0]

    def remove_document(
        self, doc_id: int, record: Callable[[DocumentRow], object] | None = None
    ) -> DocumentRow:
        """Delete a document; `record(row)` runs in the same transaction (its audit row)."""
        row = self.document(doc_id)
        with self.conn:
            self._delete_document(doc_id)
            if record:
                record(row)
        self._forget()
        return row

    def list_documents(self, collection: str | None = None, doc_id: int | None = None) -> list[DocumentRow]:
        sql = (
            "SELECT d.id, c.name, d.source, d.title, d.kind, d.sha256, d.size, d.ingested, "
            "(SELECT count(*) FROM chunks WHERE document_id = d.id), d.owner "
            "FROM documents d JOIN collections c ON c.id = d.collection_id"
        )
        where = [
            (clause, value)
            for clause, value in (("c.name = ?", collection), ("d.id = ?", doc_id))
            if value is not None
        ]
        if where:
            sql += " WHERE " + " AND ".join(clause for clause, _ in where)
        return [DocumentRow(*row) for row in self.conn.execute(sql + " ORDER BY d.id", [v for _, v in where])]

    def collection_stats(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT c.name, count(DISTINCT d.id), count(ch.id) FROM collections c "
            "LEFT JOIN documents d ON d.collection_id = c.id LEFT JOIN chunks ch ON ch.document_id = d.id "
            "GROUP BY c.id ORDER BY c.name"
        )
        return [{"name": n, "documents": d, "chunks": k} for n, d, k in rows]

    # -- retrieval ----------------------------------------------------------------------------
    def keyword_search(self, match: str, k: int, collection_id: int | None = None) -> list[tuple[int, float]]:
        """FTS5 BM25 top-k as (chunk id, bm25) with the best (most negative) first."""
        if collection_id is None:
            sql = "SELECT rowid, bm25(chunk_fts, 0.5, 1.0) AS s FROM chunk_fts WHERE chunk_fts MATCH ? ORDER BY s LIMIT ?"
            args: tuple = (match, k)
        else:
            sql = (
                "SELECT f.rowid, bm25(chunk_fts, 0.5, 1.0) AS s FROM chunk_fts f "
                "JOIN chunks c ON c.id = f.rowid JOIN documents d ON d.id = c.document_id "
                "WHERE chunk_fts MATCH ? AND d.collection_id = ? ORDER BY s LIMIT ?"
            )
            args = (match, collection_id, k)
        try:
            return [(row[0], row[1]) for row in self.conn.execute(sql, args)]
        except apsw.SQLError as exc:
            raise StoreError(f"keyword query could not be run ({exc})", "simplify the query") from exc

    def term_document_counts(self, terms: Iterable[str]) -> dict[str, int]:
        """How many chunks contain each (lower-case) term; 0 for absent ones.

        FTS5 counts by walking the term's postings (about 1 ms for a common word in 100k chunks),
        so counts are remembered until the database changes.
        """
        self._follow_other_writers()
        if len(self._term_counts) > TERM_COUNTS_KEPT:  # questions' words, hostile ones too: bounded
            self._term_counts.clear()
        for term in dict.fromkeys(terms):
            if term not in self._term_counts:
                row = self.conn.execute("SELECT doc FROM chunk_fts_terms WHERE term = ?", (term,)).fetchone()
                self._term_counts[term] = row[0] if row else 0
        return {t: self._term_counts[t] for t in terms}

    def vector_search(
        self, vector: np.ndarray, k: int, collection_id: int | None = None
    ) -> list[tuple[int, float]]:
        """vec0 KNN as (chunk id, cosine distance), nearest first."""
        dim = self.embedder_id()[1]
        if dim is None:
            return []
        if self.cache_vectors:
            self._follow_other_writers()
            if self._cache is None:
                self._cache = _VectorCache(self.conn, dim)
            return self._cache.search(vector, k, collection_id)
        blob = vector.astype(np.float32).tobytes()
        if collection_id is None:
            rows = self.conn.execute(
                "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ?", (blob, k)
            )
        else:
            rows = self.conn.execute(
                "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? "
                "AND collection_id = ?",
                (blob, k, collection_id),
            )
        return [(row[0], row[1]) for row in rows]

    def chunks(self, ids: Iterable[int]) -> dict[int, ChunkRow]:
        ids = list(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            "SELECT c.id, d.id, d.source, d.title, c.heading, c.position, c.text, d.sha256, col.name, d.owner "
            "FROM chunks c JOIN documents d ON d.id = c.document_id JOIN collections col ON col.id = d.collection_id "
            f"WHERE c.id IN ({marks})",
            ids,
        )
        return {row[0]: ChunkRow(*row) for row in rows}

    def document_text(self, doc_id: int, chars: int) -> str:
        """A document's first `chars` characters of text, from its chunks in order."""
        parts, size = [], 0
        for (text,) in self.conn.execute(
            "SELECT text FROM chunks WHERE document_id = ? ORDER BY position", (doc_id,)
        ):
            parts.append(text)
            size += len(text)
            if size >= chars:
                break
        return "\n\n".join(parts)[:chars]

    def _in_reference(self, column: str) -> str:
        return f"{column} IN ({', '.join('?' * len(self.reference))})" if self.reference else "0"

    def ref_rows(self, collection_id: int | None = None) -> list[dict]:
        """Every reference-table row with its document and collection."""
        sql = (
            "SELECT r.code, r.title, r.data, d.source, c.name, r.chunk_id FROM ref_rows r "
            "JOIN documents d ON d.id = r.document_id JOIN collections c ON c.id = d.collection_id "
            f"WHERE {self._in_reference('c.name')}"
        )
        args: tuple = self.reference
        if collection_id is not None:
            sql += " AND d.collection_id = ?"
            args = (*args, collection_id)
        return [
            {
                "code": code,
                "title": title,
                "data": json.loads(data),
                "source": source,
                "collection": coll,
                "chunk_id": chunk_id,
            }
            for code, title, data, source, coll, chunk_id in self.conn.execute(sql, args)
        ]

    def ref_titles(self) -> TitleIndex:
        """Reference-table rows by lower-case title: {"code", "title", "source", "chunk_id", "collection"};
        remembered until the database changes."""
        self._follow_other_writers()
        if self._titles is None:
            titles: dict[str, list[dict]] = {}
            for row in self.conn.execute(
                "SELECT r.code, r.title, d.source, r.chunk_id, d.collection_id FROM ref_rows r "
                "JOIN documents d ON d.id = r.document_id JOIN collections c ON c.id = d.collection_id "
                f"WHERE r.title IS NOT NULL AND r.title != '' AND {self._in_reference('c.name')}",
                self.reference,
            ):
                code, title, source, chunk_id, coll = row
                titles.setdefault(title.lower(), []).append(
                    {
                        "code": code,
                        "title": title,
                        "source": source,
                        "chunk_id": chunk_id,
                        "collection_id": coll,
                    }
                )
            self._titles = TitleIndex(titles)
        return self._titles

    def ref_chunks_for_code(self, code: str, collection_id: int | None = None) -> list[int]:
        """Chunk ids of reference rows whose code is this code or starts with it."""
        sql = (
            "SELECT r.chunk_id FROM ref_rows r JOIN documents d ON d.id = r.document_id "
            "JOIN collections c ON c.id = d.collection_id "
            f"WHERE (r.code = ? OR r.code LIKE ? ESCAPE '\\') AND {self._in_reference('c.name')}"
        )
        args: list = [code, code.replace("%", "\\%").replace("_", "\\_") + "%", *self.reference]
        if collection_id is not None:
            sql += " AND d.collection_id = ?"
            args.append(collection_id)
        return [row[0] for row in self.conn.execute(sql + " ORDER BY r.code = ? DESC, r.code", [*args, code])]


def embedding_text(heading: str, text: str) -> str:
    """What the embedder sees for a chunk: its section heading gives a paragraph its context."""
    return f"{heading}\n{text}" if heading and not text.startswith(heading) else text
