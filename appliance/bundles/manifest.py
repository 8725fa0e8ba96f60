"""The generation manifest: the one contract between the builder and the appliance.

A generation directory holds `model.gguf`, `chat_template.jinja`, `embedder/` and `generation.json`.
`generation.json` lists every other file with its sha256 and size, and the lineage of the model.
`verify_generation` refuses a directory whose files are missing, extra or altered.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.errors import GenerationError

MANIFEST_NAME = "generation.json"
BUNDLE_NAME = "bundle.json"
REFERENCE_DB = "reference.db"
BUNDLE_FORMAT = 1
FORMAT_VERSION = 1
# the context the appliance gives a model by default; the builder sizes min_ram_mb with it
DEFAULT_N_CTX = 4096


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def utc_stamp(when: float | None = None) -> str:
    """A UTC time (now, or `when` in seconds since the epoch) as every record here writes it:
    2026-12-02T09:56:49Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


def context_tokens(requested: int, model: ModelInfo) -> int:
    """The context a model is run with, decided here only: what the settings ask for (`n_ctx`), never
    beyond what the model was trained on (llama.cpp would only warn, then degrade). The engine in
    process, the engine server's slots, the service's request limits and the prompt budget all use it."""
    return min(requested, model.context_length)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = "model.gguf"
    name: str
    architecture: str = "llama"
    quant: str = Field(description="llama.cpp file type, e.g. Q8_0")
    context_length: int = Field(ge=16)
    parameters: int = Field(ge=0)


class EmbedderInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str = "embedder"
    name: str
    dim: int = Field(ge=1)


class GenerationManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT_VERSION
    name: str
    created: str
    model: ModelInfo
    chat_template: str = "chat_template.jinja"
    embedder: EmbedderInfo
    files: dict[str, FileEntry]
    lineage: dict = Field(default_factory=dict, description="Base model, data hashes, stage configs")

    @field_validator("files")
    @classmethod
    def _safe_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            p = PurePosixPath(name)
            if not name or "\x00" in name or p.is_absolute() or ".." in p.parts or "\\" in name:
                raise ValueError(f"unsafe file name in manifest: {name!r}")
        return files


def scan_files(root: Path) -> dict[str, FileEntry]:
    """Every regular file under root except the manifest, with its hash; symlinks are refused."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise GenerationError(
                f"{path}: symbolic links are not allowed in a generation",
                "copy the file itself into the directory",
            )
        if not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


def write_manifest(root: Path, manifest_fields: dict) -> GenerationManifest:
    """Hash every file under root and write generation.json (used by the builder)."""
    manifest = GenerationManifest(files=scan_files(root), **manifest_fields)
    (root / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(root: Path) -> GenerationManifest:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise GenerationError(
            f"{root}: no {MANIFEST_NAME}; this is not a generation directory",
            "point at a directory written by `builder demo` or `builder export`",
        )
    try:
        return GenerationManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise GenerationError(f"{path}: invalid manifest ({exc})", "rebuild the generation") from exc


def verify_generation(root: Path, bundle_files: bool = False) -> GenerationManifest:
    """Check that the directory holds exactly the files the manifest lists, with matching hashes.

    `bundle_files`: the directory was installed from a signed bundle, so bundle.json and reference.db
    (signed by the bundle, not listed by the generation) may sit beside the generation's files."""
    manifest = read_manifest(root)
    if manifest.format != FORMAT_VERSION:
        raise GenerationError(
            f"{root}: manifest format {manifest.format}, this appliance reads {FORMAT_VERSION}",
            "rebuild the generation with a matching builder",
        )
    for required in (manifest.model.file, manifest.chat_template):
        if required not in manifest.files:
            raise GenerationError(f"{root}: manifest does not list {required}", "rebuild the generation")
    actual = scan_files(root)
    missing = sorted(set(manifest.files) - set(actual))
    if missing:
        raise GenerationError(f"{root}: missing {', '.join(missing)}", "copy the complete generation again")
    extra = sorted(
        set(actual) - set(manifest.files) - ({BUNDLE_NAME, REFERENCE_DB} if bundle_files else set())
    )
    if extra:
        raise GenerationError(
            f"{root}: files not in the manifest: {', '.join(extra)}", "remove them or rebuild the generation"
        )
    for name, entry in manifest.files.items():
        if actual[name].size != entry.size or actual[name].sha256 != entry.sha256:
            raise GenerationError(
                f"{name}: sha256 mismatch with the manifest; the generation is damaged or altered",
                "rebuild it with `builder demo` or copy it again",
            )
    return manifest


def read_bundle(root: Path) -> BundleManifest | None:
    """bundle.json of an installed generation (None: installed unsigned)."""
    path = root / BUNDLE_NAME
    return BundleManifest.model_validate_json(path.read_bytes()) if path.is_file() else None


class Perplexity(BaseModel):
    """One quant's perplexity on the held-out text, as `builder eval` measured it."""

    model_config = ConfigDict(extra="allow")
    perplexity: float
    tokens_scored: int | None = None
    contexts: int | None = None


class ReleaseGate(BaseModel):
    """Whether a generation passed its release gate, why not, and the limits it was held to."""

    model_config = ConfigDict(extra="allow")
    passed: bool
    failures: list[str] = Field(default_factory=list)

    def limits(self) -> dict:
        """The limits that were set (a limit left at None was not checked)."""
        return {k: v for k, v in (self.model_extra or {}).items() if v not in (None, False)}

    @classmethod
    def of(cls, evaluation: dict) -> ReleaseGate | None:
        """The gate an eval.json (or a bundle's copy of it) records; None when it records none or it is
        not a gate's shape."""
        try:
            return EvalSummary.model_validate(evaluation).gate
        except ValidationError:
            return None

    @classmethod
    def passed_in(cls, evaluation: dict) -> bool:
        gate = cls.of(evaluation)
        return gate is not None and gate.passed


class EvalSummary(BaseModel):
    """What a generation's lineage (and its bundle) records of `eval.json`: perplexity per quant and the
    release gate. The builder writes it, the appliance's status and the operator UI read it."""

    model_config = ConfigDict(extra="allow")
    perplexity: dict[str, Perplexity] = Field(default_factory=dict)
    gate: ReleaseGate | None = None

    @field_validator("perplexity", mode="before")
    @classmethod
    def _bare_numbers(cls, value):  # an early eval.json recorded the number alone
        if isinstance(value, dict):
            return {k: {"perplexity": v} if isinstance(v, int | float) else v for k, v in value.items()}
        return value


class BundleManifest(BaseModel):
    """bundle.json: what a signed update bundle carries besides the generation's own files."""

    model_config = ConfigDict(extra="forbid")
    format: int = BUNDLE_FORMAT
    name: str
    version: int = Field(ge=1, description="Equals the TUF targets/snapshot/timestamp version")
    created: str
    generation: str = Field(description="sha256 of the generation's generation.json")
    model: dict = Field(description="name, quant, sha256, bytes")
    embedder: dict = Field(description="name, dim")
    lineage: dict = Field(default_factory=dict)
    evaluation: dict | None = Field(
        default=None, description="eval.json of the generation, when it was evaluated"
    )
    min_ram_mb: int = Field(ge=1, description="Model + KV cache at the default context + embedder + 400 MB")
    reference_db: bool = False
    builder: str = ""

    def gate_note(self) -> str | None:
        """What an operator should know before installing a model the builder signed although its
        release gate did not pass (`builder bundle create --ungated`); None when it passed."""
        if self.evaluation is None:
            return "its model was never evaluated: the builder signed it without a release gate"
        if not ReleaseGate.passed_in(self.evaluation):
            return (
                "its model did not pass its release gate: the builder signed it anyway "
                "(`appliance status` shows the figures)"
            )
        return None
