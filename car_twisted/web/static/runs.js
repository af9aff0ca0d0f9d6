// The runs view: the list of runs and the trace of the one opened, live
// while it is in progress.

import { $, compact, el, errorText, show, td, throttled, when } from "./dom.js";
import { call, state } from "./state.js";
import { drawTimeline } from "./svg.js";

export const RUNS_PER_PAGE = 50;
const TURNS_PER_PAGE = 100;

// What the list last drew, so that a poll bringing nothing new leaves the
// DOM alone.
let drawn = null;

export async function refreshRuns(force = false) {
  if (state.rpc === null || state.runs.loading) return;
  if (!force && state.view !== "runs") return;
  state.runs.loading = true;
  state.runs.polledAt = Date.now();
  const params = { limit: RUNS_PER_PAGE, offset: state.runs.offset };
  if (state.runs.agent) params.agent_id = state.runs.agent;
  try {
    const page = await call("runs.list", params);
    state.runs.rows = page.runs || [];
    state.runs.total = typeof page.total === "number" ? page.total : state.runs.rows.length;
    renderRuns();
  } catch (err) {
    state.runs.rows = [];
    state.runs.total = 0;
    renderRuns();
    $("runs-total").textContent = `runs.list failed: ${errorText(err)}`;
  } finally {
    state.runs.loading = false;
  }
}

function renderRuns() {
  const body = $("runs-table").querySelector("tbody");
  const current = state.trace ? state.trace.runId : null;
  const signature = JSON.stringify([state.runs.rows, state.runs.total, state.runs.offset, current]);
  if (signature === drawn) return;
  drawn = signature;
  const rows = state.runs.rows.map((run) => {
    const tr = el("tr", { className: run.run_id === current ? "selected" : "", attrs: { "data-run-id": run.run_id, tabindex: 0 } });
    tr.appendChild(td(when(run.started_at).slice(5), "time"));
    tr.appendChild(td(run.agent_id));
    tr.appendChild(td(compact(run.intent, 120), "intent"));
    tr.appendChild(td(run.status, `status status-${String(run.status).replace(/[^a-z_]/g, "")}`, "run-status"));
    tr.appendChild(td(run.turn_count ?? 0, "num", "run-turns"));
    tr.addEventListener("click", () => openRun(run));
    tr.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") openRun(run);
    });
    return tr;
  });
  body.replaceChildren(...rows);
  const pages = Math.max(1, Math.ceil(state.runs.total / RUNS_PER_PAGE));
  const page = Math.floor(state.runs.offset / RUNS_PER_PAGE) + 1;
  $("runs-page").textContent = `page ${page} of ${pages}`;
  $("runs-total").textContent = `${state.runs.total} run${state.runs.total === 1 ? "" : "s"}`;
  $("runs-newer").disabled = state.runs.offset === 0;
  $("runs-older").disabled = state.runs.offset + RUNS_PER_PAGE >= state.runs.total;
}

async function openRun(run) {
  const previous = state.trace;
  if (previous && previous.runId !== run.run_id && previous.live) {
    call("runs.unsubscribe", { run_id: previous.runId }).catch(() => {});
  }
  state.trace = {
    runId: run.run_id,
    agentId: run.agent_id,
    intent: run.intent,
    startedAt: run.started_at,
    status: run.status,
    turns: [],
    cursor: 0,
    firstIndex: 0,
    live: false,
    page: null, // null: follow the newest page
    selected: null,
  };
  renderRuns();
  renderTrace();
  await subscribeTrace();
}

async function subscribeTrace() {
  const trace = state.trace;
  if (!trace || state.rpc === null) return;
  try {
    const snap = await call("runs.subscribe", { run_id: trace.runId });
    if (state.trace !== trace) return;
    trace.turns = snap.turns_so_far || [];
    trace.cursor = snap.cursor || trace.turns.length;
    trace.firstIndex = snap.truncated ? snap.first_index || 0 : 0;
    trace.status = snap.status || trace.status;
    trace.live = trace.status === "in_progress";
    renderTrace();
  } catch (err) {
    if (state.trace === trace) $("trace-meta").textContent = `runs.subscribe failed: ${errorText(err)}`;
  }
}

export async function resubscribeTrace() {
  if (state.trace) await subscribeTrace();
}

const renderTraceSoon = throttled(() => renderTrace(), 100);

export function onTraceEvent(params) {
  const trace = state.trace;
  if (!trace || !params || params.run_id !== trace.runId) return;
  const record = params.record || {};
  if (typeof params.status === "string") trace.status = params.status;
  if (record.record === "turn") {
    const expected = trace.firstIndex + trace.turns.length;
    if (record.index === expected) {
      trace.turns.push(record);
      trace.cursor = params.cursor;
    } else if (record.index > expected) {
      // Events were dropped while the page was not reading: catch up.
      subscribeTrace();
      return;
    }
  } else if (record.record === "ended") {
    trace.status = record.status || params.status;
    trace.live = false;
  }
  // The run's row in the list follows too.
  const row = state.runs.rows.find((r) => r.run_id === trace.runId);
  if (row) {
    row.status = trace.status;
    row.turn_count = trace.firstIndex + trace.turns.length;
    renderRunsSoon();
  }
  renderTraceSoon();
}

const renderRunsSoon = throttled(() => renderRuns(), 250);

export function turnPages(trace) {
  return Math.max(1, Math.ceil(trace.turns.length / TURNS_PER_PAGE));
}

export function renderTrace() {
  const trace = state.trace;
  const turnsBox = $("trace-turns");
  if (!trace) {
    $("trace-title").textContent = "Trace";
    $("trace-status").textContent = "";
    $("trace-live").hidden = true;
    turnsBox.replaceChildren();
    drawTimeline($("trace-timeline"), []);
    return;
  }
  $("trace-title").textContent = `Run ${trace.runId}`;
  const status = $("trace-status");
  status.textContent = trace.status || "";
  status.className = `status status-${String(trace.status).replace(/[^a-z_]/g, "")}`;
  $("trace-live").hidden = !trace.live;
  const meta = `${trace.agentId} · ${compact(trace.intent, 200)} · started ${when(trace.startedAt)} · ${trace.turns.length} turns`;
  $("trace-meta").textContent = trace.firstIndex ? `${meta} (the newest; ${trace.firstIndex} earlier turns not shown)` : meta;
  const runStart = Date.parse(trace.startedAt);
  drawTimeline($("trace-timeline"), trace.turns, {
    runStart: Number.isNaN(runStart) ? null : runStart,
    selected: trace.selected,
    onSelect: (index) => selectTurn(index),
  });
  const pages = turnPages(trace);
  const page = trace.page === null ? pages - 1 : Math.min(trace.page, pages - 1);
  const start = page * TURNS_PER_PAGE;
  const cards = trace.turns.slice(start, start + TURNS_PER_PAGE).map(turnCard);
  turnsBox.replaceChildren(...cards);
  const last = Math.min(trace.turns.length, start + TURNS_PER_PAGE) - 1;
  $("turns-page").textContent = trace.turns.length
    ? `turns ${start + trace.firstIndex}–${last + trace.firstIndex} · page ${page + 1} of ${pages}`
    : "no turns";
  $("turns-earlier").disabled = page === 0;
  $("turns-later").disabled = page >= pages - 1;
  if (trace.page === null && trace.live) turnsBox.scrollTop = turnsBox.scrollHeight;
}

function turnCard(turn) {
  const card = el("article", {
    className: `turn${state.trace && state.trace.selected === turn.index ? " selected" : ""}`,
    attrs: { "data-turn-index": turn.index, "data-testid": "turn" },
  });
  const head = el("header");
  head.appendChild(el("strong", { text: `#${turn.index}` }));
  for (const key of ["kind", "tool", "status", "verifier_verdict"]) {
    if (turn[key] !== undefined && turn[key] !== null && turn[key] !== "not_run") head.appendChild(el("span", { className: "tag", text: compact(turn[key], 60) }));
  }
  const duration = turn.duration_ms ?? turn.latency_ms;
  if (typeof duration === "number") head.appendChild(el("span", { className: "muted", text: `${duration} ms` }));
  card.appendChild(head);
  const fields = [["prompt", "turn-prompt"], ["parameters", "turn-parameters"], ["output", "turn-output"], ["error", "turn-error"]];
  for (const [key, className] of fields) {
    if (turn[key] === undefined || turn[key] === null) continue;
    card.appendChild(el("div", { className: "field-label", text: key }));
    card.appendChild(el("pre", { className, text: show(turn[key]) }));
  }
  return card;
}

function selectTurn(index) {
  const trace = state.trace;
  if (!trace) return;
  trace.selected = index;
  const position = index - trace.firstIndex;
  if (position >= 0) trace.page = Math.floor(position / TURNS_PER_PAGE);
  renderTrace();
  const card = $("trace-turns").querySelector(`[data-turn-index="${Number(index)}"]`);
  if (card) card.scrollIntoView({ block: "nearest" });
}
