/* flintproxy console, the core: DOM helpers, the API client, forms, views by URL
   fragment (#/keys). account.js, money.js, recovery.js and operator.js add their views
   to flint.VIEWS; the page starts once all have run (they are deferred, in order).
   Emailed links and Stripe's return URLs land as "#name=value" (#reset=TOKEN,
   #confirm-email=TOKEN, #topup=done): the value is read into memory and the address
   bar rewritten at once (history.replaceState), so a token stays in no history entry.
   No HTML built from strings: every value goes in through textContent. */
"use strict";
(function () {
  const main = document.getElementById("main");
  const statusBox = document.getElementById("status");
  const alertBox = document.getElementById("alert");
  const state = { me: null }; // me: the account, or null when logged out

  // ---- DOM helpers -------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  let uid = 0;
  function field(label, attrs, hint) {
    const id = "f" + (++uid);
    const hintId = hint ? id + "-hint" : null;
    const input = attrs.tag === "select"
      ? h("select", { id, name: attrs.name }, attrs.options || [])
      : h("input", Object.assign({ id, "aria-describedby": hintId }, attrs));
    return h("div", {}, h("label", { for: id, text: label }), input,
      hint ? h("p", { class: "hint", id: hintId, text: hint }) : null);
  }
  function say(text) { alertBox.textContent = ""; statusBox.textContent = text; }
  function fail(text) { statusBox.textContent = ""; alertBox.textContent = text; }
  function clearMessages() { statusBox.textContent = ""; alertBox.textContent = ""; }
  function when(secs) {
    if (secs === null || secs === undefined) return "never";
    return new Date(secs * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }
  function table(caption, heads, rows) {
    return h("div", { class: "table-wrap" }, h("table", { class: "stack" },
      h("caption", { text: caption }),
      h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) =>
        h("td", { "data-label": heads[i], class: typeof c === "number" ? "num" : null },
          c)))))));
  }

  // ---- the API -----------------------------------------------------------------
  const SENTENCES = {
    invalid_credentials: "That email and password do not match an account.",
    email_taken: "An account with this email already exists. Log in instead?",
    password_too_short: "Choose a password of at least 10 characters.",
    password_too_long: "That password is too long: 72 bytes at most.",
    not_logged_in: "You are not logged in. Please log in.",
    invalid_session: "Your session has ended. Please log in again.",
    csrf_failed: "This page's session is out of date. Please reload the page.",
    account_disabled: "This account is disabled. You can still read, export and delete its data.",
    not_operator: "Only operators may do this.",
    invalid_code: "That code is not valid: it may be mistyped, already used or expired.",
    email_disabled: "This server sends no email, so a password cannot be reset here. Please ask the operator.",
    payments_disabled: "Top-ups are not available on this server.",
    note_required: "Please write a note saying why: it is kept in the audit log.",
    insufficient_balance: null, // the server's sentence names the amounts
  };
  class ApiError extends Error {
    constructor(message, status, code) { super(message); this.status = status; this.code = code; }
  }
  function csrf() {
    const m = document.cookie.match(/(?:^|; )flint_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : "";
  }
  async function api(method, path, body) {
    const opts = { method, headers: {}, credentials: "same-origin" };
    if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf();
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError("The console cannot reach the gateway. Check your connection and try again.", 0, null);
    }
    if (resp.status === 204) return null;
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      // A wrong password when confirming a change names the field; a failed login does not.
      let text = err.code === "invalid_credentials" && err.param
        ? "That password is not right." : SENTENCES[err.code] || err.message;
      if (resp.status === 429) {
        const wait = resp.headers.get("Retry-After");
        text = "Too many attempts. Please wait" + (wait ? " " + wait + " seconds" : " a moment") + " and try again.";
      }
      if (!text) text = "Something went wrong (HTTP " + resp.status + "). Please try again.";
      throw new ApiError(text, resp.status, err.code || null);
    }
    return data;
  }
  // Run a form's action with its button disabled; show the outcome as a sentence.
  function submitter(form, action) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const btn = form.querySelector("button[type=submit]");
      if (btn) btn.disabled = true;
      clearMessages();
      try {
        await action(new FormData(form));
      } catch (e) {
        if (e instanceof ApiError && (e.code === "invalid_session" || e.code === "not_logged_in")) {
          state.me = null; go("#/login");
        }
        fail(e.message);
      } finally {
        if (btn) btn.disabled = false;
      }
    });
    return form;
  }
  function confirmDialog(text, okLabel) {
    const dlg = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-ok").textContent = okLabel || "Confirm";
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
      dlg.returnValue = "";
      dlg.showModal();
    });
  }

  // ---- routing -----------------------------------------------------------------
  let pending = null; // a sentence to show once the next view is drawn
  function go(hash, message) {
    pending = message || null;
    if (location.hash === hash) render(); else location.hash = hash;
  }
  function page(title, ...kids) {
    document.title = title + " · flintproxy console";
    main.replaceChildren(h("h1", { text: title }), ...kids);
    main.focus();
  }
  function updateNav() {
    for (const li of document.querySelectorAll("#nav li")) {
      const w = li.dataset.when;
      li.hidden = (w === "in" && !state.me) || (w === "out" && !!state.me) ||
        (w === "operator" && !(state.me && state.me.operator)) ||
        (w === "topups" && !(state.me && state.me.topups));
    }
    const here = location.hash.split("?")[0];
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.getAttribute("href") === here) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }
  const VIEWS = {};
  // Views for anyone, logged in or not; the rest need a login.
  const OPEN = new Set(["login", "signup", "privacy", "forgot", "reset", "confirm-email"]);
  // "#name=value" links: the view each opens, and the value (kept here only, in memory).
  const LINKS = { reset: () => "#/reset", "confirm-email": () => "#/confirm-email",
    topup: (v) => "#/topup/" + v };
  const links = {};
  function takeLink() {
    const m = /^#([a-z-]+)=([A-Za-z0-9_-]{1,128})$/.exec(location.hash);
    if (!m || !Object.hasOwn(LINKS, m[1])) return;
    links[m[1]] = m[2];
    history.replaceState(null, "", location.pathname + location.search + LINKS[m[1]](m[2]));
  }
  async function render() {
    takeLink();
    const [path, id] = location.hash.replace(/^#\/?/, "").split("/");
    const name = Object.hasOwn(VIEWS, path) ? path : (state.me ? "overview" : "login");
    const view = VIEWS[name];
    if (!OPEN.has(name) && !state.me) { updateNav(); return go("#/login"); }
    if ((name === "login" || name === "signup" || name === "forgot") && state.me) return go("#/overview");
    updateNav();
    try {
      await view(id);
      if (pending) { say(pending); pending = null; }
    } catch (e) {
      if (e instanceof ApiError && (e.code === "invalid_session" || e.code === "not_logged_in")) {
        state.me = null; return go("#/login");
      }
      page("Something went wrong");
      fail(e.message);
    }
  }
  window.addEventListener("hashchange", () => { clearMessages(); render(); });

  // ---- start -------------------------------------------------------------------
  // The skip link moves focus; following "#main" would change the view.
  document.querySelector(".skip").addEventListener("click", (ev) => { ev.preventDefault(); main.focus(); });
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (e) { /* the cookies are cleared anyway */ }
    state.me = null;
    go("#/login", "You are logged out.");
  });
  // After the other scripts (deferred scripts run in order, before this event).
  document.addEventListener("DOMContentLoaded", async () => {
    try { state.me = await api("GET", "/api/account"); } catch (e) { state.me = null; }
    render();
  });

  window.flint = { state, h, field, table, when, say, fail, api, ApiError, submitter,
    confirmDialog, go, page, updateNav, VIEWS, links };
})();
