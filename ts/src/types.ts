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
/** Body of `sandbox.exec()`. */
export type ExecRequest = Schemas["ExecRequest"];
/** Result of a command that ran to its end, whatever its exit code. */
export type ExecResult = Schemas["ExecResult"];
/** Result of `sandbox.delete()`. */
export type DeleteResult = Schemas["DeleteResult"];
/** An RFC 9457 problem document, the body of every error response. */
export type Problem = Schemas["Problem"];
/** The 408 problem of a command that outlived its timeout, with its partial output. */
export type CommandTimeoutProblem = Schemas["CommandTimeoutProblem"];
/** One validation failure inside `Problem.errors`. */
export type ErrorDetail = Schemas["ErrorDetail"];
