"""The appliance's own signing key (ed25519): what it signs leaves the site as its word.

Created once, at provisioning (`appliance trust init`, or the first feedback export on an appliance
provisioned before keys existed), in `<home>/identity/`: `appliance.key` (PKCS#8 PEM, 0600, in a
0700 directory) and `appliance.pub` (the public key to hand to the builder's `--trust`). The key id
is the first 16 hex digits of the sha256 of the raw public key; `appliance status` shows it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.errors import ConfigError

PRIVATE = "appliance.key"
PUBLIC = "appliance.pub"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public(pem: bytes | str, where: str = "public key") -> Ed25519PublicKey:
    """An ed25519 public key from PEM; ConfigError naming `where` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a PEM public key ({exc})", "give the appliance.pub file") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: not an ed25519 key", "give the appliance.pub file")
    return key


@dataclass
class Identity:
    key_id: str
    public_pem: str
    path: Path
    _private: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def public(self) -> Ed25519PublicKey:
        return load_public(self.public_pem, str(self.path / PUBLIC))

    def _key(self) -> Ed25519PrivateKey:
        if self._private is None:  # read on first use: every audit row is signed
            self._private = serialization.load_pem_private_key(
                (self.path / PRIVATE).read_bytes(), password=None
            )
        return self._private

    @functools.cached_property
    def own_public(self) -> Ed25519PublicKey:
        """The private key's own public half: what the appliance checks its own signatures with."""
        return self._key().public_key()

    def matches_private(self) -> bool:
        """Whether appliance.pub is the public half of appliance.key (a replaced .pub would let
        checkpoints signed by another key pass)."""
        return public_pem(self.own_public) == self.public_pem

    def sign(self, data: bytes) -> str:
        """A base64 ed25519 signature of `data`."""
        return base64.b64encode(self._key().sign(data)).decode()


def verify(public: Ed25519PublicKey, data: bytes, signature_b64: str) -> bool:
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data)
        return True
    except (InvalidSignature, ValueError):
        return False


def load(home: Path) -> Identity | None:
    directory = home / "identity"
    if not (directory / PRIVATE).is_file() or not (directory / PUBLIC).is_file():
        return None
    public = load_public((directory / PUBLIC).read_bytes(), str(directory / PUBLIC))
    return Identity(key_id(public), public_pem(public), directory)


def ensure(home: Path) -> tuple[Identity, bool]:
    """(the identity, whether it was created now)."""
    import fcntl

    existing = load(home)
    if existing is not None:
        return existing, False
    directory = home / "identity"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:  # two processes needing a key at once make one
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = load(home)
        if existing is not None:
            return existing, False
        return _create(home, directory), True


def _create(home: Path, directory: Path) -> Identity:
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = directory / f".{PRIVATE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    (directory / PUBLIC).write_text(public_pem(private.public_key()))
    os.replace(tmp, directory / PRIVATE)  # last: a half-made identity is never loaded
    identity = load(home)
    assert identity is not None
    return identity
