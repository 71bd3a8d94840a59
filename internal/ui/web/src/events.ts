// GET /events as Server-Sent Events, read with fetch rather than
// EventSource, which cannot send the Authorization header. A dropped stream
// is resumed with Last-Event-ID after a growing pause of at most 5 s.

import { authHeaders, readText, tokenChanged, unauthorized } from "./api";

export interface ServerEvent {
  id: string;
  type: string;
  data: unknown;
}

export type StreamState = "connecting" | "live" | "retrying" | "token";

export interface StreamHandlers {
  /** The stream is open; resumed tells whether it continues an earlier one. */
  open(resumed: boolean): void;
  event(ev: ServerEvent): void;
  /** Events were missed (the server no longer had them): list again. */
  gap(): void;
  state(s: StreamState): void;
}

const maxBackoff = 5000;

/** Follows the event stream until the returned function is called. */
export function follow(h: StreamHandlers): () => void {
  const ac = new AbortController();
  void run(h, ac.signal);
  return () => ac.abort();
}

async function run(h: StreamHandlers, signal: AbortSignal): Promise<void> {
  let lastId = "";
  let backoff = 500;
  while (!signal.aborted) {
    h.state("connecting");
    try {
      const headers: Record<string, string> = { ...authHeaders(), Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const resp = await fetch("/events", { headers, signal, cache: "no-store" });
      if (resp.status === 401) {
        h.state("token");
        unauthorized();
        await tokenChanged(signal);
        continue;
      }
      if (!resp.ok || !resp.body) throw new Error(`GET /events answered ${resp.status}`);
      h.state("live");
      h.open(lastId !== "");
      backoff = 500;
      await parse(resp.body, signal, (ev) => {
        if (ev.id) lastId = ev.id;
        if (ev.type === "stream.gap") h.gap();
        else h.event(ev);
      });
    } catch {
      // A network failure or a cut stream: retry below.
    }
    if (signal.aborted) return;
    h.state("retrying");
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, maxBackoff);
  }
}

/** Reads an event stream, calling emit for each complete event. */
export async function parse(body: ReadableStream<Uint8Array>, signal: AbortSignal, emit: (ev: ServerEvent) => void): Promise<void> {
  let buf = "";
  let id = "";
  let type = "";
  let data: string[] = [];
  await readText(body, signal, (value) => {
    buf += value;
    // Lines end with \n, \r\n or \r; a lone \r at the end may be the
    // first half of a \r\n, so it waits for more.
    for (;;) {
      const m = /\r\n|\n|\r(?!$)/.exec(buf);
      if (!m) break;
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === "") {
        if (data.length > 0) {
          let parsed: unknown = data.join("\n");
          try {
            parsed = JSON.parse(parsed as string);
          } catch {
            // Not JSON: handed on as text.
          }
          emit({ id, type: type || "message", data: parsed });
        }
        type = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a keepalive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
  });
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });
}
