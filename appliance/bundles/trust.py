"""Trust in bundles: the root provisioned on the appliance, and TUF's refresh of a bundle's signed
metadata from the stick (the only module that speaks TUF). `$APPLIANCE_HOME/trust/` holds `root.json`
as provisioned by `trust_init`, and `metadata` -> `md-<n>/`, the metadata TUF trusted at the last
install, which is what makes an older bundle a refused replay."""

from __future__ import annotations

import io
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from appliance.bundles import generations
from appliance.bundles.manifest import (
    BUNDLE_NAME,
    MANIFEST_NAME,
    BundleManifest,
)
from appliance.errors import ApplianceError, BundleError
from appliance.schemas import BundleCheck, BundleInfo

_URL = "bundle:///"


_BLOCK = 1 << 20


_MAX_TARGETS = 10_000


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
        if self.info is None:  # verify reads bundle.json before it reports
            raise BundleError(
                f"{self.source}: no bundle.json was read", "rebuild the bundle with `builder bundle create`"
            )
        return BundleCheck(
            version=self.version,
            files=len(self.targets),
            targets=sorted(self.targets),
            bytes=self.total_bytes,
            notes=self.notes,
            bundle=BundleInfo.model_validate(self.info.model_dump()),
        )


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
    raise BundleError(
        f"{trust}: no trusted root; this appliance cannot verify bundles yet",
        "provision it once with `appliance trust init ROOT_JSON` (root.json from `builder keys init`)",
    )


def trust_init(home: Path, root_json: Path, force: bool = False) -> dict:
    """Provision the trusted root; refuses to replace one unless `force` (the caller audits it)."""
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata, Root
    from tuf.api.serialization import DeserializationError

    data = root_json.read_bytes()
    try:
        md = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise BundleError(
            f"{root_json}: not TUF metadata ({exc})", "give the root.json written by `builder keys init`"
        ) from exc
    if not isinstance(md.signed, Root):
        raise BundleError(
            f"{root_json}: {md.signed.type} metadata, not root", "give the keys directory's root.json"
        )
    try:
        md.verify_delegate(Root.type, md)
    except UnsignedMetadataError as exc:
        raise BundleError(
            f"{root_json}: not signed by its own root keys ({exc})",
            "the file was altered; copy root.json from the keys directory again",
        ) from exc
    if md.signed.is_expired():
        raise BundleError(
            f"{root_json}: expired on {md.signed.expires:%Y-%m-%d}",
            "rotate or renew the root with `builder keys rotate --role root`",
        )
    trust = trust_dir(home)
    replaced = (trust / "root.json").is_file()
    if replaced and not force:
        raise BundleError(
            f"{trust / 'root.json'} already holds a trusted root; replacing it would let other keys "
            "install models",
            "pass --force if you mean to re-provision (it is audited)",
        )
    trust.mkdir(parents=True, exist_ok=True)
    tmp = trust / ".root.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, trust / "root.json")
    # What was trusted under the old root no longer counts.
    generations.switch_link(trust / "metadata", None)
    for stale in trust.glob("md-*"):
        shutil.rmtree(stale)
    return {
        "root_version": md.signed.version,
        "expires": md.signed.expires.isoformat(),
        "replaced": replaced,
        "keyids": {role: sorted(r.keyids) for role, r in md.signed.roles.items()},
        "thresholds": {role: r.threshold for role, r in md.signed.roles.items()},
    }


def trusted_version(home: Path) -> int:
    """The newest bundle version this appliance's trusted metadata has seen (0 before any)."""
    from tuf.api.metadata import Metadata

    path = trust_dir(home) / "metadata" / "timestamp.json"
    return Metadata.from_file(str(path)).signed.version if path.is_file() else 0


def open_regular(path: Path) -> io.BufferedReader:
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
                fh = open_regular(root / "metadata" / name)
            except FileNotFoundError:
                raise DownloadHTTPError(f"metadata/{name} is not in the bundle", 404) from None
            role = name.removesuffix(".json").rpartition(".")[2]
            size, cap = os.fstat(fh.fileno()).st_size, MAX_METADATA_BYTES.get(role, 1_000_000)
            if size > cap:
                fh.close()
                raise BundleError(
                    f"metadata/{name} is {size / 1e6:.1f} MB; at most {cap / 1e6:.1f} MB is read, "
                    "signed or not",
                    "this is not metadata the builder writes; do not install it",
                )

            def chunks() -> Iterator[bytes]:
                with fh:
                    while block := fh.read(_BLOCK):
                        yield block

            return chunks()

    return StickFetcher()


def _safe_target_name(name: str) -> None:
    p = PurePosixPath(name)
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or p.is_absolute()
        or name != p.as_posix()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise BundleError(
            f"target name {name!r} is unsafe (absolute, '..', NUL or not normalised)",
            "this bundle was not made by `builder bundle create`; do not install it",
        )


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
        return BundleError(
            f"{where}: the signed metadata has expired ({exc}); now is {time.strftime('%Y-%m-%d')}",
            "ask for a freshly signed bundle (`builder bundle create`), or correct this machine's clock",
        )
    if isinstance(exc, tx.BadVersionNumberError):
        return BundleError(
            f"{where}: version older than what this appliance already trusts ({exc}): "
            "a replayed or downgraded bundle",
            "install a newer bundle; a deliberate downgrade needs --allow-downgrade",
        )
    if isinstance(exc, tx.UnsignedMetadataError):
        return BundleError(
            f"{where}: signature check failed ({exc})",
            "the bundle was not signed with keys this "
            "appliance trusts (below threshold, unknown or retired key) or was altered after signing",
        )
    if isinstance(exc, tx.DownloadHTTPError):
        return BundleError(
            f"{exc}; the directory is not a complete bundle",
            "copy the whole bundle again (metadata/ and targets/)",
        )
    if isinstance(exc, tx.DownloadLengthMismatchError):
        return BundleError(
            f"{where}: longer than the signed length ({exc})", "the bundle is damaged or altered"
        )
    if isinstance(exc, (tx.LengthOrHashMismatchError, tx.RepositoryError)):
        return BundleError(
            f"{where}: refused by the signed metadata ({exc})",
            "the bundle is damaged or altered "
            "(or mixes files from two bundles); rebuild it with `builder bundle create`",
        )
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
        raise BundleError(
            f"{source}: no metadata/ folder; not an update bundle",
            "give the directory written by `builder bundle create` (the stick's mount point)",
        )
    seen: list[str] = []
    try:
        updater = Updater(
            str(metadata_dir),
            _URL + "metadata/",
            fetcher=_fetcher(source, seen),
            config=UpdaterConfig(targets_max_length=10_000_000),
            bootstrap=_trusted_root_bytes(home),
        )
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
            raise BundleError(
                f"the signed metadata lists no {required}", "rebuild the bundle with `builder bundle create`"
            )
    return Verified(
        source=source, version=targets_md.signed.version, targets=dict(targets), metadata_dir=metadata_dir
    )


def current_version(home: Path) -> int | None:
    try:
        return generations.current(home).version
    except ApplianceError:
        return None


def trusted_bundle(home: Path, source: Path, workdir: Path, allow_downgrade: bool) -> Verified:
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
    if verified.version == current_version(home):
        return verified  # the running version again: reported as a no-op, never a downgrade
    if not allow_downgrade:
        raise BundleError(
            f"bundle version {verified.version} is older than version {trusted_version(home)}, "
            "which this appliance already trusts: a replayed or downgraded bundle",
            "install a newer bundle; a deliberate downgrade needs --allow-downgrade "
            "(audited, never below the security floor)",
        ) from older
    verified.downgrade = True
    return verified
