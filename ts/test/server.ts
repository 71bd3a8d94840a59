// Starts a real `smolvm server` for the tests, on a free loopback port.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";

const binary = fileURLToPath(new URL("../../bin/smolvm", import.meta.url));

export interface TestServer {
  baseUrl: string;
  /** Output of the server so far, for failure messages. */
  log(): string;
  /** SIGTERM, then wait for the process to exit. */
  stop(): Promise<void>;
}

/** A loopback port nothing listens on right now. */
export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === "string") {
    throw new Error("could not pick a free port");
  }
  return address.port;
}

/**
 * Starts a server that requires `token` when given, and no token otherwise
 * (whatever $SMOLVM_TOKEN the environment holds).
 */
export async function startServer(options: { token?: string } = {}): Promise<TestServer> {
  if (!existsSync(binary)) {
    throw new Error(`${binary} is missing: run scripts/setup.sh at the repository root first`);
  }
  // Another process may take the port between freePort() and the server's
  // bind; a server that exits before it listens is retried on a new port.
  let lastError: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      return await launch(await freePort(), options.token);
    } catch (err) {
      lastError = err;
    }
  }
  throw lastError;
}

async function launch(port: number, token: string | undefined): Promise<TestServer> {
  const args = ["server", "start", "--host", "127.0.0.1", "--port", String(port)];
  if (token !== undefined) {
    args.push("--token", token);
  }
  // The data directory is whatever the environment says (SMOLVM_DATA_DIR or
  // the default), where setup prepared the kernel and image.
  const env = { ...process.env };
  delete env.SMOLVM_TOKEN;
  const child = spawn(binary, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));

  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`smolvm server did not start within 15 s:\n${output}`));
    }, 15_000);
    const onData = () => {
      if (output.includes("OpenAPI spec:")) {
        clearTimeout(timer);
        child.stdout.off("data", onData);
        resolve();
      }
    };
    child.stdout.on("data", onData);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`smolvm server exited (${signal ?? code}) before listening:\n${output}`));
    });
    child.once("error", reject);
  });

  return {
    baseUrl: `http://127.0.0.1:${port}`,
    log: () => output,
    stop: () => stop(child, exited),
  };
}

async function stop(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) {
    child.kill("SIGTERM");
  }
  // The server lets requests in flight finish for up to 30 s; none should be
  // left, so a server still there after 10 s is stuck.
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}
