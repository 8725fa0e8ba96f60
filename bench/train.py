"""LoRA training throughput.

`python -m bench.train` (on a CPU): `builder sft` on the real base model (SmolLM2-135M-Instruct, imported
from its pinned wheel) with the demo's retrieval-shaped chats, in variants that might help on a CPU,
each as a ratio of real (non-padding) tokens per second against the default (fp32, adapters on every
layer) measured in the same run: bf16 autocast (AVX512-BF16; a CPU that reports AMX without granting it
must not crash), adapters on the upper layers only (the backward pass stops there), packing, shorter
chats (three sources instead of five), and the demo's choice (bf16 and the upper ten layers).

`python -m bench.train --compare-trainer` (meant for CUDA): the builder's `sft` stage (TRL SFTTrainer)
against plain transformers Trainer + PEFT on the same model, tokenized chats, batch and LoRA settings;
Llama-3.2-1B-shaped in bf16 on CUDA, the tiny shape in fp32 on CPU.

Both count tokens per second after the first 3 steps.

    python -m bench.train [--steps 8] [--batch 4] [--only bf16,top10]
    python -m bench.train --compare-trainer [--shape llama-3.2-1b] [--steps 30] [--batch 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


def corpus_texts() -> list[str]:
    """Plain-text documents of the demo corpus (no PDF/DOCX readers needed on a bare GPU box)."""
    return [p.read_text() for p in sorted(CORPUS.rglob("*")) if p.suffix in (".md", ".txt", ".csv")]


def chats(texts: list[str], n: int, seed: int = 0) -> list[dict]:
    """Retrieval-shaped chats: numbered sources cut from the corpus, a question, a cited answer."""
    from appliance.engine.prompt import build_messages, format_source

    rng = random.Random(seed)
    paragraphs = [p for t in texts for p in t.split("\n\n") if len(p) > 200]
    rows = []
    for _ in range(n):
        picked = [p[:500] for p in rng.sample(paragraphs, 3)]
        sources = [format_source(i, f"doc {i}", p) for i, p in enumerate(picked, 1)]
        k = rng.randrange(3)
        answer = picked[k].split(". ")[0].strip() + f" [{k + 1}]."
        rows.append(
            {
                "messages": build_messages("What does the source say?", sources)
                + [{"role": "assistant", "content": answer}]
            }
        )
    return rows


def plain_trainer(
    model_dir: Path, data: Path, steps: int, batch: int, max_length: int, lora, use_cache: bool | None = None
) -> dict:
    """The baseline: transformers Trainer with a PEFT model and a padding collator, nothing else.
    `use_cache=False` turns off the KV cache a training forward otherwise builds (TRL does so)."""
    import torch
    from peft import get_peft_model
    from transformers import Trainer

    from builder import training

    tok = training.Tokenizer(model_dir)
    rows = []
    for line in data.read_text().splitlines():
        ids, mask = training.encode_chat(tok, json.loads(line)["messages"])
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            continue  # the reply was cut off: nothing to learn (TRL drops these too)
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]})

    def collate(batch_rows):
        width = max(len(r["input_ids"]) for r in batch_rows)
        ids = torch.full((len(batch_rows), width), 0, dtype=torch.long)
        labels = torch.full((len(batch_rows), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch_rows), width), dtype=torch.long)
        for i, r in enumerate(batch_rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    base = training.load_model(model_dir)
    if use_cache is not None:
        base.config.use_cache = use_cache
    model = get_peft_model(base, lora.peft_config(base))
    with tempfile.TemporaryDirectory() as tmp:
        args = training.training_arguments(
            Path(tmp), steps=steps, batch_size=batch, grad_accum=1, learning_rate=2e-4, warmup_steps=2, seed=0
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        return training.run_trainer(trainer, training.callbacks(None, "plain"))


# name -> (what it changes, SFTConfig fields, LoRA fields, sources per chat, LM head on labelled positions only)
VARIANTS = {
    "default": (
        "fp32, adapters on all 30 layers, LM head at every position (TRL on a CPU)",
        {},
        {},
        5,
        False,
    ),
    "labelled": ("LM head at the labelled positions only (builder's default)", {}, {}, 5, True),
    "bf16": ("bf16 autocast", {"precision": "bf16"}, {}, 5, False),
    "top10": ("adapters on the last 10 layers", {}, {"top_layers": 10}, 5, False),
    "packing": ("chats packed into 1024-token rows", {"packing": True}, {}, 5, False),
    "short": ("three sources instead of five", {}, {}, 3, False),
    "bf16+labelled": (
        "bf16 + labelled positions only (the demo's choice)",
        {"precision": "bf16"},
        {},
        5,
        True,
    ),
    "bf16+labelled+top10": (
        "bf16 + labelled only + last 10 layers",
        {"precision": "bf16"},
        {"top_layers": 10},
        5,
        True,
    ),
}


def every_position(on: bool) -> None:
    """Undo (or redo) training.score_labelled_positions_only for one variant."""
    import trl.trainer.utils as trl_utils

    from builder import training

    current = trl_utils._use_triton
    if on:
        trl_utils._use_triton = getattr(current, "original", current)
        training.score_labelled_positions_only = lambda: False
    else:
        training.score_labelled_positions_only = SCORE_LABELLED


def demo_chats(path: Path, n: int, sources: int, seed: int = 0) -> Path:
    """The demo's table questions, with `sources` sources each."""
    import random

    from builder import demo

    corpus = demo.Corpus(demo.load_corpus(CORPUS), demo.all_held_out())
    chats = demo.qa_chats(corpus, random.Random(seed), n, prose_share=0.0, sources=sources)
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return path


def variants(steps: int, batch: int, only: set[str] | None) -> list[str]:
    global SCORE_LABELLED

    """`builder sft` on SmolLM2-135M in each variant; a markdown table, ratios against the default."""
    from builder import base, sft, training

    SCORE_LABELLED = training.score_labelled_positions_only
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest, path = base.load_manifest(Path("smollm2-135m-instruct"))
    model = base.import_gguf(base.ImportConfig(out=work / "base", gguf=base.fetch(manifest, path)))
    data = {n: demo_chats(work / f"chats-{n}.jsonl", 200, n) for n in (3, 5)}
    results = {}
    for name, (_, fields, lora, sources, labelled) in VARIANTS.items():
        if only and name not in only and name != "default":
            continue
        every_position(not labelled)
        config = sft.SFTConfig(
            out=work / name,
            model=model,
            datasets=[data[sources]],
            steps=steps,
            batch_size=batch,
            learning_rate=1e-3,
            warmup_steps=1,
            lora=training.LoraSettings(r=16, alpha=32, **lora),
            **fields,
        )
        sft.run(config)
        results[name] = json.loads((work / name / "lineage.json").read_text())["result"]
    base_speed = results["default"]["tokens_per_s"]
    lines = [
        "| variant | what changes | tokens/s | vs default | loss first -> last |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {VARIANTS[name][0]} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base_speed:.2f}x "
            f"| {r['first_loss']} -> {r['last_loss']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compare-trainer", action="store_true", help="builder sft vs plain Trainer (for CUDA)"
    )
    parser.add_argument("--shape", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--chats", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--only", default="", help="comma-separated variants (the default always runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.compare_trainer:
        print("\n".join(variants(args.steps or 8, args.batch or 4, set(filter(None, args.only.split(","))))))
        return
    compare_trainer(args)


def compare_trainer(args) -> None:
    import torch

    from builder import sft, synth, training

    args.shape = args.shape or ("llama-3.2-1b" if torch.cuda.is_available() else "tiny")
    args.steps, args.batch = args.steps or 30, args.batch or 8

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    start = time.perf_counter()
    synth.synthesize(args.shape, work / "base", corpus_texts(), dtype=dtype)
    data = work / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats(corpus_texts(), args.chats)) + "\n")
    print(f"setup {time.perf_counter() - start:.0f} s", file=sys.stderr)
    lora = training.LoraSettings(r=16, alpha=32)
    # The first training on a GPU pays for CUDA/cuBLAS warm-up (measured 2.5x slower): not counted.
    plain_trainer(work / "base", data, 5, args.batch, args.max_length, lora)
    baseline = plain_trainer(work / "base", data, args.steps, args.batch, args.max_length, lora)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = sft.SFTConfig(
        out=work / "sft",
        model=work / "base",
        datasets=[data],
        lora=lora,
        steps=args.steps,
        batch_size=args.batch,
        max_length=args.max_length,
        learning_rate=2e-4,
        warmup_steps=2,
    )
    sft.run(config)
    ours = json.loads((work / "sft" / "lineage.json").read_text())["result"]
    # Run again after ours (order effects), and with the KV cache off, to see where a difference comes from.
    again = plain_trainer(work / "base", data, args.steps, args.batch, args.max_length, lora)
    no_cache = plain_trainer(
        work / "base", data, args.steps, args.batch, args.max_length, lora, use_cache=False
    )
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": dtype,
        "shape": args.shape,
        "batch": args.batch,
        "steps": args.steps,
        "lora": lora.model_dump(),
        "torch": torch.__version__,
        "plain_trainer_tokens_per_s": baseline["tokens_per_s"],
        "builder_sft_tokens_per_s": ours["tokens_per_s"],
        "ratio": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 3),
        "plain_trainer_again_tokens_per_s": again["tokens_per_s"],
        "plain_trainer_use_cache_off_tokens_per_s": no_cache["tokens_per_s"],
        "plain_loss": [baseline["first_loss"], baseline["last_loss"]],
        "sft_loss": [ours["first_loss"], ours["last_loss"]],
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if torch.cuda.is_available()
        else None,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_bench.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
