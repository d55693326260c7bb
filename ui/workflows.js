// The workflows page (`/ui/workflows`): workflows newest first, filtered by status, graph
// and node through the API's list (docs/lists.md), a page at a time. The filters live in
// the page's URL, so a filtered list can be shared.

import {
  all, api, badge, between, clock, debounce, duration, el, message, page, progress,
  subscribe, workflowHref,
} from './common.js';

/** Rows per page; "Show older" reads the next one. */
const PAGE = 200;
const STATUSES = ['pending', 'running', 'succeeded', 'failed', 'cancelled'];

const form = document.getElementById('filters');
const tbody = document.querySelector('#workflows tbody');
const more = document.getElementById('more');
const names = new Map(); // node id → name
let views = [];
let next = null; // the path of the next page, from the list's Link header
let reads = 0; // counts first-page reads, so that a stale answer is dropped
let unsubscribe = null;

function filters() {
  return Object.fromEntries(['status', 'graph', 'node'].map((k) => [k, form.elements[k].value]));
}

/** Adds `values` to a select as options (value → text), keeping `any` first. */
function options(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const [value, text] of values) {
    if (!have.has(value)) select.append(el('option', { value }, text));
    have.add(value);
  }
}

/** The list's path for the filters: every filter is the API's. */
function listPath(f, top) {
  const q = new URLSearchParams();
  if (STATUSES.includes(f.status)) q.set('status', f.status);
  if (f.status === 'active') q.set('active', 'true');
  if (f.status === 'finished') q.set('active', 'false');
  if (f.graph) q.set('graph', f.graph);
  if (f.node) q.set('node', f.node);
  q.set('$top', String(top));
  return `/workflows?${q}`;
}

/** Reads the first page again, as long as what is shown (up to the API's 1000). */
async function load() {
  const mine = ++reads;
  try {
    const p = await page(listPath(filters(), Math.min(1000, Math.max(PAGE, views.length))));
    if (mine !== reads) return; // the filters changed while it was read
    views = p.items;
    next = p.next;
    message(null);
  } catch (e) {
    message(`Cannot read the workflows: ${e.message}`);
  }
  options(form.elements.graph, views.map((v) => [v.name, v.name]));
  render();
}

async function older() {
  if (!next) return;
  const mine = reads;
  try {
    const p = await page(next);
    if (mine !== reads) return;
    const have = new Set(views.map((v) => v.instanceId));
    views.push(...p.items.filter((v) => !have.has(v.instanceId)));
    next = p.items.length ? p.next : null;
  } catch (e) {
    message(`Cannot read more workflows: ${e.message}`);
  }
  render();
}

const reload = debounce(load, 500);

function onEvent(ev) {
  const v = views.find((x) => x.instanceId === ev.workflowId);
  if (ev.kind === 'task' && v) {
    const t = v.tasks[ev.index];
    if (t && t.label === ev.label) Object.assign(t, { state: ev.state, attempts: ev.attempts, error: ev.error });
    later();
  } else if (ev.kind === 'workflow') {
    if (v) v.status = ev.status;
    later();
    reload(); // a new workflow, or one that leaves or enters the filter
  }
}

function row(v) {
  const { done, total } = progress(v);
  const failed = v.tasks.filter((t) => t.state === 'failed' || t.state === 'timeout').length;
  return el('tr', { 'data-id': v.instanceId, 'data-status': v.status },
    el('td', {},
      el('a', { href: workflowHref(v.instanceId), title: v.instanceId, class: 'mono' }, v.instanceId.slice(0, 8)),
      v.parent ? el('span', { class: 'sub', title: `started by ${v.parent.workflowId}` }, 'subgraph') : null),
    el('td', {}, v.name),
    el('td', {}, v.node
      ? el('a', { href: `/ui/workflows?node=${encodeURIComponent(v.node)}`, title: v.node }, names.get(v.node) ?? v.node)
      : el('span', { class: 'muted' }, 'none')),
    el('td', {}, badge(v.status)),
    el('td', {}, `${done}/${total}`, failed ? el('span', { class: 'sub' }, `${failed} failed`) : null),
    el('td', { title: v.createdAt }, clock(v.createdAt)),
    el('td', {}, duration(between(v.createdAt, v.finishedAt))),
    el('td', { class: 'clip error', title: v.error ?? '' }, v.error ?? ''),
  );
}

function render() {
  tbody.replaceChildren(...views.map(row));
  if (!views.length) {
    tbody.append(el('tr', {}, el('td', { colspan: 8, class: 'muted' }, 'No workflow matches.')));
  }
  more.hidden = !next;
  document.getElementById('count').textContent =
    `${views.length}${next ? '+' : ''} workflow${views.length === 1 ? '' : 's'}`;
}

const later = debounce(render, 100);

/** Follows the events the filters can match (the stream filters by node and graph too). */
function follow() {
  const f = filters();
  unsubscribe?.();
  unsubscribe = subscribe({ node: f.node, graph: f.graph }, onEvent, load);
}

form.addEventListener('change', () => {
  const q = new URLSearchParams(Object.entries(filters()).filter(([, v]) => v));
  history.replaceState(null, '', `${location.pathname}${q.toString() ? `?${q}` : ''}`);
  views = [];
  load();
  follow();
});
form.addEventListener('submit', (ev) => ev.preventDefault());
more.addEventListener('click', older);

async function start() {
  const params = new URLSearchParams(location.search);
  try {
    const [graphs, nodes] = await Promise.all([
      api('/workflows/graphs'),
      all('/nodes?$top=1000', 100_000),
    ]);
    options(form.elements.graph, graphs.map((g) => [g.injectableName, g.injectableName]));
    for (const n of nodes) names.set(n.id, n.name || n.id);
    options(form.elements.node, nodes.map((n) => [n.id, n.name && n.name !== n.id ? `${n.name} (${n.id})` : n.id]));
  } catch (e) {
    message(`Cannot read graphs and nodes: ${e.message}`);
  }
  for (const k of ['status', 'graph', 'node']) {
    const value = params.get(k);
    if (!value) continue;
    options(form.elements[k], [[value, value]]);
    form.elements[k].value = value;
  }
  await load();
  follow();
}

start();
