"""``flintproxy admin create-codes`` and ``reconcile`` as separate processes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flintproxy.store.codes import code_hash
from tests.conftest import Gateway
from tests.tools.test_admin import Run, config_path, run, server  # noqa: F401 (fixtures)
from tests.web.test_api import Browser


async def test_create_codes_prints_each_code_once_and_they_redeem_on_the_running_server(
        server: Gateway, run: Run, tmp_path: Path) -> None:  # noqa: F811
    rc, out, err = await run("create-codes", "3", "2.50", "--expires-days", "30",
                             "--note", "conference")
    assert rc == 0, err
    codes = out.split()
    assert len(codes) == 3 and len(set(codes)) == 3 and "shown only now" in err
    db = sqlite3.connect(tmp_path / "flintproxy.db")
    try:
        stored = {bytes(r[0]) for r in db.execute("SELECT code_hash FROM redemption_codes")}
    finally:
        db.close()
    assert stored == {code_hash(c) for c in codes}
    assert not any(c.encode() in (tmp_path / "flintproxy.db").read_bytes() for c in codes)
    b = Browser(server)
    try:
        status, _, _ = await b.call("POST", "/api/signup", {"email": "c@example.com",
                                                            "password": "correct horse battery"})
        assert status == 201
        status, body, _ = await b.call("POST", "/api/redeem", {"code": codes[1]})
        assert (status, body["balance_usd"]) == (200, "2.50")
    finally:
        await b.http.close()


async def test_create_codes_refuses_bad_arguments(run: Run) -> None:  # noqa: F811
    for args in (("0", "1.00"), ("3", "-1"), ("3", "0.0000000001"), ("2", "1", "--expires-days",
                                                                     "0")):
        rc, out, err = await run("create-codes", *args)
        assert rc == 2 and out == "", (args, err)


async def test_reconcile_passes_on_honest_books_and_fails_on_a_tampered_balance(
        run: Run, tmp_path: Path) -> None:  # noqa: F811
    assert (await run("create-account", "r@example.com"))[0] == 0
    assert (await run("credit", "r@example.com", "4.00"))[0] == 0
    rc, out, err = await run("reconcile")
    assert rc == 0 and "the books balance" in err and out == ""
    db = sqlite3.connect(tmp_path / "flintproxy.db")
    try:
        db.execute("UPDATE accounts SET credited_nano = credited_nano + 5, "
                   "balance_nano = balance_nano + 5")
        db.commit()
    finally:
        db.close()
    rc, out, err = await run("reconcile")
    assert rc == 1 and "credited 4.000000005 USD != the sum of its credits 4.00 USD" in out
