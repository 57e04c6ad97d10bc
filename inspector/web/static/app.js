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
  showDrift(s.drift || {});
  showYield(s.trend || {});
  showVersion(s);
  if (Date.now() - trendAt > (trendPoints ? TREND_PERIOD_MS : 1000)) refreshTrend();
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

// ---- drift and trend ------------------------------------------------------------------------------------
// The banner follows the status's `drift` (inspector/drift.py); the chart redraws api/trend every 30 s.

const TREND_PERIOD_MS = 30000;
const SVG_NS = "http://www.w3.org/2000/svg";
let trendAt = 0;
let trendPoints = 0;

function percent(value) {
  return `${(100 * value).toFixed(1)} %`;
}

function showDrift(drift) {
  document.body.dataset.drift = drift.state || "";
  const banner = $("drift-banner");
  const alarms = drift.alarms || [];
  banner.hidden = drift.state !== "drifting" || !alarms.length;
  if (banner.hidden) return;
  const stats = drift.statistics || {};
  const what = alarms.map((name) => {
    const stat = stats[name] || {};
    const sign = name !== "near_threshold" && stat.value > 0 ? "+" : "";
    const value = `${sign}${percent(stat.value)}`;
    return `${name.replace("_", " ")} ${value} (bound ${percent(stat.bound)})`;
  }).join(", ");
  const since = drift.since ? ` since ${new Date(drift.since * 1000).toLocaleTimeString()}` : "";
  banner.textContent = `Drift on ${drift.sku}${since}: ${what}. Check lighting, lens and material; ` +
    "recalibrate if the change is intended.";
}

function showYield(trend) {
  const figure = (totals) => (totals && totals.ng_rate !== null && totals.ng_rate !== undefined
    ? `${totals.ng} (${percent(totals.ng_rate)})` : "–");
  text("ng-hour", figure(trend.last_hour));
  text("ng-shift", figure(trend.shift));
}

function polyline(points, className) {
  const line = document.createElementNS(SVG_NS, "polyline");
  line.setAttribute("class", className);
  line.setAttribute("points", points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  return line;
}

async function refreshTrend() {
  trendAt = Date.now();
  let doc;
  try {
    doc = await getJSON("api/trend");
  } catch (error) {
    return;  // a later state event tries again
  }
  const svg = $("trend");
  const [width, height] = [300, 90];
  const step = doc.bucket_s;
  const buckets = doc.buckets.filter((b) => b.score || b.threshold !== null);
  const t1 = Math.max(doc.now, buckets.length ? buckets[buckets.length - 1].t + step : 0);
  const t0 = Math.min(buckets.length ? buckets[0].t : t1, t1 - 600);  // at least 10 minutes wide
  const top = 1.1 * Math.max(1e-9, ...buckets.map((b) => Math.max(b.threshold || 0, b.score ? b.score.p99 : 0)));
  const x = (t) => ((t - t0) / (t1 - t0)) * width;
  const y = (v) => height - (v / top) * height;
  // each minute's value spans its minute: a step line, drawn even for the first minute alone
  const series = (pick) => buckets.filter((b) => pick(b) !== null)
    .flatMap((b) => [[x(b.t), y(pick(b))], [x(b.t + step), y(pick(b))]]);
  const lines = {
    thr: series((b) => b.threshold),
    p99: series((b) => (b.score ? b.score.p99 : null)),
    p50: series((b) => (b.score ? b.score.p50 : null)),
  };
  svg.replaceChildren(...Object.entries(lines).map(([name, points]) => polyline(points, name)));
  trendPoints = lines.p50.length / 2;
  svg.dataset.points = String(trendPoints);
  const hours = (t1 - t0) / 3600;
  text("trend-span", hours >= 1 ? `· last ${hours.toFixed(0)} h` : `· last ${Math.round(hours * 60)} min`);
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

// ---- review queue ---------------------------------------------------------------------------------------
// Archived parts (NG, sampled OK) for the operator to label; a label is the `review` control (same token).

const REVIEW_BUTTONS = {  // the part's verdict -> [defective label, good label], each [label, button text]
  ng: [["defect_confirmed", "Defect confirmed"], ["false_reject", "False reject"]],
  ok: [["missed_defect", "Missed defect"], ["ok_confirmed", "OK confirmed"]],
};
const REVIEW_TEXT = {
  defect_confirmed: "defect confirmed", false_reject: "false reject", missed_defect: "missed defect",
  ok_confirmed: "OK confirmed",
};
const OPERATOR_KEY = "inspector-operator";
let reviewParts = [];
let reviewSelected = null;  // the selected part's "part"
let reviewDefectTypes = {};

function reviewSummary(review) {
  if (!review) return "not reviewed";
  const type = review.defect_type ? ` · ${review.defect_type}` : "";
  const who = review.operator ? ` by ${review.operator}` : "";
  return `${REVIEW_TEXT[review.label]}${type}${who}, ${new Date(review.t).toLocaleString()}`;
}

async function refreshReview() {
  const query = new URLSearchParams({ show: $("review-show").value, kind: $("review-kind").value });
  let doc;
  try {
    doc = await getJSON(`api/reviews?${query}`);
  } catch (error) {
    showReply(`cannot read the queue: ${error}`, "error", "review-reply");
    return;
  }
  reviewParts = doc.parts;
  reviewDefectTypes = doc.defect_types || {};
  const list = $("review-list");
  if (!doc.parts.length) {
    const empty = document.createElement("span");
    empty.className = "empty";
    empty.textContent = doc.archive ? "no parts" : "archive disabled";
    list.replaceChildren(empty);
  } else {
    list.replaceChildren(...doc.parts.map((part) => {
      const v = part.verdict;
      const item = document.createElement("button");
      item.type = "button";
      item.className = `review-item ${v.ok ? "ok" : "ng"}`;
      item.dataset.part = part.part;
      item.dataset.label = part.review ? part.review.label : "";
      const img = document.createElement("img");
      img.src = part.heat || part.image || "";
      img.alt = `part ${v.frame_id}`;
      const label = document.createElement("span");
      const when = new Date(v.t_acquired * 1000).toLocaleTimeString();
      label.textContent = `${v.ok ? "OK" : "NG"} #${v.frame_id} ${when} · ${fixed(v.score, 3)}`;
      const state = document.createElement("span");
      state.className = "review-state";
      state.textContent = part.review ? REVIEW_TEXT[part.review.label] : "";
      item.append(img, label, state);
      item.addEventListener("click", () => selectReview(part.part));
      return item;
    }));
  }
  const kept = reviewParts.some((part) => part.part === reviewSelected);
  selectReview(kept ? reviewSelected : reviewParts.length ? reviewParts[0].part : null);
}

function selectReview(name) {
  reviewSelected = name;
  for (const item of $("review-list").querySelectorAll(".review-item")) {
    item.classList.toggle("selected", item.dataset.part === name);
  }
  const part = reviewParts.find((p) => p.part === name);
  $("review-detail").hidden = !part;
  if (!part) return;
  const v = part.verdict;
  const kind = v.ok ? "ok" : "ng";
  text("review-title", `${v.sku} · frame #${v.frame_id} · ${kind.toUpperCase()} · ${new Date(v.t_acquired * 1000).toLocaleString()}`);
  $("review-image").src = part.image || "";
  $("review-heat").src = part.heat || "";
  const regions = v.regions.map((r) => `${r.w}×${r.h} px at (${r.x}, ${r.y}), peak ${fixed(r.peak_score, 3)}`);
  const facts = [["score", `${fixed(v.score, 4)} / threshold ${fixed(v.threshold, 4)}`],
                 ["regions", regions.length ? regions.join("; ") : "none"],
                 ...(v.reason ? [["fail-safe", v.reason]] : []),
                 ["review", reviewSummary(part.review)]];
  $("review-facts").replaceChildren(...facts.flatMap(([term, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    return [dt, dd];
  }));
  const [[defectLabel, defectText], [goodLabel, goodText]] = REVIEW_BUTTONS[kind];
  $("review-defect").dataset.label = defectLabel;
  $("review-good").dataset.label = goodLabel;
  text("review-defect", defectText);
  text("review-good", goodText);
  const types = reviewDefectTypes[v.sku] || [];
  $("review-defect-type").replaceChildren(new Option("no defect type", ""), ...types.map((t) => new Option(t, t)));
  $("review-defect-type").hidden = !types.length;
}

async function review(button) {
  const command = { cmd: "review", part: reviewSelected, label: button.dataset.label };
  const operator = $("review-operator").value.trim();
  sessionStorage.setItem(OPERATOR_KEY, operator);
  if (operator) command.operator = operator;
  const type = $("review-defect-type").value;
  if (button.id === "review-defect" && type) command.defect_type = type;
  const reply = await send(command, "review-reply");
  if (reply && reply.ok) await refreshReview();
}

function initReview() {
  $("review-operator").value = sessionStorage.getItem(OPERATOR_KEY) || "";
  $("review-open").addEventListener("click", () => {
    $("review-token").value = $("token").value;
    $("review").showModal();
    refreshReview();
  });
  $("review-close").addEventListener("click", () => $("review").close());
  $("review-token").addEventListener("input", () => { $("token").value = $("review-token").value; });
  for (const id of ["review-show", "review-kind"]) $(id).addEventListener("change", refreshReview);
  $("review-refresh").addEventListener("click", refreshReview);
  for (const id of ["review-defect", "review-good"]) $(id).addEventListener("click", () => review($(id)));
}

// ---- SKU versions ---------------------------------------------------------------------------------------
// The inspecting SKU's versions in the store (api/versions, the `versions` command); Activate and Roll back are
// the `activate` and `rollback` controls (same token), answered once the new version inspects. Further actions
// on versions go in #versions-actions, beside Roll back: Teach (the `teach` control) makes a new version from the
// parts reviewed good, in the background; the status's `teach` says where it stands and the list refreshes when
// it is done.

let versionsKey = null;  // "<sku> <version>" of the status the panel was last refreshed for
let versionsSku = null;  // the SKU the panel lists
let versionsShown = null;  // the api/versions document the rows show (JSON), so an unchanged list is not redrawn

function showVersion(status) {
  const version = status.sku_version || "";
  text("sku-version", version ? `v ${version.slice(0, 8)}` : "");
  $("sku-version").title = version ? `version ${version} · hash ${status.sku_hash}`
    : `not from the version store · meta.json ${status.sku_hash || "–"}`;
  const teach = status.teach || { state: "idle" };
  showTeach(teach);
  const key = `${status.sku} ${version} ${teach.state} ${teach.version || ""}`;
  if ($("versions").open && key !== versionsKey) {
    versionsKey = key;
    refreshVersions();
  }
}

let teaching = false;  // a teach runs: its button stays disabled until the status says it ended

function showTeach(teach) {
  teaching = teach.state === "teaching";
  const messages = {
    teaching: `teaching ${teach.sku} its reviewed good parts …`,
    done: `taught ${teach.sku}: version ${teach.version} (${teach.images} parts) added; activate it to inspect with it`,
    failed: `teaching ${teach.sku} failed: ${teach.error}`,
  };
  if (messages[teach.state]) {
    showReply(messages[teach.state], teach.state === "failed" ? "error" : teach.state === "done" ? "ok" : "pending",
              "versions-teach-state");
  }
  $("versions-teach").disabled = teaching || $("versions-token").disabled || !versionsSku;
}

function versionRow(version, doc) {
  const row = document.createElement("tr");
  const running = version.id === doc.running;
  row.dataset.version = version.id;
  row.dataset.state = running ? "running" : version.active ? "active" : "";
  const cells = [version.id, new Date(version.created).toLocaleString(), version.origin,
                 running ? "inspecting" : version.active ? "active, not loaded" : ""];
  row.append(...cells.map((value) => {
    const cell = document.createElement("td");
    cell.textContent = value;
    return cell;
  }));
  row.children[2].title = version.provenance;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "versions-activate";
  button.textContent = "Activate";
  button.disabled = running || $("versions-token").disabled;
  button.addEventListener("click", () => changeVersion({ cmd: "activate", sku: doc.sku, version: version.id }));
  const action = document.createElement("td");
  action.append(button);
  row.append(action);
  return row;
}

async function refreshVersions() {
  let doc;
  try {
    doc = await getJSON("api/versions");
  } catch (error) {
    showReply(`cannot read the versions: ${error}`, "error", "versions-reply");
    return;
  }
  versionsSku = doc.sku || null;
  text("versions-sku", doc.sku ? `· ${doc.sku}` : "");
  const list = $("versions-list");
  const shown = JSON.stringify(doc);
  // an unchanged list keeps its rows, so a button the operator is about to press is not swapped under the pointer
  if (shown !== versionsShown) {
    versionsShown = shown;
    if (doc.ok) {
      list.replaceChildren(...doc.versions.map((version) => versionRow(version, doc)));
    } else {
      const row = document.createElement("tr");
      const cell = document.createElement("td");
      cell.colSpan = 5;
      cell.className = "empty";
      cell.textContent = doc.error;
      row.append(cell);
      list.replaceChildren(row);
    }
  }
  $("versions-rollback").disabled = !doc.ok || $("versions-token").disabled;
  $("versions-teach").disabled = !doc.ok || $("versions-token").disabled || teaching;
}

async function changeVersion(command) {
  const operator = $("versions-operator").value.trim();
  sessionStorage.setItem(OPERATOR_KEY, operator);
  if (operator) command.operator = operator;
  const reason = $("versions-reason").value.trim();
  if (reason) command.reason = reason;
  for (const button of $("versions").querySelectorAll("button:not(.close)")) button.disabled = true;
  await send(command, "versions-reply");
  versionsShown = null;  // the rows were disabled above: render them afresh
  await refreshVersions();
}

function initVersions() {
  $("versions-open").addEventListener("click", () => {
    $("versions-token").value = $("token").value;
    $("versions-operator").value = sessionStorage.getItem(OPERATOR_KEY) || "";
    $("versions").showModal();
    refreshVersions();
  });
  $("versions-close").addEventListener("click", () => $("versions").close());
  $("versions-token").addEventListener("input", () => { $("token").value = $("versions-token").value; });
  $("versions-rollback").addEventListener("click", () => changeVersion({ cmd: "rollback", sku: versionsSku }));
  $("versions-teach").addEventListener("click", () => changeVersion({ cmd: "teach", sku: versionsSku }));
}

// ---- controls -------------------------------------------------------------------------------------------

function showReply(message, kind, id = "reply") {
  const reply = $(id);
  reply.textContent = message;
  reply.className = "reply " + kind;
}

// POST a control; its reply goes to the element replyId (and is returned, null when the station did not answer).
async function send(command, replyId = "reply") {
  const token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  showReply(`${command.cmd} …`, "pending", replyId);
  try {
    const response = await fetch("api/cmd", { method: "POST", headers, body: JSON.stringify(command) });
    const reply = await response.json().catch(() => ({ ok: false, error: response.statusText }));
    const detail = reply.ok ? JSON.stringify(reply) : reply.error;
    showReply(`${command.cmd}: ${reply.ok ? "done" : "refused"} (${response.status}) ${detail}`, reply.ok ? "ok" : "error",
              replyId);
    return reply;
  } catch (error) {
    showReply(`${command.cmd}: no answer from the station (${error})`, "error", replyId);
    return null;
  }
}

async function init() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("pause").addEventListener("click", () => send({ cmd: paused ? "resume" : "pause" }));
  $("reload").addEventListener("click", () => send({ cmd: "reload" }));
  $("changeover").addEventListener("click", () => send({ cmd: "sku", sku: $("sku-select").value }));
  $("part-close").addEventListener("click", () => $("part").close());
  initReview();
  initVersions();
  connect();
  try {
    const info = await getJSON("api/info");
    const name = `${info.line} / ${info.station}`;
    text("title", name);
    document.title = `${name} – inspection`;
    $("sku-select").replaceChildren(...info.skus.map((sku) => new Option(sku, sku)));
    if (!info.controls) {
      for (const id of ["token", "pause", "reload", "sku-select", "changeover", "versions-token",
                        "versions-rollback", "versions-teach"]) $(id).disabled = true;
      showReply("controls are disabled on this station (no web.token_file)", "pending");
    }
  } catch (error) {
    showReply(`cannot read the station info: ${error}`, "error");
  }
}

init();
