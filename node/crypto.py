"""Keys, addresses and canonical message signatures (PROTOCOL.md: identities, signatures).

Every key is ed25519 (pynacl). An SP holds one key per role (:data:`ROLES`). An address is
``"0x"`` + the lowercase hex of the last 20 bytes of SHA-256 over the 32-byte public key.

Key files hold the 32-byte seed as 64 lowercase hex characters and a newline. They are created
with mode 0600 by an exclusive, atomic write (temporary file in the same folder, ``fsync``,
``link`` into place, so an existing key is never overwritten), and a key file that group or
others may read is refused on load.

Signed messages are msgpack maps whose keys appear in a fixed order, ``type`` first and ``sig``
last; the signed bytes are the encoding of the same map with ``sig`` set to ``b""``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing

from node.errors import KeyFileError, SignatureError

ROLES: tuple[str, ...] = ("operator", "approval", "seal", "gc", "p2p")
SIG_FIELD = "sig"
SIG_LEN = 64


def address_of(public_key: bytes) -> str:
    """The address of a 32-byte ed25519 public key: 0x + hex(sha256(pk)[-20:])."""
    if len(public_key) != 32:
        raise ValueError(f"an ed25519 public key has 32 bytes, not {len(public_key)}")
    return "0x" + hashlib.sha256(public_key).digest()[-20:].hex()


def is_address(value: object) -> bool:
    """True for a well-formed address string (0x + 40 lowercase hex digits)."""
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
        return False
    return all(c in "0123456789abcdef" for c in value[2:])


class PrivateKey:
    """An ed25519 signing key. Its repr and str never show the secret."""

    __slots__ = ("_address", "_sk")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an ed25519 seed has 32 bytes")
        self._sk = nacl.signing.SigningKey(seed)
        self._address: str | None = None

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_passphrase(cls, passphrase: str, role: str) -> PrivateKey:
        """A deterministic key for ``role`` derived from ``passphrase`` (testnets: fixed ids)."""
        return cls(hashlib.sha256(f"gfsp-key-v1:{passphrase}:{role}".encode()).digest())

    @property
    def public_key(self) -> bytes:
        return bytes(self._sk.verify_key)

    @property
    def address(self) -> str:
        if self._address is None:  # a SHA-256 each time otherwise (every signed message)
            self._address = address_of(self.public_key)
        return self._address

    def seed_bytes(self) -> bytes:
        """The 32-byte secret seed (for the key file and the libp2p host key only)."""
        return bytes(self._sk)

    def sign(self, data: bytes) -> bytes:
        return self._sk.sign(data).signature

    def __repr__(self) -> str:
        return f"PrivateKey(address={self.address})"

    __str__ = __repr__


def verify(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is ``public_key``'s over ``data``."""
    if len(signature) != SIG_LEN:
        raise SignatureError(f"signature has {len(signature)} bytes, expected {SIG_LEN}")
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise SignatureError("bad signature") from exc


# --- canonical msgpack ----------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """The one msgpack encoding used on the wire and for signing (bin for bytes, str for str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, max_len: int | None = None) -> Any:
    """Decode msgpack strictly: no ext types, no floats smuggled as ints, str keys only."""
    if max_len is not None and len(data) > max_len:
        raise SignatureError(f"msgpack data has {len(data)} bytes, more than {max_len}")
    try:
        # (unpackb has no max_buffer_size: that is an Unpacker option; the length is checked
        # above.)
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               object_pairs_hook=_map_without_repeats)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise SignatureError(f"undecodable msgpack: {exc}") from exc


def _map_without_repeats(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A decoded map; a key that comes twice is an error (a dict would keep the last one, so
    one signed message would have several encodings, one of them not ending in ``sig``)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a map has a key more than once")
    return out


def signing_bytes(message: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the map with ``sig`` set to ``b""``, keys in order."""
    keys = list(message)
    if not keys or keys[-1] != SIG_FIELD:
        raise SignatureError(f"a signed message's last key must be {SIG_FIELD!r}")
    unsigned = dict(message)
    unsigned[SIG_FIELD] = b""
    return pack(unsigned)


def sign_message(key: PrivateKey, message: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``message`` (ending in ``sig``) with ``sig`` filled in."""
    signed = dict(message)
    signed[SIG_FIELD] = key.sign(signing_bytes(message))
    return signed


def verify_message(public_key: bytes, message: Mapping[str, Any]) -> None:
    """Verify a decoded signed map against ``public_key``; raise :class:`SignatureError`."""
    sig = message.get(SIG_FIELD)
    if not isinstance(sig, bytes):
        raise SignatureError("missing or non-bytes signature")
    verify(public_key, signing_bytes(message), sig)


def check_shape(message: Mapping[str, Any], schema: Iterable[tuple[str, type | tuple[type, ...]]],
                *, what: str) -> None:
    """Check that ``message`` has exactly the schema's keys, in order, of the listed types.

    ``bool`` is never accepted where ``int`` is listed (msgpack keeps them apart; so do we).
    """
    schema = list(schema)
    keys = list(message)
    names = [name for name, _ in schema]
    if keys != names:
        raise SignatureError(f"{what}: keys {keys} differ from {names}")
    for name, typ in schema:
        value = message[name]
        if isinstance(value, bool) and (typ is int or (
                isinstance(typ, tuple) and int in typ and bool not in typ)):
            raise SignatureError(f"{what}: {name} must be int, got bool")
        if not isinstance(value, typ):
            raise SignatureError(f"{what}: {name} has type {type(value).__name__}")


# --- key files ------------------------------------------------------------------------------


def _check_mode(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others read the key; "
            f"run 'chmod 600 {path}'"
        )


def write_key_file(path: Path, key: PrivateKey) -> None:
    """Create ``path`` with mode 0600 holding ``key``; never overwrite an existing file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.seed_bytes().hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from exc
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_key_file(path: Path, *, check_mode: bool = True) -> PrivateKey:
    """Load a key file, refusing one that group or others may read."""
    try:
        if check_mode:
            _check_mode(path)
        text = path.read_text().strip()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: key file not found") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
    try:
        seed = bytes.fromhex(text)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a hex-encoded ed25519 seed") from exc
    if len(seed) != 32:
        raise KeyFileError(f"{path}: seed has {len(seed)} bytes, expected 32")
    return PrivateKey(seed)


@dataclass(frozen=True, repr=False)
class KeySet:
    """One key per SP role. Only the signer modular should hold on to this."""

    operator: PrivateKey
    approval: PrivateKey
    seal: PrivateKey
    gc: PrivateKey
    p2p: PrivateKey

    def __repr__(self) -> str:
        return f"KeySet(operator={self.operator.address})"

    def addresses(self) -> dict[str, str]:
        return {role: getattr(self, role).address for role in ROLES}

    def public_keys(self) -> dict[str, bytes]:
        return {role: getattr(self, role).public_key for role in ROLES}


def key_file_name(role: str) -> str:
    return f"{role}.key"


def create_keys(keys_dir: Path, *, passphrase: str | None = None) -> KeySet:
    """Create every role's key file in ``keys_dir`` (mode 0700); deterministic with a passphrase."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    keys: dict[str, PrivateKey] = {}
    for role in ROLES:
        key = (PrivateKey.from_passphrase(passphrase, role) if passphrase is not None
               else PrivateKey.generate())
        write_key_file(keys_dir / key_file_name(role), key)
        keys[role] = key
    return KeySet(**keys)


def load_keys(keys_dir: Path, *, credentials_dir: Path | None = None) -> KeySet:
    """Load every role's key, from systemd's ``$CREDENTIALS_DIRECTORY`` when given.

    systemd's credentials are private to the service (read-only, its own mount), so their mode
    is checked the same way.
    """
    base = credentials_dir if credentials_dir is not None else keys_dir
    return KeySet(**{role: read_key_file(base / key_file_name(role)) for role in ROLES})
