"""Operator feedback on answers, and the signed export that carries it back to the builder.

Feedback hangs on the audit row of an answer (`ask`): its question and answer text come from the
stored conversation, the audit row itself (audit_text) or the caller, and are checked against the
row's sha256s, so feedback can only ever be about what the model really said. The sources are the
ones the row names (the operator saw them in the sources panel), with their text as it is now,
provided the document has not changed since (`doc_sha256`).

Kinds: `good`, `bad`, `correction` (with the corrected answer), `irrelevant_source` (a source
number of the answer), `missing_source` (a chunk that should have been found). Each is audited.

The export (format `appliance-feedback/1`) is a directory:
  sft.jsonl        {"messages": [system, user with the sources, assistant]} from approved and corrected answers
  dpo.jsonl        {"prompt": [system, user], "chosen": correction, "rejected": the model's answer}
  retrieval.jsonl  {"query", "label": "relevant"|"irrelevant", "chunk_id", "doc_sha256", "source", "text"}
  ratings.jsonl    {"question", "answer", "rating": "good"|"bad", "note"}
  manifest.json    export id, creation time, the appliance's key id and public key, every file's
                   sha256/bytes/records, counts, feedback ids, models judged
  manifest.sig     base64 ed25519 signature of manifest.json's exact bytes (appliance.bundles.identity)
Every record carries `feedback`: {id, kind, answer_audit_id, model_sha256, generation, question}. Nothing
else leaves: no document text beyond the sources shown with the answers that were judged.
`verify_export` is the builder's check of all of this; it lives here, beside the writer.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.bundles import identity
from appliance.bundles.manifest import utc_stamp
from appliance.engine.prompt import build_messages, format_source, source_title
from appliance.errors import FeedbackError, NotFoundError
from appliance.records.audit import entry, os_user, sha256_text
from appliance.schemas import FeedbackRecorded

FORMAT = "appliance-feedback/1"
KINDS = ("good", "bad", "correction", "irrelevant_source", "missing_source")
FILES = ("sft.jsonl", "dpo.jsonl", "retrieval.jsonl", "ratings.jsonl")
MAX_TEXT = 16_000


@dataclass
class Item:
    """One stored feedback row."""

    id: int
    time: str
    user: str
    answer_audit_id: int
    kind: str
    question: str
    answer: str
    sources: list[dict]
    correction: str | None = None
    source_n: int | None = None
    chunk: dict | None = None
    note: str | None = None
    model_sha256: str | None = None
    generation: int | None = None
    audit_id: int | None = None
    export_id: str | None = None

    def to_json(self) -> dict:
        return dict(vars(self))

    def tag(self) -> dict:
        """What every exported record says of where it came from (the question as asked, for the
        builder's held-out split and eval questions)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "answer_audit_id": self.answer_audit_id,
            "model_sha256": self.model_sha256,
            "generation": self.generation,
            "question": self.question,
        }

    def prompt(self) -> list[dict] | None:
        """The messages the model answered, rebuilt from the sources; None when a source's text is gone."""
        if any(s["text"] is None for s in self.sources):
            return None
        blocks = [format_source(s["n"], s["title"], s["text"]) for s in self.sources]
        return build_messages(self.question, blocks, use_rag=bool(self.sources))


_COLUMNS = (
    "id",
    "time",
    "user",
    "answer_audit_id",
    "kind",
    "question",
    "answer",
    "sources",
    "correction",
    "source_n",
    "chunk",
    "note",
    "model_sha256",
    "generation",
    "audit_id",
    "export_id",
)


def _item(values) -> Item:
    row = dict(zip(_COLUMNS, values, strict=True))
    row["sources"] = json.loads(row["sources"])
    row["chunk"] = json.loads(row["chunk"]) if row["chunk"] else None
    return Item(**row)


def answer_texts(
    store, audit_id: int, detail: dict, question: str | None, answer: str | None
) -> tuple[str, str]:
    """The question and answer of an `ask` audit row (`store`: appliance.retrieval.store.Store, which keeps the
    conversations), proven against its sha256s."""
    if question is None or answer is None:
        turn = store.answered_turn(audit_id)
        if turn:
            question, answer = turn
        elif "question" in detail and "answer" in detail:  # kept in full (audit_text)
            question, answer = detail["question"], detail["answer"]
        else:
            raise FeedbackError(
                f"answer {audit_id} was not kept in a conversation and its text is not in the audit log",
                "send the question and the answer with the feedback (they are "
                "checked against the audit row's sha256)",
            )
    if question is None or sha256_text(question) != detail.get("question_sha256"):
        raise FeedbackError(
            f"the question does not match audit row {audit_id}", "send the question exactly as it was asked"
        )
    answer = answer.strip()
    if sha256_text(answer) != detail.get("answer_sha256"):
        raise FeedbackError(
            f"the answer does not match audit row {audit_id}",
            "send the answer exactly as the appliance returned it",
        )
    return question, answer


def chunk_json(row) -> dict:
    """A chunk as feedback keeps it: what the operator saw of it, titled as in the prompt."""
    return {
        "chunk_id": row.chunk_id,
        "doc_sha256": row.doc_sha256,
        "source": row.source,
        "title": source_title(row.title, row.heading),
        "text": row.text,
    }


def answer_sources(store, detail: dict) -> list[dict]:
    """The sources an answer was given, numbered as the model saw them; `text` None when the
    document changed or was removed since."""
    refs = detail.get("chunks") or []
    rows = store.chunks([r["chunk_id"] for r in refs])
    sources = []
    for n, ref in enumerate(refs, start=1):
        row = rows.get(ref["chunk_id"])
        shown = chunk_json(row) if row else {"source": None, "title": None}
        if row is None or row.doc_sha256 != ref["doc_sha256"]:
            shown["text"] = None
        sources.append({**shown, "n": n, "chunk_id": ref["chunk_id"], "doc_sha256": ref["doc_sha256"]})
    return sources


def add(
    conn,
    *,
    user: str,
    answer_audit_id: int,
    kind: str,
    question: str,
    answer: str,
    sources: list[dict],
    correction: str | None,
    source_n: int | None,
    chunk: dict | None,
    note: str | None,
    model_sha256: str | None,
    generation: int | None,
) -> int:
    with conn:
        conn.execute(
            "INSERT INTO feedback(time, user, answer_audit_id, kind, question, answer, sources, correction, source_n, "
            "chunk, note, model_sha256, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                utc_stamp(),
                user,
                answer_audit_id,
                kind,
                question,
                answer,
                json.dumps(sources),
                correction,
                source_n,
                json.dumps(chunk) if chunk else None,
                note,
                model_sha256,
                generation,
            ),
        )
        return conn.last_insert_rowid()


def record(
    store,
    answer_audit_id: int,
    kind: str,
    *,
    write_audit: Callable[[dict], int],
    correction: str | None = None,
    source: int | None = None,
    chunk_id: int | None = None,
    note: str | None = None,
    question: str | None = None,
    answer: str | None = None,
    user: str | None = None,
    admin: bool = True,
) -> FeedbackRecorded:
    """Feedback on the answer of audit row `answer_audit_id`, checked and stored; `write_audit(detail)`
    records it and returns the audit row's id. `source`: the [n] an `irrelevant_source` names;
    `chunk_id`: the chunk a `missing_source` adds; `question`/`answer`: only for answers kept nowhere
    else, checked against the row's sha256s. Not `admin` (an operator over the socket): only on
    `user`'s own answers; another user's answer gets the same NotFoundError as one that does not
    exist, so ids tell nothing."""
    if kind not in KINDS:
        raise FeedbackError(f"unknown feedback kind {kind!r}", f"one of: {', '.join(KINDS)}")
    for name, text in (("correction", correction), ("note", note)):
        if text is not None and len(text) > MAX_TEXT:
            raise FeedbackError(f"the {name} is {len(text)} characters; at most {MAX_TEXT}", "shorten it")
    row = entry(store.conn, answer_audit_id)
    if row is None or row[0] != "ask" or not (admin or row[4] == user):
        raise NotFoundError(
            f"audit row {answer_audit_id} is not an answer" + ("" if admin else " of yours"),
            "give the audit_id an answer returned (`appliance audit list --action ask`)",
        )
    detail = row[1]
    asked, answered = answer_texts(store, answer_audit_id, detail, question, answer)
    sources = answer_sources(store, detail)
    chunk = None
    if kind == "correction" and not (correction or "").strip():
        raise FeedbackError(
            "a correction needs the corrected answer", "write what the answer should have been"
        )
    if kind == "irrelevant_source" and not (source and 1 <= source <= len(sources)):
        raise FeedbackError(
            f"source {source} is not one of the answer's {len(sources)} sources",
            f"give a number from 1 to {len(sources)}" if sources else "this answer had none",
        )
    if kind == "missing_source":
        found = store.chunks([chunk_id]).get(chunk_id) if chunk_id else None
        if found is None:
            raise FeedbackError(
                f"no chunk {chunk_id}", "find it with `appliance search` (chunk_id in --json)"
            )
        chunk = chunk_json(found)
    fid = add(
        store.conn,
        user=user or os_user(),
        answer_audit_id=answer_audit_id,
        kind=kind,
        question=asked,
        answer=answered,
        sources=sources,
        correction=correction.strip() if correction else None,
        source_n=source if kind == "irrelevant_source" else None,
        chunk=chunk,
        note=note,
        model_sha256=row[2],
        generation=row[3],
    )
    row_id = write_audit(
        {
            "feedback_id": fid,
            "answer_audit_id": answer_audit_id,
            "kind": kind,
            **({"correction_sha256": sha256_text(correction.strip())} if correction else {}),
            **({"source": source} if kind == "irrelevant_source" else {}),
            **({"chunk_id": chunk_id} if chunk else {}),
        }
    )
    link_audit(store.conn, fid, row_id)
    return FeedbackRecorded(id=fid, kind=kind, answer_audit_id=answer_audit_id, audit_id=row_id)


def link_audit(conn, feedback_id: int, audit_id: int) -> None:
    with conn:
        conn.execute("UPDATE feedback SET audit_id = ? WHERE id = ?", (audit_id, feedback_id))


def items(conn, pending_only: bool = False, since: str | None = None, limit: int | None = None) -> list[Item]:
    sql, args = f"SELECT {', '.join(_COLUMNS)} FROM feedback", []
    where = []
    if pending_only:
        where.append("export_id IS NULL")
    if since:
        where.append("time >= ?")
        args.append(since)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit:
        sql += " DESC LIMIT ?"
        args.append(limit)
    found = [_item(v) for v in conn.execute(sql, args)]
    return sorted(found, key=lambda i: i.id)


# -- the export --------------------------------------------------------------------------------------


@dataclass
class Export:
    """A signed export, built in memory; written by whoever holds the destination (`write`)."""

    export_id: str
    files: dict[str, bytes]
    manifest: bytes
    signature: str
    feedback_ids: list[int]
    counts: dict = field(default_factory=dict)

    def write(self, out: Path) -> None:
        """Into `out` (absent or empty), through a sibling directory renamed at the end: an
        interrupted write leaves no export that looks complete."""
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FeedbackError(f"{out} exists and is not an empty directory", "choose a new directory")
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        for name, data in {
            **self.files,
            "manifest.json": self.manifest,
            "manifest.sig": self.signature.encode() + b"\n",
        }.items():
            (partial / name).write_bytes(data)
        if out.exists():
            out.rmdir()
        partial.rename(out)


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def build(chosen: list[Item], ident: identity.Identity, since: str | None = None) -> Export:
    """The datasets of `chosen`, the manifest and its signature."""
    sft, dpo, retrieval, ratings = [], [], [], []
    incomplete = []
    for item in chosen:
        prompt = item.prompt()
        if item.kind in ("good", "bad"):
            ratings.append(
                {
                    "question": item.question,
                    "answer": item.answer,
                    "rating": item.kind,
                    "note": item.note,
                    "feedback": item.tag(),
                }
            )
        if item.kind in ("good", "correction"):
            if prompt is None:
                incomplete.append(item.id)
                continue
            reply = item.answer if item.kind == "good" else item.correction
            sft.append(
                {"messages": [*prompt, {"role": "assistant", "content": reply}], "feedback": item.tag()}
            )
            if item.kind == "correction":
                dpo.append(
                    {
                        "prompt": prompt,
                        "chosen": item.correction,
                        "rejected": item.answer,
                        "feedback": item.tag(),
                    }
                )
        elif item.kind == "irrelevant_source":
            source = item.sources[item.source_n - 1]
            if source["text"] is None:
                incomplete.append(item.id)
                continue
            retrieval.append(
                {"query": item.question, "label": "irrelevant", **_judged(source), "feedback": item.tag()}
            )
        elif item.kind == "missing_source":
            retrieval.append(
                {"query": item.question, "label": "relevant", **_judged(item.chunk), "feedback": item.tag()}
            )
    records = {"sft.jsonl": sft, "dpo.jsonl": dpo, "retrieval.jsonl": retrieval, "ratings.jsonl": ratings}
    files = {name: _jsonl(rows) for name, rows in records.items()}
    export_id = str(uuid.uuid4())
    manifest = {
        "format": FORMAT,
        "export_id": export_id,
        "created": utc_stamp(),
        "since": since,
        "appliance": {"key_id": ident.key_id, "public_key": ident.public_pem},
        "files": {
            name: {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "records": len(records[name]),
            }
            for name, data in files.items()
        },
        "feedback_ids": [i.id for i in chosen],
        "skipped_sources_changed": incomplete,
        "models": sorted({i.model_sha256 for i in chosen if i.model_sha256}),
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return Export(
        export_id,
        files,
        data,
        ident.sign(data),
        [i.id for i in chosen],
        {name: len(rows) for name, rows in records.items()},
    )


def _judged(source: dict) -> dict:
    return {k: source[k] for k in ("chunk_id", "doc_sha256", "source", "title", "text")}


def mark_exported(conn, ids: list[int], export_id: str) -> None:
    with conn:
        conn.executemany("UPDATE feedback SET export_id = ? WHERE id = ?", [(export_id, i) for i in ids])


# -- the builder's check -------------------------------------------------------------------------------


@dataclass
class VerifiedExport:
    directory: Path
    manifest: dict
    manifest_sha256: str
    records: dict[str, list[dict]]


def verify_export(directory: Path, trusted: dict[str, object]) -> VerifiedExport:
    """Check an export against trusted appliance keys ({key_id: Ed25519PublicKey}): the signature by
    a trusted key, then every file's bytes and sha256; no file missing, none extra. FeedbackError
    naming the file otherwise."""
    manifest_path, sig_path = directory / "manifest.json", directory / "manifest.sig"
    for path in (manifest_path, sig_path):
        if not path.is_file():
            raise FeedbackError(f"{path}: missing", "copy the whole export directory")
    data = manifest_path.read_bytes()
    try:
        manifest = json.loads(data)
        key_id = manifest["appliance"]["key_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FeedbackError(f"{manifest_path}: not a feedback manifest ({exc})", "export again") from exc
    if key_id not in trusted:
        raise FeedbackError(
            f"{manifest_path}: signed by appliance key {key_id}, which is not trusted "
            f"(trusted: {', '.join(sorted(trusted)) or 'none'})",
            "pass that appliance's appliance.pub with --trust, if it is yours",
        )
    if not identity.verify(trusted[key_id], data, sig_path.read_text().strip()):
        raise FeedbackError(
            f"{manifest_path}: the signature does not verify with key {key_id} (altered after export)",
            "export again on the appliance",
        )
    if manifest.get("format") != FORMAT:
        raise FeedbackError(
            f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT}",
            "use a builder that reads this format",
        )
    listed = manifest.get("files") or {}
    extra = sorted(
        p.name for p in directory.iterdir() if p.name not in {*listed, "manifest.json", "manifest.sig"}
    )
    if extra:
        raise FeedbackError(
            f"{directory / extra[0]}: not in the signed manifest", "remove it, or export again"
        )
    records = {}
    for name, meta in listed.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise FeedbackError(f"{path}: missing", "copy the whole export directory")
        blob = path.read_bytes()
        if len(blob) != meta["bytes"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise FeedbackError(
                f"{path}: does not match the signed manifest (sha256 or length differs)",
                "the file was altered or damaged; export again",
            )
        records[name] = [json.loads(line) for line in blob.decode().splitlines() if line.strip()]
    return VerifiedExport(directory, manifest, hashlib.sha256(data).hexdigest(), records)
