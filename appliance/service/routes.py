"""The appliance's own routes under /appliance/: status, search, lookup, conversations, documents (list,
ingest by path for the service's own user, upload, remove), draft, audit, feedback, bundles."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from appliance.app import Appliance
from appliance.errors import NotFoundError
from appliance.schemas import (
    AuditRows,
    AuditVerdict,
    BundleCheck,
    BundleRequest,
    Conversation,
    Documents,
    ExportRequest,
    ExportWritten,
    FeedbackExport,
    FeedbackItems,
    FeedbackRecorded,
    FeedbackRequest,
    Generations,
    Home,
    IngestRequest,
    LookupRows,
    Removed,
    RolledBack,
    SearchResults,
    Status,
    VerifyRequest,
    WrittenRequest,
)
from appliance.service.deps import (
    PEER_KEY,
    get_appliance,
    get_worker,
    is_admin,
    refuse,
    require_admin,
    user_of,
)
from appliance.service.errors import ApiError
from appliance.service.limits import MAX_QUERY_CHARS
from appliance.service.worker import Worker, progress_events, received

router = APIRouter()


@router.get("/appliance/home", response_model=Home)
async def home(*, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker)):
    """Which home this service serves, answered at once (not behind the model): how the CLI
    decides whether to use it."""
    return {"home": str(app.settings.home)}


@router.get("/appliance/status", response_model=Status)
async def status(
    *, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker), request: Request
):
    engine_server = request.app.state.engine_server
    data = (await worker.submit(app.status)).model_dump()
    return {**data, **({"engine": engine_server.state()} if engine_server is not None else {})}


@router.get("/appliance/search", response_model=SearchResults)
async def search(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    q: str = Query(max_length=MAX_QUERY_CHARS),
    k: int = 5,
    collection: str | None = None,
):
    if not 1 <= k <= 100:
        raise ApiError(400, f"k {k} out of range; allowed: 1 to 100")
    hits = await worker.submit(lambda: app.search(q, k=k, collection=collection))
    return {"results": [h.to_json() for h in hits]}


@router.post("/appliance/conversations", response_model=Conversation)
async def new_conversation(
    *, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker), request: Request
):
    user = user_of(request) or "unknown"
    return {"id": await worker.submit(lambda: app.new_conversation(user))}


@router.get("/appliance/lookup", response_model=LookupRows)
async def lookup(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    q: str = Query(max_length=MAX_QUERY_CHARS),
    collection: str | None = None,
    limit: int = Query(default=20, ge=1, le=1000),
):
    return {"query": q, "rows": await worker.submit(lambda: app.lookup(q, collection, limit))}


@router.get("/appliance/documents", response_model=Documents)
async def documents(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    collection: str | None = None,
):
    rows = await worker.submit(lambda: app.documents(collection))
    return {"documents": [vars(r) for r in rows]}


@router.post("/appliance/documents")
async def ingest(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: IngestRequest,
    request: Request,
):
    """Files named by path are read with the service's permissions: only for a caller who has them
    already (the service's own user, or root). Everyone else uploads the bytes they read."""
    peer = request.scope.get(PEER_KEY)
    if peer is None or peer["uid"] not in (os.getuid(), 0):
        await refuse(
            request,
            403,
            "ingesting by path reads files with the service's permissions, so only the "
            "service's user or root may; upload the files instead (POST /appliance/documents/upload, "
            "which `appliance ingest` and the UI use)",
            "forbidden",
            {"paths": body.paths[:20]},
        )
    user = user_of(request)
    report = await worker.submit(
        lambda: app.ingest([Path(p) for p in body.paths], body.collection, user=user)
    )
    return report.to_json()


@router.post("/appliance/documents/upload")
async def upload(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    request: Request,
    name: str,
    collection: str = "default",
    stream: bool = False,
):
    """One file's bytes as the body; `name`: its path on the caller's side (recorded as the source).
    The caller read the file, so it is ingested with the caller's permissions, not the service's."""
    if collection in app.settings.reference_collections:  # refused before a byte is read
        await require_admin(
            request,
            f"adding to the reference collection '{collection}' (its tables are "
            "what codes are checked against)",
            {"collection": collection, "name": name[:200]},
        )
    user, admin = user_of(request), is_admin(request)
    data, release = await received(request, int(app.settings.max_file_mb * 1_000_000))
    if stream:  # parsing and embedding step aside from the worker: searches and answers go on meanwhile
        return progress_events(
            worker,
            lambda report: app.ingest_upload(
                name, data, collection, user=user, progress=report, admin=admin, aside=worker.aside
            ).to_json(),
            finished=release,
        )
    try:
        return (
            await worker.submit(
                lambda: app.ingest_upload(name, data, collection, user=user, admin=admin, aside=worker.aside)
            )
        ).to_json()
    finally:
        release()


@router.post("/appliance/draft")
async def draft(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    request: Request,
    name: str,
    collection: list[str] | None = Query(default=None),
    max_tokens: int | None = Query(default=None, ge=1, le=4096),
):
    """An RFP's bytes as the body; progress events per requirement, then the draft (schemas.DraftReport:
    the markdown, the requirements, staffing, gaps and codes, flat in one result)."""
    user = user_of(request)
    data, release = await received(request, int(app.settings.max_file_mb * 1_000_000))
    engine_server = request.app.state.engine_server
    lease, held = (engine_server.lease(app, worker), None) if engine_server is not None else (None, None)
    if lease is not None:  # the engine server writes the draft; the in-process model is never loaded
        try:
            held = await lease.__aenter__()
        except BaseException:
            release()
            raise

    def work(report):
        result = app.draft_upload(
            name,
            data,
            collection,
            max_tokens,
            progress=report,
            user=user,
            generator=held.generator(aside=worker.aside) if held else None,
            model_info=held.model_info if held else None,
        )
        return result.model_dump(mode="json")

    def finished():  # once the draft has ended, whatever the client did: the slot and the engine let go
        release()
        return lease.__aexit__(None, None, None) if lease else None

    return progress_events(worker, work, finished=finished)


@router.delete("/appliance/documents/{doc_id}", response_model=Removed)
async def remove(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    request: Request,
    doc_id: int = PathParam(ge=1, le=(1 << 63) - 1),
):
    """Operators remove their own documents; another user's (or one from before owners were kept,
    such as the reference table) needs an administrator."""
    user = user_of(request)
    row = await worker.submit(lambda: app.store.document(doc_id))
    if row.owner is None or row.owner != user:
        await require_admin(
            request,
            f"removing document {doc_id} (owned by {row.owner or 'the administrators'})",
            {"doc_id": doc_id},
        )
    row = await worker.submit(lambda: app.remove_document(doc_id, user=user))
    return {"removed": vars(row)}


@router.get("/appliance/audit", response_model=AuditRows)
async def audit_list(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    request: Request,
    action: str | None = None,
    user: str | None = None,
    limit: int = Query(default=50, ge=1, le=1000),
):
    """Operators read their own rows; everyone's needs an administrator."""
    me = user_of(request)
    if not is_admin(request):
        if user not in (None, me):
            await require_admin(request, f"reading {user}'s audit rows")
        user = me
    return {"rows": await worker.submit(lambda: app.audit_rows(action, user, limit))}


@router.get("/appliance/audit/verify", response_model=AuditVerdict)
async def audit_verify(*, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker)):
    return await worker.submit(app.audit_verify)


@router.post("/appliance/audit/verify", response_model=AuditVerdict)
async def audit_verify_against(
    *, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker), body: VerifyRequest
):
    """`export`: the lines of an earlier `appliance audit export`."""
    return await worker.submit(lambda: app.audit_verify(body.export))


@router.post("/appliance/feedback", response_model=FeedbackRecorded)
async def feedback(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: FeedbackRequest,
    request: Request,
):
    user, admin = user_of(request), is_admin(request)
    try:
        return await worker.submit(
            lambda: app.feedback(
                body.audit_id,
                body.kind,
                correction=body.correction,
                source=body.source,
                chunk_id=body.chunk_id,
                note=body.note,
                question=body.question,
                answer=body.answer,
                user=user,
                admin=admin,
            )
        )
    except NotFoundError as exc:  # another user's answer, or none: the same reply, audited
        if admin:
            raise
        await refuse(request, 404, str(exc), "not_found", {"answer_audit_id": body.audit_id})


@router.get("/appliance/feedback", response_model=FeedbackItems)
async def feedback_list(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    request: Request,
    pending: bool = False,
    since: str | None = None,
    limit: int | None = Query(default=None, ge=1, le=10_000),
):
    """Operators see their own feedback; the team's needs an administrator."""
    items = await worker.submit(
        lambda: app.feedback_items(pending, since, None if not is_admin(request) else limit)
    )
    if not is_admin(request):
        items = [i for i in items if i.get("user") == user_of(request)][:limit]
    return {"items": items}


@router.post("/appliance/feedback/export", response_model=FeedbackExport)
async def feedback_export(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: ExportRequest,
    request: Request,
):
    """The signed export's files; the caller writes them where it can, then confirms (`written`):
    only then are the items marked exported and the export audited. Administrators only."""
    await require_admin(request, "exporting the team's feedback")
    export = await worker.submit(lambda: app.feedback_export_build(body.since))
    request.app.state.exports.clear()  # one pending export at a time
    request.app.state.exports[export.export_id] = export
    return {
        "export_id": export.export_id,
        "counts": export.counts,
        "files": {name: data.decode() for name, data in export.files.items()},
        "manifest": export.manifest.decode(),
        "signature": export.signature,
    }


@router.post("/appliance/feedback/export/{export_id}/written", response_model=ExportWritten)
async def feedback_written(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    export_id: str,
    body: WrittenRequest,
    request: Request,
):
    await require_admin(request, "marking feedback exported")
    export = request.app.state.exports.pop(export_id, None)
    if export is None:
        raise ApiError(404, f"no pending export {export_id}", "not_found")
    user = user_of(request)
    return await worker.submit(lambda: app.feedback_export_done(export, body.out, user))


@router.get("/appliance/bundles", response_model=Generations)
async def bundle_list(*, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker)):
    return await worker.submit(app.generations)


@router.post("/appliance/bundles/verify", response_model=BundleCheck)
async def bundle_verify(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: BundleRequest,
    request: Request,
):
    await require_admin(request, "verifying a bundle (the service reads it)", {"path": body.path})
    return await worker.submit(lambda: app.verify_bundle(Path(body.path)))


@router.post("/appliance/bundles/install")
async def bundle_install(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: BundleRequest,
    request: Request,
):
    """Progress as server-sent events (see the module's docstring)."""
    await require_admin(request, "installing a bundle", {"path": body.path})
    user = user_of(request)

    def work(report):
        return app.install_bundle(
            Path(body.path), body.allow_downgrade, user=user, progress=report
        ).model_dump(mode="json")

    return progress_events(worker, work)


@router.post("/appliance/bundles/rollback", response_model=RolledBack)
async def bundle_rollback(
    *, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker), request: Request
):
    await require_admin(request, "rolling back the model")
    user = user_of(request)
    left, now = await worker.submit(lambda: app.rollback(user=user))
    return {"from": left, "to": now}
