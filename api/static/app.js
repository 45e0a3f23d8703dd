// shardplane dashboard. Plain ES2020, no build step, nothing fetched from outside this server.
// State lives in maps keyed like the KV (devices by "<node>/<index>", nodes, instances by id);
// the lists come from the REST endpoints and every change after that from /api/events, applied
// only when its revision is newer than what we hold (events and list loads may overlap).
"use strict";

const HISTORY_LOAD_MAX = 400; // fleets larger than this start their charts empty, not from /api/gpu/history
const HISTORY_WINDOW_S = 300; // the sparklines show the last five minutes
const HISTORY_POINTS = 150;
const PALETTE = ["#58a6ff", "#3fb970", "#f0883e", "#bc8cff", "#e5534b", "#39c5cf", "#d29922",
  "#ff7eb6", "#a5d6ff", "#7ee787", "#ffa657", "#d2a8ff", "#ffdf5d", "#56d4dd", "#f778ba"];

const state = {
  devices: new Map(), nodes: new Map(), instances: new Map(), topology: null,
  history: new Map(), revision: 0, filter: "",
};
const dirty = { rows: new Set(), table: false, window: false, topology: false, placements: false, summary: false };

// --- small helpers ------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}
const GIB = 1024 ** 3;
const gib = (b) => (b === null || b === undefined ? "–" : (b / GIB).toFixed(b >= 100 * GIB ? 0 : 1));
const num = (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
// A stage holds the half-open range [layer_start, layer_end). Written as is, neighbours read
// "L0–4, L4–15", as if layer 4 were held twice: show the layers held, first to last inclusive.
const layerRange = (st) => {
  const last = st.layer_end - 1;
  if (last < st.layer_start) return "no layers";
  return last === st.layer_start ? `L${last}` : `L${st.layer_start}–${last}`;
};
function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}
function deviceOrder(a, b) {
  return a.node < b.node ? -1 : a.node > b.node ? 1 : a.index - b.index;
}
let colorIndex = null; // device id -> position in the fleet; rebuilt when devices come or go
function colorOf(deviceId) {
  // Colours follow the fleet's order, so the same GPU has the same colour in the topology,
  // the fleet table and every placement.
  if (!colorIndex) {
    const ids = [...state.devices.values()].sort(deviceOrder).map((d) => d.id);
    colorIndex = new Map(ids.map((id, i) => [id, i]));
  }
  const i = colorIndex.get(deviceId);
  if (i !== undefined) return PALETTE[i % PALETTE.length];
  let hsh = 0;
  for (const ch of String(deviceId)) hsh = (hsh * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[hsh % PALETTE.length];
}
async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

// --- loading and live events --------------------------------------------------------------
function putIfNewer(map, id, value) {
  const held = map.get(id);
  if (held && held.revision > value.revision) return false;
  map.set(id, value);
  return true;
}

function pushHistory(dev) {
  let hist = state.history.get(dev.id);
  if (!hist) { hist = { t: [], util: [], mem: [], temp: [] }; state.history.set(dev.id, hist); }
  const t = dev.ts || dev.last_seen;
  if (hist.t.length && hist.t[hist.t.length - 1] >= t) return;
  hist.t.push(t);
  hist.util.push(dev.utilization_gpu_pct ?? null);
  hist.mem.push(dev.memory_total_bytes ? (100 * (dev.memory_used_bytes ?? 0)) / dev.memory_total_bytes : null);
  hist.temp.push(dev.temperature_c ?? null);
  while (hist.t.length > HISTORY_POINTS) for (const k of Object.keys(hist)) hist[k].shift();
}

async function loadAll() {
  const [devs, nodes, placements, topo] = await Promise.all([
    getJSON("/api/gpu/devices"), getJSON("/api/nodes"), getJSON("/api/placements"), getJSON("/api/gpu/topology"),
  ]);
  state.devices.clear(); state.nodes.clear(); state.instances.clear();
  for (const d of devs.devices) state.devices.set(d.id, d);
  recount();
  for (const n of nodes.nodes) state.nodes.set(n.id, n);
  for (const p of placements.placements) state.instances.set(p.id, p);
  state.topology = topo; topoText = "";
  state.revision = Math.max(devs.revision, nodes.revision, placements.revision);
  if (state.devices.size <= HISTORY_LOAD_MAX) {
    try {
      const hist = await getJSON("/api/gpu/history");
      for (const [id, series] of Object.entries(hist.devices)) {
        const dev = state.devices.get(id);
        const total = dev ? dev.memory_total_bytes : null;
        state.history.set(id, {
          t: series.t, util: series.util, temp: series.temp,
          mem: series.mem_used.map((m) => (total && m !== null ? (100 * m) / total : null)),
        });
      }
    } catch (e) { console.warn("history", e); }
  }
  for (const d of state.devices.values()) pushHistory(d);
  colorIndex = null;
  dirty.table = dirty.topology = dirty.placements = dirty.summary = true;
  schedule();
}

let topoTimer = null, topoText = "";
function refreshTopologySoon() {
  // The topology changes rarely (a device or link appears, a node goes offline): refetch it
  // at most once a second instead of rebuilding it in the browser on every sample. Its answer
  // holds no live figure, so the same text means the same drawing: at thousands of GPUs the
  // rebuild (thousands of SVG elements, then their layout) was the dashboard's longest task.
  if (topoTimer) return;
  topoTimer = setTimeout(async () => {
    topoTimer = null;
    try {
      const r = await fetch("/api/gpu/topology", { headers: { Accept: "application/json" } });
      if (!r.ok) throw new Error(`/api/gpu/topology: HTTP ${r.status}`);
      const text = await r.text();
      if (text === topoText) return;
      topoText = text; state.topology = JSON.parse(text); dirty.topology = true; schedule();
    } catch (e) { console.warn(e); }
  }, 1000);
}
// What of a node the topology draws besides its status: a heartbeat that changes none of it
// needs no refetch, and a status change is restyled in place from the event itself (at 1,000
// nodes, refetching the whole topology for one was the dashboard's longest task).
const nodeDrawn = (n) => JSON.stringify([n.hostname, n.interconnect, n.links]);

// Events are queued as they arrive and applied in slices of at most EVENT_SLICE_MS, each its
// own task: the browser hands over a network read's events (hundreds at thousands of GPUs) in
// one task, and applying them there (a JSON parse and a history point each) made that task
// the dashboard's longest. Applied in arrival order, as before; only when is spread out.
const EVENT_SLICE_MS = 8;
const inbox = [];
let inboxAt = 0; // the first event of inbox not applied yet
const drainer = new MessageChannel(); // a task of its own, without setTimeout's 4 ms clamp
drainer.port1.onmessage = drainEvents;
function queueEvent(ev) {
  if (inbox.push(ev.data) === 1) drainer.port2.postMessage(null);
}
function drainEvents() {
  const end = performance.now() + EVENT_SLICE_MS;
  while (inboxAt < inbox.length) {
    try { applyEvent(inbox[inboxAt++]); } catch (e) { console.warn("event", e); } // one bad event stops no other
    if (performance.now() >= end) break;
  }
  if (inboxAt < inbox.length) { drainer.port2.postMessage(null); return; }
  inbox.length = 0; inboxAt = 0;
}

function applyEvent(data) {
  const msg = JSON.parse(data);
  state.revision = Math.max(state.revision, msg.revision);
  if (msg.kind === "device") {
    if (msg.op === "delete") { count(state.devices.get(msg.id), -1); state.devices.delete(msg.id); dirty.table = true; refreshTopologySoon(); }
    else {
      const before = state.devices.get(msg.id);
      if (!putIfNewer(state.devices, msg.id, msg.value)) return;
      count(before, -1); count(msg.value, 1);
      pushHistory(msg.value);
      if (!before) dirty.table = true; else dirty.rows.add(msg.id);
      if (!before) refreshTopologySoon();
      else if (before.status !== msg.value.status) restyleGpu(msg.id, msg.value);
    }
  } else if (msg.kind === "node") {
    const before = state.nodes.get(msg.id);
    if (msg.op === "delete") state.nodes.delete(msg.id);
    else if (!putIfNewer(state.nodes, msg.id, msg.value)) return;
    if (msg.op === "delete" || !before || nodeDrawn(before) !== nodeDrawn(msg.value)) refreshTopologySoon();
    else if (before.online !== msg.value.online) restyleNode(msg.id, msg.value);
  } else if (msg.kind === "instance") {
    if (msg.op === "delete") state.instances.delete(msg.id);
    else if (!putIfNewer(state.instances, msg.id, msg.value)) return;
    dirty.placements = true;
  }
  dirty.summary = true;
  schedule();
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/events");
  for (const kind of ["device", "node", "instance"]) es.addEventListener(kind, queueEvent);
  // hello comes first on every (re)connection: load the lists after it, so no change made
  // between the load and the subscription is lost.
  es.addEventListener("hello", () => {
    conn.textContent = "live"; conn.className = "conn conn-live";
    loadAll().catch((e) => console.warn("load", e));
  });
  es.addEventListener("resync", () => loadAll().catch((e) => console.warn("load", e)));
  es.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn conn-down"; };
}

// --- rendering ----------------------------------------------------------------------------
let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => { scheduled = false; render(); });
}

function render() {
  // The table first: its window is placed from the scroller's layout, read before anything in
  // this frame writes to the page (a read after a write forces a layout within the frame).
  const changed = dirty.rows;
  dirty.rows = new Set();
  if (dirty.table) { renderTable(); dirty.table = false; dirty.window = false; }
  else {
    if (dirty.window) { renderWindow(); dirty.window = false; }
    for (const id of changed) updateRow(id);
  }
  if (topoFills.size) for (const id of changed) fillTopology(id);
  if (dirty.summary) summarySoon();
  if (dirty.topology) { renderTopology(); dirty.topology = false; }
  if (dirty.placements) { renderPlacements(); dirty.placements = false; }
}

// The summary line is rebuilt at most twice a second with thousands of devices streaming in.
let summaryAt = 0, summaryTimer = null;
function summarySoon() {
  const wait = 500 - (performance.now() - summaryAt);
  if (state.devices.size < 1000 || wait <= 0) {
    renderSummary(); dirty.summary = false; summaryAt = performance.now(); return;
  }
  if (!summaryTimer) summaryTimer = setTimeout(() => { summaryTimer = null; schedule(); }, wait);
}

// The fleet's sums, kept as devices change (each change takes out what the device added and
// adds what it adds now) rather than summed over every device for each summary.
const sums = { online: 0, total: 0, free: 0 };
function count(d, sign) {
  if (!d) return;
  const online = d.status === "online";
  sums.online += sign * (online ? 1 : 0);
  sums.total += sign * (d.memory_total_bytes || 0);
  sums.free += sign * (online ? d.memory_free_bytes || 0 : 0);
}
function recount() {
  sums.online = sums.total = sums.free = 0;
  for (const d of state.devices.values()) count(d, 1);
}

function renderSummary() {
  const { online, total, free } = sums;
  let nodesOnline = 0;
  for (const n of state.nodes.values()) if (n.online) nodesOnline++;
  const el = document.getElementById("summary");
  el.replaceChildren(
    h("b", {}, `${nodesOnline}/${state.nodes.size}`), " nodes online · ",
    h("b", {}, `${online}/${state.devices.size}`), " GPUs online · ",
    h("b", {}, total >= 10 * 1024 * GIB ? `${(free / 1024 / GIB).toFixed(1)} / ${(total / 1024 / GIB).toFixed(1)} TiB` : `${gib(free)} / ${gib(total)} GiB`), " free · ",
    h("b", {}, state.instances.size), " placements · revision ", state.revision,
  );
}

function matches(d) {
  if (!state.filter) return true;
  const hay = `${d.id} ${d.name || ""} ${d.status} ${d.vendor || ""}`.toLowerCase();
  return state.filter.split(/\s+/).every((w) => hay.includes(w));
}

// The fleet table is virtualised: only the rows in (or near) the scrolled window exist, so
// 8,000 devices cost what ~40 rows cost. ``view`` (the filtered, sorted ids) is rebuilt only
// when devices come or go or the filter changes; a sample updates its row if one is drawn.
// Spacer rows above and below keep the scrollbar true to the whole list.
const rows = new Map(); // device id -> {tr, cells...}, for drawn rows only
let view = []; // device ids passing the filter, in fleet order
let rowHeight = 39; // measured once from the first drawn row; rows are one line high by CSS
let rowMeasured = false; // (measuring forces a layout: after each window it cost a layout a frame)
const OVERSCAN = 8;

function renderTable() {
  colorIndex = null;
  view = [...state.devices.values()].filter(matches).sort(deviceOrder).map((d) => d.id);
  for (const row of rows.values()) retire(row);
  rows.clear();
  const more = document.getElementById("fleet-more");
  more.hidden = !state.filter || !state.devices.size;
  more.textContent = `${view.length} of ${state.devices.size} devices match the filter`;
  document.getElementById("fleet-hint").textContent = `${state.devices.size} devices`;
  renderWindow();
}

function makeRow(d) {
  const row = {
    tr: h("tr", { "data-device-id": d.id }),
    swatch: h("i", { style: "display:inline-block;width:9px;height:9px;border-radius:2px;margin-right:6px" }),
    idText: document.createTextNode(d.id),
    gpu: h("td", { class: "gpu" }),
    status: h("td", { class: "status" }),
    mem: h("td", { class: "mem" }),
    util: h("td", { class: "util num" }),
    temp: h("td", { class: "temp num" }),
    power: h("td", { class: "power num" }),
    canvas: h("canvas", { class: "spark", width: 180, height: 30 }),
  };
  row.tr.append(
    h("td", { class: "id" }, row.swatch, row.idText),
    row.gpu, row.status, row.mem, row.util, row.temp, row.power, h("td", {}, row.canvas),
  );
  return showRow(d, row);
}

// Rows scrolled out of the window wait here to show the next devices scrolled in: a jump
// through 8,000 devices redraws the whole window, and a new row (its cells, its canvas and
// the canvas's context) cost several times what refilling one does.
const spare = [];
function retire(row) {
  row.tr.remove();
  spare.push(row);
}

function rowFor(d) {
  const row = spare.pop();
  return row ? showRow(d, row) : makeRow(d);
}

function showRow(d, row) {
  row.tr.setAttribute("data-device-id", d.id);
  row.swatch.style.background = colorOf(d.id);
  row.idText.data = d.id;
  row.gpu.title = d.uuid || "";
  row.gpu.textContent = d.name || "?";
  fillRow(d, row);
  return row;
}

function spacer(cls) {
  return h("tr", { class: `spacer ${cls}` }, h("td", { colSpan: 8 }));
}

function renderWindow() {
  const scroller = document.getElementById("fleet-scroll");
  const body = document.getElementById("fleet-body");
  if (!view.length) {
    for (const row of rows.values()) retire(row);
    rows.clear();
    body.replaceChildren(h("tr", {}, h("td", { colSpan: 8, class: "empty" }, state.devices.size ? "no device matches the filter" : "no devices reporting yet")));
    return;
  }
  // The scroller is at most 70 % of the window high (CSS); empty, it is only its header high.
  const visible = Math.ceil(Math.max(scroller.clientHeight, window.innerHeight * 0.7) / rowHeight);
  const first = Math.max(0, Math.floor(scroller.scrollTop / rowHeight) - OVERSCAN);
  const last = Math.min(view.length, first + visible + 2 * OVERSCAN);
  const wanted = view.slice(first, last);
  const keep = new Set(wanted);
  for (const [id, row] of rows) if (!keep.has(id)) { retire(row); rows.delete(id); }
  const top = body.querySelector("tr.spacer.top") || spacer("top");
  const bottom = body.querySelector("tr.spacer.bottom") || spacer("bottom");
  const frag = document.createDocumentFragment();
  frag.append(top);
  for (const id of wanted) {
    let row = rows.get(id);
    if (!row) { const d = state.devices.get(id); if (!d) continue; row = rowFor(d); rows.set(id, row); }
    frag.append(row.tr);
  }
  frag.append(bottom);
  body.replaceChildren(frag);
  top.firstChild.style.height = `${first * rowHeight}px`;
  bottom.firstChild.style.height = `${(view.length - last) * rowHeight}px`;
  top.hidden = first === 0; bottom.hidden = last === view.length;
  const drawn = rows.values().next().value;
  if (!rowMeasured && drawn && drawn.tr.offsetHeight) { rowHeight = drawn.tr.offsetHeight; rowMeasured = true; }
}

function updateRow(id) {
  const d = state.devices.get(id);
  const row = rows.get(id);
  if (row && d) fillRow(d, row);
}

function fillRow(d, row) {
  row.tr.className = d.status;
  row.status.replaceChildren(h("span", {},
    h("span", { class: `badge b-${d.status}`, title: d.offline_reason || `last seen ${ago(d.last_seen)}` }, d.status),
    d.status === "offline" && d.offline_reason ? h("span", { class: "hint" }, d.offline_reason) : null,
  ));
  const total = d.memory_total_bytes, used = d.memory_used_bytes;
  const pct = total ? Math.min(100, (100 * (used || 0)) / total) : 0;
  row.mem.replaceChildren(h("div", { class: "bar", title: `${gib(d.memory_free_bytes)} GiB free` },
    h("span", { style: `width:${pct.toFixed(1)}%` }), h("em", {}, `${gib(used)} / ${gib(total)} GiB`)));
  const util = d.utilization_gpu_pct;
  row.util.replaceChildren(h("div", { class: "bar ubar" }, h("span", { style: `width:${util ?? 0}%` }), h("em", {}, util === null || util === undefined ? "–" : `${num(util)} %`)));
  row.temp.textContent = d.temperature_c === null || d.temperature_c === undefined ? "–" : `${num(d.temperature_c)} °C`;
  row.temp.classList.toggle("hot", (d.temperature_c ?? 0) >= 85);
  row.power.textContent = d.power_w === null || d.power_w === undefined ? "–" : `${num(d.power_w)}${d.power_limit_w ? ` / ${num(d.power_limit_w)}` : ""} W`;
  drawSpark(row.canvas, state.history.get(d.id));
}

function drawSpark(canvas, hist) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  if (!hist || !hist.t.length) return;
  const now = Math.max(Date.now() / 1000, hist.t[hist.t.length - 1]);
  // The window grows with the history it has (at least a minute, at most five), so a page
  // opened on a fresh fleet shows a readable chart rather than a sliver at the right edge.
  const span = Math.min(HISTORY_WINDOW_S, Math.max(60, now - hist.t[0]));
  const x = (t) => W - ((now - t) / span) * W;
  const line = (values, max, color, fill) => {
    ctx.beginPath();
    let started = false, firstX = 0, lastX = 0;
    for (let i = 0; i < hist.t.length; i++) {
      const v = values[i];
      if (v === null || v === undefined || hist.t[i] < now - span) continue;
      const px = x(hist.t[i]), py = H - 2 - (Math.min(v, max) / max) * (H - 4);
      if (!started) { ctx.moveTo(px, py); started = true; firstX = px; } else ctx.lineTo(px, py);
      lastX = px;
    }
    if (!started) return;
    if (firstX === lastX && !fill) { ctx.fillStyle = color; ctx.fillRect(lastX - 2, 2, 2, H - 4); return; }
    if (fill) {
      ctx.lineTo(lastX, H); ctx.lineTo(firstX, H); ctx.closePath();
      ctx.fillStyle = fill; ctx.fill();
    } else { ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.stroke(); }
  };
  line(hist.mem, 100, null, "rgba(188,140,255,0.28)");
  line(hist.temp, 100, "#f0883e");
  line(hist.util, 100, "#58a6ff");
}

// Each drawn GPU's memory fill, updated in place by its samples (the drawing itself is rebuilt
// only when the topology changes).
const topoFills = new Map(); // device id -> {rect, bottom, height}
// The drawing's key (drawnKey) and its status-bearing elements: node id -> {frame, label},
// device id -> {title, frame}.
const topoDrawn = { key: "", nodes: new Map(), gpus: new Map() };
function fillTopology(id) {
  const f = topoFills.get(id), d = state.devices.get(id);
  if (!f || !d) return;
  const used = d.memory_total_bytes ? (d.memory_used_bytes || 0) / d.memory_total_bytes : 0;
  f.rect.setAttribute("y", f.bottom - f.height * used);
  f.rect.setAttribute("height", f.height * used);
}

// The topology: nodes as boxes on a grid, GPUs inside each box (filled by memory in use),
// NVLink pairs as green arcs above the GPUs, the host's PCIe as a bus under them, and network
// links between boxes labelled with speed and latency.
function renderTopology() {
  const el = document.getElementById("topology");
  let topo = state.topology;
  if (!topo || !topo.nodes.length) { topoDrawn.key = ""; topoFills.clear(); el.replaceChildren(h("p", { class: "empty" }, "no nodes yet")); return; }
  const MAX_NODES = 48; // beyond this the drawing stops being readable; the API has them all
  if (topo.nodes.length > MAX_NODES) {
    topo = { ...topo, nodes: topo.nodes.slice(0, MAX_NODES) };
  }
  const key = drawnKey(topo);
  if (key === topoDrawn.key) { restyleTopology(topo); topologyHint(topo); return; }
  topoDrawn.key = key; topoDrawn.nodes.clear(); topoDrawn.gpus.clear(); topoFills.clear();
  const GPU_W = 62, GPU_H = 46, GAP = 10, PAD = 14, HEAD = 44, BUS = 26;
  const maxGpus = Math.max(1, ...topo.nodes.map((n) => n.devices.length));
  const perRow = Math.min(maxGpus, 8);
  const boxW = Math.max(170, PAD * 2 + perRow * GPU_W + (perRow - 1) * GAP);
  const gpuRows = Math.ceil(maxGpus / perRow);
  const boxH = HEAD + gpuRows * (GPU_H + GAP) + BUS + PAD;
  const cols = Math.max(1, Math.min(topo.nodes.length, Math.ceil(Math.sqrt(topo.nodes.length))));
  const CG = 140, RG = 70;
  const W = cols * boxW + (cols - 1) * CG + 40;
  const rowsN = Math.ceil(topo.nodes.length / cols);
  const H = rowsN * boxH + (rowsN - 1) * RG + 40;
  // Scales down to the panel's width (never up), so the whole cluster is always in view.
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "cluster topology", style: `width:100%;max-width:${W}px;height:auto` });
  const boxes = new Map(), gpus = new Map();
  topo.nodes.forEach((n, i) => {
    const bx = 20 + (i % cols) * (boxW + CG), by = 20 + Math.floor(i / cols) * (boxH + RG);
    boxes.set(n.id, { x: bx, y: by, w: boxW, h: boxH });
    n.devices.forEach((id, j) => {
      gpus.set(id, { x: bx + PAD + (j % perRow) * (GPU_W + GAP), y: by + HEAD + Math.floor(j / perRow) * (GPU_H + GAP) });
    });
  });
  const devById = new Map(topo.devices.map((d) => [d.id, d]));
  // The slowest PCIe link of each drawn node, in one pass over the links (a pass per node was
  // 48 x 8,000 links at 1,000 nodes).
  const pcieSpeed = new Map();
  for (const l of topo.links) {
    if (l.kind !== "pcie" || !l.gbytes_s || !boxes.has(l.node)) continue;
    pcieSpeed.set(l.node, Math.min(pcieSpeed.get(l.node) ?? Infinity, l.gbytes_s));
  }
  const netLayer = s("g", {}), boxLayer = s("g", {}), linkLayer = s("g", {});
  for (const link of topo.links) {
    if (link.kind !== "network") continue;
    const a = boxes.get(link.a), b = boxes.get(link.b);
    if (!a || !b) continue;
    const ax = a.x + a.w / 2, ay = a.y + a.h / 2, bx = b.x + b.w / 2, by = b.y + b.h / 2;
    const wdt = Math.max(1.2, Math.min(6, Math.log10((link.gbit_s || 1) + 1) * 2.2));
    netLayer.append(s("line", { x1: ax, y1: ay, x2: bx, y2: by, stroke: "#58a6ff", "stroke-width": wdt, "stroke-opacity": 0.55, class: "net-link" }));
    const label = `${num(link.gbit_s, link.gbit_s < 10 ? 1 : 0)} Gb/s · ${num(link.latency_ms, 2)} ms`;
    const mx = (ax + bx) / 2, my = (ay + by) / 2;
    netLayer.append(s("rect", { x: mx - 58, y: my - 9, width: 116, height: 17, rx: 8, fill: "#0f1419", stroke: "#263241" }));
    netLayer.append(s("text", { x: mx, y: my + 4, "text-anchor": "middle", fill: "#a5d6ff", "font-size": 11 }, label));
  }
  for (const n of topo.nodes) {
    const b = boxes.get(n.id);
    const g = s("g", { class: "node", "data-node": n.id });
    const node = {
      frame: s("rect", { x: b.x, y: b.y, width: b.w, height: b.h, rx: 8, fill: "#161d25", "stroke-width": 1.5 }),
      label: s("text", { x: b.x + b.w - 10, y: b.y + 20, "font-size": 11, "text-anchor": "end" }),
    };
    styleNode(node, n);
    topoDrawn.nodes.set(n.id, node);
    g.append(node.frame);
    g.append(s("text", { x: b.x + 10, y: b.y + 20, fill: "#d8e0e8", "font-size": 13, "font-weight": 600 }, n.id));
    g.append(node.label);
    if (n.devices.length > 1) {
      const first = gpus.get(n.devices[0]), last = gpus.get(n.devices[n.devices.length - 1]);
      const busY = b.y + b.h - PAD - 6;
      const speed = pcieSpeed.get(n.id) ?? null;
      g.append(s("line", { x1: first.x + 6, y1: busY, x2: last.x + GPU_W - 6, y2: busY, stroke: "#8394a6", "stroke-width": 2, class: "pcie-bus" }));
      for (const id of n.devices) {
        const p = gpus.get(id);
        if (p.y + GPU_H + GAP > busY) g.append(s("line", { x1: p.x + GPU_W / 2, y1: p.y + GPU_H, x2: p.x + GPU_W / 2, y2: busY, stroke: "#8394a6", "stroke-width": 1 }));
      }
      g.append(s("text", { x: b.x + b.w - 10, y: busY - 4, fill: "#8394a6", "font-size": 10, "text-anchor": "end" }, `PCIe${speed ? ` ${num(speed)} GB/s` : ""}`));
    }
    for (const id of n.devices) {
      const p = gpus.get(id), d = devById.get(id) || {}, live = state.devices.get(id) || d;
      const used = live.memory_total_bytes ? (live.memory_used_bytes || 0) / live.memory_total_bytes : 0;
      const gg = s("g", { class: "gpu", "data-device-id": id });
      const gpu = { title: s("title", {}), frame: s("rect", { x: p.x, y: p.y, width: GPU_W, height: GPU_H, rx: 4, fill: "#0b1016", stroke: colorOf(id) }) };
      styleGpu(gpu, id, d);
      topoDrawn.gpus.set(id, gpu);
      gg.append(gpu.title, gpu.frame);
      const fill = s("rect", { x: p.x + 2, y: p.y + GPU_H - 2 - (GPU_H - 4) * used, width: GPU_W - 4, height: (GPU_H - 4) * used, fill: colorOf(id), "fill-opacity": 0.25 });
      topoFills.set(id, { rect: fill, bottom: p.y + GPU_H - 2, height: GPU_H - 4 });
      gg.append(fill);
      gg.append(s("text", { x: p.x + GPU_W / 2, y: p.y + 16, "text-anchor": "middle", fill: "#d8e0e8", "font-size": 11, "font-weight": 600 }, `#${d.index}`));
      const short = String(d.name || "?").replace(/^(NVIDIA|AMD)\s+/i, "").replace(/GeForce\s+/i, "").slice(0, 10);
      gg.append(s("text", { x: p.x + GPU_W / 2, y: p.y + 29, "text-anchor": "middle", fill: "#8394a6", "font-size": 9 }, short));
      gg.append(s("text", { x: p.x + GPU_W / 2, y: p.y + 41, "text-anchor": "middle", fill: "#8394a6", "font-size": 9 }, `${gib(live.memory_total_bytes)} GiB`));
      g.append(gg);
    }
    boxLayer.append(g);
  }
  for (const link of topo.links) {
    if (link.kind !== "nvlink") continue;
    const a = gpus.get(link.a), b = gpus.get(link.b);
    if (!a || !b) continue;
    const ax = a.x + GPU_W / 2, bx = b.x + GPU_W / 2, top = Math.min(a.y, b.y);
    const lift = 12 + Math.min(10, Math.abs(bx - ax) / 20);
    linkLayer.append(s("path", { d: `M${ax},${a.y} C${ax},${top - lift} ${bx},${top - lift} ${bx},${b.y}`, fill: "none", stroke: "#3fb970", "stroke-width": 3, class: "nvlink" },
      s("title", {}, `NVLink ${link.a} ↔ ${link.b}: ${link.links} link(s)${link.gbytes_s ? `, ${num(link.gbytes_s)} GB/s` : ""}`)));
  }
  svg.append(netLayer, boxLayer, linkLayer);
  el.replaceChildren(svg);
  topologyHint(topo);
}

function topologyHint(topo) {
  const c = topo.counts || {};
  const shown = state.topology.nodes.length > topo.nodes.length ? ` (first ${topo.nodes.length} drawn)` : "";
  document.getElementById("topology-hint").textContent = `${state.topology.nodes.length} nodes${shown} · ${c.nvlink || 0} NVLink · ${c.pcie || 0} PCIe · ${c.network || 0} network links`;
}

// What of the drawing is not status: while it stays the same, a status change (a node or GPU
// going offline or back, the common change at fleet scale) restyles the drawn elements in place
// instead of rebuilding thousands of them and their layout.
function drawnKey(topo) {
  const nodes = new Set(topo.nodes.map((n) => n.id));
  const gpus = new Set(topo.nodes.flatMap((n) => n.devices));
  const drawn = (x) => nodes.has(x) || gpus.has(x);
  const links = topo.links.filter((l) => drawn(l.node) || drawn(l.a) || drawn(l.b));
  const devices = topo.devices.filter((d) => gpus.has(d.id));
  const noStatus = (k, v) => (k === "status" || k === "online" ? undefined : v);
  return JSON.stringify([state.devices.size, topo.nodes, devices, links], noStatus);
}

function restyleGpu(id, d) {
  const gpu = topoDrawn.gpus.get(id);
  if (gpu) styleGpu(gpu, id, d);
}

function restyleNode(id, n) {
  const node = topoDrawn.nodes.get(id);
  if (node) styleNode(node, n);
}

function restyleTopology(topo) {
  for (const n of topo.nodes) { const node = topoDrawn.nodes.get(n.id); if (node) styleNode(node, n); }
  for (const d of topo.devices) { const gpu = topoDrawn.gpus.get(d.id); if (gpu) styleGpu(gpu, d.id, d); }
}

// Each touches the DOM only where the status changed (a restyle visits every drawn element).
function styleNode(node, n) {
  const label = `${n.online ? "online" : "offline"}${n.interconnect ? ` · ${n.interconnect}` : ""}`;
  if (node.shown === label) return;
  node.shown = label;
  const color = n.online ? "#3fb970" : "#e5534b";
  node.frame.setAttribute("stroke", color);
  node.label.setAttribute("fill", color);
  node.label.textContent = label;
}

function styleGpu(gpu, id, d) {
  const live = state.devices.get(id) || d;
  const title = `${id} · ${d.name || "?"} · ${gib(live.memory_total_bytes)} GiB · ${d.status}`;
  if (gpu.shown === title) return;
  gpu.shown = title;
  gpu.title.textContent = title;
  gpu.frame.setAttribute("stroke-width", d.online ? 2 : 1);
  if (d.online) gpu.frame.removeAttribute("stroke-dasharray"); else gpu.frame.setAttribute("stroke-dasharray", "3 2");
}

// A plan as the model's layers laid along its pipeline: one cell per layer, coloured by the
// device that holds it, and under it one block per stage with its device, range and status.
function planView(stages, layersTotal) {
  const total = layersTotal || Math.max(0, ...stages.map((st) => st.layer_end));
  const strip = h("div", { class: "layers", title: `${total} layers` });
  const perStage = h("div", { class: "stages" });
  for (const [i, st] of stages.entries()) {
    const color = colorOf(st.device);
    const n = st.layer_end - st.layer_start;
    const status = st.state || "planned";
    for (let l = st.layer_start; l < st.layer_end; l++) {
      strip.append(h("i", { class: status, style: `background:${color}`, title: `layer ${l} · ${st.device} · ${status}` }));
    }
    const tip = `stage ${st.stage ?? i} · ${st.device || st.node} · ${layerRange(st)} (${n} layer${n === 1 ? "" : "s"})${st.state ? ` · ${st.state}` : ""}${st.reason ? ` · ${st.reason}` : ""}`;
    perStage.append(h("div", { style: `flex:${Math.max(n, 0.001)};border-color:${color}`, title: tip, "data-stage": st.stage ?? i, "data-device-id": st.device || "" },
      h("b", {}, `${st.device || st.node}`),
      h("span", { class: "range" }, `${layerRange(st)} `),
      st.state ? h("span", { class: `st st-${st.state}` }, st.state) : (st.gpu ? h("span", {}, st.gpu) : null),
      st.reason ? h("span", { title: st.reason }, ` ${st.reason}`) : null,
    ));
  }
  return h("div", { class: "plan" }, strip, perStage);
}

function renderPlacements() {
  const el = document.getElementById("placements");
  const list = [...state.instances.values()].sort((a, b) => (a.id < b.id ? -1 : 1));
  document.getElementById("placements-hint").textContent = `${list.length} instance${list.length === 1 ? "" : "s"}`;
  if (!list.length) { el.replaceChildren(h("p", { class: "empty" }, "nothing placed yet: use the form below")); return; }
  el.replaceChildren(...list.map((inst) => h("div", { class: "placement", "data-instance-id": inst.id },
    h("h3", {}, inst.id, h("span", { class: `st st-${inst.state}` }, inst.state),
      h("span", { class: "meta" }, `${inst.model} · generation ${inst.generation} · ${inst.stage_count} stage${inst.stage_count === 1 ? "" : "s"} · ${inst.layers_total} layers · updated ${ago(inst.updated)}`)),
    planView(inst.stages, inst.layers_total),
    inst.state === "loaded" ? promptBox(inst.id) : null,
  )));
}

// --- a prompt box per ready instance --------------------------------------------------------
// Streams a chat answer through /v1/chat/completions (server-sent events, OpenAI's chunks) and
// shows the live ms/token next to the plan's step time. Boxes outlive re-renders of the list
// (the instance's state changes often), so what is typed and streamed is not lost.
const promptBoxes = new Map();
const TOKEN_KEY = "shardplane-api-token";

function promptBox(id) {
  if (promptBoxes.has(id)) return promptBoxes.get(id);
  const input = h("input", { class: "prompt-input", type: "text", placeholder: `ask ${id}…` });
  const token = h("input", { class: "prompt-token", type: "password", placeholder: "API token (if set)", value: sessionStorage.getItem(TOKEN_KEY) || "" });
  const button = h("button", { type: "submit", class: "prompt-send" }, "send");
  const answer = h("pre", { class: "prompt-answer" });
  const speed = h("p", { class: "prompt-speed hint" });
  const form = h("form", { class: "prompt" }, input, token, button);
  const box = h("div", { class: "prompt-box", "data-instance-id": id }, form, answer, speed);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, token.value);
    if (input.value.trim()) streamAnswer(id, input.value, token.value, button, answer, speed);
  });
  promptBoxes.set(id, box);
  return box;
}

async function planFigures(id) {
  try {
    const r = await fetch(`/api/serving/${encodeURIComponent(id)}`);
    return r.ok ? (await r.json()).plan : null;
  } catch (e) { return null; }
}

function speedText(times, plan) {
  const live = times.length > 1 ? (times[times.length - 1] - times[0]) / (times.length - 1) : null;
  const parts = [`${times.length} chunk${times.length === 1 ? "" : "s"}`];
  if (live !== null) parts.push(`live ${live.toFixed(1)} ms/token`);
  if (plan && plan.step_ms > 0) {
    parts.push(`plan ${plan.step_ms.toFixed(1)} ms/token (batch ${plan.batch}, M = ${plan.microbatches})`);
    if (live !== null) parts.push(`live / plan ${(live / plan.step_ms).toFixed(2)}`);
  } else parts.push("no plan figure");
  return parts.join(" · ");
}

async function streamAnswer(id, prompt, token, button, answer, speed) {
  button.disabled = true;
  answer.textContent = "";
  answer.classList.remove("err");
  speed.textContent = "waiting for the first token…";
  const plan = await planFigures(id);
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const body = { model: id, messages: [{ role: "user", content: prompt }], max_tokens: 64, stream: true };
  const times = [];
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      throw new Error(err && err.error ? `${r.status}: ${err.error.message}` : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      const events = buffered.split("\n\n");
      buffered = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const text = chunk.choices && chunk.choices[0] && chunk.choices[0].delta ? chunk.choices[0].delta.content : null;
        if (!text) continue;
        times.push(performance.now());
        answer.textContent += text;
        speed.textContent = speedText(times, plan);
      }
    }
    speed.textContent = speedText(times, plan) + " · done";
  } catch (e) {
    answer.classList.add("err");
    answer.textContent += `\n${e.message}`;
    speed.textContent = speedText(times, plan);
  } finally { button.disabled = false; }
}

// --- the placement form -------------------------------------------------------------------
const ERROR_WORDS = {
  invalid_request: "the request is not valid",
  unknown_model: "the planner does not know this model",
  no_devices: "no devices are available to place it on",
  insufficient_memory: "the fleet does not have enough free memory for it",
  conflict: "another placement took the memory first; try again",
  timeout: "the planner took too long",
  unavailable: "no planner is running",
  internal: "the planner failed",
};

function formBody(form) {
  const f = new FormData(form);
  let model = String(f.get("model") || "").trim();
  if (model.startsWith("{")) model = JSON.parse(model); // an inline model card
  const body = { model };
  const ints = ["context_tokens", "batch", "max_stages", "min_stages"];
  for (const k of ints) { const v = String(f.get(k) || "").trim(); if (v) body[k] = Number(v); }
  const head = String(f.get("memory_headroom") || "").trim();
  if (head) body.memory_headroom = Number(head);
  body.objective = f.get("objective");
  const micro = String(f.get("microbatches") || "").trim();
  if (micro) body.microbatches = /^[0-9]+$/.test(micro) ? Number(micro) : micro;
  body.dry_run = f.get("dry_run") === "on";
  const excl = String(f.get("exclude_nodes") || "").split(/[\s,]+/).filter(Boolean);
  if (excl.length) body.exclude_nodes = excl;
  const iid = String(f.get("instance_id") || "").trim();
  if (iid) body.instance_id = iid;
  return body;
}

// What the plan delivers (DESIGN.md "Planner model"): step_ms is the time between two tokens of
// every sequence; tokens/s is at the batch, run as M micro-batches.
function scheduleLine(reply) {
  const m = reply.microbatches || 1;
  const micro = reply.batch ? Math.ceil(reply.batch / m) : 0;
  return `${num(reply.step_ms, 2)} ms per token per sequence · ${num(reply.tokens_per_s, 1)} tokens/s at batch ${reply.batch}` +
    ` · M = ${m} micro-batch${m === 1 ? "" : "es"} of ${micro} · memory holds up to ${reply.max_batch} sequences`;
}

function showReply(status, reply) {
  const out = document.getElementById("place-result");
  if (!reply || typeof reply !== "object") { out.replaceChildren(h("p", { class: "err" }, `HTTP ${status}: the API's answer was not JSON`)); return; }
  if (!reply.ok) {
    const err = reply.error || {};
    const words = ERROR_WORDS[err.code] || "the placement failed";
    out.replaceChildren(
      h("p", { class: "err", "data-error-code": err.code || "" }, `Not placed: ${words}.`),
      h("p", {}, err.message || "", err.field ? h("span", { class: "hint" }, ` (field: ${err.field})`) : null),
      h("p", { class: "hint" }, `HTTP ${status} · code ${err.code || "?"}`),
    );
    return;
  }
  const stages = reply.stages || [];
  const layers = Math.max(0, ...stages.map((st) => st.layer_end));
  out.replaceChildren(
    h("p", { class: "ok", "data-instance-id": reply.instance_id || "" },
      `${reply.dry_run ? "Planned (dry run)" : "Placed"} ${reply.model} as ${reply.instance_id} (generation ${reply.generation}) on ${stages.length} stage${stages.length === 1 ? "" : "s"}.`),
    h("p", { id: "reply-schedule" }, scheduleLine(reply)),
    h("p", { class: "hint" }, `lower bound ${num(reply.lower_bound_ms, 2)} ms · ${reply.solver} ${reply.status} in ${num(reply.solve_ms, 1)} ms`),
    h("div", { id: "reply-plan" }, planView(stages, layers)),
    h("table", {},
      h("thead", {}, h("tr", {}, ...["stage", "device", "GPU", "layers", "weights GiB", "KV GiB", "stage ms", "hop ms"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ...stages.map((st, i) => h("tr", {},
        h("td", {}, i), h("td", {}, st.device), h("td", {}, st.gpu), h("td", { class: "range" }, layerRange(st)),
        h("td", { class: "num" }, gib(st.weight_bytes)), h("td", { class: "num" }, gib(st.kv_bytes)),
        h("td", { class: "num" }, num(st.stage_ms, 3)), h("td", { class: "num" }, num(st.hop_ms, 3)))))),
  );
}

async function submitPlacement(ev) {
  ev.preventDefault();
  const form = ev.target, button = document.getElementById("f-submit");
  const out = document.getElementById("place-result");
  let body;
  try { body = formBody(form); } catch (e) {
    out.replaceChildren(h("p", { class: "err" }, `The model card is not valid JSON: ${e.message}`));
    return;
  }
  button.disabled = true;
  out.replaceChildren(h("p", { class: "hint" }, `asking the planner to place ${typeof body.model === "string" ? body.model : body.model.name}…`));
  try {
    const r = await fetch("/api/placements", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    let reply = null;
    try { reply = await r.json(); } catch (e) { reply = null; }
    showReply(r.status, reply);
  } catch (e) {
    out.replaceChildren(h("p", { class: "err" }, `Could not reach the API: ${e.message}`));
  } finally { button.disabled = false; }
}

document.getElementById("place-form").addEventListener("submit", submitPlacement);
document.getElementById("filter").addEventListener("input", (ev) => {
  state.filter = ev.target.value.trim().toLowerCase(); dirty.table = true; schedule();
});
document.getElementById("fleet-scroll").addEventListener("scroll", () => { dirty.window = true; schedule(); }, { passive: true });
// Sparklines scroll with time even when a device is quiet.
setInterval(() => { for (const [id, row] of rows) drawSpark(row.canvas, state.history.get(id)); }, 5000);
connect();
