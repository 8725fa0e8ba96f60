"""Signed update bundles: verify, install with rollback.

A bundle is a TUF repository in a plain directory (see builder/bundle.py). `install` takes the install
lock, then: TUF refresh from the directory against the trusted metadata (`trust`) -> version policy
(same version: no-op; older: refused unless `allow_downgrade`, never below the security floor) -> each
target streamed into staging and checked (`staging`) -> `prepare` (the caller's health check and
re-embedding) -> commit (`commit`): rename into `generations/<n>/`, switch the trusted metadata, switch
`current` atomically, keep the previous generation for `rollback`. Every refusal raises `BundleError`
naming the cause; the running generation is untouched and staging is removed. An install killed
midway is finished or undone by `commit.recover`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.bundles import generations
from appliance.bundles.commit import (
    COMMIT_STEPS,
    abandon,
    commit,
    link_number,
    locked,
    recover_locked,
    step,
    write_state,
)
from appliance.bundles.manifest import (
    BUNDLE_NAME,
    BundleManifest,
    GenerationManifest,
    ReleaseGate,
    read_bundle,
    read_manifest,
    utc_stamp,
)
from appliance.bundles.staging import SPACE_MARGIN, Progress, copy_all, mem_total_mb, validate
from appliance.bundles.trust import Verified, current_version, trusted_bundle, trusted_version
from appliance.errors import ApplianceError, BundleError
from appliance.schemas import BundleInfo, Installed

Prepare = Callable[[Path, GenerationManifest, BundleManifest], dict]


def _check_policy(home: Path, verified: Verified, security_floor: int) -> str | None:
    """None to go on, or the reason this install is a no-op."""
    current = current_version(home)
    if current is not None and verified.version == current:
        return f"version {current} is already the running generation; nothing to do"
    if verified.downgrade:
        if verified.version < security_floor:
            raise BundleError(
                f"version {verified.version} is below the security floor {security_floor}",
                "a bundle that old is never installed; install a newer one",
            )
        verified.notes.append(
            f"downgrade from version {max(current or 0, trusted_version(home))} "
            f"to {verified.version} (--allow-downgrade)"
        )
    return None


def verify(home: Path, source: Path, progress: Progress | None = None) -> Verified:
    """Check a bundle completely (metadata, every target's length and hash, the GGUF's structure)
    without installing it; the trusted state is not changed."""
    import tempfile

    source = source.resolve()
    gens = home / "generations"
    gens.mkdir(parents=True, exist_ok=True)
    # Beside the generations (same filesystem, and cleaned by `recover` if this process is killed).
    with tempfile.TemporaryDirectory(prefix=".staging-verify-", dir=gens) as tmp:
        verified = trusted_bundle(home, source, Path(tmp), allow_downgrade=True)
        if verified.downgrade:
            verified.notes.append(
                f"older than version {trusted_version(home)}: installing it needs --allow-downgrade"
            )
        copy_all(verified, None, progress)  # hashed in place: nothing is written
        validate(
            verified,
            lambda name: verified.source / "targets" / verified.targets[name].get_prefixed_paths()[0],
        )
    if note := verified.info.gate_note():  # bundle.json, read by validate
        verified.notes.append(note)
    return verified


@dataclass
class InstallResult:
    version: int
    number: int | None  # None: nothing was installed (same version)
    message: str
    info: BundleManifest | None = None
    downgrade: bool = False
    health: dict = field(default_factory=dict)
    recovered: str | None = None

    def report(self) -> Installed:
        return Installed(
            version=self.version,
            generation=self.number,
            message=self.message,
            downgrade=self.downgrade,
            health=self.health,
            bundle=BundleInfo.model_validate(self.info.model_dump()) if self.info else None,
            recovered=self.recovered,
        )


def install(
    home: Path,
    source: Path,
    prepare: Prepare | None = None,
    *,
    allow_downgrade: bool = False,
    security_floor: int = 0,
    progress: Progress | None = None,
) -> InstallResult:
    """Verify and install a bundle; see the module docstring for the steps."""
    source = source.resolve()
    if not source.is_dir():
        raise BundleError(
            f"{source}: not a directory", "give the bundle's directory (the stick's mount point)"
        )
    gens = home / "generations"
    with locked(home):
        recovered = recover_locked(home)
        gens.mkdir(parents=True, exist_ok=True)
        number = max(generations.list_generations(gens), default=0) + 1
        staging = gens / f".staging-{number}"
        state = {
            "pid": os.getpid(),
            "source": str(source),
            "staging": str(staging),
            "number": number,
            "previous": link_number(home / "current"),
            "step": "start",
        }
        write_state(home, state)
        try:
            staging.mkdir()
            step(home, state, "refresh")
            verified = trusted_bundle(home, source, staging, allow_downgrade)
            state["version"] = verified.version
            noop = _check_policy(home, verified, security_floor)
            if noop:
                abandon(home, staging)
                return InstallResult(verified.version, None, noop, recovered=recovered)
            free = shutil.disk_usage(gens).free
            if verified.total_bytes + SPACE_MARGIN > free:
                raise BundleError(
                    f"the bundle needs {verified.total_bytes / 1e6:.0f} MB and {gens} has "
                    f"{free / 1e6:.0f} MB free",
                    "free space (an old generation can go with "
                    "`appliance bundle rollback` then a new install)",
                )
            step(home, state, "copy")
            copy_all(
                verified, staging / "generation", progress, after_first=lambda: step(home, state, "copying")
            )
            step(home, state, "validate")
            manifest = validate(verified, lambda name: staging / "generation" / name)
            ram = mem_total_mb()
            if ram is not None and verified.info.min_ram_mb > ram:
                raise BundleError(
                    f"the model needs {verified.info.min_ram_mb} MB of memory; this machine has {ram} MB",
                    "install it on a larger machine, or have the builder export a smaller quantization",
                )
            step(home, state, "health")
            health = prepare(staging / "generation", manifest, verified.info) if prepare else {}
            generations.make_read_only(staging / "generation")
            state["trust"] = not verified.downgrade  # a downgrade never lowers what is trusted
            step(home, state, "commit")
            commit(home, state)
        except BaseException:
            if state.get("step") in COMMIT_STEPS:
                raise  # verified and prepared: the next start completes it
            abandon(home, staging)
            raise
    return InstallResult(
        verified.version,
        number,
        f"installed version {verified.version} as generation {number}",
        info=verified.info,
        downgrade=verified.downgrade,
        health=health,
        recovered=recovered,
    )


def rollback(home: Path) -> tuple[int, int]:
    """Make the previous generation current again; returns (from, to)."""
    with locked(home):
        recover_locked(home)
        current = link_number(home / "current")
        previous = link_number(home / "previous")
        if previous is None or not (home / "generations" / str(previous)).is_dir():
            raise BundleError(
                "there is no previous generation to return to",
                "`appliance bundle list` shows what is installed",
            )
        generations.current(home)  # the current link must be sound before it is replaced
        generations.switch_current(home, previous)
        generations.switch_link(home / "previous", None)
        return current, previous


def history(home: Path) -> list[dict]:
    """Installed generations, newest first, with their bundle version and state."""
    current = link_number(home / "current")
    previous = link_number(home / "previous")
    rows = []
    for number in reversed(generations.list_generations(home / "generations")):
        path = home / "generations" / str(number)
        row = {
            "generation": number,
            "current": number == current,
            "previous": number == previous,
            "installed": utc_stamp(path.stat().st_mtime),
            "signed": (path / BUNDLE_NAME).is_file(),
            "version": None,
            "name": None,
        }
        with contextlib.suppress(ApplianceError, ValueError, OSError):
            m = read_manifest(path)
            row.update(name=m.name, model=m.model.name, quant=m.model.quant)
        with contextlib.suppress(ValueError, OSError):
            info = read_bundle(path)
            if info is not None:
                gate = ReleaseGate.of(info.evaluation) if info.evaluation is not None else None
                row.update(
                    version=info.version,
                    created=info.created,
                    gate=None if gate is None else gate.passed,
                )
        rows.append(row)
    return rows
