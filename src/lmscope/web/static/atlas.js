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

function fmtInt(n) { return n.toLocaleString("en-US"); }

function renderDetail(tok) {
  const box = document.getElementById("inspect-detail");
  const rows = tok.features.map((f) =>
    `<tr><td><a href="/features/${f.id}">#${f.id}</a></td><td class="num">${f.act.toPrecision(3)}</td>` +
    `<td>${f.label ? esc(f.label.text) : '<span class="label none">unlabelled</span>'}</td></tr>`).join("");
  const n = tok.n_active === undefined ? tok.features.length : tok.n_active;
  const count = n > tok.features.length
    ? `showing ${tok.features.length} of ${n} active features (the strongest)`
    : `${n} active feature${n === 1 ? "" : "s"}`;
  const special = tok.special
    ? '<p class="muted small" id="inspect-special">A special token: the atlas leaves it out of its statistics, and ' +
      "the colour scale here leaves it out too.</p>"
    : "";
  box.innerHTML = `<h2>Token “${esc(showToken(tok.token))}”</h2>` + special +
    (rows ? `<p class="muted small" id="inspect-shown">${count}</p><table class="feats">${rows}</table>`
      : '<p class="muted">no feature fires on this token</p>');
}

function tooLong(n, max) {
  return `the text is ${fmtInt(n)} characters; the inspector accepts at most ${fmtInt(max)}: shorten it`;
}

function setupInspector() {
  const form = document.getElementById("inspect-form");
  if (!form) return;
  const status = document.getElementById("inspect-status");
  const area = document.getElementById("inspect-text");
  const counter = document.getElementById("inspect-count");
  const max = parseInt(form.dataset.max, 10);
  const count = () => {
    const n = area.value.length;
    if (!counter) return;
    counter.textContent = n > max ? tooLong(n, max) : `${fmtInt(n)} / ${fmtInt(max)} characters`;
    counter.className = n > max ? "warn small" : "muted small";
  };
  area.addEventListener("input", count);
  count();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = area.value;
    if (text.length > max) {  // refused here, with the limit, rather than cut or sent
      status.textContent = tooLong(text.length, max);
      status.className = "warn";
      return;
    }
    status.textContent = "running…";
    status.className = "muted";
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
    // the colour scale, like the atlas's statistics, leaves special tokens (the BOS) out
    const best = (t) => (t.features.length ? t.features[0].act : 0);
    const textTokens = data.tokens.filter((t) => !t.special);
    const top = Math.max(1e-9, ...textTokens.map(best));
    const nSpecial = data.tokens.length - textTokens.length;
    status.textContent = `${data.tokens.length} tokens · max activation ${textTokens.length ? top.toPrecision(3) : "–"}` +
      (nSpecial ? ` (${nSpecial} special token${nSpecial === 1 ? "" : "s"} greyed, left out of the scale)` : "") +
      ` · ${data.model} · ${data.hook}`;
    const box = document.getElementById("inspect-tokens");
    box.innerHTML = "";
    data.tokens.forEach((t, i) => {
      const span = document.createElement("span");
      span.className = "tok" + (t.special ? " special" : t.features.length ? " on" : "");
      span.dataset.index = String(i);
      span.dataset.nfeatures = String(t.features.length);
      span.dataset.nactive = String(t.n_active === undefined ? t.features.length : t.n_active);
      if (!t.special) span.style.backgroundColor = `rgba(255, 115, 0, ${Math.min(1, best(t) / top).toFixed(3)})`;
      const feats = t.features.slice(0, 3).map((f) => `#${f.id} ${f.act.toPrecision(3)}`).join(", ");
      span.title = t.special ? `special token (left out of the colour scale)${feats ? ": " + feats : ""}` : feats;
      span.textContent = showToken(t.token);
      span.addEventListener("click", () => {
        box.querySelectorAll(".tok.sel").forEach((s) => s.classList.remove("sel"));
        span.classList.add("sel");
        renderDetail(t);
      });
      box.appendChild(span);
    });
    const firstOn = data.tokens.findIndex((t) => !t.special && t.features.length);
    if (firstOn >= 0) box.children[firstOn].click();
  });
}

function setupFilters() {
  // empty number boxes mean "not set": leave them out of the query (the server reads an empty one the same way)
  const form = document.getElementById("filters");
  if (!form) return;
  form.addEventListener("submit", () => {
    form.querySelectorAll("input[type=number]").forEach((el) => { el.disabled = el.value.trim() === ""; });
    setTimeout(() => form.querySelectorAll("input[type=number]").forEach((el) => { el.disabled = false; }), 0);
  });
}

document.addEventListener("DOMContentLoaded", () => { drawPlots(); setupInspector(); setupFilters(); });
