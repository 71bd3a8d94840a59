// Friendly names for the schemas of the OpenAPI document. The shapes
// themselves live in ./generated/openapi.ts and change only by regenerating it.
import type { components } from "./generated/openapi.js";

type Schemas = components["schemas"];

/** Body of `sandbox.create()`: every field is optional and defaults on the server. */
export type CreateSandboxRequest = Schemas["CreateSandboxRequest"];
/** A sandbox as the server reports it. */
export type Sandbox = Schemas["Sandbox"];
/** Lifecycle state of a sandbox. */
export type SandboxStatus = Sandbox["status"];
/** Body of GET /sandboxes. */
export type SandboxList = Schemas["SandboxList"];
/**
 * What a sandbox's guest may reach, as `network` in `sandbox.create()`:
 * `mode` "open" (the default: the public Internet, and private ranges only as
 * `allow` lists them or with `allow_private`), "off" or "restricted" (to the
 * CIDRs in `allow`).
 */
export type NetworkSpec = Schemas["NetworkSpec"];
/** A network mode: "open", "off" or "restricted". */
export type NetworkMode = NonNullable<NetworkSpec["mode"]>;
/** The network policy in effect, as `Sandbox.network` reports it. */
export type SandboxNetwork = Schemas["SandboxNetwork"];
/**
 * A guest TCP port to expose on the host: body of `sandbox.exposePort()` and
 * an item of `ports` in `sandbox.create()`. `host` 0 or unset picks a free port.
 */
export type PortSpec = Schemas["PortSpec"];
/** An exposed port: the guest port and the host address and port that forward to it. */
export type Port = Schemas["Port"];
/** Body of GET /sandboxes/{id}/ports. */
export type PortList = Schemas["PortList"];
/** Result of `sandbox.closePort()`: the port that was closed, with `closed: true`. */
export type ClosePortResult = Schemas["ClosePortResult"];
/** Body of `sandbox.exec()`. */
export type ExecRequest = Schemas["ExecRequest"];
/** Result of a command that ran to its end, whatever its exit code. */
export type ExecResult = Schemas["ExecResult"];
/**
 * Result of `sandbox.delete()` and `snapshots.delete()`. The server answers
 * 204 with no body; the client reports what it deleted.
 */
export interface DeleteResult {
  id: string;
  deleted: true;
}
/** A host directory shared with the guest, as an item of `mounts` in `sandbox.create()`: read-only unless `readonly` is false. */
export type MountSpec = Schemas["MountSpec"];
/** A host directory a sandbox shares, as `Sandbox.mounts` reports it. */
export type Mount = Schemas["Mount"];
/** Body of `sandbox.update()`: `timeout` seconds from now, 0 to remove the limit. */
export type UpdateSandboxRequest = Schemas["UpdateSandboxRequest"];
/** Body of `sandbox.stop()`: seconds the guest gets to shut down before it is killed. */
export type StopRequest = Schemas["StopRequest"];
/** Body of `snapshots.create()`. */
export type SnapshotRequest = Schemas["SnapshotRequest"];
/** A saved sandbox (memory, devices and disk); `snapshot` in `sandbox.create()` starts a fork of it. */
export type Snapshot = Schemas["Snapshot"];
/** Body of GET /snapshots and of POST /snapshots/prune. */
export type SnapshotList = Schemas["SnapshotList"];
/** An RFC 9457 problem document, the body of every error response. */
export type Problem = Schemas["Problem"];
/** The 408 problem of a command that outlived its timeout, with its partial output. */
export type CommandTimeoutProblem = Schemas["CommandTimeoutProblem"];
/** One validation failure inside `Problem.errors`. */
export type ErrorDetail = Schemas["ErrorDetail"];
/** Body of `smolvm.sandbox.stats()`: a sandbox's resource use on the host and in the guest. */
export type SandboxStats = Schemas["SandboxStats"];
/** One process in the guest, as ps shows it. */
export type GuestProcess = Schemas["GuestProcess"];
/** Body of `smolvm.capabilities()`: backends, OSes and network modes, whether this host runs each, and the server's operations. */
export type Capabilities = Schemas["Capabilities"];
/** A backend on the server's host, with why it is unavailable if it is. */
export type BackendCapability = Schemas["BackendCapability"];
/** An `os` value of create, with the image it boots. */
export type OSCapability = Schemas["OSCapability"];
/** Body of `smolvm.diagnostics()`: the host checks of `smolvm doctor`. */
export type Diagnostics = Schemas["Diagnostics"];
/** One host check, with the command that fixes it when it is not ok. */
export type DiagnosticCheck = Schemas["DiagnosticCheck"];
/** Body of `sandbox.processes.start()`. */
export type ProcessRequest = Schemas["ProcessRequest"];
/** A background process and its state. */
export type Process = Schemas["Process"];
/** Result of `sandbox.processes.output()`: what a process wrote so far. */
export type ProcessOutputResult = Schemas["ProcessOutputResult"];
/** Body of `sandbox.processes.stdin()`. */
export type StdinRequest = Schemas["StdinRequest"];
/** One event of `sandbox.processes.follow()`. */
export type ProcessEvent =
  | { type: "stdout" | "stderr"; text: string; bytes: Uint8Array }
  | { type: "dropped"; bytes: number }
  | { type: "exit"; process: Process };
/** A path in a sandbox, as `sandbox.files.stat()` and `list()` describe it. */
export type FileEntry = Schemas["FileEntry"];
/** The data of a sandbox event from `smolvm.events()`. */
export type EventData = Schemas["EventData"];
/** The data of a `stream.gap` event: events after the resume point were no longer kept. */
export type GapData = Schemas["GapData"];
/** One event of `smolvm.events()`. */
export type SmolvmEvent =
  | {
      /** Increasing within the server process; pass it as `lastEventId` to resume after it. */
      id: number;
      type: "sandbox.created" | "sandbox.updated" | "sandbox.deleted" | "image.pull" | "process.exited";
      data: EventData;
    }
  | { id: undefined; type: "stream.gap"; data: GapData };
