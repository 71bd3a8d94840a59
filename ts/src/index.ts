export { DEFAULT_BASE_URL, Smolvm } from "./client.js";
export type {
  ExecOptions,
  FilesApi,
  ListOptions,
  ProcessApi,
  RequestOptions,
  SandboxApi,
  SmolvmOptions,
  SnapshotApi,
  Terminal,
  TerminalOptions,
} from "./client.js";
export { SmolvmConnectionError, SmolvmError } from "./errors.js";
export type * from "./types.js";
// The generated low-level types, for use with `Smolvm.client`.
export type { components, operations, paths } from "./generated/openapi.js";
