// The workflows page (`/ui/workflows`): every workflow, newest first, filtered by status,
// graph and node. The API filters by `active` and `node`; the exact status and the graph
// are filtered here. The filters live in the page's URL, so a filtered list can be shared.

import {
  api, badge, between, clock, debounce, duration, el, message, progress, subscribe,
  workflowHref,
} from './common.js';

/** The most rows drawn; the count says how many more matched. */
const MAX_ROWS = 500;
const ACTIVE = ['active', 'pending', 'running'];
const FINISHED = ['finished', 'succeeded', 'failed', 'cancelled'];

const form = document.getElementById('filters');
const tbody = document.querySelector('#workflows tbody');
const names = new Map(); // node id → name
let views = [];
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

function keep(v, f) {
  if (f.graph && v.name !== f.graph) return false;
  if (f.status && !['active', 'finished'].includes(f.status) && v.status !== f.status) return false;
  return true;
}

async function load() {
  const f = filters();
  const q = new URLSearchParams();
  if (ACTIVE.includes(f.status)) q.set('active', 'true');
  if (FINISHED.includes(f.status)) q.set('active', 'false');
  if (f.node) q.set('node', f.node);
  try {
    views = (await api(`/workflows${q.toString() ? `?${q}` : ''}`)).filter((v) => keep(v, f));
    message(null);
  } catch (e) {
    message(`Cannot read the workflows: ${e.message}`);
  }
  options(form.elements.graph, views.map((v) => [v.name, v.name]));
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
  const shown = views.slice(0, MAX_ROWS);
  tbody.replaceChildren(...shown.map(row));
  if (!views.length) {
    tbody.append(el('tr', {}, el('td', { colspan: 8, class: 'muted' }, 'No workflow matches.')));
  }
  document.getElementById('count').textContent = views.length > MAX_ROWS
    ? `showing the newest ${MAX_ROWS} of ${views.length}`
    : `${views.length} workflow${views.length === 1 ? '' : 's'}`;
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
  load();
  follow();
});
form.addEventListener('submit', (ev) => ev.preventDefault());

async function start() {
  const params = new URLSearchParams(location.search);
  try {
    const [graphs, nodes] = await Promise.all([api('/workflows/graphs'), api('/nodes')]);
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
