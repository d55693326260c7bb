// One workflow's page (`/ui/workflows/{id}`): its tasks as a graph whose boxes change
// colour as events arrive, and a task's details when it is clicked. Events restyle the
// boxes at once; each burst of them is followed by one read of the workflow, for the
// times and outputs events do not carry.

import {
  api, badge, between, clock, debounce, duration, el, isTerminal, message, progress,
  subscribe, workflowHref,
} from './common.js';
import { draw, legend, select } from './dag.js';

const id = decodeURIComponent(location.pathname.split('/').pop());
const root = document.getElementById('dag');
const aside = document.getElementById('details');

let view = null; // the workflow, as last read and updated by events since
let update = null; // restyles the boxes
let chosen = null; // the index of the task whose details are shown
let unsubscribe = null;

async function load() {
  try {
    view = await api(`/workflows/${encodeURIComponent(id)}`);
  } catch (e) {
    message(e.status === 404 ? `There is no workflow ${id}.` : `Cannot read workflow ${id}: ${e.message}`);
    return;
  }
  message(null);
  if (update) update(view.tasks);
  else update = draw(root, view.tasks, choose);
  header();
  details();
  if (isTerminal(view.status) && unsubscribe) {
    // Nothing more will happen to it: give the connection back.
    unsubscribe();
    unsubscribe = null;
    const live = document.getElementById('live');
    live.dataset.state = 'done';
    live.textContent = 'finished';
  }
}

const refresh = debounce(load, 300);

function onEvent(ev) {
  if (!view || ev.workflowId !== view.instanceId) return;
  if (ev.kind === 'task') {
    const t = view.tasks[ev.index];
    if (t && t.label === ev.label) {
      const at = new Date().toISOString(); // until the next read brings the engine's time
      if (ev.state === 'running' && t.state !== 'running') Object.assign(t, { startedAt: at, finishedAt: null });
      if (isTerminal(ev.state) && !isTerminal(t.state)) t.finishedAt = at;
      Object.assign(t, { state: ev.state, attempts: ev.attempts, error: ev.error });
      update(view.tasks);
    }
  } else {
    view.status = ev.status;
    if (ev.error) view.error = ev.error;
  }
  header();
  details();
  refresh();
}

function fact(name, field, ...value) {
  return [el('dt', {}, name), el('dd', { 'data-field': field }, ...value)];
}

function header() {
  const where = view.node ? ` on ${view.node}` : '';
  document.title = `${view.name}${where} · metalgraph`;
  document.getElementById('title').textContent = view.name;
  document.getElementById('status').replaceChildren(badge(view.status));
  const { done, total } = progress(view);
  document.getElementById('facts').replaceChildren(
    ...fact('Workflow', 'id', view.instanceId),
    ...fact('Node', 'node', view.node
      ? el('a', { href: `/ui/workflows?node=${encodeURIComponent(view.node)}` }, view.node)
      : 'none'),
    ...(view.parent ? fact('Parent', 'parent',
      el('a', { href: workflowHref(view.parent.workflowId) }, view.parent.workflowId)) : []),
    ...(view.rerunOf ? fact('Rerun of', 'rerun-of',
      el('a', { href: workflowHref(view.rerunOf) }, view.rerunOf)) : []),
    ...fact('Tasks', 'progress', `${done} of ${total} ended`),
    ...fact('Created', 'created', clock(view.createdAt)),
    ...(view.finishedAt ? fact('Finished', 'finished', clock(view.finishedAt)) : []),
    ...fact('Duration', 'duration', duration(between(view.createdAt, view.finishedAt))),
    ...(view.error ? fact('Error', 'error', el('span', { class: 'error' }, view.error)) : []),
  );
}

/** The waits of a task, one line each: `label: state | state`. */
function waits(t) {
  const out = [];
  for (const [key, states] of Object.entries(t.waitOn ?? {})) {
    if (key === 'anyOf' && states && typeof states === 'object' && !Array.isArray(states)) {
      for (const [label, s] of Object.entries(states)) out.push(`any of: ${label} ${[s].flat().join(' | ')}`);
    } else {
      out.push(`${key} ${[states].flat().join(' | ')}`);
    }
  }
  return out;
}

function details() {
  if (chosen === null || !view) return;
  const t = view.tasks[chosen];
  const output = view.context?.[t.label];
  const w = waits(t);
  const parts = [
    el('h2', { 'data-field': 'label' }, t.label),
    el('p', { class: 'sub' }, `${t.taskName} · job ${t.job}`),
    el('dl', { class: 'facts' },
      ...fact('State', 'state', badge(t.state)),
      ...fact('Attempts', 'attempts', String(t.attempts)),
      ...fact('Waits on', 'waits', w.length ? el('ul', {}, w.map((x) => el('li', {}, x))) : 'nothing'),
      ...fact('Started', 'started', t.startedAt ? clock(t.startedAt) : 'not yet'),
      ...fact('Finished', 'finished', t.finishedAt ? clock(t.finishedAt) : (t.startedAt ? 'not yet' : '')),
      ...fact('Duration', 'duration', t.startedAt
        ? `${duration(between(t.startedAt, t.finishedAt))}${t.finishedAt ? '' : ' so far'}` : '')),
    t.error ? el('h3', {}, 'Error') : null,
    t.error ? el('pre', { class: 'error', 'data-field': 'error' }, t.error) : null,
    el('h3', {}, 'Output'),
    output === undefined
      ? el('p', { class: 'muted', 'data-field': 'output' }, isTerminal(t.state) ? 'none' : 'none yet')
      : el('pre', { class: 'output', 'data-field': 'output' }, JSON.stringify(output, null, 2)),
  ];
  aside.replaceChildren(...parts.filter(Boolean));
}

function choose(index) {
  chosen = index;
  select(root, index);
  details();
}

legend(document.getElementById('legend'));
load();
unsubscribe = subscribe({ workflow: id }, onEvent, load);
// Running times count up.
setInterval(() => {
  if (!view || isTerminal(view.status)) return;
  header();
  if (chosen !== null && view.tasks[chosen]?.state === 'running') details();
}, 1000);
