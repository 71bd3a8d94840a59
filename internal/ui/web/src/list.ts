// The sandbox list (#/): live from the event stream, with the create form.

import { getJSON, sendJSON, type OSCapability, type Progress, type Sandbox, type Snapshot } from "./api";
import { age, fill, h, mib, pill, type Child } from "./dom";
import * as state from "./state";
import { notice, showError } from "./ui";

export function listView(root: HTMLElement): () => void {
  const count = h("span", { class: "muted count" });
  const form = createForm(() => {
    form.hidden = true;
    openButton.setAttribute("aria-expanded", "false");
  });
  form.hidden = true;
  const openButton = h(
    "button",
    {
      class: "button primary",
      type: "button",
      "data-testid": "create-open",
      "aria-expanded": "false",
      onclick: () => {
        form.hidden = !form.hidden;
        openButton.setAttribute("aria-expanded", String(!form.hidden));
        if (!form.hidden) form.dispatchEvent(new Event("smolvm:open"));
      },
    },
    "New sandbox",
  );
  const tbody = h("tbody");
  const empty = h("p", { class: "empty", hidden: true }, "No sandboxes yet. Create one with New sandbox, the CLI or the API.");
  const table = h(
    "table",
    { class: "table sandbox-table", "data-testid": "sandbox-list" },
    h(
      "thead",
      null,
      h("tr", null, h("th", null, "Sandbox"), h("th", null, "Status"), h("th", null, "Image"), h("th", null, "Memory"), h("th", null, "Age"), h("th", null, "Ports")),
    ),
    tbody,
  );
  fill(
    root,
    h("div", { class: "page-head" }, h("h1", null, "Sandboxes ", count), openButton),
    form,
    h("div", { class: "card table-wrap" }, table, empty),
  );

  // Rows are kept by id and rebuilt only when what they show changed.
  const rows = new Map<string, { key: string; tr: HTMLTableRowElement }>();
  const draw = () => {
    const list = [...state.sandboxes.values()].sort((a, b) => a.created_at.localeCompare(b.created_at) || a.id.localeCompare(b.id));
    for (const [id, r] of rows) {
      if (!state.sandboxes.has(id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    let prev: Element | null = null;
    for (const s of list) {
      const p = state.progress.get(s.id);
      const key = JSON.stringify([s, p, age(s.created_at)]);
      let r = rows.get(s.id);
      if (!r || r.key !== key) {
        const tr = row(s, p);
        r?.tr.replaceWith(tr);
        r = { key, tr };
        rows.set(s.id, r);
      }
      // Keep the order: after the previous row, or first.
      const want: Element | null = prev ? prev.nextElementSibling : tbody.firstElementChild;
      if (want !== r.tr) {
        if (prev) prev.after(r.tr);
        else tbody.prepend(r.tr);
      }
      prev = r.tr;
    }
    table.dataset["loaded"] = String(state.loaded);
    count.textContent = state.loaded ? String(list.length) : "";
    empty.hidden = !state.loaded || list.length > 0;
  };
  const unsubscribe = state.subscribe(draw);
  // Ages move on without events.
  const tick = setInterval(draw, 15000);
  draw();
  return () => {
    unsubscribe();
    clearInterval(tick);
  };
}

function row(s: Sandbox, p: Progress | undefined): HTMLTableRowElement {
  const href = `#/sandboxes/${encodeURIComponent(s.id)}`;
  // Each cell's value is one element, so a narrow window can set it
  // against its label.
  const cell = (label: string, attrs: Record<string, string>, ...value: Child[]) =>
    h("td", { "data-label": label, ...attrs }, h("div", { class: "cell" }, value));
  const tr = h(
    "tr",
    { "data-testid": "sandbox-row", "data-id": s.id, "data-status": s.status, class: "clickable" },
    cell(
      "Sandbox",
      { class: "cell-name" },
      h("a", { href, class: "name-link" }, s.name ? h("span", { class: "name" }, s.name) : null, h("span", { class: s.name ? "id muted" : "id" }, s.id)),
    ),
    cell("Status", {}, pill(s.status), s.status === "creating" ? progressBar(p) : null, s.status === "error" && s.error ? h("div", { class: "muted small error-text" }, s.error) : null),
    cell("Image", {}, h("span", null, s.os || "–"), s.image ? h("span", { class: "muted small block mono-ish" }, s.image) : null),
    cell("Memory", {}, mib(s.memory), h("span", { class: "muted small" }, ` · ${s.vcpus} vCPU`)),
    cell("Age", { title: s.created_at }, age(s.created_at)),
    cell("Ports", {}, portLinks(s)),
  );
  tr.addEventListener("click", (e) => {
    // Links (the name, a port) do their own thing.
    if ((e.target as Element).closest("a")) return;
    location.hash = href;
  });
  return tr;
}

export function portLinks(s: Sandbox): HTMLElement | string {
  if (!s.ports?.length) return "–";
  return h(
    "span",
    { class: "ports" },
    s.ports.map((p) => {
      // The host port is chosen once the sandbox runs.
      if (!p.host) return h("span", { class: "port muted", title: "the host port is chosen when the sandbox runs" }, `${p.guest} → …`);
      const host = p.host_address && p.host_address !== "0.0.0.0" && p.host_address !== "::" ? p.host_address : "127.0.0.1";
      const url = `http://${host.includes(":") ? `[${host}]` : host}:${p.host}`;
      return h("a", { href: url, target: "_blank", rel: "noopener noreferrer", class: "port", title: `guest port ${p.guest}` }, `${p.guest} → ${url}`);
    }),
  );
}

/** The image preparation of a sandbox being created, as a bar. */
export function progressBar(p: Progress | undefined): HTMLElement {
  const bar = h("div", { class: "bar-fill" });
  const known = p && p.total_bytes > 0 && p.phase !== "ready";
  const el = h(
    "div",
    { class: "pull-progress", "data-testid": "pull-progress" },
    h("div", { class: known ? "bar" : "bar indeterminate", role: "progressbar" }, bar),
    h("div", { class: "muted small" }, progressText(p)),
  );
  if (known) {
    const pct = Math.min(100, Math.round((p.done_bytes / p.total_bytes) * 100));
    bar.style.width = `${pct}%`;
    el.firstElementChild?.setAttribute("aria-valuenow", String(pct));
  }
  return el;
}

function progressText(p: Progress | undefined): string {
  if (!p || p.phase === "ready") return "booting…";
  const what: Record<string, string> = { resolve: "resolving image", pull: "pulling image", extract: "extracting", mkfs: "making filesystem", ready: "booting" };
  const label = what[p.phase] ?? p.phase;
  if (p.total_bytes > 0) return `${label} ${mibText(p.done_bytes)} / ${mibText(p.total_bytes)}`;
  if (p.done_bytes > 0) return `${label} ${mibText(p.done_bytes)}`;
  return `${label}…`;
}

function mibText(n: number): string {
  return `${(n / 1048576).toFixed(n < 10485760 ? 1 : 0)} MiB`;
}

/** Parses "8080, 3000:3000" (GUEST or HOST:GUEST, as docker -p) into port specs. */
export function parsePorts(text: string): { guest: number; host?: number }[] {
  const out: { guest: number; host?: number }[] = [];
  for (const raw of text.split(/[\s,]+/)) {
    if (!raw) continue;
    const v = raw.replace(/\/tcp$/i, "");
    const parts = v.split(":");
    const num = (s: string | undefined) => {
      const n = Number(s);
      if (!s || !Number.isInteger(n) || n < 1 || n > 65535) throw new Error(`ports: "${raw}" is not PORT or HOST:GUEST with ports from 1 to 65535`);
      return n;
    };
    if (parts.length === 1) out.push({ guest: num(parts[0]) });
    else if (parts.length === 2) out.push({ host: num(parts[0]), guest: num(parts[1]) });
    else throw new Error(`ports: "${raw}" is not PORT or HOST:GUEST`);
  }
  return out;
}

function createForm(close: () => void): HTMLFormElement {
  const field = (label: string, control: HTMLElement, hint?: string) =>
    h("label", { class: "field" }, h("span", null, label), control, hint ? h("small", { class: "muted" }, hint) : null);
  const name = h("input", { class: "input", name: "name", placeholder: "optional", autocomplete: "off", "data-testid": "create-name" });
  const os = h("select", { class: "input", name: "os", "data-testid": "create-os" }, h("option", { value: "" }, "default"));
  const image = h("input", { class: "input", name: "image", placeholder: "the OS's default", autocomplete: "off", "data-testid": "create-image" });
  const memory = h("input", { class: "input", name: "memory", type: "number", min: 64, placeholder: "default", "data-testid": "create-memory" });
  const disk = h("input", { class: "input", name: "disk_size", type: "number", min: 256, placeholder: "default", "data-testid": "create-disk" });
  const network = h(
    "select",
    { class: "input", name: "network", "data-testid": "create-network" },
    h("option", { value: "open" }, "open (public Internet)"),
    h("option", { value: "off" }, "off"),
  );
  const ports = h("input", { class: "input", name: "ports", placeholder: "8080, 3000:3000", autocomplete: "off", "data-testid": "create-ports" });
  const snapshot = h("select", { class: "input", name: "snapshot", "data-testid": "create-snapshot" }, h("option", { value: "" }, "none: a new machine"));
  const submit = h("button", { class: "button primary", type: "submit", "data-testid": "create-submit" }, "Create");
  const form = h(
    "form",
    { class: "card create-form", "data-testid": "create-form" },
    h("h2", null, "New sandbox"),
    h(
      "div",
      { class: "form-grid" },
      field("Name", name),
      field("OS", os),
      field("Image", image, "OCI reference, s3:// or file://"),
      field("Memory (MiB)", memory),
      field("Disk (MiB)", disk),
      field("Network", network),
      field("Ports", ports, "guest, or host:guest"),
      field("From snapshot", snapshot, "a fork of a saved sandbox"),
    ),
    h("div", { class: "form-actions" }, h("button", { class: "button", type: "button", onclick: close }, "Cancel"), submit),
  );

  // The choices come from the server when the form opens.
  let snapshots: Snapshot[] = [];
  form.addEventListener("smolvm:open", () => {
    getJSON<{ os: OSCapability[] }>("/capabilities")
      .then((caps) => {
        const chosen = os.value;
        fill(
          os,
          h("option", { value: "" }, "default"),
          caps.os.map((o) =>
            h("option", { value: o.name, disabled: !o.available, title: o.available ? (o.image ?? "") : (o.reason ?? "") }, o.available ? o.name : `${o.name} (unavailable)`),
          ),
        );
        os.value = chosen;
      })
      .catch(() => {});
    getJSON<{ snapshots: Snapshot[] }>("/snapshots")
      .then((list) => {
        snapshots = list.snapshots;
        const chosen = snapshot.value;
        fill(
          snapshot,
          h("option", { value: "" }, "none: a new machine"),
          list.snapshots.map((s) => h("option", { value: s.id }, `${s.name ? `${s.name} (${s.id})` : s.id} · ${s.os}, of ${s.sandbox}`)),
        );
        snapshot.value = chosen;
      })
      .catch(() => {});
    name.focus();
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body: Record<string, unknown> = {};
    try {
      if (name.value.trim()) body["name"] = name.value.trim();
      if (os.value) body["os"] = os.value;
      if (image.value.trim()) body["image"] = image.value.trim();
      if (memory.value) body["memory"] = Number(memory.value);
      if (disk.value) body["disk_size"] = Number(disk.value);
      if (network.value !== "open") body["network"] = { mode: network.value };
      const p = parsePorts(ports.value);
      if (p.length) body["ports"] = p;
      if (snapshot.value) {
        body["snapshot"] = snapshot.value;
        // A fork runs on the snapshot's backend; naming it keeps a server
        // whose default is "auto" from refusing the fork.
        const backend = snapshots.find((s) => s.id === snapshot.value)?.backend;
        if (backend) body["backend"] = backend;
      }
    } catch (err) {
      showError(err, "Create");
      return;
    }
    submit.disabled = true;
    try {
      // 202 at once: the list shows the sandbox being created.
      const s = await sendJSON<Sandbox>("POST", "/sandboxes", body, { Prefer: "respond-async" });
      state.put(s);
      form.reset();
      close();
      notice(`Creating ${s.name || s.id}`);
    } catch (err) {
      showError(err, "Create");
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
