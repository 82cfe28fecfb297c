/* flintproxy console: the operator's views (find accounts, one account's money,
   limits, status and keys, the audit log); /api/admin/ answers 403 to anyone else. */
"use strict";
(function () {
  const { h, field, table, when, say, fail, api, submitter, confirmDialog, page, VIEWS } = window.flint;

  // ---- operator views ----------------------------------------------------------
  VIEWS.admin = async (id) => {
    if (id) return adminAccount(id);
    const results = h("div", { id: "results" });
    const form = h("form", { class: "card narrow", role: "search", "aria-labelledby": "find-h" },
      h("h2", { id: "find-h", text: "Find an account" }),
      field("Email contains", { type: "search", name: "email", required: true }),
      h("button", { type: "submit", text: "Search" }));
    page("Operators", submitter(form, async (fd) => {
      const r = await api("GET", "/api/admin/accounts?" + new URLSearchParams({ email: fd.get("email") }));
      results.replaceChildren(r.data.length ? table("Accounts found", ["Email", "Status", "Balance (USD)", "Keys", "Requests", "Cost (USD)"],
        r.data.map((a) => [h("a", { href: "#/admin/" + a.id, text: a.email }), a.status, a.balance_usd,
          a.live_keys, a.usage.requests, a.usage.cost_usd]))
        : h("p", { text: "No account matches." }));
    }), results);
  };
  async function adminAccount(id) {
    const a = await api("GET", "/api/admin/accounts/" + encodeURIComponent(id));
    const reload = async (text) => { await adminAccount(id); say(text); };
    const money = h("form", { class: "card narrow", "aria-labelledby": "money-h" },
      h("h2", { id: "money-h", text: "Credit or debit" }),
      field("Amount (USD)", { name: "amount_usd", required: true, inputmode: "decimal", pattern: "[0-9]+(\\.[0-9]{1,9})?" }, "For example 5.00"),
      field("Note", { name: "note", required: true, maxlength: 500 }, "Required: why (kept in the audit log)."),
      h("button", { type: "submit", name: "op", value: "credit", text: "Credit" }),
      h("button", { type: "submit", name: "op", value: "debit", class: "secondary", text: "Debit" }));
    money.addEventListener("submit", (ev) => { money.dataset.op = ev.submitter ? ev.submitter.value : "credit"; }, true);
    submitter(money, async (fd) => {
      const op = money.dataset.op || "credit";
      await api("POST", "/api/admin/accounts/" + a.id + "/" + op, { amount_usd: fd.get("amount_usd"), note: fd.get("note") });
      await reload((op === "credit" ? "Credited $" : "Debited $") + fd.get("amount_usd") + ".");
    });
    const limits = h("form", { class: "card narrow", "aria-labelledby": "lim-h" },
      h("h2", { id: "lim-h", text: "Limits" }),
      field("Requests per minute", { name: "rpm", type: "number", min: 1, value: a.limits.rpm ?? "" }, "Empty: the configured default."),
      field("Tokens per minute", { name: "tpm", type: "number", min: 1, value: a.limits.tpm ?? "" }),
      field("Requests at once", { name: "max_concurrent", type: "number", min: 1, value: a.limits.max_concurrent ?? "" }),
      field("Note", { name: "note", maxlength: 500 }),
      h("button", { type: "submit", text: "Set limits" }));
    submitter(limits, async (fd) => {
      const num = (k) => (fd.get(k) ? Number(fd.get(k)) : null);
      await api("POST", "/api/admin/accounts/" + a.id + "/limits",
        { rpm: num("rpm"), tpm: num("tpm"), max_concurrent: num("max_concurrent"), note: fd.get("note") || "" });
      await reload("Limits saved.");
    });
    const disabled = a.status === "disabled";
    const toggle = h("button", { type: "button", class: disabled ? "" : "danger", text: disabled ? "Enable account" : "Disable account" });
    toggle.addEventListener("click", async () => {
      if (!disabled && !(await confirmDialog("Disable " + a.email + "? Its keys stop working within a second.", "Disable"))) return;
      try {
        await api("POST", "/api/admin/accounts/" + a.id + "/" + (disabled ? "enable" : "disable"), { note: "" });
        await reload(disabled ? "Account enabled." : "Account disabled.");
      } catch (e) { fail(e.message); }
    });
    const keyRows = a.keys.map((k) => [k.name || "(no name)", h("code", { text: k.display }), when(k.created_at), when(k.last_used_at),
      k.revoked_at ? "revoked" : h("button", { type: "button", class: "small danger", "aria-label": "Revoke key " + k.display,
        onclick: async () => {
          if (!(await confirmDialog("Revoke the key " + k.display + "?", "Revoke"))) return;
          try { await api("POST", "/api/admin/keys/" + k.id + "/revoke", { note: "" }); await reload("Key revoked."); }
          catch (e) { fail(e.message); }
        } }, "Revoke")]);
    page("Account " + (a.email || "#" + a.id),
      h("p", {}, h("a", { href: "#/admin", text: "Back to search" })),
      h("section", { class: "card", "aria-labelledby": "sum-h" },
        h("h2", { id: "sum-h", text: "Summary" }),
        h("dl", { class: "facts" },
          h("dt", { text: "Status" }), h("dd", { id: "acct-status", text: a.status + (a.operator ? " (operator)" : "") }),
          h("dt", { text: "Balance" }), h("dd", { id: "acct-balance", text: "$" + a.balance_usd }),
          h("dt", { text: "Credited" }), h("dd", { text: "$" + a.credited_usd }),
          h("dt", { text: "Charged" }), h("dd", { text: "$" + a.charged_usd }),
          h("dt", { text: "Requests" }), h("dd", { text: String(a.usage.requests) }),
          h("dt", { text: "Tokens" }), h("dd", { text: String(a.usage.prompt_tokens + a.usage.completion_tokens) }),
          h("dt", { text: "Created" }), h("dd", { text: when(a.created_at) })),
        toggle),
      money, limits, h("h2", { text: "Keys" }),
      keyRows.length ? table("Keys of this account", ["Name", "Key", "Created", "Last used", "State"], keyRows)
        : h("p", { text: "No keys." }));
  }
  VIEWS.audit = async () => {
    const r = await api("GET", "/api/admin/audit?limit=100");
    page("Audit log", h("p", { class: "hint", text: "Every operator action: who, what, when and why. Never content, never IP addresses." }),
      r.data.length ? table("Operator actions, newest first", ["Time", "Operator", "Action", "Account", "Key", "Amount (USD)", "Note"],
        r.data.map((e) => [when(e.created_at), e.operator_email || (e.operator_id === null ? "command line" : "#" + e.operator_id),
          e.action.replace(/_/g, " "), e.target_email || (e.target_account_id === null ? "-" : "#" + e.target_account_id),
          e.target_key_id === null ? "-" : String(e.target_key_id), e.amount_usd || "-", e.note || "-"]))
        : h("p", { text: "No operator actions yet." }));
  };
})();
