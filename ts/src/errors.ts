import type { CommandTimeoutProblem, ErrorDetail, Problem } from "./types.js";

/**
 * The server answered with an error status. Every field comes from the
 * problem document the server sent (RFC 9457); `code` is the stable one to
 * branch on, e.g. "sandbox_not_found", "validation_failed", "command_timeout".
 */
export class SmolvmError extends Error {
  override readonly name = "SmolvmError";
  /** HTTP status of the response. */
  readonly status: number;
  /** Stable snake_case error code. "http_error" when the body was not a problem document. */
  readonly code: string;
  /** The request field at fault (e.g. "memory"), when there is one. */
  readonly field: string | undefined;
  /** Every individual validation failure, when the server listed them. */
  readonly errors: ErrorDetail[] | undefined;
  /** The whole problem document. */
  readonly problem: Problem | CommandTimeoutProblem;
  /** For a command timeout (408, "command_timeout"): what the command wrote to stdout before it was killed. */
  readonly stdout: string | undefined;
  /** For a command timeout: what the command wrote to stderr before it was killed. */
  readonly stderr: string | undefined;

  constructor(status: number, problem: Problem | CommandTimeoutProblem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code;
    this.field = problem.field;
    this.errors = problem.errors;
    this.problem = problem;
    if ("stdout" in problem) {
      this.stdout = problem.stdout;
      this.stderr = problem.stderr;
    }
  }

  /** Builds the error for a non-2xx response whose body openapi-fetch already read (parsed JSON, text, or nothing). */
  static fromResponse(response: Response, body: unknown): SmolvmError {
    if (isProblem(body)) {
      return new SmolvmError(response.status, body);
    }
    // Not from the smolvm server itself (a proxy, another service on the
    // port): keep what there is, in the same shape.
    const title = response.statusText || `HTTP ${response.status}`;
    const text = typeof body === "string" ? body.trim().slice(0, 500) : "";
    return new SmolvmError(response.status, {
      type: "about:blank",
      title,
      status: response.status,
      detail: text || title,
      code: "http_error",
    });
  }
}

/**
 * The server could not be reached, or the connection broke before an answer
 * arrived (so whether the server acted on the request is unknown). `cause`
 * holds the error fetch threw.
 */
export class SmolvmConnectionError extends Error {
  override readonly name = "SmolvmConnectionError";
  /** The server address the client was configured with. */
  readonly baseUrl: string;

  constructor(baseUrl: string, cause: unknown) {
    super(`cannot reach the smolvm server at ${baseUrl}: ${describe(cause)}`, { cause });
    this.baseUrl = baseUrl;
  }
}

function isProblem(body: unknown): body is Problem {
  if (typeof body !== "object" || body === null) {
    return false;
  }
  const p = body as Record<string, unknown>;
  return typeof p.code === "string" && typeof p.status === "number";
}

// Node's fetch says only "fetch failed" and keeps the reason (ECONNREFUSED,
// ENOTFOUND, ...) in its cause; browsers give no more than their message.
function describe(err: unknown): string {
  if (!(err instanceof Error)) {
    return String(err);
  }
  const cause = err.cause as { code?: unknown; message?: unknown } | undefined;
  if (typeof cause?.code === "string") {
    return `${err.message} (${cause.code})`;
  }
  if (typeof cause?.message === "string" && cause.message) {
    return `${err.message} (${cause.message})`;
  }
  return err.message;
}
