import createClient, { type Client } from "openapi-fetch";

import { SmolvmConnectionError, SmolvmError } from "./errors.js";
import type { paths } from "./generated/openapi.js";
import type {
  Capabilities,
  ClosePortResult,
  CreateSandboxRequest,
  DeleteResult,
  Diagnostics,
  ExecRequest,
  SmolvmEvent,
  ExecResult,
  Port,
  PortSpec,
  Sandbox,
} from "./types.js";

export interface SmolvmOptions {
  /** Where `smolvm server start` listens, e.g. "http://127.0.0.1:8000". */
  baseUrl: string;
  /** Sent as `Authorization: Bearer <token>`; needed when the server was started with --token or $SMOLVM_TOKEN. */
  token?: string;
  /** Extra headers sent with every request. */
  headers?: HeadersInit;
  /**
   * Abort any request still unanswered after this many milliseconds (it then
   * rejects with fetch's "TimeoutError"). Unset by default: creating a sandbox
   * boots a VM, and exec lasts as long as the command. For exec the deadline
   * is stretched to outlast the command's own `timeout`, so that the server's
   * 408 with the partial output arrives instead of a client-side abort.
   */
  timeoutMs?: number;
  /** A fetch implementation to use instead of `globalThis.fetch`; it is called with a `Request`. */
  fetch?: (request: Request) => Promise<Response>;
}

/** Per-call options. */
export interface RequestOptions {
  /** Abort this request; it then rejects with the signal's reason (an "AbortError" by default). */
  signal?: AbortSignal;
  /** Overrides the client's `timeoutMs` for this call, exec included. */
  timeoutMs?: number;
}

/**
 * Options of `sandbox.exec()`. With `onStdout` or `onStderr` the command's
 * output is streamed (Server-Sent Events) and each callback gets every chunk
 * as the guest writes it; the result still holds all of it.
 */
export interface ExecOptions extends RequestOptions {
  /** Called with each chunk of standard output: as text, and as the bytes written. */
  onStdout?: (text: string, bytes: Uint8Array) => void;
  /** Called with each chunk of standard error. */
  onStderr?: (text: string, bytes: Uint8Array) => void;
}

/** The sandbox operations, one per route of the API. */
export interface SandboxApi {
  /**
   * POST /sandboxes: create and boot a sandbox; resolves once it runs commands.
   * `network` limits what the guest may reach (open by default, without the
   * host's loopback); `ports` are exposed before it resolves, and the result's
   * `ports` names the host port each one got.
   */
  create(body?: CreateSandboxRequest, options?: RequestOptions): Promise<Sandbox>;
  /** GET /sandboxes: every sandbox on the host, oldest first (the `sandboxes` array of the response). */
  list(options?: RequestOptions): Promise<Sandbox[]>;
  /** GET /sandboxes/{id}: one sandbox's state. */
  get(id: string, options?: RequestOptions): Promise<Sandbox>;
  /**
   * POST /sandboxes/{id}/exec: run a command to its end. A non-zero exit code
   * is a normal result; a command past its timeout throws a SmolvmError with
   * code "command_timeout" carrying the partial stdout and stderr.
   */
  exec(id: string, body: ExecRequest, options?: ExecOptions): Promise<ExecResult>;
  /** DELETE /sandboxes/{id}: stop the sandbox and remove everything it had. */
  delete(id: string, options?: RequestOptions): Promise<DeleteResult>;
  /**
   * POST /sandboxes/{id}/ports: forward a host port to a TCP port of a running
   * sandbox. The body is the API's own shape (`guest`, `host`,
   * `host_address`), as for create. With `host` unset or 0 the server picks a
   * free port, so read it from the result rather than assuming one. The host
   * side listens on 127.0.0.1 unless `host_address` says otherwise. Nothing
   * needs to listen in the guest yet: a connection made before anything does
   * is accepted, then closed. Rejects with a SmolvmError: 409 port_in_use,
   * port_already_exposed, network_off or sandbox_not_running; 422 for a port
   * or address the server refuses (validation_failed, invalid_port).
   */
  exposePort(id: string, body: PortSpec, options?: RequestOptions): Promise<Port>;
  /** GET /sandboxes/{id}/ports: the sandbox's exposed ports by guest port (the `ports` array of the response). */
  listPorts(id: string, options?: RequestOptions): Promise<Port[]>;
  /**
   * DELETE /sandboxes/{id}/ports/{guest}: stop forwarding to a guest port.
   * New connections are refused; connections already open finish. A guest
   * port that is not exposed rejects with code "port_not_exposed" (404).
   */
  closePort(id: string, guest: number, options?: RequestOptions): Promise<ClosePortResult>;
}

// The server's default command timeout, in seconds (ExecRequest.timeout).
const DEFAULT_EXEC_TIMEOUT_S = 30;
// Time allowed on top of a command's timeout for the server to kill it and
// answer, so that a slow host still gets the 408 rather than an abort.
const EXEC_GRACE_MS = 10_000;

type ApiResult<T> = { data?: T; error?: unknown; response: Response };

/**
 * Client for the smolvm HTTP API.
 *
 * ```ts
 * const smolvm = new Smolvm({ baseUrl: "http://127.0.0.1:8000" });
 * const sandbox = await smolvm.sandbox.create({ memory: 512 });
 * ```
 *
 * Errors: a non-2xx answer rejects with {@link SmolvmError}; an unreachable
 * server with {@link SmolvmConnectionError}; an aborted or timed-out request
 * with fetch's own AbortError / TimeoutError (a DOMException).
 */
export class Smolvm {
  /** The generated openapi-fetch client underneath, with the same base URL and headers, for direct typed calls. */
  readonly client: Client<paths>;
  readonly sandbox: SandboxApi;
  readonly baseUrl: string;
  private readonly timeoutMs: number | undefined;

  constructor(options: SmolvmOptions) {
    // Fails here on a malformed URL, rather than later as a confusing
    // "connection" error on the first request.
    this.baseUrl = new URL(options.baseUrl).href.replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs;

    const headers = new Headers(options.headers);
    if (!headers.has("Accept")) {
      headers.set("Accept", "application/json, application/problem+json");
    }
    if (options.token !== undefined) {
      headers.set("Authorization", `Bearer ${options.token}`);
    }
    this.client = createClient<paths>({
      baseUrl: this.baseUrl,
      headers,
      // Looked up at call time, so that a fetch replaced after construction
      // (by a test or a polyfill) is the one used.
      fetch: options.fetch ?? ((request) => globalThis.fetch(request)),
    });

    const client = this.client;
    // The ids are checked before sending, in async functions so that a bad
    // one rejects like every other failure.
    this.sandbox = {
      create: async (body = {}, opts) =>
        this.call(opts, this.timeoutMs, (signal) => client.POST("/sandboxes", { body, signal })),
      list: async (opts) => {
        const list = await this.call(opts, this.timeoutMs, (signal) =>
          client.GET("/sandboxes", { signal }),
        );
        return list.sandboxes;
      },
      get: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) =>
          client.GET("/sandboxes/{id}", { params, signal }),
        );
      },
      exec: async (id, body, opts) => {
        const params = pathParams(id);
        if (opts?.onStdout || opts?.onStderr) {
          return this.execStream(id, body, opts);
        }
        // The 200 response also documents the streamed media types; this
        // request asks for JSON, so the answer is an ExecResult.
        return this.call(
          opts,
          this.execTimeoutMs(body),
          (signal) =>
            client.POST("/sandboxes/{id}/exec", { params, body, signal }) as Promise<ApiResult<ExecResult>>,
        );
      },
      delete: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) =>
          client.DELETE("/sandboxes/{id}", { params, signal }),
        );
      },
      exposePort: async (id, body, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) =>
          client.POST("/sandboxes/{id}/ports", { params, body, signal }),
        );
      },
      listPorts: async (id, opts) => {
        const params = pathParams(id);
        const list = await this.call(opts, this.timeoutMs, (signal) =>
          client.GET("/sandboxes/{id}/ports", { params, signal }),
        );
        return list.ports;
      },
      closePort: async (id, guest, opts) => {
        const params = portPathParams(id, guest);
        return this.call(opts, this.timeoutMs, (signal) =>
          client.DELETE("/sandboxes/{id}/ports/{guest}", { params, signal }),
        );
      },
    };
  }

  /** GET /capabilities: which backends, OSes and network modes this server's host runs (and why not), and the operations it serves. */
  async capabilities(options?: RequestOptions): Promise<Capabilities> {
    return this.call(options, this.timeoutMs, (signal) => this.client.GET("/capabilities", { signal }));
  }

  /** GET /diagnostics: the host checks of `smolvm doctor`, with `ready` false and a fix for anything missing. */
  async diagnostics(options?: RequestOptions): Promise<Diagnostics> {
    return this.call(options, this.timeoutMs, (signal) => this.client.GET("/diagnostics", { signal }));
  }

  /**
   * GET /events: the server's events as they happen, until `signal` aborts
   * or the server ends the stream (it does when it shuts down). With
   * `lastEventId` the stream resumes after that event, from the server's
   * backlog; a `stream.gap` event says when some were no longer kept (list
   * the sandboxes again to catch up).
   *
   * ```ts
   * for await (const ev of smolvm.events({ signal })) console.log(ev.type, ev.data.sandbox_id);
   * ```
   */
  async *events(options?: { lastEventId?: number; signal?: AbortSignal }): AsyncGenerator<SmolvmEvent> {
    const header = options?.lastEventId === undefined ? undefined : { "Last-Event-ID": String(options.lastEventId) };
    const body = await this.call({ signal: options?.signal }, undefined, (signal) =>
      this.client.GET("/events", { params: { header }, parseAs: "stream", signal }),
    );
    if (!body) {
      return;
    }
    for await (const ev of readEvents(body)) {
      if (ev.type !== undefined && ev.data !== undefined) {
        yield { id: ev.id, type: ev.type, data: JSON.parse(ev.data) } as SmolvmEvent;
      }
    }
  }

  /** exec over the streamed route: output to the callbacks as it comes. */
  private async execStream(id: string, body: ExecRequest, opts: ExecOptions): Promise<ExecResult> {
    const params = pathParams(id);
    const stream = await this.call(opts, this.execTimeoutMs(body), (signal) =>
      this.client.POST("/sandboxes/{id}/exec", {
        params,
        body,
        signal,
        parseAs: "stream",
        headers: { Accept: "text/event-stream" },
      }),
    );
    const out = { stdout: "", stderr: "" };
    if (!stream) {
      throw new Error("the server answered a streamed exec with no body");
    }
    for await (const ev of readEvents(stream)) {
      if (ev.type === undefined || ev.data === undefined) {
        continue;
      }
      const data = JSON.parse(ev.data);
      if (ev.type === "stdout" || ev.type === "stderr") {
        const bytes = data.base64 !== undefined ? base64Bytes(data.base64) : new TextEncoder().encode(data.text ?? "");
        const text = data.text ?? new TextDecoder().decode(bytes);
        out[ev.type] += text;
        (ev.type === "stdout" ? opts.onStdout : opts.onStderr)?.(text, bytes);
      } else if (ev.type === "exit") {
        if (data.timed_out) {
          const timeout = body.timeout ?? DEFAULT_EXEC_TIMEOUT_S;
          throw new SmolvmError(408, {
            type: "about:blank",
            title: "Request Timeout",
            status: 408,
            code: "command_timeout",
            field: "timeout",
            detail: `the command did not finish within its timeout of ${timeout}s and was killed`,
            timeout,
            stdout: out.stdout,
            stderr: out.stderr,
            duration_ms: data.duration_ms,
          });
        }
        return { exit_code: data.exit_code, stdout: out.stdout, stderr: out.stderr, duration_ms: data.duration_ms };
      } else if (ev.type === "error") {
        throw new SmolvmError(data.status ?? 500, data);
      }
    }
    throw new Error("the exec stream ended before the command did");
  }

  private execTimeoutMs(body: ExecRequest): number | undefined {
    if (this.timeoutMs === undefined) {
      return undefined;
    }
    const commandMs = (body.timeout ?? DEFAULT_EXEC_TIMEOUT_S) * 1000;
    return Math.max(this.timeoutMs, commandMs + EXEC_GRACE_MS);
  }

  /** Sends one request and turns its outcome into a value or one of the documented errors. */
  private async call<T>(
    opts: RequestOptions | undefined,
    defaultTimeoutMs: number | undefined,
    send: (signal: AbortSignal | undefined) => Promise<ApiResult<T>>,
  ): Promise<T> {
    const signal = withTimeout(opts?.signal, opts?.timeoutMs ?? defaultTimeoutMs);
    let result: ApiResult<T>;
    try {
      result = await send(signal);
    } catch (err) {
      if (signal?.aborted) {
        throw err; // The caller's abort or the timeout: fetch's own error, as is.
      }
      // fetch signals every network failure with a TypeError; anything else
      // (a 2xx body that is not JSON, a bug) is passed on unchanged.
      if (err instanceof TypeError) {
        throw new SmolvmConnectionError(this.baseUrl, err);
      }
      throw err;
    }
    if (!result.response.ok) {
      throw SmolvmError.fromResponse(result.response, result.error);
    }
    return result.data as T;
  }
}

function withTimeout(signal: AbortSignal | undefined, timeoutMs: number | undefined) {
  if (timeoutMs === undefined) {
    return signal;
  }
  const timeout = AbortSignal.timeout(timeoutMs);
  return signal ? AbortSignal.any([signal, timeout]) : timeout;
}

// An empty id would address /sandboxes/ and, through the server's redirect,
// the list instead of a sandbox.
function pathParams(id: string) {
  if (typeof id !== "string" || id === "") {
    throw new TypeError("sandbox id must be a non-empty string");
  }
  return { path: { id } };
}

// The range (1-65535) is the server's to check; what is refused here would
// not address the port at all: openapi-fetch leaves a missing value as the
// literal "{guest}", and a string (from untyped code) could name another
// path, e.g. ".." for DELETE of the sandbox itself.
function portPathParams(id: string, guest: number) {
  if (!Number.isInteger(guest)) {
    throw new TypeError(`guest port must be an integer, got ${String(guest)}`);
  }
  return { path: { ...pathParams(id).path, guest } };
}

/** Reads Server-Sent Events off a response body; ":" lines (keepalives) are skipped. */
async function* readEvents(
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  body: ReadableStream<any>,
): AsyncGenerator<{ id?: number; type?: string; data?: string }> {
  const lines = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let event: { id?: number; type?: string; data?: string } = {};
  try {
    for (;;) {
      const { value, done } = await lines.read();
      if (done) {
        return;
      }
      pending += value;
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl).replace(/\r$/, "");
        pending = pending.slice(nl + 1);
        if (line === "") {
          yield event;
          event = {};
        } else if (line.startsWith("id: ")) {
          event.id = Number(line.slice(4));
        } else if (line.startsWith("event: ")) {
          event.type = line.slice(7);
        } else if (line.startsWith("data: ")) {
          event.data = line.slice(6);
        }
      }
    }
  } finally {
    await lines.cancel().catch(() => {});
  }
}

function base64Bytes(b64: string): Uint8Array {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) {
    bytes[i] = bin.charCodeAt(i);
  }
  return bytes;
}
