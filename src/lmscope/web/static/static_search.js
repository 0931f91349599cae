// lmscope static export: the feature list searched in the browser (window.LMSCOPE_FEATURES from index.js).
"use strict";

const SHOWN = 200;  // rows drawn at once; the count says how many match

function staticSearch() {
  const rows = window.LMSCOPE_FEATURES || [];
  const q = document.getElementById("q");
  const dead = document.getElementById("dead");
  const sort = document.getElementById("sort");
  const body = document.querySelector("#feature-table tbody");
  const count = document.getElementById("result-count");
  const more = document.getElementById("more");
  const params = new URLSearchParams(location.search);
  q.value = params.get("q") || "";
  const pct = (x) => (100 * x).toPrecision(3) + "%";
  const draw = () => {
    const text = q.value.trim().toLowerCase();
    const id = /^#?(\d+)$/.exec(text);
    let hits = rows.filter((r) => (dead.checked || !r.dead));
    if (id) hits = rows.filter((r) => r.id === Number(id[1]));
    else if (text) hits = hits.filter((r) => (r.label || "").toLowerCase().includes(text) || r.text.toLowerCase().includes(text));
    const key = sort.value;
    if (key !== "id") hits = hits.slice().sort((a, b) => (b[key] ?? -1) - (a[key] ?? -1));
    body.textContent = "";
    for (const r of hits.slice(0, SHOWN)) {
      const tr = body.insertRow();
      const a = document.createElement("a");
      a.href = `${r.id}.html`;
      a.textContent = `#${r.id}`;
      tr.insertCell().appendChild(a);
      const lab = tr.insertCell();
      lab.textContent = r.label || "unlabelled";
      if (!r.label) lab.className = "muted";
      tr.insertCell().textContent = r.dead ? "dead" : pct(r.density);
      tr.insertCell().textContent = r.max_act.toPrecision(3);
      tr.insertCell().textContent = r.text.length > 80 ? r.text.slice(0, 80) + "…" : r.text;
    }
    count.textContent = `${hits.length.toLocaleString("en-US")} matching` + (text ? ` “${q.value.trim()}”` : "");
    more.textContent = hits.length > SHOWN ? `showing the first ${SHOWN}; narrow the search to see others` : "";
  };
  for (const el of [q, dead, sort]) el.addEventListener("input", draw);
  document.getElementById("static-search").addEventListener("submit", (ev) => { ev.preventDefault(); draw(); });
  draw();
}

document.addEventListener("DOMContentLoaded", staticSearch);
