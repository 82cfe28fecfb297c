"""Account data at rest: AES-256-GCM encryption and an HMAC blind index, one keyring.

The privacy promise (CONTRACT 9) is that account PII, today the email address, is
stored encrypted. A ciphertext cannot be looked up by value, so beside it goes a
*blind index*: HMAC-SHA256 of the normalised value under a second key. Equal emails
give equal indexes (a UNIQUE column still refuses a duplicate and login finds the
account with one indexed lookup), yet the index reveals nothing without the key.

Both keys derive (HKDF-SHA256, distinct ``info``) from one 32-byte master key, given
as URL-safe base64 in an environment variable (``[crypto] key_env``) or a key file
(``[crypto] key_file``, one key a line, the current one first, older ones after it
while ``flintproxy admin rotate-key`` re-encrypts). Every ciphertext names the key
it was sealed under (a 4-byte id), so during a rotation rows under either key read
back; the AAD binds a ciphertext to its column, so one cannot be moved to another.

Layout of a sealed value: ``0x01 | key id (4) | nonce (12) | ciphertext + tag (16)``.
The primitives are the ``cryptography`` package's (OpenSSL): none is hand-written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from flintproxy.config import CryptoConfig
from flintproxy.errors import KeyringError

__all__ = ["DataKey", "Keyring", "create_key_file", "generate_key", "load_keyring"]

VERSION = b"\x01"
KEY_BYTES = 32
_ID = 4
_NONCE = 12
_HEAD = 1 + _ID + _NONCE


def generate_key() -> str:
    """A new random master key, as the text a key file or env var holds."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


@dataclass(frozen=True, slots=True)
class DataKey:
    """One master key's derived keys and its id (the first 4 bytes of a third one)."""

    key_id: bytes
    aead: AESGCM
    index_key: bytes

    @classmethod
    def from_text(cls, text: str, where: str) -> DataKey:
        try:
            master = base64.urlsafe_b64decode(text.strip().encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            master = b""
        if len(master) != KEY_BYTES:
            raise KeyringError(f"{where}: not a key (expected {KEY_BYTES} bytes in URL-safe "
                               "base64, as `flintproxy keygen` writes)")
        return cls(key_id=_derive(master, b"flintproxy key id")[:_ID],
                   aead=AESGCM(_derive(master, b"flintproxy aes-256-gcm")),
                   index_key=_derive(master, b"flintproxy blind index"))


class Keyring:
    """The current key (seals new values) and older ones (still open theirs)."""

    def __init__(self, keys: Sequence[DataKey]) -> None:
        if not keys:
            raise KeyringError("no data key given")
        self.keys = tuple(keys)
        self.current = keys[0]
        self._by_id = {k.key_id: k for k in keys}

    @classmethod
    def from_text(cls, text: str, where: str) -> Keyring:
        lines = [ln.strip() for ln in text.splitlines()]
        keys = [DataKey.from_text(ln, f"{where} line {i}")
                for i, ln in enumerate(lines, start=1) if ln and not ln.startswith("#")]
        return cls(keys)

    def seal(self, plaintext: str, column: str) -> bytes:
        """Encrypt ``plaintext`` for ``column`` (e.g. ``"accounts.email"``)."""
        nonce = os.urandom(_NONCE)
        head = VERSION + self.current.key_id + nonce
        return head + self.current.aead.encrypt(nonce, plaintext.encode("utf-8"),
                                                column.encode() + head[:1 + _ID])

    def open(self, sealed: bytes, column: str) -> str:
        """Decrypt what ``seal`` made; a wrong key or altered bytes raise KeyringError."""
        if len(sealed) < _HEAD + 16 or sealed[:1] != VERSION:
            raise KeyringError(f"{column}: not a sealed value")
        key = self._by_id.get(bytes(sealed[1:1 + _ID]))
        if key is None:
            raise KeyringError(f"{column}: sealed under a key this keyring does not hold")
        try:
            clear = key.aead.decrypt(bytes(sealed[1 + _ID:_HEAD]), bytes(sealed[_HEAD:]),
                                     column.encode() + bytes(sealed[:1 + _ID]))
        except InvalidTag:
            raise KeyringError(f"{column}: does not decrypt (altered, or another key's)"
                               ) from None
        return clear.decode("utf-8")

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is under the current key (rotation skips those)."""
        return bytes(sealed[1:1 + _ID]) == self.current.key_id

    def index(self, value: str) -> bytes:
        """The blind index of ``value`` under the current key."""
        return hmac.new(self.current.index_key, value.encode("utf-8"), hashlib.sha256).digest()

    def indexes(self, value: str) -> tuple[bytes, ...]:
        """Its index under every key held: a lookup during a rotation tries them all."""
        return tuple(hmac.new(k.index_key, value.encode("utf-8"), hashlib.sha256).digest()
                     for k in self.keys)


def load_keyring(cfg: CryptoConfig) -> Keyring | None:
    """The configured keyring (None when ``[crypto]`` names no key); KeyringError with
    a message naming the setting when the key is missing, unreadable or malformed.
    ``key_env``'s value was read with the rest of the config (``key_text``)."""
    if cfg.key_env is not None:
        text = cfg.key_text
        if not text:
            raise KeyringError(f"crypto.key_env = {cfg.key_env!r}: the environment variable "
                               f"{cfg.key_env} is not set (a key: `flintproxy keygen -`)")
        return Keyring.from_text(text, f"crypto.key_env ({cfg.key_env})")
    if cfg.key_file is None:
        return None
    where = f"crypto.key_file = {str(cfg.key_file)!r}"
    try:
        st = cfg.key_file.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(f"{where}: readable by others (mode {st.st_mode & 0o777:o}); "
                               f"chmod 600 it")
        text = cfg.key_file.read_text("ascii")
    except FileNotFoundError:
        raise KeyringError(f"{where}: not found (create one: `flintproxy keygen "
                           f"{cfg.key_file}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"{where}: cannot read it ({type(exc).__name__})") from None
    return Keyring.from_text(text, where)


def create_key_file(path: Path) -> bool:
    """Write a new key to ``path`` (mode 0600) unless it exists; True when written."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(generate_key() + "\n")
    return True
