"""What administrators review: the audit log (its rows, its chain and signed checkpoints, and an
earlier export checked against it) and operators' feedback on answers (recorded, listed, exported
signed for the builder). The Appliance's methods of the same names are these functions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.bundles import identity
from appliance.errors import FeedbackError
from appliance.records import audit, feedback
from appliance.schemas import AuditVerdict, ExportWritten, FeedbackRecorded

if TYPE_CHECKING:
    from appliance.app import Appliance


def audit_rows(
    app: Appliance, action: str | None = None, user: str | None = None, limit: int = 50
) -> list[dict]:
    """Newest first; `detail` parsed."""
    return [dict(e, detail=json.loads(e["detail"])) for e in audit.rows(app.store.conn, action, user, limit)]


def checkpoint_lines(app: Appliance) -> list[str] | None:
    path = app.settings.home / audit.CHECKPOINTS
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return None


def audit_verify(app: Appliance, against: list[str] | None = None) -> AuditVerdict:
    """The chain and every signed checkpoint (audit.verify); `against`: an earlier export's lines,
    whose rows must still be the database's first rows, ending at the head the export names."""
    ident = identity.load(app.settings.home)
    public = ident.public if ident else None
    entries = list(audit.rows(app.store.conn))
    verdict = audit.verify(entries, checkpoint_lines(app), public)
    try:
        if ident and not ident.matches_private():
            verdict.problems.insert(
                0,
                "identity/appliance.pub is not the public half of identity/appliance.key: "
                "it was replaced, so nothing it vouches for is proven",
            )
    except (OSError, ValueError, TypeError):  # the key is not ours to read: the log's record still checks it
        pass
    result = AuditVerdict.model_validate(verdict.to_json())
    if against is not None:
        result.against = audit.compare_export(entries, against, public)
        if result.against["problems"]:
            result.intact = False
    return result


def key_status(app: Appliance) -> dict | None:
    """The appliance's own signing key as status shows it (None before one was made)."""
    ident = identity.load(app.settings.home)
    return {"key_id": ident.key_id, "public_key": ident.public_pem} if ident else None


def record_feedback(
    app: Appliance,
    answer_audit_id: int,
    kind: str,
    *,
    correction: str | None = None,
    source: int | None = None,
    chunk_id: int | None = None,
    note: str | None = None,
    question: str | None = None,
    answer: str | None = None,
    user: str | None = None,
    admin: bool = True,
) -> FeedbackRecorded:
    """Record feedback on an answer (appliance.records.feedback.record), audited; the service audits
    a refusal."""
    return feedback.record(
        app.store,
        answer_audit_id,
        kind,
        correction=correction,
        source=source,
        chunk_id=chunk_id,
        note=note,
        question=question,
        answer=answer,
        user=user,
        admin=admin,
        write_audit=lambda detail: app.audit("feedback", detail, user=user)["id"],
    )


def feedback_items(
    app: Appliance, pending_only: bool = False, since: str | None = None, limit: int | None = None
) -> list[dict]:
    return [i.to_json() for i in feedback.items(app.store.conn, pending_only, since, limit)]


def feedback_export_build(app: Appliance, since: str | None = None) -> feedback.Export:
    """A signed export of the pending feedback (or all since `since`); nothing is marked yet."""
    chosen = feedback.items(app.store.conn, pending_only=since is None, since=since)
    if not chosen:
        raise FeedbackError(
            "no feedback to export" + (f" since {since}" if since else " (all exported already)"),
            "give --since DATE to export earlier feedback again",
        )
    return feedback.build(chosen, app.identity(), since)


def feedback_export_done(
    app: Appliance, export: feedback.Export, out: str, user: str | None = None
) -> ExportWritten:
    """After the export was written: its items are marked exported and the export is audited."""
    feedback.mark_exported(app.store.conn, export.feedback_ids, export.export_id)
    app.audit(
        "feedback_export",
        {
            "export_id": export.export_id,
            "out": out,
            "counts": export.counts,
            "feedback_ids": export.feedback_ids,
            "manifest_sha256": hashlib.sha256(export.manifest).hexdigest(),
        },
        with_model=False,
        user=user,
    )
    return ExportWritten(
        export_id=export.export_id, out=out, counts=export.counts, items=len(export.feedback_ids)
    )


def feedback_export(
    app: Appliance, out: Path, since: str | None = None, user: str | None = None
) -> ExportWritten:
    """Build, write into `out`, then mark and audit: a failed write marks nothing."""
    export = feedback_export_build(app, since)
    export.write(out)
    return feedback_export_done(app, export, str(out.resolve()), user)
