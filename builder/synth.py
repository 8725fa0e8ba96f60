"""Llama-architecture checkpoints of named shapes, with a SentencePiece tokenizer.

`synthesize(shape, out)` writes a random-weight Hugging Face checkpoint (config.json,
model.safetensors, tokenizer.model): what tests and benchmarks use, since speed does not depend on
the weight values. The same shapes and tokenizer trainer serve `builder demo --quick` (the tests' fixture).
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

from builder.errors import BuilderError

# Special pieces of the chat template (builder/templates/chat_template.jinja).
CHAT_PIECES = ["<|system|>", "<|user|>", "<|assistant|>"]

SHAPES: dict[str, dict] = {
    # Two layers, enough for tests of conversion, quantization (dims are multiples of 32) and serving.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    ),
    # Llama-3.2-1B's published shape (config.json of meta-llama/Llama-3.2-1B), for benchmarks.
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def shape_config(shape: str) -> dict:
    if shape not in SHAPES:
        raise BuilderError(f"unknown shape '{shape}'", f"choose one of {', '.join(SHAPES)}")
    return dict(SHAPES[shape])


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> Path:
    """Train a SentencePiece BPE tokenizer and write tokenizer.model.

    Byte fallback, digits split one by one (codes are copied digit by digit) and no normalisation, so
    that `encode` below and llama.cpp cut any text into the same tokens.
    """
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([p for t in texts for p in t.split("\n\n") if p.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=CHAT_PIECES,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=16384,
        num_threads=2,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # Marked special so llama.cpp's converter types them CONTROL: one token each when a prompt is parsed.
    added = {
        str(sp.PieceToId(p)): {
            "content": p,
            "special": True,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
        for p in CHAT_PIECES
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": 2048,
                "added_tokens_decoder": added,
            },
            indent=2,
        )
    )
    return path


def encode(sp, text: str) -> list[int]:
    """Token ids exactly as llama.cpp's SPM tokenizer gives them (special pieces parsed).

    llama.cpp prepends a space to the text at the start and after every special piece; SentencePiece's
    dummy prefix does the same when each run of text between special pieces is encoded on its own.
    """
    ids: list[int] = []
    previous = ""
    for part in _SPECIAL_SPLIT.split(text):
        if not part:
            continue
        if part in _SPECIAL_IDS:
            ids.append(sp.PieceToId(part))
        elif previous == "<|assistant|>" and part.startswith("\n") and len(part) > 1:
            # The appliance's prompt ends at "<|assistant|>\n" and the reply is generated after it, so
            # a training reply is encoded the same way: the newline on its own, then the reply.
            ids.extend(sp.encode("\n"))
            ids.extend(sp.encode(part[1:]))
        else:
            ids.extend(sp.encode(part))
        previous = part
    return ids


_SPECIAL_IDS = {*CHAT_PIECES, "<s>", "</s>"}
_SPECIAL_SPLIT = re.compile(
    "(" + "|".join(re.escape(p) for p in sorted(_SPECIAL_IDS, key=len, reverse=True)) + ")"
)


def new_model(shape: str, vocab_size: int | None = None, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = shape_config(shape)
    if vocab_size is not None and vocab_size > cfg["vocab_size"]:
        raise BuilderError(
            f"tokenizer has {vocab_size} pieces, more than shape '{shape}' allows ({cfg['vocab_size']})",
            "train a smaller tokenizer",
        )
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, **cfg)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def synthesize(shape: str, out: Path, corpus_texts: list[str], seed: int = 0, dtype: str = "float32") -> Path:
    """Random weights of a named shape, a tokenizer trained on the given texts, saved as HF."""
    import torch

    cfg = shape_config(shape)
    # A shape's vocabulary may be larger than the text can support (128k for Llama 3.2); the
    # converter pads the GGUF vocabulary to the model's size, as the real model's would be.
    train_tokenizer(corpus_texts, out, min(cfg["vocab_size"], 4096))
    model = new_model(shape, seed=seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"synthesized {shape}: {params:,} parameters -> {out}", file=sys.stderr)
    return out
