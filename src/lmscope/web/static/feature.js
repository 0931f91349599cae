// lmscope atlas explorer, feature page: the human-label editor and the steering panel. No network beyond
// this server; every text from the server is inserted as text (textContent), never as HTML.
"use strict";

function detailOf(data, res) {
  if (data && typeof data.detail === "string") return data.detail;
  if (data && Array.isArray(data.detail)) {
    return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `request failed (HTTP ${res.status})`;
}

async function callJSON(url, method, body) {
  const opts = { method: method, headers: { "Content-Type": "application/json" } };
  if (body !== undefined) opts.body = JSON.stringify(body);
  const res = await fetch(url, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  return { ok: res.ok, status: res.status, data: data, message: res.ok ? "" : detailOf(data, res) };
}

function setStatus(el, text, warn) {
  el.textContent = text;
  el.className = warn ? "warn small" : "muted small";
}

function setupLabelEditor() {
  const form = document.getElementById("label-form");
  if (!form) return;
  const fid = form.dataset.feature;
  const status = document.getElementById("label-status");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = document.getElementById("label-text").value.trim();
    const author = document.getElementById("label-author").value.trim();
    if (!text) { setStatus(status, "type a label first", true); return; }
    setStatus(status, "saving…", false);
    try {
      const r = await callJSON(`/api/features/${fid}/label`, "PUT", { text: text, author: author || null });
      if (!r.ok) { setStatus(status, r.message, true); return; }
    } catch (e) { setStatus(status, "request failed: " + e, true); return; }
    window.location.reload();
  });
  const remove = document.getElementById("label-remove");
  if (remove) {
    remove.addEventListener("click", async () => {
      setStatus(status, "removing…", false);
      try {
        const r = await callJSON(`/api/features/${fid}/label`, "DELETE");
        if (!r.ok) { setStatus(status, r.message, true); return; }
      } catch (e) { setStatus(status, "request failed: " + e, true); return; }
      window.location.reload();
    });
  }
}

function fmtNum(x) { return x === null || x === undefined ? "–" : Number(x).toPrecision(3); }

function renderSteer(data) {
  for (const [id, text] of [["steer-baseline", data.baseline], ["steer-steered", data.steered]]) {
    const box = document.getElementById(id);
    box.textContent = "";
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = data.prompt;
    const g = document.createElement("span");
    g.className = "cont";
    g.textContent = text;
    box.append(p, g);
  }
  const m = data.measure;
  const rows = [  // each measurement with one line on what it means
    ["edit", data.edit, "the change made at every position: feature=mode:strength, as `lmscope steer --feature` takes it"],
    ["feature activation (baseline → steered)", `${fmtNum(m.activation_baseline)} → ${fmtNum(m.activation_steered)}`,
      "the feature's mean activation over each continuation, read back by a clean (unedited) pass: does the text " +
      "the edit produced carry the feature?"],
    ["KL at first new token", fmtNum(m.kl_first_position),
      "how far the edit moves the model's first prediction, in nats (0: not at all)"],
    ["perplexity (baseline → steered)", `${fmtNum(m.perplexity_baseline)} → ${fmtNum(m.perplexity_steered)}`,
      "of each continuation under the unedited model: the fluency cost of the edit (higher is less fluent)"],
  ];
  const table = document.getElementById("steer-measure");
  table.textContent = "";
  for (const [k, v, why] of rows) {
    const tr = table.insertRow();
    const th = document.createElement("th");
    th.textContent = k;
    tr.appendChild(th);
    tr.insertCell().textContent = v;
    const note = tr.insertCell();
    note.className = "muted small";
    note.textContent = why;
  }
}

// The feature's activation on every token of both continuations (a clean pass over prompt + continuation, as the
// read-back above), shaded against the larger of the two, so the eye sees where the steered text carries it.
async function highlightSteer(fid, data) {
  const boxes = [["steer-baseline", data.baseline], ["steer-steered", data.steered]];
  const reads = [];
  for (const [, cont] of boxes) {  // the inspector's own limit applies, and its message says so
    const r = await callJSON("/api/inspect", "POST", { text: data.prompt + cont, feature: Number(fid) });
    if (!r.ok) return "not highlighted: " + r.message;
    reads.push(r.data.tokens);
  }
  const top = Math.max(1e-9, ...reads.flat().filter((t) => !t.special).map((t) => Math.max(0, t.focus || 0)));
  boxes.forEach(([id], i) => {
    const box = document.getElementById(id);
    box.textContent = "";
    let at = 0;
    for (const t of reads[i]) {
      if (t.special) continue;
      const span = document.createElement("span");
      const a = Math.max(0, t.focus || 0);
      span.className = "tok" + (at >= data.prompt.length ? " cont" : " prompt");
      span.dataset.focus = String(t.focus || 0);
      span.style.backgroundColor = `rgba(255, 115, 0, ${Math.min(1, a / top).toFixed(3)})`;
      span.title = `#${fid} ${(t.focus || 0).toPrecision(3)}`;
      span.textContent = t.token;
      at += t.token.length;
      box.appendChild(span);
    }
  });
  return `feature #${fid} shaded on both continuations (max ${top.toPrecision(3)})`;
}

const SWEEP = [0, 0.25, 0.5, 1, 2];  // multiples of the typed strength

function renderSweep(points, mode) {
  const out = document.getElementById("sweep-out");
  out.hidden = false;
  const x = points.map((p) => p.strength);
  const series = [
    ["activation_steered", "feature activation (read back)", "y"],
    ["kl_first_position", "KL at first new token", "y2"],
    ["perplexity_steered", "perplexity", "y3"],
  ];
  const table = document.getElementById("sweep-table");
  table.textContent = "";
  const head = table.insertRow();
  for (const h of [`${mode} strength`, ...series.map((s) => s[1])]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  for (const p of points) {
    const tr = table.insertRow();
    tr.insertCell().textContent = fmtNum(p.strength);
    for (const [k] of series) tr.insertCell().textContent = fmtNum(p[k]);
  }
  const div = document.getElementById("sweep-plot");
  if (typeof Plotly === "undefined") { div.textContent = "plotly is not available; the values are in the table"; return; }
  const traces = series.map(([k, name, axis]) => ({
    x: x, y: points.map((p) => p[k]), name: name, yaxis: axis, mode: "lines+markers", type: "scatter",
  }));
  Plotly.newPlot(div, traces, {
    margin: { l: 45, r: 90, t: 10, b: 40 }, xaxis: { title: { text: `${mode} strength` }, domain: [0, 0.82] },
    yaxis: { title: { text: "activation" } },
    yaxis2: { title: { text: "KL" }, overlaying: "y", side: "right" },
    yaxis3: { title: { text: "perplexity" }, overlaying: "y", side: "right", anchor: "free", position: 0.95 },
    legend: { orientation: "h", y: -0.25 },
  }, { displayModeBar: false, responsive: true });
  div.dataset.rendered = "1";
}

// A strength as typed: a plain decimal number (no nan, no inf), within the server's limit, else why not.
const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

function parseStrength(raw, max) {
  const s = raw.trim();
  if (!s) return { error: "type a strength (a number such as 4 or -2.5)" };
  const x = NUMBER.test(s) ? Number(s) : NaN;
  if (!Number.isFinite(x) || Math.abs(x) > max) {
    return { error: `strength must be a finite number between -${max.toLocaleString("en-US")} and ` +
      `${max.toLocaleString("en-US")}, not “${s}”` };
  }
  return { value: x };
}

function setupSteering() {
  const form = document.getElementById("steer-form");
  if (!form) return;
  const fid = form.dataset.feature;
  const status = document.getElementById("steer-status");
  const mode = document.getElementById("steer-mode");
  const strength = document.getElementById("steer-strength");
  const prompt = document.getElementById("steer-prompt");
  const maxStrength = Number(strength.dataset.max || "1e6");
  const maxChars = parseInt(prompt.dataset.max || "2000", 10);
  mode.addEventListener("change", () => { strength.disabled = mode.value === "ablate"; });
  strength.addEventListener("input", () => strength.removeAttribute("aria-invalid"));
  // the request as typed, checked here as the API checks it: a strength that is not a finite number is never sent
  // (as 0 or at all); null (with the reason shown) when something is wrong
  const request = () => {
    let value = 0;
    if (mode.value !== "ablate") {
      const st = parseStrength(strength.value, maxStrength);
      if (st.error) {
        strength.setAttribute("aria-invalid", "true");
        setStatus(status, st.error, true);
        strength.focus();
        return null;
      }
      value = st.value;
    }
    if (prompt.value.length > maxChars) {
      setStatus(status, `the prompt is ${prompt.value.length.toLocaleString("en-US")} characters; steering accepts ` +
        `at most ${maxChars.toLocaleString("en-US")}: shorten it`, true);
      return null;
    }
    return {
      prompt: prompt.value,
      mode: mode.value,
      strength: value,
      max_new_tokens: parseInt(document.getElementById("steer-tokens").value, 10),
      seed: parseInt(document.getElementById("steer-seed").value || "0", 10),
    };
  };
  const sweep = document.getElementById("steer-sweep");
  if (sweep) {
    sweep.addEventListener("click", async () => {
      const body = request();
      if (body === null) return;
      if (body.mode === "ablate") {
        setStatus(status, "a sweep varies the strength: choose add or clamp", true);
        return;
      }
      sweep.disabled = true;
      const points = [];
      try {
        for (const f of SWEEP) {
          setStatus(status, `sweep: strength ${fmtNum(f * body.strength)} (${points.length + 1} of ${SWEEP.length})…`, false);
          const r = await callJSON(`/api/features/${fid}/steer`, "POST", { ...body, strength: f * body.strength });
          if (!r.ok) { setStatus(status, r.message, true); return; }
          points.push({ strength: f * body.strength, ...r.data.measure });
        }
        renderSweep(points, body.mode);
        setStatus(status, `sweep of ${points.length} strengths · seed ${body.seed}`, false);
      } catch (e) {
        setStatus(status, "request failed: " + e, true);
      } finally {
        sweep.disabled = false;
      }
    });
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = request();
    if (body === null) return;
    setStatus(status, "generating…", false);
    const go = document.getElementById("steer-go");
    go.disabled = true;
    try {
      const r = await callJSON(`/api/features/${fid}/steer`, "POST", body);
      if (!r.ok) { setStatus(status, r.message, true); return; }
      renderSteer(r.data);
      setStatus(status, `${r.data.model} · ${r.data.hook} · seed ${r.data.seed}`, false);
      const shaded = await highlightSteer(fid, r.data);
      setStatus(status, `${r.data.model} · ${r.data.hook} · seed ${r.data.seed} · ${shaded}`, false);
    } catch (e) {
      setStatus(status, "request failed: " + e, true);
    } finally {
      go.disabled = false;
    }
  });
}

// "more context": an example window opens to its whole context (the tokens around it, uncoloured: the atlas
// records the feature's activations for the window only)
function setupExpand() {
  document.querySelectorAll(".example .expand").forEach((btn) => {
    btn.addEventListener("click", () => {
      const more = btn.parentElement.querySelectorAll(".more");
      const open = btn.dataset.open === "1";
      more.forEach((m) => { m.hidden = open; });
      btn.dataset.open = open ? "0" : "1";
      btn.textContent = open ? "more context" : "less context";
    });
  });
}

document.addEventListener("DOMContentLoaded", () => { setupLabelEditor(); setupSteering(); setupExpand(); });
