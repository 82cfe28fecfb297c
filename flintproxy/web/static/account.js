/* flintproxy console: the account holder's views (log in, sign up, overview, keys,
   usage with its uPlot chart, account settings with the low-balance notice, privacy).
   Money in is money.js; password reset and email confirmation are recovery.js. */
"use strict";
(function () {
  const { state, h, field, table, when, say, fail, api, ApiError, submitter, confirmDialog, go,
    page, updateNav, VIEWS } = window.flint;

  // ---- account holder views ------------------------------------------------------
  VIEWS.login = async () => {
    const form = h("form", { class: "card narrow", "aria-labelledby": "login-h" },
      h("h2", { id: "login-h", text: "Log in to your account" }),
      field("Email", { type: "email", name: "email", autocomplete: "username", required: true }),
      field("Password", { type: "password", name: "password", autocomplete: "current-password", required: true }),
      h("button", { type: "submit", text: "Log in" }));
    page("Log in", submitter(form, async (fd) => {
      const r = await api("POST", "/api/login", { email: fd.get("email"), password: fd.get("password") });
      state.me = await api("GET", "/api/account");
      go("#/overview", "Welcome back, " + r.account.email + ".");
    }), h("p", {}, h("a", { href: "#/forgot", text: "Forgot password?" })),
    h("p", {}, "No account yet? ", h("a", { href: "#/signup", text: "Sign up" }), "."));
  };
  VIEWS.signup = async () => {
    const form = h("form", { class: "card narrow", "aria-labelledby": "signup-h" },
      h("h2", { id: "signup-h", text: "Create an account" }),
      field("Email", { type: "email", name: "email", autocomplete: "username", required: true }),
      field("Password", { type: "password", name: "password", autocomplete: "new-password", required: true, minlength: 10 },
        "At least 10 characters. Stored only as a bcrypt hash."),
      h("button", { type: "submit", text: "Sign up" }));
    page("Sign up", submitter(form, async (fd) => {
      await api("POST", "/api/signup", { email: fd.get("email"), password: fd.get("password") });
      state.me = await api("GET", "/api/account");
      go("#/keys", "Your account is ready. Create an API key to start.");
    }), h("p", {}, "Already have an account? ", h("a", { href: "#/login", text: "Log in" }), "."));
  };
  VIEWS.overview = async () => {
    state.me = await api("GET", "/api/account");
    updateNav();
    page("Overview",
      h("section", { class: "card", "aria-labelledby": "bal-h" },
        h("h2", { id: "bal-h", text: "Balance" }),
        h("p", { class: "big", id: "balance", text: "$" + state.me.balance_usd }),
        h("p", { class: "hint", text: "Each request reserves what it may cost at most and is charged what it did cost." }),
        addFunds()),
      h("section", { class: "card", "aria-labelledby": "acc-h" },
        h("h2", { id: "acc-h", text: "Account" }),
        h("dl", { class: "facts" },
          h("dt", { text: "Email" }), h("dd", { text: state.me.email }),
          h("dt", { text: "Status" }), h("dd", { text: state.me.status }),
          h("dt", { text: "Member since" }), h("dd", { text: when(state.me.created_at) }))),
      h("p", {}, h("a", { href: "#/keys", text: "Manage API keys" }), " · ",
        h("a", { href: "#/usage", text: "See usage" })));
  };

  VIEWS.keys = async (_id, created) => {
    const list = await api("GET", "/api/keys");
    const shown = h("div", { id: "new-key" });
    const form = h("form", { class: "card narrow", "aria-labelledby": "newkey-h" },
      h("h2", { id: "newkey-h", text: "Create a key" }),
      field("Name", { name: "name", maxlength: 64 }, "So you can tell your keys apart."),
      field("Expires after (days)", { name: "days", type: "number", min: 1, max: 3650, inputmode: "numeric" },
        "Leave empty for a key that does not expire."),
      field("Allowed models", { name: "models" }, "Comma-separated, e.g. gpt-4o-mini. Leave empty for all models."),
      ...capFields({}),
      h("button", { type: "submit", text: "Create key" }));
    submitter(form, async (fd) => {
      const body = { name: fd.get("name") || "" };
      if (fd.get("days")) body.expires_in_days = Number(fd.get("days"));
      const models = String(fd.get("models") || "").split(",").map((s) => s.trim()).filter(Boolean);
      if (models.length) body.allowed_models = models;
      Object.assign(body, capBody(fd));
      await VIEWS.keys(null, await api("POST", "/api/keys", body));
    });
    // Spend caps: decimal USD strings, sent as typed (the server parses them exactly);
    // an empty field means no cap.
    function capFields(k) {
      return [
        field("Daily spend cap (USD)", { name: "cap_day", inputmode: "decimal", value: k.spend_cap_day_usd || "" },
          "The most this key may spend per UTC day. Leave empty for no cap."),
        field("Monthly spend cap (USD)", { name: "cap_month", inputmode: "decimal", value: k.spend_cap_month_usd || "" },
          "The most this key may spend per UTC month. Leave empty for no cap.")];
    }
    function capBody(fd) {
      const day = String(fd.get("cap_day") || "").trim(), month = String(fd.get("cap_month") || "").trim();
      return { spend_cap_day_usd: day || null, spend_cap_month_usd: month || null };
    }
    function capsText(k) {
      const part = (cap, spent, when, name) => cap === null ? "no " + name + " cap" : "$" + spent + " of $" + cap + " " + when;
      return part(k.spend_cap_day_usd, k.spent_today_usd, "today", "daily") + "; " +
        part(k.spend_cap_month_usd, k.spent_this_month_usd, "this month", "monthly");
    }
    function editCaps(k) {
      const edit = h("form", { class: "card narrow", "aria-labelledby": "caps-h" },
        h("h2", { id: "caps-h", text: "Spend caps of " + (k.name || k.display) }),
        ...capFields(k),
        h("button", { type: "submit", text: "Save caps" }));
      submitter(edit, async (fd) => {
        await api("PATCH", "/api/keys/" + k.id, capBody(fd));
        await VIEWS.keys();
        say("The spend caps of " + k.display + " are saved.");
      });
      shown.replaceChildren(edit);
      edit.querySelector("input").focus();
    }
    const rows = list.data.map((k) => [
      k.name || "(no name)", h("code", { text: k.display }), when(k.created_at), when(k.last_used_at),
      k.expires_at ? when(k.expires_at) : "never",
      k.allowed_models ? k.allowed_models.join(", ") : "all",
      k.revoked_at ? "-" : h("span", {}, capsText(k), " ",
        h("button", { type: "button", class: "small secondary", "aria-label": "Edit spend caps of " + (k.name || k.display),
          onclick: () => editCaps(k) }, "Edit")),
      k.revoked_at ? "revoked " + when(k.revoked_at) :
        h("button", { type: "button", class: "small danger", "aria-label": "Revoke key " + (k.name || k.display),
          onclick: async () => {
            if (!(await confirmDialog("Revoke the key " + k.display + "? Requests using it will fail at once. This cannot be undone.", "Revoke"))) return;
            try {
              await api("POST", "/api/keys/" + k.id + "/revoke");
              await VIEWS.keys();
              say("The key " + k.display + " is revoked.");
            } catch (e) { fail(e.message); }
          } }, "Revoke")]);
    page("API keys", shown, form, h("h2", { text: "Your keys" }),
      list.data.length ? table("API keys", ["Name", "Key", "Created", "Last used", "Expires", "Models", "Spend caps (UTC)", "State"], rows)
        : h("p", { text: "You have no keys yet." }));
    if (created) showKey(created);
    function showKey(k) {
      const code = h("code", { id: "key-plain", text: k.key });
      const copy = h("button", { type: "button", class: "secondary", text: "Copy key" });
      copy.addEventListener("click", async () => {
        try { await navigator.clipboard.writeText(k.key); say("Copied. Keep it somewhere safe."); }
        catch (e) { fail("Copying is not allowed here: select the key and copy it by hand."); }
      });
      shown.replaceChildren(h("section", { class: "card secret", "aria-labelledby": "secret-h" },
        h("h2", { id: "secret-h", text: "Your new key: copy it now" }),
        h("p", { text: "This is the only time the key is shown. We keep only a hash of it and cannot show it again." }),
        code, copy));
      copy.focus();
    }
  };

  // Usage: filters, a paged table, a daily chart (uPlot, loaded when first needed).
  let uplotLoading = null;
  function loadUplot() {
    if (window.uPlot) return Promise.resolve();
    if (!uplotLoading) {
      const root = document.documentElement;
      uplotLoading = new Promise((resolve, reject) => {
        document.head.append(h("link", { rel: "stylesheet", href: root.dataset.uplotCss }));
        const s = h("script", { src: root.dataset.uplotJs });
        s.addEventListener("load", resolve);
        s.addEventListener("error", () => reject(new ApiError("The chart could not be loaded.", 0, null)));
        document.head.append(s);
      });
    }
    return uplotLoading;
  }
  function usageQuery(fd) {
    const q = new URLSearchParams();
    for (const k of ["key_id", "model"]) if (fd.get(k)) q.set(k, fd.get(k));
    if (fd.get("since")) q.set("since", fd.get("since") + "T00:00:00Z");
    if (fd.get("until")) {
      const d = new Date(fd.get("until") + "T00:00:00Z");
      d.setUTCDate(d.getUTCDate() + 1);
      q.set("until", d.toISOString());
    }
    return q;
  }
  let chart = null;
  window.addEventListener("resize", () => {
    if (chart && chart.root.isConnected) {
      chart.setSize({ width: Math.max(280, chart.root.parentNode.clientWidth - 16), height: 280 });
    }
  });
  VIEWS.usage = async () => {
    const keys = (await api("GET", "/api/keys")).data;
    const filters = h("form", { class: "card", "aria-labelledby": "filter-h" },
      h("h2", { id: "filter-h", text: "Filter" }),
      h("div", { class: "row" },
        field("API key", { tag: "select", name: "key_id", options: [h("option", { value: "", text: "All keys" }),
          ...keys.map((k) => h("option", { value: k.id, text: (k.name || "(no name)") + " " + k.display }))] }),
        field("Model", { name: "model", placeholder: "all models" }),
        field("From (UTC)", { name: "since", type: "date" }),
        field("To (UTC, inclusive)", { name: "until", type: "date" })),
      h("button", { type: "submit", text: "Apply" }));
    const chartBox = h("div", { class: "chart", id: "chart", role: "img", "aria-label": "Daily tokens and cost" });
    const chartNote = h("p", { class: "hint", id: "chart-summary" });
    const tableBox = h("div", { id: "usage-table" });
    const pager = h("div", { class: "row" });
    const exportBox = h("p", {});
    const del = h("button", { type: "button", class: "danger", text: "Delete all my usage records" });
    del.addEventListener("click", async () => {
      if (!(await confirmDialog("Delete every usage record of this account now? Your balance stays as it is. This cannot be undone.", "Delete records"))) return;
      try {
        const r = await api("POST", "/api/usage/delete");
        say(r.deleted + " usage records deleted.");
        await load(new FormData(filters));
      } catch (e) { fail(e.message); }
    });
    page("Usage", filters,
      h("h2", { text: "Per day" }), chartBox, chartNote,
      h("h2", { text: "Requests" }), tableBox, pager,
      h("h2", { text: "Export and delete" }), exportBox,
      h("p", { class: "hint", text: "Usage records hold model, token counts, cost and times; never what was sent or received." }),
      del);
    let cursors = [];
    async function load(fd, cursor) {
      const q = usageQuery(fd);
      const csv = new URLSearchParams(q); csv.set("format", "csv");
      const json = new URLSearchParams(q); json.set("format", "json");
      exportBox.replaceChildren(
        h("a", { class: "button secondary", href: "/api/usage/export?" + csv, download: "flintproxy-usage.csv", text: "Download CSV" }), " ",
        h("a", { class: "button secondary", href: "/api/usage/export?" + json, download: "flintproxy-usage.json", text: "Download JSON" }));
      const pq = new URLSearchParams(q); pq.set("limit", "25");
      if (cursor) pq.set("cursor", cursor);
      const [pageData, daily] = await Promise.all([
        api("GET", "/api/usage?" + pq), api("GET", "/api/usage/daily?" + q)]);
      tableBox.replaceChildren(pageData.data.length
        ? table("Usage records, newest first", ["Time", "Model", "Key", "Prompt", "Completion", "Cost (USD)", "Status"],
          pageData.data.map((r) => [when(r.started_at_ms / 1000), r.model, r.key_id === null ? "-" : String(r.key_id),
            r.prompt_tokens, r.completion_tokens, r.cost_usd, r.outcome]))
        : h("p", { text: "No usage in this range." }));
      const prev = h("button", { type: "button", class: "secondary", text: "Newer", disabled: cursors.length === 0 });
      prev.addEventListener("click", () => { cursors.pop(); load(fd, cursors[cursors.length - 1]); });
      const next = h("button", { type: "button", class: "secondary", text: "Older", disabled: !pageData.has_more });
      next.addEventListener("click", () => { cursors.push(pageData.next_cursor); load(fd, pageData.next_cursor); });
      pager.replaceChildren(prev, next);
      await drawChart(daily);
    }
    async function drawChart(daily) {
      const days = daily.data;
      const tokens = days.reduce((a, d) => a + d.total_tokens, 0);
      const cost = days.reduce((a, d) => a + d.cost_nano, 0);
      chartNote.textContent = days.length + (days.length === 1 ? " day" : " days") + " with usage: " +
        tokens + " tokens, $" + (cost / 1e9).toFixed(6) + " in total.";
      await loadUplot();
      const width = Math.max(280, chartBox.clientWidth - 16);
      // Every day of the range, zero where there was no usage.
      const byDay = new Map(days.map((d) => [d.day_start, d]));
      const xs = [];
      for (let t = Math.floor(daily.since / 86400) * 86400; t < daily.until; t += 86400) xs.push(t);
      const data = [xs, xs.map((t) => (byDay.get(t) || { total_tokens: 0 }).total_tokens),
        xs.map((t) => (byDay.get(t) || { cost_nano: 0 }).cost_nano / 1e9)];
      chartBox.replaceChildren();
      if (chart) chart.destroy();
      chart = new window.uPlot({
        width, height: 280,
        scales: { x: { time: true, range: (u, min, max) => [min - 43200, max + 43200] } },
        series: [{}, { label: "Tokens", stroke: "#9a3412", fill: "rgba(154, 52, 18, 0.35)", width: 1, scale: "tok",
          paths: window.uPlot.paths.bars({ size: [0.6, 40] }), points: { show: false } },
          { label: "Cost (USD)", stroke: "#1d4ed8", width: 2, scale: "usd", points: { show: true },
            value: (u, v) => v === null ? "-" : "$" + v.toFixed(6) }],
        axes: [{}, { scale: "tok", label: "tokens" },
          { scale: "usd", side: 1, label: "USD", grid: { show: false }, size: 70,
            values: (u, vals) => vals.map((v) => "$" + Number(v.toPrecision(2))) }],
      }, data, chartBox);
    }
    submitter(filters, async (fd) => { cursors = []; await load(fd); });
    await load(new FormData(filters));
  };

  VIEWS.settings = async () => {
    state.me = await api("GET", "/api/account");
    const email = h("form", { class: "card narrow", "aria-labelledby": "email-h" },
      h("h2", { id: "email-h", text: "Change email" }),
      field("New email", { type: "email", name: "new_email", required: true, autocomplete: "email" }),
      field("Current password", { type: "password", name: "password", required: true, autocomplete: "current-password" }),
      h("button", { type: "submit", text: "Change email" }));
    const pw = h("form", { class: "card narrow", "aria-labelledby": "pw-h" },
      h("h2", { id: "pw-h", text: "Change password" }),
      field("Current password", { type: "password", name: "current_password", required: true, autocomplete: "current-password" }),
      field("New password", { type: "password", name: "new_password", required: true, minlength: 10, autocomplete: "new-password" },
        "At least 10 characters. Your other sessions are logged out."),
      h("button", { type: "submit", text: "Change password" }));
    const close = h("form", { class: "card narrow", "aria-labelledby": "close-h" },
      h("h2", { id: "close-h", text: "Close account" }),
      h("p", { text: "Closing erases your email and password hash and revokes every key at once. Usage records (counts and fees only) are kept up to 90 days, then purged; delete them first on the Usage page if you want them gone now." }),
      field("Password", { type: "password", name: "password", required: true, autocomplete: "current-password" }),
      h("button", { type: "submit", class: "danger", text: "Close my account" }));
    page("Account", h("p", {}, "Signed in as ", h("strong", { text: state.me.email }), "."), email, pw,
      lowBalanceForm(), close,
      h("p", {}, "Everything we hold about you: ", h("a", { href: "/api/account/export", download: "flintproxy-account.json", text: "your account, keys, balance history and usage (JSON)" }),
        "; or ", h("a", { href: "/api/usage/export?format=json", download: "flintproxy-usage.json", text: "your usage records" }), " alone."));
    submitter(email, async (fd) => {
      const r = await api("POST", "/api/account/email", { new_email: fd.get("new_email"), password: fd.get("password") });
      email.reset();
      await VIEWS.settings();
      // With email on, the change waits for the new address's confirmation link.
      say(r.pending_email ? "We sent a link to " + r.pending_email + ": your email changes once you open it."
        : "Your email is now " + state.me.email + ".");
    });
    submitter(pw, async (fd) => {
      await api("POST", "/api/account/password", { current_password: fd.get("current_password"), new_password: fd.get("new_password") });
      pw.reset();
      say("Your password is changed.");
    });
    submitter(close, async (fd) => {
      if (!(await confirmDialog("Close this account for good? Your keys stop working at once and you are logged out.", "Close account"))) return;
      await api("POST", "/api/account/delete", { password: fd.get("password") });
      state.me = null;
      go("#/login", "Your account is closed.");
    });
  };

  // ---- money and notices (beside the views above; money.js has the money pages) -----
  function addFunds() {
    return h("p", {}, h("a", { href: "#/redeem", text: "Redeem a code" }),
      state.me.topups ? [" · ", h("a", { href: "#/topup", text: "Top up by card" })] : null);
  }
  // The opt-in low-balance email (POST /api/account/low-balance; null opts out).
  function lowBalanceForm() {
    const on = state.me.low_balance_usd;
    const form = h("form", { class: "card narrow", "aria-labelledby": "low-h" },
      h("h2", { id: "low-h", text: "Low-balance email" }),
      h("p", { id: "low-state", text: on ? "We email you once when your balance falls below $" + on + "."
        : "Off: we send no email about your balance." }),
      field("Email me when the balance falls below (USD)", { name: "threshold_usd", type: "number", required: true,
        min: "0.01", max: "1000000", step: "0.01", inputmode: "decimal", value: on || "" }),
      h("button", { type: "submit", text: on ? "Save threshold" : "Turn on" }),
      on ? h("button", { type: "button", class: "secondary", text: "Turn off", onclick: () => setLow(null) }) : null);
    async function setLow(threshold) {
      try {
        const r = await api("POST", "/api/account/low-balance", { threshold_usd: threshold });
        await VIEWS.settings();
        say(r.threshold_usd ? "We will email you when your balance falls below $" + r.threshold_usd + "."
          : "Low-balance emails are off.");
      } catch (e) { fail(e.message); }
    }
    form.addEventListener("submit", (ev) => { ev.preventDefault(); setLow(String(new FormData(form).get("threshold_usd"))); });
    return form;
  }

  VIEWS.privacy = async () => {
    const li = (t) => h("li", { text: t });
    page("Privacy",
      h("section", { class: "card", "aria-labelledby": "keep-h" },
        h("h2", { id: "keep-h", text: "What we keep" }),
        h("ul", { class: "promises" },
          li("Your account: an email address and a bcrypt hash of your password. Nothing else personal."),
          li("Your API keys as SHA-256 hashes only. A key is shown once, when you create it."),
          li("Usage records: model, token counts, cost and times, so you can be billed and see what you spent."),
          li("One cookie, for being logged in (plus its anti-forgery token). No tracking."))),
      h("section", { class: "card", "aria-labelledby": "long-h" },
        h("h2", { id: "long-h", text: "For how long" }),
        h("ul", { class: "promises" },
          li("Your account and keys: until you close the account; closing erases the email and password hash at once."),
          li("Usage records: up to 90 days after the account is closed, then purged. You can delete them yourself at any time."),
          li("Your IP address: in memory only, for rate limiting and abuse detection; never written to disk or logs."))),
      h("section", { class: "card", "aria-labelledby": "never-h" },
        h("h2", { id: "never-h", text: "What we never keep" }),
        h("ul", { class: "promises" },
          li("What you send to a model and what it answers: never written to disk, a log, or anywhere else."),
          li("Card data: a payment processor holds it; it never passes through this service."),
          li("Where the provider offers the choice, your content is not stored there either."))),
      h("section", { class: "card", "aria-labelledby": "rights-h" },
        h("h2", { id: "rights-h", text: "Your rights" }),
        h("p", { text: "You can see, correct, export and delete your data, and close your account, from this console or through the API." })));
  };
})();
