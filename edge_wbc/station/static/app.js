/* edge-wbc station page: state from server-sent events, actions through the JSON API. */
"use strict";

/* The classes, their names and the lab's formula come with the state (the one table lives in
   edge_wbc/taxonomy.py); these are only the page's own words for what is not a class. */
const NAMES = { other: "Not a leukocyte", duplicate: "Already counted", rejected: "Rejected" };
const SHORT = { unidentified: "?", other: "OTH", duplicate: "DUP", rejected: "REJ" };
const nameOf = (k) => NAMES[k] || ((ui.state && ui.state.formula && ui.state.formula.names) || {})[k] || k;
const shortOf = (k) => SHORT[k] || ((ui.state && ui.state.formula && ui.state.formula.short) || {})[k] || k;
/* What the technician may assign, the formula's rows first (keys 1-9). */
const reviewClasses = () => (ui.state && ui.state.formula && ui.state.formula.review_classes) || [];
const REASONS = { not_leukocyte: "not a leukocyte", counted_twice: "counted twice",
  unusable: "unusable image" };
const QUALITY = { out_of_focus: "Out of focus", underexposed: "Underexposed",
  overexposed: "Overexposed", no_cells: "No leukocytes", crowded: "Crowded",
  overlapping: "Overlapping cells" };

const $ = (id) => document.getElementById(id);
const css = getComputedStyle(document.documentElement);
const PALETTE = ["#b5485d", "#4d7c3a", "#8a5a2b", "#3f5f8f", "#9a4f96", "#5f7f7f", "#a36a00"];
const colour = (label) => {
  const v = css.getPropertyValue("--" + label).trim();
  if (v) return v;
  let h = 0;
  for (const ch of String(label)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
};

const ui = {
  state: null, station: null, field: null, cells: [], filter: "all", sel: null,
  view: "count", lastFieldId: null, targetWasComplete: null, connected: false,
};

/* ------------------------------------------------------------------ API */

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error("the station does not answer (is it running?)");
  }
  let data = null;
  try { data = await res.json(); } catch (e) { /* an image or empty body */ }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

let toastTimer = null;
function toast(msg, err = false) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "toast" + (err ? " err" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, err ? 6000 : 2500);
}

/* ------------------------------------------------------------------ live updates */

function connect() {
  const es = new EventSource("/api/events");
  const setConn = (ok) => {
    ui.connected = ok;
    $("conn").classList.toggle("lost", !ok);
    $("conn").title = ok ? "Connected to the station" : "Connection lost: reconnecting…";
    if (!ok) $("status-line").textContent = "Connection to the station lost — reconnecting…";
  };
  es.addEventListener("hello", (e) => {
    setConn(true);
    const s = JSON.parse(e.data);
    ui.station = s.station;
    applyState(s);
    loadField();
    if (ui.view === "review") loadCells();
  });
  es.addEventListener("differential", (e) => applyState(JSON.parse(e.data)));
  es.addEventListener("status", (e) => { ui.station = JSON.parse(e.data); renderStation(); });
  es.addEventListener("field", () => loadField());
  es.addEventListener("cell", (e) => {
    const c = JSON.parse(e.data);
    if (c.action !== "counted" && ui.view === "review") loadCells();
    if (c.action !== "counted" && ui.field) loadField();
  });
  es.addEventListener("slide", (e) => {
    const s = JSON.parse(e.data);
    if (s.action === "started" || s.action === "abandoned") {
      ui.field = null; ui.sel = null; renderField(); loadCells();
    }
  });
  es.onerror = () => setConn(false);
}

function applyState(s) {
  ui.state = s;
  if (s.station) { ui.station = s.station; }
  renderState();
  renderStation();
  window.__stateRenderedAt = performance.now();
  window.__counted = s.counted;
}

/* ------------------------------------------------------------------ rendering: state */

function fmt(x) { return (Math.round(x * 10) / 10).toFixed(1); }

function renderState() {
  const s = ui.state;
  if (!s) return;
  $("sample-id").textContent = s.sample_id;
  $("counted").textContent = s.counted;
  $("target").textContent = s.target;
  const pr = $("progress");
  pr.setAttribute("aria-valuemax", s.target);
  pr.setAttribute("aria-valuenow", s.counted);
  pr.classList.toggle("done", s.complete);
  $("progress-fill").style.width = `${Math.min(100, 100 * s.counted / s.target)}%`;
  $("ci-method").textContent = "95 % CI · " + (s.ci_method === "wilson" ? "Wilson" : "Clopper–Pearson");

  $("formula-name").textContent = s.formula ? s.formula.name : "";
  const fl = $("flags");
  fl.hidden = !(s.flags && s.flags.length);
  fl.innerHTML = (s.flags || []).map((f) => `<div class="flag" data-flag="${f.name}">⚑ ${f.text}</div>`).join("");
  const body = $("formula-body");
  body.textContent = "";
  let sep = false;
  for (const r of s.classes) {
    const tr = document.createElement("tr");
    tr.dataset.label = r.label;
    tr.dataset.kind = r.kind;
    const col = colour(r.label);
    if (r.kind !== "counted") {
      // NRBC per 100 leukocytes and count-only rows: outside the 100 %, after the total.
      if (!sep) {
        const h = document.createElement("tr");
        h.className = "also";
        h.innerHTML = `<td colspan="4">Also reported (not counted)</td>`;
        body.appendChild(h);
        sep = true;
      }
      tr.className = "extra";
      tr.innerHTML = `
      <td><span class="name"><span class="sw" style="background:${col}"></span>${r.name || nameOf(r.label)}</span></td>
      <td class="n">${r.count}</td>
      <td class="n pct">${r.kind === "per_100_wbc" ? (s.counted ? fmt(r.percent) : "–") : ""}</td>
      <td class="ci muted">${r.kind === "per_100_wbc" ? "per 100 leukocytes" : "count only"}</td>`;
      body.appendChild(tr);
      continue;
    }
    if (r.label === "unidentified") tr.className = "unid" + (r.count ? " has" : "");
    // A leukocyte class the lab's formula has no row for still counts: say so on its row.
    const note = r.configured === false ? ` <span class="muted" title="not a row of the lab's formula: assign a formula class in review">*</span>` : "";
    tr.innerHTML = `
      <td><span class="name"><span class="sw" style="background:${col}"></span>${r.name || nameOf(r.label)}${note}</span></td>
      <td class="n">${r.count}</td>
      <td class="n pct">${s.counted ? fmt(r.percent) : "–"}</td>
      <td class="ci"><div class="cibar"><div class="p" style="width:${r.percent}%;background:${col}"></div>
        ${s.counted ? `<div class="w" style="left:${r.ci_low}%;width:${Math.max(0.6, r.ci_high - r.ci_low)}%"></div>` : ""}</div>
        <div class="citxt">${s.counted ? `${fmt(r.ci_low)} – ${fmt(r.ci_high)} %` : "&nbsp;"}</div></td>`;
    body.appendChild(tr);
  }
  $("total-n").textContent = s.counted;
  const ex = s.excluded;
  const parts = [];
  if (ex.rejected) parts.push(`${ex.rejected} rejected`);
  if (ex.duplicate) parts.push(`${ex.duplicate} already counted`);
  if (ex.other) parts.push(`${ex.other} not leukocytes`);
  $("excluded").textContent = `${s.fields} field${s.fields === 1 ? "" : "s"}` +
    (parts.length ? " · not counted: " + parts.join(", ") : "");

  const toReview = s.unidentified;
  $("review-badge").hidden = !toReview;
  $("review-badge").textContent = toReview;
  renderBanner();
  renderCapture();
  if (ui.targetWasComplete === false && s.complete && !s.finalised) targetReachedSignal();
  ui.targetWasComplete = s.complete;
}

function targetReachedSignal() {
  const b = $("banner");
  b.classList.remove("pulse");
  void b.offsetWidth;
  b.classList.add("pulse");
  try {
    const ctx = new (window.AudioContext || window.webkitAudioContext)();
    [0, 0.22].forEach((t, i) => {
      const o = ctx.createOscillator(), g = ctx.createGain();
      o.frequency.value = i ? 1175 : 880;
      g.gain.setValueAtTime(0.0001, ctx.currentTime + t);
      g.gain.exponentialRampToValueAtTime(0.25, ctx.currentTime + t + 0.02);
      g.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + t + 0.2);
      o.connect(g).connect(ctx.destination);
      o.start(ctx.currentTime + t); o.stop(ctx.currentTime + t + 0.22);
    });
  } catch (e) { /* no audio device: the banner is the signal */ }
}

function renderBanner() {
  const s = ui.state, b = $("banner"), acts = $("banner-actions");
  acts.textContent = "";
  const add = (label, fn, solid = false, href = null) => {
    const el = document.createElement(href ? "a" : "button");
    el.textContent = label;
    if (solid) el.className = "solid";
    if (href) { el.href = href; el.target = "_blank"; } else el.onclick = fn;
    acts.appendChild(el);
    return el;
  };
  if (s.finalised) {
    b.hidden = false;
    b.className = "banner final";
    $("banner-title").textContent = `Slide ${s.sample_id} finalised`;
    $("banner-sub").textContent = `${s.counted} cells · report written ${s.slide.finalised_at ? new Date(s.slide.finalised_at).toLocaleTimeString() : ""}`;
    add("Open report", null, true, "/api/slide/report.html");
    add("JSON", null, false, "/api/slide/report.json");
    add("CSV", null, false, "/api/slide/report.csv");
    add("New slide", () => openSlideDialog(true)).id = "banner-new";
  } else if (s.complete) {
    b.hidden = false;
    b.className = "banner" + (b.classList.contains("pulse") ? " pulse" : "");
    $("banner-title").textContent = `Target reached — ${s.counted} of ${s.target} cells`;
    $("banner-sub").textContent = s.unidentified
      ? `Resolve ${s.unidentified} unidentified cell${s.unidentified > 1 ? "s" : ""} in Review, then finalise.`
      : "Review the cells if needed, then finalise the slide or extend the target.";
    add("Review", () => setView("review"));
    add(`Extend to ${s.target < 200 ? 200 : s.target + 100}`,
      () => setTarget(s.target < 200 ? 200 : s.target + 100));
    const f = add("Finalise", finalise, true);
    f.id = "banner-finalise";
    f.disabled = !s.can_finalise;
  } else {
    b.hidden = true;
  }
}

function renderCapture() {
  const s = ui.state, st = ui.station || {}, btn = $("capture");
  const waiting = (st.queue || 0) + (st.busy ? 1 : 0);
  btn.classList.toggle("busy", waiting > 0);
  let label = "Capture";
  let disabled = false;
  if (s && s.finalised) { label = "Finalised"; disabled = true; }
  else if (s && s.complete) { label = "Target reached"; disabled = true; }
  else if (waiting > 0) label = waiting > 1 ? `Analysing · ${waiting}` : "Analysing…";
  if (st.queue >= st.queue_max) disabled = true;
  btn.disabled = disabled || !ui.connected;
  $("capture-label").textContent = label;
}

function renderStation() {
  const st = ui.station;
  if (!st) return;
  const cam = st.camera || {};
  $("cam-dot").className = "dot " + (cam.ok ? "ok" : "bad");
  $("cam-name").textContent = cam.name || "camera";
  $("cam-name").parentElement.title = cam.message || "";
  const bits = [];
  if (cam.ok === false) bits.push("Camera: " + cam.message);
  else if (cam.message && cam.message !== "live") bits.push(cam.message);
  if (st.accelerator) bits.push(st.accelerator.toUpperCase());
  if (st.latency_ms_median != null) bits.push(`${Math.round(st.latency_ms_median)} ms/field`);
  if (st.disk_free_mb != null && st.disk_free_mb < 500) bits.push(`disk ${st.disk_free_mb} MB free`);
  const mq = st.mqtt;  // only when a broker is configured; counting never depends on it
  if (mq) {
    const why = { auth_failed: "login refused", unreachable: "broker unreachable",
                  tls_error: "TLS error", tls_mismatch: "TLS/plain port mismatch",
                  refused: "refused" }[mq.state];
    bits.push(mq.connected ? "MQTT ✓" : `MQTT: ${why || "connecting"}`);
    if (mq.outbox && mq.outbox.full) bits.push("MQTT outbox full");
  }
  const lis = st.lis;  // only when [lis] delivery is on (docs/lis.md)
  const lisWhy = [];
  if (lis) {
    const n = (k) => `${k} report${k === 1 ? "" : "s"}`;
    // A report the LIS has not taken goes first: on a narrow screen the line is cut at the end.
    if (lis.state === "unreachable") bits.unshift(`LIS unreachable · ${n(lis.waiting)} waiting`);
    else if (lis.waiting) bits.push(`LIS: sending ${n(lis.waiting)}`);
    if (lis.held) bits.unshift(`LIS refused ${n(lis.held)}`);
    if (!lis.held && !lis.waiting) bits.push("LIS ✓");
    for (const p of lis.problems || []) {
      lisWhy.push(`${p.held ? "Refused" : "Not sent"}: sample ${p.sample_id} — ${p.error}`);
    }
  }
  if (ui.connected) {
    $("status-line").textContent = bits.join(" · ");
    $("status-line").title = [(mq && mq.warning) || "", ...lisWhy].filter(Boolean).join("\n");
  }
  const err = st.last_error;
  const al = $("alert");
  if (err) {
    al.hidden = false;
    al.className = "alert" + (err.kind === "busy" ? " warn" : "");
    $("alert-text").textContent = err.message;
  } else if (cam.ok === false) {
    al.hidden = false;
    al.className = "alert";
    $("alert-text").textContent = "Camera problem: " + cam.message;
  } else {
    al.hidden = true;
  }
  renderCapture();
}

/* ------------------------------------------------------------------ rendering: field */

let fieldReq = 0;
async function loadField() {
  // Events can trigger overlapping loads; only the newest request may draw, or an answer that
  // arrives late would show a cell's label from before its review.
  const mine = ++fieldReq;
  let f = null;
  try { f = await api("/api/fields/last"); } catch (e) { f = null; }
  if (mine !== fieldReq) return;
  ui.field = f;
  renderField();
}

function renderField() {
  const f = ui.field, img = $("field-img"), svg = $("field-svg");
  $("field-empty").hidden = !!f;
  svg.textContent = "";
  $("qchips").textContent = "";
  if (!f) { img.removeAttribute("src"); $("field-no").textContent = ""; return; }
  if (ui.lastFieldId !== f.id) {
    img.onload = () => { window.__fieldRenderedAt = performance.now(); };
    img.src = `/api/fields/${f.id}.jpg`;
    ui.lastFieldId = f.id;
  }
  $("field-no").textContent = `#${f.seq} · ${f.n_counted} counted`;
  svg.setAttribute("viewBox", `0 0 ${f.width} ${f.height}`);
  const ns = "http://www.w3.org/2000/svg";
  if (f.overlap_rect) {
    const [x0, y0, x1, y1] = f.overlap_rect;
    const r = document.createElementNS(ns, "rect");
    Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, class: "overlap" })
      .forEach(([k, v]) => r.setAttribute(k, v));
    svg.appendChild(r);
  }
  for (const c of f.cells) {
    const [x0, y0, x1, y1] = c.bbox;
    const g = document.createElementNS(ns, "g");
    const label = c.effective_label || c.group;
    const col = colour(label);
    const r = document.createElementNS(ns, "rect");
    Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: col, rx: 6 })
      .forEach(([k, v]) => r.setAttribute(k, v));
    if (!c.counted_as) r.setAttribute("class", "dup");
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x0 + 2);
    t.setAttribute("y", y0 > 20 ? y0 - 6 : y1 + 17);
    t.setAttribute("fill", col === "#888" ? "#fff" : col);
    t.style.fill = "#fff";
    t.textContent = `${nameOf(label)}${c.reviewed_label ? " ✓" : ""} ${Math.round(c.score * 100)}%`;
    g.appendChild(r);
    g.appendChild(t);
    g.addEventListener("click", () => { ui.sel = c.id; ui.filter = "all"; setView("review"); });
    svg.appendChild(g);
  }
  const q = (f.quality && f.quality.flags) || [];
  for (const flag of q) chip(QUALITY[flag] || flag.replace(/_/g, " "));
  if (f.overlap_field) {
    chip(`Overlaps previous field ${Math.round(f.overlap_fraction * 100)} %` +
      (f.n_duplicate ? ` · ${f.n_duplicate} not recounted` : ""), f.flagged_duplicate ? "" : "info");
  }
  if (!q.length && !f.overlap_field) chip("Quality OK", "ok");
}

function chip(text, cls = "") {
  const el = document.createElement("span");
  el.className = "chip " + cls;
  el.textContent = text;
  $("qchips").appendChild(el);
}

/* ------------------------------------------------------------------ review */

let cellsReq = 0;
async function loadCells() {
  const mine = ++cellsReq;
  let d;
  try {
    d = await api("/api/cells");
  } catch (e) {
    toast(e.message, true);
    return;
  }
  if (mine !== cellsReq) return;
  ui.cells = d.cells;
  renderGallery();
}

function groups() {
  const rows = ui.state ? ui.state.classes.map((r) => r.label).filter((k) => k !== "unidentified") : [];
  return ["unidentified", ...rows, "other", "duplicate", "rejected"];
}

function renderGallery() {
  const counts = {};
  for (const c of ui.cells) counts[c.group] = (counts[c.group] || 0) + 1;
  const fl = $("filters");
  fl.textContent = "";
  const mk = (key, label) => {
    const b = document.createElement("button");
    b.className = ui.filter === key ? "active" : "";
    b.dataset.filter = key;
    const n = key === "all" ? ui.cells.length : (counts[key] || 0);
    b.innerHTML = (key !== "all" ? `<span class="sw" style="background:${colour(key)}"></span>` : "") +
      `${label} <span class="cnt">${n}</span>`;
    b.onclick = () => { ui.filter = key; renderGallery(); };
    fl.appendChild(b);
  };
  mk("all", "All");
  const configured = ui.state ? ui.state.formula.rows.filter((r) => r.kind === "counted").map((r) => r.key) : [];
  for (const c of ui.cells) if (!groups().includes(c.group)) counts[c.group] = counts[c.group] || 0;
  const all = [...groups(), ...Object.keys(counts).filter((g) => !groups().includes(g))];
  for (const g of all) if (counts[g] || configured.includes(g) || g === "unidentified") mk(g, nameOf(g));

  const gal = $("gallery");
  gal.textContent = "";
  const shown = ui.cells.filter((c) => ui.filter === "all" || c.group === ui.filter);
  // Keep the selection inside the list on screen (after a filter change or a review).
  if (!shown.some((c) => c.id === ui.sel)) ui.sel = shown.length ? shown[0].id : null;
  if (!shown.length) {
    gal.innerHTML = `<div class="gal-empty">No cells here.</div>`;
  }
  let lastGroup = null;
  for (const c of shown) {
    if (ui.filter === "all" && c.group !== lastGroup) {
      const h = document.createElement("div");
      h.className = "gsec";
      h.innerHTML = `<span class="sw" style="background:${colour(c.group)}"></span>${nameOf(c.group)} · ${counts[c.group]}` +
        `<span class="muted">· least certain first</span>`;
      gal.appendChild(h);
      lastGroup = c.group;
    }
    const b = document.createElement("button");
    b.className = "cell" + (c.id === ui.sel ? " sel" : "") + (c.counted_as ? "" : " excl");
    b.dataset.id = c.id;
    const col = colour(c.group);
    b.innerHTML = `<img loading="lazy" src="/api/cells/${c.id}.jpg" alt="">` +
      `<span class="lab" style="background:${col}"><span>${shortOf(c.effective_label || c.group)}</span>` +
      `<span class="sc">${Math.round(c.score * 100)}%</span></span>` +
      (c.reviewed_label ? `<span class="rv" title="reviewed">✓ ${shortOf(c.label)}→${shortOf(c.reviewed_label)}</span>` : "");
    b.onclick = () => select(c.id);
    gal.appendChild(b);
  }
  renderInspector();
  const selEl = gal.querySelector(".cell.sel");
  if (selEl) selEl.scrollIntoView({ block: "nearest" });
}

function select(id) {
  ui.sel = id;
  document.querySelectorAll(".cell").forEach((el) => el.classList.toggle("sel", el.dataset.id === id));
  renderInspector();
}

function selected() { return ui.cells.find((c) => c.id === ui.sel) || null; }

function topClass(c) {
  const p = c.probs || {};
  return reviewClasses().reduce((a, b) => (p[b] || 0) > (p[a] || 0) ? b : a, reviewClasses()[0]);
}

function renderInspector() {
  const c = selected(), box = $("inspector");
  box.hidden = !c;
  if (!c) return;
  $("insp-img").src = `/api/cells/${c.id}.jpg`;
  const now = c.counted_as ? nameOf(c.effective_label) : (c.reviewed_label === "rejected"
    ? `Rejected (${REASONS[c.review_reason] || c.review_reason})`
    : (c.effective_label ? nameOf(c.effective_label) : nameOf(c.group)) + " — not counted");
  $("insp-title").textContent = now;
  $("insp-sub").textContent = `Machine: ${nameOf(c.label)} ${Math.round(c.score * 100)} %` +
    (c.reviewed_label ? " · reviewed" : "") + ` · ${c.id}`;
  const probs = Object.entries(c.probs || {}).sort((a, b) => b[1] - a[1]).slice(0, 5);
  $("insp-probs").innerHTML = probs.map(([k, v]) => `<span>${shortOf(k)} ${Math.round(v * 100)}</span>`).join("");
  const acts = $("insp-actions");
  acts.textContent = "";
  const choices = reviewClasses();
  const nKeys = Math.min(9, ui.state.formula.rows.filter((r) => r.key !== "unidentified").length);
  choices.slice(0, nKeys).forEach((k, i) => {
    const b = document.createElement("button");
    b.innerHTML = `<span class="sw" style="background:${colour(k)}"></span>${shortOf(k)} <kbd>${i + 1}</kbd>`;
    b.title = `Count as ${nameOf(k)} (${i + 1})`;
    b.dataset.action = k;
    if (c.effective_label === k) b.classList.add("cur");
    // For an unidentified cell, point at the classifier's best guess (the choice stays manual).
    else if (c.group === "unidentified" && k === topClass(c)) b.classList.add("sugg");
    b.onclick = () => review(c.id, k);
    acts.appendChild(b);
  });
  // Every other class of the table (blast, plasma cell, smudge cell...): a technician's call.
  const more = document.createElement("select");
  more.id = "insp-more";
  more.dataset.action = "more";
  more.innerHTML = `<option value="">Other class…</option>` + choices.slice(nKeys)
    .map((k) => `<option value="${k}"${c.effective_label === k && c.reviewed_label ? " selected" : ""}>${nameOf(k)}</option>`).join("");
  more.onchange = () => { if (more.value) review(c.id, more.value); };
  acts.appendChild(more);
  const rej = document.createElement("button");
  rej.className = "rej";
  rej.dataset.action = "reject";
  rej.innerHTML = `Reject <kbd>X</kbd>`;
  rej.onclick = () => rejectDialog(c.id);
  acts.appendChild(rej);
  const undo = document.createElement("button");
  undo.dataset.action = "restore";
  undo.innerHTML = `Undo <kbd>U</kbd>`;
  undo.disabled = !c.reviewed_label;
  undo.onclick = () => review(c.id, null);
  acts.appendChild(undo);
}

window.__reviewsPending = 0;

async function review(id, label, reason) {
  if (ui.state && ui.state.finalised) { toast("The slide is finalised: reviews are closed.", true); return; }
  const filter = ui.filter;
  const listed = (f) => ui.cells.filter((c) => f === "all" || c.group === f);
  const before = listed(filter);
  const i = before.findIndex((c) => c.id === id);
  const nextId = (before[i + 1] || before[i - 1] || {}).id;
  window.__reviewsPending += 1;
  try {
    await api(`/api/cells/${id}/review`, { label, reason });
    toast(label === null ? "Machine label restored" : label === "rejected"
      ? "Cell rejected" : `Now ${nameOf(label)}`);
    await loadCells();
    // Keep the technician moving: when the cell left the list on screen, the next one gets the
    // focus. If the list was changed meanwhile, the technician's new choice stands.
    if (ui.filter === filter) {
      const now = listed(filter);
      if (now.some((c) => c.id === id)) select(id);
      else if (nextId && now.some((c) => c.id === nextId)) select(nextId);
    }
  } catch (e) {
    toast(e.message, true);
  } finally {
    window.__reviewsPending -= 1;
  }
}

function rejectDialog(id) {
  const dlg = $("dlg-reject");
  dlg.returnValue = "";
  dlg.onclose = () => { if (dlg.returnValue) review(id, "rejected", dlg.returnValue); };
  dlg.showModal();
}

/* ------------------------------------------------------------------ actions */

async function capture() {
  const btn = $("capture");
  if (btn.disabled) {
    if (ui.state && ui.state.complete && !ui.state.finalised) toast("Target reached: finalise or extend the target.", true);
    return;
  }
  btn.classList.add("busy");
  window.__captureSentAt = performance.now();
  try {
    await api("/api/capture", { trigger: "button" });
  } catch (e) {
    toast(e.message, true);
    renderCapture();
  }
}

async function setTarget(t) {
  try {
    await api("/api/slide/target", { target: Number(t) });
    toast(`Target set to ${t} cells`);
    return true;
  } catch (e) {
    toast(e.message, true);
    $("dlg-err").textContent = e.message;
    return false;
  }
}

async function finalise() {
  try {
    await api("/api/slide/finalise", {});
    toast("Slide finalised: report written");
    if ($("dlg-slide").open) $("dlg-slide").close();
    setView("count");
  } catch (e) {
    toast(e.message, true);
    $("dlg-err").textContent = e.message;
  }
}

function openSlideDialog(focusNew = false) {
  const s = ui.state;
  if (!s) return;
  $("dlg-err").textContent = "";
  $("dlg-cur").innerHTML = `Current slide <b></b> · ${s.counted}/${s.target} cells · ${s.slide.status}`;
  $("dlg-cur").querySelector("b").textContent = s.sample_id;
  $("btn-finalise").disabled = !s.can_finalise;
  $("finalise-why").textContent = s.finalised ? "Already finalised." :
    (s.finalise_blockers.length ? "Not yet: " + s.finalise_blockers.join("; ") + "." : "Ready to finalise.");
  const links = $("report-links");
  links.textContent = "";
  if (s.finalised) {
    for (const [name, label] of [["report.html", "Report (print)"], ["report.json", "JSON"],
      ["report.csv", "CSV"], ["cells.csv", "Cells CSV"]]) {
      const a = document.createElement("a");
      a.href = `/api/slide/${name}` + (name.endsWith(".html") ? "" : "?download=1");
      a.textContent = label;
      if (name.endsWith(".html")) a.target = "_blank"; else a.download = "";
      links.appendChild(a);
    }
  }
  $("target-seg").querySelectorAll("button[data-t]").forEach((b) => { b.disabled = s.finalised; });
  $("target-apply").disabled = s.finalised;
  $("abandon-row").hidden = !(s.slide.status === "open" && s.cells_detected > 0);
  $("new-abandon").checked = false;
  $("new-sample").value = "";
  $("dlg-slide").showModal();
  if (focusNew) $("new-sample").focus();
}

async function newSlide() {
  const sel = $("new-target").value;
  const target = sel === "custom" ? Number($("target-custom").value) : Number(sel);
  try {
    await api("/api/slide/new", { sample_id: $("new-sample").value.trim(), target,
      abandon: $("new-abandon").checked });
    $("dlg-slide").close();
    toast("New slide started");
    setView("count");
  } catch (e) {
    $("dlg-err").textContent = e.message;
  }
}

function setView(v) {
  ui.view = v;
  $("view-count").hidden = v !== "count";
  $("view-review").hidden = v !== "review";
  $("tab-count").classList.toggle("active", v === "count");
  $("tab-review").classList.toggle("active", v === "review");
  if (v === "review") loadCells();
}

/* ------------------------------------------------------------------ live preview */

function startPreview() {
  const img = $("live-img");
  img.onerror = () => {
    $("nolive").hidden = false;
    setTimeout(() => { img.src = "/api/preview.mjpg?t=" + Date.now(); }, 3000);
  };
  img.onload = () => { $("nolive").hidden = true; };
  img.src = "/api/preview.mjpg";
  // Tap the inset to see the live view large while positioning the stage; tap again to return.
  $("live").onclick = () => $("field").classList.toggle("live-big");
}

/* ------------------------------------------------------------------ wiring */

function typing(e) {
  const t = e.target;
  return t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA");
}

document.addEventListener("keydown", (e) => {
  if (typing(e) || document.querySelector("dialog[open]")) return;
  if (e.code === "Space") { e.preventDefault(); capture(); return; }
  if (ui.view !== "review") {
    if (e.key === "r" || e.key === "R") setView("review");
    return;
  }
  const c = selected();
  if (e.key === "Escape") { setView("count"); return; }
  if (!c) return;
  const idx = "123456789".indexOf(e.key);
  const nKeys = Math.min(9, ui.state.formula.rows.filter((r) => r.key !== "unidentified").length);
  if (idx >= 0 && idx < nKeys) { review(c.id, reviewClasses()[idx]); return; }
  if (e.key === "x" || e.key === "X" || e.key === "Delete") { rejectDialog(c.id); return; }
  if (e.key === "u" || e.key === "U") { review(c.id, null); return; }
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    const shown = [...document.querySelectorAll(".cell")];
    const i = shown.findIndex((el) => el.dataset.id === ui.sel);
    const n = shown[Math.max(0, Math.min(shown.length - 1, i + (e.key === "ArrowRight" ? 1 : -1)))];
    if (n) { select(n.dataset.id); n.scrollIntoView({ block: "nearest" }); }
    e.preventDefault();
  }
});

$("capture").addEventListener("click", capture);
$("tab-count").onclick = () => setView("count");
$("tab-review").onclick = () => setView("review");
$("tab-slide").onclick = () => openSlideDialog(false);
$("btn-finalise").onclick = finalise;
$("btn-new").onclick = newSlide;
$("target-seg").querySelectorAll("button[data-t]").forEach((b) => {
  b.onclick = async () => { if (await setTarget(b.dataset.t)) $("dlg-slide").close(); };
});
$("target-apply").onclick = async () => {
  const v = $("target-custom").value;
  if (!v) { $("dlg-err").textContent = "Type a number of cells first."; return; }
  if (await setTarget(v)) $("dlg-slide").close();
};
$("new-target").onchange = () => {
  if ($("new-target").value === "custom") $("target-custom").focus();
};
$("new-sample").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); newSlide(); } });
$("sample").onclick = () => {
  if (!ui.state || ui.state.slide.status !== "open") { openSlideDialog(true); return; }
  $("sample-input").value = ui.state.sample_id.startsWith("unnamed-") ? "" : ui.state.sample_id;
  $("sample-err").textContent = "";
  $("dlg-sample").showModal();
  $("sample-input").focus();
};
$("sample-save").onclick = async (e) => {
  e.preventDefault();
  try {
    await api("/api/slide/sample", { sample_id: $("sample-input").value });
    $("dlg-sample").close();
  } catch (err) {
    $("sample-err").textContent = err.message;
  }
};
$("alert-close").onclick = async () => {
  $("alert").hidden = true;
  try { await api("/api/errors/clear", {}); } catch (e) { /* shown again on next status */ }
};

setInterval(() => {
  const d = new Date();
  $("clock").textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}, 1000);

connect();
startPreview();
