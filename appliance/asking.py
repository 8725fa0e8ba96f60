"""Answering a question, in two steps around the model: `prepare` (the history, retrieval, the prompt)
and `finish` (citations and code checks, the audit row, the conversation). The Appliance runs them
around its own engine; the service runs them apart around llama-server, so its worker is free while
the engine decodes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.protocols import Sampling
from appliance.records import audit
from appliance.retrieval import evidence, rag
from appliance.schemas import AnswerReport

if TYPE_CHECKING:
    from appliance.app import Appliance


@dataclass
class AskJob:
    """A question between `prepare_ask` and `finish_ask`."""

    prep: rag.Prepared
    given: list[dict] | None  # the history as the caller sent it
    collection: str | None
    use_rag: bool
    user: str | None
    conversation: int | None


HISTORY_MESSAGES = 4  # earlier turns sent with a question: follow-ups work, sources keep most of the context
RECALL_MESSAGES = 12  # a conversation this process answered is sent whole, with its sources, up to this


def ask(
    app: Appliance,
    question: str,
    *,
    collection: str | None = None,
    use_rag: bool = True,
    max_tokens: int | None = None,
    temperature: float | None = None,
    on_text: Callable[[str], None] | None = None,
    history: list[dict] | None = None,
    should_stop: Callable[[], bool] | None = None,
    user: str | None = None,
    conversation: int | None = None,
    sampling: Sampling | None = None,
) -> AnswerReport:
    """A question answered by the model in this process, as the CLI and UI show it. `conversation`: a
    stored conversation (the operator UI's); its last turns are the history and the question and answer
    are added to it. `sampling`: all of how the answer is decoded (the API's top_p, logit_bias, seed and
    stop), in place of `temperature`."""
    return answer(
        app,
        question,
        collection=collection,
        use_rag=use_rag,
        max_tokens=max_tokens,
        temperature=temperature,
        on_text=on_text,
        history=history,
        should_stop=should_stop,
        user=user,
        conversation=conversation,
        sampling=sampling,
    ).report()


def answer(
    app: Appliance,
    question: str,
    *,
    collection: str | None = None,
    use_rag: bool = True,
    max_tokens: int | None = None,
    temperature: float | None = None,
    on_text: Callable[[str], None] | None = None,
    history: list[dict] | None = None,
    should_stop: Callable[[], bool] | None = None,
    user: str | None = None,
    conversation: int | None = None,
    sampling: Sampling | None = None,
) -> rag.Answer:
    """`ask` with the whole record (the raw text, whether it was stopped, the prompt): `prepare`, the
    model in this process, `finish` (the service runs them apart around its engine server)."""
    job = prepare(
        app,
        question,
        collection,
        use_rag,
        max_tokens,
        sampling or app.sampling(temperature),
        history=history,
        user=user,
        conversation=conversation,
    )
    return finish(app, job, *rag.decode(app.engine, job.prep, on_text, should_stop))


def prepare(
    app: Appliance,
    question: str,
    collection: str | None = None,
    use_rag: bool = True,
    max_tokens: int | None = None,
    sampling: Sampling | None = None,
    history: list[dict] | None = None,
    user: str | None = None,
    conversation: int | None = None,
    tokenizer=None,
    model_info: dict | None = None,
) -> AskJob:
    """Everything before the model: history, retrieval, the prompt. `sampling`: default the settings'
    temperature; `tokenizer`: what counts tokens and knows the context (default: the loaded engine);
    `model_info`: the model that will answer."""
    app.audit_ready()  # nothing is answered that cannot be audited
    tokenizer = tokenizer or app.engine
    if conversation is not None and history is None:
        history = [
            {"role": m["role"], "content": m["content"]}
            for m in app.store.messages(conversation, limit=RECALL_MESSAGES)
        ]
    max_tokens = max_tokens or app.settings.max_tokens
    given = history
    history, earlier = history_for(app, history, max_tokens, tokenizer) if history else (history, [])
    # A follow-up keeps its earlier sources; follow_up_k new ones join them (searched for past those).
    follow_up = use_rag and bool(earlier)
    start = time.perf_counter()
    hits = (
        app.hits(
            question, k=app.settings.follow_up_k + len(earlier) if follow_up else None, collection=collection
        )
        if use_rag
        else []
    )
    retrieval_ms = (time.perf_counter() - start) * 1000
    prep = rag.prepare(
        tokenizer,
        question,
        hits,
        model_info or app.model_info(),
        n_ctx=tokenizer.n_ctx,
        max_tokens=max_tokens,
        sampling=sampling or app.sampling(),
        use_rag=use_rag,
        retrieval_ms=retrieval_ms,
        history=history,
        earlier=earlier if use_rag else None,
        new_sources=app.settings.follow_up_k if follow_up else None,
        titles=app.store.ref_titles(),
        reading=rag.Reading(
            app.embedder,
            app.settings.shown_sentences,
            app.settings.abstain_below,
            tuple(
                evidence.unknown_terms(question, app.store.term_document_counts, rag.named_in(hits))
                if use_rag and app.settings.abstain_unknown_names
                else ()
            ),
        ),
    )
    return AskJob(prep, given, collection, use_rag, user, conversation)


def finish(app: Appliance, job: AskJob, pieces: list[str], timing: dict, stopped: bool = False) -> rag.Answer:
    """Everything after the model: citations and code checks, the audit row (naming the model that
    answered), the conversation."""
    result = rag.complete(job.prep, pieces, timing, stopped)
    question = job.prep.question
    if not result.stopped:
        app.turns.remember(question, result)
    detail: dict[str, object] = {
        "question_sha256": audit.sha256_text(question),
        "answer_sha256": audit.sha256_text(result.answer),
        "collection": job.collection,
        "rag": job.use_rag,
        "chunks": [{"chunk_id": h.chunk_id, "doc_sha256": h.doc_sha256} for h in result.sources],
        "citations": [c["n"] for c in result.citations],
        "unverified_codes": result.unverified_codes,
    }
    if result.conflicting_codes:
        detail["conflicting_codes"] = result.conflicting_codes
    if result.unsupported:
        detail["unsupported"] = len(
            result.unsupported
        )  # a count: the answer's text is kept only with audit_text
    if result.evidence:
        detail["evidence"] = [
            {"n": e.n, "chunk_id": e.chunk_id, "start": e.start, "end": e.end} for e in result.evidence
        ]
    if result.not_given:
        detail["not_given"] = result.not_given
    if result.abstained:
        detail["abstained"] = True  # no source answered; the model was not asked
    if result.stopped:
        detail["stopped"] = True  # the client went away: what it was sent is still recorded
    if result.earlier:
        detail["earlier_sources"] = result.earlier  # chunks[:n] came with the history, the rest are new
    if job.given:  # the history as the caller sent it (the model may have seen it with its sources)
        detail["history_sha256"] = audit.sha256_text(json.dumps(job.given, sort_keys=True))
    if app.settings.audit_text:
        detail.update(question=question, answer=result.answer)
    result.audit_id = app.audit("ask", detail, user=job.user, model=job.prep.model_info)["id"]
    if job.conversation is not None:
        app.store.add_message(job.conversation, "user", question)
        app.store.add_message(job.conversation, "assistant", result.raw or result.answer, result.audit_id)
    return result


def history_for(
    app: Appliance, history: list[dict], max_tokens: int, tokenizer
) -> tuple[list[dict], list[rag.Hit]]:
    """The history to send and the sources numbered in it: the conversation as the model saw it
    (rag.TurnMemory) when this process answered all of it and it takes at most two thirds of the
    room left for the prompt, so the new question still gets sources; else its last turns as typed."""
    recalled = app.turns.recall(history)
    if recalled is not None:
        room = (tokenizer.n_ctx - max_tokens) * 2 // 3
        if sum(tokenizer.count_tokens(m["content"]) + 8 for m in recalled[0]) <= room:
            return recalled
    return history[-HISTORY_MESSAGES:], []
