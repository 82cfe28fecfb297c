"""The web console in a real browser: Debian's Chromium driven by Playwright.

Two journeys against a real ``flintproxy serve`` (and the real mock upstream): an
account holder from sign-up to closing the account, with the ``openai`` SDK using
the key the console showed; and an operator granted from the command line who
finds that account, credits it with a note and sees it in the audit log. Then, on a
gateway with ``[email]`` (the mock SMTP sink) and ``[payments]`` (the fake Stripe):
redeeming a code made by ``admin create-codes``, a top-up through the Checkout page
and its signed webhook, a password reset and an email change from the mailed links.

On every page: each request the page makes must go to the console's own origin
(and the Checkout page, where the top-up journey goes on purpose),
the browser must report no error (a CSP violation is one), and axe-core (vendored
under tests/web/vendor/axe-core with its licence) must find no serious or critical
accessibility violation. Screenshots of every page at desktop and phone widths go
to tests/artifacts/ (ignored by git), with the first load's page weights.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from flintproxy.tools.fake_stripe import FakeStripe
from flintproxy.tools.mock_smtp import MockSmtp
from tests.conftest import raw_config
from tests.engines import free_port
from tests.support import LiveGateway, LiveMock

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PASSWORD = "correct horse battery staple"
FIRST_LOAD_BUDGET = 100_000  # bytes, the "first page load under 100 KB"
# Chromium reports every 4xx answer to fetch() as a console error; those are the
# API's refusals the page turns into sentences, not faults of the page.
_EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a "
                               r"status of 4\d\d")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    tmp = tmp_path_factory.mktemp("console")
    mock = LiveMock(tmp).start()
    gw = LiveGateway(tmp, raw_config(tmp, {"local": mock.base_url})).start()
    try:
        yield gw
    finally:
        gw.stop()
        mock.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


# A second gateway, with [email] and [payments], for the money and recovery journeys.
# The mock SMTP sink and the fake Stripe run in this module's event loop; the gateway
# is a real ``flintproxy serve`` whose console port is fixed beforehand, so the links
# it mails ([email] public_url) and Stripe's return URLs ([payments] return_url) name
# the console the browser has open.

SK, WH = "sk_test_console", "whsec_console"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smtp() -> AsyncIterator[MockSmtp]:
    sink = MockSmtp()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stripe_fake() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe(secret_key=SK, webhook_secret=WH)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture(scope="module")
def money_live(tmp_path_factory: pytest.TempPathFactory, smtp: MockSmtp,
               stripe_fake: FakeStripe) -> Iterator[LiveGateway]:
    tmp = tmp_path_factory.mktemp("console-money")
    mock = LiveMock(tmp).start()
    port = free_port()
    console = f"http://127.0.0.1:{port}"
    raw = raw_config(tmp, {"local": mock.base_url})
    raw["email"] = {"host": "127.0.0.1", "port": smtp.port, "starttls": False,
                    "from": "noreply@flint.test", "public_url": console, "max_per_second": 50}
    raw["payments"] = {"stripe_secret_key_env": "SK", "stripe_webhook_secret_env": "WH",
                       "api_base": stripe_fake.url, "return_url": console}
    gw = LiveGateway(tmp, raw, env={"SK": SK, "WH": WH}, console_port=port).start()
    assert gw.console_url == console
    stripe_fake.webhook_url = console + "/api/stripe/webhook"
    try:
        yield gw
    finally:
        gw.stop()
        mock.stop()


class Watched:
    """A browser context whose every request, error and page is checked."""

    def __init__(self, context: BrowserContext, page: Page, origin: str, name: str) -> None:
        self.context, self.page, self.origin, self.name = context, page, origin, name
        self.requests: list[str] = []
        self.errors: list[str] = []
        # Prefixes of other origins the journey goes to on purpose (Stripe Checkout).
        self.elsewhere: tuple[str, ...] = ()
        context.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not _EXPECTED_CONSOLE.search(msg.text):
            self.errors.append(f"console: {msg.text}")

    async def check(self, shot: str) -> None:
        """Same origin only, no errors, no serious a11y violation; screenshots."""
        foreign = [u for u in self.requests
                   if not u.startswith((self.origin + "/", "data:", "blob:", *self.elsewhere))]
        assert not foreign, f"requests to other origins: {foreign}"
        assert not self.errors, self.errors
        await self.axe(shot)
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=ARTIFACTS / f"{self.name}-{shot}-desktop.png",
                                   full_page=True)
        await self.page.set_viewport_size(PHONE)
        await self.page.screenshot(path=ARTIFACTS / f"{self.name}-{shot}-phone.png",
                                   full_page=True)
        # Nothing wider than the phone's screen (a table scrolls inside its box).
        overflow = await self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{shot}: the page is {overflow}px wider than a phone"
        await self.page.set_viewport_size(DESKTOP)

    async def axe(self, shot: str) -> None:
        if not await self.page.evaluate("typeof window.axe !== 'undefined'"):
            # Evaluated through the DevTools protocol: the page's CSP still forbids
            # inline scripts for the page itself.
            await self.page.evaluate(AXE.read_text())
        result = await self.page.evaluate(
            "axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'best-practice']})")
        bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
        assert not bad, f"{shot}: accessibility violations {bad}"

    async def go(self, fragment: str, heading: str) -> None:
        await self.page.goto(f"{self.origin}/#/{fragment}")
        await expect(self.page.get_by_role("heading", level=1)).to_have_text(heading)


async def watched(browser: Browser, live: LiveGateway, name: str) -> Watched:
    context = await browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = await context.new_page()
    return Watched(context, page, live.console_url, name)


def ask_sdk(live: LiveGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=live.base_url, max_retries=0, timeout=10)


async def first_load_weight(page: Page) -> dict[str, int]:
    """Bytes the first load transferred (headers included), by resource."""
    entries = await page.evaluate(
        "[...performance.getEntriesByType('navigation'), "
        "...performance.getEntriesByType('resource')]"
        ".map(e => [e.name, e.transferSize, e.decodedBodySize])")
    return {name: size for name, size, _ in entries}


async def tab_reaches(page: Page, label: str) -> None:
    """From the view (which holds the focus), Tab lands on ``label``'s field, visibly."""
    await page.keyboard.press("Tab")
    field = page.get_by_label(label, exact=True)
    await expect(field).to_be_focused()
    assert await field.evaluate("e => getComputedStyle(e).outlineStyle") != "none"


def new_holder(live: LiveGateway, prefix: str) -> str:
    """A fresh account (password ``PASSWORD``) made with the admin CLI; its email."""
    email = f"{prefix}-{secrets.token_hex(4)}@example.com"
    live.admin("create-account", email, "--password-stdin", stdin=PASSWORD + "\n")
    return email


async def log_in(w: Watched, email: str, password: str = PASSWORD) -> None:
    await w.go("login", "Log in")
    await w.page.get_by_label("Email").fill(email)
    await w.page.get_by_label("Password").fill(password)
    await w.page.get_by_role("button", name="Log in").click()
    await expect(w.page.get_by_role("heading", level=1)).to_have_text("Overview")


async def link_in_mail(smtp: MockSmtp, to: str, fragment: str) -> tuple[str, str]:
    """The console link (and its token) of the newest message ``smtp`` received for ``to``."""
    for _ in range(100):
        mails = [m for m in smtp.messages if to in m.recipients]
        if mails:
            found = re.search(r"(http://\S+/#" + fragment + r"=([A-Za-z0-9_-]+))", mails[-1].text)
            assert found, mails[-1].text
            return found[1], found[2]
        await smtp.wait_for(len(smtp.messages) + 1)
    raise AssertionError(f"no mail for {to}")


async def test_an_account_holder_manages_keys_usage_and_data_in_the_console_end_to_end(
        browser: Browser, live: LiveGateway) -> None:
    w = await watched(browser, live, "holder")
    page = w.page
    email = f"holder-{secrets.token_hex(4)}@example.com"

    # The first load: the log-in page, within the weight budget.
    await w.go("login", "Log in")
    await page.wait_for_load_state("networkidle")
    weights = await first_load_weight(page)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "page-weights.json").write_text(json.dumps(weights, indent=1))
    assert 0 < sum(weights.values()) < FIRST_LOAD_BUDGET, weights
    await w.check("login")
    # Keyboard: a view takes the focus, so Tab goes to its first field, visibly.
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Email")).to_be_focused()
    outline = "e => getComputedStyle(e).outlineStyle"
    assert await page.get_by_label("Email").evaluate(outline) != "none"

    # Sign up; a bad password first: the API's refusal as a sentence.
    await page.get_by_role("link", name="Sign up").first.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign up")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill("short")
    await page.get_by_label("Password").evaluate("e => e.removeAttribute('minlength')")
    await page.get_by_role("button", name="Sign up").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "Choose a password of at least 10 characters.")
    await w.check("signup")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign up").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("API keys")
    live.admin("credit", email, "5.00")  # funds, as an operator adds them

    # Create a key: shown once, with a copy button and a warning.
    await page.get_by_label("Name").fill("journey")
    await page.get_by_role("button", name="Create key").click()
    secret = page.locator("#key-plain")
    await expect(secret).to_have_text(re.compile(r"^sk-flint-"))
    key = await secret.text_content()
    assert key
    await expect(page.get_by_text("This is the only time the key is shown")).to_be_visible()
    await expect(page.get_by_role("button", name="Copy key")).to_be_visible()
    await w.check("keys-created")
    await page.reload()
    await expect(page.get_by_role("heading", level=1)).to_have_text("API keys")
    assert key not in await page.content()  # never shown again
    await expect(page.get_by_role("cell", name="journey", exact=True)).to_be_visible()

    # Use it with the SDK, as any client would.
    async with ask_sdk(live, key) as sdk:
        for _ in range(3):
            done = await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
            assert done.usage is not None and done.usage.total_tokens > 0

    # Give the key a daily spend cap: the list then shows the day's spend against it.
    await page.get_by_role("button", name="Edit spend caps of journey").click()
    edit = page.locator("#new-key")
    await edit.get_by_label("Daily spend cap (USD)").fill("5")
    await edit.get_by_role("button", name="Save caps").click()
    await expect(page.get_by_text(re.compile(r"of \$5\.00 today; no monthly cap"))
                 ).to_be_visible()
    await w.check("keys-caps")

    # The usage appears in the table and the chart (once the usage writer has
    # committed it: a batch every 0.2 s, so "Apply" again until it has).
    await page.get_by_role("link", name="Usage").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    rows = page.locator("#usage-table tbody tr")
    for _ in range(50):
        if await rows.count() == 3:
            break
        await page.wait_for_timeout(100)
        await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(3)
    await expect(rows.first).to_contain_text("gpt-4o-mini")
    await expect(page.locator("#chart canvas")).to_have_count(1)
    await expect(page.locator("#chart-summary")).to_contain_text("1 day with usage: 66 tokens")
    await w.check("usage")
    # The skip link moves focus to the content without leaving the view.
    await page.get_by_role("link", name="Overview").focus()
    await page.keyboard.press("Shift+Tab")
    await expect(page.locator(".skip")).to_be_focused()
    assert await page.locator(".skip").evaluate(outline) != "none"
    await page.keyboard.press("Enter")
    await expect(page.locator("main")).to_be_focused()
    assert page.url.endswith("#/usage")
    # Filters: a model it never used shows nothing.
    await page.get_by_label("Model").fill("gpt-4o")
    await page.get_by_role("button", name="Apply").click()
    await expect(page.get_by_text("No usage in this range.")).to_be_visible()
    await page.get_by_label("Model").fill("")
    await page.get_by_label("From (UTC)").fill("2099-01-01")
    await page.get_by_role("button", name="Apply").click()
    await expect(page.get_by_text("No usage in this range.")).to_be_visible()
    await page.get_by_label("From (UTC)").fill("")
    await page.get_by_label("API key").select_option(index=1)  # the journey key
    await page.get_by_role("button", name="Apply").click()
    await expect(rows).to_have_count(3)

    # Export CSV: a download with the three rows.
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download CSV").click()
    download = await info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    exported = list(csv.DictReader(io.StringIO(text)))
    assert len(exported) == 3
    assert {r["model"] for r in exported} == {"gpt-4o-mini"}
    assert all(int(r["total_tokens"]) > 0 and r["outcome"] == "ok" for r in exported)

    # Paging: 25 records a page, newest first.
    async with ask_sdk(live, key) as sdk:
        for _ in range(25):
            await sdk.embeddings.create(model="text-embedding-3-small", input="page")
    for _ in range(50):
        await page.get_by_role("button", name="Apply").click()
        await expect(rows.first).to_be_visible()
        # All 25 new rows are flushed once the newest page holds nothing else.
        if (await rows.count() == 25
                and "text-embedding" in (await rows.last.text_content() or "")):
            break
        await page.wait_for_timeout(100)
    await expect(rows).to_have_count(25)
    await page.get_by_role("button", name="Older").click()
    await expect(rows).to_have_count(3, timeout=10_000)
    await expect(rows.first).to_contain_text("gpt-4o-mini")
    await expect(page.get_by_role("button", name="Older")).to_be_disabled()
    await page.get_by_role("button", name="Newer").click()
    await expect(rows).to_have_count(25)
    await expect(page.get_by_role("button", name="Newer")).to_be_disabled()

    # Revoke the key (with confirmation): the SDK now gets 401.
    await page.get_by_role("link", name="API keys").click()
    await page.get_by_role("button", name=re.compile("^Revoke key")).click()
    await expect(page.get_by_role("dialog")).to_be_visible()
    await w.check("keys-revoke-confirm")
    await page.get_by_role("button", name="Revoke", exact=True).click()
    await expect(page.get_by_role("status")).to_contain_text("is revoked")
    async with ask_sdk(live, key) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])

    # Delete usage now.
    await page.get_by_role("link", name="Usage").click()
    await expect(rows).to_have_count(25)
    await page.get_by_role("button", name="Delete all my usage records").click()
    await page.get_by_role("button", name="Delete records").click()
    await expect(page.get_by_role("status")).to_have_text("28 usage records deleted.")
    await expect(page.get_by_text("No usage in this range.")).to_be_visible()

    # The other pages: overview (balance), privacy.
    await page.get_by_role("link", name="Overview").click()
    await expect(page.locator("#balance")).to_have_text(re.compile(r"^\$4\.99"))
    await w.check("overview")
    await page.get_by_role("link", name="Privacy", exact=True).first.click()
    await expect(page.get_by_role("heading", name="What we never keep")).to_be_visible()
    await w.check("privacy")

    # Correct the email and change the password: a wrong password is refused first.
    await page.get_by_role("link", name="Account", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Account")
    await w.check("account")
    new_email = "renamed-" + email
    change = page.locator("form", has=page.get_by_role("heading", name="Change email"))
    await change.get_by_label("New email").fill(new_email)
    await change.get_by_label("Current password").fill("not my password")
    await change.get_by_role("button", name="Change email").click()
    await expect(page.get_by_role("alert")).to_have_text("That password is not right.")
    await change.get_by_label("Current password").fill(PASSWORD)
    await change.get_by_role("button", name="Change email").click()
    await expect(page.get_by_role("status")).to_have_text(f"Your email is now {new_email}.")
    new_password = PASSWORD + " again"
    pw = page.locator("form", has=page.get_by_role("heading", name="Change password"))
    await pw.get_by_label("Current password").fill(PASSWORD)
    await pw.get_by_label("New password").fill(new_password)
    await pw.get_by_role("button", name="Change password").click()
    await expect(page.get_by_role("status")).to_have_text("Your password is changed.")
    # Log out and back in with both.
    await page.get_by_role("button", name="Log out").click()
    await expect(page.get_by_role("status")).to_have_text("You are logged out.")
    await page.get_by_label("Email").fill(new_email)
    await page.get_by_label("Password").fill(new_password)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")
    email = new_email

    # Close the account, with confirmation: logged out, and it cannot log in again.
    await page.get_by_role("link", name="Account", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Account")
    close = page.locator("form", has=page.get_by_role("heading", name="Close account"))
    await close.get_by_label("Password").fill(new_password)
    await close.get_by_role("button", name="Close my account").click()
    await page.get_by_role("button", name="Close account").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    await expect(page.get_by_role("status")).to_have_text("Your account is closed.")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(new_password)
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "That email and password do not match an account.")
    await w.check("login-refused")
    await w.context.close()


async def test_an_operator_granted_from_the_cli_credits_an_account_with_a_note_and_sees_it_audited(
        browser: Browser, live: LiveGateway) -> None:
    w = await watched(browser, live, "operator")
    page = w.page
    op_email = f"op-{secrets.token_hex(4)}@example.com"
    target = f"customer-{secrets.token_hex(4)}@example.com"
    live.admin("create-account", target, "--password-stdin", stdin=PASSWORD + "\n")
    live.admin("create-account", op_email, "--password-stdin", stdin=PASSWORD + "\n")

    async def log_in() -> None:
        await w.go("login", "Log in")
        await page.get_by_label("Email").fill(op_email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Overview")

    # Before the grant: no operator pages, and the API says 403.
    await log_in()
    await expect(page.get_by_role("link", name="Operators")).to_be_hidden()
    refused = await page.evaluate("fetch('/api/admin/audit').then(r => r.status)")
    assert refused == 403

    assert "is now an operator" in live.admin("grant-operator", op_email)
    await page.reload()
    await expect(page.get_by_role("link", name="Operators")).to_be_visible()

    # Find the account; credit it without a note (refused), then with one.
    await page.get_by_role("link", name="Operators").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Operators")
    await page.get_by_label("Email contains").fill(target.split("@")[0])
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("link", name=target)).to_be_visible()
    await w.check("admin-search")
    await page.get_by_role("link", name=target).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Account {target}")
    await expect(page.locator("#acct-balance")).to_have_text("$0.00")
    await page.get_by_label("Amount (USD)").fill("12.50")
    await page.get_by_label("Note", exact=True).first.evaluate(
        "e => e.removeAttribute('required')")
    await page.get_by_role("button", name="Credit", exact=True).click()
    await expect(page.get_by_role("alert")).to_have_text(
        "Please write a note saying why: it is kept in the audit log.")
    await page.get_by_label("Note", exact=True).first.fill("goodwill for ticket 42")
    await page.get_by_role("button", name="Credit", exact=True).click()
    await expect(page.get_by_role("status")).to_have_text("Credited $12.50.")
    await expect(page.locator("#acct-balance")).to_have_text("$12.50")
    # A debit larger than the balance is refused in words; nothing changes.
    await page.get_by_label("Amount (USD)").fill("20")
    await page.get_by_label("Note", exact=True).first.fill("too much")
    await page.get_by_role("button", name="Debit", exact=True).click()
    await expect(page.get_by_role("alert")).to_contain_text("would make it negative")
    await expect(page.locator("#acct-balance")).to_have_text("$12.50")
    await w.check("admin-account")
    # Limits, then disable (confirmed) and enable again.
    await page.get_by_label("Requests per minute").fill("30")
    await page.get_by_role("button", name="Set limits").click()
    await expect(page.get_by_role("status")).to_have_text("Limits saved.")
    await expect(page.get_by_label("Requests per minute")).to_have_value("30")
    await page.get_by_role("button", name="Disable account").click()
    await page.get_by_role("button", name="Disable", exact=True).click()
    await expect(page.locator("#acct-status")).to_have_text("disabled")
    await page.get_by_role("button", name="Enable account").click()
    await expect(page.locator("#acct-status")).to_have_text("active")

    # The audit page shows the grant (from the command line) and the credit.
    await page.get_by_role("link", name="Audit log").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Audit log")
    first = page.locator("tbody tr").nth(3)  # before: limits, disable, enable
    await expect(page.locator("tbody tr").first).to_contain_text("enable account")
    await expect(first).to_contain_text("credit")
    await expect(first).to_contain_text(op_email)
    await expect(first).to_contain_text(target)
    await expect(first).to_contain_text("12.50")
    await expect(first).to_contain_text("goodwill for ticket 42")
    await expect(page.get_by_role("cell", name="command line").first).to_be_visible()
    await w.check("audit")
    await w.context.close()


async def test_a_holder_redeems_a_code_made_by_the_cli_and_sees_the_balance_and_its_ledger_entry(
        browser: Browser, money_live: LiveGateway) -> None:
    live = money_live
    w = await watched(browser, live, "redeem")
    page = w.page
    email = new_holder(live, "redeemer")
    code, other = live.admin("create-codes", "2", "5.00", "--note", "console test"
                             ).strip().splitlines()[-2:]
    await log_in(w, email)
    await page.get_by_role("link", name="Redeem a code").first.click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Redeem a code")
    await expect(page.locator("#balance")).to_have_text("$0.00")
    await expect(page.get_by_text("No credits yet")).to_be_visible()
    await w.check("page")
    await tab_reaches(page, "Code")

    # A wrong code (well formed, unknown): refused in words; the field says so, keeps focus.
    wrong = code[:-1] + ("0" if code[-1] != "0" else "1")
    field = page.get_by_label("Code", exact=True)
    await field.fill(wrong)
    await page.get_by_role("button", name="Redeem").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "That code is not valid: it may be mistyped, already used or expired.")
    await expect(field).to_be_focused()
    await expect(field).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#balance")).to_have_text("$0.00")
    await w.check("wrong-code")

    # The right one, typed loosely (lower case, spaces): credited once, with its entry.
    await field.fill(code.lower().replace("-", " "))
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_have_text(
        "Redeemed $5.00. Your balance is now $5.00.")
    await expect(page.locator("#balance")).to_have_text("$5.00")
    entry = page.locator("#history tbody tr")
    await expect(entry).to_have_count(1)
    await expect(entry.first).to_contain_text("+5.00")
    await expect(entry.first).to_contain_text("Redeemed code")
    await expect(field).to_have_value("")
    assert await field.get_attribute("aria-invalid") is None
    await w.check("redeemed")

    # Again: used up. Then guessing is throttled: a 429 shown with its Retry-After.
    await field.fill(code)
    await page.get_by_role("button", name="Redeem").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "That code is not valid: it may be mistyped, already used or expired.")
    alert = page.get_by_role("alert")
    for _ in range(10):
        await page.get_by_role("button", name="Redeem").click()
        await expect(alert).not_to_have_text("")
        if "Too many attempts" in (await alert.text_content() or ""):
            break
    await expect(alert).to_have_text(re.compile(r"^Too many attempts\. Please wait \d+ "
                                                r"seconds and try again\.$"))
    await expect(page.locator("#balance")).to_have_text("$5.00")
    # Wait the backoff out, so the next journeys from this address are not slowed down.
    wait = int(re.findall(r"\d+", await alert.text_content() or "")[0])
    await page.wait_for_timeout(wait * 1000 + 200)
    await field.fill(other)
    await page.get_by_role("button", name="Redeem").click()
    await expect(page.locator("#balance")).to_have_text("$10.00")
    await expect(entry).to_have_count(2)
    await w.context.close()


async def test_a_holder_tops_up_through_stripe_checkout_and_sees_the_balance_once_the_webhook_lands(
        browser: Browser, money_live: LiveGateway, stripe_fake: FakeStripe) -> None:
    live = money_live
    w = await watched(browser, live, "topup")
    w.elsewhere = (stripe_fake.url + "/pay/",)  # the Checkout page, on purpose
    page = w.page
    email = new_holder(live, "payer")
    await log_in(w, email)
    await page.get_by_role("link", name="Top up", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Top up")
    await w.check("page")
    await tab_reaches(page, "Amount (USD)")

    # Below the minimum: the browser refuses it (no request); past that, the server's 400.
    amount = page.get_by_label("Amount (USD)")
    await amount.fill("2")
    await page.get_by_role("button", name="Continue to payment").click()
    assert await amount.evaluate("e => e.validity.rangeUnderflow")
    assert not stripe_fake.sessions
    await amount.evaluate("e => e.removeAttribute('min')")
    await page.get_by_role("button", name="Continue to payment").click()
    await expect(page.get_by_role("alert")).to_contain_text("between 5.00 and 1000.00")
    assert not stripe_fake.sessions
    await w.check("refused")

    # Pay at "Stripe": its page, then back on the console's success URL.
    await amount.fill("12.50")
    stripe_fake.webhook_url, hook = None, stripe_fake.webhook_url  # delivered below, by hand
    await page.get_by_role("button", name="Continue to payment").click()
    await page.wait_for_url(stripe_fake.url + "/pay/**")
    (session,) = stripe_fake.sessions.values()
    assert session["amount_total"] == 1250
    await page.get_by_role("button", name="Pay").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Payment received")
    assert page.url == live.console_url + "/#/topup/done"
    note = page.locator("#topup-state")
    await expect(note).to_contain_text("Your balance updates when Stripe confirms it")
    await expect(page.locator("#balance")).to_have_text("$0.00")
    # Stripe's signed webhook arrives: the page, still polling, shows the new balance.
    stripe_fake.webhook_url = hook
    assert await stripe_fake.deliver(stripe_fake.events[-1]) == 200
    await expect(note).to_have_text(
        "Your top-up of $12.50 has arrived. Your balance is now $12.50.", timeout=15_000)
    await expect(page.locator("#balance")).to_have_text("$12.50")
    await expect(page.locator("#history tbody tr").first).to_contain_text("Top-up by card")
    await w.check("done")

    # Cancelled at the Checkout page: back on the cancel URL, nothing charged.
    await page.get_by_role("link", name="Top up", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Top up")
    await page.get_by_label("Amount (USD)").fill("5")
    await page.get_by_role("button", name="Continue to payment").click()
    await page.wait_for_url(stripe_fake.url + "/pay/**")
    await page.get_by_role("link", name="Cancel").click()
    await expect(page.get_by_role("heading", name="Payment cancelled")).to_be_visible()
    assert page.url == live.console_url + "/#/topup/cancelled"
    await expect(page.locator("#balance")).to_have_text("$12.50")
    await w.check("cancelled")
    await w.context.close()


async def test_top_ups_are_not_offered_when_no_payment_processor_is_configured(
        browser: Browser, live: LiveGateway) -> None:
    w = await watched(browser, live, "no-topup")
    await log_in(w, new_holder(live, "nopay"))
    await expect(w.page.get_by_role("link", name="Redeem a code").first).to_be_visible()
    await expect(w.page.get_by_role("link", name="Top up", exact=True)).to_be_hidden()
    await expect(w.page.get_by_role("link", name="Top up by card")).to_have_count(0)
    await w.go("topup", "Top up")
    await expect(w.page.get_by_text("Top-ups by card are not available")).to_be_visible()
    await expect(w.page.get_by_label("Amount (USD)")).to_have_count(0)
    await w.check("page")
    await w.context.close()


async def test_a_forgotten_password_is_reset_from_the_mailed_link_and_the_token_goes_nowhere_else(
        browser: Browser, money_live: LiveGateway, smtp: MockSmtp) -> None:
    live = money_live
    w = await watched(browser, live, "reset")
    page = w.page
    email = new_holder(live, "forgetful")
    sent: list[Any] = []
    w.context.on("request", lambda r: sent.append(r))

    await w.go("login", "Log in")
    await page.get_by_role("link", name="Forgot password?").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Forgot password")
    await w.check("ask")
    await tab_reaches(page, "Email")
    await page.get_by_label("Email", exact=True).fill(email)
    await page.get_by_role("button", name="Send the link").click()
    await expect(page.get_by_role("status")).to_have_text(
        "If an account uses this address, we sent it a link to reset the password.")
    link, token = await link_in_mail(smtp, email, "reset")
    assert link == f"{live.console_url}/#reset={token}"

    # The link: the token leaves the address bar at once.
    await page.goto(link)
    await expect(page.get_by_role("heading", level=1)).to_have_text("Choose a new password")
    assert token not in page.url and page.url.endswith("#/reset")
    await w.check("choose")
    await tab_reaches(page, "New password")
    new_password = "a new passphrase from the mail"
    await page.get_by_label("New password", exact=True).fill(new_password)
    await page.get_by_label("New password again").fill(new_password + "!")
    await page.get_by_role("button", name="Set password").click()
    await expect(page.get_by_role("alert")).to_contain_text("The two passwords are not the same")
    await expect(page.get_by_label("New password again")).to_be_focused()
    await page.get_by_label("New password again").fill(new_password)
    await page.get_by_role("button", name="Set password").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    await expect(page.get_by_role("status")).to_have_text(
        "Your password is changed. Log in with the new one.")
    await log_in(w, email, new_password)

    # The token went out in the body of the one POST that used it, nowhere else.
    carried = []
    for r in sent:
        headers = await r.all_headers()
        assert not headers.get("referer"), (r.url, headers)
        assert token not in r.url and token not in json.dumps(headers), r.url
        if token in (r.post_data or ""):
            carried.append((r.method, r.url))
    assert carried == [("POST", live.console_url + "/api/password-reset/confirm")]
    assert token not in await page.evaluate("location.href + document.body.innerHTML")

    # The same link again: refused in words, with a way to ask again.
    await page.goto(link)
    await page.get_by_label("New password", exact=True).fill(PASSWORD)
    await page.get_by_label("New password again").fill(PASSWORD)
    await page.get_by_role("button", name="Set password").click()
    await expect(page.get_by_role("alert")).to_have_text(
        "This password reset link has expired or was already used. Ask for a new one.")
    await expect(page.get_by_role("link", name="Ask for a new link")).to_be_visible()
    await w.check("spent")
    await w.context.close()


async def test_a_new_email_is_confirmed_from_the_mailed_link_and_low_balance_mail_is_opted_into(
        browser: Browser, money_live: LiveGateway, smtp: MockSmtp) -> None:
    live = money_live
    w = await watched(browser, live, "email")
    page = w.page
    email = new_holder(live, "mover")
    new_email = "moved-" + email
    await log_in(w, email)
    await page.get_by_role("link", name="Account", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Account")

    # The low-balance notice: off, then on at $2.50, then off again.
    threshold = page.get_by_label("Email me when the balance falls below (USD)")
    await expect(page.locator("#low-state")).to_have_text(
        "Off: we send no email about your balance.")
    await threshold.fill("2.50")
    await page.get_by_role("button", name="Turn on").click()
    await expect(page.get_by_role("status")).to_have_text(
        "We will email you when your balance falls below $2.50.")
    await expect(page.locator("#low-state")).to_contain_text("below $2.50")
    await expect(threshold).to_have_value("2.50")
    await w.check("settings")
    await page.get_by_role("button", name="Turn off").click()
    await expect(page.get_by_role("status")).to_have_text("Low-balance emails are off.")

    # Change the email: it waits for the link sent to the new address.
    change = page.locator("form", has=page.get_by_role("heading", name="Change email"))
    await change.get_by_label("New email").fill(new_email)
    await change.get_by_label("Current password").fill(PASSWORD)
    await change.get_by_role("button", name="Change email").click()
    await expect(page.get_by_role("status")).to_have_text(
        f"We sent a link to {new_email}: your email changes once you open it.")
    link, token = await link_in_mail(smtp, new_email, "confirm-email")

    # Opened logged out (another browser): confirmed, and the token is gone from the bar.
    other = await watched(browser, live, "email-confirm")
    await other.page.goto(link)
    await expect(other.page.get_by_role("heading", level=1)).to_have_text("Email confirmed")
    await expect(other.page.get_by_text(f"Your account's email is now {new_email}.")
                 ).to_be_visible()
    assert token not in other.page.url and other.page.url.endswith("#/confirm-email")
    await expect(other.page.get_by_role("link", name="Log in").last).to_be_visible()
    await other.check("confirmed")
    # Twice: refused in words.
    await other.page.goto(link)
    await expect(other.page.get_by_role("alert")).to_have_text(
        "This confirmation link has expired or was already used.")
    await other.check("spent")
    await other.context.close()

    await page.get_by_role("link", name="Overview").click()
    await expect(page.get_by_text(new_email)).to_be_visible()
    # Everything held about the account, downloaded from the Account page, says so too.
    await page.get_by_role("link", name="Account", exact=True).click()
    async with page.expect_download() as info:
        await page.get_by_role("link", name=re.compile("^your account, keys")).click()
    download = await info.value
    held = json.loads(await asyncio.to_thread(Path(await download.path()).read_text))
    assert held["account"]["email"] == new_email and held["object"] == "account_export"
    await w.context.close()


async def test_hostile_fragments_open_an_ordinary_page_and_keep_nothing(
        browser: Browser, live: LiveGateway) -> None:
    w = await watched(browser, live, "fragments")
    page = w.page
    for fragment in ("#constructor=abc", "#/constructor", "#/__proto__/x", "#reset=<img src=x>",
                     "#reset=" + "a" * 5000, "#topup=javascript:alert(1)", "#confirm-email=",
                     "#/reset", "#/topup/done"):
        await page.goto(f"{live.console_url}/{fragment}")
        await expect(page.get_by_role("heading", level=1)).to_be_visible()
        heading = await page.get_by_role("heading", level=1).text_content()
        assert heading in ("Log in", "Choose a new password"), (fragment, heading)
        assert await page.evaluate("Object.keys(window.flint.links).length") == 0
    # A reset page without its token (reloaded, say) says the link cannot be used.
    await expect(page.get_by_role("heading", level=1)).to_have_text("Log in")  # needs a login
    await page.goto(f"{live.console_url}/#/reset")
    await expect(page.get_by_role("heading", name="This link cannot be used")).to_be_visible()
    await expect(page.get_by_role("link", name="Ask for a new link")).to_be_visible()
    await w.check("no-token")
    await w.context.close()
