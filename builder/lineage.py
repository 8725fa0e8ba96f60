"""What every stage shares: YAML configs, input hashes, `lineage.json`, and all-or-nothing outputs.

A stage writes into `<out>.partial/` and renames it to `<out>` only when everything is there, so a
crash or Ctrl-C never leaves a directory that looks finished. `lineage.json` beside the output holds
the resolved config, every input with its sha256, library versions and the project's git commit;
its `key` (a hash of config and inputs) is what `builder run` compares to skip an unchanged stage.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from appliance.bundles.manifest import sha256_file, utc_stamp
from builder.errors import BuilderConfigError, BuilderError

C = TypeVar("C", bound=BaseModel)

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "mergekit",
    "sentencepiece",
    "llama_cpp_python",
    "gguf",
    "onnxruntime",
    "slm-appliance",
)


def load_config(
    cls: type[C], path: Path | None = None, data: dict | None = None, base: Path | None = None
) -> C:
    """A stage config from a YAML file (or a dict), with errors that name the file and the field.

    Relative paths are taken relative to `base`: the file's directory, or the working directory."""
    where = str(path) if path else "config"
    if data is None:
        if path is None or not path.is_file():
            raise BuilderConfigError(f"{where}: no such config file", "give the path of a YAML file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BuilderConfigError(
                f"{where}: not valid YAML: {exc}", "fix the syntax at the line named"
            ) from exc
    if not isinstance(data, dict):
        raise BuilderConfigError(
            f"{where}: expected a mapping of settings", "see the example in the command's --help"
        )
    try:
        config = cls.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise BuilderConfigError(
            f"{where}: invalid {cls.__name__}:\n" + "\n".join(lines),
            "fix the fields named; every field is listed in the stage's --help",
        ) from exc
    return absolutize(config, base or (path.parent if path is not None else Path.cwd()))


def absolutize(model: BaseModel, base: Path) -> BaseModel:
    """Relative paths anywhere in a config become relative to `base` (the config file's directory)."""

    def fix(value):
        if isinstance(value, Path):
            return value if value.is_absolute() else (base / value).resolve()
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, BaseModel):
            return absolutize(value, base)
        return value

    for name in type(model).model_fields:
        setattr(model, name, fix(getattr(model, name)))
    return model


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
    if path.is_file():
        return _file_hash(path)
    if not path.is_dir():
        raise BuilderError(f"{path}: no such file or directory", "check the path in the config")
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name != "lineage.json"):
        h.update(f"{p.relative_to(path).as_posix()}\0{_file_hash(p)}\n".encode())
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    # A pipeline hashes each input several times (skip check, lineage, checkpoint key): a multi-GB
    # checkpoint is read once per process unless it changed.
    st = path.stat()
    return _cached_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def stage_key(stage: str, config: BaseModel, inputs: dict[str, str]) -> str:
    """What decides whether a stage's output is still valid: its config and its inputs' hashes."""
    blob = json.dumps(
        {"stage": stage, "config": config.model_dump(mode="json", exclude={"out"}), "inputs": inputs},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def input_hashes(paths: list[Path]) -> dict[str, str]:
    return {str(p): hash_path(p) for p in paths}


def git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.CalledProcessError):
        return None


def checkpoint_dir(stage: str, config: BaseModel) -> Path:
    """Where a stage's mid-training checkpoints go: beside its output, per config and inputs, so a
    rerun resumes only the very same training. Removed when the stage completes."""
    out: Path = config.out  # type: ignore[attr-defined]
    key = stage_key(stage, config, input_hashes(config.inputs()))  # type: ignore[attr-defined]
    return out.with_name(out.name + ".checkpoints") / key[:16]


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_lineage(out: Path) -> dict | None:
    try:
        return json.loads((out / "lineage.json").read_text())
    except (OSError, ValueError):
        return None


def is_current(out: Path, key: str) -> bool:
    lineage = read_lineage(out)
    return bool(lineage and lineage.get("key") == key)


def rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> None:
    """Join the process group when launched by torchrun / accelerate launch (several processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()


def barrier() -> None:
    """Wait for every rank (a no-op when not distributed)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def staged_output(stage: str, config: BaseModel, inputs: list[Path]) -> Iterator[tuple[Path, dict]]:
    """Yield (partial directory, record); on success write lineage.json there and move it into place.

    The record is the stage's to fill (metrics, artifacts); it lands in lineage.json under `result`.
    Under torchrun/accelerate every rank trains, rank 0 alone writes the output; the others work in
    a scratch directory and wait for it.
    """
    out: Path = config.out  # type: ignore[attr-defined]
    if rank() != 0:
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"{stage}-rank{rank()}-") as scratch:
            yield Path(scratch), {}
        barrier()
        return
    hashes = input_hashes(inputs)
    key = stage_key(stage, config, hashes)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    record: dict = {}
    started = time.time()
    try:
        yield partial, record
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    lineage = {
        "stage": stage,
        "key": key,
        "config": config.model_dump(mode="json"),
        "inputs": hashes,
        "started": utc_stamp(started),
        "seconds": round(time.time() - started, 1),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "result": record,
    }
    from builder.feedback import lineage_of

    exports = lineage_of(inputs)
    if exports:  # operator feedback from appliances went into this stage
        lineage["feedback_exports"] = exports
    (partial / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)
    shutil.rmtree(out.with_name(out.name + ".checkpoints"), ignore_errors=True)
    print(f"{stage}: wrote {out} in {lineage['seconds']:.0f} s", file=sys.stderr)
    barrier()


def device() -> tuple[str, bool]:
    """('cuda', bf16) on a GPU, ('cpu', False) otherwise: bf16 on CUDA, fp32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.cuda.is_bf16_supported()
    return "cpu", False
