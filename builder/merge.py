"""`builder merge CONFIG`: several fine-tunes of one base combined into one model with mergekit.

setup: a model given as a GGUF file (one that exists only in llama.cpp's format, which mergekit cannot
read) is imported first (`builder base import`, checked against llama.cpp; kept beside the output and
reused while the file is unchanged). Every model's config.json is compared before any tensor is read: architecture, layer count,
hidden and MLP sizes, attention heads and vocabulary must agree, and so must the tokenizer files;
the first mismatch is named. work: mergekit's `run_merge` with a `MergeConfiguration` built from this
config (linear, slerp, ties, dare_ties, task_arithmetic, ...). save: the merged checkpoint with the
base's tokenizer and lineage.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.errors import BuilderError

METHODS_WITH_BASE = {
    "slerp",
    "ties",
    "dare_ties",
    "dare_linear",
    "task_arithmetic",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
# What must agree for two checkpoints' tensors to be combined one by one.
SHAPE_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


class MergeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Path = Field(
        description="A checkpoint fine-tuned from base_model, or a GGUF file (imported first)"
    )
    weight: float = Field(1.0, description="Its weight in the merge")
    density: float | None = Field(None, gt=0, le=1, description="ties/dare: share of its task vector kept")


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory to write the merged checkpoint to")
    method: Literal[
        "linear", "slerp", "ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs", "della"
    ] = Field("ties", description="mergekit merge method")
    base_model: Path | None = Field(
        None, description="Common ancestor (needed by every method but linear); a checkpoint or a GGUF file"
    )
    models: list[MergeModel] = Field(min_length=1, description="Checkpoints to merge")
    t: float | None = Field(
        None, ge=0, le=1, description="slerp: interpolation factor toward the second model"
    )
    normalize: bool = Field(True, description="Divide by the sum of weights")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the merge")
    seed: int = Field(0, description="Seed for methods that drop parameters at random (dare)")

    @model_validator(mode="after")
    def _method_needs(self):
        if self.method in METHODS_WITH_BASE and self.base_model is None:
            raise ValueError(f"method {self.method} needs base_model")
        if self.method == "slerp" and (len(self.models) != 2 or self.t is None):
            raise ValueError("slerp merges exactly two models and needs t")
        if self.method == "linear" and len(self.models) < 2:
            raise ValueError("linear needs at least two models")
        return self

    def inputs(self) -> list[Path]:
        return [p for p in [self.base_model, *(m.model for m in self.models)] if p is not None]


def check_compatible(paths: list[Path]) -> dict:
    """Refuse, naming the first difference, checkpoints whose tensors cannot be merged one by one."""
    from builder.lineage import hash_path

    configs = {}
    for path in paths:
        try:
            configs[path] = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BuilderError(
                f"{path}: no readable config.json", "every model must be a HF checkpoint"
            ) from exc
    first, ref = next(iter(configs.items()))
    for path, cfg in configs.items():
        for key in SHAPE_KEYS:
            if cfg.get(key) != ref.get(key):
                raise BuilderError(
                    f"cannot merge {path} with {first}: {key} differs ({cfg.get(key)!r} vs {ref.get(key)!r})",
                    "merge only fine-tunes of the same base model",
                )
    for name in ("tokenizer.model", "tokenizer.json"):
        tokenizers = {p: hash_path(p / name) for p in paths if (p / name).is_file()}
        if len(set(tokenizers.values())) > 1:
            raise BuilderError(
                f"cannot merge: the models' {name} files differ ({', '.join(str(p) for p in tokenizers)})",
                "merge only fine-tunes that kept their base's tokenizer",
            )
    return ref


def checkpoints(config: MergeConfig) -> MergeConfig:
    """The config with every GGUF model replaced by its imported checkpoint (`<out>.imports/<name>`)."""
    from builder.base import ImportConfig, import_gguf
    from builder.lineage import input_hashes, is_current, stage_key

    def hf(path: Path | None) -> Path | None:
        if path is None or path.suffix.lower() != ".gguf":
            return path
        if not path.is_file():
            raise BuilderError(f"{path}: no such GGUF file", "check the path in the merge config")
        imported = ImportConfig(out=config.out.with_name(config.out.name + ".imports") / path.stem, gguf=path)
        if not is_current(imported.out, stage_key("base", imported, input_hashes(imported.inputs()))):
            import_gguf(imported)
        return imported.out

    return config.model_copy(
        update={
            "base_model": hf(config.base_model),
            "models": [m.model_copy(update={"model": hf(m.model)}) for m in config.models],
        }
    )


def mergekit_config(config: MergeConfig) -> dict:
    models = []
    for m in config.models:
        params: dict = {"weight": m.weight}
        if m.density is not None:
            params["density"] = m.density
        models.append({"model": str(m.model), "parameters": params})
    doc: dict = {"merge_method": config.method, "models": models, "dtype": config.dtype}
    if config.method == "slerp":
        doc = {
            "merge_method": "slerp",
            "base_model": str(config.models[0].model),
            "dtype": config.dtype,
            "slices": None,
            "models": [{"model": str(m.model)} for m in config.models],
            "parameters": {"t": config.t},
        }
        doc.pop("slices")
    elif config.base_model is not None:
        doc["base_model"] = str(config.base_model)
        doc["parameters"] = {"normalize": config.normalize}
    else:
        doc["parameters"] = {"normalize": config.normalize}
    return doc


def run(config: MergeConfig) -> Path:
    from builder import lineage

    given = config  # lineage records the models as given (a GGUF, not its import)
    config = checkpoints(config)
    ref = check_compatible(config.inputs())
    with lineage.staged_output("merge", given, given.inputs()) as (out, record):
        import torch
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        recipe = mergekit_config(config)
        print(
            f"merge: {config.method} of {len(config.models)} models ({ref.get('model_type')}, "
            f"{ref.get('num_hidden_layers')} layers)",
            file=sys.stderr,
        )
        run_merge(
            MergeConfiguration.model_validate(recipe),
            str(out),
            MergeOptions(
                cuda=torch.cuda.is_available(),
                copy_tokenizer=False,
                random_seed=config.seed,
                write_model_card=False,
                quiet=True,
                lazy_unpickle=False,
            ),
        )
        source = config.base_model or config.models[0].model
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        (out / "mergekit_config.json").write_text(json.dumps(recipe, indent=2) + "\n")
        record.update(recipe=recipe)
    return config.out
