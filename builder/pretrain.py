"""`builder pretrain CONFIG`: continual pre-training on a customer's raw text.

setup: read documents (txt/md/pdf/docx/csv/xlsx through the appliance's own reader) and optional
JSONL texts -> tokenize as llama.cpp will -> pack into fixed-length blocks -> mix in general "replay"
text at `replay_ratio` (limits forgetting) -> hold out `eval_fraction` of the domain blocks.
work: Trainer on the full model or LoRA adapters (optionally with embeddings and output head trained).
save: a full checkpoint (adapters merged) with its tokenizer, and lineage.json.

The base is a local Hugging Face checkpoint (`base`), or for the demo a named shape trained from
scratch (`init_shape`, with a SentencePiece tokenizer trained on the same text).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from builder.errors import BuilderError
from builder.training import LoraSettings, TrainingLoop


class PretrainConfig(TrainingLoop):
    out: Path = Field(description="Directory to write the trained checkpoint to")
    base: Path | None = Field(None, description="Local Hugging Face checkpoint to continue from")
    init_shape: str | None = Field(
        None, description="Instead of base: a shape from builder.synth.SHAPES, random weights (the demo)"
    )
    tokenizer_vocab_size: int = Field(
        4096, ge=256, description="With init_shape: SentencePiece vocabulary size"
    )
    corpus: list[Path] = Field(description="Documents or directories of domain text")
    texts: list[Path] = Field([], description='JSONL files of {"text": ...} records added to the domain text')
    replay: list[Path] = Field(
        [], description="Documents or JSONL of general text, mixed in to limit forgetting"
    )
    replay_ratio: float = Field(
        0.0, ge=0, lt=1, description="Share of training blocks drawn from replay text"
    )
    method: Literal["full", "lora"] = Field("full", description="Train every weight, or LoRA adapters")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="With method: lora")
    seq_len: int = Field(512, ge=32, le=32768, description="Packed block length in tokens")
    batch_size: int = Field(8, ge=1, description="Blocks per device step")
    steps: int = Field(200, ge=1, description="Optimizer updates at most")
    eval_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Share of domain blocks held out for eval loss"
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences")
    seed: int = Field(0, description="Seed for initial weights, data order and the split")

    @model_validator(mode="after")
    def _one_base(self):
        if (self.base is None) == (self.init_shape is None):
            raise ValueError("give exactly one of base (a checkpoint) or init_shape (random weights)")
        if self.replay_ratio > 0 and not self.replay:
            raise ValueError("replay_ratio > 0 needs replay text")
        return self

    def inputs(self) -> list[Path]:
        return [p for p in [self.base, *self.corpus, *self.texts, *self.replay] if p is not None]


def read_texts(paths: list[Path]) -> list[str]:
    """Text of every document under `paths`, and the `text` field of JSONL records."""
    from appliance.documents.readers import expand_paths, read_document

    texts: list[str] = []
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    files, missing = expand_paths([p for p in paths if p.suffix != ".jsonl"])
    if missing:
        raise BuilderError(missing[0]["error"], "check the paths in the config")
    for path in jsonl:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise BuilderError(
                        f'{path}:{n}: expected a JSON object with a "text" field', "one record per line"
                    ) from exc
    texts += [read_document(p, max_bytes=200_000_000).text for p in files]
    return [t for t in texts if t.strip()]


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int | None = None) -> list[list[int]]:
    """Documents joined (EOS between them) and cut into equal blocks; the last partial block is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream += ids + ([eos_id] if eos_id is not None else [])
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


class Blocks:
    """A torch Dataset of token blocks; labels are the inputs (the model shifts them)."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch

        ids = torch.tensor(self.rows[i], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def run(config: PretrainConfig) -> Path:
    from transformers import Trainer

    from builder import lineage, training
    from builder.synth import new_model, train_tokenizer

    with lineage.staged_output("pretrain", config, config.inputs()) as (out, record):
        # -- data
        domain = read_texts(config.corpus + config.texts)
        if not domain:
            raise BuilderError("no domain text found in corpus/texts", "point corpus at documents")
        if config.init_shape:
            train_tokenizer(domain, out, config.tokenizer_vocab_size)
            tok = training.Tokenizer(out)
        else:
            tok = training.Tokenizer(training.check_checkpoint(config.base))
        blocks = pack([tok.encode(t) for t in domain], config.seq_len, tok.eos_id)
        if len(blocks) < 2:
            raise BuilderError(
                f"only {len(blocks)} blocks of {config.seq_len} tokens of domain text",
                "give more text or a shorter seq_len",
            )
        rng = random.Random(config.seed)
        rng.shuffle(blocks)
        n_eval = max(1, int(len(blocks) * config.eval_fraction)) if config.eval_fraction else 0
        eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]
        n_replay = 0
        if config.replay_ratio:
            general = pack([tok.encode(t) for t in read_texts(config.replay)], config.seq_len, tok.eos_id)
            if not general:
                raise BuilderError("replay text is shorter than one block", "give more replay text")
            n_replay = round(len(train_blocks) * config.replay_ratio / (1 - config.replay_ratio))
            train_blocks += [general[i % len(general)] for i in range(n_replay)]
            rng.shuffle(train_blocks)

        # -- model
        if config.init_shape:
            model = new_model(config.init_shape, vocab_size=len(tok), seed=config.seed)
        else:
            model = training.load_model(config.base)
        if config.method == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, config.lora.peft_config(model))
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"pretrain: {n_params:,} parameters ({n_train:,} trained, {config.method}) on {len(train_blocks)} x "
            f"{config.seq_len} tokens ({n_replay} replay), at most {config.steps} steps"
            + (f" or {config.max_minutes:g} min" if config.max_minutes else ""),
            file=sys.stderr,
        )

        # -- train
        args = training.stage_arguments("pretrain", config, out)
        trainer = Trainer(model=model, args=args, train_dataset=Blocks(train_blocks))
        stats = training.run_trainer(trainer, training.callbacks(config.max_minutes, "pretrain"))
        eval_loss = trainer.evaluate(Blocks(eval_blocks))["eval_loss"] if eval_blocks else None

        # -- save
        training.save_model(trainer.model, tok, out, trainer)
        record.update(
            stats,
            parameters=n_params,
            trained_parameters=n_train,
            train_blocks=len(train_blocks),
            replay_blocks=n_replay,
            eval_blocks=len(eval_blocks),
            eval_loss=round(eval_loss, 4) if eval_loss is not None else None,
            eval_perplexity=round(math.exp(eval_loss), 2) if eval_loss is not None else None,
        )
        training.remove_trainer_dir(out)
    return config.out
