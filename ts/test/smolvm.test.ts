// Runs the client against a real smolvm server that boots real VMs. The
// sandboxes are slow to create (seconds under software emulation), so one is
// shared by most tests; every sandbox made here is deleted at the end.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";

import { type Port, type Sandbox, Smolvm, SmolvmConnectionError, SmolvmError, type SmolvmEvent } from "smolvm";

import { freePort, startServer, type TestServer } from "./server.js";

let server: TestServer | undefined;
let baseUrl: string;
const created = new Set<string>();

before(async () => {
  // The specification's example sends no token, so this server wants none.
  server = await startServer();
  baseUrl = server.baseUrl;
});

after(async () => {
  if (server === undefined) {
    return; // It never started: the before hook has reported why.
  }
  const smolvm = new Smolvm({ baseUrl });
  for (const id of created) {
    await smolvm.sandbox.delete(id).catch((err: unknown) => {
      if (!(err instanceof SmolvmError && err.status === 404)) {
        console.error(`could not delete sandbox ${id}:`, err);
      }
    });
  }
  await server.stop();
});

/** Creates a sandbox, remembered for deletion at the end whatever happens. */
async function create(smolvm: Smolvm, body: Parameters<Smolvm["sandbox"]["create"]>[0]) {
  const sandbox = await smolvm.sandbox.create(body);
  created.add(sandbox.id);
  return sandbox;
}

test("the specification's example", { timeout: 60_000 }, async (t) => {
  const smolvm = new Smolvm({
    baseUrl,
  });

  let sandbox: Sandbox;
  try {
    sandbox = await create(smolvm, {
      os: "ubuntu",
      memory: 512,
      disk_size: 1024,
    });
  } catch (err) {
    // Ubuntu is pulled from a registry: a host without one answers 422
    // unsupported_os or 502 registry_unreachable, about the os field.
    const unavailable =
      err instanceof SmolvmError &&
      ((err.status === 422 && err.code === "unsupported_os") ||
        (err.status === 502 && err.code === "registry_unreachable"));
    if (!unavailable) {
      throw err;
    }
    t.diagnostic(`ubuntu is not available on this host (${err.message}); using the default OS`);
    sandbox = await create(smolvm, { memory: 512, disk_size: 1024 });
  }

  const result = await smolvm.sandbox.exec(sandbox.id, {
    command: "uname -a",
    timeout: 30,
    shell: "login",
  });

  console.log(result.stdout);
  assert.equal(result.exit_code, 0);
  assert.match(result.stdout, /^Linux /);

  const deleted = await smolvm.sandbox.delete(sandbox.id);
  assert.deepEqual(deleted, { id: sandbox.id, deleted: true });
  created.delete(sandbox.id);
});

describe("with a sandbox", { timeout: 180_000 }, () => {
  let smolvm: Smolvm;
  let sandbox: Sandbox;
  // Labels unique to this run, so that list by label finds only this sandbox.
  const suite = `ts-${randomBytes(4).toString("hex")}`;

  before(async () => {
    smolvm = new Smolvm({ baseUrl });
    // The port and lifecycle tests below use this sandbox too, rather than
    // boot another.
    sandbox = await create(smolvm, {
      memory: 512,
      ports: [{ guest: 8080 }],
      labels: { suite },
      env: { SUITE: suite },
      timeout: 3600,
      on_timeout: "pause",
    });
  });

  test("labels, env and the time limit given to create", async () => {
    assert.deepEqual(sandbox.labels, { suite });
    assert.equal(sandbox.on_timeout, "pause");
    assert.ok(sandbox.expires_at !== undefined && sandbox.expires_at !== null);

    const byLabel = await smolvm.sandbox.list({ label: { suite } });
    assert.deepEqual(
      byLabel.map((s) => s.id),
      [sandbox.id],
    );
    assert.deepEqual(await smolvm.sandbox.list({ label: [`suite=${suite}-none`] }), []);

    const env = await smolvm.sandbox.exec(sandbox.id, { command: "echo $SUITE" });
    assert.equal(env.stdout, `${suite}\n`);

    const updated = await smolvm.sandbox.update(sandbox.id, { timeout: 0 });
    assert.ok(updated.expires_at === undefined || updated.expires_at === null, JSON.stringify(updated));
  });

  test("logs are the console's text", async () => {
    const logs = await smolvm.sandbox.logs(sandbox.id);
    assert.equal(typeof logs, "string");
    const stream = await smolvm.sandbox.logsStream(sandbox.id);
    const text = await new Response(stream).text();
    assert.ok(text.length >= logs.length);
  });

  test("stats show the VM on the host and the guest's processes", async () => {
    const stats = await smolvm.sandbox.stats(sandbox.id);
    assert.equal(stats.sandbox_id, sandbox.id);
    assert.ok(stats.host.pid > 0 && stats.host.rss_bytes > 0, JSON.stringify(stats.host));
    assert.ok(stats.guest && stats.guest.memory_total_bytes > 0, JSON.stringify(stats.guest));
    assert.ok((stats.guest.processes ?? []).some((p) => p.pid === 1), JSON.stringify(stats.guest.processes));
  });

  test("list contains it and get returns it", async () => {
    const list = await smolvm.sandbox.list();
    assert.ok(Array.isArray(list));
    assert.ok(
      list.some((s) => s.id === sandbox.id),
      `${sandbox.id} not in ${JSON.stringify(list.map((s) => s.id))}`,
    );

    const got = await smolvm.sandbox.get(sandbox.id);
    assert.equal(got.id, sandbox.id);
    assert.equal(got.status, "running");
    assert.equal(got.memory, 512);
  });

  test("a non-zero exit code is a normal result", async () => {
    const result = await smolvm.sandbox.exec(sandbox.id, {
      command: "echo out; echo err >&2; exit 3",
    });
    assert.equal(result.exit_code, 3);
    assert.equal(result.stdout, "out\n");
    assert.equal(result.stderr, "err\n");
  });

  test("a command timeout is a SmolvmError with the partial output", async () => {
    const err = await rejection(
      smolvm.sandbox.exec(sandbox.id, { command: "echo before; sleep 30", timeout: 3 }),
    );
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 408);
    assert.equal(err.code, "command_timeout");
    assert.equal(err.stdout, "before\n");
    assert.equal(err.stderr, "");
    assert.equal(err.problem.status, 408);
  });

  test("exec with callbacks streams output as it is written", async () => {
    const seen: { text: string; at: number }[] = [];
    const errs: Uint8Array[] = [];
    const result = await smolvm.sandbox.exec(
      sandbox.id,
      { command: "echo first; sleep 3; echo second; printf '\\377' >&2", cwd: "/tmp", env: { X: "1" } },
      { onStdout: (text) => seen.push({ text, at: Date.now() }), onStderr: (_t, bytes) => errs.push(bytes) },
    );
    assert.deepEqual(
      seen.map((s) => s.text),
      ["first\n", "second\n"],
    );
    assert.ok(seen[1]!.at - seen[0]!.at >= 1000, "the first line was held back until the second");
    assert.equal(result.exit_code, 0);
    assert.equal(result.stdout, "first\nsecond\n");
    assert.deepEqual(Array.from(errs[0] ?? []), [255]);
    const err = await rejection(
      smolvm.sandbox.exec(sandbox.id, { command: "echo before; sleep 30", timeout: 3 }, { onStdout: () => {} }),
    );
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.code, "command_timeout");
    assert.equal(err.stdout, "before\n");
    const bad = await rejection(smolvm.sandbox.exec(sandbox.id, { command: "true", cwd: "/nope" }, { onStdout: () => {} }));
    assert.ok(bad instanceof SmolvmError, String(bad));
    assert.equal(bad.code, "invalid_cwd");
    assert.equal(bad.status, 422);
  });

  test("an aborted request rejects with an AbortError and the sandbox still answers", async () => {
    const controller = new AbortController();
    const started = Date.now();
    setTimeout(() => controller.abort(), 500);
    const err = await rejection(
      smolvm.sandbox.exec(sandbox.id, { command: "sleep 10" }, { signal: controller.signal }),
    );
    assert.ok(!(err instanceof SmolvmError), `expected an abort, got ${String(err)}`);
    assert.ok(!(err instanceof SmolvmConnectionError), `expected an abort, got ${String(err)}`);
    assert.equal((err as Error).name, "AbortError");
    assert.ok(Date.now() - started < 5_000, "the abort did not end the request early");

    const result = await smolvm.sandbox.exec(sandbox.id, { command: "echo alive" });
    assert.equal(result.stdout, "alive\n");
  });

  test("timeoutMs rejects with a TimeoutError", async () => {
    const err = await rejection(
      smolvm.sandbox.exec(sandbox.id, { command: "sleep 10" }, { timeoutMs: 300 }),
    );
    assert.equal((err as Error).name, "TimeoutError");
  });

  test("a client timeoutMs does not cut exec short of the command's timeout", async () => {
    const impatient = new Smolvm({ baseUrl, timeoutMs: 200 });
    const result = await impatient.sandbox.exec(sandbox.id, { command: "sleep 1; echo done" });
    assert.equal(result.stdout, "done\n");
  });

  test("ports given to create are exposed, and more can be exposed, listed and closed", async () => {
    assert.deepEqual(sandbox.network, { mode: "open", allow_host_loopback: false, allow_private: false });
    assert.equal(sandbox.ports.length, 1);
    const first = sandbox.ports[0] as Port;
    assert.equal(first.guest, 8080);
    assert.equal(first.host_address, "127.0.0.1");
    assert.ok(Number.isInteger(first.host) && first.host > 0, `host port ${first.host}`);
    // Nothing listens in the guest, but the host side of the forward does.
    assert.equal(await accepts(first.host), true);

    const exposed = await smolvm.sandbox.exposePort(sandbox.id, { guest: 9090 });
    assert.equal(exposed.guest, 9090);
    assert.equal(exposed.host_address, "127.0.0.1");
    assert.ok(exposed.host > 0 && exposed.host !== first.host, `host port ${exposed.host}`);
    assert.equal(await accepts(exposed.host), true);

    assert.deepEqual(await smolvm.sandbox.listPorts(sandbox.id), [first, exposed]);
    assert.deepEqual((await smolvm.sandbox.get(sandbox.id)).ports, [first, exposed]);

    const closed = await smolvm.sandbox.closePort(sandbox.id, 9090);
    assert.deepEqual(closed, { ...exposed, closed: true });
    assert.deepEqual(await smolvm.sandbox.listPorts(sandbox.id), [first]);
    assert.equal(await accepts(exposed.host), false);
  });

  test("port errors are SmolvmErrors with their codes", async () => {
    let err = await rejection(smolvm.sandbox.exposePort(sandbox.id, { guest: 0 }));
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 422);
    assert.equal(err.code, "validation_failed");
    assert.equal(err.field, "guest");
    assert.equal(err.errors?.[0]?.location, "body.guest");

    err = await rejection(smolvm.sandbox.exposePort(sandbox.id, { guest: 8080 }));
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 409);
    assert.equal(err.code, "port_already_exposed");

    const [first] = await smolvm.sandbox.listPorts(sandbox.id);
    assert.ok(first);
    err = await rejection(smolvm.sandbox.exposePort(sandbox.id, { guest: 7070, host: first.host }));
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 409);
    assert.equal(err.code, "port_in_use");

    err = await rejection(smolvm.sandbox.closePort(sandbox.id, 9999));
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 404);
    assert.equal(err.code, "port_not_exposed");

    // Not an integer: refused before any request, as it would not name a port.
    await assert.rejects(smolvm.sandbox.closePort(sandbox.id, 80.5), TypeError);
    assert.deepEqual(await smolvm.sandbox.listPorts(sandbox.id), [first]);
  });

  test("a background process takes input, is listed, followed and signalled", async () => {
    const p = await smolvm.sandbox.processes.start(sandbox.id, {
      command: "while read l; do echo got $l; done",
      shell: "raw",
      tag: "reader",
    });
    assert.ok(p.pid > 0 && p.running && p.tag === "reader", JSON.stringify(p));
    await smolvm.sandbox.processes.stdin(sandbox.id, p.pid, { data: "one\n" });
    const list = await smolvm.sandbox.processes.list(sandbox.id);
    assert.ok(list.some((q) => q.pid === p.pid && q.running));
    const seen: string[] = [];
    let exit: number | undefined;
    const following = (async () => {
      for await (const ev of smolvm.sandbox.processes.follow(sandbox.id, p.pid)) {
        if (ev.type === "stdout") {
          seen.push(ev.text);
          if (ev.text.includes("two")) {
            await smolvm.sandbox.processes.signal(sandbox.id, p.pid, "TERM");
          }
        } else if (ev.type === "exit") {
          exit = ev.process.exit_code;
        }
      }
    })();
    await smolvm.sandbox.processes.stdin(sandbox.id, p.pid, { data: "two\n" });
    await following;
    assert.equal(seen.join(""), "got one\ngot two\n");
    assert.equal(exit, 143);
    const out = await smolvm.sandbox.processes.output(sandbox.id, p.pid);
    assert.equal(out.stdout, "got one\ngot two\n");
    assert.equal(out.process.running, false);
    const err = await rejection(smolvm.sandbox.processes.signal(sandbox.id, p.pid, "TERM"));
    assert.ok(err instanceof SmolvmError && err.code === "process_not_running", String(err));
  });

  test("a terminal runs a shell with its size and returns its exit status", async () => {
    const term = smolvm.sandbox.terminal(sandbox.id, { cols: 90, rows: 33 });
    let screen = "";
    term.onData((b) => {
      screen += new TextDecoder().decode(b);
    });
    term.send("stty size; exit 7\n");
    assert.equal(await term.exit, 7);
    assert.ok(screen.includes("33 90"), screen);
  });

  test("files go in and out, as bytes and as streams", async () => {
    const data = new Uint8Array(256 * 64).map((_, i) => i % 256);
    await smolvm.sandbox.files.write(sandbox.id, "/root/ts/data.bin", data, { mode: "0600" });
    assert.deepEqual(await smolvm.sandbox.files.read(sandbox.id, "/root/ts/data.bin"), data);
    const stat = await smolvm.sandbox.files.stat(sandbox.id, "/root/ts/data.bin");
    assert.equal(stat.size, data.length);
    assert.equal(stat.mode, "0600");
    await smolvm.sandbox.files.write(sandbox.id, "/root/ts/hello.txt", "héllo\n");
    const chunks = ["streamed ", "in ", "parts"];
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        const next = chunks.shift();
        if (next === undefined) {
          controller.close();
        } else {
          controller.enqueue(new TextEncoder().encode(next));
        }
      },
    });
    await smolvm.sandbox.files.write(sandbox.id, "/root/ts/stream.txt", stream);
    const back = await smolvm.sandbox.files.readStream(sandbox.id, "/root/ts/stream.txt");
    assert.equal(await new Response(back).text(), "streamed in parts");
    const list = await smolvm.sandbox.files.list(sandbox.id, "/root/ts");
    assert.deepEqual(
      list.map((e) => `${e.name}:${e.type}`),
      ["data.bin:file", "hello.txt:file", "stream.txt:file"],
    );
    assert.equal(new TextDecoder().decode(await smolvm.sandbox.files.read(sandbox.id, "/root/ts/hello.txt")), "héllo\n");
    await smolvm.sandbox.files.remove(sandbox.id, "/root/ts", { recursive: true });
    const gone = await rejection(smolvm.sandbox.files.stat(sandbox.id, "/root/ts"));
    assert.ok(gone instanceof SmolvmError && gone.code === "file_not_found" && gone.status === 404, String(gone));
    const bad = await rejection(smolvm.sandbox.files.read(sandbox.id, "relative/path"));
    assert.ok(bad instanceof SmolvmError && bad.code === "invalid_path", String(bad));
  });

  test("pause and resume", async () => {
    const paused = await smolvm.sandbox.pause(sandbox.id);
    assert.equal(paused.status, "paused");
    const again = await rejection(smolvm.sandbox.pause(sandbox.id));
    assert.ok(again instanceof SmolvmError && again.status === 409 && again.code === "invalid_state", String(again));
    const resumed = await smolvm.sandbox.resume(sandbox.id);
    assert.equal(resumed.status, "running");
    const res = await smolvm.sandbox.exec(sandbox.id, { command: "echo back" });
    assert.equal(res.stdout, "back\n");
  });

  test("a snapshot is created, listed, got by name and deleted", async () => {
    const name = `saved-${suite}`;
    const snap = await smolvm.snapshots.create(sandbox.id, { name });
    try {
      assert.equal(snap.sandbox, sandbox.id);
      assert.equal(snap.name, name);
      assert.ok(snap.size_bytes > 0);
      const list = await smolvm.snapshots.list();
      assert.ok(list.some((s) => s.id === snap.id));
      assert.equal((await smolvm.snapshots.get(name)).id, snap.id);
      // The sandbox goes on running after it is saved.
      assert.equal((await smolvm.sandbox.get(sandbox.id)).status, "running");
    } finally {
      assert.deepEqual(await smolvm.snapshots.delete(snap.id), { id: snap.id, deleted: true });
    }
    const gone = await rejection(smolvm.snapshots.get(snap.id));
    assert.ok(gone instanceof SmolvmError && gone.status === 404, String(gone));
    assert.ok(Array.isArray(await smolvm.snapshots.prune()));
  });

  test("stop and start", async () => {
    const stopped = await smolvm.sandbox.stop(sandbox.id, { timeout: 30 });
    assert.equal(stopped.status, "stopped");
    const again = await rejection(smolvm.sandbox.stop(sandbox.id));
    assert.ok(again instanceof SmolvmError && again.code === "invalid_state", String(again));
    const started = await smolvm.sandbox.start(sandbox.id);
    assert.equal(started.status, "running");
    const res = await smolvm.sandbox.exec(sandbox.id, { command: "echo up" });
    assert.equal(res.stdout, "up\n");
  });

  test("delete removes it", async () => {
    const deleted = await smolvm.sandbox.delete(sandbox.id);
    assert.deepEqual(deleted, { id: sandbox.id, deleted: true });
    created.delete(sandbox.id);
    const err = await rejection(smolvm.sandbox.get(sandbox.id));
    assert.ok(err instanceof SmolvmError);
    assert.equal(err.code, "sandbox_not_found");
  });
});

test("capabilities and diagnostics describe the server's host", async () => {
  const smolvm = new Smolvm({ baseUrl });
  const caps = await smolvm.capabilities();
  const qemu = caps.backends.find((b) => b.name === "qemu");
  assert.equal(qemu?.available, true);
  assert.equal(qemu?.default, true);
  const firecracker = caps.backends.find((b) => b.name === "firecracker");
  assert.equal(firecracker?.available, false);
  assert.ok(firecracker?.reason, "an unavailable backend says why");
  assert.ok(caps.routes.includes("POST /sandboxes/{id}/exec"));
  assert.deepEqual(caps.network_modes, ["open", "off", "restricted"]);

  const diag = await smolvm.diagnostics();
  assert.equal(diag.ready, true, JSON.stringify(diag.checks));
  assert.ok(diag.checks.some((c) => c.name === "kernel" && c.status === "ok"));
});

test("events follow a sandbox from creation to deletion, and resume", { timeout: 120_000 }, async () => {
  const smolvm = new Smolvm({ baseUrl });
  const sandbox = await create(smolvm, { memory: 256, network: { mode: "off" } });
  await smolvm.sandbox.delete(sandbox.id);
  created.delete(sandbox.id);

  // lastEventId 0 replays every event the server still keeps, so nothing
  // depends on when the stream was opened.
  const read = async (lastEventId: number, until: (ev: SmolvmEvent) => boolean) => {
    const abort = new AbortController();
    const seen: SmolvmEvent[] = [];
    for await (const ev of smolvm.events({ lastEventId, signal: abort.signal })) {
      seen.push(ev);
      if (until(ev)) {
        abort.abort();
        break;
      }
    }
    return seen;
  };
  const isDelete = (ev: SmolvmEvent) => ev.type === "sandbox.deleted" && ev.data.sandbox_id === sandbox.id;
  const mine = (await read(0, isDelete)).filter(
    (ev) => ev.type !== "stream.gap" && ev.data.sandbox_id === sandbox.id,
  );
  const types = mine.map((ev) => ev.type);
  assert.equal(types[0], "sandbox.created");
  assert.ok(types.includes("sandbox.updated"), types.join(","));
  assert.equal(types.at(-1), "sandbox.deleted");

  // Resuming after the first of them replays the rest, in order.
  const first = mine[0];
  assert.ok(first?.id !== undefined);
  const rest = (await read(first.id, isDelete)).filter(
    (ev) => ev.type !== "stream.gap" && ev.data.sandbox_id === sandbox.id,
  );
  assert.deepEqual(
    rest.map((ev) => ev.id),
    mine.slice(1).map((ev) => ev.id),
  );
});

test("get of an unknown id is a 404 SmolvmError", async () => {
  const smolvm = new Smolvm({ baseUrl });
  const err = await rejection(smolvm.sandbox.get("vm-00000000"));
  assert.ok(err instanceof SmolvmError, String(err));
  assert.equal(err.name, "SmolvmError");
  assert.equal(err.status, 404);
  assert.equal(err.code, "sandbox_not_found");
  assert.match(err.message, /vm-00000000/);
  assert.equal(err.problem.instance, "/sandboxes/vm-00000000");
  assert.equal(err.stdout, undefined);
});

test("a validation error is a 422 SmolvmError naming the field", async () => {
  const smolvm = new Smolvm({ baseUrl });
  let sandbox: Sandbox | undefined;
  const err = await rejection(
    create(smolvm, { memory: 1 }).then((s) => (sandbox = s)),
  );
  assert.equal(sandbox, undefined, "the server accepted memory: 1");
  assert.ok(err instanceof SmolvmError, String(err));
  assert.equal(err.status, 422);
  assert.equal(err.code, "validation_failed");
  assert.equal(err.field, "memory");
  assert.match(err.message, /memory/);
  assert.equal(err.errors?.[0]?.location, "body.memory");
});

test("the base URL defaults to the server's default address", () => {
  assert.equal(new Smolvm().baseUrl, "http://127.0.0.1:8000");
  assert.equal(new Smolvm({ token: "t" }).baseUrl, "http://127.0.0.1:8000");
});

test("an empty id is refused before any request", async () => {
  const smolvm = new Smolvm({ baseUrl });
  await assert.rejects(smolvm.sandbox.get(""), TypeError);
});

test("token, extra headers and a custom fetch are sent", async () => {
  const token = randomBytes(16).toString("hex");
  const guarded = await startServer({ token });
  try {
    const anonymous = new Smolvm({ baseUrl: guarded.baseUrl });
    const err = await rejection(anonymous.sandbox.list());
    assert.ok(err instanceof SmolvmError, String(err));
    assert.equal(err.status, 401);
    assert.equal(err.code, "unauthorized");

    const seen: Request[] = [];
    const smolvm = new Smolvm({
      baseUrl: guarded.baseUrl,
      token,
      headers: { "X-Smolvm-Test": "yes" },
      fetch: (request) => {
        seen.push(request);
        return fetch(request);
      },
    });
    assert.ok(Array.isArray(await smolvm.sandbox.list()));
    assert.equal(seen.length, 1);
    assert.equal(seen[0]?.url, `${guarded.baseUrl}/sandboxes`);
    assert.equal(seen[0]?.headers.get("authorization"), `Bearer ${token}`);
    assert.equal(seen[0]?.headers.get("x-smolvm-test"), "yes");
  } finally {
    await guarded.stop();
  }
});

test("an unreachable server is a SmolvmConnectionError", async () => {
  const smolvm = new Smolvm({ baseUrl: `http://127.0.0.1:${await freePort()}` });
  const err = await rejection(smolvm.sandbox.list());
  assert.ok(err instanceof SmolvmConnectionError, String(err));
  assert.ok(!(err instanceof SmolvmError));
  assert.match(err.message, /ECONNREFUSED/);
  assert.ok(err.cause instanceof TypeError);
});

/** Whether something accepts TCP connections on 127.0.0.1:port (false when refused). */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ECONNREFUSED") {
        resolve(false);
      } else {
        reject(err);
      }
    });
  });
}

/** The error a promise rejects with; fails the test if it resolves. */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    const value = await promise;
    assert.fail(`expected a rejection, got ${JSON.stringify(value)}`);
  } catch (err) {
    if (err instanceof assert.AssertionError) {
      throw err;
    }
    return err;
  }
}
