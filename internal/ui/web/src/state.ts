// The sandboxes the page knows, kept current by GET /sandboxes and the
// event stream. Views subscribe and redraw from it.

import { getJSON, type Progress, type Sandbox } from "./api";
import type { ServerEvent } from "./events";

export const sandboxes = new Map<string, Sandbox>();
/** Image preparation of sandboxes still being created. */
export const progress = new Map<string, Progress>();
/** Whether the first list has arrived. */
export let loaded = false;

type Listener = (ev?: ServerEvent) => void;
const listeners = new Set<Listener>();

export function subscribe(fn: Listener): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function notify(ev?: ServerEvent): void {
  for (const fn of listeners) fn(ev);
}

/** Puts a sandbox answered by a call (a create, a stop) into the store. */
export function put(s: Sandbox): void {
  set(s);
  notify();
}

function set(s: Sandbox): void {
  sandboxes.set(s.id, s);
  if (s.status !== "creating") progress.delete(s.id);
  else if (s.progress) progress.set(s.id, s.progress);
}

function remove(id: string): void {
  sandboxes.delete(id);
  progress.delete(id);
}

interface EventData {
  sandbox_id: string;
  sandbox?: Sandbox;
  progress?: Progress;
}

function apply(ev: ServerEvent): void {
  const d = ev.data as EventData;
  switch (ev.type) {
    case "sandbox.created":
    case "sandbox.updated":
      if (d.sandbox) set(d.sandbox);
      break;
    case "sandbox.deleted":
      remove(d.sandbox_id);
      break;
    case "image.pull":
      if (d.progress && sandboxes.get(d.sandbox_id)?.status !== "running") progress.set(d.sandbox_id, d.progress);
      break;
  }
}

// While a list is under way, events are also kept, to be applied again on
// top of its answer: the list may have been read before some of them
// happened, and each event carries the whole sandbox, so replaying them in
// order ends at the newest state.
let pending: ServerEvent[] | null = null;
let again = false;

export function handle(ev: ServerEvent): void {
  pending?.push(ev);
  apply(ev);
  notify(ev);
}

/** Lists the sandboxes again, replacing what the store holds. */
export async function reload(): Promise<void> {
  if (pending) {
    again = true;
    return;
  }
  pending = [];
  try {
    const list = await getJSON<{ sandboxes: Sandbox[] }>("/sandboxes");
    const replay = pending;
    sandboxes.clear();
    progress.clear();
    for (const s of list.sandboxes) set(s);
    for (const ev of replay) apply(ev);
    loaded = true;
  } finally {
    pending = null;
  }
  notify();
  if (again) {
    again = false;
    await reload();
  }
}
