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

Roles: every caller on the socket is an operator; an administrator is the service's own user, root,
a member of `admin_group` (from the peer's supplementary groups) or a bearer token marked `admin`.
Only administrators install, verify and roll back bundles, export feedback, read other users'
audit rows and feedback, and remove other users' documents; a refusal is 403 naming the role and is
audited. Bodies are capped (JSON at MAX_JSON_BODY, uploads at max_file_mb: 413; a few uploads at a
time, each at a minimum rate), a request head must arrive within HEADER_TIMEOUT_S, and connections are
admitted per peer so that no caller holds them all (appliance.service.limits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from fastapi import FastAPI

from appliance.app import Appliance
from appliance.service import openai, routes
from appliance.service.deps import PEER_KEY, Refusals
from appliance.service.errors import ApiError, install_handlers
from appliance.service.limits import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_EMBED_INPUTS,
    MAX_JSON_BODY,
    MAX_PROMPT_CHARS,
)
from appliance.service.transport import load_tokens, serve
from appliance.service.worker import UploadSlots, Worker

__all__ = [
    "ApiError",
    "BODY_TIMEOUT_S",
    "HEADER_TIMEOUT_S",
    "MAX_CONNECTIONS",
    "MAX_EMBED_INPUTS",
    "MAX_JSON_BODY",
    "MAX_PROMPT_CHARS",
    "PEER_KEY",
    "load_tokens",
    "make_api",
    "serve",
]


def make_api(
    app: Appliance, queue_size: int = 4, on_shutdown: Callable[[], None] | None = None, engine_server=None
) -> FastAPI:
    """The FastAPI application over one Appliance (one model, one database); `engine_server`: an
    appliance.engine.server.EngineServer that generates (None: the worker generates in process)."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if on_shutdown:
            on_shutdown()

    api = FastAPI(
        title="appliance", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    api.state.appliance = app
    api.state.worker = Worker(queue_size, before=app.follow_current)
    api.state.exports = {}  # feedback exports built, not yet written by the caller
    api.state.uploads = UploadSlots()
    api.state.refusals = Refusals()
    api.state.engine_server = engine_server
    install_handlers(api)
    api.include_router(openai.router)
    api.include_router(routes.router)
    return api
