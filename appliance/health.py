"""The health check a generation passes before it becomes current (signed or unsigned install): its chat
template renders every shape of prompt the appliance sends, the model loads and answers a canary, the
embedder's vectors have the declared dimension, and the local documents are re-embedded if the
embedder changed. What fails here is the bundle's fault: a refused install (BundleError)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.asking import RECALL_MESSAGES
from appliance.bundles.manifest import GenerationManifest
from appliance.retrieval import rag

if TYPE_CHECKING:
    from appliance.app import Appliance


def render_shapes(template_text: str) -> int:
    """Render the chat template for every shape of prompt the appliance sends (within the render
    budget, appliance.engine.llama): a template that passes one canary but runs away on another is refused."""
    from appliance.engine.llama import compile_template, render_template
    from appliance.engine.prompt import build_messages, format_source

    template = compile_template(template_text)
    sources = [
        format_source(i, f"Source {i}", "Labor category 15-1252.00, Software Developer. " * 40)
        for i in range(1, 6)
    ]
    shapes = [
        [{"role": "user", "content": "Reply with the word OK."}],
        build_messages("What is the code for a Software Developer?", sources),
        build_messages(
            "And its education?",
            sources[:2],
            history=[
                {"role": "user", "content": "What is the code for a Software Developer?"},
                {"role": "assistant", "content": "It is 15-1252.00 [1]."},
            ],
            more=True,
        ),
        build_messages("Say hello.", [], use_rag=False),
        build_messages("x" * 30_000, []),
        # the longest history the service sends (a recalled conversation): a template whose cost grows
        # with the turns is refused here, not on an operator's third follow-up
        build_messages(
            "And the next one?",
            sources[:2],
            history=[
                {
                    "role": ("user", "assistant")[i % 2],
                    "content": f"Turn {i}: the code is 15-1252.00 [1]. " * 20,
                }
                for i in range(RECALL_MESSAGES)
            ],
            more=True,
        ),
    ]
    for messages in shapes:
        render_template(
            template, messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True
        )
    return len(shapes)


def check(app: Appliance, staged: Path, manifest: GenerationManifest, progress=None) -> dict:
    """Health check of a staged generation, then re-embedding of local documents if its embedder
    differs: the model loads and answers a canary prompt, the embedder's vectors have the declared
    dimension, and the index ends up with that dimension."""
    from appliance.engine.llama import LlamaEngine
    from appliance.errors import BundleError, ModelError
    from appliance.retrieval.embed import OnnxEmbedder

    start = time.perf_counter()
    template_text = (staged / manifest.chat_template).read_text()
    try:
        shapes = render_shapes(template_text)  # before the model: a hostile template costs nothing to refuse
        app.let_go()  # the running model's memory goes to the health check (reloaded on next use if refused)
        n_ctx = min(512, manifest.model.context_length)
        with LlamaEngine(
            staged / manifest.model.file,
            template_text,
            n_ctx=n_ctx,
            threads=app.settings.threads,
            name=manifest.model.name,
            mmap=app.settings.mmap,
        ) as engine:
            pieces = list(
                engine.stream(
                    [{"role": "user", "content": "Reply with the word OK."}],
                    max_tokens=8,
                    sampling=rag.GREEDY,
                )
            )
    except ModelError as exc:  # the bundle's content is what failed: a refused bundle (exit 10)
        raise BundleError(f"health check: {exc.message}", exc.fix or "rebuild the bundle") from exc
    if not pieces:
        raise BundleError(
            "health check: the model produced no tokens for the canary prompt",
            "the model is broken; rebuild the bundle",
        )
    embedder = OnnxEmbedder(
        staged / manifest.embedder.dir,
        threads=app.settings.embed_threads,
        batch_size=app.settings.embed_batch,
    )
    dim = embedder.embed(["labor category canary"]).shape[1]
    if dim != manifest.embedder.dim or embedder.dim != manifest.embedder.dim:
        raise BundleError(
            f"health check: the embedder returns {dim}-d vectors, its manifest says {manifest.embedder.dim}",
            "rebuild the bundle",
        )
    reembedded = app.store.ensure_embedder(embedder.name, embedder.dim, embedder.embed, progress)
    name, index_dim = app.store.embedder_id()
    if name is not None and index_dim != manifest.embedder.dim:
        raise BundleError(
            f"health check: the index holds {index_dim}-d vectors after re-embedding, the "
            f"embedder {manifest.embedder.dim}",
            "run the install again",
        )
    return {
        "canary_tokens": len(pieces),
        "embedder_dim": dim,
        "reembedded_chunks": reembedded,
        "template_shapes": shapes,
        "seconds": round(time.perf_counter() - start, 2),
    }
