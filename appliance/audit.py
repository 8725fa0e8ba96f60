"""The tamper-evident audit log: one row per answer, ingest, removal and install, chained by sha256.

Each row's `row_hash` is the sha256 of the previous row's hash and the row's own content (canonical
JSON), so altering, inserting or deleting a row breaks every hash after it; `verify` recomputes the
chain and names the first row that does not match. The tail of the log can only be proven against a
copy exported earlier (`export`), which is why exports carry the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import apsw

GENESIS = "0" * 64


def os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid:{os.geteuid()}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _row_hash(prev_hash: str, row: dict) -> str:
    content = json.dumps({k: row[k] for k in ("id", "time", "user", "action", "model_sha256", "generation",
                                              "detail")}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + content).encode("utf-8")).hexdigest()


def append(conn: apsw.Connection, action: str, detail: dict, *, user: str | None = None,
           model_sha256: str | None = None, generation: int | None = None) -> dict:
    """Append one row; the read of the last hash and the insert are one immediate transaction, so
    two processes appending at once still form one chain."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        last = conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        row = {"id": (last[0] + 1) if last else 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "user": user or os_user(), "action": action, "model_sha256": model_sha256,
               "generation": generation, "detail": json.dumps(detail, sort_keys=True, separators=(",", ":"))}
        row["prev_hash"] = last[1] if last else GENESIS
        row["row_hash"] = _row_hash(row["prev_hash"], row)
        conn.execute("INSERT INTO audit(id, time, user, action, model_sha256, generation, detail, prev_hash, "
                     "row_hash) VALUES (:id, :time, :user, :action, :model_sha256, :generation, :detail, "
                     ":prev_hash, :row_hash)", row)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return row


_COLUMNS = ("id", "time", "user", "action", "model_sha256", "generation", "detail", "prev_hash", "row_hash")


def rows(conn: apsw.Connection, action: str | None = None, user: str | None = None,
         limit: int | None = None) -> Iterator[dict]:
    sql, args = f"SELECT {', '.join(_COLUMNS)} FROM audit", []
    where = [(c, v) for c, v in (("action", action), ("user", user)) if v]
    if where:
        sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
        args = [v for _, v in where]
    sql += " ORDER BY id" + (" DESC LIMIT ?" if limit else "")
    if limit:
        args.append(limit)
    for values in conn.execute(sql, args):
        yield dict(zip(_COLUMNS, values, strict=True))


def verify_rows(entries: Iterator[dict]) -> tuple[int, int | None]:
    """(rows checked, id of the first row whose chain breaks or None)."""
    prev, count = GENESIS, 0
    for row in entries:
        count += 1
        if row["prev_hash"] != prev or _row_hash(prev, row) != row["row_hash"]:
            return count, row["id"]
        prev = row["row_hash"]
    return count, None


def export(conn: apsw.Connection, out: Path) -> int:
    """JSON lines, oldest first, with the chain: checkable without this software (see the README)."""
    n = 0
    with open(out, "w") as fh:
        for row in rows(conn):
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            n += 1
    return n
