// lmscope atlas explorer, graph page: an attribution graph (Neuronpedia's JSON schema) drawn as SVG by hand, with
// hover details, a node panel, a pruning slider and supernode editing. No libraries and no network beyond this
// server; every text from the graph file is inserted as text (textContent), never as HTML.
//
// Layout: x is the token position (ctx_idx), one column per prompt token; y is the layer, token embeddings at the
// bottom, logits at the top, features and errors in their layer's row. The nodes of one cell sit side by side;
// a column is as wide as its fullest cell. Pruning lays the graph out again with the nodes that are left.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const GAP = 26; // px between the nodes of one cell
const MIN_COL = 58; // narrowest column
const ROW_H = 66;
const LEFT = 66; // room for the row labels
const TOP = 34; // room for the column headers (the prompt tokens)
const BOTTOM = 16;
const LABEL_CHARS = 16; // characters of a node label drawn in the graph (the tooltip and the panel show all)

const G = {
  doc: null, nodes: [], links: [], byId: new Map(), slug: "", readOnly: false, nFeatures: null,
  threshold: 1, selected: new Set(), supernodes: [], clicked: null, maxAbs: 1,
  rows: [], nPos: 1, linksOf: new Map(), nodeEls: new Map(),
};

// ------------------------------------------------------------------------------------------------ helpers
function svgEl(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function showTok(t) { return String(t).replace(/\n/g, "↵").replace(/\t/g, "→"); }

function clip(s, n) { s = String(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }

function isNum(x) { return typeof x === "number" && Number.isFinite(x); }

function fmt(x) {
  if (!isNum(x)) return "–";
  if (x === 0) return "0";
  return Math.abs(x) >= 1e-3 ? String(Number(x.toPrecision(3))) : x.toExponential(2);
}

function fmtInfluence(x) { return isNum(x) ? x.toFixed(3) : "–"; }

function kindOf(n) {
  const t = String(n.feature_type || "").toLowerCase();
  if (t === "embedding" || n.layer === "E") return "token";
  if (t === "logit") return "logit";
  if (t.includes("error")) return "error";
  return "feature";
}

const KIND_NAME = { feature: "feature", error: "reconstruction error", token: "token", logit: "logit" };

function influenceOf(n) { return isNum(n.influence) ? n.influence : 0; }

// tokens and logits always stay; the others go when their cumulative influence is above the threshold
function isVisible(n) {
  const k = kindOf(n);
  return k === "token" || k === "logit" || influenceOf(n) <= G.threshold;
}

function nodeLabel(n) {
  if (typeof n.clerp === "string" && n.clerp.trim()) return n.clerp;
  if (kindOf(n) === "error") return `L${n.layer}/error`;
  return `L${n.layer}/#${n.feature}`;
}

function positionText(n) {
  const toks = G.doc.metadata.prompt_tokens;
  const t = Array.isArray(toks) && isNum(n.ctx_idx) ? toks[n.ctx_idx] : undefined;
  return t === undefined ? String(n.ctx_idx) : `${n.ctx_idx} “${showTok(t)}”`;
}

function layerText(n) {
  const k = kindOf(n);
  if (k === "token") return "embedding";
  if (k === "logit") return "output";
  return String(n.layer);
}

// ------------------------------------------------------------------------------------------------ layout
function rowOf(n) {
  const k = kindOf(n);
  if (k === "token") return 0;
  if (k === "logit") return G.rows.length - 1;
  const i = G.rows.indexOf(String(n.layer));
  return i < 0 ? 0 : i;
}

function setupRows() {
  const layers = new Set();
  let logits = false;
  let maxPos = 0;
  for (const n of G.nodes) {
    const k = kindOf(n);
    if (k === "logit") logits = true;
    else if (k !== "token") layers.add(String(n.layer));
    if (isNum(n.ctx_idx)) maxPos = Math.max(maxPos, n.ctx_idx);
  }
  const sorted = [...layers].sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));
  G.rows = ["E", ...sorted];
  if (logits) G.rows.push("logits");
  const toks = G.doc.metadata.prompt_tokens;
  G.nPos = Math.max(Array.isArray(toks) ? toks.length : 0, maxPos + 1, 1);
}

function cellOrder(a, b) {
  const rank = { token: 0, logit: 1, feature: 2, error: 3 };
  const ka = kindOf(a), kb = kindOf(b);
  if (ka !== kb) return rank[ka] - rank[kb];
  if (ka === "logit") return (b.token_prob || 0) - (a.token_prob || 0);
  return influenceOf(a) - influenceOf(b);
}

function layout(nodes) {
  const cells = new Map();
  for (const n of nodes) {
    const key = `${rowOf(n)}:${isNum(n.ctx_idx) ? n.ctx_idx : 0}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const widest = new Array(G.nPos).fill(1);
  for (const [key, list] of cells) {
    const col = Number(key.split(":")[1]);
    widest[col] = Math.max(widest[col], list.length);
  }
  const colW = widest.map((k) => Math.max(MIN_COL, k * GAP + 14));
  const colX = [];
  let x = LEFT;
  for (const w of colW) { colX.push(x); x += w; }
  const pos = new Map();
  const nRows = G.rows.length;
  for (const [key, list] of cells) {
    const [row, col] = key.split(":").map(Number);
    list.sort(cellOrder);
    const cx = colX[col] + colW[col] / 2;
    const y = TOP + (nRows - 1 - row) * ROW_H + ROW_H / 2;
    list.forEach((n, i) => pos.set(n.node_id, { x: cx + (i - (list.length - 1) / 2) * GAP, y: y }));
  }
  return { pos: pos, colX: colX, colW: colW, width: x + 12, height: TOP + nRows * ROW_H + BOTTOM };
}

// ------------------------------------------------------------------------------------------------ drawing
function linkPath(a, b) {
  if (Math.abs(a.y - b.y) < 1) {
    const lift = Math.min(40, 12 + Math.abs(a.x - b.x) / 4);
    return `M${a.x},${a.y} Q${(a.x + b.x) / 2},${a.y - lift} ${b.x},${b.y}`;
  }
  const my = (a.y + b.y) / 2;
  return `M${a.x},${a.y} C${a.x},${my} ${b.x},${my} ${b.x},${b.y}`;
}

function drawShape(n, p, parent) {
  const k = kindOf(n);
  let shape;
  if (k === "feature") shape = svgEl("circle", { cx: p.x, cy: p.y, r: 6 }, parent);
  else if (k === "error") shape = svgEl("rect", { x: p.x - 5, y: p.y - 5, width: 10, height: 10 }, parent);
  else if (k === "token") shape = svgEl("rect", { x: p.x - 9, y: p.y - 5, width: 18, height: 10, rx: 4 }, parent);
  else {
    const pts = [[p.x, p.y - 7], [p.x + 7, p.y], [p.x, p.y + 7], [p.x - 7, p.y]].map((q) => q.join(",")).join(" ");
    shape = svgEl("polygon", { points: pts }, parent);
  }
  const cls = ["node", `kind-${k}`];
  if (G.selected.has(n.node_id)) cls.push("selected");
  if (G.clicked === n.node_id) cls.push("clicked");
  if (G.supernodes.some((s) => s.indexOf(n.node_id, 1) > 0)) cls.push("in-supernode");
  shape.setAttribute("class", cls.join(" "));
  shape.setAttribute("data-node-id", n.node_id);
  shape.setAttribute("data-kind", k);
  shape.setAttribute("tabindex", "0");
  shape.setAttribute("aria-label", `${KIND_NAME[k]} ${nodeLabel(n)}`);
  return shape;
}

function draw() {
  const svg = document.getElementById("graph-svg");
  svg.textContent = "";
  hideTooltip();
  G.linksOf = new Map();
  G.nodeEls = new Map();
  const shown = G.nodes.filter(isVisible);
  const L = layout(shown);
  svg.setAttribute("width", L.width);
  svg.setAttribute("height", L.height);
  svg.setAttribute("viewBox", `0 0 ${L.width} ${L.height}`);

  const bands = svgEl("g", { class: "bands" }, svg);
  G.rows.forEach((r, i) => {
    const y = TOP + (G.rows.length - 1 - i) * ROW_H;
    svgEl("rect", { x: 0, y: y, width: L.width, height: ROW_H, class: i % 2 ? "band odd" : "band" }, bands);
    const name = r === "E" ? "tokens" : r === "logits" ? "logits" : `L${r}`;
    svgEl("text", { x: 8, y: y + ROW_H / 2 + 4, class: "row-label" }, bands).textContent = name;
  });
  const toks = Array.isArray(G.doc.metadata.prompt_tokens) ? G.doc.metadata.prompt_tokens : [];
  for (let c = 0; c < G.nPos; c++) {
    const cx = L.colX[c] + L.colW[c] / 2;
    svgEl("line", { x1: L.colX[c], y1: TOP, x2: L.colX[c], y2: L.height - BOTTOM, class: "col-rule" }, bands);
    const head = svgEl("text", { x: cx, y: TOP - 10, class: "col-head", "data-pos": c }, bands);
    const t = toks[c] === undefined ? "" : showTok(toks[c]);
    svgEl("tspan", { class: "col-tok" }, head).textContent = clip(t, Math.max(3, Math.floor(L.colW[c] / 7)));
    svgEl("title", {}, head).textContent = `position ${c}: “${t}”`;
  }

  const linkG = svgEl("g", { class: "links" }, svg);
  let nLinks = 0;
  for (const l of G.links) {
    const a = L.pos.get(l.source), b = L.pos.get(l.target);
    if (!a || !b) continue;
    const w = isNum(l.weight) ? l.weight : 0;
    const path = svgEl("path", {
      d: linkPath(a, b), class: `link ${w >= 0 ? "pos" : "neg"}`,
      "stroke-width": (0.4 + 4 * Math.abs(w) / G.maxAbs).toFixed(2),
      "data-source": l.source, "data-target": l.target, "data-weight": w,
    }, linkG);
    for (const id of [l.source, l.target]) {
      if (!G.linksOf.has(id)) G.linksOf.set(id, []);
      G.linksOf.get(id).push(path);
    }
    nLinks++;
  }

  const nodeG = svgEl("g", { class: "nodes" }, svg);
  const labelG = svgEl("g", { class: "labels" }, svg);
  for (const n of shown) {
    const p = L.pos.get(n.node_id);
    G.nodeEls.set(n.node_id, drawShape(n, p, nodeG));
    const k = kindOf(n);
    const label = svgEl("text", { class: `node-label kind-${k}`, "data-label-of": n.node_id }, labelG);
    if (k === "token") {
      label.setAttribute("x", p.x);
      label.setAttribute("y", p.y + 17);
      label.setAttribute("text-anchor", "middle");
      label.textContent = clip(showTok(nodeLabel(n)), 8);
    } else {
      label.setAttribute("x", p.x + 5);
      label.setAttribute("y", p.y - 9);
      label.setAttribute("transform", `rotate(-35 ${p.x + 5} ${p.y - 9})`);
      label.textContent = clip(nodeLabel(n), LABEL_CHARS);
    }
  }
  const counts = document.getElementById("graph-counts");
  counts.textContent = `${shown.length} of ${G.nodes.length} nodes · ${nLinks} of ${G.links.length} links shown`;
  counts.dataset.nodes = String(shown.length);
  counts.dataset.links = String(nLinks);
}

// ------------------------------------------------------------------------------------------------ hover
function highlight(id, on) {
  const svg = document.getElementById("graph-svg");
  svg.classList.toggle("focus", on);
  for (const p of G.linksOf.get(id) || []) {
    p.classList.toggle("hl", on);
    const other = p.dataset.source === id ? p.dataset.target : p.dataset.source;
    const o = G.nodeEls.get(other);
    if (o) o.classList.toggle("hl", on);
  }
  const me = G.nodeEls.get(id);
  if (me) me.classList.toggle("hl", on);
}

function tooltipRows(n) {
  const rows = [["kind", KIND_NAME[kindOf(n)]], ["layer", layerText(n)], ["position", positionText(n)]];
  if (kindOf(n) === "feature") rows.push(["feature", `#${n.feature}`]);
  if (kindOf(n) === "logit") rows.push(["token", `#${n.feature}`], ["probability", fmt(n.token_prob)]);
  rows.push(["activation", fmt(n.activation)], ["influence", fmtInfluence(n.influence)]);
  return rows;
}

function showTooltip(n, x, y) {
  const tip = document.getElementById("node-tooltip");
  tip.textContent = "";
  tip.appendChild(el("div", { class: "tt-title" }, nodeLabel(n)));
  const table = el("table", { class: "kv" });
  for (const [k, v] of tooltipRows(n)) {
    const tr = table.insertRow();
    tr.appendChild(el("th", {}, k));
    tr.insertCell().textContent = v;
  }
  tip.appendChild(table);
  tip.hidden = false;
  moveTooltip(x, y);
}

function moveTooltip(x, y) {
  const tip = document.getElementById("node-tooltip");
  if (tip.hidden) return;
  const r = tip.getBoundingClientRect();
  const left = Math.min(x + 14, window.innerWidth - r.width - 6);
  const top = y + 14 + r.height > window.innerHeight ? y - r.height - 10 : y + 14;
  tip.style.left = `${Math.max(4, left)}px`;
  tip.style.top = `${Math.max(4, top)}px`;
}

function hideTooltip() {
  const tip = document.getElementById("node-tooltip");
  if (tip) tip.hidden = true;
}

// ------------------------------------------------------------------------------------------------ node panel
function linkList(title, links, end) {
  const box = el("div", { class: "panel-links" });
  box.appendChild(el("h3", {}, title));
  const ul = el("ul", { class: "neigh" });
  const top = links.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 6);
  for (const l of top) {
    const other = G.byId.get(l[end]);
    if (!other) continue;
    const li = el("li");
    const a = el("a", { href: "#", "data-goto": other.node_id }, nodeLabel(other));
    a.addEventListener("click", (ev) => { ev.preventDefault(); showPanel(other.node_id); });
    li.append(el("span", { class: `num ${l.weight >= 0 ? "pos" : "neg"}` }, fmt(l.weight)), a);
    ul.appendChild(li);
  }
  if (!ul.children.length) ul.appendChild(el("li", { class: "muted" }, "none shown"));
  box.appendChild(ul);
  return box;
}

function showPanel(id) {
  const n = G.byId.get(id);
  const panel = document.getElementById("node-panel");
  if (!n) return;
  const prev = G.clicked && G.nodeEls.get(G.clicked);
  if (prev) prev.classList.remove("clicked");
  G.clicked = id;
  const me = G.nodeEls.get(id);
  if (me) me.classList.add("clicked");
  const k = kindOf(n);
  panel.textContent = "";
  const head = el("div", { class: "panel-head" });
  head.appendChild(el("h2", {}, k === "feature" ? `Feature #${n.feature}` : KIND_NAME[k]));
  const close = el("button", { type: "button", id: "node-panel-close", "aria-label": "close" }, "×");
  close.addEventListener("click", () => {
    panel.hidden = true;
    G.clicked = null;
    if (me) me.classList.remove("clicked");
  });
  head.appendChild(close);
  panel.appendChild(head);
  const lab = typeof n.clerp === "string" && n.clerp.trim();
  panel.appendChild(el("p", { id: "node-label", class: lab ? "label" : "label none" }, lab ? n.clerp : "unlabelled"));
  const table = el("table", { class: "kv", id: "node-details" });
  for (const [key, v] of [["node", n.node_id], ...tooltipRows(n).slice(1)]) {
    const tr = table.insertRow();
    tr.appendChild(el("th", {}, key));
    tr.insertCell().textContent = v;
  }
  panel.appendChild(table);
  if (k === "feature" && Number.isInteger(n.feature) && n.feature >= 0) {
    const p = el("p", { class: "panel-feature" });
    const text = `open feature #${n.feature} in the atlas →`;
    p.appendChild(el("a", { href: `/features/${n.feature}`, id: "node-feature-link" }, text));
    panel.appendChild(p);
    let note = "The atlas page shows its own dictionary's feature with this id: the same feature only when the atlas " +
      "was built from this layer's transcoder.";
    if (G.nFeatures !== null && n.feature >= G.nFeatures) note = `This atlas has ${G.nFeatures} features: ` +
      `#${n.feature} is not one of them (the atlas was built from another dictionary).`;
    panel.appendChild(el("p", { class: "muted small", id: "node-feature-note" }, note));
  }
  const selText = () => (G.selected.has(id) ? "unselect" : "select for a supernode");
  const sel = el("button", { type: "button", id: "node-select" }, selText());
  sel.addEventListener("click", () => { toggleSelect(id); sel.textContent = selText(); });
  panel.appendChild(sel);
  const visible = new Set(G.nodes.filter(isVisible).map((x) => x.node_id));
  const incoming = G.links.filter((l) => l.target === id && visible.has(l.source));
  const outgoing = G.links.filter((l) => l.source === id && visible.has(l.target));
  panel.appendChild(linkList(`strongest inputs (${incoming.length})`, incoming, "source"));
  panel.appendChild(linkList(`strongest outputs (${outgoing.length})`, outgoing, "target"));
  panel.hidden = false;
}

// ------------------------------------------------------------------------------------------------ supernodes
function setStatus(text, warn) {
  const s = document.getElementById("supernode-status");
  s.textContent = text;
  s.className = warn ? "warn small" : "muted small";
}

function toggleSelect(id) {
  if (G.selected.has(id)) G.selected.delete(id); else G.selected.add(id);
  const e = G.nodeEls.get(id);
  if (e) e.classList.toggle("selected", G.selected.has(id));
  showSelection();
}

function showSelection() {
  const box = document.getElementById("supernode-selected");
  const ids = [...G.selected];
  if (!ids.length) { box.textContent = "no nodes selected"; return; }
  const names = ids.map((i) => (G.byId.has(i) ? nodeLabel(G.byId.get(i)) : i));
  box.textContent = `${ids.length} selected: ${clip(names.join(", "), 300)}`;
}

function validSupernodes(raw) {
  const ok = (s) => Array.isArray(s) && s.length >= 2 && s.every((x) => typeof x === "string");
  return Array.isArray(raw) ? raw.filter(ok) : [];
}

function detailOf(data, res) {
  if (data && typeof data.detail === "string") return data.detail;
  if (data && Array.isArray(data.detail)) {
    return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `request failed (HTTP ${res.status})`;
}

async function saveSupernodes(list) {
  let res, data = null;
  try {
    res = await fetch(`/api/graphs/${encodeURIComponent(G.slug)}/supernodes`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ supernodes: list }),
    });
    try { data = await res.json(); } catch (e) { data = null; }
  } catch (e) {
    setStatus("request failed: " + e, true);
    return false;
  }
  if (!res.ok) { setStatus(detailOf(data, res), true); return false; }
  G.supernodes = validSupernodes(data.supernodes);
  return true;
}

function markSupernode(group, on) {
  for (const id of group.slice(1)) {
    const e = G.nodeEls.get(id);
    if (e) e.classList.toggle("sn-hl", on);
  }
}

function renderSupernodes() {
  const ul = document.getElementById("supernode-list");
  ul.textContent = "";
  if (!G.supernodes.length) { ul.appendChild(el("li", { class: "muted" }, "no supernodes yet")); return; }
  G.supernodes.forEach((group, i) => {
    const li = el("li", { "data-index": i, "data-label": group[0] });
    li.append(el("span", { class: "label" }, group[0]), el("span", { class: "num" }, `${group.length - 1} node(s)`));
    const names = group.slice(1).map((id) => (G.byId.has(id) ? nodeLabel(G.byId.get(id)) : id));
    li.title = names.join(", ");
    const rm = el("button", { type: "button", class: "supernode-remove" }, "remove");
    if (G.readOnly) rm.disabled = true;
    rm.addEventListener("click", async () => {
      const rest = G.supernodes.filter((_, j) => j !== i);
      setStatus("removing…", false);
      if (await saveSupernodes(rest)) {
        setStatus(`removed “${group[0]}”`, false);
        renderSupernodes();
        draw();
      }
    });
    li.appendChild(rm);
    li.addEventListener("mouseenter", () => markSupernode(group, true));
    li.addEventListener("mouseleave", () => markSupernode(group, false));
    ul.appendChild(li);
  });
}

function setupSupernodes() {
  const form = document.getElementById("supernode-form");
  const label = document.getElementById("supernode-label");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (G.readOnly) { setStatus("supernode editing is off (the server was started with --read-only)", true); return; }
    if (!G.selected.size) {
      setStatus("select nodes first: shift-click them, or turn on “select nodes” and click them", true);
      return;
    }
    const text = label.value.trim();
    const group = [text, ...G.selected];
    setStatus("saving…", false);
    if (await saveSupernodes([...G.supernodes, group])) {
      setStatus(`saved “${text}” (${group.length - 1} node(s)) to the graph file`, false);
      G.selected.clear();
      label.value = "";
      showSelection();
      renderSupernodes();
      draw();
    }
  });
  document.getElementById("supernode-clear").addEventListener("click", () => {
    G.selected.clear();
    showSelection();
    for (const e of G.nodeEls.values()) e.classList.remove("selected");
  });
}

// ------------------------------------------------------------------------------------------------ wiring
function nodeOf(target) {
  const t = target && target.closest ? target.closest("[data-node-id]") : null;
  return t ? G.byId.get(t.getAttribute("data-node-id")) : undefined;
}

function setupEvents() {
  const svg = document.getElementById("graph-svg");
  const selectMode = document.getElementById("select-mode");
  svg.addEventListener("mouseover", (ev) => {
    const n = nodeOf(ev.target);
    if (!n) return;
    highlight(n.node_id, true);
    showTooltip(n, ev.clientX, ev.clientY);
  });
  svg.addEventListener("mousemove", (ev) => { if (nodeOf(ev.target)) moveTooltip(ev.clientX, ev.clientY); });
  svg.addEventListener("mouseout", (ev) => {
    const n = nodeOf(ev.target);
    if (!n || nodeOf(ev.relatedTarget) === n) return;
    highlight(n.node_id, false);
    hideTooltip();
  });
  svg.addEventListener("focusin", (ev) => {
    const n = nodeOf(ev.target);
    if (!n) return;
    const r = ev.target.getBoundingClientRect();
    highlight(n.node_id, true);
    showTooltip(n, r.right, r.bottom);
  });
  svg.addEventListener("focusout", (ev) => {
    const n = nodeOf(ev.target);
    if (n) { highlight(n.node_id, false); hideTooltip(); }
  });
  const act = (n, select) => { if (select) toggleSelect(n.node_id); else showPanel(n.node_id); };
  svg.addEventListener("click", (ev) => {
    const n = nodeOf(ev.target);
    if (n) act(n, ev.shiftKey || selectMode.checked);
  });
  svg.addEventListener("keydown", (ev) => {
    const n = nodeOf(ev.target);
    if (n && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); act(n, ev.shiftKey || selectMode.checked); }
  });
  const slider = document.getElementById("prune-slider");
  const out = document.getElementById("prune-value");
  const onSlide = () => {
    const v = Number(slider.value);
    if (!Number.isFinite(v)) return;
    G.threshold = v;
    out.textContent = v.toFixed(3);
    draw();
    if (G.clicked && G.byId.has(G.clicked) && !isVisible(G.byId.get(G.clicked))) {
      document.getElementById("node-panel").hidden = true;
      G.clicked = null;
    }
  };
  slider.addEventListener("input", onSlide);
  slider.addEventListener("change", onSlide);
}

function init() {
  const view = document.getElementById("graph-view");
  const data = document.getElementById("graph-data");
  if (!view || !data) return;
  G.doc = JSON.parse(data.textContent);
  G.slug = view.dataset.slug;
  G.readOnly = view.dataset.readOnly === "true";
  const nf = Number(view.dataset.nFeatures);
  G.nFeatures = Number.isInteger(nf) && nf > 0 ? nf : null;
  G.nodes = G.doc.nodes.filter((n) => n && typeof n.node_id === "string");
  for (const n of G.nodes) G.byId.set(n.node_id, n);
  G.links = G.doc.links.filter((l) => l && G.byId.has(l.source) && G.byId.has(l.target));
  G.maxAbs = G.links.reduce((m, l) => (isNum(l.weight) ? Math.max(m, Math.abs(l.weight)) : m), 1e-12);
  G.supernodes = validSupernodes((G.doc.qParams || {}).supernodes);
  G.threshold = Number(document.getElementById("prune-slider").value);
  document.getElementById("prune-value").textContent = G.threshold.toFixed(3);
  setupRows();
  draw();
  setupEvents();
  setupSupernodes();
  renderSupernodes();
  view.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", init);
