"""Pre-training stage: a Llama-architecture model trained on domain text with transformers' Trainer.

For the demo the model starts from random weights of a named shape (continual pre-training of a real
base model is the same loop from a loaded checkpoint; issue 3 adds that path, LoRA and replay).
Reads top to bottom: tokenize and pack -> build the model -> train -> save the HF checkpoint with
its tokenizer and `train.json` (the resolved config, losses, throughput).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shape: str = Field("demo", description="Model shape from builder.synth.SHAPES")
    steps: int = Field(280, ge=1, description="Optimizer steps at most")
    max_minutes: float = Field(7.0, gt=0, description="Stop training after this much wall time")
    seq_len: int = Field(512, ge=32, le=8192, description="Packed sequence length")
    batch_size: int = Field(8, ge=1, description="Sequences per step")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (cosine decay)")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share of sequences held out for eval loss")
    seed: int = Field(0, description="Random seed for weights and data order")


def pack(token_lists: list[list[int]], seq_len: int) -> list[list[int]]:
    """Concatenate documents and cut the stream into equal blocks (the last partial block is dropped)."""
    stream = [t for ids in token_lists for t in ids]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def run(config: PretrainConfig, texts: list[str], tokenizer_dir: Path, out: Path) -> dict:
    import random

    import sentencepiece as spm
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from builder.synth import encode, new_model

    # -- data: tokenized exactly as llama.cpp will tokenize at inference time
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    blocks = pack([encode(sp, t) for t in texts], config.seq_len)
    if len(blocks) < 2:
        raise ValueError(f"only {len(blocks)} sequences of {config.seq_len} tokens; give more text or a "
                         "shorter seq_len")
    random.Random(config.seed).shuffle(blocks)
    n_eval = max(1, int(len(blocks) * config.eval_fraction)) if config.eval_fraction else 0
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]

    class Blocks(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            ids = torch.tensor(self.rows[i], dtype=torch.long)
            return {"input_ids": ids, "labels": ids.clone()}

    # -- model
    model = new_model(config.shape, vocab_size=sp.get_piece_size(), seed=config.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pre-training {config.shape} ({n_params:,} parameters) on {len(train_blocks)} x {config.seq_len} "
          f"tokens, at most {config.steps} steps or {config.max_minutes:g} min", file=sys.stderr)

    class TimeBudget(TrainerCallback):
        def __init__(self, seconds: float):
            self.deadline = time.monotonic() + seconds
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() > self.deadline:
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    class StderrLog(TrainerCallback):
        """Progress as lines on stderr (stdout carries the command's result only)."""

        def __init__(self):
            self.start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                elapsed = time.monotonic() - self.start
                eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
                print(f"  step {state.global_step}/{state.max_steps}  loss {float(logs['loss']):.3f}  "
                      f"lr {float(logs.get('learning_rate', 0)):.2e}  {elapsed:.0f} s elapsed, ~{eta:.0f} s left",
                      file=sys.stderr, flush=True)

    budget = TimeBudget(config.max_minutes * 60)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=0.01, logging_steps=max(1, min(20, config.steps // 10)), save_strategy="no",
        report_to=[], seed=config.seed, use_cpu=not torch.cuda.is_available(), bf16=bf16,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(train_blocks), callbacks=[budget, StderrLog()])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate(Blocks(eval_blocks))["eval_loss"] if eval_blocks else None
    steps_done = trainer.state.global_step

    # -- save
    model.config.torch_dtype = "float32"
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    stats = {
        "config": config.model_dump(), "parameters": n_params, "train_sequences": len(train_blocks),
        "eval_sequences": len(eval_blocks), "steps": steps_done, "seconds": round(seconds, 1),
        "stopped_by_time_budget": budget.stopped_at is not None,
        "tokens_per_s": round(steps_done * config.batch_size * config.seq_len / seconds, 1),
        "train_loss": round(result.training_loss, 4),
        "eval_loss": round(eval_loss, 4) if eval_loss is not None else None,
        "eval_perplexity": round(math.exp(eval_loss), 2) if eval_loss is not None else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "bf16": bf16,
    }
    (out / "train.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"trained {steps_done} steps in {seconds:.0f} s ({stats['tokens_per_s']:.0f} tokens/s); train loss "
          f"{stats['train_loss']}, eval loss {stats['eval_loss']}", file=sys.stderr)
    return stats
