// lmscope atlas explorer: the feature map (/map). Every live feature is a point, coloured by its family at the
// chosen level; the family list beside it picks a family out. Data are embedded in the page (#map-data), so the
// same page works from a static export opened from disk. No network access.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
  "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d",
  "#9edae5"];

function mapEsc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

const MAP = { data: null, level: 0, picked: null, byId: new Map(), pointOf: new Map() };

function featureUrl(id) {
  const links = MAP.data.links || {};
  if (!links.static) return "/features/" + id;
  return id < links.exported ? "features/" + id + ".html" : "features/index.html";
}

function familiesAt(level) { return MAP.data.families.filter((f) => f.level === level); }

function colourOf(fam) { return PALETTE[(fam.id - MAP.data.level_offsets[fam.level]) % PALETTE.length]; }

function pointFamily(i, level) { return MAP.data.points.families[i][level]; }

function hoverText(i) {
  const p = MAP.data.points;
  const fam = MAP.byId.get(pointFamily(i, MAP.level));
  const label = p.label[i] ? mapEsc(p.label[i]) : "<i>unlabelled</i>";
  return `#${p.id[i]} ${label}<br>family ${fam.id} (${fam.size}): ${mapEsc(fam.label)}`;
}

function styleArrays() {
  const n = MAP.data.points.id.length;
  const colours = new Array(n), opacity = new Array(n), size = new Array(n);
  for (let i = 0; i < n; i++) {
    const fid = pointFamily(i, MAP.level);
    const on = MAP.picked === null || MAP.picked === fid;
    colours[i] = colourOf(MAP.byId.get(fid));
    opacity[i] = on ? 0.85 : 0.12;
    size[i] = MAP.picked !== null && on ? 8 : 5;
  }
  return { colours, opacity, size };
}

function drawMap() {
  const div = document.getElementById("map-plot");
  const p = MAP.data.points;
  if (typeof Plotly === "undefined") {
    div.textContent = "plotly is not available, so the map cannot be drawn; the family list still works.";
    return;
  }
  const st = styleArrays();
  const text = p.id.map((_, i) => hoverText(i));
  const trace = {
    type: "scatter", mode: "markers", x: p.x, y: p.y, text: text, customdata: p.id,
    hovertemplate: "%{text}<extra></extra>",
    marker: { color: st.colours, opacity: st.opacity, size: st.size, line: { width: 0 } },
  };
  const layout = {
    margin: { l: 10, r: 10, t: 10, b: 10 }, hovermode: "closest", showlegend: false, dragmode: "pan",
    xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
  };
  Plotly.react(div, [trace], layout, { displayModeBar: true, responsive: true, scrollZoom: true });
  if (!div.dataset.bound) {
    div.on("plotly_click", (ev) => {
      if (ev.points && ev.points.length) window.location.href = featureUrl(ev.points[0].customdata);
    });
    div.dataset.bound = "1";
  }
  div.dataset.rendered = "1";
  div.dataset.level = String(MAP.level);
  div.dataset.picked = MAP.picked === null ? "" : String(MAP.picked);
}

function restyle() {
  const div = document.getElementById("map-plot");
  if (typeof Plotly === "undefined" || !div.dataset.rendered) return;
  const st = styleArrays();
  Plotly.restyle(div, { "marker.color": [st.colours], "marker.opacity": [st.opacity], "marker.size": [st.size],
    text: [MAP.data.points.id.map((_, i) => hoverText(i))] });
  div.dataset.level = String(MAP.level);
  div.dataset.picked = MAP.picked === null ? "" : String(MAP.picked);
}

function memberItems(fam) {
  const p = MAP.data.points;
  return fam.members.map((m) => {
    const i = MAP.pointOf.get(m);
    const label = i !== undefined && p.label[i] ? mapEsc(p.label[i]) : '<span class="label none">unlabelled</span>';
    return `<li><a href="${featureUrl(m)}">#${m}</a> ${label}</li>`;
  }).join("");
}

function renderList() {
  const box = document.getElementById("family-list");
  const fams = familiesAt(MAP.level);
  box.innerHTML = `<p class="muted small" id="family-count">${fams.length} families at level ${MAP.level}, ` +
    "largest first</p>" + fams.map((f) => {
    const terms = f.terms.filter((t) => t.shared).map((t) =>
      `‘${mapEsc(t.term)}’ ${t.count} of ${f.size} (${t.kind}; ${(100 * t.base).toFixed(1)}% of all features)`);
    const parent = f.parent === null ? "" :
      `<div class="small">within <a href="#family-${f.parent}" class="family-link">family ${f.parent}</a></div>`;
    const coh = f.cos_within === null ? "" :
      `<div class="muted small">mean decoder cosine ${f.cos_within.toFixed(3)}, co-firing ${f.cofire_within.toFixed(3)}</div>`;
    return `<details id="fam-${f.id}" data-family="${f.id}"><summary><span class="swatch" ` +
      `style="background:${colourOf(f)}"></span><b>${f.id}</b> <span class="num">${f.size}</span> ` +
      `<span class="family-label">${mapEsc(f.label)}</span></summary>` +
      (terms.length ? `<div class="small">shared: ${terms.join("; ")}</div>` : "") + parent + coh +
      `<ul class="members">${memberItems(f)}</ul></details>`;
  }).join("");
  for (const d of box.querySelectorAll("details")) {
    d.addEventListener("toggle", () => {
      if (d.open && MAP.picked !== Number(d.dataset.family)) pick(Number(d.dataset.family), false);
    });
  }
}

function pick(fid, scroll, note) {
  const fam = MAP.byId.get(fid);
  if (!fam) return;
  if (fam.level !== MAP.level) {
    MAP.level = fam.level;
    document.getElementById("map-level").value = String(fam.level);
    renderList();
  }
  MAP.picked = fid;
  for (const d of document.querySelectorAll("#family-list details")) {
    d.classList.toggle("picked", Number(d.dataset.family) === fid);
  }
  const el = document.getElementById("fam-" + fid);  // not "family-N", the address's #family-N: no page jump
  if (el) {
    el.open = true;
    if (scroll) {  // scroll the list, not the page: the map stays in view
      const box = document.getElementById("family-list");
      box.scrollTop += el.getBoundingClientRect().top - box.getBoundingClientRect().top;
    }
  }
  document.getElementById("map-status").textContent = `family ${fid}: ${fam.size} members` + (note || "");
  restyle();
}

function clearPick() {
  MAP.picked = null;
  for (const d of document.querySelectorAll("#family-list details.picked")) d.classList.remove("picked");
  document.getElementById("map-status").textContent = "";
  restyle();
}

function find(q) {
  q = q.trim();
  if (!q) { clearPick(); return; }
  const m = q.match(/^#?(\d+)$/);
  if (m) {
    const i = MAP.pointOf.get(Number(m[1]));
    if (i === undefined) { document.getElementById("map-status").textContent = `#${m[1]} is not on the map`; return; }
    pick(pointFamily(i, MAP.level), true, ` (holds #${m[1]})`);
    return;
  }
  const needle = q.toLowerCase();
  const hit = familiesAt(MAP.level).find((f) => f.label.toLowerCase().includes(needle)) ||
    familiesAt(MAP.level).find((f) => f.members.some((x) => {
      const i = MAP.pointOf.get(x);
      return i !== undefined && (MAP.data.points.label[i] || "").toLowerCase().includes(needle);
    }));
  if (hit) pick(hit.id, true); else document.getElementById("map-status").textContent = `no family matches “${q}”`;
}

function fromHash() {
  const m = window.location.hash.match(/^#family-(\d+)$/);
  if (m) pick(Number(m[1]), true);
}

function initMap() {
  const el = document.getElementById("map-data");
  if (!el) return;
  MAP.data = JSON.parse(el.textContent);
  for (const f of MAP.data.families) MAP.byId.set(f.id, f);
  MAP.data.points.id.forEach((id, i) => MAP.pointOf.set(id, i));
  const sel = document.getElementById("map-level");
  MAP.level = Number(sel.value);
  renderList();
  drawMap();
  sel.addEventListener("change", () => { MAP.level = Number(sel.value); MAP.picked = null; renderList(); restyle(); });
  document.getElementById("map-clear").addEventListener("click", () => {
    document.getElementById("map-find").value = "";
    clearPick();
  });
  document.getElementById("map-find").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") find(ev.target.value);
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
  document.getElementById("map-plot").dataset.ready = "1";
}

window.addEventListener("DOMContentLoaded", initMap);
