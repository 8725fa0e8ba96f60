"""`builder export CONFIG`: a checkpoint to GGUF files the appliance runs.

setup: a LoRA adapter directory is merged into its base first (a full checkpoint is used as is).
work: HF -> GGUF F16 with llama.cpp's converter from the pinned sdist -> optional importance matrix
over the customer's own text (llama-imatrix from the same source) -> each requested quant type.
Before quantizing, every weight's row length is checked against the type's block size: rows a K/IQ
type cannot take fall back to a 32-wide type (llama.cpp's own rule, recorded); rows no block fits
stop the export with the tensor named. save: model-F16.gguf, model-<TYPE>.gguf, export.json, lineage.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from builder import llamacpp
from builder.errors import BuilderError
from builder.training import chat_template_text


class ImatrixSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: list[Path] = Field(min_length=1, description="The customer's own documents (calibration text)")
    chunks: int = Field(64, ge=1, description="Contexts of calibration text to run")
    ctx: int = Field(512, ge=64, description="Tokens per context")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory for the GGUF files")
    model: Path = Field(description="A full checkpoint, or a LoRA adapter directory (merged into its base)")
    base: Path | None = Field(
        None,
        description="For an adapter: the base checkpoint (default: the path recorded in adapter_config.json)",
    )
    quants: list[str] = Field(["Q8_0", "Q4_K_M"], description="llama.cpp quant types to write beside F16")
    imatrix: ImatrixSettings | None = Field(
        None, description="Compute an importance matrix (needed by IQ types)"
    )

    @field_validator("quants")
    @classmethod
    def _known(cls, quants: list[str]) -> list[str]:
        quants = [q.upper() for q in quants]
        unknown = [q for q in quants if q not in llamacpp.FTYPES]
        if unknown:
            raise ValueError(
                f"unknown quant type {', '.join(unknown)}; choose from {', '.join(llamacpp.FTYPES)}"
            )
        return quants

    @model_validator(mode="after")
    def _imatrix_types(self):
        need = [q for q in self.quants if q in llamacpp.NEEDS_IMATRIX]
        if need and self.imatrix is None:
            raise ValueError(f"{', '.join(need)} need an importance matrix: add an imatrix section")
        return self

    def inputs(self) -> list[Path]:
        return [p for p in [self.model, self.base, *(self.imatrix.corpus if self.imatrix else [])] if p]


def row_check(gguf_path: Path, qtype: str) -> list[str]:
    """Weights whose rows `qtype` cannot take and that llama.cpp will store in a fallback type.

    Raises when a row length fits no block at all (llama.cpp would abort mid-file)."""
    from gguf import GGUFReader

    block = llamacpp.BLOCK[qtype]
    fallback = []
    for tensor in GGUFReader(str(gguf_path)).tensors:
        if len(tensor.shape) < 2 or not tensor.name.endswith(".weight"):
            continue  # 1-d tensors stay F32
        row = int(tensor.shape[0])
        if row % block == 0:
            continue
        if row % 32:
            raise BuilderError(
                f"{tensor.name} has rows of {row} values: {qtype} cannot store them and no "
                "fallback type can (all need a multiple of 32)",
                "export F16/Q8_0 only is not possible either; use a model whose hidden sizes "
                "are multiples of 32",
            )
        fallback.append(tensor.name)
    return fallback


def merge_adapter(adapter: Path, base: Path | None, out: Path) -> Path:
    """A LoRA adapter merged into its base, saved as a full checkpoint in `out`."""
    from peft import PeftModel

    from builder import training

    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base = base or (Path(recorded) if recorded else None)
    if base is None or not (base / "config.json").is_file():
        raise BuilderError(
            f"{adapter}: base checkpoint {base} not found",
            "set `base:` in the export config to the local base checkpoint",
        )
    model = PeftModel.from_pretrained(training.load_model(base), str(adapter))
    training.save_model(model, training.Tokenizer(base), out)
    return out


def run(config: ExportConfig) -> Path:
    from builder import lineage
    from builder.pretrain import read_texts

    with lineage.staged_output("export", config, config.inputs()) as (out, record):
        # -- a full checkpoint
        source = config.model
        if (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
            source = merge_adapter(source, config.base, out / "merged-hf")
        f16 = llamacpp.convert_hf(source, out / "model-F16.gguf", "f16")
        # The template the model was tuned with travels to eval and into the generation.
        (out / "chat_template.jinja").write_text(chat_template_text(source))
        files = {"F16": {"file": f16.name, "bytes": f16.stat().st_size}}

        # -- importance matrix from the customer's text
        matrix = None
        if config.imatrix:
            text_file = out / "calibration.txt"
            text_file.write_text("\n\n".join(read_texts(config.imatrix.corpus)))
            matrix = llamacpp.imatrix(
                f16, text_file, out / "imatrix.gguf", chunks=config.imatrix.chunks, ctx=config.imatrix.ctx
            )
            text_file.unlink()
            record["imatrix"] = {
                "file": matrix.name,
                "sha256": lineage.hash_path(matrix),
                "chunks": config.imatrix.chunks,
                "ctx": config.imatrix.ctx,
            }

        # -- quant types
        for qtype in config.quants:
            if qtype == "F16":
                continue
            fallback = row_check(f16, qtype)
            if fallback:
                print(
                    f"export: {len(fallback)} tensors have rows {qtype} cannot take; llama.cpp stores them "
                    f"in a 32-wide fallback type ({', '.join(fallback[:3])}...)",
                    file=sys.stderr,
                )
            dst = out / f"model-{qtype}.gguf"
            if matrix is not None:
                llamacpp.quantize_with_imatrix(f16, dst, qtype, matrix)
            else:
                llamacpp.quantize(f16, dst, qtype)
            files[qtype] = {
                "file": dst.name,
                "bytes": dst.stat().st_size,
                "fallback_tensors": len(fallback),
                "sha256": lineage.hash_path(dst),
            }
        shutil.rmtree(out / "merged-hf", ignore_errors=True)
        record["files"] = files
        (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return config.out
