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

/** Where the tab keeps the bearer token it signed in with (this tab only). */
const TOKEN_KEY = 'metalgraph.token';

/** The headers every call sends: the token, when there is one. */
function credentials(headers = new Headers()) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set('Authorization', `Bearer ${token}`);
  return headers;
}

/** The sign-in dialog, shown while one is pending; resolves once a token is entered. */
let signingIn = null;

/**
 * Asks for a token (the API refused the one held, or there was none) and resolves once one
 * is entered. One dialog serves every request waiting at the time.
 */
function signIn(why) {
  if (signingIn) return signingIn;
  signingIn = new Promise((resolve) => {
    const input = el('input', {
      type: 'password', id: 'token', autocomplete: 'off', spellcheck: 'false',
      placeholder: 'mgt_…', 'aria-label': 'token', required: true,
    });
    const form = el('form', { method: 'dialog', class: 'signin' },
      el('h2', {}, 'Sign in'),
      el('p', {}, why),
      el('p', { class: 'muted' },
        'Paste a token: the one serve wrote to <data-dir>/admin.token, or one from ',
        el('code', {}, 'metalgraph tokens create NAME --role viewer'), '. It is kept in this tab only.'),
      input,
      el('button', { type: 'submit' }, 'Sign in'));
    const dialog = el('dialog', { id: 'signin' }, form);
    form.addEventListener('submit', () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      dialog.remove();
      signingIn = null;
      resolve();
    });
    dialog.addEventListener('cancel', (e) => e.preventDefault());
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
  });
  return signingIn;
}

/**
 * Sends a request to the management API (a path under it, or a whole `/api/2.0/...` path
 * such as a `Link` header's) and returns its JSON and the next page's path, if any. Every
 * request of the web view goes through here, so that the bearer token is added in this one
 * place; a 401 asks for a token and tries again.
 */
async function request(path, init = {}) {
  const url = path.startsWith(`${API}/`) ? path : API + path;
  for (;;) {
    const headers = credentials(new Headers(init.headers));
    headers.set('Accept', 'application/json');
    const res = await fetch(url, { ...init, headers, cache: 'no-store' });
    const body = res.status === 204 ? null : await res.json().catch(() => null);
    if (res.status === 401) {
      await signIn(body?.error?.message ?? 'The API needs a token.');
      continue;
    }
    if (!res.ok) {
      throw new ApiError(res.status, body?.error?.message ?? `${res.status} ${res.statusText}`);
    }
    const next = /<([^>]+)>\s*;\s*rel="next"/.exec(res.headers.get('Link') ?? '');
    return { body, next: next ? next[1] : null };
  }
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
 * stream is read with `fetch` (an EventSource cannot send the token) and parsed here; a
 * dropped stream is reopened after a pause, resuming with `Last-Event-ID`.
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
  const abort = new AbortController();
  let lastId = null;
  const dispatch = (kind, data) => {
    if (kind !== 'workflow' && kind !== 'task') return;
    let ev;
    try {
      ev = JSON.parse(data);
    } catch {
      return;
    }
    onEvent(ev);
  };
  const follow = async () => {
    const headers = credentials(new Headers({ Accept: 'text/event-stream' }));
    if (lastId) headers.set('Last-Event-ID', lastId);
    const res = await fetch(url, { headers, cache: 'no-store', signal: abort.signal });
    if (res.status === 401) {
      await signIn('The event stream needs a token.');
      return;
    }
    if (!res.ok || !res.body) throw new Error(`${res.status}`);
    show('live', 'live');
    onOpen();
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let kind = 'message';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, '');
        buffer = buffer.slice(nl + 1);
        if (line === '') {
          if (data.length) dispatch(kind, data.join('\n'));
          kind = 'message';
          data = [];
        } else if (line.startsWith(':')) {
          // A comment (keep-alive).
        } else {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const v = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') kind = v;
          else if (field === 'data') data.push(v);
          else if (field === 'id') lastId = v;
        }
      }
    }
  };
  (async () => {
    while (!abort.signal.aborted) {
      try {
        await follow();
        if (abort.signal.aborted) return;
        show('down', 'reconnecting');
      } catch {
        if (abort.signal.aborted) return;
        show('down', 'disconnected; retrying');
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  })();
  return () => abort.abort();
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
