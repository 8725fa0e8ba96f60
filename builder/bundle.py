"""A signed update bundle: a generation directory as a TUF repository on a plain directory (a USB stick).

    <out>/metadata/<N>.root.json       every root version from the keys directory (rotations)
    <out>/metadata/<V>.targets.json    every file with length and sha256, signed by the targets keys
    <out>/metadata/<V>.snapshot.json   the targets metadata's version, length and hash
    <out>/metadata/timestamp.json      the snapshot's version, length and hash (written last)
    <out>/targets/<dir>/<sha256>.<name>   content-addressed copies of each file

Targets are the generation's files (generation.json included), bundle.json (name, version, lineage,
evaluation report, minimum RAM) and an optional prebuilt reference.db. V, the bundle version, is also
the version of the targets, snapshot and timestamp metadata, so an appliance that installed V refuses
an older bundle as a replay through TUF's own checks. A version is never signed twice for different
contents: the keys directory remembers what it signed. Only a generation whose release gate passed
(its signed eval.json says so) is signed, unless the caller says `ungated`; bundle.json carries the
evaluation either way, so the appliance shows what was signed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.bundles.manifest import (
    BUNDLE_NAME,
    DEFAULT_N_CTX,
    MANIFEST_NAME,
    REFERENCE_DB,
    BundleManifest,
    ReleaseGate,
    sha256_file,
    utc_stamp,
    verify_generation,
)
from builder import keys as keyring
from builder.errors import BuilderError

_BLOCK = 1 << 20
OVERHEAD_MB = 400  # docs/architecture.md section 9: resident size <= model + KV cache + 400 MB


def _copy_hashed(src: Path, dst: Path) -> tuple[int, str]:
    """Copy src to dst, fsync it, and return (length, sha256) of what was written."""
    digest = hashlib.sha256()
    length = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(_BLOCK):
            digest.update(block)
            fout.write(block)
            length += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return length, digest.hexdigest()


def min_ram_mb(model: Path, embedder_bytes: int) -> int:
    """What the appliance needs resident: weights, an f16 KV cache at the default context, the embedder,
    and the process overhead the appliance is held to."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(model))
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise BuilderError(f"{model}: not a readable GGUF ({exc})", "export the model again") from exc

    def value(key, default=0):
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    arch = value("general.architecture", "llama")
    layers = int(value(f"{arch}.block_count"))
    heads = int(value(f"{arch}.attention.head_count", 1)) or 1
    kv_heads = int(value(f"{arch}.attention.head_count_kv", heads))
    head_dim = (
        int(value(f"{arch}.attention.key_length", 0)) or int(value(f"{arch}.embedding_length")) // heads
    )
    context = min(int(value(f"{arch}.context_length", DEFAULT_N_CTX)), DEFAULT_N_CTX)
    kv_bytes = 2 * layers * context * kv_heads * head_dim * 2
    total = model.stat().st_size + kv_bytes + embedder_bytes
    return -(-total // 1_000_000) + OVERHEAD_MB


def _resolve_version(keys_dir: Path, version: int | str, generation_sha: str) -> tuple[int, str | None]:
    """(version, created) where created is reused when the same generation is signed again as the same
    version (so every copy of that bundle is byte-identical)."""
    signed = keyring.signed_versions(keys_dir)
    latest = max(signed, default=0)
    if version == "next":
        return latest + 1, None
    try:
        version = int(version)
    except ValueError:
        raise BuilderError(
            f"--version {version!r}: not a number", "give a whole number >= 1, or 'next'"
        ) from None
    if version < 1:
        raise BuilderError(f"--version {version}: versions start at 1", "give a whole number >= 1, or 'next'")
    if version in signed:
        if signed[version]["generation"] == generation_sha:
            return version, signed[version]["created"]
        raise BuilderError(
            f"version {version} was already signed on {signed[version]['created']} for another "
            f"generation; two different bundles with one version would confuse every appliance",
            f"use --version {latest + 1} (or 'next')",
        )
    if version < latest:
        raise BuilderError(
            f"version {version} is older than version {latest}, already signed with these keys; "
            "an appliance that installed it would refuse this bundle as a replay",
            f"use --version {latest + 1} (or 'next')",
        )
    return version, None


def _targets_dir_clear(out: Path, force: bool) -> None:
    existing = [out / name for name in ("metadata", "targets") if (out / name).exists()]
    if existing and not force:
        raise BuilderError(
            f"{out} already holds a bundle ({', '.join(p.name for p in existing)})",
            "choose an empty directory, or pass --force to replace that bundle",
        )
    for path in existing:
        shutil.rmtree(path)


def create(
    generation: Path,
    keys_dir: Path,
    version: int | str,
    out: Path,
    *,
    reference_db: Path | None = None,
    expires_days: int = 365,
    expires: datetime | None = None,
    passphrase: keyring.Passphrase | None = None,
    force: bool = False,
    signers: dict[str, list] | None = None,
    ungated: bool = False,
) -> BundleManifest:
    """Write the signed bundle for `generation` into `out` and return its bundle.json. The steps:
    check the generation and the keys, describe it (bundle.json), copy the targets content-addressed
    into a staging directory, sign targets -> snapshot -> timestamp, and publish (targets first,
    the timestamp last, so a stick pulled early is refused cleanly).

    `expires` overrides `expires_days`; `signers` replaces the keys directory's signers per role (tests
    build refused bundles with it: wrong keys, too few signatures); `ungated`: sign a generation whose
    release gate did not pass, or that was never evaluated."""
    generation = generation.resolve()
    manifest = verify_generation(generation)  # sign only what its own manifest vouches for
    gate = release_gate(generation, manifest)
    if gate != "passed" and not ungated:
        raise BuilderError(
            f"{generation}: {gate}; a bundle carries only a model that passed its release gate",
            "evaluate it (`builder eval`, or the pipeline's eval stage) and improve the model until the "
            "gate passes; or pass --ungated to sign it anyway (bundle.json carries the evaluation, so "
            "the appliance shows it)",
        )
    if gate != "passed":
        print(f"warning: signing it although {gate} (--ungated)", file=sys.stderr)
    signers = _signers(keys_dir, signers, passphrase)
    generation_sha = sha256_file(generation / MANIFEST_NAME)
    version, created = _resolve_version(keys_dir, version, generation_sha)
    if reference_db is not None and not reference_db.is_file():
        raise BuilderError(f"{reference_db}: not a file", "give the path of a reference.db to include")
    expiry = (expires or datetime.now(UTC) + timedelta(days=expires_days)).replace(microsecond=0)
    info = describe(
        generation, manifest, version, created or utc_stamp(), generation_sha, reference_db is not None
    )

    out.mkdir(parents=True, exist_ok=True)
    _targets_dir_clear(out, force)
    staging = out / ".bundle-staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "targets").mkdir(parents=True)
    try:
        (staging / BUNDLE_NAME).write_text(info.model_dump_json(indent=2) + "\n")
        sources = {name: generation / name for name in [*manifest.files, MANIFEST_NAME]}
        sources[BUNDLE_NAME] = staging / BUNDLE_NAME
        if reference_db is not None:
            sources[REFERENCE_DB] = reference_db
        files, total = _stage_targets(sources, staging / "targets")
        metadata = _sign_metadata(keys_dir, staging / "metadata", files, version, expiry, signers)
        _publish(staging, metadata, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for name in ("targets", "metadata"):
            if (out / name).exists() and not (out / "metadata" / "timestamp.json").exists():
                shutil.rmtree(out / name, ignore_errors=True)
        raise
    keyring.record_signed(
        keys_dir, version, {"generation": generation_sha, "created": info.created, "name": manifest.name}
    )
    print(
        f"bundle {manifest.name} version {version} written to {out} ({total / 1e6:.1f} MB, "
        f"{len(files)} files, metadata expires {expiry:%Y-%m-%d})",
        file=sys.stderr,
    )
    return info


def release_gate(generation: Path, manifest) -> str:
    """ "passed", or why not: the generation's eval.json (one of its signed files) did not pass its
    gate (its failures named), records no gate, or is not there."""
    if "eval.json" not in manifest.files:
        return "the model was never evaluated (no eval.json)"
    gate = ReleaseGate.of(json.loads((generation / "eval.json").read_text()))
    if gate is None:
        return "its eval.json records no release gate"
    if not gate.passed:
        return "the model did not pass its release gate: " + "; ".join(gate.failures)
    return "passed"


def _signers(keys_dir: Path, given: dict[str, list] | None, passphrase) -> dict[str, list]:
    """The signers of each online role: `given` where named, else the keys directory's."""
    root = keyring.load_root(keys_dir)
    signers = dict(given or {})
    for role in ("targets", "snapshot", "timestamp"):
        if role not in signers:
            signers[role] = keyring.signers_for(keys_dir, role, root, passphrase)
    return signers


def describe(
    generation: Path, manifest, version: int, created: str, generation_sha: str, reference_db: bool
) -> BundleManifest:
    """bundle.json: what the appliance shows and checks before installing (name, version, model,
    embedder, lineage, evaluation, the RAM it needs)."""
    from importlib.metadata import version as package_version

    model_entry = manifest.files[manifest.model.file]
    embedder_bytes = sum(
        e.size for name, e in manifest.files.items() if name.startswith(manifest.embedder.dir + "/")
    )
    evaluation = None
    if (generation / "eval.json").is_file():
        evaluation = json.loads((generation / "eval.json").read_text())
    return BundleManifest(
        name=manifest.name,
        version=version,
        created=created,
        generation=generation_sha,
        model={
            "name": manifest.model.name,
            "quant": manifest.model.quant,
            "sha256": model_entry.sha256,
            "bytes": model_entry.size,
        },
        embedder={"name": manifest.embedder.name, "dim": manifest.embedder.dim},
        lineage=manifest.lineage,
        evaluation=evaluation,
        min_ram_mb=min_ram_mb(generation / manifest.model.file, embedder_bytes),
        reference_db=reference_db,
        builder=package_version("slm-appliance"),
    )


def _stage_targets(sources: dict[str, Path], targets_dir: Path) -> tuple[dict[str, tuple[int, str]], int]:
    """Copy each source to `targets_dir` under its content address (<sha256>.<name>), hashing what was
    written; returns {name: (length, sha256)} and the total bytes."""
    total = sum(p.stat().st_size for p in sources.values())
    files: dict[str, tuple[int, str]] = {}
    done = 0
    for name, src in sorted(sources.items()):
        parent, _, base = name.rpartition("/")
        tmp = targets_dir / "incoming"
        length, digest = _copy_hashed(src, tmp)
        dest = targets_dir / parent / f"{digest}.{base}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        files[name] = (length, digest)
        done += length
        print(f"bundle: {done / 1e6:.1f}/{total / 1e6:.1f} MB  {name}", file=sys.stderr)
    return files, total


def _sign_metadata(
    keys_dir: Path,
    metadata: Path,
    files: dict[str, tuple[int, str]],
    version: int,
    expiry: datetime,
    signers: dict[str, list],
) -> bytes:
    """The root history, targets and snapshot written into `metadata`; returns the signed timestamp,
    which `_publish` writes last."""
    from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
    from tuf.api.serialization.json import JSONSerializer

    serializer = JSONSerializer(compact=False)
    metadata.mkdir()
    for path in sorted((keys_dir / "metadata").glob("*.root.json")):
        shutil.copyfile(path, metadata / path.name)
    shutil.copyfile(keys_dir / "root.json", metadata / "root.json")

    def signed_bytes(signed, role: str) -> bytes:
        md = Metadata(signed)
        for signer in signers[role]:
            md.sign(signer, append=True)
        return md.to_bytes(serializer)

    def meta(data: bytes) -> MetaFile:
        return MetaFile(
            version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
        )

    targets = Targets(version=version, expires=expiry)
    for name, (length, digest) in files.items():
        targets.targets[name] = TargetFile(length=length, hashes={"sha256": digest}, path=name)
    targets_bytes = signed_bytes(targets, "targets")
    (metadata / f"{version}.targets.json").write_bytes(targets_bytes)
    snapshot_bytes = signed_bytes(
        Snapshot(version=version, expires=expiry, meta={"targets.json": meta(targets_bytes)}), "snapshot"
    )
    (metadata / f"{version}.snapshot.json").write_bytes(snapshot_bytes)
    return signed_bytes(
        Timestamp(version=version, expires=expiry, snapshot_meta=meta(snapshot_bytes)), "timestamp"
    )


def _publish(staging: Path, timestamp: bytes, out: Path) -> None:
    """Targets first, timestamp last: a stick pulled early holds no timestamp and is refused cleanly."""
    os.replace(staging / "targets", out / "targets")
    os.replace(staging / "metadata", out / "metadata")
    tmp = out / "metadata" / ".timestamp.json"
    tmp.write_bytes(timestamp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out / "metadata" / "timestamp.json")
    shutil.rmtree(staging)
    os.sync()
