// A terminal in the guest: xterm.js over the PTY WebSocket
// (GET /sandboxes/{id}/pty). Binary frames carry the bytes both ways; a
// text frame {"resize": {cols, rows}} follows every fit, and the server's
// last text frame is {"exit_code": N}.

import { FitAddon } from "@xterm/addon-fit";
import { Terminal, type ITheme } from "@xterm/xterm";
import { base64url, sandboxPath, token } from "./api";
import { h, panel } from "./dom";

const encoder = new TextEncoder();

export class TerminalPanel {
  readonly el: HTMLElement;
  private readonly box: HTMLElement;
  private readonly status: HTMLElement;
  private readonly button: HTMLButtonElement;
  private term: Terminal | null = null;
  private fit: FitAddon | null = null;
  private ws: WebSocket | null = null;
  private resize: ResizeObserver | null = null;
  private readonly onTheme = () => {
    if (this.term) this.term.options.theme = theme();
  };

  constructor(private readonly id: string) {
    this.box = h("div", { class: "term", "data-testid": "terminal" });
    this.status = h("span", { class: "muted small", "data-testid": "terminal-status" }, "not connected");
    this.button = h("button", { class: "button small", type: "button", hidden: true, onclick: () => this.connect() }, "Reconnect");
    this.el = panel("Terminal", "terminal-panel", [this.status, this.button], this.box);
    this.el.classList.add("terminal-panel");
  }

  /** Opens xterm in the page; the panel must be in the document by now. */
  mount(): void {
    if (this.term) return;
    const term = new Terminal({
      fontFamily: 'ui-monospace, "SF Mono", "Cascadia Mono", "DejaVu Sans Mono", Menlo, Consolas, monospace',
      fontSize: 13,
      lineHeight: 1.15,
      cursorBlink: true,
      scrollback: 5000,
      theme: theme(),
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(this.box);
    this.term = term;
    this.fit = fit;
    term.onData((d) => this.send(encoder.encode(d)));
    term.onBinary((d) => this.send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
    term.onResize(({ cols, rows }) => {
      if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ resize: { cols, rows } }));
    });
    // Refit when the panel changes size; xterm reports the new size above.
    let pending = 0;
    this.resize = new ResizeObserver(() => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(() => this.refit());
    });
    this.resize.observe(this.box);
    window.addEventListener("smolvm:theme", this.onTheme);
    this.refit();
  }

  private refit(): void {
    try {
      this.fit?.fit();
    } catch {
      // Not laid out (hidden): the next resize fits it.
    }
  }

  /** Opens a login shell in the guest, unless one is open. */
  connect(): void {
    if (!this.term || (this.ws && this.ws.readyState <= WebSocket.OPEN)) return;
    const term = this.term;
    this.refit();
    const url = new URL(sandboxPath(this.id, `/pty?cols=${term.cols}&rows=${term.rows}`), location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    // A browser cannot set headers on a WebSocket: the token goes as a
    // second subprotocol.
    const protocols = ["terminal.smolvm.dev"];
    const t = token();
    if (t) protocols.push(`bearer.token.smolvm.dev.${base64url(t)}`);
    const ws = new WebSocket(url, protocols);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.setStatus("connecting…", false);
    let exited = false;
    ws.onopen = () => {
      this.setStatus("connected", false);
      term.focus();
    };
    ws.onmessage = (ev) => {
      if (ev.data instanceof ArrayBuffer) {
        term.write(new Uint8Array(ev.data));
        return;
      }
      try {
        const msg = JSON.parse(String(ev.data)) as { exit_code?: number };
        if (typeof msg.exit_code === "number") {
          exited = true;
          this.setStatus(`the shell exited (${msg.exit_code})`, true);
        }
      } catch {
        // Not a frame this page knows.
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!exited) this.setStatus("disconnected", true, ev.reason);
      term.write(`\r\n\x1b[2m[session ended${!exited && ev.reason ? `: ${ev.reason}` : ""}]\x1b[0m\r\n`);
    };
  }

  private send(b: Uint8Array): void {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(b);
  }

  private setStatus(text: string, canReconnect: boolean, why = ""): void {
    this.status.textContent = text;
    // The server's reason can be long: it goes in the tooltip.
    this.status.title = why;
    this.button.hidden = !canReconnect;
  }

  /** Closes the session (the shell ends with it). */
  disconnect(): void {
    const ws = this.ws;
    this.ws = null;
    ws?.close();
  }

  dispose(): void {
    this.disconnect();
    this.resize?.disconnect();
    window.removeEventListener("smolvm:theme", this.onTheme);
    this.term?.dispose();
    this.term = null;
  }
}

/** The terminal's colours, from the page's CSS variables. */
function theme(): ITheme {
  const css = getComputedStyle(document.documentElement);
  const v = (name: string) => css.getPropertyValue(name).trim();
  return {
    background: v("--term-bg"),
    foreground: v("--term-fg"),
    cursor: v("--term-cursor"),
    cursorAccent: v("--term-bg"),
    selectionBackground: v("--term-selection"),
  };
}
