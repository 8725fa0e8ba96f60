"""The tamper-evident audit log: one row per answer, ingest, removal and install, chained by sha256.

Each row's `row_hash` is the sha256 of the previous row's hash and the row's own content (canonical
JSON), so altering, inserting or deleting a row breaks every hash after it; `verify_rows` recomputes
the chain and names the first row that does not match.

A chain alone cannot show that rows were cut from its end, that it was rebuilt after an edit, or
that an older copy of the database was put back: each of those is a valid chain. So every committed
row is anchored outside the database: a checkpoint line (row count, head hash, time), signed with
the appliance's identity key, appended and fsynced to `<home>/audit/checkpoints`. `verify` checks
the database against every checkpoint and says what is missing; exports carry the checkpoints, and
`verify_export` checks an export against the head it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw

from appliance.bundles.manifest import utc_stamp
from appliance.errors import StoreError

GENESIS = "0" * 64
CHECKPOINTS = Path("audit") / "checkpoints"
MAX_CHECKPOINT_LINE = 2048


def os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid:{os.geteuid()}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _row_hash(prev_hash: str, row: dict) -> str:
    content = json.dumps(
        {k: row[k] for k in ("id", "time", "user", "action", "model_sha256", "generation", "detail")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256((prev_hash + content).encode("utf-8")).hexdigest()


def _missing_table(exc: apsw.Error) -> StoreError:
    return StoreError(
        f"the audit log cannot be written ({exc}); nothing was done unaudited",
        "the audit table is missing or damaged: restore appliance.db from a backup, then "
        "`appliance audit verify`",
    )


def ready(conn: apsw.Connection, signer=None, home: Path | None = None) -> None:
    """Raise StoreError unless the audit table is there and (with `signer`) its head is one this
    appliance wrote: checked before work that must be audited, so none is done in vain."""
    try:
        conn.execute("SELECT id FROM audit LIMIT 0").fetchall()
    except apsw.SQLError as exc:
        raise _missing_table(exc) from exc
    if signer is not None:
        _check_head(conn, signer, home)


def append(
    conn: apsw.Connection,
    action: str,
    detail: dict,
    *,
    user: str | None = None,
    model_sha256: str | None = None,
    generation: int | None = None,
    signer=None,
    home: Path | None = None,
) -> dict:
    """Append one row. Outside a transaction, the read of the last hash and the insert are one
    immediate transaction, so two processes appending at once still form one chain. Inside one (an
    ingest writes each document and its row together), the caller's writes already hold the lock.

    `signer` (appliance.bundles.identity.Identity): the row is signed, and the head it extends must be one this
    appliance wrote (_check_head, with the checkpoints under `home`); StoreError otherwise, so rows
    someone else added are never extended or anchored."""
    own = not conn.in_transaction
    try:
        if own:
            conn.execute("BEGIN IMMEDIATE")
        try:
            if signer is not None:
                _check_head(conn, signer, home)
            last = head(conn)
            row = {
                "id": (last[0] + 1) if last else 1,
                "time": utc_stamp(),
                "user": user or os_user(),
                "action": action,
                "model_sha256": model_sha256,
                "generation": generation,
                "detail": json.dumps(detail, sort_keys=True, separators=(",", ":")),
            }
            row["prev_hash"] = last[1] if last else GENESIS
            row["row_hash"] = _row_hash(row["prev_hash"], row)
            row["signature"] = signer.sign(row["row_hash"].encode()) if signer is not None else None
            conn.execute(
                "INSERT INTO audit(id, time, user, action, model_sha256, generation, detail, prev_hash, "
                "row_hash, signature) VALUES (:id, :time, :user, :action, :model_sha256, :generation, "
                ":detail, :prev_hash, :row_hash, :signature)",
                row,
            )
            if own:
                conn.execute("COMMIT")
        except BaseException:
            if own:
                conn.execute("ROLLBACK")
            raise
    except apsw.SQLError as exc:
        if "no such table" in str(exc) or "no such column" in str(exc):
            raise _missing_table(exc) from exc
        raise
    return row


_HASHED = ("id", "time", "user", "action", "model_sha256", "generation", "detail", "prev_hash", "row_hash")
_COLUMNS = (*_HASHED, "signature")


def signed_by(row: dict, public) -> bool:
    """Whether `row` carries this appliance's signature of its row_hash."""
    from appliance.bundles import identity

    sig = row.get("signature")
    return isinstance(sig, str) and identity.verify(public, str(row["row_hash"]).encode(), sig)


def _check_head(conn: apsw.Connection, signer, home: Path | None) -> None:
    """StoreError unless the log's head is a row this appliance wrote, where it wrote it: its hash
    recomputed from its content and its link to the row before it, signed by this appliance's key
    (the private key's own public half, not appliance.pub), and no shorter than the newest checkpoint
    (rows cut back to an older signed head). A log no row of which is signed (written before rows were
    signed, or before the first checkpoint) is extended: its head is anchored by the next row."""
    rows = [
        dict(zip(_COLUMNS, v, strict=True))
        for v in conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY id DESC LIMIT 2")
    ]
    if not rows:
        return
    top, below = rows[0], (rows[1] if len(rows) > 1 else None)
    public = signer.own_public
    newest = newest_checkpoint(home, public) if home is not None else None
    why = None
    if newest is not None and newest["rows"] > top["id"]:
        why = f"the log ends at row {top['id']} but a checkpoint counted {newest['rows']} rows: rows were cut"
    elif _row_hash(top["prev_hash"], top) != top["row_hash"] or top["prev_hash"] != (
        below["row_hash"] if below else GENESIS
    ):
        why = f"row {top['id']}'s hash or its link to the row before it does not hold"
    elif (
        not signed_by(top, public)
        and not (newest is not None and (newest["rows"], newest["head"]) == (top["id"], top["row_hash"]))
        and conn.execute("SELECT 1 FROM audit WHERE signature IS NOT NULL LIMIT 1").fetchone() is not None
    ):
        why = f"row {top['id']} carries no signature of this appliance's key and no checkpoint anchors it"
    if why:
        raise StoreError(
            f"the audit log's head was not written by this appliance ({why}): something else wrote to "
            "the database; nothing more is recorded or answered until that is resolved",
            "run `appliance audit verify`: an administrator removes the rows it names or restores "
            "appliance.db from a backup",
        )


def head(conn) -> tuple[int, str] | None:
    """(id, row_hash) of the newest row, or None for an empty log."""
    last = conn.execute("SELECT id, row_hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    return (last[0], last[1]) if last else None


def entry(conn, audit_id: int) -> tuple[str, dict, str | None, int | None, str] | None:
    """(action, detail, model_sha256, generation, user) of row `audit_id`, or None."""
    row = conn.execute(
        "SELECT action, detail, model_sha256, generation, user FROM audit WHERE id = ?", (audit_id,)
    ).fetchone()
    return (row[0], json.loads(row[1]), row[2], row[3], row[4]) if row else None


def rows(
    conn: apsw.Connection, action: str | None = None, user: str | None = None, limit: int | None = None
) -> Iterator[dict]:
    sql, args = f"SELECT {', '.join(_COLUMNS)} FROM audit", []
    where = [(c, v) for c, v in (("action", action), ("user", user)) if v]
    if where:
        sql += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
        args = [v for _, v in where]
    sql += " ORDER BY id" + (" DESC LIMIT ?" if limit else "")
    if limit:
        args.append(limit)
    try:
        cursor = conn.execute(sql, args)
    except apsw.SQLError as exc:
        raise _missing_table(exc) from exc
    for values in cursor:
        yield dict(zip(_COLUMNS, values, strict=True))


def verify_rows(entries: Iterable[dict]) -> tuple[int, int | None]:
    """(rows checked, id of the first row whose chain breaks or None)."""
    prev, count = GENESIS, 0
    for row in entries:
        count += 1
        if row["prev_hash"] != prev or _row_hash(prev, row) != row["row_hash"]:
            return count, row["id"]
        prev = row["row_hash"]
    return count, None


# -- checkpoints: the chain anchored outside the database ------------------------------------------


def _signed(rows_count: int, head: str, when: str) -> bytes:
    return json.dumps(
        {"rows": rows_count, "head": head, "time": when}, sort_keys=True, separators=(",", ":")
    ).encode()


def checkpoint(home: Path, identity, rows_count: int, head: str) -> dict:
    """Append a signed (row count, head hash) line and fsync it; the directory is private."""
    when = utc_stamp()
    line = {
        "rows": rows_count,
        "head": head,
        "time": when,
        "key_id": identity.key_id,
        "signature": identity.sign(_signed(rows_count, head, when)),
    }
    path = home / CHECKPOINTS
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())  # one write: lines never interleave
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


def newest_checkpoint(home: Path, public) -> dict | None:
    """The last line of the checkpoint file, if its signature holds (read from the file's end)."""
    try:
        with open(home / CHECKPOINTS, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 2 * MAX_CHECKPOINT_LINE))
            tail = fh.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    good, _ = read_checkpoints([line for line in tail[-1:] if line.strip()], public)
    return good[0] if good else None


def read_checkpoints(lines: Iterable[str], public) -> tuple[list[dict], list[str]]:
    """(checkpoints whose signature holds, problems) from checkpoint lines."""
    from appliance.bundles import identity

    good, problems = [], []
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            if len(text) > MAX_CHECKPOINT_LINE:
                raise ValueError("line too long")
            cp = json.loads(text)
            ok = identity.verify(
                public, _signed(int(cp["rows"]), str(cp["head"]), str(cp["time"])), str(cp["signature"])
            )
        except (ValueError, KeyError, TypeError):
            ok, cp = False, None
        if not ok:
            problems.append(f"checkpoint line {n} is not signed by this appliance's key (forged or damaged)")
        else:
            good.append(cp)
    return good, problems


@dataclass
class Verdict:
    rows: int
    first_bad_row: int | None = None
    checkpoints: int = 0
    anchored_rows: int = 0  # rows covered by the newest checkpoint
    head: str | None = None  # the database's head hash
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.first_bad_row is None and not self.problems

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "intact": self.intact,
            "first_bad_row": self.first_bad_row,
            "checkpoints": self.checkpoints,
            "anchored_rows": self.anchored_rows,
            "head": self.head,
            "problems": self.problems,
        }


def verify(entries: Iterable[dict], checkpoint_lines: Iterable[str] | None, public) -> Verdict:
    """The chain, and the chain against every signed checkpoint: rows cut from the end, a rebuilt
    chain and an older copy of the database each contradict a checkpoint. `checkpoint_lines` None: the
    home has no checkpoint file (anchoring never started, or the file was removed)."""
    entries = list(entries)
    _, bad = verify_rows(entries)
    hashes = [row["row_hash"] for row in entries]
    verdict = Verdict(rows=len(hashes), first_bad_row=bad, head=hashes[-1] if hashes else None)
    if checkpoint_lines is not None:
        checkpoint_lines = [line for line in checkpoint_lines if line.strip()]
        if not checkpoint_lines:
            checkpoint_lines = None  # emptied: no better than removed
    if public is not None:
        verdict.problems += _identity_problems(entries, public)
    if checkpoint_lines is None:
        if hashes and public is not None:
            verdict.problems.append(
                f"no checkpoint file ({CHECKPOINTS}) although the log has {len(hashes)} rows: "
                "it was removed, so cut rows cannot be ruled out"
            )
        return verdict
    if public is None:
        verdict.problems.append("checkpoints exist but this appliance has no identity key to check them")
        return verdict
    good, bad_lines = read_checkpoints(checkpoint_lines, public)
    verdict.problems += bad_lines
    verdict.checkpoints = len(good)
    newest = max(good, key=lambda c: c["rows"], default=None)
    if newest and newest["rows"] > len(hashes):
        verdict.problems.append(
            f"rows {len(hashes) + 1} to {newest['rows']} are missing: a checkpoint of "
            f"{newest['time']} counted {newest['rows']} rows, the database has {len(hashes)}"
        )
    for cp in sorted(good, key=lambda c: c["rows"]):
        n = cp["rows"]
        if n <= len(hashes) and n and hashes[n - 1] != cp["head"]:
            verdict.problems.append(
                f"row {n} is not the row checkpointed at {cp['time']} (head {cp['head'][:12]}, "
                f"found {hashes[n - 1][:12]}): the log was rewritten or replaced by another copy"
            )
            break
    verdict.anchored_rows = max((c["rows"] for c in good), default=0)
    unsigned = [row["id"] for row in entries[verdict.anchored_rows :] if not signed_by(row, public)]
    if unsigned:
        verdict.problems.append(
            f"{len(unsigned)} row(s) after the newest checkpoint (row {verdict.anchored_rows}) "
            f"carry no signature of this appliance's key, from row {unsigned[0]}: something "
            "other than the appliance wrote them"
        )
    return verdict


def _identity_problems(entries: list[dict], public) -> list[str]:
    """The key checked against the one the log recorded when the identity was made (its first
    `identity` row): a replaced appliance.pub would otherwise vouch for checkpoints it signed itself."""
    from appliance.bundles import identity

    first = next((row for row in entries if row["action"] == "identity"), None)
    if first is None:
        return []
    try:
        recorded = json.loads(first["detail"]).get("public_key")
    except (ValueError, AttributeError):
        recorded = None
    if recorded != identity.public_pem(public):
        return [
            f"the appliance's public key is not the one audit row {first['id']} recorded when the identity "
            "was made: identity/appliance.pub was replaced"
        ]
    return []


def export(conn: apsw.Connection, out: Path, checkpoint_lines: Iterable[str] = ()) -> int:
    """JSON lines, oldest first, with the chain, then the signed checkpoints as
    {"checkpoint": {...}} lines: checkable without this software (see the README)."""
    n = 0
    with open(out, "w") as fh:
        for row in rows(conn):
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            n += 1
        for line in checkpoint_lines:
            if line.strip():
                fh.write(json.dumps({"checkpoint": json.loads(line)}, sort_keys=True) + "\n")
    return n


def split_export(lines: Iterable[str]) -> tuple[list[dict], list[str]]:
    """(rows, checkpoint lines) of an export."""
    entries, checkpoints = [], []
    for line in lines:
        if not line.strip():
            continue
        item = json.loads(line)
        if "checkpoint" in item:
            checkpoints.append(json.dumps(item["checkpoint"], sort_keys=True))
        else:
            entries.append(item)
    return entries, checkpoints


def compare_export(entries: list[dict], export_lines: Iterable[str], public) -> dict:
    """An earlier export against the database now: its rows must still be the first rows, and the
    head it names (its last row, and its newest checkpoint) must still be in the chain."""
    try:
        exported, checkpoints = split_export(export_lines)
        for n, row in enumerate(exported, start=1):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("prev_hash", "row_hash")
            ):
                raise ValueError(f"row {n} is not an audit row with prev_hash and row_hash")
            missing = [k for k in _HASHED if k not in row]
            if missing:
                raise ValueError(f"row {n} has no {', '.join(missing)}")
    except (ValueError, TypeError, AttributeError) as exc:
        return {"rows": 0, "head": None, "problems": [f"the export is not audit JSON lines ({exc})"]}
    problems = []
    count, bad = verify_rows(exported)
    if bad is not None:
        problems.append(f"the export's own chain breaks at row {bad}")
    head = exported[-1]["row_hash"] if exported else None
    n = len(exported)
    if n > len(entries):
        problems.append(
            f"the export has {n} rows ending at head {head[:16]}, the database {len(entries)}: rows "
            f"{len(entries) + 1} to {n} are missing"
        )
    elif n and entries[n - 1]["row_hash"] != head:
        first = next(
            (
                i + 1
                for i, (a, b) in enumerate(zip(exported, entries, strict=False))
                if a["row_hash"] != b["row_hash"]
            ),
            n,
        )
        problems.append(
            f"the export expects head {head[:16]} at row {n}; the database differs from row {first}"
        )
    if checkpoints and public is not None:
        good, bad_lines = read_checkpoints(checkpoints, public)
        problems += [f"export: {p}" for p in bad_lines]
        newest = max(good, key=lambda c: c["rows"], default=None)
        if newest and (
            newest["rows"] > len(entries)
            or (newest["rows"] and entries[newest["rows"] - 1]["row_hash"] != newest["head"])
        ):
            problems.append(
                f"the export's checkpoint of {newest['time']} ({newest['rows']} rows, head "
                f"{newest['head'][:16]}) does not match the database"
            )
    return {"rows": n, "head": head, "problems": problems}
