"""Signed update bundles: verify, install with rollback, recover (the only module that speaks TUF).

A bundle is a TUF repository in a plain directory (see builder/bundle.py). Trust lives in
`$APPLIANCE_HOME/trust/`: `root.json` as provisioned by `trust_init`, and `metadata` -> `md-<n>/`, the
metadata TUF trusted at the last install (newest root, timestamp, snapshot, targets), which is what
makes an older bundle a refused replay.

`install` takes the install lock, then: TUF refresh from the directory through a fetcher that reads
local files with length limits -> version policy (same version: no-op; older: refused unless
`allow_downgrade`, never below the security floor) -> each target streamed from the stick into staging
on the home's filesystem while TUF checks its length and sha256 over exactly the bytes written ->
the generation's own manifest and the GGUF's structure checked in Python -> `prepare` (the caller's
health check and re-embedding) -> commit: rename into `generations/<n>/`, switch the trusted metadata,
switch `current` atomically, keep the previous generation for `rollback`. Every refusal raises
`BundleError` naming the cause; the running generation is untouched and staging is removed.

`install-state.json` records the step; `recover` (run before any install or rollback, and when the
appliance opens) removes an install killed before commit and completes one killed during commit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from appliance import generations, modelfile
from appliance.errors import ApplianceError, BundleError, BusyError
from appliance.manifest import (
    BUNDLE_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REFERENCE_DB,
    BundleManifest,
    GenerationManifest,
    read_bundle,
    read_manifest,
    utc_stamp,
)
from appliance.schemas import BundleCheck, Installed

STATE = "install-state.json"
LOCK = ".install.lock"
_URL = "bundle:///"
_BLOCK = 1 << 20
_MAX_TARGETS = 10_000
_SPACE_MARGIN = 64 << 20
_PROGRESS_EVERY = 64 << 20
_SYNC_EVERY = 64 << 20
PAUSE_ENV = "APPLIANCE_INSTALL_PAUSE"  # tests only: stop at this step until the pause file is removed
_COMMIT_STEPS = ("commit", "renamed", "switched")

Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes total)
Prepare = Callable[[Path, GenerationManifest, BundleManifest], dict]


@dataclass
class Verified:
    """A bundle whose metadata TUF accepted."""

    source: Path
    version: int
    targets: dict  # name -> tuf TargetFile
    info: BundleManifest | None = None
    metadata_dir: Path | None = None
    downgrade: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.length for t in self.targets.values())

    def report(self) -> BundleCheck:
        return BundleCheck(version=self.version, files=len(self.targets), targets=sorted(self.targets),
                           bytes=self.total_bytes, notes=self.notes, bundle=self.info)


# -- trust -----------------------------------------------------------------------------------------

def trust_dir(home: Path) -> Path:
    return home / "trust"


def has_trusted_root(home: Path) -> bool:
    trust = trust_dir(home)
    return (trust / "metadata" / "root.json").is_file() or (trust / "root.json").is_file()


def _trusted_root_bytes(home: Path) -> bytes:
    trust = trust_dir(home)
    newest = trust / "metadata" / "root.json"
    for path in (newest, trust / "root.json"):
        if path.is_file():
            return path.read_bytes()
    raise BundleError(f"{trust}: no trusted root; this appliance cannot verify bundles yet",
                      "provision it once with `appliance trust init ROOT_JSON` (root.json from `builder keys init`)")


def trust_init(home: Path, root_json: Path, force: bool = False) -> dict:
    """Provision the trusted root; refuses to replace one unless `force` (the caller audits it)."""
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization import DeserializationError

    data = root_json.read_bytes()
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise BundleError(f"{root_json}: not TUF metadata ({exc})",
                          "give the root.json written by `builder keys init`") from exc
    if not isinstance(md.signed, Root):
        raise BundleError(f"{root_json}: {md.signed.type} metadata, not root", "give the keys directory's root.json")
    try:
        md.verify_delegate(Root.type, md)
    except UnsignedMetadataError as exc:
        raise BundleError(f"{root_json}: not signed by its own root keys ({exc})",
                          "the file was altered; copy root.json from the keys directory again") from exc
    if md.signed.is_expired():
        raise BundleError(f"{root_json}: expired on {md.signed.expires:%Y-%m-%d}",
                          "rotate or renew the root with `builder keys rotate --role root`")
    trust = trust_dir(home)
    replaced = (trust / "root.json").is_file()
    if replaced and not force:
        raise BundleError(f"{trust / 'root.json'} already holds a trusted root; replacing it would let other keys "
                          "install models", "pass --force if you mean to re-provision (it is audited)")
    trust.mkdir(parents=True, exist_ok=True)
    tmp = trust / ".root.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, trust / "root.json")
    # What was trusted under the old root no longer counts.
    generations.switch_link(trust / "metadata", None)
    for stale in trust.glob("md-*"):
        shutil.rmtree(stale)
    return {"root_version": md.signed.version, "expires": md.signed.expires.isoformat(), "replaced": replaced,
            "keyids": {role: sorted(r.keyids) for role, r in md.signed.roles.items()},
            "thresholds": {role: r.threshold for role, r in md.signed.roles.items()}}


def trusted_version(home: Path) -> int:
    """The newest bundle version this appliance's trusted metadata has seen (0 before any)."""
    from tuf.api.metadata import Metadata

    path = trust_dir(home) / "metadata" / "timestamp.json"
    return Metadata.from_file(str(path)).signed.version if path.is_file() else 0


# -- reading the stick -----------------------------------------------------------------------------

def _open_regular(path: Path) -> io.BufferedReader:
    """Open a file on the stick for reading: no symlinks, nothing but a regular file."""
    # O_NONBLOCK: opening a FIFO planted on the stick must not hang the installer.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file", "rebuild the bundle with `builder bundle create`")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# Signed metadata is still capped: a compromised builder's key signs whatever length it likes, and
# TUF trusts the length snapshot.json gives for targets.json over its own default.
MAX_METADATA_BYTES = {"root": 1_000_000, "timestamp": 100_000, "snapshot": 1_000_000, "targets": 10_000_000}


def _fetcher(root: Path, seen: list[str]):
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class StickFetcher(FetcherInterface):
        """Metadata from `<bundle>/metadata/`; TUF's download_file enforces each role's length limit."""

        def _fetch(self, url: str) -> Iterator[bytes]:
            name = url.removeprefix(_URL + "metadata/")
            if not name or "/" in name or name.startswith(".") or "\x00" in name:
                raise DownloadHTTPError(f"{name!r}: not a metadata file name", 404)
            seen.append(name)
            try:
                fh = _open_regular(root / "metadata" / name)
            except FileNotFoundError:
                raise DownloadHTTPError(f"metadata/{name} is not in the bundle", 404) from None
            role = name.removesuffix(".json").rpartition(".")[2]
            size, cap = os.fstat(fh.fileno()).st_size, MAX_METADATA_BYTES.get(role, 1_000_000)
            if size > cap:
                fh.close()
                raise BundleError(f"metadata/{name} is {size / 1e6:.1f} MB; at most {cap / 1e6:.1f} MB is read, "
                                  "signed or not", "this is not metadata the builder writes; do not install it")

            def chunks() -> Iterator[bytes]:
                with fh:
                    while block := fh.read(_BLOCK):
                        yield block
            return chunks()

    return StickFetcher()


class _Tee(io.RawIOBase):
    """A read-only view of a stick file that writes what is read into `out`: TUF's length and hash check
    then covers exactly the bytes that land in staging (one read, one hash, one write; no gap between
    what was checked and what is installed)."""

    def __init__(self, src: io.BufferedReader, out, on_bytes: Callable[[int], None]):
        super().__init__()
        self.src, self.out, self.on_bytes = src, out, on_bytes
        self.size = os.fstat(src.fileno()).st_size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END and offset == 0:
            return self.size  # TUF's length check; nothing is read
        if whence == io.SEEK_SET and offset == 0 and self.pos == 0:
            return 0
        raise io.UnsupportedOperation("a staged copy is written once, front to back")

    def tell(self) -> int:
        return self.size

    def readinto(self, buffer) -> int:
        n = self.src.readinto(buffer)
        if n:
            if self.out is not None:
                self.out.write(bytes(memoryview(buffer)[:n]))  # a copy: TUF reuses its buffer
            self.pos += n
            self.on_bytes(n)
        return n or 0


class _StagedWriter:
    """Writes staged bytes on a second thread while the first hashes (both release the GIL), and pushes
    them to disk every `_SYNC_EVERY` bytes so the final fsync has little left to wait for."""

    def __init__(self, out):
        self.out = out
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bundle-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        unsynced = 0
        while (data := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                self.out.write(data)
                unsynced += len(data)
                if unsynced >= _SYNC_EVERY:
                    self.out.flush()
                    os.fdatasync(self.out.fileno())
                    unsynced = 0
            except BaseException as exc:  # handed to the producer thread, which raises it
                self.error = exc

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def finish(self) -> None:
        """All bytes written and on disk, or the writer's error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.out.flush()
        os.fsync(self.out.fileno())

    def abandon(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


def _safe_target_name(name: str) -> None:
    p = PurePosixPath(name)
    if (not name or "\x00" in name or "\\" in name or p.is_absolute() or name != p.as_posix()
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise BundleError(f"target name {name!r} is unsafe (absolute, '..', NUL or not normalised)",
                          "this bundle was not made by `builder bundle create`; do not install it")


def _translate(exc: Exception, seen: list[str]) -> BundleError:
    from tuf.api import exceptions as tx
    from tuf.api.serialization import DeserializationError

    where = f"metadata/{seen[-1]}" if seen else "the bundle's metadata"
    cause = exc.__cause__ or exc.__context__
    while cause is not None:  # our own refusal from the fetcher (a size cap), wrapped by TUF's download
        if isinstance(cause, BundleError):
            return cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, tx.ExpiredMetadataError):
        return BundleError(f"{where}: the signed metadata has expired ({exc}); now is {time.strftime('%Y-%m-%d')}",
                           "ask for a freshly signed bundle (`builder bundle create`), or correct this machine's clock")
    if isinstance(exc, tx.BadVersionNumberError):
        return BundleError(f"{where}: version older than what this appliance already trusts ({exc}): "
                           "a replayed or downgraded bundle", "install a newer bundle; a deliberate downgrade "
                                                              "needs --allow-downgrade")
    if isinstance(exc, tx.UnsignedMetadataError):
        return BundleError(f"{where}: signature check failed ({exc})", "the bundle was not signed with keys this "
                           "appliance trusts (below threshold, unknown or retired key) or was altered after signing")
    if isinstance(exc, tx.DownloadHTTPError):
        return BundleError(f"{exc}; the directory is not a complete bundle",
                           "copy the whole bundle again (metadata/ and targets/)")
    if isinstance(exc, tx.DownloadLengthMismatchError):
        return BundleError(f"{where}: longer than the signed length ({exc})", "the bundle is damaged or altered")
    if isinstance(exc, (tx.LengthOrHashMismatchError, tx.RepositoryError)):
        return BundleError(f"{where}: refused by the signed metadata ({exc})", "the bundle is damaged or altered "
                           "(or mixes files from two bundles); rebuild it with `builder bundle create`")
    if isinstance(exc, DeserializationError):
        return BundleError(f"{where}: malformed metadata ({exc})", "the bundle is damaged; copy it again")
    return BundleError(f"{where}: {exc}", "copy the bundle again")


def _refresh(home: Path, source: Path, metadata_dir: Path) -> Verified:
    """TUF's client workflow against the bundle directory; metadata_dir must hold the trusted state."""
    from tuf.api import exceptions as tx
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError
    from tuf.ngclient import Updater, UpdaterConfig

    if not (source / "metadata").is_dir():
        raise BundleError(f"{source}: no metadata/ folder; not an update bundle",
                          "give the directory written by `builder bundle create` (the stick's mount point)")
    seen: list[str] = []
    try:
        updater = Updater(str(metadata_dir), _URL + "metadata/", fetcher=_fetcher(source, seen),
                          config=UpdaterConfig(targets_max_length=10_000_000),
                          bootstrap=_trusted_root_bytes(home))
        updater.refresh()
    except (tx.RepositoryError, tx.DownloadError, DeserializationError) as exc:
        raise _translate(exc, seen) from exc
    targets_md = Metadata.from_file(str(metadata_dir / "targets.json"))
    targets = targets_md.signed.targets
    if len(targets) > _MAX_TARGETS:
        raise BundleError(f"the bundle lists {len(targets)} files", "this is not a bundle the builder writes")
    for name in targets:
        _safe_target_name(name)
    for required in (MANIFEST_NAME, BUNDLE_NAME):
        if required not in targets:
            raise BundleError(f"the signed metadata lists no {required}", "rebuild the bundle with "
                              "`builder bundle create`")
    return Verified(source=source, version=targets_md.signed.version, targets=dict(targets),
                    metadata_dir=metadata_dir)


def _stage_target(verified: Verified, name: str, dest: Path | None, on_bytes: Callable[[int], None]) -> None:
    """Stream one target from the stick into dest (None: only check it) under TUF's length/hash check."""
    from tuf.api.exceptions import LengthOrHashMismatchError

    target = verified.targets[name]
    path = verified.source / "targets" / target.get_prefixed_paths()[0]
    try:
        src = _open_regular(path)
    except FileNotFoundError:
        raise BundleError(f"{name}: missing from the bundle (targets/{target.get_prefixed_paths()[0]})",
                          "copy the complete bundle again") from None
    except OSError as exc:
        raise BundleError(f"{name}: cannot be read from the bundle ({exc.strerror})",
                          "if it is a symbolic link the bundle was altered; otherwise copy it again") from exc
    with src:
        size = os.fstat(src.fileno()).st_size
        if size != target.length:
            kind = "longer" if size > target.length else "shorter (truncated)"
            raise BundleError(f"{name}: {size} bytes, {kind} than the {target.length} signed",
                              "the bundle is damaged or altered; copy it again or rebuild it")
        out = writer = None
        try:
            if dest is not None:
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    out = _open_staged(dest)
                except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                    raise BundleError(f"{name}: cannot be staged ({exc.strerror}): two signed names collide",
                                      "this bundle was not made by `builder bundle create`; do not install it") from exc
                writer = _StagedWriter(out)
            try:
                target.verify_length_and_hashes(_Tee(src, writer, on_bytes))
            except LengthOrHashMismatchError as exc:
                raise BundleError(f"{name}: sha256 mismatch with the signed metadata ({exc})",
                                  "the bundle is damaged or altered; rebuild it with `builder bundle create`") from exc
            if writer is not None:
                writer.finish()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BundleError(f"{name}: no space left on the device while staging", "free space in "
                                  f"{dest.parent} (the bundle needs {verified.total_bytes / 1e6:.0f} MB)") from exc
            raise
        finally:
            if writer is not None:
                writer.abandon()
            if out is not None:
                out.close()


def _open_staged(dest: Path):
    return open(dest, "xb")


def _read_info(path: Path) -> BundleManifest:
    try:
        return BundleManifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"{BUNDLE_NAME}: invalid ({exc})", "rebuild the bundle with a matching builder") from exc


def _validate_reference_db(path: Path) -> None:
    import apsw

    try:
        conn = apsw.Connection(f"file:{path}?mode=ro&immutable=1",
                               flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        conn.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        result = conn.execute("PRAGMA integrity_check").fetchall()
        conn.close()
    except apsw.Error as exc:
        raise BundleError(f"{REFERENCE_DB}: not a readable SQLite database ({exc})", "rebuild the bundle") from exc
    if result != [("ok",)]:
        raise BundleError(f"{REFERENCE_DB}: integrity check failed ({result[:3]})", "rebuild the bundle")


def _mem_total_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1000
    return None


# -- state, lock, recovery -------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise BusyError(f"another install or rollback is running ({holder})",
                            "wait for it to finish, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; so does the kernel when the process is killed


def _write_state(home: Path, state: dict) -> None:
    tmp = home / f".{STATE}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, home / STATE)
    generations.fsync_dir(home)


def _step(home: Path, state: dict, step: str) -> None:
    state["step"] = step
    _write_state(home, state)
    if os.environ.get(PAUSE_ENV) == step:  # tests: hold here so the installer can be killed at this step
        marker = home / "install-paused"
        marker.write_text(step)
        deadline = time.monotonic() + 600
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _link_number(link: Path) -> int | None:
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    return int(name) if name.isdigit() else None


def _commit(home: Path, state: dict) -> None:
    """Idempotent: safe to run again after a kill at any point inside it."""
    gens = home / "generations"
    staging = Path(state["staging"])
    number = state["number"]
    final = gens / str(number)
    if (staging / "generation").is_dir() and not final.exists():
        # moving a directory to another parent rewrites its "..": the service's user (not root) needs
        # write permission on it for that moment, then it is read-only again
        moved = staging / "generation"
        moved.chmod(moved.stat().st_mode | stat.S_IWUSR)
        os.rename(moved, final)
        generations.fsync_dir(gens)
    if final.is_dir() and final.stat().st_mode & stat.S_IWUSR:  # also after a kill between the two
        final.chmod(final.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    _step(home, state, "renamed")
    if state.get("trust"):
        trust = trust_dir(home)
        md = trust / f"md-{number}"
        if not md.exists() and (staging / "tuf").is_dir():
            os.rename(staging / "tuf", md)
        if md.exists():
            generations.switch_link(trust / "metadata", md.name)
            for old in trust.glob("md-*"):
                if old != md:
                    shutil.rmtree(old)
    previous = state.get("previous")
    if _link_number(home / "current") != number:
        if previous is not None:
            generations.switch_link(home / "previous", f"generations/{previous}")
        generations.switch_current(home, number)
    _step(home, state, "switched")
    keep = {number, previous}
    for other in generations.list_generations(gens):
        if other not in keep:
            generations.remove_tree(gens / str(other))
    generations.remove_tree(staging)
    (home / STATE).unlink()
    generations.fsync_dir(home)


def recover(home: Path) -> str | None:
    """Finish or undo an install that was killed; returns what was done (None when nothing was)."""
    if not (home / STATE).exists() and not any((home / "generations").glob(".staging-*")):
        return None
    try:
        with _locked(home):
            return _recover_locked(home)
    except BusyError:
        return None  # an install is running now; it owns the state


def _recover_locked(home: Path) -> str | None:
    message = None
    path = home / STATE
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = {}
        staged = Path(state.get("staging", "/nonexistent")) / "generation"
        final = home / "generations" / str(state.get("number"))
        if state.get("step") in _COMMIT_STEPS and (staged.is_dir() or final.is_dir()):
            _commit(home, state)
            message = f"completed an interrupted install of version {state.get('version')} " \
                      f"(generation {state.get('number')})"
        else:
            message = f"removed an interrupted install of version {state.get('version', '?')} " \
                      f"(stopped at '{state.get('step', 'start')}'); the running generation was not touched"
            path.unlink()
    for stale in (home / "generations").glob(".staging-*"):
        generations.remove_tree(stale)
    return message


# -- verify, install, rollback, list ---------------------------------------------------------------

def _check_policy(home: Path, verified: Verified, security_floor: int) -> str | None:
    """None to go on, or the reason this install is a no-op."""
    current = _current_version(home)
    if current is not None and verified.version == current:
        return f"version {current} is already the running generation; nothing to do"
    if verified.downgrade:
        if verified.version < security_floor:
            raise BundleError(f"version {verified.version} is below the security floor {security_floor}",
                              "a bundle that old is never installed; install a newer one")
        verified.notes.append(f"downgrade from version {max(current or 0, trusted_version(home))} "
                              f"to {verified.version} (--allow-downgrade)")
    return None


def _current_version(home: Path) -> int | None:
    try:
        return generations.current(home).version
    except ApplianceError:
        return None


def _verified(home: Path, source: Path, workdir: Path, allow_downgrade: bool) -> Verified:
    """Refresh against the trusted metadata; an older bundle is a replay unless a downgrade is allowed,
    in which case it is checked from the trusted root alone (signatures, thresholds, expiry, hashes)."""
    from tuf.api.exceptions import BadVersionNumberError

    metadata_dir = workdir / "tuf"
    trusted = trust_dir(home) / "metadata"
    if trusted.is_dir():
        shutil.copytree(trusted, metadata_dir, symlinks=True)
    else:
        metadata_dir.mkdir(parents=True)
    try:
        return _refresh(home, source, metadata_dir)
    except BundleError as exc:
        if not isinstance(exc.__cause__, BadVersionNumberError):
            raise
        older = exc
    shutil.rmtree(metadata_dir)
    metadata_dir.mkdir()
    verified = _refresh(home, source, metadata_dir)
    if verified.version == _current_version(home):
        return verified  # the running version again: reported as a no-op, never a downgrade
    if not allow_downgrade:
        raise BundleError(f"bundle version {verified.version} is older than version {trusted_version(home)}, "
                          "which this appliance already trusts: a replayed or downgraded bundle",
                          "install a newer bundle; a deliberate downgrade needs --allow-downgrade "
                          "(audited, never below the security floor)") from older
    verified.downgrade = True
    return verified


def verify(home: Path, source: Path, progress: Progress | None = None) -> Verified:
    """Check a bundle completely (metadata, every target's length and hash, the GGUF's structure)
    without installing it; the trusted state is not changed."""
    import tempfile

    source = source.resolve()
    gens = home / "generations"
    gens.mkdir(parents=True, exist_ok=True)
    # Beside the generations (same filesystem, and cleaned by `recover` if this process is killed).
    with tempfile.TemporaryDirectory(prefix=".staging-verify-", dir=gens) as tmp:
        verified = _verified(home, source, Path(tmp), allow_downgrade=True)
        if verified.downgrade:
            verified.notes.append(f"older than version {trusted_version(home)}: installing it needs "
                                  "--allow-downgrade")
        _copy_all(verified, None, progress)  # hashed in place: nothing is written
        _validate(verified, lambda name: verified.source / "targets" / verified.targets[name].get_prefixed_paths()[0])
    return verified


def _copy_all(verified: Verified, dest: Path | None, progress: Progress | None,
              after_first: Callable[[], None] | None = None) -> None:
    total = verified.total_bytes
    done = reported = 0
    name = ""

    def on_bytes(n: int) -> None:
        nonlocal done, reported
        done += n
        if progress and done - reported >= _PROGRESS_EVERY:
            reported = done
            progress(name, done, total)

    for i, name in enumerate(sorted(verified.targets, key=lambda n: (n != BUNDLE_NAME, n))):
        _stage_target(verified, name, None if dest is None else dest / name, on_bytes)
        if progress:
            progress(name, done, total)
        if i == 0 and after_first:
            after_first()


def _check_generation(verified: Verified, manifest_path: Path) -> GenerationManifest:
    """The generation's own manifest agrees with the signed metadata: the same files, each with the
    length and sha256 TUF checked while copying (so nothing is hashed twice)."""
    try:
        manifest = GenerationManifest.model_validate_json(manifest_path.read_bytes())
    except ValueError as exc:
        raise BundleError(f"{MANIFEST_NAME}: invalid ({exc})", "rebuild the bundle with a matching builder") from exc
    if manifest.format != FORMAT_VERSION:
        raise BundleError(f"{MANIFEST_NAME}: format {manifest.format}, this appliance reads {FORMAT_VERSION}",
                          "rebuild the bundle with a matching builder")
    signed = set(verified.targets) - {MANIFEST_NAME, BUNDLE_NAME, REFERENCE_DB}
    listed = set(manifest.files)
    for required in (manifest.model.file, manifest.chat_template):
        if required not in listed:
            raise BundleError(f"{MANIFEST_NAME} does not list {required}", "rebuild the bundle")
    if signed != listed:
        raise BundleError(f"the signed files and the generation's manifest differ "
                          f"(signed only: {sorted(signed - listed)}, listed only: {sorted(listed - signed)})",
                          "rebuild the bundle with `builder bundle create`")
    for name, entry in manifest.files.items():
        target = verified.targets[name]
        if (entry.size, entry.sha256) != (target.length, target.hashes.get("sha256")):
            raise BundleError(f"{name}: the generation's manifest and the signed metadata disagree",
                              "rebuild the bundle with `builder bundle create`")
    return manifest


def _validate(verified: Verified, path_of: Callable[[str], Path]) -> GenerationManifest:
    """bundle.json, the generation's manifest, the GGUF's structure and reference.db, read from
    `path_of(name)`: the staged copy when installing, the stick itself when only verifying."""
    verified.info = _read_info(path_of(BUNDLE_NAME))
    if verified.info.version != verified.version:
        raise BundleError(f"{BUNDLE_NAME} says version {verified.info.version}, the signed metadata "
                          f"{verified.version}", "rebuild the bundle with `builder bundle create`")
    if verified.info.generation != verified.targets[MANIFEST_NAME].hashes.get("sha256"):
        raise BundleError(f"{BUNDLE_NAME} names another generation than the one signed",
                          "rebuild the bundle with `builder bundle create`")
    manifest = _check_generation(verified, path_of(MANIFEST_NAME))
    modelfile.validate(path_of(manifest.model.file))  # before llama.cpp ever parses it
    if REFERENCE_DB in verified.targets:
        _validate_reference_db(path_of(REFERENCE_DB))
    return manifest


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
        return Installed(version=self.version, generation=self.number, message=self.message, downgrade=self.downgrade,
                         health=self.health, bundle=self.info, recovered=self.recovered)


def install(home: Path, source: Path, prepare: Prepare | None = None, *, allow_downgrade: bool = False,
            security_floor: int = 0, progress: Progress | None = None) -> InstallResult:
    """Verify and install a bundle; see the module docstring for the steps."""
    source = source.resolve()
    if not source.is_dir():
        raise BundleError(f"{source}: not a directory", "give the bundle's directory (the stick's mount point)")
    gens = home / "generations"
    with _locked(home):
        recovered = _recover_locked(home)
        gens.mkdir(parents=True, exist_ok=True)
        number = max(generations.list_generations(gens), default=0) + 1
        staging = gens / f".staging-{number}"
        state = {"pid": os.getpid(), "source": str(source), "staging": str(staging), "number": number,
                 "previous": _link_number(home / "current"), "step": "start"}
        _write_state(home, state)
        try:
            staging.mkdir()
            _step(home, state, "refresh")
            verified = _verified(home, source, staging, allow_downgrade)
            state["version"] = verified.version
            noop = _check_policy(home, verified, security_floor)
            if noop:
                _abandon(home, staging)
                return InstallResult(verified.version, None, noop, recovered=recovered)
            free = shutil.disk_usage(gens).free
            if verified.total_bytes + _SPACE_MARGIN > free:
                raise BundleError(f"the bundle needs {verified.total_bytes / 1e6:.0f} MB and {gens} has "
                                  f"{free / 1e6:.0f} MB free", "free space (an old generation can go with "
                                                               "`appliance bundle rollback` then a new install)")
            _step(home, state, "copy")
            _copy_all(verified, staging / "generation", progress,
                      after_first=lambda: _step(home, state, "copying"))
            _step(home, state, "validate")
            manifest = _validate(verified, lambda name: staging / "generation" / name)
            ram = _mem_total_mb()
            if ram is not None and verified.info.min_ram_mb > ram:
                raise BundleError(f"the model needs {verified.info.min_ram_mb} MB of memory; this machine has {ram} MB",
                                  "install it on a larger machine, or have the builder export a smaller quantization")
            _step(home, state, "health")
            health = prepare(staging / "generation", manifest, verified.info) if prepare else {}
            generations.make_read_only(staging / "generation")
            state["trust"] = not verified.downgrade  # a downgrade never lowers what is trusted
            _step(home, state, "commit")
            _commit(home, state)
        except BaseException:
            if state.get("step") in _COMMIT_STEPS:
                raise  # verified and prepared: the next start completes it
            _abandon(home, staging)
            raise
    return InstallResult(verified.version, number, f"installed version {verified.version} as generation {number}",
                         info=verified.info, downgrade=verified.downgrade, health=health, recovered=recovered)


def _abandon(home: Path, staging: Path) -> None:
    generations.remove_tree(staging)
    with contextlib.suppress(FileNotFoundError):
        (home / STATE).unlink()


def rollback(home: Path) -> tuple[int, int]:
    """Make the previous generation current again; returns (from, to)."""
    with _locked(home):
        _recover_locked(home)
        current = _link_number(home / "current")
        previous = _link_number(home / "previous")
        if previous is None or not (home / "generations" / str(previous)).is_dir():
            raise BundleError("there is no previous generation to return to",
                              "`appliance bundle list` shows what is installed")
        generations.current(home)  # the current link must be sound before it is replaced
        generations.switch_current(home, previous)
        generations.switch_link(home / "previous", None)
        return current, previous


def history(home: Path) -> list[dict]:
    """Installed generations, newest first, with their bundle version and state."""
    current = _link_number(home / "current")
    previous = _link_number(home / "previous")
    rows = []
    for number in reversed(generations.list_generations(home / "generations")):
        path = home / "generations" / str(number)
        row = {"generation": number, "current": number == current, "previous": number == previous,
               "installed": utc_stamp(path.stat().st_mtime),
               "signed": (path / BUNDLE_NAME).is_file(), "version": None, "name": None}
        with contextlib.suppress(ApplianceError, ValueError, OSError):
            m = read_manifest(path)
            row.update(name=m.name, model=m.model.name, quant=m.model.quant)
        with contextlib.suppress(ValueError, OSError):
            info = read_bundle(path)
            if info is not None:
                gate = (info.evaluation or {}).get("gate")
                row.update(version=info.version, created=info.created,
                           gate=None if gate is None else gate.get("passed"))
        rows.append(row)
    return rows
