"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions (streamed over SSE or not; retrieval on
by default; extension fields `collection`, `rag`, `conversation`; `citations`, `sources` and the code
checks in the response and in the final stream chunk) and /v1/embeddings."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from appliance.app import Appliance
from appliance.errors import ApplianceError
from appliance.protocols import Sampling
from appliance.records import audit
from appliance.retrieval import rag
from appliance.schemas import ChatRequest, EmbeddingRequest, Message
from appliance.service.deps import get_appliance, get_worker, refuse, user_of
from appliance.service.errors import ApiError
from appliance.service.limits import HEARTBEAT_S, MAX_EMBED_INPUTS, MAX_PROMPT_CHARS
from appliance.service.worker import Worker

router = APIRouter()


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


def model_id(app: Appliance) -> str:
    return app.installed.manifest.model.name


@router.get("/v1/models")
async def models(*, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker)):
    return await worker.submit(lambda: model_list(app))


def model_list(app: Appliance) -> dict:
    m = app.installed.manifest
    created = int(app.installed.path.stat().st_mtime)
    return {
        "object": "list",
        "data": [
            {
                "id": m.model.name,
                "object": "model",
                "created": created,
                "owned_by": "appliance",
                "generation": app.installed.number,
                "quant": m.model.quant,
            },
            {
                "id": m.embedder.name,
                "object": "model",
                "created": created,
                "owned_by": "appliance",
                "dimensions": m.embedder.dim,
            },
        ],
    }


def limits(app: Appliance, body: ChatRequest, engine_server=None) -> tuple[int, Sampling]:
    """The answer's length and sampling; the length is checked against the context the prompt will be
    fitted to: the engine server's slots (what llama-server reports it holds) or the model in process."""
    max_tokens = body.max_completion_tokens or body.max_tokens or app.settings.max_tokens
    context = (
        engine_server.context if engine_server is not None and engine_server.context else None
    ) or app.context_tokens()
    if max_tokens > context // 2:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} is more than half the {context}-token context; "
            f"allowed: 1 to {context // 2}",
        )
    given = {} if body.top_p is None else {"top_p": body.top_p}
    return max_tokens, replace(
        app.sampling(body.temperature),
        logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        **given,
    )


def finish(answer) -> str:
    return (
        "length"
        if answer.stopped or answer.timing.get("tokens", 0) >= answer.timing.get("max_tokens", 1 << 30)
        else "stop"
    )


def usage(answer: rag.Answer) -> dict:
    return {
        "prompt_tokens": answer.timing.get("prompt_tokens", 0),
        "completion_tokens": answer.timing.get("tokens", 0),
        "total_tokens": answer.timing.get("prompt_tokens", 0) + answer.timing.get("tokens", 0),
    }


def completion_json(app: Appliance, answer: rag.Answer, created: int, cid: str) -> dict:
    """OpenAI's chat completion, and beside it the answer's report (schemas.AnswerReport.completion_fields)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model_id(app),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.answer},
                "finish_reason": finish(answer),
            }
        ],
        "usage": usage(answer),
        **answer.report().completion_fields(),
    }


@router.post("/v1/chat/completions")
async def chat(
    *,
    app: Appliance = Depends(get_appliance),
    worker: Worker = Depends(get_worker),
    body: ChatRequest,
    request: Request,
):
    question, history = _question(body.messages)
    max_tokens, sampling = limits(app, body, request.app.state.engine_server)
    user = user_of(request)
    stop = threading.Event()
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.conversation is not None:
        owner = await worker.submit(lambda: app.store.conversation_user(body.conversation))
        if owner is None:
            raise ApiError(
                404,
                f"no conversation {body.conversation}; create one with POST /appliance/conversations",
                "not_found",
            )
        if owner != (user or "unknown"):  # its turns would come back in the answer's context
            await refuse(
                request,
                403,
                f"conversation {body.conversation} belongs to another user",
                "forbidden",
                {"conversation": body.conversation},
            )
        history = None  # the stored turns are the history

    engine_server = request.app.state.engine_server
    if engine_server is not None:  # llama-server generates; the worker only prepares and records
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(
            _engine_answer(
                app, worker, engine_server, body, question, history, max_tokens, sampling, user, stop, queue
            )
        )
        if body.stream:
            return _sse(app, queue, created, cid, stop, task)
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), 0.1)
            except TimeoutError:
                if await request.is_disconnected():
                    stop.set()
                continue
            if kind == "done":
                return completion_json(app, value, created, cid)
            if kind == "error":
                raise value

    def ask(**streaming):
        return app.answer(
            question,
            collection=body.collection,
            use_rag=body.rag,
            max_tokens=max_tokens,
            sampling=sampling,
            history=history,
            should_stop=stop.is_set,
            user=user,
            conversation=body.conversation,
            **streaming,
        )

    if not body.stream:

        def run():
            return ask()

        future = worker.submit(run)
        while not future.done():
            if await request.is_disconnected():
                stop.set()
                break
            await asyncio.wait({future}, timeout=0.1)
        return completion_json(app, await future, created, cid)

    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def run_streaming():
        try:
            answer = ask(on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, ("text", piece)))
            loop.call_soon_threadsafe(pieces.put_nowait, ("done", answer))
        except BaseException as exc:  # reported to the client as the stream's last event
            loop.call_soon_threadsafe(pieces.put_nowait, ("error", exc))

    future = worker.submit(run_streaming)

    return _sse(app, pieces, created, cid, stop, future)


def _sse(
    app: Appliance, pieces: asyncio.Queue, created: int, cid: str, stop: threading.Event, running
) -> StreamingResponse:
    """The answer as OpenAI's chunks from ("text", piece), ("done", answer) or ("error", exc) items on
    `pieces`; `running`: the work producing them, awaited when the stream ends."""

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        data = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id(app),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
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
                    if value:
                        yield chunk({"content": value})
                elif kind == "done":
                    yield chunk({}, finish(value), usage=usage(value), **value.report().completion_fields())
                    yield "data: [DONE]\n\n"
                    return
                else:
                    message = (
                        str(value) if isinstance(value, ApplianceError) else f"internal error: {value!r}"
                    )
                    yield f"data: {json.dumps({'error': {'message': message, 'type': type(value).__name__}})}\n\n"
                    return
        finally:
            stop.set()  # a client that went away stops the generation at its next token
            await asyncio.shield(running)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _engine_answer(
    app: Appliance,
    worker: Worker,
    engine_server,
    body: ChatRequest,
    question: str,
    history: list[dict] | None,
    max_tokens: int,
    sampling: Sampling,
    user: str | None,
    stop: threading.Event,
    pieces: asyncio.Queue,
) -> None:
    """Prepare on the worker, generate on the engine server (other requests' work goes on meanwhile),
    record on the worker; items onto `pieces` as `_sse` reads them. An answer that fails once text was
    sent (the engine died under it) is audited as `ask_failed`: the operator saw text that no `ask` row
    records."""
    texts: list[str] = []
    try:
        async with engine_server.lease(app, worker) as lease:
            job = await worker.submit(
                lambda: app.prepare_ask(
                    question,
                    body.collection,
                    body.rag,
                    max_tokens,
                    sampling,
                    history=history,
                    user=user,
                    conversation=body.conversation,
                    tokenizer=lease.tokenizer,
                    model_info=lease.model_info,
                )
            )
            if job.prep.abstain:  # no source answers: the appliance says so, the engine is not asked
                texts, timing, stopped = rag.decode(lease.tokenizer, job.prep)
                await pieces.put(("text", texts[0]))
            else:
                # the signed template renders off the event loop: however long it takes, other requests go on
                tokens = await asyncio.to_thread(
                    lease.tokenizer.prompt_for, job.prep.messages, max_tokens, sampling
                )
                start, first, stopped = time.perf_counter(), None, False
                async for piece in lease.stream(tokens, max_tokens, sampling):
                    first = first or time.perf_counter()
                    texts.append(piece)
                    await pieces.put(("text", piece))
                    if stop.is_set():
                        stopped = True
                        break
                timing = rag.timing_of(job.prep, start, first, time.perf_counter(), len(texts), len(tokens))
        answer = await worker.submit(lambda: app.finish_ask(job, texts, timing, stopped))
        await pieces.put(("done", answer))
    except BaseException as exc:  # the stream's last event, or the non-streamed answer's error
        await pieces.put(("error", exc))
        if texts and isinstance(exc, ApplianceError):
            row = {
                "question_sha256": audit.sha256_text(question),
                "sent_sha256": audit.sha256_text("".join(texts)),
                "tokens_sent": len(texts),
                "error": exc.message[:300],
            }
            await worker.submit(lambda: app.audit("ask_failed", row, user=user))
        if not isinstance(exc, Exception):
            raise


@router.post("/v1/embeddings")
async def embeddings(
    *, app: Appliance = Depends(get_appliance), worker: Worker = Depends(get_worker), body: EmbeddingRequest
):
    texts = [body.input] if isinstance(body.input, str) else body.input
    if len(texts) > MAX_EMBED_INPUTS or any(len(t) > MAX_PROMPT_CHARS for t in texts):
        raise ApiError(
            400, f"at most {MAX_EMBED_INPUTS} inputs of at most {MAX_PROMPT_CHARS} characters each"
        )
    vectors = await worker.submit(lambda: app.embedder.embed(texts))
    return {
        "object": "list",
        "model": app.embedder.name,
        "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
        "usage": {
            "prompt_tokens": sum(len(t.split()) for t in texts),
            "total_tokens": sum(len(t.split()) for t in texts),
        },
    }
