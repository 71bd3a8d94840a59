// The file browser: GET .../fs/list to walk directories, GET .../files to
// download (fetched with the token, saved through a blob URL), PUT
// .../files to upload the raw bytes of a chosen file.

import { ApiError, getJSON, request, sandboxPath, type FileEntry } from "./api";
import { bytes, fill, h, icon, icons, localTime, panel } from "./dom";
import { showError } from "./ui";

export class FilesPanel {
  readonly el: HTMLElement;
  private dir = "/root";
  private readonly pathInput: HTMLInputElement;
  private readonly list: HTMLElement;
  private readonly status: HTMLElement;
  private readonly upload: HTMLInputElement;
  private loading: AbortController | null = null;

  constructor(private readonly id: string) {
    this.pathInput = h("input", { class: "input mono", "data-testid": "file-path", "aria-label": "Directory", spellcheck: "false", autocomplete: "off" });
    this.pathInput.value = this.dir;
    this.pathInput.addEventListener("keydown", (e) => {
      if (e.key === "Enter") this.open(this.pathInput.value.trim() || "/");
    });
    this.upload = h("input", { type: "file", multiple: true, class: "visually-hidden", id: `upload-${id}`, "data-testid": "file-upload" });
    this.upload.addEventListener("change", () => void this.uploadChosen());
    this.status = h("span", { class: "muted small", role: "status" });
    this.list = h("div", { class: "file-list" });
    const toolbar = h(
      "div",
      { class: "file-toolbar" },
      h("button", { class: "icon-button", type: "button", title: "Parent directory", "aria-label": "Parent directory", onclick: () => this.open(parent(this.dir)) }, icon(icons.up)),
      this.pathInput,
      h("button", { class: "icon-button", type: "button", title: "Refresh", "aria-label": "Refresh", onclick: () => this.open(this.dir) }, icon(icons.refresh)),
      h("label", { class: "button small", for: `upload-${id}` }, "Upload"),
      this.upload,
    );
    this.el = panel("Files", "file-browser", [this.status], toolbar, this.list);
  }

  /**
   * Lists the current directory again, for the page rather than the user:
   * a failure shows in the panel, not in the error banner.
   */
  refresh(): Promise<void> {
    return this.open(this.dir, true);
  }

  /** Lists dir and makes it the current directory. */
  async open(dir: string, quiet = false): Promise<void> {
    this.loading?.abort();
    const ac = new AbortController();
    this.loading = ac;
    this.status.textContent = "loading…";
    try {
      const q = new URLSearchParams({ path: dir });
      const res = await getJSON<{ entries: FileEntry[] }>(sandboxPath(this.id, `/fs/list?${q}`), ac.signal);
      this.dir = dir;
      this.pathInput.value = dir;
      this.draw(res.entries);
      this.status.textContent = `${res.entries.length} entries`;
    } catch (err) {
      if (ac.signal.aborted) return;
      this.status.textContent = "";
      this.pathInput.value = this.dir;
      // A sandbox that stopped or went is the page's news, not an error
      // of the listing.
      if (err instanceof ApiError && (err.problem.code === "sandbox_not_running" || err.problem.code === "sandbox_not_found")) {
        fill(this.list, h("p", { class: "empty" }, "The sandbox is not running."));
      } else if (quiet) {
        fill(this.list, h("p", { class: "empty" }, `Cannot list ${dir}: ${err instanceof Error ? err.message : String(err)}`));
      } else {
        showError(err, `List ${dir}`);
      }
    }
  }

  private draw(entries: FileEntry[]): void {
    // Directories first, then by name.
    const sorted = [...entries].sort((a, b) => Number(b.type === "directory") - Number(a.type === "directory") || a.name.localeCompare(b.name));
    if (sorted.length === 0) {
      fill(this.list, h("p", { class: "empty" }, "This directory is empty."));
      return;
    }
    fill(
      this.list,
      sorted.map((f) => {
        const isDir = f.type === "directory";
        const glyph = icon(isDir ? icons.folder : f.type === "symlink" ? icons.link : icons.file, `icon file-icon file-${f.type}`);
        const action = isDir ? () => void this.open(join(this.dir, f.name)) : () => void this.download(f);
        return h(
          "div",
          { class: "file-row", "data-testid": "file-row", "data-name": f.name, "data-type": f.type },
          h(
            "button",
            { class: "file-name", type: "button", title: isDir ? `Open ${f.path}` : f.type === "symlink" ? `→ ${f.link_target ?? ""}` : `Download ${f.path}`, onclick: action },
            glyph,
            h("span", null, f.name),
          ),
          h("span", { class: "file-size muted" }, isDir ? "" : bytes(f.size)),
          h("span", { class: "file-mode muted mono" }, f.mode),
          h("span", { class: "file-time muted", title: f.mtime }, localTime(f.mtime)),
        );
      }),
    );
  }

  private async download(f: FileEntry): Promise<void> {
    this.status.textContent = `downloading ${f.name}…`;
    try {
      const q = new URLSearchParams({ path: f.path });
      const resp = await request("GET", sandboxPath(this.id, `/files?${q}`));
      const url = URL.createObjectURL(await resp.blob());
      const a = h("a", { href: url, download: f.name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      // The download has its own copy by the time this runs.
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      this.status.textContent = "";
    } catch (err) {
      this.status.textContent = "";
      showError(err, `Download ${f.path}`);
    }
  }

  private async uploadChosen(): Promise<void> {
    const files = [...(this.upload.files ?? [])];
    this.upload.value = "";
    const dir = this.dir;
    for (const f of files) {
      this.status.textContent = `uploading ${f.name}…`;
      try {
        const q = new URLSearchParams({ path: join(dir, f.name) });
        await request("PUT", sandboxPath(this.id, `/files?${q}`), { body: f, headers: { "Content-Type": "application/octet-stream" } });
      } catch (err) {
        showError(err, `Upload ${f.name}`);
        break;
      }
    }
    this.status.textContent = "";
    await this.open(dir);
  }

  dispose(): void {
    this.loading?.abort();
  }
}

function join(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function parent(dir: string): string {
  const trimmed = dir.replace(/\/+$/, "");
  const i = trimmed.lastIndexOf("/");
  return i <= 0 ? "/" : trimmed.slice(0, i);
}
