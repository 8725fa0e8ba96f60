"""The appliance as a local service: FastAPI on uvicorn, bound to a Unix socket, OpenAI-compatible.

One process loads the model and writes the database. Work that needs the model, the embedder or the
database runs on one worker thread, in order; at most `queue_size` requests wait for it and the next
gets 503 with Retry-After. Request values are bounded (context, max tokens, sampling): out of range
is a 4xx naming the allowed range. A client that disconnects stops its generation. The caller's OS
user comes from the socket's peer credentials (SO_PEERCRED) and goes into the audit log.

OpenAI routes: GET /v1/models, POST /v1/chat/completions (streamed over SSE or not; retrieval on by
default; extension fields `collection` and `rag` in the request, `citations`/`sources` in the
response and in the final stream chunk; `conversation`: a stored conversation whose turns are the
history and which the answer is added to), POST /v1/embeddings. Appliance routes under /appliance/:
status, search, conversations, documents (list, ingest a path the service reads, upload a file the
caller read, remove), draft (an uploaded RFP), audit (list, verify), bundles (list, verify, install,
rollback). Long work (upload with `?stream=true`, draft, bundle install) reports progress as
server-sent events: {"item", "done", "total"}..., then {"result": ...} or {"error": {...}}.
Errors have OpenAI's shape: {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.app import Appliance
from appliance.errors import ApplianceError, ExitCode

MAX_PROMPT_CHARS = 32_000
HEARTBEAT_S = 0.5  # a streamed answer with no text for this long sends an SSE comment
MAX_EMBED_INPUTS = 256
PEER_KEY = "appliance.peer"


# -- request bodies --------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _bounded(cls, content):
        size = len(content) if isinstance(content, str) else len(json.dumps(content or []))
        if size > MAX_PROMPT_CHARS:
            raise ValueError(f"{size} characters; at most {MAX_PROMPT_CHARS} allowed per message")
        return content


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server ignores
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    collection: str | None = Field(default=None, description="Extension: retrieve only from this collection")
    rag: bool = Field(default=True, description="Extension: false answers without retrieval")
    conversation: int | None = Field(default=None, description="Extension: a stored conversation (POST "
                                     "/appliance/conversations); its turns are the history, the answer is added")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] = Field(min_length=1)


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, max_length=1000)
    collection: str = Field(default="default", min_length=1, max_length=100)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audit_id: int = Field(description="The audit id of the answer (in every chat completion's response)")
    kind: Literal["good", "bad", "correction", "irrelevant_source", "missing_source"]
    correction: str | None = Field(default=None, max_length=16_000)
    source: int | None = Field(default=None, ge=1, description="irrelevant_source: the answer's [n]")
    chunk_id: int | None = Field(default=None, ge=1, description="missing_source: the chunk that should have been found")
    note: str | None = Field(default=None, max_length=16_000)
    question: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                                 description="For answers outside a stored conversation: checked against the audit row")
    answer: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: str | None = Field(default=None, description="Everything since this date (YYYY-MM-DD), exported or not")


class WrittenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str


class BundleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    allow_downgrade: bool = False


# -- errors ----------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_STATUS = {ExitCode.NOT_FOUND: 404, ExitCode.CONFIG: 500, ExitCode.MODEL: 400, ExitCode.INGEST: 422,
           ExitCode.BUNDLE: 422, ExitCode.BUSY: 409, ExitCode.FEEDBACK: 422, ExitCode.GENERATION: 503, ExitCode.STORE: 500}


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status_code=status,
                        headers=headers)


# -- the worker ------------------------------------------------------------------------------------

class Worker:
    """One thread for everything that touches the model, embedder or database, with a bounded queue."""

    def __init__(self, queue_size: int, before: Callable[[], None] | None = None):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="appliance")
        self.before = before
        self.queue_size = queue_size
        self.pending = 0
        self.lock = threading.Lock()

    def submit(self, fn: Callable, *args):
        with self.lock:
            if self.pending >= self.queue_size + 1:  # one running, queue_size waiting
                raise ApiError(503, f"the appliance is busy ({self.pending} requests ahead); retry shortly",
                               "server_busy", {"Retry-After": "2"})
            self.pending += 1
        future = self.pool.submit(self._run, fn, *args)

        def done(_):
            with self.lock:
                self.pending -= 1
        future.add_done_callback(done)
        return asyncio.wrap_future(future)

    def _run(self, fn: Callable, *args):
        if self.before:
            self.before()
        return fn(*args)


class Stopped(Exception):
    """The client went away; generation stops at the next token."""


def progress_events(worker: Worker, work: Callable[[Callable[..., None]], dict]) -> StreamingResponse:
    """Run `work(report)` on the worker; each `report(item, done, total)` is an event, then the result
    or the error. The queue is checked before the response starts, so a busy service still says 503."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def run():
        try:
            put({"result": work(lambda item, done, total: put({"item": str(item or ""), "done": done,
                                                                "total": total}))})
        except ApplianceError as exc:
            put({"error": {"message": str(exc), "type": type(exc).__name__}})
        except Exception as exc:  # reported, never a stream that just stops
            put({"error": {"message": f"internal error: {exc!r}", "type": type(exc).__name__}})
    worker.submit(run)

    async def stream():
        while True:
            event = await events.get()
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            if "result" in event or "error" in event:
                return
    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the upload is larger than {limit / 1e6:.1f} MB (max_file_mb)", "too_large")
    return bytes(body)


def _user(request: Request) -> str | None:
    peer = request.scope.get(PEER_KEY)
    return peer["user"] if peer else None


def _question(messages: list[Message]) -> tuple[str, list[dict]]:
    """The last user message is the question; earlier user/assistant turns are history."""
    def text(m: Message) -> str:
        if isinstance(m.content, list):
            return "".join(p.get("text", "") for p in m.content if p.get("type") == "text")
        return m.content or ""

    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not text(turns[-1]).strip():
        raise ApiError(400, "the last message must be a non-empty user message")
    return text(turns[-1]), [{"role": m.role, "content": text(m)} for m in turns[:-1]]


def make_api(app: Appliance, queue_size: int = 4, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI application over one Appliance (one model, one database)."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if on_shutdown:
            on_shutdown()

    api = FastAPI(title="appliance", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    worker = Worker(queue_size, before=app.follow_current)
    api.state.appliance = app
    api.state.worker = worker

    @api.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.code, exc.headers)

    @api.exception_handler(ApplianceError)
    async def _appliance_error(_, exc: ApplianceError):
        return _error(_STATUS.get(exc.exit_code, 400), str(exc), type(exc).__name__)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            parts.append(f"{where}: {e['msg']}")
        return _error(422 if any("json" in e["type"] for e in exc.errors()) else 400, "; ".join(parts),
                      "invalid_request_error")

    def model_id() -> str:
        return app.installed.manifest.model.name

    @api.get("/v1/models")
    async def models():
        return await worker.submit(model_list)

    def model_list() -> dict:
        m = app.installed.manifest
        created = int(app.installed.path.stat().st_mtime)
        return {"object": "list", "data": [
            {"id": m.model.name, "object": "model", "created": created, "owned_by": "appliance",
             "generation": app.installed.number, "quant": m.model.quant},
            {"id": m.embedder.name, "object": "model", "created": created, "owned_by": "appliance",
             "dimensions": m.embedder.dim}]}

    def limits(body: ChatRequest) -> tuple[int, float]:
        max_tokens = body.max_completion_tokens or body.max_tokens or app.settings.max_tokens
        context = min(app.settings.n_ctx, app.installed.manifest.model.context_length)
        if max_tokens > context // 2:
            raise ApiError(400, f"max_tokens {max_tokens} is more than half the {context}-token context; "
                                f"allowed: 1 to {context // 2}")
        temperature = app.settings.temperature if body.temperature is None else body.temperature
        return max_tokens, temperature

    def finish(answer) -> str:
        return "length" if answer.stopped or answer.timing.get("tokens", 0) >= answer.timing.get("max_tokens", 1 << 30) \
            else "stop"

    def completion_json(answer, created: int, cid: str) -> dict:
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id(),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.answer},
                             "finish_reason": finish(answer)}],
                "usage": {"prompt_tokens": answer.timing.get("prompt_tokens", 0),
                          "completion_tokens": answer.timing.get("tokens", 0),
                          "total_tokens": answer.timing.get("prompt_tokens", 0) + answer.timing.get("tokens", 0)},
                "citations": answer.citations, "sources": answer.to_json()["sources"],
                "unverified_codes": answer.unverified_codes, "unknown_citations": answer.unknown_citations,
                "miscited_codes": answer.miscited_codes, "audit_id": answer.audit_id,
                "appliance": {"generation": answer.model.get("generation"), "model": answer.model,
                              "timing": answer.timing}}

    @api.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        question, history = _question(body.messages)
        max_tokens, temperature = limits(body)
        user = _user(request)
        stop = threading.Event()
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.conversation is not None:
            owner = await worker.submit(lambda: app.store.conversation_user(body.conversation))
            if owner is None:
                raise ApiError(404, f"no conversation {body.conversation}; create one with POST "
                                    "/appliance/conversations", "not_found")
            if owner != (user or "unknown"):  # its turns would come back in the answer's context
                raise ApiError(403, f"conversation {body.conversation} belongs to another user", "forbidden")
            history = None  # the stored turns are the history

        def ask(**streaming):
            return app.ask(question, body.collection, body.rag, max_tokens, temperature, history=history,
                           should_stop=stop.is_set, user=user, conversation=body.conversation, **streaming)

        if not body.stream:
            def run():
                return ask()
            future = worker.submit(run)
            while not future.done():
                if await request.is_disconnected():
                    stop.set()
                    break
                await asyncio.wait({future}, timeout=0.1)
            return completion_json(await future, created, cid)

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def run_streaming():
            try:
                answer = ask(on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, ("text", piece)))
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", answer))
            except BaseException as exc:  # reported to the client as the stream's last event
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))
        future = worker.submit(run_streaming)

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id(),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    try:
                        kind, value = await asyncio.wait_for(pieces.get(), HEARTBEAT_S)
                    except TimeoutError:
                        # Nothing to send (reading the prompt; tokens that are not yet text): an SSE
                        # comment, which clients skip, so a client that went away is noticed now.
                        yield ": generating\n\n"
                        continue
                    if kind == "text":
                        yield chunk({"content": value})
                    elif kind == "done":
                        final = completion_json(value, created, cid)
                        yield chunk({}, finish(value),
                                    **{k: final[k] for k in ("citations", "sources", "unverified_codes",
                                                             "unknown_citations", "miscited_codes",
                                                             "audit_id", "appliance", "usage")})
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        message = str(value) if isinstance(value, ApplianceError) else f"internal error: {value!r}"
                        yield f"data: {json.dumps({'error': {'message': message, 'type': type(value).__name__}})}\n\n"
                        return
            finally:
                stop.set()  # a client that went away stops the generation at its next token
                await asyncio.shield(future)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_EMBED_INPUTS or any(len(t) > MAX_PROMPT_CHARS for t in texts):
            raise ApiError(400, f"at most {MAX_EMBED_INPUTS} inputs of at most {MAX_PROMPT_CHARS} characters each")
        vectors = await worker.submit(lambda: app.embedder.embed(texts))
        return {"object": "list", "model": app.embedder.name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                          "total_tokens": sum(len(t.split()) for t in texts)}}

    # -- appliance routes --------------------------------------------------------------------------
    @api.get("/appliance/home")
    async def home():
        """Which home this service serves, answered at once (not behind the model): how the CLI
        decides whether to use it."""
        return {"home": str(app.settings.home)}

    @api.get("/appliance/status")
    async def status():
        return await worker.submit(app.status)

    @api.get("/appliance/search")
    async def search(q: str, k: int = 5, collection: str | None = None):
        if not 1 <= k <= 100:
            raise ApiError(400, f"k {k} out of range; allowed: 1 to 100")
        hits = await worker.submit(lambda: app.search(q, k=k, collection=collection))
        return {"results": [h.to_json() for h in hits]}

    @api.post("/appliance/conversations")
    async def new_conversation(request: Request):
        user = _user(request) or "unknown"
        return {"id": await worker.submit(lambda: app.new_conversation(user))}

    @api.get("/appliance/lookup")
    async def lookup(q: str, collection: str | None = None, limit: int = Query(default=20, ge=1, le=1000)):
        return {"query": q, "rows": await worker.submit(lambda: app.lookup(q, collection, limit))}

    @api.get("/appliance/documents")
    async def documents(collection: str | None = None):
        rows = await worker.submit(lambda: app.documents(collection))
        return {"documents": [vars(r) for r in rows]}

    @api.post("/appliance/documents")
    async def ingest(body: IngestRequest, request: Request):
        """Files named by path are read with the service's permissions: only for a caller who has them
        already (the service's own user, or root). Everyone else uploads the bytes they read."""
        peer = request.scope.get(PEER_KEY)
        if peer is None or peer["uid"] not in (os.getuid(), 0):
            await worker.submit(lambda: app.audit("refused", {"route": "POST /appliance/documents",
                                                              "paths": body.paths[:20]},
                                                  with_model=False, user=_user(request)))
            raise ApiError(403, "ingesting by path reads files with the service's permissions, so only the "
                           "service's user or root may; upload the files instead (POST "
                           "/appliance/documents/upload, which `appliance ingest` and the UI use)", "forbidden")
        user = _user(request)
        report = await worker.submit(lambda: app.ingest([Path(p) for p in body.paths], body.collection, user=user))
        return report.to_json()

    @api.post("/appliance/documents/upload")
    async def upload(request: Request, name: str, collection: str = "default", stream: bool = False):
        """One file's bytes as the body; `name`: its path on the caller's side (recorded as the source).
        The caller read the file, so it is ingested with the caller's permissions, not the service's."""
        user = _user(request)
        data = await read_body(request, int(app.settings.max_file_mb * 1_000_000))
        if stream:
            return progress_events(worker, lambda report: app.ingest_upload(
                name, data, collection, user=user, progress=report).to_json())
        return (await worker.submit(lambda: app.ingest_upload(name, data, collection, user=user))).to_json()

    @api.post("/appliance/draft")
    async def draft(request: Request, name: str, collection: list[str] | None = Query(default=None),
                    max_tokens: int | None = Query(default=None, ge=1, le=4096)):
        """An RFP's bytes as the body; progress events per requirement, then the draft's markdown and summary."""
        user = _user(request)
        data = await read_body(request, int(app.settings.max_file_mb * 1_000_000))

        def work(report):
            result = app.draft_upload(name, data, collection, max_tokens, progress=report, user=user)
            return {"markdown": result.markdown, "summary": result.summary()}
        return progress_events(worker, work)

    @api.delete("/appliance/documents/{doc_id}")
    async def remove(doc_id: int, request: Request):
        user = _user(request)
        row = await worker.submit(lambda: app.remove_document(doc_id, user=user))
        return {"removed": vars(row)}

    @api.get("/appliance/audit")
    async def audit_list(action: str | None = None, user: str | None = None, limit: int = 50):
        return {"rows": await worker.submit(lambda: app.audit_rows(action, user, max(1, min(limit, 1000))))}

    @api.get("/appliance/audit/verify")
    async def audit_verify():
        count, bad = await worker.submit(app.audit_verify)
        return {"rows": count, "intact": bad is None, "first_bad_row": bad}

    @api.post("/appliance/feedback")
    async def feedback(body: FeedbackRequest, request: Request):
        user = _user(request)
        return await worker.submit(lambda: app.feedback(body.audit_id, body.kind, correction=body.correction,
                                                        source=body.source, chunk_id=body.chunk_id, note=body.note,
                                                        question=body.question, answer=body.answer, user=user))

    @api.get("/appliance/feedback")
    async def feedback_list(pending: bool = False, since: str | None = None,
                            limit: int | None = Query(default=None, ge=1, le=10_000)):
        return {"items": await worker.submit(lambda: app.feedback_items(pending, since, limit))}

    exports: dict[str, object] = {}  # built, not yet written by the caller

    @api.post("/appliance/feedback/export")
    async def feedback_export(body: ExportRequest):
        """The signed export's files; the caller writes them where it can, then confirms (`written`):
        only then are the items marked exported and the export audited."""
        export = await worker.submit(lambda: app.feedback_export_build(body.since))
        exports.clear()  # one pending export at a time
        exports[export.export_id] = export
        return {"export_id": export.export_id, "counts": export.counts,
                "files": {name: data.decode() for name, data in export.files.items()},
                "manifest": export.manifest.decode(), "signature": export.signature}

    @api.post("/appliance/feedback/export/{export_id}/written")
    async def feedback_written(export_id: str, body: WrittenRequest, request: Request):
        export = exports.pop(export_id, None)
        if export is None:
            raise ApiError(404, f"no pending export {export_id}", "not_found")
        user = _user(request)
        return await worker.submit(lambda: app.feedback_export_done(export, body.out, user))

    @api.get("/appliance/bundles")
    async def bundle_list():
        return await worker.submit(app.generations)

    @api.post("/appliance/bundles/verify")
    async def bundle_verify(body: BundleRequest):
        verified = await worker.submit(lambda: app.verify_bundle(Path(body.path)))
        return {"version": verified.version, "files": len(verified.targets), "targets": sorted(verified.targets),
                "bytes": verified.total_bytes, "notes": verified.notes, "bundle": verified.info.model_dump()}

    @api.post("/appliance/bundles/install")
    async def bundle_install(body: BundleRequest, request: Request):
        """Progress as server-sent events (see the module's docstring)."""
        user = _user(request)

        def work(report):
            result = app.install_bundle(Path(body.path), body.allow_downgrade, user=user, progress=report)
            return {"version": result.version, "generation": result.number, "message": result.message,
                    "downgrade": result.downgrade, "health": result.health,
                    "bundle": result.info.model_dump() if result.info else None}
        return progress_events(worker, work)

    @api.post("/appliance/bundles/rollback")
    async def bundle_rollback(request: Request):
        user = _user(request)
        left, now = await worker.submit(lambda: app.rollback(user=user))
        return {"from": left, "to": now}

    return api


# -- serving on a Unix socket with peer credentials ------------------------------------------------

def _peer(transport) -> dict | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid:{uid}"
    return {"pid": pid, "uid": uid, "gid": gid, "user": name}


def _peer_protocol():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCredProtocol(H11Protocol):
        """h11 with the connecting process's credentials put into every request's scope."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer, inner = _peer(transport), self.app

            async def with_peer(scope, receive, send):
                scope[PEER_KEY] = peer
                await inner(scope, receive, send)
            self.app = with_peer

    return PeerCredProtocol


def load_tokens(path: Path) -> dict[str, str]:
    """`NAME TOKEN` per line (# comments); the file must be readable by its owner only."""
    from appliance.errors import ConfigError

    try:
        mode = path.stat().st_mode
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the token file ({exc.strerror})", "create it, mode 0600") from exc
    if mode & 0o077:
        raise ConfigError(f"{path}: readable by others (mode {mode & 0o777:o})", f"chmod 600 {path}")
    tokens = {}
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) < 24:
            raise ConfigError(f"{path}:{n}: expected 'NAME TOKEN' with a token of at least 24 characters",
                              "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        tokens[parts[1]] = parts[0]
    if not tokens:
        raise ConfigError(f"{path}: no tokens", "add a line 'NAME TOKEN'")
    return tokens


def _bearer_only(inner, tokens: dict[str, str]):
    """TCP connections (no peer credentials) must carry a known bearer token; its name is the user."""
    import hmac

    async def app(scope, receive, send):
        if scope["type"] == "http" and scope.get(PEER_KEY) is None:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
            name = next((n for t, n in tokens.items() if given and hmac.compare_digest(t, given)), None)
            if name is None:
                body = json.dumps({"error": {"message": "a bearer token is required over TCP",
                                             "type": "authentication_error", "code": "invalid_api_key"}}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
            scope[PEER_KEY] = {"user": f"token:{name}", "uid": None, "pid": None, "gid": None}
        await inner(scope, receive, send)
    return app


def serve(app: Appliance, socket_path: Path, queue_size: int = 4, on_ready: Callable[[], None] | None = None,
          tcp: tuple[str, int] | None = None, tokens: dict[str, str] | None = None) -> None:
    """Load the model, bind the socket (mode 0660: the appliance group may connect) and serve until stopped.

    `tcp` (off by default) also listens on HOST:PORT, where every request needs one of `tokens`."""
    import uvicorn

    from appliance.config import untrusted_socket
    from appliance.errors import ConfigError

    if tcp and not tokens:
        raise ConfigError("TCP listening needs bearer tokens", "pass --token-file FILE (lines 'NAME TOKEN', mode 0600)")

    socket_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    why = untrusted_socket(socket_path)  # checked before anything is loaded
    if why:
        raise ConfigError(f"will not listen on {socket_path}: {why}",
                          "give --socket a path in a directory only the service's user can write")
    app.recover()
    app.ready_index()
    _ = app.engine  # load the model before the first request, so a broken one fails at start
    if socket_path.exists() or socket_path.is_symlink():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(socket_path))
            raise ApplianceError(f"{socket_path}: another appliance service is listening",
                                 "stop it first, or give --socket another path")
        except (ConnectionRefusedError, FileNotFoundError):
            socket_path.unlink()  # left by a service that was killed
        finally:
            probe.close()
    # TCP first: once the Unix socket exists, clients may rely on every listener being there.
    tcp_sock = socket.create_server(tcp, backlog=128) if tcp else None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(socket_path))
    finally:
        os.umask(old)
    sock.listen(128)  # clients that find the socket wait in the backlog instead of being refused
    # uvicorn re-raises SIGTERM after its shutdown, so the socket goes in the lifespan's shutdown step.
    api = make_api(app, queue_size, on_shutdown=lambda: socket_path.unlink(missing_ok=True))
    sockets = [sock, *([tcp_sock] if tcp_sock else [])]
    config = uvicorn.Config(_bearer_only(api, tokens or {}), http=_peer_protocol(), log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if on_ready:
        on_ready()
    try:
        server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()
        if socket_path.exists():
            socket_path.unlink()
