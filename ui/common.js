// What every page of the web view shares: the one way to call the API, the event stream,
// building the DOM from text (never from HTML: node names, errors and outputs come from
// machines and users), and formatting.

const API = '/api/2.0';

/** Task states and workflow statuses, the only words that become CSS classes. */
export const STATES = ['pending', 'running', 'succeeded', 'failed', 'timeout', 'cancelled', 'skipped'];
const KNOWN = new Set([...STATES, 'idle', 'busy']);

/** An answer of the API other than 2xx, with the API's own message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/**
 * Sends a request to the management API (a path under it, or a whole `/api/2.0/...` path
 * such as a `Link` header's) and returns its JSON and the next page's path, if any. Every
 * request of the web view goes through here, so that credentials (a bearer token, once the
 * API asks for one) are added in this one place.
 */
async function request(path, init = {}) {
  const headers = new Headers(init.headers);
  headers.set('Accept', 'application/json');
  const url = path.startsWith(`${API}/`) ? path : API + path;
  const res = await fetch(url, { ...init, headers, cache: 'no-store' });
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    throw new ApiError(res.status, body?.error?.message ?? `${res.status} ${res.statusText}`);
  }
  const next = /<([^>]+)>\s*;\s*rel="next"/.exec(res.headers.get('Link') ?? '');
  return { body, next: next ? next[1] : null };
}

/** Calls the management API and returns its JSON. */
export async function api(path, init = {}) {
  return (await request(path, init)).body;
}

/** One page of a list (filters and `$top` in `path`): `{items, next}`, `next` a path or null. */
export async function page(path) {
  const { body, next } = await request(path);
  return { items: body ?? [], next };
}

/** Every item of a list, following its `Link: rel="next"` pages, up to `max` items. */
export async function all(path, max = 10_000) {
  const items = [];
  for (let next = path; next && items.length < max;) {
    const p = await page(next);
    items.push(...p.items);
    next = p.items.length ? p.next : null;
  }
  return items;
}

/**
 * Follows `GET /api/2.0/events` with the given filters (`workflow`, `node`, `graph`).
 * `onEvent` gets each event's JSON; `onOpen` is called on every (re)connection, when the
 * page should re-read what it shows, since events may have been missed while away. The
 * browser reconnects by itself and resumes with `Last-Event-ID`; a stream the server
 * refused is retried every few seconds. An EventSource cannot send headers: when the API
 * asks for a token, this is the place to read the stream with `fetch` instead.
 */
export function subscribe(filter, onEvent, onOpen) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(filter)) if (v) query.set(k, v);
  const qs = query.toString();
  const url = `${API}/events${qs ? `?${qs}` : ''}`;
  const live = document.getElementById('live');
  const show = (state, text) => {
    if (live) {
      live.dataset.state = state;
      live.textContent = text;
    }
  };
  let source;
  let stopped = false;
  const connect = () => {
    if (stopped) return;
    source = new EventSource(url);
    source.onopen = () => {
      show('live', 'live');
      onOpen();
    };
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        show('down', 'disconnected; retrying');
        setTimeout(connect, 5000);
      } else {
        show('down', 'reconnecting');
      }
    };
    for (const kind of ['workflow', 'task']) {
      source.addEventListener(kind, (m) => {
        let ev;
        try {
          ev = JSON.parse(m.data);
        } catch {
          return;
        }
        onEvent(ev);
      });
    }
  };
  connect();
  return () => {
    stopped = true;
    source.close();
  };
}

/** Runs `fn` once, `ms` after the last of a burst of calls. */
export function debounce(fn, ms) {
  let timer;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    // Event handlers are added with addEventListener, never as attributes.
    if (k.toLowerCase().startsWith('on')) throw new Error(`attribute ${k} is not allowed`);
    node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    node.append(c instanceof Node ? c : String(c)); // a string becomes a text node
  }
  return node;
}

/** An HTML element with attributes and children; strings become text, never markup. */
export function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG. */
export function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

/** A state or status as a coloured word. */
export function badge(state) {
  const word = String(state ?? '');
  return el('span', { class: `badge ${stateClass(word)}`, 'data-state': word }, word);
}

/** `st-<state>` for a known state, so that no value from outside becomes a class name. */
export function stateClass(state) {
  return KNOWN.has(state) ? `st-${state}` : 'st-unknown';
}

export const isTerminal = (s) => !['pending', 'running'].includes(s);

/** The link to a workflow's page. */
export function workflowHref(id) {
  return `/ui/workflows/${encodeURIComponent(id)}`;
}

/** `ms` as `850 ms`, `2.4 s`, `3 m 05 s`, `1 h 02 m`. */
export function duration(ms) {
  if (ms == null || Number.isNaN(ms)) return '';
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} m ${String(Math.floor(s % 60)).padStart(2, '0')} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${String(m % 60).padStart(2, '0')} m`;
}

/** The time between two RFC 3339 instants (the second one defaults to now). */
export function between(from, to) {
  if (!from) return null;
  return (to ? Date.parse(to) : Date.now()) - Date.parse(from);
}

/** An instant as local time, with the date when it is not today. */
export function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  return d.toDateString() === new Date().toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
}

/** An instant as `12 s ago`, `5 m ago`, ... */
export function ago(iso) {
  const ms = between(iso);
  if (ms == null) return '';
  if (ms < 60_000) return `${Math.max(0, Math.floor(ms / 1000))} s ago`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} m ago`;
  if (ms < 86_400_000) return `${Math.floor(ms / 3_600_000)} h ago`;
  return `${Math.floor(ms / 86_400_000)} d ago`;
}

/** How many of a workflow's tasks have ended. */
export function progress(view) {
  const tasks = view?.tasks ?? [];
  return { done: tasks.filter((t) => isTerminal(t.state)).length, total: tasks.length };
}

/** Shows (or with no text, hides) the page's message line. */
export function message(text, kind = 'error') {
  const p = document.getElementById('message');
  p.hidden = !text;
  p.textContent = text ?? '';
  p.dataset.kind = kind;
}
