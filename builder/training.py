"""Pieces the training stages share: LoRA settings, the tokenizer as llama.cpp cuts text, progress on
stderr, a wall-clock budget, TrainingArguments with the right precision, and saving a full checkpoint.

Tokenization is done here, not by transformers' tokenizer classes: a SentencePiece model converted by
transformers may split text differently from llama.cpp, and the model must be trained on exactly the
tokens the appliance will feed it. `Tokenizer.encode` matches llama.cpp (tested).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from builder.errors import BuilderError

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


class TrainingLoop(BaseModel):
    """The optimizer loop's settings every training stage shares (pretrain, sft, align): each stage's
    config adds its data and method, and redeclares a field only to give it the stage's own default."""

    model_config = ConfigDict(extra="forbid")

    grad_accum: int = Field(1, ge=1, description="Steps accumulated per optimizer update")
    steps: int = Field(100, ge=1, description="Optimizer updates at most")
    max_minutes: float | None = Field(None, gt=0, description="Stop cleanly after this much training time")
    save_every: int | None = Field(
        None,
        ge=1,
        description="Checkpoint every N steps; after a crash the same command resumes from the last one",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (cosine decay)")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up updates")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 on a GPU that has it and "
        "on a CPU with bf16 instructions (matrix products under "
        "autocast), fp32 elsewhere",
    )
    seed: int = Field(0, description="Seed for data order (and whatever else the stage draws)")


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get adapters",
    )
    train_embeddings: bool = Field(
        False,
        description="Also train embed_tokens and lm_head in full (new "
        "vocabulary or domain terms need it; they are frozen otherwise)",
    )
    top_layers: int | None = Field(
        None,
        ge=1,
        description="Adapters on the last N decoder layers only (the "
        "backward pass then stops there: faster; default: every layer)",
    )

    def peft_config(self, model=None):
        """PEFT's LoraConfig; with trained embeddings on a model that ties them to the output head,
        the two stay one tensor (else the merged checkpoint would silently untie them)."""
        from peft import LoraConfig

        tied = bool(model is not None and getattr(model.config, "tie_word_embeddings", False))
        layers = None
        if self.top_layers is not None:
            if model is None:
                raise ValueError("top_layers needs the model to count its layers")
            total = model.config.num_hidden_layers
            layers = list(range(max(0, total - self.top_layers), total))
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
            modules_to_save=["embed_tokens", "lm_head"] if self.train_embeddings else None,
            ensure_weight_tying=self.train_embeddings and tied,
            layers_to_transform=layers,
            layers_pattern="layers" if layers is not None else None,
        )


class Tokenizer:
    """A checkpoint's tokenizer and chat template, encoding text as llama.cpp will.

    Two kinds: a SentencePiece `tokenizer.model` alone (what the builder trains; encoded with
    `builder.synth.encode`, tested token for token against llama.cpp) or a Hugging Face
    `tokenizer.json` (Llama 3, Qwen, Mistral...: llama.cpp implements the same pre-tokenizers).
    The chat template is, in order: the one given, the checkpoint's `chat_template.jinja`, the
    `chat_template` of its tokenizer_config.json, the builder's own.
    """

    def __init__(self, model_dir: Path, template: Path | None = None):
        self.dir = model_dir
        self.template_text = chat_template_text(model_dir, template)
        if (model_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.sp = None
            self.bos_token, self.eos_token = self.hf.bos_token or "", self.hf.eos_token
            self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id
        elif (model_dir / "tokenizer.model").is_file():
            import sentencepiece as spm

            self.hf = None
            self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            self.bos_token, self.eos_token = self.sp.IdToPiece(self.bos_id), self.sp.IdToPiece(self.eos_id)
        else:
            raise BuilderError(
                f"{model_dir}: no tokenizer.json or tokenizer.model",
                "copy the base model's tokenizer files next to its weights",
            )

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf(text, add_special_tokens=False)["input_ids"]
        from builder.synth import encode

        return encode(self.sp, text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids) if self.hf is not None else self.sp.decode(ids)

    def piece(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(token_id) if self.hf is not None else self.sp.IdToPiece(token_id)

    def __len__(self) -> int:
        return len(self.hf) if self.hf is not None else self.sp.get_piece_size()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """A chat as the appliance will render it (same template, BOS/EOS as text)."""
        return _template(self.template_text).render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def save(self, out: Path) -> None:
        """Tokenizer files and the chat template used, so later stages and the export find them."""
        if self.dir.resolve() != out.resolve():
            for name in TOKENIZER_FILES:
                if (self.dir / name).is_file():
                    shutil.copyfile(self.dir / name, out / name)
        (out / "chat_template.jinja").write_text(self.template_text)


def check_checkpoint(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise BuilderError(
            f"{path}: not a Hugging Face checkpoint (no config.json)",
            "point the config at a directory written by save_pretrained or an earlier stage",
        )
    return path


def load_model(path: Path):
    """A causal LM from a local directory, in fp32 on CPU or bf16 on CUDA; nothing is fetched."""
    import torch
    from transformers import AutoModelForCausalLM

    from builder.lineage import device

    check_checkpoint(path)
    quiet()
    bf16 = device()[1]
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if bf16 else torch.float32, local_files_only=True
    )


def save_model(model, tokenizer: Tokenizer, out: Path, trainer=None) -> None:
    """A full checkpoint (LoRA merged in when present) in fp32 on CPU / bf16 on GPU, with the tokenizer.

    Distributed: under DDP rank 0 writes. Under FSDP the Trainer gathers the full state dict on every
    rank and rank 0 writes it (an adapter then gets merged into its base from disk, on rank 0)."""
    from transformers.utils import logging as hf_logging

    from builder.lineage import rank

    hf_logging.disable_progress_bar()
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        gathered = out / "fsdp-gathered"
        trainer.save_model(str(gathered))  # collective
        if rank() == 0:
            if (gathered / "adapter_config.json").is_file():
                from peft import PeftModel

                base = Path(
                    json.loads((gathered / "adapter_config.json").read_text())["base_model_name_or_path"]
                )
                model = PeftModel.from_pretrained(load_model(base), str(gathered)).merge_and_unload()
            else:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(gathered, local_files_only=True)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save(out)
            shutil.rmtree(gathered, ignore_errors=True)
        return
    if rank() != 0:
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(out)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16, or AMX that the OS lets torch use), as
    torch itself detects it. Where it does not, torch emulates bf16 matrix products: on an AVX2 EPYC a
    512x576x1536 product took 758 ms under bf16 autocast against 11 ms in fp32, so bf16 there turns
    minutes of training into hours."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_bf16(precision: str, dev: str, gpu_bf16: bool) -> bool:
    """`precision` (auto, fp32, bf16) on this device: auto is bf16 on a GPU that has it and on a CPU that
    has bf16 instructions (fp32 weights, matrix products under bf16 autocast), fp32 elsewhere. bf16 asked
    for on a CPU without them is kept, with a warning on stderr naming the cost."""
    if precision == "auto":
        return gpu_bf16 if dev != "cpu" else cpu_has_bf16()
    if precision == "bf16" and dev == "cpu" and not cpu_has_bf16():
        print(
            "  warning: precision bf16 on a CPU without bf16 instructions (avx512_bf16, amx_bf16): torch "
            "emulates it, far slower than fp32 - use precision: auto",
            file=sys.stderr,
        )
    return precision == "bf16"


def training_arguments(
    out: Path,
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    gradient_checkpointing: bool = False,
    save_every: int | None = None,
    checkpoints: Path | None = None,
    precision: str = "auto",
    **extra,
):
    """TrainingArguments shared by every stage (or TRL's subclass via `cls`). With `save_every`, a
    checkpoint every N steps in `checkpoints` (kept outside the stage's output, so a crash keeps it)."""
    from transformers import TrainingArguments

    from builder.lineage import device

    cls = extra.pop("cls", TrainingArguments)
    quiet()
    dev, bf16 = device()
    bf16 = resolve_bf16(precision, dev, bf16)
    saving = (
        {"save_strategy": "steps", "save_steps": save_every, "save_total_limit": 1}
        if save_every
        else {"save_strategy": "no"}
    )
    return cls(
        output_dir=str(checkpoints if save_every and checkpoints else out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=max(1, min(10, steps // 10)),
        **saving,
        report_to=[],
        seed=seed,
        use_cpu=dev == "cpu",
        bf16=bf16,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_grad_norm=1.0,
        remove_unused_columns=False,
        activation_checkpointing=gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        **extra,
    )


def score_labelled_positions_only() -> bool:
    """Have TRL's fused LM head score only the positions that carry a label, on every device.

    TRL (SFTTrainer, DPOTrainer) projects hidden states through the LM head in tiles without building
    the full logits; on Triton devices it takes only the labelled positions, elsewhere every position,
    to keep tile shapes fixed for compilers that would recompile per shape (Neuron). A CPU compiles
    nothing, and with a 49k-token vocabulary the unlabelled prompt positions were most of a step:
    `builder sft` on SmolLM2-135M went from 274 to 689 tokens/s (adapters on the last 10 layers, bf16)
    and from 178 to 260 (every layer) with the same losses (bench/train.py, a test checks they agree).
    Returns whether TRL's switch was found (a TRL without it trains as before)."""
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    if not getattr(original, "labelled_only", False):

        def labelled_only(device) -> bool:
            return device.type == "cpu" or original(device)

        labelled_only.labelled_only = True
        labelled_only.original = original  # what bench/train.py measures against
        trl_utils._use_triton = labelled_only
    return True


def stage_arguments(stage: str, config, out: Path, **extra):
    """training_arguments from a training stage's config (steps, batch, schedule, seed, checkpoints)."""
    from builder.lineage import checkpoint_dir

    return training_arguments(
        out,
        steps=config.steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        seed=config.seed,
        save_every=config.save_every,
        checkpoints=checkpoint_dir(stage, config),
        gradient_checkpointing=getattr(config, "gradient_checkpointing", False),
        precision=getattr(config, "precision", "auto"),
        **extra,
    )


def quiet() -> None:
    """No per-example progress bars from datasets or transformers: stderr carries our progress lines."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )


def callbacks(max_minutes: float | None, label: str) -> list:
    """Progress lines on stderr and an optional wall-clock budget (training stops cleanly at it)."""
    from transformers import TrainerCallback

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
        def __init__(self):
            self.start = time.monotonic()
            self.losses: list[tuple[int, float]] = []
            self.last: dict[str, float] = {}  # the latest value of every metric logged

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.last.update(
                {
                    k: round(float(v), 4)
                    for k, v in (logs or {}).items()
                    if isinstance(v, (int, float)) and "/" in k
                }
            )
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))
                elapsed = time.monotonic() - self.start
                eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
                print(
                    f"  {label} step {state.global_step}/{state.max_steps}  loss {float(logs['loss']):.4f}  "
                    f"{elapsed:.0f} s elapsed, ~{eta:.0f} s left",
                    file=sys.stderr,
                    flush=True,
                )

    class Throughput(TrainerCallback):
        """Tokens per second after the first steps (compilation, allocator warm-up) are over."""

        WARM = 3

        def __init__(self):
            self.mark: tuple[float, int] | None = None
            self.tokens_per_s: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.WARM:
                self.mark = (time.perf_counter(), state.num_input_tokens_seen)

        def on_train_end(self, args, state, control, **kwargs):
            if self.mark and state.global_step > self.WARM:
                seconds = time.perf_counter() - self.mark[0]
                self.tokens_per_s = (state.num_input_tokens_seen - self.mark[1]) / max(seconds, 1e-9)

    found = [StderrLog(), Throughput()]
    if max_minutes:
        found.append(TimeBudget(max_minutes * 60))
    return found


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is its last file); newer,
    half-written ones (a kill mid-save) are removed."""
    if not directory.is_dir():
        return None
    found = sorted(
        (p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return str(checkpoint)
        except (OSError, ValueError):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def run_trainer(trainer, cbs: list) -> dict:
    """Train with stdout kept clean; return steps, seconds, losses and whether the budget stopped it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    for cb in cbs:
        trainer.add_callback(cb)
    resume = None
    if trainer.args.save_strategy == "steps":
        resume = last_complete_checkpoint(Path(trainer.args.output_dir))
        if resume:
            print(f"  resuming from {resume}", file=sys.stderr)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    log, speed = cbs[0], cbs[1]
    budget = cbs[2] if len(cbs) > 2 else None
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "resumed_from": resume,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_s": round(speed.tokens_per_s, 1)
        if speed.tokens_per_s
        else round(trainer.state.num_input_tokens_seen / max(seconds, 1e-9), 1),
        "train_loss": round(result.training_loss, 4),
        "first_loss": round(log.losses[0][1], 4) if log.losses else None,
        "last_loss": round(log.losses[-1][1], 4) if log.losses else None,
        "stopped_by_time_budget": bool(budget and budget.stopped_at is not None),
        "last_logged": log.last,
    }


def hf_tokenizer(tok: Tokenizer):
    """`tok` as a transformers tokenizer for TRL's trainers, encoding exactly as llama.cpp does."""
    if tok.hf is not None:
        if tok.hf.pad_token is None:
            tok.hf.pad_token = tok.hf.eos_token
        return tok.hf
    from transformers import BatchEncoding, PreTrainedTokenizer

    class LlamaCppTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, **kwargs):
            self.tok = tok
            super().__init__(
                bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", **kwargs
            )

        @property
        def vocab_size(self) -> int:
            return len(self.tok)

        def get_vocab(self) -> dict[str, int]:
            return {self.tok.sp.IdToPiece(i): i for i in range(len(self.tok))}

        def _tokenize(self, text, **kwargs):
            return [self.tok.sp.IdToPiece(i) for i in self.tok.encode(text)]

        def _convert_token_to_id(self, token):
            return self.tok.sp.PieceToId(token)

        def _convert_id_to_token(self, index):
            return self.tok.sp.IdToPiece(index)

        def convert_tokens_to_string(self, tokens):
            return self.tok.sp.decode_pieces(tokens)

        def __call__(self, text=None, **kwargs):
            if isinstance(text, list):
                ids = [self.tok.encode(t) for t in text]
                return BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
            ids = self.tok.encode(text)
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)})

        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            if hasattr(token_ids, "tolist"):
                token_ids = token_ids.tolist()
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            return self.tok.decode(list(token_ids))

        def save_vocabulary(self, save_directory, filename_prefix=None):
            self.tok.save(Path(save_directory))
            return (str(Path(save_directory) / "tokenizer.model"),)

    return LlamaCppTokenizer()


DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "chat_template.jinja"


def chat_template_text(model_dir: Path, template: Path | None = None) -> str:
    if template is not None:
        return template.read_text()
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    try:
        found = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        found = None
    return found if isinstance(found, str) else DEFAULT_TEMPLATE.read_text()


@functools.cache
def _template(text: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BuilderError(f"chat template: {message}", "check the messages' roles and order")

    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """A chat in the builder's own template (the demo's models), before any tokenizer exists."""
    return _template(DEFAULT_TEMPLATE.read_text()).render(
        messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=add_generation_prompt
    )


def prompt_completion(tok: Tokenizer, messages: list[dict]) -> tuple[str, str]:
    """(prompt up to the reply, the reply through its end-of-turn) for a chat ending in the assistant."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's reply")
    prompt = tok.render(messages[:-1], add_generation_prompt=True)
    full = tok.render(messages)
    if not full.startswith(prompt):
        raise BuilderError(
            "the chat template renders a prompt that is not a prefix of the whole chat",
            "use a template whose generation prompt matches its assistant turns",
        )
    return prompt, _through_eos(full[len(prompt) :], tok.eos_token)


def _through_eos(text: str, eos: str) -> str:
    cut = text.rfind(eos)
    return text[: cut + len(eos)] if cut >= 0 else text


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise BuilderError(f"{path}:{n}: not valid JSON ({exc})", "one JSON object per line") from exc
        missing = [k for k in required if k not in row] if isinstance(row, dict) else list(required)
        if missing:
            raise BuilderError(
                f"{path}:{n}: missing {', '.join(missing)}", f"each line needs {', '.join(required)}"
            )
        rows.append(row)
    if not rows:
        raise BuilderError(f"{path}: no records", "one JSON object per line")
    return rows


def encode_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a whole chat and a mask that is 1 on every assistant reply (its end of turn
    included), found by rendering each prefix of the chat: whatever the template."""
    ids = tok.encode(tok.render(messages))
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tok.render(messages[:i], add_generation_prompt=True)
        prompt_ids = tok.encode(prompt)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise BuilderError(
                "the chat template's prompt tokens are not a prefix of the chat's",
                "use a template whose generation prompt matches its assistant turns",
            )
        turn = tok.render(messages[: i + 1])
        start, end = len(prompt_ids), len(tok.encode(turn))
        if tok.eos_token in turn[len(prompt) :]:
            while end > start and ids[end - 1] != tok.eos_id:  # not what follows the end of turn
                end -= 1
        for j in range(start, end):
            mask[j] = 1
    return ids, mask


def remove_trainer_dir(out: Path) -> None:
    shutil.rmtree(out / "trainer", ignore_errors=True)
