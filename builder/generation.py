"""A generation directory the appliance installs, from a pipeline's outputs.

model.gguf (one quant of an export), chat_template.jinja, embedder/ (int8 ONNX, tokenizer, manifest),
eval.json when there is one, and generation.json: every file's sha256 and the lineage (each stage's
config, inputs with hashes, versions, commit). Written to `<out>.partial` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from appliance.bundles.manifest import EvalSummary, utc_stamp, write_manifest
from builder.errors import BuilderError


def write(
    out: Path,
    *,
    name: str,
    model: Path,
    embedder_dir: Path,
    template: Path,
    stages: dict[str, dict],
    eval_dir: Path | None = None,
    base_model: str | dict | None = None,
) -> Path:
    from builder import llamacpp

    quant = model.stem.removeprefix("model-").upper()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        shutil.copyfile(model, partial / "model.gguf")
        shutil.copyfile(template, partial / "chat_template.jinja")
        emb = json.loads((embedder_dir / "embedder.json").read_text())
        (partial / "embedder").mkdir()
        for file in ("tokenizer.json", emb["files"]["int8"]):
            shutil.copyfile(embedder_dir / file, partial / "embedder" / file)
        slim = dict(emb, files={"int8": emb["files"]["int8"]})
        (partial / "embedder" / "embedder.json").write_text(json.dumps(slim, indent=2) + "\n")
        evaluation = None
        if eval_dir is not None:
            shutil.copyfile(eval_dir / "eval.json", partial / "eval.json")
            evaluation = json.loads((eval_dir / "eval.json").read_text())
        meta = llamacpp.model_metadata(model)
        write_manifest(
            partial,
            {
                "name": name,
                "created": utc_stamp(),
                "model": {
                    "name": name,
                    "architecture": meta["architecture"],
                    "quant": quant,
                    "context_length": meta["context_length"],
                    "parameters": meta["parameters"],
                },
                "embedder": {"name": emb["name"], "dim": emb["dim"]},
                "lineage": {
                    "base_model": base_model,
                    "stages": stages,
                    "evaluation": EvalSummary.model_validate(
                        {k: evaluation[k] for k in ("perplexity", "gate") if k in evaluation}
                    ).model_dump(mode="json")
                    if evaluation
                    else None,
                    "embedder": {k: emb.get(k) for k in ("name", "dim", "pooling", "normalize", "agreement")},
                },
            },
        )
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    print(
        f"generation written to {out} ({(out / 'model.gguf').stat().st_size / 1e6:.1f} MB {quant})",
        file=sys.stderr,
    )
    return out


def check_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise BuilderError(f"{path}: {what} not found", "run the stage that writes it first")
    return path
