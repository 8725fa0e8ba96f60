"""`builder align CONFIG`: the critique phase, DPO through TRL's DPOTrainer.

setup: JSONL of {"prompt": chat messages or text, "chosen": reply, "rejected": reply} -> prompts
rendered with the generation's chat template -> rows without `rejected` (or all rows, with
`generate_rejected: always`) get one sampled from the model being aligned, so the pair teaches the
model away from what it actually says.
work: DPOTrainer with LoRA (the reference model is the same weights with the adapter switched off).
save: a full checkpoint with the adapter merged, the adapter in `adapter/`, lineage.json with the
reward margins and accuracies of the last steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from builder.errors import BuilderError
from builder.training import LoraSettings, TrainingLoop


class AlignConfig(TrainingLoop):
    out: Path = Field(description="Directory to write the aligned checkpoint to")
    model: Path = Field(description="Checkpoint to align (usually an sft or merge output)")
    datasets: list[Path] = Field(
        min_length=1, description="JSONL of {prompt, chosen, rejected} preference pairs"
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template (default: the model's own, else the builder's)"
    )
    generate_rejected: Literal["missing", "always", "never"] = Field(
        "missing",
        description="Sample `rejected` from the model for rows without one, for every row, or never",
    )
    sample_temperature: float = Field(
        1.0, gt=0, le=2, description="Temperature of generated rejected replies"
    )
    sample_max_tokens: int = Field(64, ge=1, description="Length cap of generated rejected replies")
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters trained by DPO")
    max_length: int = Field(1024, ge=32, description="Prompt plus reply, in tokens")
    batch_size: int = Field(4, ge=1, description="Pairs per device step")
    steps: int = Field(50, ge=1, description="Optimizer updates at most")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (cosine decay)")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up updates")
    seed: int = Field(0, description="Seed for sampling and data order")

    def inputs(self) -> list[Path]:
        return [p for p in [self.model, *self.datasets, self.chat_template] if p is not None]


def sample_replies(
    model, tok, prompts: list[str], *, temperature: float, max_tokens: int, seed: int
) -> list[str]:
    """One sampled reply per prompt from the model itself (what DPO should move away from)."""
    import torch

    torch.manual_seed(seed)
    replies = []
    model.eval()
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)], device=model.device)
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=max_tokens,
                do_sample=True,
                temperature=temperature,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.eos_id,
            )
        replies.append(tok.decode(out[0, ids.shape[1] :].tolist()).split(tok.eos_token)[0].strip())
    model.train()
    return replies


def run(config: AlignConfig) -> Path:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from builder import lineage, training

    with lineage.staged_output("align", config, config.inputs()) as (out, record):
        # -- data
        tok = training.Tokenizer(training.check_checkpoint(config.model), config.chat_template)
        rows = [row for path in config.datasets for row in training.read_jsonl(path, ("prompt", "chosen"))]
        pairs = []
        for row in rows:
            prompt = row["prompt"]
            if isinstance(prompt, list):
                prompt = tok.render(prompt, add_generation_prompt=True)
            pairs.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row.get("rejected")})
        model = training.load_model(config.model)
        todo = [
            p
            for p in pairs
            if config.generate_rejected == "always"
            or (config.generate_rejected == "missing" and not p["rejected"])
        ]
        if todo:
            print(f"align: sampling {len(todo)} rejected replies from the model", file=sys.stderr)
            for pair, reply in zip(
                todo,
                sample_replies(
                    model,
                    tok,
                    [p["prompt"] for p in todo],
                    temperature=config.sample_temperature,
                    max_tokens=config.sample_max_tokens,
                    seed=config.seed,
                ),
                strict=True,
            ):
                pair["rejected"] = reply
        missing = sum(1 for p in pairs if not p["rejected"])
        if missing:
            raise BuilderError(
                f"{missing} pairs have no rejected reply", "add them, or set generate_rejected: missing"
            )
        same = [p for p in pairs if p["rejected"].strip() == p["chosen"].strip()]
        pairs = [p for p in pairs if p not in same]
        if not pairs:
            raise BuilderError(
                "every rejected reply equals its chosen one", "nothing to learn from these pairs"
            )
        for p in pairs:  # the reply ends the turn as the template ends it
            p["chosen"] = end_turn(tok, p["chosen"])
            p["rejected"] = end_turn(tok, p["rejected"])

        # -- train
        args = training.stage_arguments(
            "align",
            config,
            out,
            cls=DPOConfig,
            beta=config.beta,
            max_length=config.max_length,
            dataset_num_proc=None,
        )
        compact = training.score_labelled_positions_only()
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=training.hf_tokenizer(tok),
            peft_config=config.lora.peft_config(model),
        )
        stats = training.run_trainer(trainer, training.callbacks(config.max_minutes, "align"))

        # -- save
        if lineage.rank() == 0 and not trainer.is_fsdp_enabled:
            trainer.model.save_pretrained(out / "adapter")
        training.save_model(trainer.model, tok, out, trainer)
        training.remove_trainer_dir(out)
        record.update(
            stats,
            pairs=len(pairs),
            dropped_identical=len(same),
            generated_rejected=len(todo),
            labelled_positions_only=compact,
            **{k.replace("/", "_"): v for k, v in stats["last_logged"].items() if k.startswith("rewards/")},
        )
    return config.out


def end_turn(tok, reply: str) -> str:
    """`reply` followed by whatever the chat template puts after an assistant turn, through EOS."""
    from builder.training import prompt_completion

    probe = "\x00REPLY\x00"
    full = prompt_completion(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}]
    )[1]
    return reply + full.split(probe, 1)[1]
