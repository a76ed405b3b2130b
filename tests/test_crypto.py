"""Tests for node.crypto: addresses, key files and their modes, canonical message signatures."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from node.crypto import (
    ROLES,
    KeySet,
    PrivateKey,
    address_of,
    check_shape,
    create_keys,
    is_address,
    key_file_name,
    load_keys,
    pack,
    read_key_file,
    sign_message,
    signing_bytes,
    unpack,
    verify,
    verify_message,
    write_key_file,
)
from node.errors import KeyFileError, SignatureError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_address_matches_protocol() -> None:
    key = PrivateKey(bytes(range(32)))
    pk = key.public_key
    assert len(pk) == 32
    expected = "0x" + hashlib.sha256(pk).digest()[-20:].hex()
    assert address_of(pk) == expected == key.address
    assert is_address(key.address)
    assert not is_address(key.address.upper())
    assert not is_address(key.address[:-1])
    with pytest.raises(ValueError):
        address_of(pk[:31])


def test_from_passphrase_is_deterministic_and_per_role() -> None:
    a = PrivateKey.from_passphrase("s", "operator")
    assert a.seed_bytes() == PrivateKey.from_passphrase("s", "operator").seed_bytes()
    assert a.address == PrivateKey.from_passphrase("s", "operator").address
    addresses = {PrivateKey.from_passphrase("s", role).address for role in ROLES}
    assert len(addresses) == len(ROLES)
    assert PrivateKey.from_passphrase("t", "operator").address != a.address


def test_write_key_file_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k" / "operator.key"
    key = PrivateKey.from_passphrase("x", "operator")
    write_key_file(path, key)
    assert _mode(path) == 0o600
    assert path.read_text() == key.seed_bytes().hex() + "\n"
    other = PrivateKey.from_passphrase("y", "operator")
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path, other)
    assert read_key_file(path).address == key.address
    assert [p.name for p in path.parent.iterdir()] == ["operator.key"]  # no temp files left


def test_create_keys_modes(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys = create_keys(keys_dir, passphrase="s")
    assert _mode(keys_dir) == 0o700
    files = sorted(p.name for p in keys_dir.iterdir())
    assert files == sorted(key_file_name(r) for r in ROLES)
    assert len(files) == 5
    for name in files:
        assert _mode(keys_dir / name) == 0o600
    assert keys.addresses()["operator"] == PrivateKey.from_passphrase("s", "operator").address
    assert load_keys(keys_dir).addresses() == keys.addresses()


def test_create_keys_random_and_refuses_second_time(tmp_path: Path) -> None:
    a = create_keys(tmp_path / "a")
    b = create_keys(tmp_path / "b")
    assert a.operator.address != b.operator.address
    with pytest.raises(KeyFileError):
        create_keys(tmp_path / "a")
    assert load_keys(tmp_path / "a").addresses() == a.addresses()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_read_key_file_refuses_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "operator.key"
    write_key_file(path, PrivateKey.from_passphrase("s", "operator"))
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"{mode:04o}" in msg
    assert read_key_file(path, check_mode=False).address == \
        PrivateKey.from_passphrase("s", "operator").address


def _raw_key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("text", ["zz" * 32 + "\n", "not a key", "0x" + "ab" * 32])
def test_read_key_file_refuses_malformed_hex(tmp_path: Path, text: str) -> None:
    path = _raw_key_file(tmp_path, text)
    with pytest.raises(KeyFileError, match="hex") as info:
        read_key_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_read_key_file_refuses_wrong_length(tmp_path: Path, n: int) -> None:
    path = _raw_key_file(tmp_path, "ab" * n + "\n")
    with pytest.raises(KeyFileError, match=f"{n} bytes"):
        read_key_file(path)


def test_read_key_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="not found") as info:
        read_key_file(path)
    assert str(path) in str(info.value)
    with pytest.raises(KeyFileError):
        read_key_file(path, check_mode=False)


def test_read_key_file_refuses_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="regular file"):
        read_key_file(tmp_path / "dir.key")


def test_load_keys_from_credentials_dir(tmp_path: Path) -> None:
    own = create_keys(tmp_path / "keys", passphrase="own")
    creds = create_keys(tmp_path / "creds", passphrase="creds")
    loaded = load_keys(tmp_path / "keys", credentials_dir=tmp_path / "creds")
    assert loaded.addresses() == creds.addresses() != own.addresses()
    # The keys_dir is not consulted at all: credentials only.
    loaded = load_keys(tmp_path / "missing", credentials_dir=tmp_path / "creds")
    assert loaded.addresses() == creds.addresses()
    with pytest.raises(KeyFileError, match="not found"):
        load_keys(tmp_path / "keys", credentials_dir=tmp_path / "empty")


def test_load_keys_missing_one_role(tmp_path: Path) -> None:
    create_keys(tmp_path / "keys", passphrase="s")
    (tmp_path / "keys" / "gc.key").unlink()
    with pytest.raises(KeyFileError, match=r"gc\.key"):
        load_keys(tmp_path / "keys")


def _message() -> dict[str, object]:
    return {"type": "gfsp.test", "n": 7, "who": "0xabc", "blob": b"\x00\x01", "sig": b""}


def test_sign_and_verify_round_trip() -> None:
    key = PrivateKey.from_passphrase("s", "operator")
    msg = _message()
    signed = sign_message(key, msg)
    assert msg["sig"] == b""  # the input is not modified
    assert list(signed) == list(msg)
    assert isinstance(signed["sig"], bytes) and len(signed["sig"]) == 64
    verify_message(key.public_key, signed)
    # Through the wire encoding and back.
    decoded = unpack(pack(signed))
    verify_message(key.public_key, decoded)
    assert signing_bytes(signed) == signing_bytes(msg)


@pytest.mark.parametrize(
    ("field", "value"),
    [("type", "gfsp.other"), ("n", 8), ("who", "0xabd"), ("blob", b"\x00\x02")],
)
def test_tampering_any_field_is_refused(field: str, value: object) -> None:
    key = PrivateKey.from_passphrase("s", "operator")
    signed = sign_message(key, _message())
    signed[field] = value
    with pytest.raises(SignatureError):
        verify_message(key.public_key, signed)


def test_tampering_signature_or_signer_is_refused() -> None:
    key = PrivateKey.from_passphrase("s", "operator")
    signed = sign_message(key, _message())
    sig = signed["sig"]
    assert isinstance(sig, bytes)
    flipped = dict(signed, sig=bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(SignatureError):
        verify_message(key.public_key, flipped)
    with pytest.raises(SignatureError, match="bytes"):
        verify_message(key.public_key, dict(signed, sig=sig[:63]))
    with pytest.raises(SignatureError):
        verify_message(key.public_key, dict(signed, sig="not bytes"))
    other = PrivateKey.from_passphrase("s", "approval")
    with pytest.raises(SignatureError):
        verify_message(other.public_key, signed)
    with pytest.raises(SignatureError):
        verify(b"\x00" * 5, b"data", sig)


def test_reordered_or_extended_message_is_refused() -> None:
    key = PrivateKey.from_passphrase("s", "operator")
    signed = sign_message(key, _message())
    reordered = {"n": signed["n"], "type": signed["type"], "who": signed["who"],
                 "blob": signed["blob"], "sig": signed["sig"]}
    with pytest.raises(SignatureError):
        verify_message(key.public_key, reordered)
    extended = dict(signed)
    del extended["sig"]
    extended["extra"] = 1
    extended["sig"] = signed["sig"]
    with pytest.raises(SignatureError):
        verify_message(key.public_key, extended)


def test_signing_bytes_requires_sig_last() -> None:
    with pytest.raises(SignatureError, match="last key"):
        signing_bytes({"sig": b"", "type": "x"})
    with pytest.raises(SignatureError, match="last key"):
        signing_bytes({"type": "x"})
    with pytest.raises(SignatureError, match="last key"):
        signing_bytes({})
    key = PrivateKey.from_passphrase("s", "operator")
    with pytest.raises(SignatureError):
        sign_message(key, {"sig": b"", "type": "x"})
    assert unpack(signing_bytes({"type": "x", "sig": b"abc"})) == {"type": "x", "sig": b""}


SCHEMA = [("type", str), ("n", int), ("blob", bytes), ("sig", bytes)]


def test_check_shape() -> None:
    good = {"type": "t", "n": 1, "blob": b"", "sig": b""}
    check_shape(good, SCHEMA, what="test")
    with pytest.raises(SignatureError, match="test: keys"):
        check_shape({"n": 1, "type": "t", "blob": b"", "sig": b""}, SCHEMA, what="test")
    with pytest.raises(SignatureError, match="keys"):
        check_shape({**good, "extra": 1}, SCHEMA, what="test")
    with pytest.raises(SignatureError, match="keys"):
        check_shape({"type": "t", "n": 1, "sig": b""}, SCHEMA, what="test")
    with pytest.raises(SignatureError, match="n must be int, got bool"):
        check_shape({**good, "n": True}, SCHEMA, what="test")
    with pytest.raises(SignatureError, match="blob has type str"):
        check_shape({**good, "blob": "x"}, SCHEMA, what="test")
    check_shape({**good, "blob": "x"}, [("type", str), ("n", int), ("blob", (bytes, str)),
                                          ("sig", bytes)], what="test")


def test_unpack_refuses_garbage() -> None:
    with pytest.raises(SignatureError):
        unpack(b"\xc1")
    with pytest.raises(SignatureError):
        unpack(pack({"a": 1}) + b"\x00")
    with pytest.raises(SignatureError):
        unpack(pack({1: "int key"}))
    data = pack({"a": b"x" * 100})
    assert unpack(data, max_len=len(data)) == {"a": b"x" * 100}
    with pytest.raises(SignatureError, match="more than"):
        unpack(data, max_len=len(data) - 1)


def test_secrets_never_in_repr_or_str(tmp_path: Path) -> None:
    keys = create_keys(tmp_path / "keys", passphrase="s")
    assert isinstance(keys, KeySet)
    seeds = [getattr(keys, role).seed_bytes().hex() for role in ROLES]
    texts = [repr(keys), str(keys), f"{keys}", f"{keys!r}"]
    for role in ROLES:
        key = getattr(keys, role)
        texts += [repr(key), str(key), f"{key}"]
    for text in texts:
        for seed in seeds:
            assert seed not in text
            assert seed[:16] not in text
    assert keys.operator.address in repr(keys)
    assert keys.operator.address in repr(keys.operator)
    assert keys.public_keys()["seal"] == keys.seal.public_key
