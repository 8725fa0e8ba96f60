"""`builder run PIPELINE.yaml`: the stages end to end, resumable, ending in a generation directory.

    name: meridian
    base: ../models/smollm2-135m-instruct/model.yaml   # or a name under models/
    work: build/meridian            # each stage writes <work>/<stage name>
    vars: {data: data}              # ${data} below; `builder run --var data=/elsewhere` overrides
    stages:
      - {name: pretrain, stage: pretrain, config: {base: "@base", corpus: [docs/], method: lora}}
      - {name: sft, stage: sft, config: {model: "@pretrain", datasets: ["${data}/qa.jsonl"]}}
      - {name: export, stage: export, config: {model: "@sft", quants: [Q8_0, Q4_K_M]}}
      - {name: embedder, stage: embedder, config: {}}
      - {name: eval, stage: eval, config: {export: "@export", questions: "${data}/heldout.jsonl", ...}}
    generation: {out: build/meridian-generation, model: "@export/model-Q4_K_M.gguf",
                 embedder: "@embedder", eval: "@eval"}

"@name" (or "@name/file") is an earlier stage's output; "@base" is the base model, which is checked
(present, sha256 as its manifest says) before any stage runs and imported to `<work>/base` when it is a
GGUF (see builder.base). A stage whose config and input hashes match its existing lineage.json is
skipped, so a second run after a crash or Ctrl-C picks up at the first stage that did not finish
(outputs are renamed into place only when complete). An eval stage's gate is checked even when the
stage is skipped.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.errors import BuilderError

StageKind = Literal["pretrain", "sft", "align", "merge", "export", "eval", "embedder"]
TRAINING = {"pretrain", "sft", "align"}  # stages every rank runs under torchrun / accelerate launch
REF = re.compile(r"^@([A-Za-z0-9_.-]+)(/.*)?$")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
BASE = "base"  # "@base": the pipeline's base model


def stage_modules() -> dict[str, tuple]:
    from builder import align, embedder, evaluate, export, merge, pretrain, sft

    return {
        "pretrain": (pretrain, pretrain.PretrainConfig),
        "sft": (sft, sft.SFTConfig),
        "align": (align, align.AlignConfig),
        "merge": (merge, merge.MergeConfig),
        "export": (export, export.ExportConfig),
        "eval": (evaluate, evaluate.EvalConfig),
        "embedder": (embedder, embedder.EmbedderConfig),
    }


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Stage name; its output is <work>/<name>")
    stage: StageKind = Field(description="Which stage runs")
    config: dict = Field(default_factory=dict, description="The stage's config (without `out`)")


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Generation directory to write (what `appliance install-generation` takes)")
    name: str | None = Field(None, description="Model name shown by the appliance (default: pipeline name)")
    model: str = Field(description="The GGUF to ship, e.g. @export/model-Q4_K_M.gguf")
    embedder: str = Field(description="Embedder directory, e.g. @embedder")
    eval: str | None = Field(None, description="Eval stage whose eval.json ships with the generation")
    chat_template: Path | None = Field(
        None,
        description="Template to ship (default: the one the model was "
        "tuned with, saved beside the GGUF by export)",
    )


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Pipeline (and model) name")
    work: Path = Field(description="Directory for stage outputs")
    base: Path | None = Field(
        None,
        description="The base model: its model.yaml, or a name under models/; "
        '"@base" in a stage config is its checkpoint',
    )
    base_model: str | None = Field(
        None,
        description="What the chain starts from, for the lineage, when it is not a `base` (a random init)",
    )
    vars: dict[str, str] = Field(
        default_factory=dict,
        description="Values of ${name} in the stage configs "
        "(defaults; `builder run --var NAME=VALUE` overrides)",
    )
    stages: list[StageSpec] = Field(min_length=1, description="Stages in order")
    generation: GenerationSpec | None = Field(
        None, description="The generation directory to write at the end"
    )

    @model_validator(mode="after")
    def _references(self):
        seen: set[str] = {BASE} if self.base is not None else set()
        if any(spec.name == BASE for spec in self.stages):
            raise ValueError(f"stage name {BASE!r} is the base model's; choose another")
        for spec in self.stages:
            if spec.name in seen:
                raise ValueError(f"stage name {spec.name!r} is used twice")
            for ref in _refs(spec.config):
                if ref not in seen:
                    raise ValueError(f"stage {spec.name!r} refers to @{ref}, which is not an earlier stage")
            seen.add(spec.name)
        if self.generation is not None:
            g = self.generation
            for ref in _refs([g.model, g.embedder, g.eval]):
                if ref not in seen:
                    raise ValueError(f"generation refers to @{ref}, which is not a stage")
        return self


def _refs(value) -> list[str]:
    if isinstance(value, str):
        m = REF.match(value)
        return [m.group(1)] if m else []
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _resolve(value, outputs: dict[str, Path], base: Path):
    """'@stage/file' -> that stage's output path; other relative paths are left for the stage config."""
    if isinstance(value, str):
        m = REF.match(value)
        if m:
            return str(outputs[m.group(1)] / (m.group(2) or "/").lstrip("/"))
        return value
    if isinstance(value, list):
        return [_resolve(v, outputs, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, outputs, base) for k, v in value.items()}
    return value


def load(path: Path, variables: dict[str, str] | None = None) -> Pipeline:
    """The pipeline file with ${name} filled in from its `vars` and `variables` (which win)."""
    import yaml

    from builder.errors import BuilderConfigError
    from builder.lineage import load_config

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as exc:
        raise BuilderConfigError(
            f"{path}: not valid YAML: {exc}", "fix the syntax at the line named"
        ) from exc
    if isinstance(data, dict):
        values = {**{k: str(v) for k, v in (data.get("vars") or {}).items()}, **(variables or {})}
        data = {k: (v if k == "vars" else _fill(v, values, path)) for k, v in data.items()}
        data["vars"] = values
    return load_config(Pipeline, path, data=data, base=path.parent)


def _fill(value, values: dict[str, str], path: Path):
    from builder.errors import BuilderConfigError

    if isinstance(value, str):

        def one(match):
            if match.group(1) not in values:
                raise BuilderConfigError(
                    f"{path}: ${{{match.group(1)}}} has no value",
                    f"add it under vars: or pass --var {match.group(1)}=VALUE"
                    + (f" (known: {', '.join(sorted(values))})" if values else ""),
                )
            return values[match.group(1)]

        return VAR.sub(one, value)
    if isinstance(value, list):
        return [_fill(v, values, path) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values, path) for k, v in value.items()}
    return value


def base_checkpoint(pipeline: Pipeline) -> Path | None:
    """Where "@base" points: the imported checkpoint under work/, or the manifest's own directory."""
    if pipeline.base is None:
        return None
    from builder import base

    manifest, manifest_path = base.load_manifest(pipeline.base)
    return base.located(manifest, manifest_path) if manifest.format == "hf" else pipeline.work / BASE


def stage_configs(pipeline: Pipeline, base: Path) -> list[tuple[StageSpec, BaseModel]]:
    """Every stage's validated config, with references and relative paths resolved."""
    from builder.lineage import load_config

    modules = stage_modules()
    outputs = {s.name: pipeline.work / s.name for s in pipeline.stages}
    if pipeline.base is not None:
        outputs[BASE] = base_checkpoint(pipeline)
    resolved = []
    for spec in pipeline.stages:
        data = _resolve(spec.config, outputs, base)
        if "out" in data:
            raise BuilderError(
                f"stage {spec.name}: `out` is set by the pipeline", "remove it from the config"
            )
        data["out"] = str(outputs[spec.name])
        try:
            config = load_config(modules[spec.stage][1], data=data, base=base)
        except BuilderError as exc:
            raise BuilderError(f"stage {spec.name}: {exc.message}", exc.fix) from exc
        resolved.append((spec, config))
    return resolved


def run(
    path: Path,
    *,
    force: list[str] | None = None,
    until: str | None = None,
    variables: dict[str, str] | None = None,
) -> dict:
    from builder import base as base_models
    from builder import evaluate, generation, lineage

    pipeline = load(path, variables)
    lineage.init_distributed()
    base = path.parent.resolve()
    configs = stage_configs(pipeline, base)
    names = [s.name for s, _ in configs]
    for name in (force or []) + ([until] if until else []):
        if name not in names:
            raise BuilderError(f"no stage named {name!r}", f"stages: {', '.join(names)}")
    modules = stage_modules()
    summary: dict[str, dict] = {}
    started = time.perf_counter()
    base_model: str | dict | None = pipeline.base_model
    if pipeline.base is not None:  # before any training: the base is there and is what its manifest says
        if lineage.rank() == 0:
            checkpoint, base_model = base_models.prepare(pipeline.base, pipeline.work / BASE)
            summary[BASE] = {"checkpoint": str(checkpoint)}
        lineage.barrier()
    for spec, config in configs:
        module = modules[spec.stage][0]
        forced = spec.name in (force or [])  # what follows reruns if the forced output differs
        key = lineage.stage_key(spec.stage, config, lineage.input_hashes(config.inputs()))
        if not forced and lineage.is_current(config.out, key):
            print(f"[{spec.name}] unchanged, skipped", file=sys.stderr)
            summary[spec.name] = {"skipped": True, **lineage.read_lineage(config.out)["result"]}
        elif spec.stage not in TRAINING and lineage.rank() != 0:
            lineage.barrier()  # under torchrun, rank 0 alone merges, exports and evaluates; wait for it
            summary[spec.name] = {"skipped": True}
            continue
        else:
            print(f"[{spec.name}] running {spec.stage} ...", file=sys.stderr)
            module.run(config)  # its output is written (by rank 0) once every rank passes its barrier
            summary[spec.name] = {"skipped": False, **lineage.read_lineage(config.out)["result"]}
        if spec.stage == "eval":
            evaluate.check_gate(config.out)
        if spec.name == until:
            return {"stages": _brief(summary), "seconds": round(time.perf_counter() - started, 1)}

    out = None
    if pipeline.generation and lineage.rank() == 0:
        g = pipeline.generation
        outputs = {s.name: c.out for s, c in configs}
        model = Path(_resolve(g.model, outputs, base))
        stages = {
            s.name: {
                "stage": s.stage,
                **{
                    k: v
                    for k, v in lineage.read_lineage(c.out).items()
                    if k in ("config", "inputs", "versions", "git_commit", "seconds", "feedback_exports")
                },
            }
            for s, c in configs
        }
        out = generation.write(
            (base / g.out).resolve() if not g.out.is_absolute() else g.out,
            name=g.name or pipeline.name,
            model=generation.check_exists(model, "model"),
            embedder_dir=generation.check_exists(Path(_resolve(g.embedder, outputs, base)), "embedder"),
            template=g.chat_template or _template_beside(model),
            stages=stages,
            eval_dir=Path(_resolve(g.eval, outputs, base)) if g.eval else None,
            base_model=base_model,
        )
    return {
        "stages": _brief(summary),
        "generation": str(out) if out else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _template_beside(model: Path) -> Path:
    from builder.training import DEFAULT_TEMPLATE

    beside = model.parent / "chat_template.jinja"
    return beside if beside.is_file() else DEFAULT_TEMPLATE


def _brief(summary: dict[str, dict]) -> dict:
    keep = (
        "skipped",
        "steps",
        "seconds",
        "train_loss",
        "first_loss",
        "last_loss",
        "eval_loss",
        "tokens_per_s",
        "stopped_by_time_budget",
        "files",
        "gate",
    )
    return {name: {k: v for k, v in row.items() if k in keep} for name, row in summary.items()}
