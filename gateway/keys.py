"""The gateway's Ed25519 signing keys: one PEM file per key in a folder, file stem = ``kid``.

Rotation is by adding a key: files sort by name (generated kids are ``k<UTC timestamp>``), the
last one signs new tokens, and every key in the folder is published in the JWKS so tokens
signed by a previous key keep verifying until they expire. Remove a file to withdraw a key.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.errors import ConfigurationError
from common.tokens import KeySet

__all__ = ["SigningKeys", "generate_key", "load_signing_keys"]

_KID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class SigningKeys:
    kid: str
    private: Ed25519PrivateKey
    public: KeySet


def generate_key(folder: Path, *, now: dt.datetime | None = None) -> Path:
    """Write a new key (mode 0600, atomically) into ``folder``; it becomes the signing key."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S%f")
    path = folder / f"k{stamp}.pem"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_signing_keys(folder: Path, *, create: bool = True) -> SigningKeys:
    """The keys in ``folder`` (generating one if it is empty and ``create``)."""
    files = sorted(folder.glob("*.pem")) if folder.is_dir() else []
    if not files:
        if not create:
            raise ConfigurationError(f"no signing keys in {folder}", field="keys_dir")
        files = [generate_key(folder)]
    keys: dict[str, Ed25519PrivateKey] = {}
    for path in files:
        if not _KID.fullmatch(path.stem):
            raise ConfigurationError(
                f"key file name {path.name!r} is not a valid kid", field="keys_dir"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigurationError(
                f"cannot load signing key {path.name}: {type(exc).__name__}", field="keys_dir"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"{path.name} is not an Ed25519 key", field="keys_dir")
        keys[path.stem] = key
    kid = files[-1].stem
    return SigningKeys(
        kid=kid,
        private=keys[kid],
        public=KeySet({k: v.public_key() for k, v in keys.items()}),
    )
