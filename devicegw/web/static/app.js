// devicegw ward dashboard. Data from the gateway is always put in with textContent
// (never as markup): device and file text is data, not HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function mmss(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function pill(node, text, ok) {
  node.textContent = text;
  node.classList.toggle("ok", ok === true);
  node.classList.toggle("bad", ok === false);
}

function doseText(d) {
  if (!d) return "no dose yet";
  const n = d.dose_number ? `dose ${d.dose_number}` : `session ${d.session_no}`;
  return `last: ${n} ${d.verdict} at ${(d.end_utc || "").replace("T", " ").slice(0, 19)} UTC`;
}

// -- ward overview -----------------------------------------------------------------------

const charts = new Map();

function trendChart(container, bed) {
  if (typeof uPlot === "undefined") return null;
  const opts = {
    width: container.clientWidth || 300, height: 90, legend: { show: false },
    axes: [{ show: false }, { size: 40 }],
    scales: { x: { time: false }, y: { range: [70, 100] } },
    series: [{}, { stroke: "#2f6fdb", width: 1.5, spanGaps: false }],
  };
  const chart = new uPlot(opts, [[], []], container);
  charts.set(bed, chart);
  return chart;
}

function renderBed(card, b, role) {
  card.dataset.bed = b.bed;
  const link = $(".bed-link", card);
  link.textContent = `Bed ${b.bed}`;
  link.href = `/bed/${encodeURIComponent(b.bed)}`;
  const neb = b.nebulizer || {};
  pill($(".neb", card), `nebulizer ${neb.connected ? "up" : "down"}`, !!neb.connected);
  const ox = $(".ox", card);
  if (b.oximeter) pill(ox, `oximeter ${b.oximeter.connected ? "up" : "down"}`, !!b.oximeter.connected);
  else pill(ox, "no oximeter", undefined);
  $(".who", card).textContent = b.assignment
    ? `subject ${b.assignment.subject_id} · kit ${b.assignment.kit_number}`
    : "unassigned";

  const alerts = $(".alerts", card);
  alerts.replaceChildren(...(b.alerts || []).map(a =>
    el("div", `SpO2 ALERT: ${a.spo2 ?? "?"} % (${a.kind}, ${a.phase})`, "alert")));
  card.classList.toggle("alerting", (b.alerts || []).length > 0);

  const s = b.session;
  const bar = $(".bar", card);
  const text = $(".session-text", card);
  if (s) {
    let pct = null;
    if (role === "engineer" && b.restricted && b.restricted.delivered_ml !== null)
      pct = Math.min(100, 100 * b.restricted.delivered_ml / s.prescribed_ml);
    bar.style.width = pct === null ? "100%" : `${pct.toFixed(0)}%`;
    bar.style.opacity = pct === null ? "0.35" : "1";
    text.textContent = `${s.state} · session ${s.session_no} · ${mmss(s.elapsed_s)}` +
      (pct === null ? "" : ` · ${b.restricted.delivered_ml.toFixed(2)} / ${s.prescribed_ml} mL`);
  } else {
    bar.style.width = "0";
    text.textContent = neb.state ? `idle (${neb.state})` : "idle";
  }
  card.dataset.sessionElapsed = s ? String(s.elapsed_s) : "";

  const spo2 = b.spo2;
  const sv = $(".spo2-value", card);
  sv.textContent = spo2 && spo2.spo2 !== null ? `SpO2 ${spo2.spo2} %` : (b.oximeter ? "SpO2 –" : "");
  sv.classList.toggle("low", !!(spo2 && spo2.spo2 !== null && spo2.spo2 < 90));
  $(".pulse-value", card).textContent =
    spo2 && spo2.pulse_bpm !== null ? `pulse ${spo2.pulse_bpm}/min` : "";
  if (spo2 && spo2.trend && spo2.trend.length) {
    const holder = $(".trend", card);
    const chart = charts.get(b.bed) || trendChart(holder, b.bed);
    if (chart) chart.setData([spo2.trend.map(p => p.t_s), spo2.trend.map(p => p.spo2)]);
  }
  const last = $(".last-dose", card);
  last.textContent = doseText(b.last_dose);
  last.className = "last-dose" + (b.last_dose ? ` verdict-${b.last_dose.verdict}` : "");
  card.dataset.lastVerdict = b.last_dose ? b.last_dose.verdict : "";
}

function renderWard(ward) {
  $("#gateway").textContent = `${ward.gateway.site} / ${ward.gateway.id}`;
  pill($("#broker"), ward.broker_connected ? "broker connected" : "broker DOWN",
    ward.broker_connected);
  const beds = $("#beds");
  const template = $("#bed-card");
  for (const b of ward.beds) {
    let card = beds.querySelector(`section[data-bed="${CSS.escape(b.bed)}"]`);
    if (!card) {
      card = template.content.firstElementChild.cloneNode(true);
      card.dataset.bed = b.bed;
      beds.appendChild(card);
    }
    renderBed(card, b, ward.role);
  }
}

// -- bed detail --------------------------------------------------------------------------

let timelineChart = null;
let spo2Chart = null;
// Marks on the session timeline (s from the session's start): drawn behind the line.
let timelineMarks = { desaturations: [], pauses: [], alarms: [] };

const BAND_COLOURS = { desaturations: "rgba(176, 0, 32, 0.18)", pauses: "rgba(120, 120, 120, 0.2)" };

function drawMarks(u) {
  const ctx = u.ctx;
  const top = u.bbox.top, height = u.bbox.height;
  const xmax = u.scales.x.max;
  ctx.save();
  for (const kind of ["pauses", "desaturations"]) {
    ctx.fillStyle = BAND_COLOURS[kind];
    for (const band of timelineMarks[kind] || []) {
      const x0 = u.valToPos(band.start_s, "x", true);
      const x1 = u.valToPos(band.end_s ?? xmax, "x", true);
      ctx.fillRect(x0, top, Math.max(2, x1 - x0), height);
    }
  }
  ctx.strokeStyle = "#b35c00";
  for (const alarm of timelineMarks.alarms || []) {
    const x = u.valToPos(alarm.at_s, "x", true);
    ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
  }
  ctx.restore();
}

function lineChart(container, label, yRange, marks) {
  if (typeof uPlot === "undefined") return null;
  return new uPlot({
    width: container.clientWidth || 600, height: 180,
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    series: [{ label: "s" }, { label, stroke: "#2f6fdb", width: 1.5 }],
    hooks: marks ? { drawClear: [drawMarks] } : {},
  }, [[], []], container);
}

function renderMarkList(marks) {
  const list = $("#marks");
  if (!list) return;
  const items = [];
  for (const d of marks.desaturations || [])
    items.push(`SpO2 desaturation ${mmss(d.start_s)}–${d.end_s === null ? "now" : mmss(d.end_s)}`);
  for (const p of marks.pauses || [])
    items.push(`pause ${mmss(p.start_s)}–${p.end_s === null ? "now" : mmss(p.end_s)}`);
  for (const a of marks.alarms || []) items.push(`alarm ${a.name} at ${mmss(a.at_s)}`);
  list.replaceChildren(...(items.length ? items : ["no desaturation, pause or alarm"])
    .map(t => el("li", t)));
}

function renderBedDetail(b) {
  $("#bed-name").textContent = b.bed;
  const now = $("#bed-now");
  now.replaceChildren();
  now.appendChild(el("p", b.assignment
    ? `subject ${b.assignment.subject_id} · kit ${b.assignment.kit_number}` : "unassigned", "who"));
  for (const a of b.alerts || [])
    now.appendChild(el("div", `SpO2 ALERT: ${a.spo2 ?? "?"} % (${a.kind})`, "alert"));
  now.appendChild(el("p", b.session
    ? `${b.session.state} · session ${b.session.session_no} · ${mmss(b.session.elapsed_s)}`
    : "no session running"));
  now.appendChild(el("p", doseText(b.last_dose), "last-dose"));

  const tl = $("#timeline");
  const points = b.timeline || [];
  const restricted = points.length && points[0].delivered_ml !== undefined;
  timelineMarks = b.marks || timelineMarks;
  renderMarkList(timelineMarks);
  if (!timelineChart) timelineChart = lineChart(tl,
    restricted ? "delivered mL" : "elapsed s", null, true);
  if (timelineChart) timelineChart.setData([
    points.map(p => p.elapsed_s),
    points.map(p => restricted ? p.delivered_ml : p.elapsed_s)]);

  const trend = (b.spo2 && b.spo2.trend) || [];
  const sc = $("#spo2-chart");
  if (!spo2Chart) spo2Chart = lineChart(sc, "SpO2 %", [70, 100]);
  if (spo2Chart) spo2Chart.setData([trend.map(p => p.t_s), trend.map(p => p.spo2)]);

  const body = $("#doses tbody");
  body.replaceChildren(...(b.doses || []).map(d => {
    const tr = document.createElement("tr");
    for (const v of [(d.end_utc || "").slice(0, 19), d.session_no, d.dose_number ?? "–",
      d.subject_id ?? "unassigned", d.kit_number ?? "–", d.verdict, d.reasons.join(", ")])
      tr.appendChild(el("td", v));
    tr.children[5].className = `verdict-${d.verdict}`;
    return tr;
  }));
}

// -- health ------------------------------------------------------------------------------

function renderHealth(h) {
  const rows = [
    ["gateway", `${h.site} / ${h.gateway_id}`],
    ["broker", `${h.broker.host}:${h.broker.port} — ${h.broker.connected ? "connected" : "NOT connected"}`],
    ["outbox depth", h.outbox_depth],
    ["oldest unsent", h.oldest_unsent_utc || "none"],
    ["store size", `${(h.store_bytes / 1e6).toFixed(1)} MB`],
    ["held writes (disk full)", h.store.held_writes],
    ["audit chain", h.audit_chain_ok ? "verifies" : "BROKEN"],
    ["config sha256", h.config_sha256 || "–"],
  ];
  $("#health tbody").replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.appendChild(el("th", k));
    tr.appendChild(el("td", v));
    return tr;
  }));
  $("#devices tbody").replaceChildren(...Object.entries(h.devices).map(([id, d]) => {
    const tr = document.createElement("tr");
    for (const v of [id, d.connected ? "up" : "down", d.frames_ok, d.frames_bad, d.frames_lost,
      d.connects, d.last_error || ""]) tr.appendChild(el("td", v));
    return tr;
  }));
}

// -- wiring ------------------------------------------------------------------------------

let me = null; // the session: user, role, what it may do, its CSRF token

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (r.status === 401) location.assign("/login");
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

async function postJSON(url, body) {
  const r = await fetch(url, {
    method: "POST", cache: "no-store",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": me ? me.csrf : "" },
    body: JSON.stringify(body),
  });
  if (r.status === 401) location.assign("/login");
  return { status: r.status, body: await r.json().catch(() => ({})) };
}

function showSession(s) {
  me = s;
  if (s.login && s.user) {
    const who = $("#who");
    who.textContent = `${s.user} (${s.role})`;
    who.hidden = false;
    const out = $("#logout");
    out.elements.csrf.value = s.csrf;
    out.hidden = false;
  }
}

function liveWard(onWard) {
  const live = $("#live");
  const source = new EventSource("/events");
  source.addEventListener("ward", ev => {
    pill(live, "live", true);
    onWard(JSON.parse(ev.data));
  });
  source.addEventListener("expired", () => location.assign("/login"));
  source.onerror = () => {
    pill(live, "reconnecting…", false);
    if (source.readyState === EventSource.CLOSED) getJSON("/api/session").catch(() => {});
  };
}

// The assignment form (role nurse): a USB barcode scanner types the kit and presses
// Enter, which sends the form; Enter in the subject field moves on to the kit.
function assignForm(bed, refresh) {
  if (!me || !me.may.includes("assign")) return;
  $("#assign").hidden = false;
  const result = $("#assign-result");
  const subject = $("#assign-subject");
  const kit = $("#assign-kit");
  subject.addEventListener("keydown", ev => {
    if (ev.key === "Enter") { ev.preventDefault(); kit.focus(); }
  });
  const send = async body => {
    result.textContent = "…";
    const { status, body: answer } = await postJSON("/api/assign", { bed, ...body });
    result.textContent = answer.message || answer.error || `error ${status}`;
    result.className = answer.applied ? "ok" : "bad";
    if (answer.applied) {
      subject.value = ""; kit.value = ""; $("#assign-override").value = "";
      subject.focus(); // ready for the next bed's subject
    }
    refresh();
  };
  $("#assign-form").addEventListener("submit", ev => {
    ev.preventDefault();
    const override = $("#assign-override").value.trim();
    send({
      subject_id: subject.value.trim(), kit_number: kit.value.trim(),
      reason: $("#assign-reason").value, override_reason: override || null,
    });
  });
  $("#assign-end").addEventListener("click", () => {
    if (confirm(`End the assignment of bed ${bed}?`)) send({ end: true, reason: $("#assign-reason").value });
  });
}

const page = document.body.dataset.page;
getJSON("/api/session").then(showSession).catch(() => {}).finally(() => {
  if (page === "ward") {
    liveWard(renderWard);
  } else if (page === "bed") {
    const bed = decodeURIComponent(location.pathname.split("/").pop());
    const refresh = () => getJSON(`/api/bed/${encodeURIComponent(bed)}`)
      .then(renderBedDetail).catch(e => pill($("#live"), String(e), false));
    refresh();
    assignForm(bed, refresh);
    liveWard(() => refresh());
  } else if (page === "health") {
    const refresh = () => getJSON("/api/health").then(renderHealth);
    refresh();
    setInterval(refresh, 5000);
  }
});
