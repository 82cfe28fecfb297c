"""The email at rest under a data key: sealed, found by its blind index, refused under
a wrong key or without one; an install in clear is sealed when a key is configured."""

from __future__ import annotations

import pytest

from flintproxy.crypto import Keyring, generate_key
from flintproxy.errors import AuthenticationError, Conflict, KeyringError
from flintproxy.store.accounts import Accounts
from flintproxy.store.db import Database
from flintproxy.store.pii import PiiCodec

PASSWORD = b"correct horse battery"


def ring(*keys: str) -> PiiCodec:
    return PiiCodec(Keyring.from_text("\n".join(keys), "test"))


async def test_a_sealed_email_is_found_logged_in_and_never_stored_in_clear(
        store_db: Database) -> None:
    repo = Accounts(store_db, 4, 3600, pii=ring(generate_key()))
    account_id = await repo.create_account("alice@example.com", PASSWORD)
    assert (await repo.by_email("alice@example.com")).id == account_id
    assert (await repo.get(account_id)).email == "alice@example.com"
    assert await repo.verify_login("alice@example.com", PASSWORD) == account_id
    with pytest.raises(AuthenticationError):
        await repo.verify_login("bob@example.com", PASSWORD)
    with pytest.raises(Conflict):  # the blind index is still UNIQUE
        await repo.create_account("alice@example.com", None)
    await repo.change_email(account_id, "alice2@example.com")
    assert (await repo.by_email("alice2@example.com")).id == account_id
    for column, sealed in await store_db.fetch("SELECT email, email_sealed FROM accounts"):
        assert column.startswith("bi1:") and b"alice" not in bytes(sealed)
        assert "alice" not in column


async def test_a_wrong_key_or_no_key_stops_the_start(store_db: Database) -> None:
    await Accounts(store_db, 4, 3600, pii=ring(generate_key())).create_account(
        "alice@example.com", None)
    with pytest.raises(KeyringError, match="not the one the account data was encrypted"):
        await ring(generate_key()).check(store_db)
    with pytest.raises(KeyringError, match="no key"):
        await PiiCodec().check(store_db)


async def test_an_install_in_clear_is_sealed_when_a_key_is_configured(
        store_db: Database) -> None:
    clear = Accounts(store_db, 4, 3600)
    ids = [await clear.create_account(f"u{i}@example.com", PASSWORD) for i in range(3)]
    codec = ring(generate_key())
    assert await codec.check(store_db) == 3
    assert await codec.check(store_db) == 0  # once
    sealed = Accounts(store_db, 4, 3600, pii=codec)
    assert [(await sealed.by_email(f"u{i}@example.com")).id for i in range(3)] == ids
    assert not await store_db.fetch("SELECT id FROM accounts WHERE email LIKE '%example%'")


async def test_during_a_rotation_both_keys_find_every_account_and_resealing_moves_all(
        store_db: Database) -> None:
    old, new = generate_key(), generate_key()
    before = Accounts(store_db, 4, 3600, pii=ring(old))
    a = await before.create_account("a@example.com", PASSWORD)
    rotating = Accounts(store_db, 4, 3600, pii=ring(new, old))
    assert (await rotating.by_email("a@example.com")).id == a
    b = await rotating.create_account("b@example.com", PASSWORD)
    assert await rotating.pii.seal_clear(store_db) == 1  # only a's was under the old key
    after = Accounts(store_db, 4, 3600, pii=ring(new))
    assert [(await after.by_email(e)).id for e in ("a@example.com", "b@example.com")] == [a, b]
    assert await after.verify_login("a@example.com", PASSWORD) == a
