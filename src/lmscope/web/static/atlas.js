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
  if (!box) return;
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
  const featureBox = document.getElementById("inspect-feature");
  // one feature to colour by: fixed on a feature page (data-feature), typed on the inspector page (or none)
  const focusFeature = () => {
    if (form.dataset.feature !== undefined) return parseInt(form.dataset.feature, 10);
    const v = featureBox ? featureBox.value.trim() : "";
    return v === "" ? null : Number(v);
  };
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = area.value;
    if (text.length > max) {  // refused here, with the limit, rather than cut or sent
      status.textContent = tooLong(text.length, max);
      status.className = "warn";
      return;
    }
    const feature = focusFeature();
    if (feature !== null && !(Number.isInteger(feature) && feature >= 0)) {
      status.textContent = "the feature must be a whole number, 0 or more (or empty for all features)";
      status.className = "warn";
      return;
    }
    if (form.dataset.url) {  // the view lives in the address, so it can be shared
      const q = new URLSearchParams({ text: text });
      if (feature !== null) q.set("feature", String(feature));
      history.replaceState(null, "", "/inspect?" + q.toString());
    }
    status.textContent = "running…";
    status.className = "muted";
    let res;
    try {
      res = await fetch("/api/inspect", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(feature === null ? { text: text } : { text: text, feature: feature }),
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
    // the colour scale, like the atlas's statistics, leaves special tokens (the BOS) out; with one feature, each
    // token is coloured by that feature alone, against its max activation over the atlas (as the examples are)
    const single = feature !== null;
    const best = single ? (t) => Math.max(0, t.focus || 0) : (t) => (t.features.length ? t.features[0].act : 0);
    const textTokens = data.tokens.filter((t) => !t.special);
    const here = Math.max(0, ...textTokens.map(best));
    const top = Math.max(1e-9, here, single ? data.feature_max_act || 0 : 0);
    const nSpecial = data.tokens.length - textTokens.length;
    const nOn = textTokens.filter((t) => best(t) > 0).length;
    status.textContent = (single
      ? `feature #${feature} fires on ${nOn} of ${textTokens.length} tokens · max here ${here.toPrecision(3)}` +
        (data.feature_max_act ? ` (atlas max ${data.feature_max_act.toPrecision(3)})` : "")
      : `${data.tokens.length} tokens · max activation ${textTokens.length ? top.toPrecision(3) : "–"}`) +
      (nSpecial ? ` (${nSpecial} special token${nSpecial === 1 ? "" : "s"} greyed, left out of the scale)` : "") +
      ` · ${data.model} · ${data.hook}`;
    const box = document.getElementById("inspect-tokens");
    box.innerHTML = "";
    data.tokens.forEach((t, i) => {
      const span = document.createElement("span");
      span.className = "tok" + (t.special ? " special" : best(t) > 0 ? " on" : "");
      if (single) span.dataset.focus = String(t.focus === undefined || t.focus === null ? 0 : t.focus);
      span.dataset.index = String(i);
      span.dataset.nfeatures = String(t.features.length);
      span.dataset.nactive = String(t.n_active === undefined ? t.features.length : t.n_active);
      if (!t.special) span.style.backgroundColor = `rgba(255, 115, 0, ${Math.min(1, best(t) / top).toFixed(3)})`;
      const feats = single ? `#${feature} ${(t.focus || 0).toPrecision(3)}`
        : t.features.slice(0, 3).map((f) => `#${f.id} ${f.act.toPrecision(3)}`).join(", ");
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
    if (firstOn >= 0 && document.getElementById("inspect-detail")) box.children[firstOn].click();
  });
  if (form.dataset.autorun && area.value) form.requestSubmit();  // a shared view runs on load
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
