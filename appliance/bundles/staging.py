"""Staging a verified bundle: each target streamed from the stick into staging on the home's filesystem
while TUF checks its length and sha256 over exactly the bytes written, then the generation's own
manifest, the GGUF's structure and the reference database checked before anything loads them."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from appliance.bundles import modelfile
from appliance.bundles.manifest import (
    BUNDLE_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    REFERENCE_DB,
    BundleManifest,
    GenerationManifest,
)
from appliance.bundles.trust import Verified, open_regular
from appliance.errors import BundleError

SPACE_MARGIN = 64 << 20


_PROGRESS_EVERY = 64 << 20


_SYNC_EVERY = 64 << 20


Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes total)


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


def _stage_target(verified: Verified, name: str, dest: Path | None, on_bytes: Callable[[int], None]) -> None:
    """Stream one target from the stick into dest (None: only check it) under TUF's length/hash check."""
    from tuf.api.exceptions import LengthOrHashMismatchError

    target = verified.targets[name]
    path = verified.source / "targets" / target.get_prefixed_paths()[0]
    try:
        src = open_regular(path)
    except FileNotFoundError:
        raise BundleError(
            f"{name}: missing from the bundle (targets/{target.get_prefixed_paths()[0]})",
            "copy the complete bundle again",
        ) from None
    except OSError as exc:
        raise BundleError(
            f"{name}: cannot be read from the bundle ({exc.strerror})",
            "if it is a symbolic link the bundle was altered; otherwise copy it again",
        ) from exc
    with src:
        size = os.fstat(src.fileno()).st_size
        if size != target.length:
            kind = "longer" if size > target.length else "shorter (truncated)"
            raise BundleError(
                f"{name}: {size} bytes, {kind} than the {target.length} signed",
                "the bundle is damaged or altered; copy it again or rebuild it",
            )
        out = writer = None
        try:
            if dest is not None:
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    out = _open_staged(dest)
                except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                    raise BundleError(
                        f"{name}: cannot be staged ({exc.strerror}): two signed names collide",
                        "this bundle was not made by `builder bundle create`; do not install it",
                    ) from exc
                writer = _StagedWriter(out)
            try:
                target.verify_length_and_hashes(_Tee(src, writer, on_bytes))
            except LengthOrHashMismatchError as exc:
                raise BundleError(
                    f"{name}: sha256 mismatch with the signed metadata ({exc})",
                    "the bundle is damaged or altered; rebuild it with `builder bundle create`",
                ) from exc
            if writer is not None:
                writer.finish()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise BundleError(
                    f"{name}: no space left on the device while staging",
                    f"free space in {dest.parent} (the bundle needs {verified.total_bytes / 1e6:.0f} MB)",
                ) from exc
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
        raise BundleError(
            f"{BUNDLE_NAME}: invalid ({exc})", "rebuild the bundle with a matching builder"
        ) from exc


def _validate_reference_db(path: Path) -> None:
    import apsw

    try:
        conn = apsw.Connection(
            f"file:{path}?mode=ro&immutable=1", flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
        )
        conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
        conn.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
        result = conn.execute("PRAGMA integrity_check").fetchall()
        conn.close()
    except apsw.Error as exc:
        raise BundleError(
            f"{REFERENCE_DB}: not a readable SQLite database ({exc})", "rebuild the bundle"
        ) from exc
    if result != [("ok",)]:
        raise BundleError(f"{REFERENCE_DB}: integrity check failed ({result[:3]})", "rebuild the bundle")


def mem_total_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1000
    return None


def copy_all(
    verified: Verified,
    dest: Path | None,
    progress: Progress | None,
    after_first: Callable[[], None] | None = None,
) -> None:
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
        raise BundleError(
            f"{MANIFEST_NAME}: invalid ({exc})", "rebuild the bundle with a matching builder"
        ) from exc
    if manifest.format != FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_NAME}: format {manifest.format}, this appliance reads {FORMAT_VERSION}",
            "rebuild the bundle with a matching builder",
        )
    signed = set(verified.targets) - {MANIFEST_NAME, BUNDLE_NAME, REFERENCE_DB}
    listed = set(manifest.files)
    for required in (manifest.model.file, manifest.chat_template):
        if required not in listed:
            raise BundleError(f"{MANIFEST_NAME} does not list {required}", "rebuild the bundle")
    if signed != listed:
        raise BundleError(
            f"the signed files and the generation's manifest differ "
            f"(signed only: {sorted(signed - listed)}, listed only: {sorted(listed - signed)})",
            "rebuild the bundle with `builder bundle create`",
        )
    for name, entry in manifest.files.items():
        target = verified.targets[name]
        if (entry.size, entry.sha256) != (target.length, target.hashes.get("sha256")):
            raise BundleError(
                f"{name}: the generation's manifest and the signed metadata disagree",
                "rebuild the bundle with `builder bundle create`",
            )
    return manifest


def validate(verified: Verified, path_of: Callable[[str], Path]) -> GenerationManifest:
    """bundle.json, the generation's manifest, the GGUF's structure and reference.db, read from
    `path_of(name)`: the staged copy when installing, the stick itself when only verifying."""
    verified.info = _read_info(path_of(BUNDLE_NAME))
    if verified.info.version != verified.version:
        raise BundleError(
            f"{BUNDLE_NAME} says version {verified.info.version}, the signed metadata {verified.version}",
            "rebuild the bundle with `builder bundle create`",
        )
    if verified.info.generation != verified.targets[MANIFEST_NAME].hashes.get("sha256"):
        raise BundleError(
            f"{BUNDLE_NAME} names another generation than the one signed",
            "rebuild the bundle with `builder bundle create`",
        )
    manifest = _check_generation(verified, path_of(MANIFEST_NAME))
    modelfile.validate(path_of(manifest.model.file))  # before llama.cpp ever parses it
    if REFERENCE_DB in verified.targets:
        _validate_reference_db(path_of(REFERENCE_DB))
    return manifest
