// A workflow's tasks as a layered graph in SVG: a task's rank is the length of the longest
// `waitOn` path that leads to it, so every edge points down; within a rank, tasks sit
// near the tasks they wait on. The layout depends only on the tasks and their waits, which
// never change during a run, so it is computed once; state changes only restyle boxes.

import { STATES, stateClass, svg } from './common.js';

const W = 176; // box width
const H = 48; // box height
const GAP_X = 32;
const GAP_Y = 64; // room for an edge's label
const PAD = 24;

/** The edges a task's `waitOn` makes: `{from, to, states, any}`, `from` and `to` indices. */
export function edgesOf(tasks) {
  const index = new Map(tasks.map((t, i) => [t.label, i]));
  const edges = [];
  const add = (to, label, states, any) => {
    const from = index.get(label);
    if (from === undefined) return;
    edges.push({ from, to, states: [states].flat().map(String), any });
  };
  tasks.forEach((t, to) => {
    for (const [key, states] of Object.entries(t.waitOn ?? {})) {
      if (key === 'anyOf' && states && typeof states === 'object' && !Array.isArray(states)) {
        for (const [label, s] of Object.entries(states)) add(to, label, s, true);
      } else {
        add(to, key, states, false);
      }
    }
  });
  return edges;
}

/** Positions: `{boxes: [{x, y, rank}], edges, width, height}`, one box per task. */
export function layout(tasks) {
  const edges = edgesOf(tasks);
  const deps = tasks.map(() => []);
  for (const e of edges) deps[e.to].push(e.from);
  const rank = new Array(tasks.length).fill(-1);
  const rankOf = (i, seen = new Set()) => {
    if (rank[i] >= 0) return rank[i];
    if (seen.has(i)) return 0; // a cycle cannot be stored; never loop on one anyway
    seen.add(i);
    rank[i] = deps[i].length ? 1 + Math.max(...deps[i].map((d) => rankOf(d, seen))) : 0;
    return rank[i];
  };
  tasks.forEach((_, i) => rankOf(i));

  const rows = [];
  tasks.forEach((_, i) => (rows[rank[i]] ??= []).push(i));
  // Order each row by where the tasks it waits on sit (their mean position), keeping the
  // graph's order among equals: a cheap pass that removes most crossings.
  const pos = new Array(tasks.length).fill(0);
  for (const row of rows) {
    const key = (i) => (deps[i].length ? deps[i].reduce((s, d) => s + pos[d], 0) / deps[i].length : i);
    row.sort((a, b) => key(a) - key(b) || a - b);
    row.forEach((i, k) => (pos[i] = k - (row.length - 1) / 2));
  }
  const widest = Math.max(1, ...rows.map((r) => r.length));
  const width = PAD * 2 + widest * W + (widest - 1) * GAP_X;
  const boxes = new Array(tasks.length);
  rows.forEach((row, r) => {
    const rowWidth = row.length * W + (row.length - 1) * GAP_X;
    const left = (width - rowWidth) / 2;
    row.forEach((i, k) => {
      boxes[i] = { x: left + k * (W + GAP_X), y: PAD + r * (H + GAP_Y), rank: r };
    });
  });
  const height = PAD * 2 + rows.length * H + Math.max(0, rows.length - 1) * GAP_Y;
  return { boxes, edges, width, height };
}

/** The point of a cubic Bézier (whose y only grows) at height `y`, by bisection. */
function at(p, y) {
  const point = (t) => {
    const u = 1 - t;
    const w = [u * u * u, 3 * u * u * t, 3 * u * t * t, t * t * t];
    return [0, 1].map((k) => w.reduce((s, wi, i) => s + wi * p[i][k], 0));
  };
  let [lo, hi] = [0, 1];
  for (let n = 0; n < 24; n += 1) {
    const mid = (lo + hi) / 2;
    if (point(mid)[1] < y) lo = mid;
    else hi = mid;
  }
  return point(lo);
}

/** `label` cut to about `n` characters. */
function clip(label, n) {
  return label.length > n ? `${label.slice(0, n - 1)}…` : label;
}

/** What a box says under its label. */
function caption(t) {
  return t.attempts > 1 ? `${t.state} · attempt ${t.attempts}` : t.state;
}

/**
 * Draws the tasks into `root` (an `<svg>`); `onSelect(index)` is called when a task is
 * clicked or chosen with the keyboard. Returns `update(tasks)`, which restyles the boxes.
 */
export function draw(root, tasks, onSelect) {
  const { boxes, edges, width, height } = layout(tasks);
  root.setAttribute('viewBox', `0 0 ${width} ${height}`);
  root.setAttribute('width', width);
  root.setAttribute('height', height);
  const defs = svg('defs', {},
    svg('marker', {
      id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7,
      orient: 'auto-start-reverse',
    }, svg('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrow' })));
  const lines = svg('g', { class: 'edges' });
  const labels = svg('g', { class: 'edge-labels' });
  for (const e of edges) {
    const a = boxes[e.from];
    const b = boxes[e.to];
    const [x1, y1, x2, y2] = [a.x + W / 2, a.y + H, b.x + W / 2, b.y];
    const bend = Math.max(24, (y2 - y1) / 2);
    const curve = [[x1, y1], [x1, y1 + bend], [x2, y2 - bend], [x2, y2 - 2]];
    lines.append(svg('path', {
      d: `M${x1},${y1} C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2 - 2}`,
      class: e.any ? 'edge any' : 'edge',
      'marker-end': 'url(#arrow)',
      'data-from': tasks[e.from].label,
      'data-to': tasks[e.to].label,
    }));
    const plain = e.states.length === 1 && e.states[0] === 'succeeded';
    if (!plain || e.any) {
      const text = `${e.any ? 'any: ' : ''}${e.states.join(' | ')}`;
      // The label sits where the edge crosses the middle of the gap above its task: edges
      // into one task arrive from different places, so their labels do not overlap.
      const [x, y] = at(curve, y2 - GAP_Y / 2);
      labels.append(svg('text', {
        x, y: y + 4, class: 'edge-label', 'text-anchor': 'middle',
      }, text));
    }
  }
  const nodes = svg('g', { class: 'tasks' });
  const groups = tasks.map((t, i) => {
    const { x, y } = boxes[i];
    const g = svg('g', {
      class: 'task', transform: `translate(${x},${y})`, tabindex: 0, role: 'button',
      'data-label': t.label, 'data-index': i,
    },
    svg('title', {}, `${t.label} — ${t.taskName} (${t.job})`),
    svg('rect', { width: W, height: H, rx: 6 }),
    svg('text', { x: 12, y: 20, class: 'label' }, clip(t.label, 22)),
    svg('text', { x: 12, y: 37, class: 'caption' }, ''));
    g.addEventListener('click', () => onSelect(i));
    g.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' || ev.key === ' ') {
        ev.preventDefault();
        onSelect(i);
      }
    });
    nodes.append(g);
    return g;
  });
  root.replaceChildren(defs, lines, nodes, labels);

  const update = (current) => {
    current.forEach((t, i) => {
      const g = groups[i];
      if (!g) return;
      const selected = g.classList.contains('selected') ? ' selected' : '';
      g.setAttribute('class', `task ${stateClass(t.state)}${selected}`);
      g.dataset.state = t.state;
      g.dataset.attempts = t.attempts;
      g.querySelector('.caption').textContent = caption(t);
    });
  };
  update(tasks);
  return update;
}

/** The colour key, one entry per task state. */
export function legend(list) {
  list.replaceChildren(...STATES.map((s) => {
    const li = document.createElement('li');
    const swatch = document.createElement('span');
    swatch.className = `swatch ${stateClass(s)}`;
    li.append(swatch, s);
    return li;
  }));
}

/** Marks the chosen task's box. */
export function select(root, index) {
  for (const g of root.querySelectorAll('g.task')) {
    g.classList.toggle('selected', Number(g.dataset.index) === index);
  }
}
