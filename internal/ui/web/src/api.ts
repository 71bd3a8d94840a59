// The API client: the token, fetch with it, and problem+json errors. The
// shapes are the parts of api/openapi.json the dashboard reads.

export interface Port {
  guest: number;
  host: number;
  host_address: string;
}

export interface Progress {
  phase: string;
  done_bytes: number;
  total_bytes: number;
}

export interface Sandbox {
  id: string;
  name?: string;
  status: "creating" | "running" | "paused" | "stopped" | "error" | string;
  os: string;
  image: string;
  backend: string;
  memory: number;
  disk_size: number;
  vcpus: number;
  created_at: string;
  expires_at?: string;
  timeout?: number;
  on_timeout?: string;
  network: { mode: string; allow?: string[] | null; allow_host_loopback: boolean; allow_private: boolean };
  ports: Port[];
  pid?: number;
  snapshot?: string;
  labels?: Record<string, string>;
  env?: Record<string, string>;
  mounts?: { host: string; guest: string; readonly?: boolean }[] | null;
  error?: string;
  boot?: string;
  progress?: Progress;
  warnings?: string[] | null;
}

export interface Snapshot {
  id: string;
  name?: string;
  sandbox: string;
  backend: string;
  os: string;
  image: string;
  memory: number;
  size_bytes: number;
  created_at: string;
}

export interface Process {
  pid: number;
  command: string;
  tag?: string;
  running: boolean;
  exit_code?: number;
  signal?: number;
  started_at: string;
}

export interface ProcessOutput {
  process: Process;
  stdout: string;
  stderr: string;
  dropped_bytes: number;
}

export interface FileEntry {
  name: string;
  path: string;
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  mode: string;
  mtime: string;
  link_target?: string;
}

export interface Stats {
  sandbox_id: string;
  time: string;
  host?: { pid: number; cpu_percent: number; cpu_seconds: number; rss_bytes: number; pss_bytes: number };
  guest?: {
    memory_total_bytes: number;
    memory_available_bytes: number;
    disk_total_bytes: number;
    disk_free_bytes: number;
    load1: number;
    uptime_ms: number;
    processes?: GuestProcess[] | null;
  };
}

export interface GuestProcess {
  pid: number;
  ppid: number;
  user: string;
  state: string;
  rss_bytes: number;
  cpu_seconds: number;
  command: string;
}

export interface OSCapability {
  name: string;
  available: boolean;
  image?: string;
  reason?: string;
}

export interface Problem {
  title?: string;
  detail?: string;
  code?: string;
  status?: number;
  field?: string;
}

/** An answer other than 2xx, with the problem document when there was one. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Problem,
  ) {
    super(problem.detail || problem.title || `HTTP ${status}`);
  }
}

const tokenKey = "smolvm.token";

export function token(): string {
  return sessionStorage.getItem(tokenKey) ?? "";
}

/** Stores the token for this tab and tells whoever waits for one. */
export function setToken(t: string): void {
  if (t) sessionStorage.setItem(tokenKey, t);
  else sessionStorage.removeItem(tokenKey);
  window.dispatchEvent(new Event("smolvm:token"));
}

/** Resolves when a token is next entered. */
export function tokenChanged(signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      window.removeEventListener("smolvm:token", done);
      resolve();
    };
    window.addEventListener("smolvm:token", done);
    signal?.addEventListener("abort", done);
  });
}

/** Asks the page to show the token form (a 401 answered). */
export function unauthorized(): void {
  window.dispatchEvent(new Event("smolvm:unauthorized"));
}

export function authHeaders(): Record<string, string> {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

export interface RequestOptions {
  json?: unknown;
  body?: BodyInit;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

/** request sends one call and throws ApiError unless it answers 2xx. */
export async function request(method: string, path: string, o: RequestOptions = {}): Promise<Response> {
  const headers: Record<string, string> = { ...authHeaders(), ...o.headers };
  let body = o.body;
  if (o.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(o.json);
  }
  const init: RequestInit = { method, headers, cache: "no-store" };
  if (body !== undefined) init.body = body;
  if (o.signal) init.signal = o.signal;
  const resp = await fetch(path, init);
  if (resp.ok) return resp;
  let problem: Problem = { status: resp.status, title: resp.statusText };
  try {
    const ct = resp.headers.get("Content-Type") ?? "";
    if (ct.includes("json")) problem = { ...problem, ...((await resp.json()) as Problem) };
  } catch {
    // The status alone says enough.
  }
  if (resp.status === 401) unauthorized();
  throw new ApiError(resp.status, problem);
}

export async function getJSON<T>(path: string, signal?: AbortSignal): Promise<T> {
  const o: RequestOptions = signal ? { signal } : {};
  return (await request("GET", path, o)).json() as Promise<T>;
}

export async function sendJSON<T>(method: string, path: string, json: unknown = {}, headers?: Record<string, string>): Promise<T> {
  const resp = await request(method, path, headers ? { json, headers } : { json });
  if (resp.status === 204) return undefined as T;
  return resp.json() as Promise<T>;
}

export function sandboxPath(id: string, rest = ""): string {
  return `/sandboxes/${encodeURIComponent(id)}${rest}`;
}

/** base64url without padding, as the terminal's token subprotocol wants. */
export function base64url(s: string): string {
  const bin = Array.from(new TextEncoder().encode(s), (b) => String.fromCharCode(b)).join("");
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Whether err is a failure the user should be told about. */
export function worthShowing(err: unknown): boolean {
  if (err instanceof DOMException && err.name === "AbortError") return false;
  // A 401 shows the token form instead.
  return !(err instanceof ApiError && err.status === 401);
}

/**
 * Reads a streamed body as text, calling onText with each piece, until it
 * ends or signal aborts.
 */
export async function readText(body: ReadableStream<Uint8Array>, signal: AbortSignal, onText: (s: string) => void): Promise<void> {
  const reader = body.getReader();
  const cancel = () => void reader.cancel().catch(() => {});
  signal.addEventListener("abort", cancel);
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const s = decoder.decode(value, { stream: true });
      if (s) onText(s);
    }
    const rest = decoder.decode();
    if (rest) onText(rest);
  } finally {
    signal.removeEventListener("abort", cancel);
  }
}
