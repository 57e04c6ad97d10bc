// The station page: one EventSource for state (1/s) and live frames (latest wins), fetch() for the rest.
// Controls POST {"cmd": ...} to api/cmd with the operator's token; replies are shown as the daemon sent them.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "inspector-token";
const STRIP_PERIOD_MS = 3000;  // the strip is for people: at most one refresh every 3 s, even at line rate
let paused = false;
let stripKey = null;  // archive count the strip shows
let stripWanted = null;  // archive count of the latest state
let stripAt = 0;
let stripTimer = null;
const thumbs = new Map();  // archive JSON URL -> its thumbnail button, reused across refreshes

function text(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function pill(id, label, good, detail) {
  const el = $(id);
  el.textContent = detail ? `${label}: ${detail}` : label;
  el.className = "pill " + (good === true ? "good" : good === false ? "bad" : "");
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// ---- live -----------------------------------------------------------------------------------------------

function onFrame(event) {
  const v = event.verdict;
  if (event.image) $("live-img").src = event.image;
  const badge = $("badge");
  badge.textContent = v.ok ? "OK" : "NG";
  badge.className = "badge " + (v.reason ? "failsafe" : v.ok ? "ok" : "ng");
  text("reason", v.reason ? `fail-safe: ${v.reason}` : "");
  text("score", fixed(v.score, 4));
  text("threshold", fixed(v.threshold, 4));
  text("latency", fixed(v.latency_ms && v.latency_ms.total, 1));
  text("frame-id", `#${v.frame_id}` + (v.regions.length ? ` · ${v.regions.length} region(s)` : ""));
  const ratio = typeof v.score === "number" && v.threshold ? v.score / v.threshold : 0;
  const fill = $("scorebar-fill");
  fill.style.width = `${Math.min(100, ratio * 50)}%`;
  fill.className = ratio >= 1 ? "over" : "";
  document.body.dataset.frameSeq = String(event.seq);
}

function onState(doc) {
  const s = doc.status;
  const stats = s.stats || {};
  text("sku", s.sku);
  paused = Boolean(s.paused);
  const runState = s.loading_sku ? `loading ${s.loading_sku}` : paused ? "paused" : s.run_state;
  pill("run-state", runState, paused || s.loading_sku ? null : s.run_state === "running");
  if (paused) {
    $("badge").className = "badge paused";
    $("badge").textContent = "PAUSED";
  }
  $("pause").textContent = paused ? "Resume" : "Pause";
  pill("camera", "camera", Boolean(s.camera_connected), s.camera_connected ? "" : "down");
  pill("broker", "broker", Boolean(s.broker_connected), s.broker_connected ? "" : "down");
  const engine = s.engine || {};
  pill("engine", "engine", engine.error ? false : true, `${engine.backend || "?"} ${engine.precision || ""}`);
  const sku = (doc.skus || {})[s.sku] || {};
  text("sku-frames", sku.frames || 0);
  text("sku-ok", sku.ok || 0);
  text("sku-ng", sku.ng || 0);
  text("sku-failsafe", sku.fail_safe || 0);
  text("frames", stats.frames);
  text("ok", stats.ok);
  text("ng", stats.ng);
  text("fps", fixed(stats.fps, 1));
  text("p50", stats.latency_p50_ms === null ? null : `${fixed(stats.latency_p50_ms, 1)} ms`);
  text("p99", stats.latency_p99_ms === null ? null : `${fixed(stats.latency_p99_ms, 1)} ms`);
  text("queue", s.queued);
  text("spool", s.spool_pending);
  const reasons = Object.entries(stats.fail_safe || {});
  const list = $("failsafe-list");
  list.replaceChildren(...(reasons.length ? reasons : [["none", ""]]).map(([reason, n]) => {
    const li = document.createElement("li");
    li.textContent = n === "" ? reason : `${reason}: ${n}`;
    return li;
  }));
  stripWanted = s.archive ? s.archive.saved : stats.ng;
  if (stripWanted !== stripKey && stripTimer === null) {
    stripTimer = setTimeout(() => {
      stripTimer = null;
      stripKey = stripWanted;
      stripAt = Date.now();
      refreshStrip();
    }, Math.max(0, stripAt + STRIP_PERIOD_MS - Date.now()));
  }
  document.body.dataset.stateSeq = String(Number(document.body.dataset.stateSeq) + 1);
}

function connect() {
  const events = new EventSource("api/events");
  events.onopen = () => {
    document.body.dataset.stream = "live";
    pill("stream", "live", true);
  };
  events.onerror = () => {  // EventSource reconnects by itself
    document.body.dataset.stream = "down";
    pill("stream", "reconnecting", false);
  };
  events.addEventListener("state", (e) => onState(JSON.parse(e.data)));
  events.addEventListener("frame", (e) => onFrame(JSON.parse(e.data)));
}

// ---- NG strip -------------------------------------------------------------------------------------------

async function refreshStrip() {
  let doc;
  try {
    doc = await getJSON("api/ng");
  } catch (error) {
    return;  // the next state event tries again
  }
  const strip = $("strip");
  if (!doc.parts.length) {
    const empty = document.createElement("span");
    empty.className = "empty";
    empty.textContent = doc.archive ? "none yet" : "archive disabled";
    strip.replaceChildren(empty);
    return;
  }
  const shown = new Set(doc.parts.map((part) => part.json));
  for (const url of thumbs.keys()) if (!shown.has(url)) thumbs.delete(url);
  strip.replaceChildren(...doc.parts.map((part) => {
    if (thumbs.has(part.json)) return thumbs.get(part.json);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    const img = document.createElement("img");
    img.src = part.heat || part.image || "";
    img.alt = `NG part ${part.verdict.frame_id}`;
    const label = document.createElement("span");
    const when = new Date(part.verdict.t_acquired * 1000).toLocaleTimeString();
    label.textContent = `#${part.verdict.frame_id} ${when}`;
    button.append(img, label);
    button.addEventListener("click", () => openPart(part));
    thumbs.set(part.json, button);
    return button;
  }));
}

function openPart(part) {
  const v = part.verdict;
  text("part-title", `${v.sku} · frame #${v.frame_id} · ${v.reason ? "fail-safe " + v.reason : "NG"} · score ${fixed(v.score, 4)}`);
  $("part-image").src = part.image || "";
  $("part-heat").src = part.heat || "";
  $("part-json").textContent = JSON.stringify(v, null, 2);
  $("part").showModal();
}

// ---- controls -------------------------------------------------------------------------------------------

function showReply(message, kind) {
  const reply = $("reply");
  reply.textContent = message;
  reply.className = "reply " + kind;
}

async function send(command) {
  const token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  showReply(`${command.cmd} …`, "pending");
  try {
    const response = await fetch("api/cmd", { method: "POST", headers, body: JSON.stringify(command) });
    const reply = await response.json().catch(() => ({ ok: false, error: response.statusText }));
    const detail = reply.ok ? JSON.stringify(reply) : reply.error;
    showReply(`${command.cmd}: ${reply.ok ? "done" : "refused"} (${response.status}) ${detail}`, reply.ok ? "ok" : "error");
  } catch (error) {
    showReply(`${command.cmd}: no answer from the station (${error})`, "error");
  }
}

async function init() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("pause").addEventListener("click", () => send({ cmd: paused ? "resume" : "pause" }));
  $("reload").addEventListener("click", () => send({ cmd: "reload" }));
  $("changeover").addEventListener("click", () => send({ cmd: "sku", sku: $("sku-select").value }));
  $("part-close").addEventListener("click", () => $("part").close());
  connect();
  try {
    const info = await getJSON("api/info");
    const name = `${info.line} / ${info.station}`;
    text("title", name);
    document.title = `${name} – inspection`;
    $("sku-select").replaceChildren(...info.skus.map((sku) => new Option(sku, sku)));
    if (!info.controls) {
      for (const id of ["token", "pause", "reload", "sku-select", "changeover"]) $(id).disabled = true;
      showReply("controls are disabled on this station (no web.token_file)", "pending");
    }
  } catch (error) {
    showReply(`cannot read the station info: ${error}`, "error");
  }
}

init();
