// Small DOM and formatting helpers shared by the views.

export type Child = Node | string | number | null | undefined | false | Child[];
type AttrValue = string | number | boolean | null | undefined;
type Attrs = Record<string, AttrValue | ((ev: any) => void)>;

/**
 * h builds an element: attributes (false/null/undefined are left out, true
 * is an empty attribute), "on…" keys as listeners, then the children.
 */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (typeof v === "function") {
      el.addEventListener(k.slice(2), v);
    } else if (v === true) {
      el.setAttribute(k, "");
    } else if (v !== false && v !== null && v !== undefined) {
      el.setAttribute(k, String(v));
    }
  }
  append(el, children);
  return el;
}

export function append(el: Node, children: Child[]): void {
  for (const c of children) {
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.appendChild(c);
    else if (c !== null && c !== undefined && c !== false) el.appendChild(document.createTextNode(String(c)));
  }
}

/** Replaces el's children. */
export function fill(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

/** A bordered panel with a title, optional tools on its right and a body. */
export function panel(title: string, testid: string, tools: Child[], ...body: Child[]): HTMLElement {
  return h(
    "section",
    { class: "panel", "data-testid": testid },
    h("header", { class: "panel-head" }, h("h2", null, title), h("div", { class: "tools" }, tools)),
    h("div", { class: "panel-body" }, body),
  );
}

const units = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return "–";
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

/** mib formats a size the API gives in MiB. */
export function mib(n: number | undefined): string {
  return n === undefined ? "–" : bytes(n * 1024 * 1024);
}

export function duration(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs}h ${m % 60}m`;
  return `${Math.floor(hrs / 24)}d`;
}

export function age(iso: string | undefined): string {
  if (!iso) return "–";
  const t = Date.parse(iso);
  return Number.isNaN(t) ? "–" : duration(Date.now() - t);
}

export function localTime(iso: string | undefined): string {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function pill(status: string): HTMLElement {
  return h("span", { class: `pill pill-${status}` }, status);
}

/** An SVG icon from a 16×16 path. */
export function icon(path: string, cls = "icon"): SVGElement {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("class", cls);
  svg.setAttribute("aria-hidden", "true");
  const p = document.createElementNS(ns, "path");
  p.setAttribute("d", path);
  svg.appendChild(p);
  return svg;
}

export const icons = {
  folder: "M1.5 3.5A1 1 0 0 1 2.5 2.5h3.6l1.5 1.5h5.9a1 1 0 0 1 1 1v7.5a1 1 0 0 1-1 1h-11a1 1 0 0 1-1-1z",
  file: "M3.5 1.5h6l3 3v10h-9z M9.5 1.5v3h3",
  link: "M6.5 9.5l3-3 M5 7.5l-1.5 1.5a2.1 2.1 0 0 0 3 3L8 10.5 M11 8.5l1.5-1.5a2.1 2.1 0 0 0-3-3L8 5.5",
  up: "M8 13V3 M4 7l4-4 4 4",
  refresh: "M13 8a5 5 0 1 1-1.5-3.5 M13 2v3h-3",
  sun: "M8 5a3 3 0 1 0 0 6 3 3 0 0 0 0-6z M8 1v1.5 M8 13.5V15 M1 8h1.5 M13.5 8H15 M3 3l1 1 M12 12l1 1 M3 13l1-1 M12 4l1-1",
  moon: "M13.5 10A6 6 0 0 1 6 2.5a6 6 0 1 0 7.5 7.5z",
  close: "M4 4l8 8 M12 4l-8 8",
};
