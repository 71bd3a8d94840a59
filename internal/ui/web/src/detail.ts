// One sandbox (#/sandboxes/{id}): its settings, resource use, processes,
// console, terminal and files, and the lifecycle actions.

import {
  ApiError,
  getJSON,
  readText,
  request,
  sandboxPath,
  sendJSON,
  type GuestProcess,
  type Process,
  type ProcessOutput,
  type Sandbox,
  type Snapshot,
  type Stats,
} from "./api";
import { age, bytes, duration, fill, h, localTime, mib, panel, pill, type Child } from "./dom";
import { FilesPanel } from "./files";
import { portLinks, progressBar } from "./list";
import * as state from "./state";
import { TerminalPanel } from "./terminal";
import { confirmDialog, notice, showError } from "./ui";

const pollEvery = 2000;
const logLimit = 256 * 1024;

type Action = "stop" | "start" | "pause" | "resume" | "snapshot" | "fork" | "delete";

/** Which actions a status allows. */
const allowed: Record<string, Action[]> = {
  creating: ["delete"],
  running: ["stop", "pause", "snapshot", "fork", "delete"],
  paused: ["resume", "stop", "snapshot", "fork", "delete"],
  stopped: ["start", "delete"],
  error: ["delete"],
};

export function detailView(root: HTMLElement, id: string): () => void {
  const life = new AbortController();
  const signal = life.signal;
  let sb: Sandbox | undefined = state.sandboxes.get(id);
  let gone = false;

  // Header: name, status, actions.
  const title = h("h1", { class: "detail-title" });
  const headPill = h("span");
  const actionButtons = new Map<Action, HTMLButtonElement>();
  const labels: Record<Action, string> = { stop: "Stop", start: "Start", pause: "Pause", resume: "Resume", snapshot: "Snapshot", fork: "Fork", delete: "Delete" };
  const hints: Record<Action, string> = {
    stop: "Shut the guest down; its disk is kept",
    start: "Boot it again from its disk",
    pause: "Stop its vCPUs, keeping its memory",
    resume: "Let it run again",
    snapshot: "Save its memory, devices and disk",
    fork: "Snapshot it now and start a new sandbox from the snapshot",
    delete: "Delete it and its disk",
  };
  for (const a of Object.keys(labels) as Action[]) {
    actionButtons.set(
      a,
      h("button", { class: a === "delete" ? "button danger-outline" : "button", type: "button", title: hints[a], "data-testid": `action-${a}`, onclick: () => void act(a) }, labels[a]),
    );
  }
  const head = h(
    "div",
    { class: "page-head detail-head" },
    h("div", { class: "detail-name" }, h("a", { href: "#/", class: "back" }, "← Sandboxes"), h("div", { class: "title-row" }, title, headPill)),
    h("div", { class: "actions" }, [...actionButtons.values()]),
  );

  // Panels.
  const settings = h("dl", { class: "settings" });
  const statsBody = h("div", { class: "stats", "data-testid": "stats", "data-state": "loading" }, h("p", { class: "muted" }, "…"));
  const guestProcs = h("div", { class: "scroll-y", "data-testid": "guest-processes" }, h("p", { class: "muted" }, "…"));
  const apiProcs = h("div", { class: "scroll-x", "data-testid": "api-processes" }, h("p", { class: "muted" }, "…"));
  const output = h("div", { class: "proc-output", hidden: true });
  const snaps = h("div", { "data-testid": "snapshots" }, h("p", { class: "muted" }, "…"));
  const log = h("pre", { class: "log", "data-testid": "console-log", "data-state": "loading", tabindex: "0" });
  const terminal = new TerminalPanel(id);
  const files = new FilesPanel(id);
  const creating = h("div", { class: "creating-note", hidden: true });

  const logPanel = panel("Console", "console-panel", [h("button", { class: "button small", type: "button", onclick: () => void loadLogs() }, "Reload")], log);
  const body = h(
    "div",
    { class: "detail-grid" },
    h("div", { class: "col col-main" }, creating, terminal.el, files.el, logPanel),
    h(
      "div",
      { class: "col col-side" },
      panel("Settings", "settings", [], settings),
      panel("Resources", "resources", [h("span", { class: "muted small" }, "every 2 s")], statsBody),
      panel("Guest processes", "guest-processes-panel", [], guestProcs),
      panel("Processes started through the API", "api-processes-panel", [], apiProcs, output),
      panel("Snapshots", "snapshots-panel", [], snaps),
    ),
  );
  const page = h("div", { class: "detail", "data-testid": "sandbox-detail", "data-id": id }, head, body);
  fill(root, page);
  terminal.mount();

  // What is drawn from the sandbox itself, on every change.
  let lastStatus = "";
  const draw = () => {
    if (!sb) return;
    page.dataset["status"] = gone ? "deleted" : sb.status;
    fill(title, sb.name || sb.id);
    fill(headPill, gone ? pill("deleted") : pill(sb.status));
    const can = gone ? [] : (allowed[sb.status] ?? ["delete"]);
    for (const [a, b] of actionButtons) b.hidden = !can.includes(a);
    fill(settings, settingRows(sb));
    creating.hidden = sb.status !== "creating";
    if (sb.status === "creating") fill(creating, h("p", null, "This sandbox is being created."), progressBar(state.progress.get(id)));
    if (sb.status !== lastStatus) {
      const was = lastStatus;
      lastStatus = sb.status;
      statusChanged(was);
    }
  };

  // Side effects of a status change: the terminal, the console, the poll.
  const statusChanged = (was: string) => {
    if (!sb) return;
    const running = sb.status === "running";
    if (running) {
      terminal.connect();
      void files.refresh();
    } else if (sb.status !== "paused" && was !== "") {
      // A paused guest keeps its shell; a stopped one has none.
      terminal.disconnect();
    }
    void loadLogs();
    restartPoll();
  };

  // Console: followed while the VM runs, read once otherwise.
  let logAbort: AbortController | null = null;
  const loadLogs = async () => {
    logAbort?.abort();
    if (!sb || sb.status === "creating" || gone) return;
    const ac = new AbortController();
    logAbort = ac;
    signal.addEventListener("abort", () => ac.abort());
    const follow = sb.status === "running" || sb.status === "paused";
    // A VM restored from a template or a snapshot did not boot its kernel
    // here, so its console can well be empty.
    log.dataset["empty"] = follow ? "Nothing printed on the console since this VM started. Waiting for more…" : "The console printed nothing.";
    let text = "";
    let queued = false;
    const show = () => {
      queued = false;
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
      log.textContent = text;
      if (atEnd) log.scrollTop = log.scrollHeight;
    };
    try {
      const resp = await request("GET", sandboxPath(id, follow ? "/logs?follow=true" : "/logs"), { signal: ac.signal });
      // The answer replaces what an earlier read showed.
      log.textContent = "";
      log.dataset["state"] = follow ? "following" : "read";
      if (!resp.body) return;
      await readText(resp.body, ac.signal, (value) => {
        text += value;
        if (text.length > logLimit) text = text.slice(text.length - logLimit);
        if (!queued) {
          queued = true;
          requestAnimationFrame(show);
        }
      });
      show();
      if (logAbort === ac) log.dataset["state"] = "read";
    } catch (err) {
      if (ac.signal.aborted) return;
      log.dataset["state"] = "error";
      if (err instanceof ApiError && err.problem.code === "console_not_found") {
        log.dataset["empty"] = "There is no console log yet.";
      } else if (!(err instanceof ApiError && (err.status === 409 || err.problem.code === "sandbox_not_found"))) {
        showError(err, "Console");
      }
    }
  };

  // Resource use and processes, every 2 s while the VM exists.
  let pollTimer = 0;
  // Each restart starts a new chain of polls; an older one stops at its
  // next turn.
  let pollChain = 0;
  let statsMissing = false;
  const restartPoll = () => {
    clearTimeout(pollTimer);
    void poll(++pollChain);
  };
  const poll = async (chain: number) => {
    if (signal.aborted || !sb || gone || chain !== pollChain) return;
    const live = sb.status === "running" || sb.status === "paused";
    if (!live) {
      const why = sb.status === "creating" ? "Not running yet." : `Not running (${sb.status}).`;
      statsBody.dataset["state"] = "stopped";
      fill(statsBody, h("p", { class: "muted" }, why));
      fill(guestProcs, h("p", { class: "muted" }, why));
      if (sb.status !== "creating") void loadProcesses();
      else {
        procsKey = "";
        fill(apiProcs, h("p", { class: "muted" }, why));
      }
      void loadSnapshots();
      return;
    }
    await Promise.all([statsMissing ? null : loadStats(), sb.status === "running" ? loadProcesses() : null]);
    if (!signal.aborted && chain === pollChain) pollTimer = window.setTimeout(() => void poll(chain), pollEvery);
  };

  const loadStats = async () => {
    try {
      const st = await getJSON<Stats>(sandboxPath(id, "/stats"), signal);
      statsBody.dataset["state"] = "ok";
      fill(statsBody, statsView(st));
      const ps = st.guest?.processes;
      fill(guestProcs, ps ? guestTable(ps) : h("p", { class: "muted" }, sb?.status === "paused" ? "Paused: the guest cannot be asked." : "Not reported."));
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status === 409) {
        statsBody.dataset["state"] = "stopped";
        fill(statsBody, h("p", { class: "muted" }, "Not running."));
      } else if (err instanceof ApiError && err.status === 404 && err.problem.code !== "sandbox_not_found") {
        // A server without the stats route: stop asking.
        statsMissing = true;
        statsBody.dataset["state"] = "unavailable";
        fill(statsBody, h("p", { class: "muted" }, "This server does not report resource use."));
        fill(guestProcs, h("p", { class: "muted" }, "This server does not list the guest's processes."));
      } else {
        statsBody.dataset["state"] = "error";
        fill(statsBody, h("p", { class: "muted" }, err instanceof Error ? err.message : String(err)));
      }
    }
  };

  // Processes started through the API; a click shows one's output.
  let shownPid = 0;
  let procsKey = "";
  const loadProcesses = async () => {
    try {
      const res = await getJSON<{ processes: Process[] }>(sandboxPath(id, "/processes"), signal);
      // Redrawn only on a change, so a poll does not disturb a click.
      const key = JSON.stringify([res.processes, shownPid]);
      if (key === procsKey) return;
      procsKey = key;
      fill(apiProcs, apiTable(res.processes, shownPid, (pid) => void showOutput(pid)));
    } catch (err) {
      if (signal.aborted) return;
      procsKey = "";
      fill(apiProcs, h("p", { class: "muted" }, err instanceof ApiError && err.status === 409 ? "Not running." : err instanceof Error ? err.message : String(err)));
    }
  };
  const showOutput = async (pid: number) => {
    shownPid = pid;
    output.hidden = false;
    fill(output, h("p", { class: "muted" }, `Output of ${pid}…`));
    try {
      const o = await getJSON<ProcessOutput>(sandboxPath(id, `/processes/${pid}/output`), signal);
      fill(
        output,
        h("div", { class: "output-head" }, h("strong", null, `${pid}: `), h("code", null, o.process.command), h("button", { class: "button small", type: "button", onclick: () => ((output.hidden = true), (shownPid = 0)) }, "Close")),
        o.dropped_bytes > 0 ? h("p", { class: "muted small" }, `${bytes(o.dropped_bytes)} of earlier output no longer kept`) : null,
        h("pre", { class: "log short", "data-testid": "process-output" }, o.stdout || (o.stderr ? "" : "(no output)")),
        o.stderr ? h("pre", { class: "log short stderr" }, o.stderr) : null,
      );
      void loadProcesses();
    } catch (err) {
      showError(err, `Output of ${pid}`);
      output.hidden = true;
    }
  };

  // This sandbox's snapshots, each a starting point for a fork.
  const loadSnapshots = async () => {
    try {
      const res = await getJSON<{ snapshots: Snapshot[] }>("/snapshots", signal);
      const mine = res.snapshots.filter((s) => s.sandbox === id);
      fill(
        snaps,
        mine.length === 0
          ? h("p", { class: "muted" }, "None yet.")
          : h(
              "ul",
              { class: "snap-list" },
              mine.map((s) =>
                h(
                  "li",
                  { "data-testid": "snapshot-row", "data-id": s.id },
                  h("span", { class: "mono" }, s.name ? `${s.name} ` : "", h("span", { class: s.name ? "muted" : "" }, s.id)),
                  h("span", { class: "muted small" }, `${bytes(s.size_bytes)} · ${age(s.created_at)} ago`),
                  h("button", { class: "button small", type: "button", onclick: () => fork(s).catch((err) => showError(err, "Fork")) }, "Fork"),
                ),
              ),
            ),
      );
    } catch (err) {
      if (!signal.aborted) fill(snaps, h("p", { class: "muted" }, err instanceof Error ? err.message : String(err)));
    }
  };

  const fork = async (s: Snapshot) => {
    // The backend is the snapshot's anyway; naming it keeps a server whose
    // default backend is "auto" from refusing the fork.
    const created = await sendJSON<Sandbox>("POST", "/sandboxes", { snapshot: s.id, backend: s.backend }, { Prefer: "respond-async" });
    state.put(created);
    notice(`Forked ${s.name || s.id} into ${created.id}`);
    location.hash = `#/sandboxes/${encodeURIComponent(created.id)}`;
  };

  const act = async (a: Action) => {
    if (!sb) return;
    if (a === "delete") {
      const ok = await confirmDialog(`Delete ${sb.name || sb.id}?`, "The sandbox, its disk and anything running in it are gone for good. Its snapshots stay.", "Delete");
      if (!ok) return;
    }
    const buttons = [...actionButtons.values()];
    for (const b of buttons) b.disabled = true;
    actionButtons.get(a)?.classList.add("busy");
    try {
      switch (a) {
        case "stop":
        case "start":
        case "pause":
        case "resume":
          sb = await sendJSON<Sandbox>("POST", sandboxPath(id, `/${a}`), {});
          state.put(sb);
          break;
        case "snapshot": {
          const s = await sendJSON<Snapshot>("POST", sandboxPath(id, "/snapshots"), {});
          notice(`Saved snapshot ${s.id} (${bytes(s.size_bytes)})`);
          void loadSnapshots();
          break;
        }
        case "fork": {
          const s = await sendJSON<Snapshot>("POST", sandboxPath(id, "/snapshots"), {});
          await fork(s);
          break;
        }
        case "delete":
          await request("DELETE", sandboxPath(id));
          notice(`Deleted ${sb.name || sb.id}`);
          location.hash = "#/";
          break;
      }
    } catch (err) {
      showError(err, labels[a]);
    } finally {
      for (const b of buttons) b.disabled = false;
      actionButtons.get(a)?.classList.remove("busy");
    }
  };

  const unsubscribe = state.subscribe((ev) => {
    const now = state.sandboxes.get(id);
    if (now) {
      sb = now;
      gone = false;
    } else if (sb && !gone && (state.loaded || ev?.type === "sandbox.deleted")) {
      gone = true;
      terminal.disconnect();
      logAbort?.abort();
    }
    if (ev?.type === "process.exited" && (ev.data as { sandbox_id?: string }).sandbox_id === id) void loadProcesses();
    draw();
  });

  if (sb) {
    draw();
  } else {
    // Not in the list yet (the list is still coming, or another process
    // made it): ask for it.
    getJSON<Sandbox>(sandboxPath(id), signal)
      .then((s) => {
        if (!state.sandboxes.has(id)) state.put(s);
        else draw();
      })
      .catch((err) => {
        if (signal.aborted) return;
        if (err instanceof ApiError && err.status === 404) {
          fill(root, h("div", { class: "card missing", "data-testid": "sandbox-missing" }, h("h1", null, "No such sandbox"), h("p", null, `There is no sandbox ${id} on this server.`), h("a", { href: "#/" }, "← All sandboxes")));
        } else showError(err);
      });
  }
  void loadSnapshots();

  return () => {
    life.abort();
    clearTimeout(pollTimer);
    unsubscribe();
    terminal.dispose();
    files.dispose();
  };
}

function settingRows(s: Sandbox): Child[] {
  const rows: [string, Child][] = [
    ["ID", h("span", { class: "mono" }, s.id)],
    ["Name", s.name || "–"],
    ["Status", [pill(s.status), s.error ? h("span", { class: "error-text small block" }, s.error) : null]],
    ["OS", s.os || "–"],
    ["Image", h("span", { class: "mono break" }, s.image || "–")],
    ["Backend", s.boot ? `${s.backend} (${s.boot} boot)` : s.backend],
    ["vCPUs", String(s.vcpus)],
    ["Memory", mib(s.memory)],
    ["Disk", mib(s.disk_size)],
    ["Network", networkText(s)],
    ["Ports", portLinks(s)],
    ["Created", h("span", { title: s.created_at }, `${localTime(s.created_at)} (${age(s.created_at)} ago)`)],
  ];
  if (s.pid) rows.push(["Host PID", String(s.pid)]);
  if (s.timeout) rows.push(["Time limit", `${duration(s.timeout * 1000)}, then ${s.on_timeout ?? "delete"}${s.expires_at ? ` (at ${localTime(s.expires_at)})` : ""}`]);
  if (s.snapshot) rows.push(["Fork of", h("span", { class: "mono" }, s.snapshot)]);
  if (s.labels && Object.keys(s.labels).length) rows.push(["Labels", kv(s.labels)]);
  if (s.env && Object.keys(s.env).length) rows.push(["Environment", kv(s.env)]);
  if (s.mounts?.length) rows.push(["Mounts", s.mounts.map((m) => h("div", { class: "mono small" }, `${m.host} → ${m.guest}${m.readonly === false ? " (rw)" : ""}`))]);
  if (s.warnings?.length) rows.push(["Warnings", s.warnings.map((w) => h("div", { class: "small" }, w))]);
  return rows.map(([k, v]) => [h("dt", null, k), h("dd", null, v)]);
}

function networkText(s: Sandbox): string {
  const n = s.network;
  if (!n) return "–";
  const extra: string[] = [];
  if (n.allow?.length) extra.push(`${n.mode === "restricted" ? "only" : "also"} ${n.allow.join(", ")}`);
  if (n.allow_private) extra.push("private ranges");
  if (n.allow_host_loopback) extra.push("host loopback");
  return extra.length ? `${n.mode}: ${extra.join("; ")}` : n.mode;
}

function kv(m: Record<string, string>): HTMLElement {
  return h(
    "div",
    { class: "kv" },
    Object.entries(m)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) => h("div", { class: "mono small break" }, `${k}=${v}`)),
  );
}

function meter(label: string, used: number, total: number, text: string): HTMLElement {
  const fillEl = h("div", { class: "bar-fill" });
  const pct = total > 0 ? Math.min(100, (used / total) * 100) : 0;
  fillEl.style.width = `${pct.toFixed(1)}%`;
  if (pct > 90) fillEl.classList.add("hot");
  return h("div", { class: "meter" }, h("div", { class: "meter-head" }, h("span", null, label), h("span", { class: "muted" }, text)), h("div", { class: "bar" }, fillEl));
}

function statsView(st: Stats): Child[] {
  const out: Child[] = [];
  const g = st.guest;
  if (g) {
    const memUsed = g.memory_total_bytes - g.memory_available_bytes;
    const diskUsed = g.disk_total_bytes - g.disk_free_bytes;
    out.push(
      meter("Guest memory", memUsed, g.memory_total_bytes, `${bytes(memUsed)} of ${bytes(g.memory_total_bytes)}`),
      meter("Guest disk", diskUsed, g.disk_total_bytes, `${bytes(diskUsed)} of ${bytes(g.disk_total_bytes)}`),
    );
  }
  const facts: [string, string][] = [];
  if (st.host) {
    facts.push(["VM CPU", `${st.host.cpu_percent.toFixed(1)}%`], ["CPU time", `${st.host.cpu_seconds.toFixed(1)} s`], ["VM RSS", bytes(st.host.rss_bytes)], ["VM PSS", bytes(st.host.pss_bytes)]);
  }
  if (g) facts.push(["Load (1 min)", g.load1.toFixed(2)], ["Uptime", duration(g.uptime_ms)]);
  out.push(h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v)))));
  if (!g) out.push(h("p", { class: "muted small" }, "The guest reports nothing while paused."));
  return out;
}

function guestTable(ps: GuestProcess[]): HTMLElement {
  const sorted = [...ps].sort((a, b) => a.pid - b.pid);
  return h(
    "table",
    { class: "table compact" },
    h("thead", null, h("tr", null, h("th", { class: "num" }, "PID"), h("th", null, "User"), h("th", null, "State"), h("th", { class: "num" }, "RSS"), h("th", { class: "num" }, "CPU s"), h("th", null, "Command"))),
    h(
      "tbody",
      null,
      sorted.map((p) =>
        h(
          "tr",
          { "data-pid": p.pid },
          h("td", { class: "num" }, p.pid),
          h("td", null, p.user),
          h("td", null, p.state),
          h("td", { class: "num" }, bytes(p.rss_bytes)),
          h("td", { class: "num" }, p.cpu_seconds.toFixed(1)),
          h("td", { class: "mono cmd", title: p.command }, p.command),
        ),
      ),
    ),
  );
}

function apiTable(ps: Process[], shown: number, open: (pid: number) => void): HTMLElement {
  if (ps.length === 0) return h("p", { class: "muted" }, "None. Start one with POST /sandboxes/{id}/processes.");
  return h(
    "table",
    { class: "table compact" },
    h("thead", null, h("tr", null, h("th", { class: "num" }, "PID"), h("th", null, "Command"), h("th", null, "State"), h("th", null, "Started"))),
    h(
      "tbody",
      null,
      ps.map((p) => {
        const tr = h(
          "tr",
          { class: p.pid === shown ? "clickable selected" : "clickable", "data-testid": "api-process", "data-pid": p.pid, title: "Show its output" },
          h("td", { class: "num" }, p.pid),
          h("td", { class: "mono cmd" }, p.tag ? h("span", { class: "tag" }, p.tag) : null, p.command),
          h("td", null, p.running ? pill("running") : h("span", { class: "muted" }, p.signal ? `killed (${p.signal})` : `exit ${p.exit_code ?? "?"}`)),
          h("td", { class: "muted", title: p.started_at }, `${age(p.started_at)} ago`),
        );
        tr.addEventListener("click", () => open(p.pid));
        return tr;
      }),
    ),
  );
}
