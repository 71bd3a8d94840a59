// Page-wide pieces: the error banner, notices, the confirmation dialog, the
// token form and the theme.

import { ApiError, setToken, token, worthShowing } from "./api";
import { fill, h, icon, icons } from "./dom";

let messages: HTMLElement;

export function mountMessages(into: HTMLElement): void {
  messages = into;
}

/** Shows err in the dismissable error banner (one at a time). */
export function showError(err: unknown, context?: string): void {
  if (!worthShowing(err)) return;
  let title = "Something went wrong";
  let detail = err instanceof Error ? err.message : String(err);
  let code = "";
  if (err instanceof ApiError) {
    title = err.problem.title || `HTTP ${err.status}`;
    detail = err.problem.detail || "";
    code = err.problem.code || "";
  } else if (err instanceof TypeError) {
    title = "The server cannot be reached";
  }
  messages.querySelector('[data-testid="error-banner"]')?.remove();
  const banner = h(
    "div",
    { class: "banner banner-error", role: "alert", "data-testid": "error-banner" },
    h(
      "div",
      { class: "banner-text" },
      h("strong", null, context ? `${context}: ${title}` : title),
      detail ? h("span", null, " ", detail) : null,
      code ? h("code", { class: "banner-code" }, code) : null,
    ),
    h("button", { class: "icon-button", type: "button", "aria-label": "Dismiss", "data-testid": "error-dismiss", onclick: () => banner.remove() }, icon(icons.close)),
  );
  messages.prepend(banner);
}

/** Shows a short notice that goes by itself. */
export function notice(text: string): void {
  const n = h("div", { class: "banner banner-info", role: "status", "data-testid": "notice" }, h("div", { class: "banner-text" }, text));
  messages.append(n);
  setTimeout(() => n.remove(), 6000);
}

/** Asks for confirmation in the page; resolves true when confirmed. */
export function confirmDialog(title: string, text: string, ok: string): Promise<boolean> {
  return new Promise((resolve) => {
    const done = (v: boolean) => {
      overlay.remove();
      document.removeEventListener("keydown", onKey);
      resolve(v);
    };
    const onKey = (e: KeyboardEvent) => {
      if (e.key === "Escape") done(false);
    };
    const okButton = h("button", { class: "button danger", type: "button", "data-testid": "confirm-ok", onclick: () => done(true) }, ok);
    const overlay = h(
      "div",
      { class: "overlay", "data-testid": "confirm" },
      h(
        "div",
        { class: "dialog", role: "alertdialog", "aria-modal": "true", "aria-labelledby": "confirm-title" },
        h("h2", { id: "confirm-title" }, title),
        h("p", null, text),
        h(
          "div",
          { class: "dialog-actions" },
          h("button", { class: "button", type: "button", "data-testid": "confirm-cancel", onclick: () => done(false) }, "Cancel"),
          okButton,
        ),
      ),
    );
    overlay.addEventListener("click", (e) => {
      if (e.target === overlay) done(false);
    });
    document.addEventListener("keydown", onKey);
    document.body.append(overlay);
    okButton.focus();
  });
}

let tokenForm: HTMLElement | null = null;

// A token that arrives another way (the address) closes the form.
window.addEventListener("smolvm:token", () => {
  tokenForm?.remove();
  tokenForm = null;
});

/** Shows the token form; entering a token stores it for this tab. */
export function askToken(): void {
  if (tokenForm) return;
  const refused = token() !== "";
  const input = h("input", {
    type: "password",
    class: "input",
    id: "token-input",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "token",
    required: true,
    "data-testid": "token-input",
  });
  const form = h(
    "form",
    { class: "dialog", "data-testid": "token-form" },
    h("h2", null, "This server needs a token"),
    h(
      "p",
      null,
      refused ? "The token was refused. " : "",
      "Enter the token the server was started with. It is kept in this tab only.",
    ),
    h("label", { class: "field", for: "token-input" }, h("span", null, "Token"), input),
    h("div", { class: "dialog-actions" }, h("button", { class: "button primary", type: "submit" }, "Continue")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const t = input.value.trim();
    if (t) setToken(t);
  });
  tokenForm = h("div", { class: "overlay" }, form);
  document.body.append(tokenForm);
  input.focus();
}

// Theme: the system's unless the toggle chose one, remembered in
// localStorage.
const themeKey = "smolvm.theme";
const dark = window.matchMedia("(prefers-color-scheme: dark)");

export function currentTheme(): "light" | "dark" {
  const t = document.documentElement.dataset["theme"];
  if (t === "light" || t === "dark") return t;
  return dark.matches ? "dark" : "light";
}

export function initTheme(): void {
  const saved = localStorage.getItem(themeKey);
  if (saved === "light" || saved === "dark") document.documentElement.dataset["theme"] = saved;
  dark.addEventListener("change", () => window.dispatchEvent(new Event("smolvm:theme")));
}

export function themeToggle(): HTMLButtonElement {
  const b = h("button", { class: "icon-button", type: "button", "data-testid": "theme-toggle" });
  const draw = () => {
    const next = currentTheme() === "dark" ? "light" : "dark";
    b.title = `Switch to the ${next} theme`;
    b.setAttribute("aria-label", b.title);
    fill(b, icon(next === "dark" ? icons.moon : icons.sun));
  };
  b.addEventListener("click", () => {
    const next = currentTheme() === "dark" ? "light" : "dark";
    document.documentElement.dataset["theme"] = next;
    localStorage.setItem(themeKey, next);
    window.dispatchEvent(new Event("smolvm:theme"));
  });
  window.addEventListener("smolvm:theme", draw);
  draw();
  return b;
}
