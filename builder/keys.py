"""Signing keys for update bundles: TUF's four top-level roles, ed25519, in one directory.

    root.json                   the newest root metadata; copy it to each appliance (`appliance trust init`)
    metadata/<N>.root.json      every root version; bundles carry them so an appliance can walk a rotation
    private/<role>.<keyid>.pem  PKCS#8 private keys (encrypted when a passphrase was given)
    retired/<role>.<keyid>.pem  keys rotated out: no longer trusted by new roots, kept for the record
    signed.json                 the bundle versions signed with these keys (versions never go back)

`init` writes a root that trusts `keys` keys for root and targets with `threshold` signatures required
(the offline roles), and one key each for snapshot and timestamp. `rotate` replaces every key of a role
and writes the next root version, signed by the old root's keys (and the new ones when root rotates),
as TUF clients require. Keep root keys offline: anyone holding `threshold` of them can re-key everything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from builder.errors import BuilderError

ROLES = ("root", "targets", "snapshot", "timestamp")
OFFLINE_ROLES = ("root", "targets")

Passphrase = Callable[[str], bytes | None]  # called with a key file's name when that key is encrypted


def _expiry(days: int) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0)


def _new_key():
    """(private key, signer) for a fresh ed25519 key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.signer import CryptoSigner

    private = Ed25519PrivateKey.generate()
    return private, CryptoSigner(private)


def _write_private(path: Path, private, passphrase: bytes | None) -> None:
    from cryptography.hazmat.primitives import serialization

    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)


def _write_root(keys_dir: Path, root_md) -> None:
    from tuf.api.serialization.json import JSONSerializer

    data = root_md.to_bytes(JSONSerializer(compact=False))
    history = keys_dir / "metadata"
    history.mkdir(parents=True, exist_ok=True)
    (history / f"{root_md.signed.version}.root.json").write_bytes(data)
    tmp = keys_dir / ".root.json.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, keys_dir / "root.json")


def init(
    out: Path,
    threshold: int = 1,
    keys: int | None = None,
    expires_days: int = 1825,
    passphrase: bytes | None = None,
) -> Path:
    """A new keys directory with a self-signed root (version 1)."""
    from tuf.api.metadata import Metadata, Root

    keys = keys or threshold
    if not 1 <= threshold <= keys:
        raise BuilderError(
            f"threshold {threshold} with {keys} keys per role", "give 1 <= --threshold <= --keys"
        )
    if out.exists() and any(out.iterdir()):
        raise BuilderError(
            f"{out}: not empty; refusing to overwrite signing keys",
            "choose a new directory (existing keys are rotated with `builder keys rotate`)",
        )
    out.mkdir(parents=True, exist_ok=True)
    root = Root(expires=_expiry(expires_days), consistent_snapshot=True)
    new: dict[str, list] = {}
    for role in ROLES:
        new[role] = [_new_key() for _ in range(keys if role in OFFLINE_ROLES else 1)]
        for _, signer in new[role]:
            root.add_key(signer.public_key, role)
        root.roles[role].threshold = threshold if role in OFFLINE_ROLES else 1
    md = Metadata(root)
    for _, signer in new["root"]:
        md.sign(signer, append=True)
    for role, pairs in new.items():
        for private, signer in pairs:
            _write_private(out / "private" / f"{role}.{signer.public_key.keyid}.pem", private, passphrase)
    _write_root(out, md)
    (out / "signed.json").write_text("{}\n")
    return out / "root.json"


def load_root(keys_dir: Path):
    from tuf.api.metadata import Metadata

    path = keys_dir / "root.json"
    if not path.is_file():
        raise BuilderError(
            f"{keys_dir}: no root.json; not a keys directory", "create one with `builder keys init`"
        )
    return Metadata.from_file(str(path))


def load_signers(
    keys_dir: Path, role: str, root=None, passphrase: Passphrase | None = None, folder: str = "private"
) -> list:
    """Signers for the role's keys that the current root trusts (or, with folder="retired", any)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    trusted = set((root or load_root(keys_dir)).signed.roles[role].keyids)
    signers = []
    for path in sorted((keys_dir / folder).glob(f"{role}.*.pem")):
        keyid = path.name.split(".")[1]
        if folder == "private" and keyid not in trusted:
            continue
        data = path.read_bytes()
        secret = None
        if b"ENCRYPTED" in data.split(b"\n", 1)[0]:
            secret = passphrase(path.name) if passphrase else None
            if not secret:
                raise BuilderError(
                    f"{path}: the key is encrypted and no passphrase was given",
                    "set BUILDER_KEY_PASSPHRASE or run from a terminal to be asked",
                )
        try:
            key = load_pem_private_key(data, password=secret)
        except (ValueError, TypeError) as exc:
            raise BuilderError(
                f"{path}: cannot load the private key ({exc})",
                "check the passphrase; the file may be damaged",
            ) from exc
        signers.append(CryptoSigner(key))
    return signers


def signers_for(keys_dir: Path, role: str, root, passphrase: Passphrase | None = None) -> list:
    """At least the role's threshold of signers, or a BuilderError saying how many are missing."""
    signers = load_signers(keys_dir, role, root, passphrase)
    needed = root.signed.roles[role].threshold
    if len(signers) < needed:
        raise BuilderError(
            f"{role} needs {needed} signatures; {len(signers)} of its keys are in {keys_dir / 'private'}",
            f"bring the missing {role} key files back into that folder",
        )
    return signers


def rotate(
    keys_dir: Path,
    role: str,
    passphrase: Passphrase | None = None,
    new_passphrase: bytes | None = None,
    expires_days: int = 1825,
) -> dict:
    """Replace every key of `role` with a new one; write root version N+1 signed as TUF requires."""
    from tuf.api.metadata import Metadata

    if role not in ROLES:
        raise BuilderError(f"unknown role '{role}'", f"choose one of {', '.join(ROLES)}")
    old = load_root(keys_dir)
    old_root_signers = signers_for(keys_dir, "root", old, passphrase)
    root = Metadata.from_bytes(old.to_bytes()).signed
    old_ids = list(root.roles[role].keyids)
    new_keys = [_new_key() for _ in old_ids]
    for keyid in old_ids:
        root.revoke_key(keyid, role)
    for _, signer in new_keys:
        root.add_key(signer.public_key, role)
    root.version += 1
    root.expires = _expiry(expires_days)
    md = Metadata(root)
    md.signatures.clear()
    for signer in old_root_signers:  # the old root vouches for the new one ...
        md.sign(signer, append=True)
    if role == "root":  # ... and a new root key set must also sign its own first version
        for _, signer in new_keys:
            md.sign(signer, append=True)
    for private, signer in new_keys:
        _write_private(
            keys_dir / "private" / f"{role}.{signer.public_key.keyid}.pem", private, new_passphrase
        )
    _write_root(keys_dir, md)
    (keys_dir / "retired").mkdir(exist_ok=True)
    for keyid in old_ids:
        for path in (keys_dir / "private").glob(f"{role}.{keyid}.pem"):
            shutil.move(path, keys_dir / "retired" / path.name)
    return {
        "role": role,
        "root_version": root.version,
        "retired": old_ids,
        "new": [s.public_key.keyid for _, s in new_keys],
    }


def signed_versions(keys_dir: Path) -> dict[int, dict]:
    path = keys_dir / "signed.json"
    if not path.is_file():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def record_signed(keys_dir: Path, version: int, entry: dict) -> None:
    versions = signed_versions(keys_dir)
    versions[version] = entry
    tmp = keys_dir / ".signed.json.tmp"
    tmp.write_text(json.dumps({str(k): v for k, v in sorted(versions.items())}, indent=2) + "\n")
    os.replace(tmp, keys_dir / "signed.json")
