"""The data keyring: AES-GCM sealing, the blind index, and keys that fail loudly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flintproxy.config import CryptoConfig
from flintproxy.crypto import Keyring, create_key_file, generate_key, load_keyring
from flintproxy.errors import KeyringError


def test_a_sealed_email_opens_to_itself_and_never_contains_it() -> None:
    ring = Keyring.from_text(generate_key(), "test")
    sealed = ring.seal("alice@example.com", "accounts.email")
    assert b"alice" not in sealed and b"example" not in sealed
    assert ring.open(sealed, "accounts.email") == "alice@example.com"
    # A fresh nonce each time: equal emails do not give equal ciphertexts.
    assert ring.seal("alice@example.com", "accounts.email") != sealed


def test_a_ciphertext_moved_to_another_column_or_altered_does_not_open() -> None:
    ring = Keyring.from_text(generate_key(), "test")
    sealed = ring.seal("alice@example.com", "accounts.email")
    with pytest.raises(KeyringError, match="does not decrypt"):
        ring.open(sealed, "accounts.other")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(KeyringError, match="does not decrypt"):
        ring.open(flipped, "accounts.email")
    with pytest.raises(KeyringError, match="not a sealed value"):
        ring.open(b"alice@example.com", "accounts.email")


def test_a_value_sealed_under_another_key_is_refused_not_served_as_garbage() -> None:
    mine, theirs = Keyring.from_text(generate_key(), "a"), Keyring.from_text(generate_key(), "b")
    with pytest.raises(KeyringError, match="does not hold"):
        mine.open(theirs.seal("x@y.z", "accounts.email"), "accounts.email")


def test_the_blind_index_is_stable_per_key_and_differs_between_keys() -> None:
    k1, k2 = generate_key(), generate_key()
    one, again, two = (Keyring.from_text(k, "t") for k in (k1, k1, k2))
    assert one.index("a@b.c") == again.index("a@b.c") != two.index("a@b.c")
    assert one.index("a@b.c") != one.index("a@b.d")
    rotating = Keyring.from_text(f"{k2}\n{k1}\n", "t")
    assert rotating.indexes("a@b.c") == (two.index("a@b.c"), one.index("a@b.c"))


def test_during_a_rotation_old_values_open_and_new_ones_use_the_new_key() -> None:
    old, new = generate_key(), generate_key()
    before = Keyring.from_text(old, "t").seal("a@b.c", "c")
    ring = Keyring.from_text(f"# current first\n{new}\n{old}\n", "t")
    assert ring.open(before, "c") == "a@b.c"
    assert not ring.is_current(before)
    assert ring.is_current(ring.seal("a@b.c", "c"))


@pytest.mark.parametrize("text", ["", "not base64!!", "c2hvcnQ=", generate_key()[:-8]])
def test_a_malformed_key_is_refused_with_where_it_came_from(text: str) -> None:
    with pytest.raises(KeyringError, match=r"crypto.key_env \(K\)|no data key"):
        load_keyring(CryptoConfig(key_env="K", key_text=text + "\n" if text else "# none\n"))


def test_a_missing_key_env_or_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="environment variable FLINT_KEY is not set"):
        load_keyring(CryptoConfig(key_env="FLINT_KEY"))
    with pytest.raises(KeyringError, match=r"not found .*flintproxy keygen"):
        load_keyring(CryptoConfig(key_file=tmp_path / "nope.key"))
    assert load_keyring(CryptoConfig()) is None


def test_the_key_file_is_created_once_with_mode_0600_and_refused_when_others_can_read(
        tmp_path: Path) -> None:
    path = tmp_path / "var" / "data.key"
    assert create_key_file(path) is True
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    assert create_key_file(path) is False and path.read_text() == first
    ring = load_keyring(CryptoConfig(key_file=path))
    assert ring is not None and ring.open(ring.seal("a@b.c", "c"), "c") == "a@b.c"
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match="readable by others"):
        load_keyring(CryptoConfig(key_file=path))
