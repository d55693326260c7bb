// The nodes page (`/ui/`): every node with its newest workflow and how far it has got,
// kept current by the event stream.

import {
  STATES, ago, all, api, badge, clock, debounce, el, isTerminal, message, page, progress,
  stateClass, subscribe, workflowHref,
} from './common.js';

/** The largest page the API gives. */
const PAGE = 1000;

const nodes = new Map(); // node id → node
const latest = new Map(); // node id → its newest top-level workflow (a view)
const shown = new Map(); // workflow id → the same views, to apply events to
const ignored = new Set(); // workflows not shown here: subgraphs, workflows without a node
const fetching = new Set();

const tbody = document.querySelector('#nodes tbody');
const filter = document.getElementById('filter');

/** Keeps a workflow when it is its node's newest top-level one. */
function remember(view) {
  if (view.parent || !view.node) {
    ignored.add(view.instanceId);
    return;
  }
  const cur = latest.get(view.node);
  if (cur && cur.instanceId !== view.instanceId && cur.createdAt > view.createdAt) {
    ignored.add(view.instanceId); // an older one: the node has moved on
    return;
  }
  if (cur) shown.delete(cur.instanceId);
  latest.set(view.node, view);
  shown.set(view.instanceId, view);
}

/**
 * Reads every node (every page) and their workflows: every active workflow, and on the
 * first load the newest thousand too, so that a node whose install ended shows how it
 * ended.
 */
async function load(first) {
  try {
    const [list, active, recent] = await Promise.all([
      all(`/nodes?$top=${PAGE}`, 100_000),
      all(`/workflows?active=true&$top=${PAGE}`),
      first ? page(`/workflows?$top=${PAGE}`).then((p) => p.items) : [],
    ]);
    nodes.clear();
    for (const n of list) nodes.set(n.id, n);
    const views = [...recent, ...active].sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    for (const v of views) remember(v);
    // A workflow shown as active that no longer is: it ended while the stream was away.
    const ids = new Set(active.map((v) => v.instanceId));
    for (const v of latest.values()) {
      if (!isTerminal(v.status) && !ids.has(v.instanceId)) refetch(v.instanceId);
    }
    message(null);
  } catch (e) {
    message(`Cannot read the nodes: ${e.message}`);
  }
  render();
}

async function refetch(id) {
  if (fetching.has(id)) return;
  fetching.add(id);
  try {
    remember(await api(`/workflows/${encodeURIComponent(id)}`));
  } catch (e) {
    if (e.status === 404) {
      const gone = shown.get(id);
      if (gone) latest.delete(gone.node);
      shown.delete(id);
    }
  } finally {
    fetching.delete(id);
  }
  later();
}

function onEvent(ev) {
  const view = shown.get(ev.workflowId);
  if (!view) {
    // A workflow this page has not seen yet: most likely a new one.
    if (!ignored.has(ev.workflowId)) refetch(ev.workflowId);
    return;
  }
  if (ev.kind === 'workflow') {
    view.status = ev.status;
    if (ev.error) view.error = ev.error;
    if (isTerminal(ev.status)) refetch(ev.workflowId); // its end time and final tasks
  } else {
    const t = view.tasks[ev.index];
    if (t && t.label === ev.label) {
      Object.assign(t, { state: ev.state, attempts: ev.attempts, error: ev.error });
    }
  }
  later();
}

/** What a node is doing: its running tasks, or why its workflow failed. */
function now(view) {
  if (!view) return '';
  const running = view.tasks.filter((t) => t.state === 'running').map((t) => t.label);
  if (running.length) return running.join(', ');
  const failed = view.tasks.find((t) => t.state === 'failed' || t.state === 'timeout');
  if (view.status === 'failed' && failed) return `${failed.label}: ${failed.error ?? failed.state}`;
  if (view.error) return view.error;
  if (view.status === 'pending') return 'waiting for a job slot';
  const waiting = view.tasks.find((t) => t.state === 'pending' && t.attempts > 0);
  return waiting ? `${waiting.label}: retrying after ${waiting.error ?? 'a failure'}` : '';
}

function row(node) {
  const v = latest.get(node.id);
  const busy = v && !isTerminal(v.status);
  const { done, total } = progress(v);
  const doing = now(v);
  const name = node.name || node.id;
  return el(
    'tr',
    { 'data-node': node.id, 'data-status': v?.status ?? '' },
    el('td', {}, el('a', {
      class: 'name', href: `/ui/workflows?node=${encodeURIComponent(node.id)}`, title: 'its workflows',
    }, name),
      name !== node.id ? el('span', { class: 'sub' }, node.id) : null),
    el('td', {}, badge(busy ? 'busy' : 'idle')),
    el('td', {}, v ? el('a', { href: workflowHref(v.instanceId), title: v.instanceId }, v.name)
      : el('span', { class: 'muted' }, 'none yet')),
    el('td', {}, v ? badge(v.status) : null),
    el('td', { class: 'clip', title: doing }, doing),
    el('td', {}, v ? el('span', { class: `meter ${stateClass(v.status)}` },
      el('progress', { max: total || 1, value: done }), ` ${done}/${total}`) : null),
    el('td', { title: v ? clock(v.finishedAt ?? v.createdAt) : '' },
      v ? (v.finishedAt ? `ended ${ago(v.finishedAt)}` : `started ${ago(v.createdAt)}`) : ''),
  );
}

function render() {
  const all = [...nodes.values()].sort((a, b) =>
    (a.name || a.id).localeCompare(b.name || b.id, undefined, { numeric: true }));
  const words = filter.value.trim().toLowerCase();
  const rows = all.filter((n) => {
    if (!words) return true;
    const v = latest.get(n.id);
    return [n.id, n.name, v?.name, v?.status].some((s) => s?.toLowerCase().includes(words));
  });
  tbody.replaceChildren(...rows.map(row));
  if (!rows.length) {
    tbody.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' },
      nodes.size ? 'No node matches the filter.' : 'No nodes are registered.')));
  }
  const counts = new Map();
  for (const n of all) {
    const v = latest.get(n.id);
    const key = v && !isTerminal(v.status) ? v.status : 'idle';
    counts.set(key, (counts.get(key) ?? 0) + 1);
    if (v && isTerminal(v.status)) counts.set(v.status, (counts.get(v.status) ?? 0) + 1);
  }
  const summary = [el('span', { class: 'chip' }, `${all.length} nodes`)];
  for (const key of ['running', 'pending', 'idle', ...STATES.filter(isTerminal)]) {
    const n = counts.get(key);
    const word = key === 'idle' || !isTerminal(key) ? key : `last ${key}`;
    if (n) summary.push(el('span', { class: `chip ${stateClass(key)}` }, `${n} ${word}`));
  }
  document.getElementById('summary').replaceChildren(...summary);
}

const later = debounce(render, 100);
filter.addEventListener('input', later);
load(true);
// Every (re)connection re-reads the active workflows: events may have been missed.
subscribe({}, onEvent, () => load(false));
// Node additions have no event; the "since" column ages.
setInterval(() => load(false), 30_000);
setInterval(render, 5_000);
