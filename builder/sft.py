"""`builder sft CONFIG`: instruction tuning with LoRA through TRL's SFTTrainer.

setup: JSONL files of {"messages": [...]} chats -> rendered with the chat template the generation
ships -> tokenized as llama.cpp will -> a mask that keeps the loss on the assistant's replies only.
work: SFTTrainer (LoRA by default; `method: full` trains every weight), optional packing.
save: a full checkpoint with the adapters merged, the adapter itself in `adapter/`, lineage.json.

Retrieval-shaped examples (numbered sources in the prompt, a cited answer) are plain chats here; the
demo writes them with `appliance.engine.prompt`, the same code that builds the appliance's prompts.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from builder.errors import BuilderError
from builder.training import LoraSettings, TrainingLoop


class SFTConfig(TrainingLoop):
    out: Path = Field(description="Directory to write the tuned checkpoint to")
    model: Path = Field(description="Checkpoint to tune (a pretrain output or any local HF checkpoint)")
    datasets: list[Path] = Field(min_length=1, description='JSONL files of {"messages": [...]} chats')
    chat_template: Path | None = Field(
        None,
        description="Jinja chat template (default: the model's own, "
        "else the builder's); it is saved with the model and shipped",
    )
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters, or every weight")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="With method: lora")
    max_length: int = Field(1024, ge=32, description="Longer chats are cut (and counted in lineage)")
    packing: bool = Field(False, description="Pack several chats into one sequence (best-fit)")
    batch_size: int = Field(8, ge=1, description="Chats per device step")
    eval_fraction: float = Field(0.0, ge=0, lt=0.5, description="Share of chats held out for eval loss")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences")
    seed: int = Field(0, description="Seed for data order and the split")

    def inputs(self) -> list[Path]:
        return [p for p in [self.model, *self.datasets, self.chat_template] if p is not None]


def run(config: SFTConfig) -> Path:
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from builder import lineage, training

    with lineage.staged_output("sft", config, config.inputs()) as (out, record):
        # -- data
        tok = training.Tokenizer(training.check_checkpoint(config.model), config.chat_template)
        chats = [
            row["messages"] for path in config.datasets for row in training.read_jsonl(path, ("messages",))
        ]
        rows, truncated, lost = [], 0, 0
        for chat in chats:
            ids, mask = training.encode_chat(tok, chat)
            if not any(mask):
                raise BuilderError(
                    "a chat has no assistant reply to learn", "end each chat with the assistant"
                )
            truncated += len(ids) > config.max_length
            if not any(mask[: config.max_length]):
                lost += 1  # the cut takes the whole reply: nothing of it is left to learn
                continue
            rows.append({"input_ids": ids, "completion_mask": mask})
        if not rows:
            raise BuilderError(
                f"every one of the {len(chats)} chats is longer than max_length "
                f"({config.max_length} tokens) before its reply starts",
                "raise max_length (up to the model's context) or give fewer or shorter sources",
            )
        random.Random(config.seed).shuffle(rows)
        n_eval = int(len(rows) * config.eval_fraction)
        train_rows, eval_rows = rows[n_eval:], rows[:n_eval]

        # -- model
        model = training.load_model(config.model)
        peft_config = config.lora.peft_config(model) if config.method == "lora" else None
        print(
            f"sft: {len(train_rows)} chats ({truncated} cut at {config.max_length} tokens, {lost} of them left "
            f"out with no reply left), {config.method}, "
            f"at most {config.steps} steps",
            file=sys.stderr,
        )

        # -- train
        args = training.stage_arguments(
            "sft",
            config,
            out,
            cls=TrlSFTConfig,
            max_length=config.max_length,
            packing=config.packing,
            completion_only_loss=True,
            dataset_num_proc=None,
        )
        compact = training.score_labelled_positions_only()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=training.hf_tokenizer(tok),
            peft_config=peft_config,
        )
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        stats = training.run_trainer(trainer, training.callbacks(config.max_minutes, "sft"))
        eval_loss = trainer.evaluate(Dataset.from_list(eval_rows))["eval_loss"] if eval_rows else None

        # -- save
        if peft_config is not None and lineage.rank() == 0 and not trainer.is_fsdp_enabled:
            trainer.model.save_pretrained(out / "adapter")
        training.save_model(trainer.model, tok, out, trainer)
        training.remove_trainer_dir(out)
        record.update(
            stats,
            chats=len(train_rows),
            truncated=truncated,
            left_out=lost,
            trained_parameters=n_train,
            labelled_positions_only=compact,
            eval_loss=round(eval_loss, 4) if eval_loss is not None else None,
        )
    return config.out
