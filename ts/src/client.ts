import createClient, { type Client } from "openapi-fetch";

import { SmolvmConnectionError, SmolvmError } from "./errors.js";
import type { paths } from "./generated/openapi.js";
import type {
  Capabilities,
  SandboxStats,
  ClosePortResult,
  CreateSandboxRequest,
  DeleteResult,
  Diagnostics,
  ExecRequest,
  SmolvmEvent,
  ExecResult,
  FileEntry,
  Port,
  PortSpec,
  Process,
  ProcessEvent,
  ProcessOutputResult,
  ProcessRequest,
  Sandbox,
  Snapshot,
  SnapshotRequest,
  StdinRequest,
  UpdateSandboxRequest,
} from "./types.js";

/** Where `smolvm server start` listens by default. */
export const DEFAULT_BASE_URL = "http://127.0.0.1:8000";

export interface SmolvmOptions {
  /** Where `smolvm server start` listens; "http://127.0.0.1:8000" (its default) when unset. */
  baseUrl?: string;
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
  /**
   * GET /sandboxes: every sandbox on the host, oldest first (the `sandboxes`
   * array of the response). With `label` only those carrying every label
   * given: `{ team: "ml" }` or `["team=ml"]`.
   */
  list(options?: ListOptions): Promise<Sandbox[]>;
  /** GET /sandboxes/{id}: one sandbox's state. */
  get(id: string, options?: RequestOptions): Promise<Sandbox>;
  /**
   * POST /sandboxes/{id}/exec: run a command to its end. A non-zero exit code
   * is a normal result; a command past its timeout throws a SmolvmError with
   * code "command_timeout" carrying the partial stdout and stderr.
   */
  exec(id: string, body: ExecRequest, options?: ExecOptions): Promise<ExecResult>;
  /** DELETE /sandboxes/{id}: stop the sandbox and remove everything it had. The server answers 204; this resolves with `{ id, deleted: true }`. */
  delete(id: string, options?: RequestOptions): Promise<DeleteResult>;
  /**
   * POST /sandboxes/{id}/stop: shut the guest down cleanly (killing its VM
   * after `timeout` seconds, 10 by default) and keep its disk; `start` boots
   * it again. A sandbox that is neither running nor paused rejects with a
   * SmolvmError 409 "invalid_state".
   */
  stop(id: string, options?: RequestOptions & { timeout?: number }): Promise<Sandbox>;
  /** POST /sandboxes/{id}/start: boot a stopped sandbox again from its own disk. */
  start(id: string, options?: RequestOptions): Promise<Sandbox>;
  /** POST /sandboxes/{id}/pause: stop its vCPUs, keeping its memory; commands and files are refused (409) until resume. */
  pause(id: string, options?: RequestOptions): Promise<Sandbox>;
  /** POST /sandboxes/{id}/resume: let a paused sandbox run on from where it was. */
  resume(id: string, options?: RequestOptions): Promise<Sandbox>;
  /** PATCH /sandboxes/{id}: set its time limit to `timeout` seconds from now; 0 removes it (`expires_at` shows the deadline). */
  update(id: string, body: UpdateSandboxRequest, options?: RequestOptions): Promise<Sandbox>;
  /** GET /sandboxes/{id}/logs: the console log (guest kernel and agent) since its VM last started, as text. */
  logs(id: string, options?: RequestOptions): Promise<string>;
  /**
   * GET /sandboxes/{id}/stats: the VM process's CPU and memory on the host
   * and, while it runs, the guest's memory, disk, load and processes
   * (`guest` is absent while paused). A stopped sandbox rejects with a
   * SmolvmError 409 "sandbox_not_running".
   */
  stats(id: string, options?: RequestOptions): Promise<SandboxStats>;
  /**
   * The same as a stream of bytes; with `follow` it stays open with what the
   * console prints next, until `signal` aborts or the sandbox goes.
   */
  logsStream(id: string, options?: RequestOptions & { follow?: boolean }): Promise<ReadableStream<Uint8Array>>;
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
  /** Background processes: they outlive the request and the server, and end with the sandbox. */
  processes: ProcessApi;
  /** Files in a sandbox, streamed both ways. */
  files: FilesApi;
  /**
   * GET /sandboxes/{id}/pty: a terminal in the guest over a WebSocket (the
   * login shell, or `command` through it). Uses `globalThis.WebSocket`
   * (browsers, Node 22, Node 20 with --experimental-websocket) unless one is
   * given. A token goes as a WebSocket subprotocol, which browsers can send.
   */
  terminal(id: string, options?: TerminalOptions): Terminal;
}

/** Options of `sandbox.list()`. */
export interface ListOptions extends RequestOptions {
  /** Only sandboxes with every one of these labels: `{ key: "value" }` or `["key=value"]`. */
  label?: Record<string, string> | string[];
}

/** The snapshot operations, under `smolvm.snapshots`. Ids and names are interchangeable. */
export interface SnapshotApi {
  /**
   * POST /sandboxes/{id}/snapshots: save a running or paused sandbox (memory,
   * devices, disk). It goes on as it was afterwards, unless `stop`. Create
   * forks of it with `sandbox.create({ snapshot: id })`.
   */
  create(sandboxId: string, body?: SnapshotRequest, options?: RequestOptions): Promise<Snapshot>;
  /** GET /snapshots: every snapshot, newest first (the `snapshots` array of the response). */
  list(options?: RequestOptions): Promise<Snapshot[]>;
  /** GET /snapshots/{id}. */
  get(id: string, options?: RequestOptions): Promise<Snapshot>;
  /**
   * DELETE /snapshots/{id}: refused with 409 "snapshot_in_use" while
   * sandboxes are forks of it, unless `force`, which deletes them first.
   */
  delete(id: string, options?: RequestOptions & { force?: boolean }): Promise<DeleteResult>;
  /** POST /snapshots/prune: delete every snapshot no sandbox or other snapshot is made from; resolves with those deleted. */
  prune(options?: RequestOptions): Promise<Snapshot[]>;
}

/** The process operations, under `smolvm.sandbox.processes`. */
export interface ProcessApi {
  /** POST /sandboxes/{id}/processes: start a command in the background; resolves with its pid once it runs. */
  start(id: string, body: ProcessRequest, options?: RequestOptions): Promise<Process>;
  /** GET /sandboxes/{id}/processes: running processes and the last that ended. */
  list(id: string, options?: RequestOptions): Promise<Process[]>;
  /** GET /sandboxes/{id}/processes/{pid}. */
  get(id: string, pid: number, options?: RequestOptions): Promise<Process>;
  /** GET /sandboxes/{id}/processes/{pid}/output: what it wrote so far (the last MiB). */
  output(id: string, pid: number, options?: RequestOptions): Promise<ProcessOutputResult>;
  /**
   * The same route as Server-Sent Events: what it wrote so far, then its
   * output as it comes, then its exit; ends there or when `signal` aborts.
   */
  follow(id: string, pid: number, options?: { signal?: AbortSignal }): AsyncGenerator<ProcessEvent>;
  /** POST .../stdin: write to its input; `eof` closes it. */
  stdin(id: string, pid: number, body: StdinRequest, options?: RequestOptions): Promise<void>;
  /** POST .../signal: a signal name (TERM, KILL, INT, ...) or number, to it and everything it started. */
  signal(id: string, pid: number, signal: string, options?: RequestOptions): Promise<void>;
}

/** The file operations, under `smolvm.sandbox.files`. Paths are absolute. */
export interface FilesApi {
  /** GET /sandboxes/{id}/files: a file's bytes. */
  read(id: string, path: string, options?: RequestOptions): Promise<Uint8Array>;
  /** The same, as a stream, for files too big to hold. */
  readStream(id: string, path: string, options?: RequestOptions): Promise<ReadableStream<Uint8Array>>;
  /**
   * PUT /sandboxes/{id}/files: write a file (parents made). It appears whole
   * or not at all. `mode` is octal, like "0755".
   */
  write(
    id: string,
    path: string,
    data: Uint8Array | string | Blob | ReadableStream<Uint8Array>,
    options?: RequestOptions & { mode?: string },
  ): Promise<void>;
  /** GET /sandboxes/{id}/fs/stat. */
  stat(id: string, path: string, options?: RequestOptions): Promise<FileEntry>;
  /** GET /sandboxes/{id}/fs/list: a directory's entries by name. */
  list(id: string, path: string, options?: RequestOptions): Promise<FileEntry[]>;
  /** DELETE /sandboxes/{id}/files; `recursive` for a directory with contents. */
  remove(id: string, path: string, options?: RequestOptions & { recursive?: boolean }): Promise<void>;
}

/** Options of `sandbox.terminal()`. */
export interface TerminalOptions {
  cols?: number;
  rows?: number;
  /** A command to run instead of the login shell. */
  command?: string;
  /** A WebSocket constructor, for runtimes without a global one. */
  WebSocket?: typeof globalThis.WebSocket;
}

/** A terminal session in a sandbox. */
export interface Terminal {
  /** Sends keystrokes (text is sent as UTF-8). */
  send(data: string | Uint8Array): void;
  /** Tells the guest's terminal its new size. */
  resize(cols: number, rows: number): void;
  /** Called with the terminal's output as it comes. */
  onData(listener: (bytes: Uint8Array) => void): void;
  /** Resolves with the shell's exit status; rejects if the session breaks first. */
  readonly exit: Promise<number>;
  /** Ends the session (and the shell). */
  close(): void;
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
 * const smolvm = new Smolvm(); // http://127.0.0.1:8000, or { baseUrl, token }
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
  readonly snapshots: SnapshotApi;
  readonly baseUrl: string;
  private readonly timeoutMs: number | undefined;
  private readonly token: string | undefined;
  private readonly headers: Headers;
  private readonly fetchFn: (request: Request) => Promise<Response>;

  constructor(options: SmolvmOptions = {}) {
    // Fails here on a malformed URL, rather than later as a confusing
    // "connection" error on the first request.
    this.baseUrl = new URL(options.baseUrl ?? DEFAULT_BASE_URL).href.replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs;
    this.token = options.token;

    const headers = new Headers(options.headers);
    if (!headers.has("Accept")) {
      headers.set("Accept", "application/json, application/problem+json");
    }
    if (options.token !== undefined) {
      headers.set("Authorization", `Bearer ${options.token}`);
    }
    this.headers = headers;
    this.fetchFn = options.fetch ?? ((request) => globalThis.fetch(request));
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
        const label = labelQuery(opts?.label);
        const list = await this.call(opts, this.timeoutMs, (signal) =>
          client.GET("/sandboxes", { params: { query: label ? { label } : undefined }, signal }),
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
        await this.call(opts, this.timeoutMs, (signal) => client.DELETE("/sandboxes/{id}", { params, signal }));
        return { id, deleted: true };
      },
      stop: async (id, opts) => {
        const params = pathParams(id);
        const body = opts?.timeout === undefined ? undefined : { timeout: opts.timeout };
        return this.call(opts, this.timeoutMs, (signal) =>
          client.POST("/sandboxes/{id}/stop", { params, body, signal }),
        );
      },
      start: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.POST("/sandboxes/{id}/start", { params, signal }));
      },
      pause: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.POST("/sandboxes/{id}/pause", { params, signal }));
      },
      resume: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.POST("/sandboxes/{id}/resume", { params, signal }));
      },
      update: async (id, body, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.PATCH("/sandboxes/{id}", { params, body, signal }));
      },
      stats: async (id, opts) => {
        const params = pathParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.GET("/sandboxes/{id}/stats", { params, signal }));
      },
      logs: async (id, opts) => {
        const resp = await this.rawCall(opts, `/sandboxes/${encodeURIComponent(pathParams(id).path.id)}/logs`, {}, {
          method: "GET",
          headers: { Accept: "text/plain, application/problem+json" },
        });
        return resp.text();
      },
      logsStream: async (id, opts) => {
        const query: Record<string, string> = opts?.follow ? { follow: "true" } : {};
        const resp = await this.rawCall(
          { signal: opts?.signal, timeoutMs: opts?.timeoutMs },
          `/sandboxes/${encodeURIComponent(pathParams(id).path.id)}/logs`,
          query,
          { method: "GET", headers: { Accept: "text/plain, application/problem+json" } },
        );
        if (resp.body === null) {
          throw new Error("the server answered a log read with no body");
        }
        return resp.body;
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
      processes: {
        start: async (id, body, opts) =>
          this.call(opts, this.timeoutMs, (signal) =>
            client.POST("/sandboxes/{id}/processes", { params: pathParams(id), body, signal }),
          ),
        list: async (id, opts) => {
          const list = await this.call(opts, this.timeoutMs, (signal) =>
            client.GET("/sandboxes/{id}/processes", { params: pathParams(id), signal }),
          );
          return list.processes;
        },
        get: async (id, pid, opts) =>
          this.call(opts, this.timeoutMs, (signal) =>
            client.GET("/sandboxes/{id}/processes/{pid}", { params: pidPathParams(id, pid), signal }),
          ),
        output: async (id, pid, opts) =>
          this.call(
            opts,
            this.timeoutMs,
            (signal) =>
              client.GET("/sandboxes/{id}/processes/{pid}/output", {
                params: pidPathParams(id, pid),
                signal,
              }) as Promise<ApiResult<ProcessOutputResult>>,
          ),
        follow: (id, pid, opts) => this.followProcess(id, pid, opts?.signal),
        stdin: async (id, pid, body, opts) => {
          await this.call(opts, this.timeoutMs, (signal) =>
            client.POST("/sandboxes/{id}/processes/{pid}/stdin", { params: pidPathParams(id, pid), body, signal }),
          );
        },
        signal: async (id, pid, sig, opts) => {
          await this.call(opts, this.timeoutMs, (signal) =>
            client.POST("/sandboxes/{id}/processes/{pid}/signal", {
              params: pidPathParams(id, pid),
              body: { signal: sig },
              signal,
            }),
          );
        },
      },
      terminal: (id, opts) => this.openTerminal(id, opts ?? {}),
      files: {
        read: async (id, path, opts) => new Uint8Array(await new Response(await this.fileStream(id, path, opts)).arrayBuffer()),
        readStream: async (id, path, opts) => this.fileStream(id, path, opts),
        write: async (id, path, data, opts) => {
          const query = { path, ...(opts?.mode ? { mode: opts.mode } : {}) };
          await this.rawCall(opts, `/sandboxes/${encodeURIComponent(pathParams(id).path.id)}/files`, query, {
            method: "PUT",
            body: data as BodyInit,
            headers: { "Content-Type": "application/octet-stream" },
            // A stream body needs half duplex in fetch.
            ...(data instanceof ReadableStream ? { duplex: "half" } : {}),
          });
        },
        stat: async (id, path, opts) =>
          this.call(opts, this.timeoutMs, (signal) =>
            client.GET("/sandboxes/{id}/fs/stat", { params: { path: { id: pathParams(id).path.id }, query: { path } }, signal }),
          ),
        list: async (id, path, opts) => {
          const list = await this.call(opts, this.timeoutMs, (signal) =>
            client.GET("/sandboxes/{id}/fs/list", { params: { path: { id: pathParams(id).path.id }, query: { path } }, signal }),
          );
          return list.entries;
        },
        remove: async (id, path, opts) => {
          await this.call(opts, this.timeoutMs, (signal) =>
            client.DELETE("/sandboxes/{id}/files", {
              params: { path: { id: pathParams(id).path.id }, query: { path, recursive: opts?.recursive } },
              signal,
            }),
          );
        },
      },
    };

    this.snapshots = {
      create: async (sandboxId, body = {}, opts) => {
        const params = pathParams(sandboxId);
        return this.call(opts, this.timeoutMs, (signal) =>
          client.POST("/sandboxes/{id}/snapshots", { params, body, signal }),
        );
      },
      list: async (opts) => {
        const list = await this.call(opts, this.timeoutMs, (signal) => client.GET("/snapshots", { signal }));
        return list.snapshots;
      },
      get: async (id, opts) => {
        const params = snapshotParams(id);
        return this.call(opts, this.timeoutMs, (signal) => client.GET("/snapshots/{id}", { params, signal }));
      },
      delete: async (id, opts) => {
        const params = { ...snapshotParams(id), query: opts?.force ? { force: true } : undefined };
        await this.call(opts, this.timeoutMs, (signal) => client.DELETE("/snapshots/{id}", { params, signal }));
        return { id, deleted: true };
      },
      prune: async (opts) => {
        const list = await this.call(opts, this.timeoutMs, (signal) => client.POST("/snapshots/prune", { signal }));
        return list.snapshots;
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

  private async *followProcess(id: string, pid: number, abort?: AbortSignal): AsyncGenerator<ProcessEvent> {
    const stream = await this.call({ signal: abort }, undefined, (signal) =>
      this.client.GET("/sandboxes/{id}/processes/{pid}/output", {
        params: pidPathParams(id, pid),
        parseAs: "stream",
        headers: { Accept: "text/event-stream" },
        signal,
      }),
    );
    if (!stream) {
      return;
    }
    for await (const ev of readEvents(stream)) {
      if (ev.type === undefined || ev.data === undefined) {
        continue;
      }
      const data = JSON.parse(ev.data);
      if (ev.type === "stdout" || ev.type === "stderr") {
        const bytes = data.base64 !== undefined ? base64Bytes(data.base64) : new TextEncoder().encode(data.text ?? "");
        yield { type: ev.type, text: data.text ?? new TextDecoder().decode(bytes), bytes };
      } else if (ev.type === "dropped") {
        yield { type: "dropped", bytes: data.bytes };
      } else if (ev.type === "exit") {
        yield { type: "exit", process: data as Process };
        return;
      } else if (ev.type === "error") {
        throw new SmolvmError(data.status ?? 500, data);
      }
    }
  }

  private async fileStream(id: string, path: string, opts?: RequestOptions): Promise<ReadableStream<Uint8Array>> {
    const resp = await this.rawCall(opts, `/sandboxes/${encodeURIComponent(pathParams(id).path.id)}/files`, { path }, {
      method: "GET",
      headers: { Accept: "application/octet-stream" },
    });
    if (resp.body === null) {
      throw new Error("the server answered a file read with no body");
    }
    return resp.body;
  }

  /** A request whose body or answer is not JSON, with the client's headers and errors. */
  private async rawCall(
    opts: RequestOptions | undefined,
    path: string,
    query: Record<string, string>,
    init: RequestInit & { duplex?: string },
  ): Promise<Response> {
    const url = new URL(this.baseUrl + path);
    for (const [k, v] of Object.entries(query)) {
      url.searchParams.set(k, v);
    }
    const headers = new Headers(this.headers);
    for (const [k, v] of new Headers(init.headers)) {
      headers.set(k, v);
    }
    const signal = withTimeout(opts?.signal, opts?.timeoutMs ?? this.timeoutMs);
    let resp: Response;
    try {
      resp = await this.fetchFn(new Request(url, { ...init, headers, signal }));
    } catch (err) {
      if (signal?.aborted) {
        throw err;
      }
      if (err instanceof TypeError) {
        throw new SmolvmConnectionError(this.baseUrl, err);
      }
      throw err;
    }
    if (!resp.ok) {
      const text = await resp.text();
      let body: unknown = text;
      try {
        body = JSON.parse(text);
      } catch {
        // not JSON: kept as text
      }
      throw SmolvmError.fromResponse(resp, body);
    }
    return resp;
  }

  private openTerminal(id: string, opts: TerminalOptions): Terminal {
    pathParams(id);
    const WS = opts.WebSocket ?? globalThis.WebSocket;
    if (WS === undefined) {
      throw new Error("no WebSocket in this runtime: pass one as options.WebSocket (Node 20: run with --experimental-websocket)");
    }
    const url = new URL(`${this.baseUrl}/sandboxes/${encodeURIComponent(id)}/pty`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("cols", String(opts.cols ?? 80));
    url.searchParams.set("rows", String(opts.rows ?? 24));
    if (opts.command !== undefined) {
      url.searchParams.set("command", opts.command);
    }
    const protocols = ["terminal.smolvm.dev"];
    if (this.token !== undefined) {
      protocols.push(`bearer.token.smolvm.dev.${base64Url(this.token)}`);
    }
    const ws = new WS(url.href, protocols);
    ws.binaryType = "arraybuffer";
    const listeners: ((bytes: Uint8Array) => void)[] = [];
    const pending: (string | Uint8Array)[] = [];
    let code: number | undefined;
    const exit = new Promise<number>((resolve, reject) => {
      ws.addEventListener("message", (ev: MessageEvent) => {
        if (typeof ev.data === "string") {
          const msg = JSON.parse(ev.data) as { exit_code?: number };
          if (msg.exit_code !== undefined) {
            code = msg.exit_code;
          }
          return;
        }
        const bytes = new Uint8Array(ev.data as ArrayBuffer);
        for (const l of listeners) {
          l(bytes);
        }
      });
      ws.addEventListener("open", () => {
        for (const p of pending.splice(0)) {
          ws.send(p);
        }
      });
      ws.addEventListener("close", (ev: CloseEvent) => {
        if (code !== undefined) {
          resolve(code);
        } else {
          reject(new Error(`the terminal closed without an exit status (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`));
        }
      });
    });
    const send = (data: string | Uint8Array) => {
      if (ws.readyState === WS.CONNECTING) {
        pending.push(data);
      } else {
        ws.send(data);
      }
    };
    return {
      send: (data) => send(typeof data === "string" ? new TextEncoder().encode(data) : data),
      resize: (cols, rows) => send(JSON.stringify({ resize: { cols, rows } })),
      onData: (l) => listeners.push(l),
      exit,
      close: () => ws.close(),
    };
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

function snapshotParams(id: string) {
  if (typeof id !== "string" || id === "") {
    throw new TypeError("snapshot id must be a non-empty string");
  }
  return { path: { id } };
}

/** The label filter of list as the query's repeated key=value values. */
function labelQuery(label: Record<string, string> | string[] | undefined): string[] | undefined {
  if (label === undefined) {
    return undefined;
  }
  const out = Array.isArray(label) ? [...label] : Object.entries(label).map(([k, v]) => `${k}=${v}`);
  return out.length > 0 ? out : undefined;
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

function pidPathParams(id: string, pid: number) {
  if (!Number.isInteger(pid) || pid < 1) {
    throw new TypeError(`pid must be a positive integer, got ${String(pid)}`);
  }
  return { path: { id: pathParams(id).path.id, pid } };
}

function base64Url(text: string): string {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) {
    bin += String.fromCharCode(b);
  }
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
