"""Files coming in, and what is made from them: documents ingested (from paths or a caller's upload)
and removed, and RFPs drafted into proposals. Every file is parsed in the sandboxed child
(appliance.documents.sandbox) and every change is audited. The Appliance's methods of the same names
are these functions."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.bundles.manifest import sha256_file
from appliance.drafting import draft as drafting
from appliance.errors import ApplianceError, IngestError
from appliance.records import audit
from appliance.retrieval.ingest import ingest as ingest_files
from appliance.schemas import DocumentRow, DraftReport, IngestReport

if TYPE_CHECKING:
    from appliance.app import Appliance


def ingest(
    app: Appliance,
    paths: list[Path],
    collection: str,
    progress: Callable[[str, int, int], None] | None = None,
    user: str | None = None,
    source_name: Callable[[Path], str] | None = None,
    admin: bool = True,
    aside: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> IngestReport:
    """`user`'s documents (default: ours); `admin`: may also replace documents from before owners
    were recorded. Each document commits with its audit row, and the head is anchored after it.
    `aside`: held while a file is parsed and embedded (appliance.retrieval.ingest)."""
    owner = user or audit.os_user()
    app.audit_ready()
    try:
        with app.sandbox() as sandbox:
            report = ingest_files(
                app.store,
                app.embedder,
                paths,
                collection,
                max_bytes=int(app.settings.max_file_mb * 1_000_000),
                chunk_chars=app.settings.chunk_chars,
                progress=progress,
                source_name=source_name,
                owner=owner,
                admin=admin,
                sandbox=sandbox,
                committed=app.anchor,
                aside=aside,
                record=lambda action, detail: app.audit(action, detail, user=owner),
            )
    finally:
        app.anchor()
    # what was refused, and what a folder held that is not read, are on record too: one row a batch each
    for action, key, why in (("ingest_refused", "failed", "error"), ("ingest_skipped", "skipped", "reason")):
        files = getattr(report, key)
        if files:
            app.audit(
                action,
                {
                    "collection": collection,
                    "files": len(files),
                    key: [{"source": f["source"][:300], why: f[why][:300]} for f in files[:50]],
                },
                with_model=False,
                user=owner,
            )
    return report


def clean_uploads(app: Appliance) -> list[str]:
    """Remove upload directories a killed service left in the home (the service calls this at start,
    when no upload of its own can be under way); what was removed."""
    gone = []
    for stale in app.settings.home.glob(".upload-*"):
        shutil.rmtree(stale, ignore_errors=True)
        gone.append(f"removed {stale}")
    return gone


@contextlib.contextmanager
def uploaded(app: Appliance, name: str, data: bytes) -> Iterator[Path]:
    """An uploaded file under the home (private, removed afterwards), named like the original so its
    type is recognised."""
    base = Path(name.replace("\\", "/")).name
    if not base or base in (".", "..") or "\0" in base or len(base) > 255:
        raise IngestError(f"upload name {name!r} is not a file name", "send the file's path as `name`")
    with tempfile.TemporaryDirectory(dir=app.settings.home, prefix=".upload-") as tmp:
        path = Path(tmp) / base
        path.write_bytes(data)
        yield path


def ingest_upload(
    app: Appliance,
    name: str,
    data: bytes,
    collection: str,
    user: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    admin: bool = False,
    aside: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> IngestReport:
    """Ingest a file the caller read and sent (the service's upload route), recorded as `name` and
    keyed by its user: one user's upload never replaces another's."""
    with uploaded(app, name, data) as path:
        return ingest(
            app,
            [path],
            collection,
            progress=progress,
            user=user,
            source_name=lambda _: name,
            admin=admin,
            aside=aside,
        )


def remove_document(app: Appliance, doc_id: int, user: str | None = None) -> DocumentRow:
    """Removed with its audit row in one transaction."""
    row = app.store.remove_document(
        doc_id,
        lambda row: app.audit(
            "remove",
            {
                "doc_id": row.id,
                "source": row.source,
                "sha256": row.sha256,
                "collection": row.collection,
                "owner": row.owner,
            },
            user=user,
        ),
    )
    app.anchor()
    return row


def draft(
    app: Appliance,
    rfp: Path,
    collections: list[str] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    generator=None,
    user: str | None = None,
    source: str | None = None,
    model_info: dict | None = None,
) -> DraftReport:
    """A proposal draft for an RFP file (see appliance.drafting.draft); `generator` replaces the model in
    tests; `source`: what the RFP is recorded as (an upload's name on the caller's side)."""
    app.audit_ready()
    app.ready_index()
    generator = generator or app.engine
    model_info = model_info or app.model_info()
    with app.sandbox("draft") as sandbox:  # an RFP is as untrusted as any upload
        result = drafting.draft(
            app.store,
            app.embedder,
            generator,
            rfp,
            collections=collections,
            model_info=model_info,
            max_bytes=int(app.settings.max_file_mb * 1_000_000),
            n_ctx=getattr(generator, "n_ctx", None) or app.context_tokens(),
            max_tokens=max_tokens or app.settings.max_tokens,
            sampling=app.sampling(),
            progress=progress,
            source=source,
            sandbox=sandbox,
        )
    app.audit(
        "draft",
        {
            "rfp": result.rfp,
            "rfp_sha256": sha256_file(rfp),
            "requirements": len(result.requirements),
            "gaps": result.gaps,
            "needs_writing": sorted(result.needs_writing),
            "unknown_codes": result.unknown_codes,
            "chunks": [{"chunk_id": s["chunk_id"], "doc_sha256": s["doc_sha256"]} for s in result.sources],
        },
        user=user,
        model=model_info,
    )
    return result.report()


def draft_upload(
    app: Appliance,
    name: str,
    data: bytes,
    collections: list[str] | None = None,
    max_tokens: int | None = None,
    progress=None,
    user: str | None = None,
    generator=None,
    model_info: dict | None = None,
) -> DraftReport:
    with uploaded(app, name, data) as path:
        try:
            return draft(
                app,
                path,
                collections,
                max_tokens,
                progress=progress,
                user=user,
                source=name,
                generator=generator,
                model_info=model_info,
            )
        except ApplianceError as exc:  # named as the caller knows the file, not by the service's private path
            for private, public in ((str(path), name), (str(path.parent), "(upload)")):
                exc.message = exc.message.replace(private, public)
                exc.fix = exc.fix and exc.fix.replace(private, public)
            raise
