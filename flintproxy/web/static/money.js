/* flintproxy console: money in (redeem a code, top up through Stripe Checkout, the
   pages Checkout returns to) and the balance's history (GET /api/account/ledger).
   Card data never reaches this page: a top-up sends the browser to the Checkout URL
   the API returns, and the balance changes only once Stripe's webhook has arrived,
   which the return page waits for by polling /api/account for a short while. */
"use strict";
(function () {
  const { state, h, field, table, when, say, api, submitter, page, updateNav, VIEWS } = window.flint;
  const POLL_MS = 1000;        // the return page asks for the balance this often...
  const POLL_FOR_MS = 30000;   // ...for this long (Stripe usually confirms in seconds)
  const PENDING = "flint.topup"; // sessionStorage (this tab only): the balance before paying

  const REASONS = { credit: "Credit from an operator", adjustment: "Adjustment by an operator",
    redemption: "Redeemed code", topup: "Top-up by card" };

  async function refreshAccount() {
    state.me = await api("GET", "/api/account");
    updateNav();
    return state.me;
  }
  function balanceCard() {
    return h("section", { class: "card", "aria-labelledby": "bal-h" },
      h("h2", { id: "bal-h", text: "Balance" }),
      h("p", { class: "big", id: "balance", text: "$" + state.me.balance_usd }));
  }
  // The newest balance changes, redrawn into its box after each change.
  async function drawHistory(box) {
    const entries = (await api("GET", "/api/account/ledger")).data;
    box.replaceChildren(h("h2", { text: "Balance history" }), entries.length
      ? table("Newest balance changes", ["When", "Change (USD)", "What"], entries.map((e) => [
        when(e.created_at_ms / 1000), (e.amount_nano > 0 ? "+" : "") + e.amount_usd,
        REASONS[e.reason] || e.reason]))
      : h("p", { text: "No credits yet: redeem a code or top up to add funds." }));
  }
  async function showBalance(box) {
    await refreshAccount();
    document.getElementById("balance").textContent = "$" + state.me.balance_usd;
    await drawHistory(box);
  }

  VIEWS.redeem = async () => {
    await refreshAccount();
    const history = h("div", { id: "history" });
    const form = h("form", { class: "card narrow", "aria-labelledby": "redeem-h" },
      h("h2", { id: "redeem-h", text: "Enter a code" }),
      field("Code", { name: "code", required: true, autocomplete: "off", spellcheck: "false",
        autocapitalize: "characters", maxlength: 64 }, "For example FLINT-XXXX-XXXX-XXXX-XXXX. A code works once."),
      h("button", { type: "submit", text: "Redeem" }));
    const input = form.querySelector("input");
    submitter(form, async (fd) => {
      let done;
      try {
        done = await api("POST", "/api/redeem", { code: String(fd.get("code")).trim() });
      } catch (e) {
        // The alert says why; the field says it is the culprit and keeps the focus.
        input.setAttribute("aria-invalid", "true");
        input.focus();
        throw e;
      }
      input.removeAttribute("aria-invalid");
      form.reset();
      await showBalance(history);
      say("Redeemed $" + done.amount_usd + ". Your balance is now $" + done.balance_usd + ".");
    });
    page("Redeem a code", balanceCard(), form, history);
    await drawHistory(history);
  };

  // #/topup, and #/topup/done or #/topup/cancelled when Stripe Checkout sends the browser back.
  VIEWS.topup = async (back) => {
    await refreshAccount();
    const limits = state.me.topups;
    const history = h("div", { id: "history" });
    if (!limits) {
      page("Top up", balanceCard(), h("p", { text: "Top-ups by card are not available on this server. Redeem a code instead, or ask the operator." }),
        h("p", {}, h("a", { href: "#/redeem", text: "Redeem a code" })), history);
      return drawHistory(history);
    }
    const form = h("form", { class: "card narrow", "aria-labelledby": "topup-h" },
      h("h2", { id: "topup-h", text: "Top up by card" }),
      field("Amount (USD)", { name: "amount_usd", type: "number", required: true, step: "0.01",
        min: limits.min_usd, max: limits.max_usd, inputmode: "decimal" },
      "Between $" + limits.min_usd + " and $" + limits.max_usd + ". You pay at Stripe; your card details never reach this server."),
      h("button", { type: "submit", text: "Continue to payment" }));
    submitter(form, async (fd) => {
      const before = state.me.balance_nano;
      const r = await api("POST", "/api/topups", { amount_usd: String(fd.get("amount_usd")) });
      sessionStorage.setItem(PENDING, JSON.stringify({ before, amount_usd: r.amount_usd }));
      say("Opening the payment page for $" + r.amount_usd + "…");
      location.assign(r.url);
    });
    const outcome = back === "done" ? returned()
      : back === "cancelled" ? cancelled() : null;
    page(back === "done" ? "Payment received" : "Top up", balanceCard(), outcome, form, history);
    await drawHistory(history);
    if (back === "done") waitForCredit(history);
  };

  function cancelled() {
    sessionStorage.removeItem(PENDING);
    return h("section", { class: "card", "aria-labelledby": "back-h" },
      h("h2", { id: "back-h", text: "Payment cancelled" }),
      h("p", { text: "You cancelled at the payment page: nothing was charged and your balance is unchanged." }));
  }
  function returned() {
    return h("section", { class: "card", "aria-labelledby": "back-h" },
      h("h2", { id: "back-h", text: "Thank you" }),
      h("p", { id: "topup-state", role: "status", text: "Payment received. Your balance updates when Stripe confirms it, usually within seconds." }));
  }
  // Poll the balance until it has grown past what it was before paying (or give up).
  async function waitForCredit(history) {
    let pending = null;
    try { pending = JSON.parse(sessionStorage.getItem(PENDING) || "null"); } catch (e) { pending = null; }
    const note = document.getElementById("topup-state");
    if (!pending || typeof pending.before !== "number") return;
    const deadline = Date.now() + POLL_FOR_MS;
    while (Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (!note.isConnected) return; // the holder went elsewhere
      let me;
      try { me = await api("GET", "/api/account"); } catch (e) { continue; }
      if (me.balance_nano > pending.before) {
        sessionStorage.removeItem(PENDING);
        state.me = me;
        await showBalance(history).catch(() => {});
        note.textContent = "Your top-up of $" + pending.amount_usd + " has arrived. Your balance is now $" + me.balance_usd + ".";
        return;
      }
    }
    note.textContent = "Stripe has not confirmed the payment yet. It can take a few minutes: reload this page later to see your balance.";
  }
})();
