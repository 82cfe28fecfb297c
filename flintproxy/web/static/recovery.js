/* flintproxy console: getting back into an account (forgot password, the emailed
   #reset=TOKEN link) and confirming a new email address (#confirm-email=TOKEN).
   Both pages work logged out. The token arrives in the URL fragment (never sent to any
   server by the browser), console.js moves it out of the address bar into memory at
   once, and it leaves this page only in the body of the one POST that uses it. */
"use strict";
(function () {
  const { state, h, field, say, fail, api, ApiError, submitter, go, page, updateNav, VIEWS,
    links } = window.flint;

  VIEWS.forgot = async () => {
    const form = h("form", { class: "card narrow", "aria-labelledby": "forgot-h" },
      h("h2", { id: "forgot-h", text: "Reset your password by email" }),
      field("Email", { type: "email", name: "email", autocomplete: "username", required: true },
        "We send a link to this address if it belongs to an account. The link works once, for 30 minutes."),
      h("button", { type: "submit", text: "Send the link" }));
    page("Forgot password", submitter(form, async (fd) => {
      const r = await api("POST", "/api/password-reset", { email: fd.get("email") });
      form.reset();
      say(r.status);
    }), h("p", {}, h("a", { href: "#/login", text: "Back to log in" })));
  };

  function linkSpent(what, again) {
    return h("section", { class: "card", "aria-labelledby": "spent-h" },
      h("h2", { id: "spent-h", text: "This link cannot be used" }),
      h("p", { text: "This " + what + " link has expired or was already used." }),
      h("p", {}, again));
  }

  VIEWS.reset = async () => {
    const token = links.reset;
    const askAgain = h("a", { href: "#/forgot", text: "Ask for a new link" });
    if (!token) {
      page("Choose a new password", linkSpent("password reset", askAgain));
      return;
    }
    const form = h("form", { class: "card narrow", "aria-labelledby": "reset-h" },
      h("h2", { id: "reset-h", text: "Choose a new password" }),
      field("New password", { type: "password", name: "password", required: true, minlength: 10, autocomplete: "new-password" },
        "At least 10 characters. Every session of the account is logged out."),
      field("New password again", { type: "password", name: "again", required: true, minlength: 10, autocomplete: "new-password" }),
      h("button", { type: "submit", text: "Set password" }));
    const again = form.querySelector("input[name=again]");
    page("Choose a new password", submitter(form, async (fd) => {
      if (fd.get("password") !== fd.get("again")) {
        again.setAttribute("aria-invalid", "true");
        again.focus();
        throw new ApiError("The two passwords are not the same. Please type the new password twice.", 0, null);
      }
      again.removeAttribute("aria-invalid");
      try {
        await api("POST", "/api/password-reset/confirm", { token, password: fd.get("password") });
      } catch (e) {
        if (e.code !== "invalid_token") throw e;
        delete links.reset;
        page("Choose a new password", linkSpent("password reset", askAgain));
        throw new ApiError("This password reset link has expired or was already used. Ask for a new one.", e.status, e.code);
      }
      delete links.reset;
      state.me = null; // every session ended, this one too
      go("#/login", "Your password is changed. Log in with the new one.");
    }));
  };

  VIEWS["confirm-email"] = async () => {
    const token = links["confirm-email"];
    delete links["confirm-email"]; // single use, whatever the answer
    const next = state.me ? h("a", { href: "#/settings", text: "Go to your account settings" })
      : h("a", { href: "#/login", text: "Log in" });
    if (!token) {
      page("Confirm your email", linkSpent("confirmation", h("span", {},
        "Change the email again from ", h("a", { href: "#/settings", text: "your account settings" }), " to get a new one.")));
      return;
    }
    page("Confirm your email", h("p", { role: "status", text: "Confirming…" }));
    let account;
    try {
      account = await api("POST", "/api/account/email/confirm", { token });
    } catch (e) {
      if (e.code !== "invalid_token") throw e;
      page("Confirm your email", linkSpent("confirmation", h("span", {},
        "Change the email again from ", h("a", { href: "#/settings", text: "your account settings" }), " to get a new one.")));
      fail("This confirmation link has expired or was already used.");
      return;
    }
    if (state.me) { state.me = await api("GET", "/api/account"); updateNav(); }
    page("Email confirmed", h("section", { class: "card", "aria-labelledby": "done-h" },
      h("h2", { id: "done-h", text: "Your email is changed" }),
      h("p", {}, "Your account's email is now ", h("strong", { text: account.email }), "."),
      h("p", {}, next)));
    say("Your email is now " + account.email + ".");
  };
})();
