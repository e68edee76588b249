/* edge-wbc station page: state from server-sent events, actions through the JSON API. */
"use strict";

/* The classes, their names and the lab's formula come with the state (the one table lives in
   edge_wbc/taxonomy.py); these are only the page's own words for what is not a class. */
const NAMES = { other: "Not a leukocyte", duplicate: "Already counted", rejected: "Rejected",
  discarded: "Discarded field" };
const SHORT = { unidentified: "?", other: "OTH", duplicate: "DUP", rejected: "REJ", discarded: "DISC" };
const nameOf = (k) => NAMES[k] || ((ui.state && ui.state.formula && ui.state.formula.names) || {})[k] || k;
const shortOf = (k) => SHORT[k] || ((ui.state && ui.state.formula && ui.state.formula.short) || {})[k] || k;
/* What the technician may assign, the formula's rows first (keys 1-9). */
const reviewClasses = () => (ui.state && ui.state.formula && ui.state.formula.review_classes) || [];
const REASONS = { not_leukocyte: "not a leukocyte", counted_twice: "counted twice",
  unusable: "unusable image", added_in_error: "added by mistake" };
const DISCARDS = { duplicate: "duplicate field", bad_area: "bad smear area", unusable: "unusable image" };
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
  /* Cells this page added by key, newest last: U on the count view takes the last one back. */
  added: [],
  /* The slide the Slide… dialog and the sample-ID dialog were opened for. */
  dialogSlide: null, sampleSlide: null,
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
    applyLimits(s.limits);
    applyState(s);
    // A slide without a field has nothing to fetch (asking would log a 404 in the console).
    if (s.fields) loadField(); else { ui.field = null; renderField(); }
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
      ui.field = null; ui.sel = null; ui.added = []; renderField(); loadCells();
    }
    if (s.action === "field_discarded" || s.action === "field_restored") {
      if (ui.field) loadField();
      if (ui.view === "review") loadCells();
    }
  });
  es.onerror = () => setConn(false);
}

// The station's own bounds (edge_wbc/inputs.py), so the page never disagrees with them.
function applyLimits(lim) {
  if (!lim) return;
  $("target-custom").max = lim.target_max;
  for (const id of ["new-sample", "sample-input"]) $(id).maxLength = lim.sample_id_max_chars;
  for (const id of ["new-operator", "notes-operator", "notes-signer"]) $(id).maxLength = lim.name_max_chars;
  for (const id of ["notes-comment", "comment-text"]) $(id).maxLength = lim.comment_max_chars;
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
        h.innerHTML = `<td colspan="5">Also reported (not counted)</td>`;
        body.appendChild(h);
        sep = true;
      }
      tr.className = "extra";
      tr.dataset.add = addClassOf(r);
      tr.innerHTML = `
      <td><span class="name"><span class="sw" style="background:${col}"></span>${r.name || nameOf(r.label)}</span></td>
      <td class="n">${r.count}</td>
      <td class="n pct">${r.kind === "per_100_wbc" ? (s.counted ? fmt(r.percent) : "–") : ""}</td>
      <td class="ci muted">${r.kind === "per_100_wbc" ? "per 100 leukocytes" : "count only"}</td>`;
      body.appendChild(tr);
      continue;
    }
    if (r.label === "unidentified") tr.className = "unid" + (r.count ? " has" : "");
    else tr.dataset.add = addClassOf(r);
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
  // The shares of the rows add up to 100 % only once there is something to share.
  $("total-pct").textContent = s.counted ? "100" : "–";
  body.querySelectorAll("tr.unid").forEach((tr) => tr.appendChild(document.createElement("td")));
  body.querySelectorAll("tr[data-add]").forEach((tr) => {
    const cls = tr.dataset.add, k = keyOf(cls);
    const b = document.createElement("button");
    b.className = "add";
    b.dataset.add = cls;
    b.title = `Add a ${nameOf(cls)} the camera missed` + (k ? ` (key ${k})` : "");
    b.innerHTML = "+" + (k ? `<kbd>${k}</kbd>` : "");
    b.disabled = s.finalised || !s.fields;
    b.onclick = () => addCell(cls);
    const td = document.createElement("td");
    td.className = "addc";
    td.appendChild(b);
    tr.appendChild(td);
  });
  const ex = s.excluded;
  const parts = [];
  if (ex.rejected) parts.push(`${ex.rejected} rejected`);
  if (ex.duplicate) parts.push(`${ex.duplicate} already counted`);
  if (ex.other) parts.push(`${ex.other} not leukocytes`);
  if (s.fields_discarded) parts.push(`${s.fields_discarded} field${s.fields_discarded > 1 ? "s" : ""} discarded`);
  $("excluded").textContent = `${s.fields} field${s.fields === 1 ? "" : "s"}` +
    (s.manual ? ` · ${s.manual} added by hand` : "") + (parts.length ? " · not counted: " + parts.join(", ") : "");

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
    const other = s.finalise_blockers.filter((x) => !/unidentified/.test(x));
    $("banner-sub").textContent = s.unidentified
      ? `Resolve ${s.unidentified} unidentified cell${s.unidentified > 1 ? "s" : ""} in Review, then finalise.`
      : (other.length ? `Before finalising: ${other.join("; ")} (Slide…).`
        : "Review the cells if needed, then finalise the slide or extend the target.");
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
  $("tab-lab").hidden = !(st.adaptable || st.measurable);
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
  $("field-discarded").hidden = !(f && f.discarded);
  $("field-discard").hidden = !f || !!f.discarded || !ui.state || ui.state.finalised;
  if (f && f.discarded) $("field-discarded-why").textContent = `(${DISCARDS[f.discarded] || f.discarded}): its cells do not count.`;
  $("field").classList.toggle("is-discarded", !!(f && f.discarded));
  if (!f) { img.removeAttribute("src"); $("field-no").textContent = ""; ui.lastFieldId = null; placeLive(); return; }
  if (ui.lastFieldId !== f.id) {
    img.onload = () => { window.__fieldRenderedAt = performance.now(); placeLive(); };
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
    if (c.manual) continue;  // added by hand: no box in the image
    const g = document.createElementNS(ns, "g");
    g.dataset.id = c.id;
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
  placeLive();
}

/* The live inset sits in a corner of the field where no cell of the last field is (its box and
   label); when every corner holds one, it folds into a LIVE button in the panel's title. */
function placeLive() {
  const field = $("field"), live = $("live"), f = ui.field;
  live.classList.remove("tl", "tr", "bl", "br", "min");
  $("live-show").hidden = true;
  if (field.classList.contains("live-big")) return;
  const W = field.clientWidth, H = field.clientHeight;
  const lw = 0.28 * W, lh = lw * 3 / 4, m = 7;
  const boxes = [];
  if (f && f.width && W) {
    const k = Math.min(W / f.width, H / f.height);
    const ox = (W - f.width * k) / 2, oy = (H - f.height * k) / 2;
    for (const c of f.cells) {
      if (c.manual) continue;
      const [x0, y0, x1, y1] = c.bbox;
      boxes.push([ox + x0 * k - 2, oy + y0 * k - 24, ox + x1 * k + 2, oy + y1 * k + 22]);
    }
  }
  const corners = { br: [W - m - lw, H - m - lh], tr: [W - m - lw, m], bl: [m, H - m - lh], tl: [m, m] };
  for (const [name, [x, y]] of Object.entries(corners)) {
    if (!boxes.some((b) => b[0] < x + lw && b[2] > x && b[1] < y + lh && b[3] > y)) {
      live.classList.add(name);
      return;
    }
  }
  live.classList.add("min");
  $("live-show").hidden = false;
}

function chip(text, cls = "") {
  const el = document.createElement("span");
  el.className = "chip " + cls;
  el.textContent = text;
  $("qchips").appendChild(el);
}

/* ------------------------------------------------------------------ review */

let cellsReq = 0;
let cellsLatest = Promise.resolve();
/* Resolves once ui.cells holds an answer asked for after this call: a load overtaken by a newer
   one (a review's, and the "cell" event the same review sends) waits for that one instead of
   returning early, or a review would move on through the list as it was before the review. */
function loadCells() {
  const mine = ++cellsReq;
  const p = (async () => {
    let d;
    try {
      d = await api("/api/cells");
    } catch (e) {
      toast(e.message, true);
      return;
    }
    if (mine !== cellsReq) { await cellsLatest; return; }
    ui.cells = d.cells;
    renderGallery();
  })();
  cellsLatest = p;
  return p;
}

function groups() {
  const rows = ui.state ? ui.state.classes.map((r) => r.label).filter((k) => k !== "unidentified") : [];
  return ["unidentified", ...rows, "other", "duplicate", "rejected"];
}

function confirmable(c) {
  return !c.reviewed_label && !c.manual && c.effective_label && c.label !== "unidentified";
}
/* A cell waits for the technician while nobody has confirmed or changed it (a duplicate, a
   discarded field's cell or one added by hand does not). */
function needsDecision(c) {
  return !c.reviewed_label && !c.manual && c.group !== "duplicate" && c.group !== "discarded";
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
  const open = !(ui.state && ui.state.finalised);
  for (const c of shown) {
    if (c.group !== lastGroup) {
      const h = document.createElement("div");
      h.className = "gsec";
      h.dataset.group = c.group;
      h.innerHTML = `<span class="sw" style="background:${colour(c.group)}"></span>${nameOf(c.group)} · ${counts[c.group]}` +
        `<span class="muted">· least certain first</span>`;
      const todo = shown.filter((x) => x.group === c.group && confirmable(x));
      if (open && todo.length) {
        const b = document.createElement("button");
        b.className = "confirm-all";
        b.dataset.group = c.group;
        b.title = "Every cell shown in this group is right (Shift+C)";
        b.textContent = `✓ Confirm all ${todo.length}`;
        b.onclick = () => confirmCells(todo.map((x) => x.id), c.id);
        h.appendChild(b);
      }
      gal.appendChild(h);
      lastGroup = c.group;
    }
    const b = document.createElement("button");
    b.className = "cell" + (c.id === ui.sel ? " sel" : "") + (c.counted_as ? "" : " excl");
    b.dataset.id = c.id;
    const col = colour(c.group);
    const tick = c.reviewed_label === c.label && c.review_reason === "confirmed"
      ? `<span class="rv ok" title="confirmed">✓</span>`
      : (c.reviewed_label ? `<span class="rv" title="reviewed">✓ ${shortOf(c.label)}→${shortOf(c.reviewed_label)}</span>` : "");
    b.innerHTML = (c.manual ? `<span class="noimg">by hand</span>` : `<img loading="lazy" src="/api/cells/${c.id}.jpg" alt="">`) +
      `<span class="lab" style="background:${col}"><span>${shortOf(c.effective_label || c.group)}</span>` +
      `<span class="sc">${c.manual ? "" : Math.round(c.score * 100) + "%"}</span></span>` + tick +
      (c.comment ? `<span class="cm" title="${escapeHtml(c.comment)}">✎</span>` : "");
    b.onclick = () => select(c.id);
    gal.appendChild(b);
  }
  renderInspector();
  renderNextStep();
  const selEl = gal.querySelector(".cell.sel");
  if (selEl) selEl.scrollIntoView({ block: "nearest" });
}

function escapeHtml(t) {
  return String(t).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch]));
}

/* What the technician should do next, once no cell waits for a decision. */
function nextStep() {
  const s = ui.state;
  if (!s) return "";
  const head = `${s.counted}/${s.target}`;
  if (s.finalised) return `${head} — slide finalised: start a new slide (Slide…)`;
  if (s.unidentified) return `${head} — ${s.unidentified} unidentified cell${s.unidentified > 1 ? "s" : ""} to resolve`;
  if (s.counted < s.target) {
    const per = s.fields ? Math.max(0.5, s.counted / s.fields) : 1;
    const n = Math.max(1, Math.ceil((s.target - s.counted) / per));
    return `${head} — capture ${n === 1 ? "one more field" : `about ${n} more fields`}`;
  }
  if (s.can_finalise) return `${head} — every cell is decided: finalise the slide`;
  return `${head} — before finalising: ${s.finalise_blockers.join("; ")} (Slide…)`;
}

function renderNextStep() {
  const el = $("next-step"), s = ui.state;
  const waiting = ui.cells.filter(needsDecision).length;
  el.hidden = !s || !ui.cells.length || waiting > 0 && s.unidentified > 0;
  if (el.hidden) return;
  el.textContent = nextStep() + (waiting ? ` · ${waiting} cell${waiting > 1 ? "s" : ""} not yet confirmed` : "");
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
  const img = $("insp-img");
  $("insp-noimg").hidden = !c.manual;
  img.hidden = !!c.manual;
  if (!c.manual && img.dataset.id !== c.id) {
    img.dataset.id = c.id;
    // The cell at the camera's resolution with its surroundings; the thumbnail if that fails.
    img.onerror = () => { img.onerror = null; img.src = `/api/cells/${c.id}.jpg`; };
    img.src = `/api/cells/${c.id}/large.jpg`;
  }
  const now = c.counted_as ? nameOf(c.effective_label) : (c.reviewed_label === "rejected"
    ? `Rejected (${REASONS[c.review_reason] || c.review_reason})`
    : (c.effective_label ? nameOf(c.effective_label) : nameOf(c.group)) + " — not counted");
  $("insp-title").textContent = now;
  $("insp-sub").textContent = (c.manual ? "Added by hand" : `Machine: ${nameOf(c.label)} ${Math.round(c.score * 100)} %`) +
    (c.review_reason === "confirmed" ? " · confirmed" : (c.reviewed_label ? " · reviewed" : "")) + ` · ${c.id}`;
  const probs = c.manual ? [] : Object.entries(c.probs || {}).sort((a, b) => b[1] - a[1]).slice(0, 5);
  $("insp-probs").innerHTML = probs.map(([k, v]) => `<span>${shortOf(k)} ${Math.round(v * 100)}</span>`).join("");
  $("insp-comment").hidden = !c.comment;
  $("insp-comment").textContent = c.comment ? "✎ " + c.comment : "";
  const acts = $("insp-actions");
  acts.textContent = "";
  const choices = reviewClasses();
  const nKeys = numKeys();
  const btn = (html, action, fn, title = "") => {
    const b = document.createElement("button");
    b.innerHTML = html;
    b.dataset.action = action;
    if (title) b.title = title;
    b.onclick = fn;
    acts.appendChild(b);
    return b;
  };
  const conf = btn(`✓ Confirm <kbd>C</kbd>`, "confirm", () => confirmCells([c.id], c.id),
    "The shown class is right: a labelled cell for this lab");
  conf.className = "conf";
  conf.disabled = !confirmable(c);
  choices.slice(0, nKeys).forEach((k, i) => {
    const b = btn(`<span class="sw" style="background:${colour(k)}"></span>${shortOf(k)} <kbd>${i + 1}</kbd>`,
      k, () => review(c.id, k), `Count as ${nameOf(k)} (${i + 1})`);
    if (c.effective_label === k) b.classList.add("cur");
    // For an unidentified cell, point at the classifier's best guess (the choice stays manual).
    else if (c.group === "unidentified" && k === topClass(c)) b.classList.add("sugg");
  });
  // Every other class of the table (blast, plasma cell, smudge cell...): a technician's call.
  const more = document.createElement("select");
  more.id = "insp-more";
  more.dataset.action = "more";
  more.innerHTML = `<option value="">Other class…</option>` + choices.slice(nKeys)
    .map((k) => `<option value="${k}"${c.effective_label === k && c.reviewed_label ? " selected" : ""}>${nameOf(k)}</option>`).join("");
  more.onchange = () => { if (more.value) review(c.id, more.value); };
  acts.appendChild(more);
  btn(`Reject <kbd>X</kbd>`, "reject", () => rejectDialog(c.id)).className = "rej";
  btn(`Undo <kbd>U</kbd>`, "restore", () => review(c.id, null)).disabled = !c.reviewed_label;
  btn(`In field <kbd>F</kbd>`, "field", () => openFieldView(c.id)).disabled = !!c.manual;
  btn(`Comment…`, "comment", () => commentDialog(c.id));
}

function numKeys() {
  return Math.min(9, ((ui.state && ui.state.formula.rows) || []).filter((r) => r.key !== "unidentified").length);
}

/* The key (1-9) that adds or assigns a class, or "" when it has none. */
function keyOf(cls) {
  const i = reviewClasses().indexOf(cls);
  return i >= 0 && i < numKeys() ? String(i + 1) : "";
}

/* The class a formula row adds by hand: the row's own class, or its group's first. */
function addClassOf(r) {
  const rc = reviewClasses();
  if (rc.includes(r.label)) return r.label;
  return (r.classes || []).find((k) => rc.includes(k)) || r.label;
}

window.__reviewsPending = 0;

/* After a decision in the All view the next cell that waits for one is selected; a filtered
   view moves to the next cell of the list on screen. */
function moveOn(id, filter, nextInList, order) {
  const listed = (f) => ui.cells.filter((c) => f === "all" || c.group === f);
  if (ui.filter !== filter) return;  // the technician changed the list meanwhile
  if (filter === "all") {
    // Unidentified cells first (they block finalising), then onwards from where the decided
    // cell was before the decision moved it to its new group.
    const from = order.indexOf(id);
    const waiting = ui.cells.filter(needsDecision);
    const pos = (c) => (order.includes(c.id) ? order.indexOf(c.id) : order.length);
    const next = waiting.find((c) => c.group === "unidentified") ||
      waiting.filter((c) => pos(c) > from).sort((a, b) => pos(a) - pos(b))[0] || waiting[0];
    if (next) { select(next.id); scrollToSel(); return; }
    select(id);
    const msg = nextStep();
    if (msg) toast(msg);
    return;
  }
  const now = listed(filter);
  if (now.some((c) => c.id === id)) select(id);
  else if (nextInList && now.some((c) => c.id === nextInList)) select(nextInList);
}

function scrollToSel() {
  const el = document.querySelector(".cell.sel");
  if (el) el.scrollIntoView({ block: "nearest" });
}

async function review(id, label, reason) {
  if (ui.state && ui.state.finalised) { toast("The slide is finalised: reviews are closed.", true); return; }
  const filter = ui.filter;
  const before = ui.cells.filter((c) => filter === "all" || c.group === filter);
  const i = before.findIndex((c) => c.id === id);
  const nextId = (before[i + 1] || before[i - 1] || {}).id;
  window.__reviewsPending += 1;
  try {
    const order = ui.cells.map((c) => c.id);
    await api(`/api/cells/${id}/review`, { label, reason });
    toast(label === null ? "Machine label restored" : label === "rejected"
      ? "Cell rejected" : `Now ${nameOf(label)}`);
    await loadCells();
    if (label !== null) moveOn(id, filter, nextId, order);
    else if (ui.filter === filter) select(id);
  } catch (e) {
    toast(e.message, true);
  } finally {
    window.__reviewsPending -= 1;
  }
}

async function confirmCells(ids, anchor) {
  if (ui.state && ui.state.finalised) { toast("The slide is finalised: reviews are closed.", true); return; }
  const filter = ui.filter;
  const before = ui.cells.filter((c) => filter === "all" || c.group === filter);
  const i = before.findIndex((c) => c.id === anchor);
  const nextId = (before.slice(i + 1).find((c) => !ids.includes(c.id)) || {}).id;
  const order = ui.cells.map((c) => c.id);
  window.__reviewsPending += 1;
  try {
    const d = ids.length === 1 ? await api(`/api/cells/${ids[0]}/confirm`, {})
      : await api("/api/cells/confirm", { ids });
    const n = d.confirmed.length;
    toast(n === 1 ? "Confirmed" : `${n} cells confirmed`);
    await loadCells();
    moveOn(anchor, filter, nextId, order);
  } catch (e) {
    toast(e.message, true);
  } finally {
    window.__reviewsPending -= 1;
  }
}

function confirmGroup() {
  const c = selected();
  if (!c) return;
  const todo = ui.cells.filter((x) => x.group === c.group && confirmable(x));
  if (!todo.length) { toast(`Nothing to confirm in ${nameOf(c.group)}`, true); return; }
  confirmCells(todo.map((x) => x.id), c.id);
}

function rejectDialog(id) {
  const dlg = $("dlg-reject");
  dlg.returnValue = "";
  const c = ui.cells.find((x) => x.id === id);
  let extra = dlg.querySelector("button[value=added_in_error]");
  if (c && c.manual && !extra) {
    extra = document.createElement("button");
    extra.value = "added_in_error";
    extra.textContent = "Added by mistake";
    dlg.querySelector(".reasons").appendChild(extra);
  } else if (extra && !(c && c.manual)) extra.remove();
  dlg.onclose = () => { if (dlg.returnValue) review(id, "rejected", dlg.returnValue); };
  dlg.showModal();
}

function commentDialog(id) {
  const c = ui.cells.find((x) => x.id === id);
  const dlg = $("dlg-comment");
  $("comment-cell").textContent = id;
  $("comment-text").value = (c && c.comment) || "";
  $("comment-err").textContent = "";
  $("comment-save").onclick = async (e) => {
    e.preventDefault();
    try {
      await api(`/api/cells/${id}/comment`, { comment: $("comment-text").value });
      dlg.close();
      await loadCells();
    } catch (err) {
      $("comment-err").textContent = err.message;
    }
  };
  dlg.showModal();
  $("comment-text").focus();
}

/* ------------------------------------------------------------------ the cell in its field */

const fv = { f: null, id: null, z: 1, fit: 1 };

async function openFieldView(id) {
  const c = ui.cells.find((x) => x.id === id) || (ui.field && ui.field.cells.find((x) => x.id === id));
  if (!c || c.manual) return;
  let f;
  try { f = await api(`/api/fields/${c.field_id}`); } catch (e) { toast(e.message, true); return; }
  Object.assign(fv, { f, id });
  $("fv-title").textContent = `Field #${f.seq} · cell ${id}`;
  $("fv-img").src = `/api/fields/${f.id}.jpg`;
  const svg = $("fv-svg"), ns = "http://www.w3.org/2000/svg";
  svg.setAttribute("viewBox", `0 0 ${f.width} ${f.height}`);
  svg.textContent = "";
  for (const x of f.cells) {
    if (x.manual) continue;
    const [x0, y0, x1, y1] = x.bbox;
    const r = document.createElementNS(ns, "rect");
    Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 5,
      stroke: x.id === id ? "#ffd400" : colour(x.effective_label || x.group) })
      .forEach(([k, v]) => r.setAttribute(k, v));
    r.setAttribute("class", x.id === id ? "this" : "other");
    r.dataset.id = x.id;
    svg.appendChild(r);
  }
  $("dlg-field").showModal();
  const sc = $("fv-scroll");
  fv.fit = Math.min(sc.clientWidth / f.width, sc.clientHeight / f.height);
  // Opens zoomed on the cell: about four cell widths of its surroundings on screen.
  const [x0, , x1] = c.bbox;
  setZoom(Math.max(fv.fit, Math.min(4, sc.clientWidth / (4 * Math.max(20, x1 - x0)))));
}

function setZoom(z) {
  const f = fv.f, sc = $("fv-scroll");
  if (!f) return;
  fv.z = Math.max(fv.fit, Math.min(8, z));
  const st = $("fv-stage");
  st.style.width = `${f.width * fv.z}px`;
  st.style.height = `${f.height * fv.z}px`;
  $("fv-z").textContent = `${Math.round(fv.z * 100)} %`;
  const c = f.cells.find((x) => x.id === fv.id);
  if (c) {
    const [x0, y0, x1, y1] = c.bbox;
    sc.scrollLeft = ((x0 + x1) / 2) * fv.z - sc.clientWidth / 2;
    sc.scrollTop = ((y0 + y1) / 2) * fv.z - sc.clientHeight / 2;
  }
  window.__fieldZoom = fv.z;
}

/* ------------------------------------------------------------------ the count view's keys */

async function addCell(cls) {
  const s = ui.state;
  if (!s || s.finalised) { toast("The slide is finalised.", true); return; }
  // The add goes on the stack before its answer arrives: U pressed while it is in flight takes
  // back this cell, not the one added before it (the count on screen already shows it).
  const pending = api("/api/cells/add", { label: cls }).then((c) => c.id);
  ui.added.push(pending);
  try {
    await pending;
    toast(`Added ${nameOf(cls)} by hand · U takes it back`);
  } catch (e) {
    const i = ui.added.indexOf(pending);
    if (i >= 0) ui.added.splice(i, 1);
    toast(e.message, true);
  }
}

async function undoAdd() {
  const pending = ui.added.pop();
  if (!pending) { toast("No cell added by hand to take back.", true); return; }
  let id;
  try {
    id = await pending;
  } catch (e) {
    toast("That add failed: nothing to take back.", true);
    return;
  }
  try {
    // Not over another person's correction of it made meanwhile (another tab, a reviewer).
    await api(`/api/cells/${id}/review`, { label: "rejected", reason: "added_in_error",
      if_unreviewed: true });
    toast("Hand-added cell taken back");
  } catch (e) {
    toast(e.message, true);
  }
}

function discardDialog() {
  const f = ui.field;
  if (!f) return;
  const dlg = $("dlg-discard");
  dlg.returnValue = "";
  dlg.onclose = async () => {
    if (!dlg.returnValue) return;
    try {
      const d = await api(`/api/fields/${f.id}/discard`, { reason: dlg.returnValue });
      toast(`Field #${d.seq} discarded (${-d.counted_change} cells no longer counted)`);
    } catch (e) { toast(e.message, true); }
  };
  dlg.showModal();
}

async function restoreField() {
  const f = ui.field;
  if (!f) return;
  try {
    const d = await api(`/api/fields/${f.id}/discard`, { reason: null });
    toast(`Field #${d.seq} taken back`);
  } catch (e) { toast(e.message, true); }
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

// Actions on "the slide" name the one the technician was looking at: another tab or central
// monitoring may have finalised it and started the next patient's meanwhile, and a sample ID,
// sign-off, target or finalise must not land there (the server answers 409 instead).
const shownSlide = () => ($("dlg-slide").open ? ui.dialogSlide : ui.state && ui.state.slide_id);

async function setTarget(t) {
  try {
    await api("/api/slide/target", { target: Number(t), slide_id: shownSlide() });
    toast(`Target set to ${t} cells`);
    return true;
  } catch (e) {
    toast(e.message, true);
    $("dlg-err").textContent = e.message;
    return false;
  }
}

/* Who counted, who signs off and the slide's comment, as typed in the slide dialog. */
async function saveNotes() {
  const s = ui.state;
  if (!s) return;
  const n = { operator: $("notes-operator").value, signed_off_by: $("notes-signer").value,
    comment: $("notes-comment").value };
  const cur = s.slide_id === ui.dialogSlide ? s.notes || {} : {};
  if (n.operator === (cur.operator || "") && n.signed_off_by === (cur.signed_off_by || "") &&
      n.comment === (cur.comment || "")) return;
  // Refused (and said in the dialog) when the slide was finalised or changed meanwhile: a
  // sign-off is never dropped without a word.
  await api("/api/slide/notes", { ...n, slide_id: ui.dialogSlide });
  if (ui.state.slide_id === ui.dialogSlide) ui.state.notes = n;  // as the next event will say
  window.__notesSaved = (window.__notesSaved || 0) + 1;
}

async function finalise() {
  try {
    if ($("dlg-slide").open) await saveNotes();
    await api("/api/slide/finalise", { slide_id: shownSlide() });
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
  ui.dialogSlide = s.slide_id;
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
  const notes = s.notes || {};
  $("notes-operator").value = notes.operator || "";
  $("notes-signer").value = notes.signed_off_by || "";
  $("notes-comment").value = notes.comment || "";
  for (const id of ["notes-operator", "notes-signer", "notes-comment"]) $(id).disabled = s.finalised;
  loadPastSlides();
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
      abandon: $("new-abandon").checked, operator: $("new-operator").value.trim(),
      slide_id: ui.dialogSlide });
    $("dlg-slide").close();
    toast("New slide started");
    setView("count");
  } catch (e) {
    $("dlg-err").textContent = e.message;
  }
}

async function loadPastSlides() {
  const ul = $("past-slides");
  let d;
  try { d = await api("/api/slides"); } catch (e) { ul.innerHTML = `<li class="muted">${escapeHtml(e.message)}</li>`; return; }
  ul.textContent = "";
  for (const sl of d.slides.slice(0, 20)) {
    const li = document.createElement("li");
    li.dataset.slide = sl.id;
    const when = new Date(sl.created_at);
    li.innerHTML = `<b></b> <span class="muted">${when.toLocaleDateString()} ${when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })} · ${sl.status}</span> `;
    li.querySelector("b").textContent = sl.sample_id;
    if (sl.reports && sl.reports.html) {
      const a = document.createElement("a");
      a.href = `/api/slide/report.html?slide=${encodeURIComponent(sl.id)}`;
      a.target = "_blank";
      a.textContent = "Report";
      li.appendChild(a);
    }
    ul.appendChild(li);
  }
  if (!ul.children.length) ul.innerHTML = `<li class="muted">No slides yet.</li>`;
}

/* ------------------------------------------------------------------ adapt to this lab */

const pct = (x) => x == null ? "–" : `${Math.round(x * 1000) / 10} %`;

async function openLab() {
  const st = ui.station || {};
  $("lab-err").textContent = "";
  $("lab-result").textContent = "";
  $("mag-err").textContent = "";
  $("mag").hidden = !st.measurable;
  $("lab-adapt").hidden = !st.adaptable;
  $("dlg-lab").showModal();
  if (st.measurable) { $("mag-measure").focus(); await renderMag(); }
  if (st.adaptable) await renderLab();
}

/* ------------------------------------------------------------------ magnification */

const px = (x) => `${Math.round(x)} px`;

async function renderMag() {
  let d;
  try { d = await api("/api/magnification"); } catch (e) { $("mag-err").textContent = e.message; return; }
  const saved = d.saved;
  $("mag-current").innerHTML = `Leukocyte diameter in use: <b id="mag-px">${px(d.cell_diameter_px)}</b> ` +
    (saved ? `<span class="muted">(accepted on this station ${escapeHtml(saved.at || "")}; the config says ${px(d.config_px)})</span>`
           : `<span class="muted">(the config's value)</span>`);
  $("mag-reset").disabled = !saved;
}

async function measureMag() {
  $("mag-err").textContent = "";
  const out = $("mag-result");
  out.innerHTML = `<p class="muted">Measuring the red cells…</p>`;
  $("mag-measure").disabled = true;
  try {
    const m = await api("/api/magnification/measure", {});
    const lead = Math.round(m.leukocyte_px);
    const change = Math.abs(lead - m.current_px) / m.current_px;
    out.innerHTML = `<table><tbody>
      <tr><th>Red cells</th><td>${m.red_cell_px.toFixed(1)} px across <span class="muted">(${m.spread[0].toFixed(1)}–${m.spread[1].toFixed(1)} between fields)</span></td></tr>
      <tr><th>Leukocyte diameter</th><td><b>${px(m.leukocyte_px)}</b></td></tr>
      <tr><th>In use now</th><td>${px(m.current_px)}${change >= 0.1 ? ` <b>(${Math.round(change * 100)} % off)</b>` : ""}</td></tr>
      <tr><th>Measured on</th><td>${m.fields} of the ${escapeHtml(m.source)}${m.skipped ? ` <span class="muted">(${m.skipped} without enough red cells)</span>` : ""}</td></tr>
      </tbody></table>`;
    const b = document.createElement("button");
    b.type = "button";
    b.className = "primary";
    b.id = "mag-accept";
    b.textContent = `Accept ${lead} px`;
    b.onclick = () => acceptMag(lead);
    out.appendChild(b);
    b.focus();
  } catch (e) {
    out.textContent = "";
    $("mag-err").textContent = e.message;
  } finally {
    $("mag-measure").disabled = false;
  }
}

async function acceptMag(value) {
  $("mag-err").textContent = "";
  try {
    const d = value === null ? await api("/api/magnification/reset", {})
                             : await api("/api/magnification/accept", { cell_diameter_px: value });
    toast(`Leukocyte diameter ${px(d.cell_diameter_px)} from the next field`);
    $("mag-result").textContent = "";
    await renderMag();
    $("mag-measure").focus();
  } catch (e) {
    $("mag-err").textContent = e.message;
  }
}

// After a fit the Activate button is there before the fit's own refresh has answered: an older
// answer must not overwrite a newer one (it showed the shipped model while the adaptation was in
// use, or the reverse).
let labSeq = 0;

async function renderLab() {
  const seq = ++labSeq;
  let d;
  try { d = await api("/api/adaptation"); } catch (e) {
    if (seq === labSeq) $("lab-err").textContent = e.message;
    return;
  }
  if (seq !== labSeq) return;
  const act = d.active;
  $("lab-active").innerHTML = act
    ? `In use: <b>lab adaptation ${escapeHtml(act.id)}</b> <span class="muted">(fitted ${escapeHtml(act.created)})</span>`
    : `In use: <b>the shipped model</b> (no lab adaptation)`;
  $("lab-rollback").disabled = !act;
  const by = Object.entries(d.reviewed_by_class).map(([k, n]) => `${nameOf(k)} ${n}`).join(", ");
  // The fit's own count (cells it can learn from; a myelocyte and a metamyelocyte both teach
  // "immature granulocyte"); the reviewed labels only where the classifier cannot be read.
  const ready = Object.values(d.learnable_by_class || d.reviewed_by_class).filter((n) => n >= d.min_cells_per_class).length;
  $("lab-cells").textContent = `${d.reviewed_cells} reviewed cells (confirmed or changed)` +
    (by ? `: ${by}` : "") + `. A class needs at least ${d.min_cells_per_class} to be adapted; two such classes are the minimum.`;
  // Refused before asking: too few cells is known here already (the station refuses it too).
  $("lab-fit").disabled = ready < 2;
  $("lab-fit").title = ready < 2 ? `Too few reviewed cells: ${ready} class(es) with ${d.min_cells_per_class} or more, 2 needed` : "";
  if (ready < 2) $("lab-err").textContent = `Too few reviewed cells to adapt: confirm or change cells in Review until two classes have ${d.min_cells_per_class} or more.`;
  const vs = $("lab-versions");
  vs.textContent = "";
  if (d.versions.length) {
    const h = document.createElement("div");
    h.className = "small muted";
    h.textContent = "Fitted on this station:";
    vs.appendChild(h);
  }
  for (const v of d.versions) {
    const row = document.createElement("div");
    row.className = "lab-version";
    row.dataset.id = v.id;
    const n = Object.values(v.cells || {}).reduce((a, b) => a + b, 0);
    row.innerHTML = `<span><b></b> <span class="muted">${escapeHtml(v.created || "")} · ${n} cells</span></span>`;
    row.querySelector("b").textContent = v.id;
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = act && act.id === v.id ? "In use" : "Activate";
    b.disabled = !!(act && act.id === v.id);
    b.onclick = () => activateLab(v.id);
    row.appendChild(b);
    vs.appendChild(row);
  }
}

function validationTable(v) {
  const s = v.shipped, a = v.adapted;
  const rows = Object.keys(a.per_class).map((k) =>
    `<tr><td>${escapeHtml(nameOf(k))}</td><td class="n">${a.per_class[k].n}</td><td class="n">${pct(s.per_class[k].top1)}</td><td class="n">${pct(a.per_class[k].top1)}</td></tr>`).join("");
  const t = Math.round(v.target_precision * 100);
  return `<table class="lab-table"><thead><tr><th>Held-out cells</th><th class="n">n</th><th class="n">Shipped</th><th class="n">Adapted</th></tr></thead><tbody>${rows}
    <tr class="tot"><td>All (top-1)</td><td class="n">${a.n}</td><td class="n">${pct(s.top1)}</td><td class="n">${pct(a.top1)}</td></tr>
    <tr><td>Named at ≥ ${t} % precision</td><td></td><td class="n">${pct(s.named_at_target)}</td><td class="n">${pct(a.named_at_target)}</td></tr>
    <tr><td>Unidentified</td><td></td><td class="n">${pct(s.unidentified)}</td><td class="n">${pct(a.unidentified)}</td></tr></tbody></table>`;
}

async function fitLab() {
  $("lab-err").textContent = "";
  const out = $("lab-result");
  out.innerHTML = `<p class="muted">Fitting and validating on held-out cells…</p>`;
  $("lab-fit").disabled = true;
  try {
    const r = await api("/api/adaptation/fit", {});
    const few = Object.entries(r.too_few || {}).map(([k, n]) => `${nameOf(k)} (${n})`).join(", ");
    out.innerHTML = validationTable(r.validation) +
      `<p class="${r.accepted ? "ok" : "bad"}"><b>${r.accepted ? "Adapted is better: written, not yet in use" : "Not better: nothing written"}</b> — ${escapeHtml(r.reason)}</p>` +
      (few ? `<p class="muted small">Too few cells, left as shipped: ${escapeHtml(few)}</p>` : "") +
      // a blast or plasma cell the classifier has no output for, a cell another model saw
      (r.skipped ? `<p class="muted small">Left out of the fit: ${r.skipped} cell(s) — ${escapeHtml((r.skipped_reasons || []).slice(0, 3).join("; "))}${r.skipped > 3 ? " …" : ""}</p>` : "");
    if (r.accepted) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "primary";
      b.id = "lab-activate";
      b.textContent = "Activate this adaptation";
      b.onclick = () => activateLab(r.id);
      out.appendChild(b);
    }
    await renderLab();
  } catch (e) {
    out.textContent = "";
    $("lab-err").textContent = e.message;
  } finally {
    $("lab-fit").disabled = false;
  }
}

async function activateLab(id) {
  $("lab-err").textContent = "";
  try {
    await api("/api/adaptation/activate", { id });
    toast(id ? `Lab adaptation ${id} counts from the next field` : "Back to the shipped model from the next field");
    const b = $("lab-activate");
    if (b) b.remove();
    await renderLab();
  } catch (e) {
    $("lab-err").textContent = e.message;
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
  $("live").onclick = () => { $("field").classList.toggle("live-big"); placeLive(); };
}

/* ------------------------------------------------------------------ wiring */

function typing(e) {
  const t = e.target;
  return t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA");
}

document.addEventListener("keydown", (e) => {
  if ($("dlg-field").open && !typing(e)) {
    if (e.key === "+" || e.key === "=") setZoom(fv.z * 1.4);
    else if (e.key === "-") setZoom(fv.z / 1.4);
    else if (e.key === "0") setZoom(fv.fit);
    return;
  }
  if (typing(e) || document.querySelector("dialog[open]")) return;
  // A held key (or a foot pedal that emulates one) repeats ~30 times a second: one press is one
  // capture, one cell added, one review (a held Space took 7 fields).
  if (e.repeat) { if (e.code === "Space") e.preventDefault(); return; }
  if (e.code === "Space") { e.preventDefault(); capture(); return; }
  if (e.ctrlKey || e.altKey || e.metaKey) return;
  const idx = "123456789".indexOf(e.key);
  const nKeys = numKeys();
  if (ui.view !== "review") {
    if (e.key === "r" || e.key === "R") setView("review");
    // As on a manual differential counter: a key adds a cell the camera missed.
    else if (idx >= 0 && idx < nKeys) addCell(reviewClasses()[idx]);
    else if (e.key === "u" || e.key === "U") undoAdd();
    else if ((e.key === "m" || e.key === "M") && !$("tab-lab").hidden) openLab();
    return;
  }
  const c = selected();
  if (e.key === "Escape") { setView("count"); return; }
  if (!c) return;
  if (idx >= 0 && idx < nKeys) { review(c.id, reviewClasses()[idx]); return; }
  if (e.key === "C") { confirmGroup(); return; }
  if (e.key === "c") { if (confirmable(c)) confirmCells([c.id], c.id); return; }
  if (e.key === "f" || e.key === "F") { openFieldView(c.id); return; }
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
$("tab-lab").onclick = openLab;
$("lab-fit").onclick = fitLab;
$("lab-rollback").onclick = () => activateLab(null);
$("mag-measure").onclick = measureMag;
$("mag-reset").onclick = () => acceptMag(null);
$("field-discard").onclick = discardDialog;
$("field-restore").onclick = restoreField;
$("live-show").onclick = () => { $("field").classList.add("live-big"); placeLive(); };
for (const id of ["notes-operator", "notes-signer", "notes-comment"]) {
  $(id).onchange = () => saveNotes().catch((e) => { $("dlg-err").textContent = e.message; });
}
$("insp-big").onclick = () => { const c = selected(); if (c && !c.manual) openFieldView(c.id); };
$("fv-in").onclick = () => setZoom(fv.z * 1.4);
$("fv-out").onclick = () => setZoom(fv.z / 1.4);
$("fv-fit").onclick = () => setZoom(fv.fit);
$("fv-close").onclick = () => $("dlg-field").close();
$("fv-scroll").addEventListener("wheel", (e) => {
  e.preventDefault();
  setZoom(fv.z * (e.deltaY < 0 ? 1.2 : 1 / 1.2));
}, { passive: false });
window.addEventListener("resize", placeLive);
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
  ui.sampleSlide = ui.state.slide_id;
  $("dlg-sample").showModal();
  $("sample-input").focus();
};
$("sample-save").onclick = async (e) => {
  e.preventDefault();
  try {
    await api("/api/slide/sample", { sample_id: $("sample-input").value,
      slide_id: ui.sampleSlide });
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
