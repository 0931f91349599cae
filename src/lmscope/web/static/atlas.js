// lmscope atlas explorer: histograms (plotly, served locally) and the prompt inspector. No network access.
"use strict";

function readJSON(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function drawBars(divId, x, y, xtitle, ytitle) {
  const div = document.getElementById(divId);
  if (!div) return;
  if (typeof Plotly === "undefined") {
    div.textContent = "plotly is not available; counts: " + y.join(", ");
    return;
  }
  Plotly.newPlot(div, [{ type: "bar", x: x, y: y, marker: { color: "#e67e22" } }], {
    margin: { l: 45, r: 10, t: 10, b: 40 }, bargap: 0.05,
    xaxis: { title: { text: xtitle } }, yaxis: { title: { text: ytitle } },
  }, { displayModeBar: false, responsive: true, staticPlot: false });
  div.dataset.rendered = "1";
}

function mids(edges) {
  const out = [];
  for (let i = 0; i + 1 < edges.length; i++) out.push((edges[i] + edges[i + 1]) / 2);
  return out;
}

function drawPlots() {
  const dens = readJSON("density-data");
  if (dens) drawBars("density-plot", mids(dens.log10_edges), dens.counts, "log10 density", "features");
  const hist = readJSON("hist-data");
  if (hist) drawBars("hist-plot", mids(hist.edges), hist.counts, "activation", "tokens");
}

function esc(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showToken(t) { return t.replace(/\n/g, "↵").replace(/\t/g, "→"); }

function renderDetail(tok) {
  const box = document.getElementById("inspect-detail");
  const rows = tok.features.map((f) =>
    `<tr><td><a href="/features/${f.id}">#${f.id}</a></td><td class="num">${f.act.toPrecision(3)}</td>` +
    `<td>${f.label ? esc(f.label.text) : '<span class="label none">unlabelled</span>'}</td></tr>`).join("");
  box.innerHTML = `<h2>Token “${esc(showToken(tok.token))}”</h2>` +
    (rows ? `<table class="feats">${rows}</table>` : '<p class="muted">no feature fires on this token</p>');
}

function setupInspector() {
  const form = document.getElementById("inspect-form");
  if (!form) return;
  const status = document.getElementById("inspect-status");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = document.getElementById("inspect-text").value;
    status.textContent = "running…";
    let res;
    try {
      res = await fetch("/api/inspect", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: text }),
      });
    } catch (e) {
      status.textContent = "request failed: " + e;
      return;
    }
    const data = await res.json();
    if (!res.ok) {
      status.textContent = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      status.className = "warn";
      return;
    }
    status.className = "muted";
    status.textContent = `${data.tokens.length} tokens · ${data.model} · ${data.hook}`;
    const top = Math.max(1e-9, ...data.tokens.flatMap((t) => t.features.map((f) => f.act)));
    const box = document.getElementById("inspect-tokens");
    box.innerHTML = "";
    data.tokens.forEach((t, i) => {
      const span = document.createElement("span");
      const best = t.features.length ? t.features[0].act : 0;
      span.className = "tok" + (t.features.length ? " on" : "");
      span.dataset.index = String(i);
      span.dataset.nfeatures = String(t.features.length);
      span.style.backgroundColor = `rgba(255, 115, 0, ${Math.min(1, best / top).toFixed(3)})`;
      span.title = t.features.slice(0, 3).map((f) => `#${f.id} ${f.act.toPrecision(3)}`).join(", ");
      span.textContent = showToken(t.token);
      span.addEventListener("click", () => {
        box.querySelectorAll(".tok.sel").forEach((s) => s.classList.remove("sel"));
        span.classList.add("sel");
        renderDetail(t);
      });
      box.appendChild(span);
    });
    const firstOn = data.tokens.findIndex((t, i) => i > 0 && t.features.length);
    if (firstOn >= 0) box.children[firstOn].click();
  });
}

document.addEventListener("DOMContentLoaded", () => { drawPlots(); setupInspector(); });
