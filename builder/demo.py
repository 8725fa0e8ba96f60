"""`builder demo`: the demo generation from the corpus shipped in `builder/demo_data/`.

corpus -> training text (the documents, plus retrieval-shaped examples in the appliance's own prompt
format so the model learns to answer from numbered sources and cite them) -> SentencePiece tokenizer
-> pre-training from scratch -> GGUF f16 with llama.cpp's converter -> Q8_0 -> ONNX embedder ->
generation directory (`generation.json` lists every file's sha256 and the lineage).

The held-out questions in `demo_data/eval/qa.jsonl` never enter the training text, and the labor
categories they ask about are left out of the generated examples.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from appliance.documents import chunk_document, expand_paths, read_document, table_row_text
from appliance.manifest import sha256_file, write_manifest
from appliance.prompt import build_messages, format_source
from builder.errors import BuilderError

DEMO_DATA = Path(__file__).parent / "demo_data"
TEMPLATE = Path(__file__).parent / "templates" / "chat_template.jinja"


def load_corpus(corpus: Path) -> list:
    files, missing = expand_paths([corpus])
    if missing or not files:
        raise BuilderError(f"{corpus}: no documents found", "point --corpus at a directory of documents")
    return [read_document(p, max_bytes=50_000_000) for p in files]


def held_out(eval_file: Path) -> list[dict]:
    return [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]


@functools.cache
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(TEMPLATE.read_text())


def render_chat(messages: list[dict]) -> str:
    """A chat in the shipped template, as the appliance will render it (BOS and EOS as text pieces)."""
    return _template().render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=False)


def _example(rng: random.Random, question: str, answer_fmt: str, right: tuple[str, str],
             others: list[tuple[str, str]]) -> str:
    """One chat: the right source among distractors in random order, the answer citing its number."""
    sources = others + [right]
    rng.shuffle(sources)
    n = sources.index(right) + 1
    blocks = [format_source(i, title, text) for i, (title, text) in enumerate(sources, start=1)]
    messages = build_messages(question, blocks) + [{"role": "assistant", "content": answer_fmt.format(n=n)}]
    return render_chat(messages)


def training_texts(docs: list, eval_items: list[dict], seed: int = 0, repeats: int = 1,
                   variants: int = 4) -> list[str]:
    """Documents `repeats` times, and each generated question `variants` times with other distractors
    in another order, so that the model learns to find and copy the answer, not the position."""
    rng = random.Random(seed)
    held_text = " ".join(f"{q['question']} {q['answer']}" for q in eval_items)
    texts: list[str] = []
    for doc in docs:
        texts += [doc.text] * repeats
    rows = [(doc, row) for doc in docs if doc.table is not None for row in doc.table.rows]
    for (doc, row), _ in ((r, v) for r in rows for v in range(variants)):
        code, title = row.get("code", ""), row.get("title", "")
        if not code or code in held_text or title in held_text:
            continue  # a held-out question asks about this row
        right = (doc.title, table_row_text(doc.table.columns, row))
        others = [(d.title, table_row_text(d.table.columns, r)) for d, r in rng.sample(rows, 2) if r is not row]
        texts.append(_example(rng, f"What is the code for the {title} labor category?",
                              f"The {title} labor category has code {code} [{{n}}].", right, others))
        texts.append(_example(rng, f"Which labor category has code {code}?",
                              f"Code {code} is the {title} labor category [{{n}}].", right, others))
        texts.append(_example(rng, f"What education and experience does a {title} need?",
                              f"A {title} needs {row.get('education', '')} and {row.get('years', '')} years of "
                              f"experience [{{n}}].", right, others))
    prose = [(doc, c) for doc in docs if doc.table is None for c in chunk_document(doc, 700) if c.heading]
    for (doc, chunk), _ in ((p, v) for p in prose for v in range(max(1, variants // 2))):
        first = chunk.text.split(". ")[0].rstrip(".") + "."
        if first in held_text:
            continue
        right = (f"{doc.title} - {chunk.heading}", chunk.text)
        others = [(f"{d.title} - {c.heading}", c.text) for d, c in rng.sample(prose, 2) if c is not chunk]
        texts.append(_example(rng, f"What does the {doc.path.stem} document say about {chunk.heading.lower()}?",
                              f"{first} [{{n}}]", right, others))
    texts.append(_example(rng, "What is the weather on the moon today?",
                          "The sources do not say, so I do not know.", ("unrelated", prose[0][1].text),
                          [("unrelated", prose[1][1].text)]))
    rng.shuffle(texts)
    return texts


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def build(out: Path, *, shape: str = "demo", steps: int = 280, max_minutes: float = 7.0, quant: str = "Q8_0",
          embedder_dir: Path | None = None, corpus: Path | None = None, seq_len: int = 512,
          batch_size: int = 8, seed: int = 0, keep_work: bool = False) -> dict:
    from builder import embedder, llamacpp, pretrain

    corpus = corpus or DEMO_DATA / "corpus"
    started = time.perf_counter()
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        raise BuilderError(f"{out} exists and is not empty", "remove it or choose another --out")
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        # -- data
        docs = load_corpus(corpus)
        eval_items = held_out(DEMO_DATA / "eval" / "qa.jsonl")
        texts = training_texts(docs, eval_items, seed=seed)
        print(f"corpus: {len(docs)} documents -> {len(texts)} training texts", file=sys.stderr)

        # -- tokenizer and model
        from builder.synth import SHAPES, train_tokenizer

        tok_dir = work / "tokenizer"
        train_tokenizer(texts, tok_dir, vocab_size=SHAPES[shape]["vocab_size"])
        hf_dir = work / "hf"
        config = pretrain.PretrainConfig(shape=shape, steps=steps, max_minutes=max_minutes, seq_len=seq_len,
                                         batch_size=batch_size, seed=seed)
        train_stats = pretrain.run(config, texts, tok_dir, hf_dir)

        # -- GGUF, quantized with the runtime's own llama.cpp
        f16 = llamacpp.convert_hf(hf_dir, work / "model-f16.gguf", "f16")
        if quant.upper() == "F16":
            shutil.copyfile(f16, staging / "model.gguf")
        else:
            llamacpp.quantize(f16, staging / "model.gguf", quant)

        # -- embedder (reuse an exported one when given)
        if embedder_dir is None:
            embedder_dir = work / "embedder-export"
            embedder.export(embedder_dir)
        emb_manifest = json.loads((embedder_dir / "embedder.json").read_text())
        (staging / "embedder").mkdir()
        for name in ("embedder.json", "tokenizer.json", emb_manifest["files"]["int8"]):
            shutil.copyfile(embedder_dir / name, staging / "embedder" / name)
        slim = dict(emb_manifest, files={"int8": emb_manifest["files"]["int8"]})
        (staging / "embedder" / "embedder.json").write_text(json.dumps(slim, indent=2) + "\n")

        shutil.copyfile(TEMPLATE, staging / "chat_template.jinja")
        corpus_files = {str(d.path.relative_to(corpus)): sha256_file(d.path) for d in docs}
        manifest = write_manifest(staging, {
            "name": f"meridian-demo-{shape}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": f"meridian-demo-{shape}", "architecture": "llama", "quant": quant.upper(),
                      "context_length": SHAPES[shape]["max_position_embeddings"],
                      "parameters": train_stats["parameters"]},
            "embedder": {"name": emb_manifest["name"], "dim": emb_manifest["dim"]},
            "lineage": {
                "base_model": f"random init, shape {shape} (pre-trained from scratch)",
                "corpus": corpus_files,
                "held_out_eval": sha256_file(DEMO_DATA / "eval" / "qa.jsonl"),
                "stages": [{"stage": "pretrain", **train_stats},
                           {"stage": "export", "converter": f"llama.cpp from llama-cpp-python "
                            f"{llamacpp.LLAMA_CPP_PYTHON_VERSION}", "outtype": "f16", "quant": quant.upper()}],
                "embedder": {k: emb_manifest.get(k) for k in ("name", "dim", "pooling", "normalize", "agreement")},
                "builder_commit": _git_commit(),
            },
        })
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    print(f"demo generation written to {out} in {seconds / 60:.1f} min "
          f"(model {manifest.files['model.gguf'].size / 1e6:.1f} MB {quant.upper()})", file=sys.stderr)
    return {"out": str(out), "seconds": round(seconds, 1), "train": train_stats}
