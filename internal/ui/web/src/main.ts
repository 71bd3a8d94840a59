// The dashboard's entry point: the page frame, the token, the event stream
// and the hash routes (#/ the list, #/sandboxes/{id} one sandbox).

import "@xterm/xterm/css/xterm.css";
import "./styles.css";

import { setToken } from "./api";
import { detailView } from "./detail";
import { h } from "./dom";
import { follow, type StreamState } from "./events";
import { listView } from "./list";
import * as state from "./state";
import { askToken, initTheme, mountMessages, showError, themeToggle } from "./ui";

// The theme is set before the page is drawn, so it does not flash.
initTheme();

// A token in the fragment (#token=…, as `smolvm server` prints the
// dashboard's address) is kept for this tab and taken out of the address,
// so it is not left in the history or a shared link.
function takeTokenFromURL(): void {
  const m = /^#token=([^&]*)/.exec(location.hash);
  if (!m) return;
  setToken(decodeURIComponent(m[1] ?? ""));
  history.replaceState(null, "", `${location.pathname}${location.search}#/`);
}

function start(): void {
  takeTokenFromURL();
  const live = h("span", { class: "live", "data-testid": "stream-state", "data-state": "connecting", title: "Live updates" }, h("span", { class: "dot" }), h("span", { class: "live-text" }, "connecting"));
  const messages = h("div", { class: "messages", "aria-live": "polite" });
  const main = h("main", { class: "main" });
  document.body.replaceChildren(
    h(
      "header",
      { class: "topbar" },
      h("a", { href: "#/", class: "brand" }, h("span", { class: "logo", "aria-hidden": "true" }), "smolvm"),
      h("div", { class: "topbar-right" }, live, themeToggle()),
    ),
    messages,
    main,
  );
  mountMessages(messages);
  window.addEventListener("smolvm:unauthorized", askToken);

  const texts: Record<StreamState, string> = { connecting: "connecting", live: "live", retrying: "reconnecting", token: "needs token" };
  follow({
    // Listed again on every connection, a resumed one too: a restarted
    // server numbers its events from 1 again, and would skip those up to
    // the last id this page saw.
    open: () => void state.reload().catch((err) => showError(err, "List sandboxes")),
    event: (ev) => state.handle(ev),
    gap: () => void state.reload().catch((err) => showError(err, "List sandboxes")),
    state: (s) => {
      live.dataset["state"] = s;
      const text = live.querySelector(".live-text");
      if (text) text.textContent = texts[s];
    },
  });

  let dispose: (() => void) | null = null;
  const route = () => {
    dispose?.();
    dispose = null;
    const m = /^#\/sandboxes\/([^/?]+)/.exec(location.hash);
    window.scrollTo(0, 0);
    if (m?.[1]) {
      const id = decodeURIComponent(m[1]);
      document.title = `${id} · smolvm`;
      dispose = detailView(main, id);
    } else {
      document.title = "Sandboxes · smolvm";
      dispose = listView(main);
    }
  };
  window.addEventListener("hashchange", () => {
    // A token pasted into the address: taking it redraws the view.
    if (location.hash.startsWith("#token=")) takeTokenFromURL();
    else route();
  });
  // A new token: list and draw the view again with it (the stream
  // retries by itself).
  window.addEventListener("smolvm:token", () => {
    void state.reload().catch((err) => showError(err, "List sandboxes"));
    route();
  });
  route();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
