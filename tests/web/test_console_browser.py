"""The web console in a real browser: Debian's Chromium driven by Playwright.

Two journeys against a real ``flintproxy serve`` (and the real mock upstream): an
account holder from sign-up to closing the account, with the ``openai`` SDK using
the key the console showed; and an operator granted from the command line who
finds that account, credits it with a note and sees it in the audit log.

On every page: each request the page makes must go to the console's own origin,
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

from tests.conftest import raw_config
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


class Watched:
    """A browser context whose every request, error and page is checked."""

    def __init__(self, context: BrowserContext, page: Page, origin: str, name: str) -> None:
        self.context, self.page, self.origin, self.name = context, page, origin, name
        self.requests: list[str] = []
        self.errors: list[str] = []
        context.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not _EXPECTED_CONSOLE.search(msg.text):
            self.errors.append(f"console: {msg.text}")

    async def check(self, shot: str) -> None:
        """Same origin only, no errors, no serious a11y violation; screenshots."""
        foreign = [u for u in self.requests
                   if not u.startswith(self.origin + "/") and not u.startswith(("data:", "blob:"))]
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
