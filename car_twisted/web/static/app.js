// The dashboard page: a live view of the daemon over /ws.
//
// The socket is already the host's (the session cookie let it in): the
// page negotiates the protocol with server.handshake, subscribes to host
// events, A2UI events and the run it shows, and polls what has no events
// (the supervised agents' status, the request counters).  Daemon data is
// untrusted text: it reaches the DOM only through textContent.

import { RpcClient } from "./rpc.js";
import { SurfaceView } from "./surface.js";
import { drawLineChart, drawTimeline } from "./svg.js";

const PROTOCOL_VERSION = 3;
const EVENT_BUFFER = 10000; // host events kept in the page
const EVENT_HISTORY = 1000; // asked of host.events (the daemon keeps this many)
const EVENTS_PER_PAGE = 100;
const RUNS_PER_PAGE = 50;
const TURNS_PER_PAGE = 100;
const AGENT_LOG_LINES = 6;
const AGENT_POLL_MS = 2000;
const RUNS_POLL_MS = 5000;
const STATS_POLL_MS = 2000;
const STATS_SAMPLES = 61;
const RESOLVED_SHOWN = 20;
const TEXT_LIMIT = 20000;

const state = {
  session: null,
  rpc: null,
  loggedOut: false,
  loggingOut: false,
  reconnectDelay: 500,
  view: "agents",
  agents: [],
  agentLogs: new Map(),
  agentsPolledAt: 0,
  approvals: new Map(),
  events: [],
  lastEventSeq: 0,
  eventsOffset: 0,
  eventsFilter: "",
  runs: { offset: 0, total: 0, rows: [], agent: "", polledAt: 0, loading: false },
  trace: null,
  chats: new Map(),
  surfaces: new Map(),
  stats: [],
};

// -- small helpers -----------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, { className, text, attrs } = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = clip(String(text));
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
  }
  return node;
}

function clip(text, limit = TEXT_LIMIT) {
  return text.length > limit ? `${text.slice(0, limit)}… (${text.length - limit} more characters)` : text;
}

function show(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch (_) {
    return String(value);
  }
}

function compact(value, limit = 300) {
  if (value === undefined || value === null) return "";
  let text;
  try {
    text = typeof value === "string" ? value : JSON.stringify(value);
  } catch (_) {
    text = String(value);
  }
  return text.length > limit ? `${text.slice(0, limit)}…` : text;
}

function when(iso) {
  if (typeof iso !== "string") return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function clock(iso) {
  if (typeof iso !== "string") return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

// Runs fn at most once per `ms`, after the latest request.
function throttled(fn, ms) {
  let timer = null;
  return () => {
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      fn();
    }, ms);
  };
}

function td(text, className, testid) {
  return el("td", { text, className, attrs: testid ? { "data-testid": testid } : undefined });
}

function note(id, text, bad = false) {
  const target = $(id);
  if (!target) return;
  target.textContent = text;
  target.classList.toggle("bad", bad);
}

function errorText(err) {
  return err && err.message ? err.message : String(err);
}

async function call(method, params, options) {
  if (state.rpc === null) throw new Error("not connected to the daemon");
  return state.rpc.call(method, params, options);
}

// -- views -----------------------------------------------------------------------------------

const VIEWS = ["agents", "runs", "approvals", "events", "chat", "surfaces", "metrics"];

function selectView(view) {
  if (!VIEWS.includes(view)) view = "agents";
  state.view = view;
  for (const section of document.querySelectorAll("section.view[data-view]")) {
    section.hidden = section.dataset.view !== view;
  }
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.classList.toggle("active", tab.dataset.view === view);
    tab.setAttribute("aria-selected", tab.dataset.view === view ? "true" : "false");
  }
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  if (view === "agents") refreshAgents();
  if (view === "runs") refreshRuns();
  if (view === "events") renderEvents();
  if (view === "metrics") renderStats();
}

function setConnection(text, stateName) {
  const badge = $("conn-status");
  badge.textContent = text;
  badge.dataset.state = stateName;
}

function banner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function showLoggedOut(title, text) {
  state.loggedOut = true;
  for (const section of document.querySelectorAll("section.view")) section.hidden = true;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  $("logged-out").hidden = false;
  $("logged-out-title").textContent = title;
  $("logged-out-text").textContent = text;
  setConnection("logged out", "closed");
  document.body.dataset.loggedOut = "1";
}

// -- the connection -------------------------------------------------------------------------

async function connect() {
  if (state.loggedOut) return;
  setConnection("connecting…", "connecting");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const rpc = new RpcClient(`${scheme}//${location.host}${state.session.ws || "/ws"}`);
  rpc.on("host.event", onHostEvent);
  rpc.on("runs.trace.event", onTraceEvent);
  rpc.on("agents.chat.event", onChatEvent);
  rpc.on("a2ui.event", onA2uiEvent);
  rpc.onClose((ev) => {
    if (state.rpc === rpc) state.rpc = null;
    if (state.loggedOut || state.loggingOut) return;
    setConnection(`disconnected (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`, "closed");
    reconnectLater();
  });
  try {
    await rpc.connect();
  } catch (_) {
    reconnectLater();
    return;
  }
  state.rpc = rpc;
  try {
    await rpc.call("server.handshake", { protocol_version: PROTOCOL_VERSION, client_version: "dashboard" });
    const snapshot = await rpc.call("host.subscribe", {});
    state.approvals = new Map();
    for (const approval of snapshot.approvals || []) state.approvals.set(approval.id, approval);
    const identity = snapshot.identity || {};
    $("daemon-identity").textContent = identity.pid ? `pid ${identity.pid}` : "";
    const history = await rpc.call("host.events", { limit: EVENT_HISTORY });
    mergeEvents(history.events || [], true);
    state.reconnectDelay = 500;
    setConnection("connected", "open");
    banner("");
    renderApprovals();
    renderEvents();
    await Promise.all([refreshAgents(true), refreshRuns(true), loadSurfaces(), resubscribeTrace()]);
    document.body.dataset.ready = "1";
  } catch (err) {
    setConnection(`error: ${errorText(err)}`, "closed");
    rpc.close(1000, "setup failed");
  }
}

async function reconnectLater() {
  if (state.loggedOut || state.loggingOut) return;
  // A socket refused at the upgrade may mean the session is gone.
  try {
    const res = await fetch("/api/session", { credentials: "same-origin", cache: "no-store" });
    if (res.status === 401) {
      showLoggedOut("Session ended", "This dashboard session has ended (logged out elsewhere, expired, or the daemon restarted).");
      return;
    }
  } catch (_) {
    // The daemon is down: keep trying.
  }
  const delay = state.reconnectDelay;
  state.reconnectDelay = Math.min(10000, delay * 2);
  setTimeout(connect, delay);
}

// -- agents ----------------------------------------------------------------------------------

async function refreshAgents(force = false) {
  if (state.rpc === null) return;
  if (!force && state.view !== "agents" && state.view !== "chat" && Date.now() - state.agentsPolledAt < 10000) return;
  state.agentsPolledAt = Date.now();
  try {
    const agents = await call("agents.list", {});
    state.agents = Array.isArray(agents) ? agents : [];
    const shown = state.agents.slice(0, 100);
    await Promise.all(shown.map(async (agent) => {
      try {
        const tail = await call("agents.tail_log", { id: agent.id, n: AGENT_LOG_LINES });
        state.agentLogs.set(agent.id, tail.lines || []);
      } catch (_) {
        state.agentLogs.delete(agent.id);
      }
    }));
    renderAgents();
    renderChatAgents();
  } catch (err) {
    note("agents-note", `agents.list failed: ${errorText(err)}`, true);
  }
}

// What a view last drew, so that a poll bringing nothing new leaves the
// DOM (and a button under the pointer) alone.
const drawn = { agents: null, runs: null };

function renderAgents() {
  const body = $("agents-table").querySelector("tbody");
  const shown = state.agents.slice(0, 100);
  const signature = JSON.stringify([shown, shown.map((a) => state.agentLogs.get(a.id) || [])]);
  if (signature === drawn.agents) return;
  drawn.agents = signature;
  const rows = [];
  for (const agent of shown) {
    const tr = el("tr", { attrs: { "data-agent-id": agent.id } });
    const name = el("td", { className: "agent-id" });
    name.appendChild(el("strong", { text: agent.id }));
    const spec = agent.spec || {};
    if (spec.name && spec.name !== agent.id) name.appendChild(el("div", { className: "muted", text: spec.name }));
    tr.appendChild(name);
    const status = td(agent.status, `status status-${String(agent.status).replace(/[^a-z]/g, "")}`, "agent-status");
    tr.appendChild(status);
    tr.appendChild(td(agent.pid ?? "–", "num", "agent-pid"));
    tr.appendChild(td(agent.restart_count ?? 0, "num", "agent-restarts"));
    tr.appendChild(td(agent.attached ? "yes" : "no", agent.attached ? "yes" : "no", "agent-attached"));
    tr.appendChild(td(agent.last_exit_code ?? "–", "num", "agent-exit"));
    tr.appendChild(td(when(agent.started_at), "time"));
    const log = el("td", { className: "log-cell" });
    log.appendChild(el("pre", { className: "log", text: (state.agentLogs.get(agent.id) || []).join("\n"), attrs: { "data-testid": "agent-log" } }));
    tr.appendChild(log);
    const buttons = el("td", { className: "buttons" });
    for (const action of ["start", "stop", "restart"]) {
      const button = el("button", { text: action[0].toUpperCase() + action.slice(1), attrs: { type: "button", "data-action": action } });
      button.addEventListener("click", () => agentAction(agent.id, action, button));
      buttons.appendChild(button);
    }
    tr.appendChild(buttons);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $("agents-empty").hidden = state.agents.length > 0;
}

async function agentAction(id, action, button) {
  button.disabled = true;
  note("agents-note", `${action} ${id}…`);
  // A start or restart of a changed launch spec waits for a person's approval.
  const waiting = setTimeout(() => note("agents-note", `${action} ${id}: waiting (perhaps for an approval)…`), 1500);
  try {
    await call(`agents.${action}`, { id }, { timeoutMs: 120000 });
    note("agents-note", `${action} ${id}: done`);
  } catch (err) {
    note("agents-note", `${action} ${id}: ${errorText(err)}`, true);
  } finally {
    clearTimeout(waiting);
    button.disabled = false;
    refreshAgents(true);
  }
}

// -- runs and the trace ------------------------------------------------------------------------

async function refreshRuns(force = false) {
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
  if (signature === drawn.runs) return;
  drawn.runs = signature;
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

async function resubscribeTrace() {
  if (state.trace) await subscribeTrace();
}

const renderTraceSoon = throttled(() => renderTrace(), 100);

function onTraceEvent(params) {
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

function turnPages(trace) {
  return Math.max(1, Math.ceil(trace.turns.length / TURNS_PER_PAGE));
}

function renderTrace() {
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

// -- approvals ----------------------------------------------------------------------------------

let approvalCards = new Map();

function renderApprovals() {
  const all = Array.from(state.approvals.values());
  const pending = all.filter((a) => a.status === "pending").sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  const resolved = all.filter((a) => a.status !== "pending")
    .sort((a, b) => String(b.resolved_at || b.created_at).localeCompare(String(a.resolved_at || a.created_at)))
    .slice(0, RESOLVED_SHOWN);
  $("approvals-count").textContent = String(pending.length);
  $("approvals-count").classList.toggle("hot", pending.length > 0);
  $("approvals-empty").hidden = pending.length > 0;
  // Cards are kept by id: a card's notes and buttons survive other approvals coming and going.
  const cards = [];
  const keep = new Map();
  for (const approval of pending.slice(0, 200)) {
    const card = approvalCards.get(approval.id) || approvalCard(approval);
    keep.set(approval.id, card);
    cards.push(card);
  }
  approvalCards = keep;
  const box = $("approvals-pending");
  if (cards.length !== box.children.length || cards.some((card, i) => box.children[i] !== card)) box.replaceChildren(...cards);
  const body = $("approvals-resolved").querySelector("tbody");
  body.replaceChildren(...resolved.map((a) => {
    const tr = el("tr", { attrs: { "data-approval-id": a.id } });
    tr.appendChild(td(when(a.resolved_at), "time"));
    tr.appendChild(td(a.title));
    tr.appendChild(td(a.status, `status status-${String(a.status).replace(/[^a-z]/g, "")}`, "approval-outcome"));
    tr.appendChild(td(a.resolved_by || ""));
    tr.appendChild(td(a.notes || ""));
    return tr;
  }));
}

function approvalCard(approval) {
  const card = el("article", { className: "card approval", attrs: { "data-approval-id": approval.id, "data-testid": "approval" } });
  card.appendChild(el("h3", { text: approval.title }));
  if (approval.description) card.appendChild(el("p", { text: approval.description }));
  const facts = el("dl", { className: "facts" });
  const context = approval.context && typeof approval.context === "object" ? approval.context : {};
  const rows = [
    ["requested", when(approval.created_at)],
    ["agent", approval.agent_id],
    ["action", approval.action],
    ["method", context.method],
    ["caller", context.caller],
    ["params", context.params_preview],
  ];
  for (const [key, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    facts.appendChild(el("dt", { text: key }));
    facts.appendChild(el("dd", { text: compact(value, 600) }));
  }
  const others = Object.entries(context).filter(([k]) => !["method", "caller", "params_preview"].includes(k));
  if (others.length) {
    facts.appendChild(el("dt", { text: "context" }));
    facts.appendChild(el("dd", { text: compact(Object.fromEntries(others), 600) }));
  }
  card.appendChild(facts);
  const buttons = el("div", { className: "buttons" });
  const notes = el("input", { attrs: { type: "text", placeholder: "notes (optional)", "aria-label": "Notes", maxlength: 4096 } });
  const approve = el("button", { className: "approve", text: "Approve", attrs: { type: "button", "data-testid": "approve" } });
  const deny = el("button", { className: "deny", text: "Deny", attrs: { type: "button", "data-testid": "deny" } });
  const outcome = el("span", { className: "note", attrs: { "data-testid": "approval-note" } });
  if (approval.client_id) {
    // Raised with host.request_approval: only that connection resolves it.
    outcome.textContent = `raised by connection ${approval.client_id}, which alone may resolve it`;
  }
  const resolve = async (approved) => {
    approve.disabled = deny.disabled = true;
    try {
      const params = { approval_id: approval.id, approved };
      if (notes.value) params.notes = notes.value;
      const done = await call("host.resolve_approval", params);
      state.approvals.set(done.id, done);
      renderApprovals();
    } catch (err) {
      outcome.textContent = errorText(err);
      outcome.classList.add("bad");
      approve.disabled = deny.disabled = false;
    }
  };
  approve.addEventListener("click", () => resolve(true));
  deny.addEventListener("click", () => resolve(false));
  buttons.append(notes, approve, deny, outcome);
  card.appendChild(buttons);
  return card;
}

// -- host events -----------------------------------------------------------------------------------

function eventSeq(event) {
  const match = /(\d+)$/.exec(String(event && event.id));
  return match ? Number(match[1]) : 0;
}

// Appends events newer than the newest held (or, with `rebuild`, merges
// and re-sorts: after a gap, history can fill holes).
function mergeEvents(list, rebuild = false) {
  let added = 0;
  if (rebuild) {
    const byId = new Map(state.events.map((e) => [e.id, e]));
    for (const event of list) {
      if (event && !byId.has(event.id)) {
        byId.set(event.id, event);
        added++;
      }
    }
    state.events = Array.from(byId.values()).sort((a, b) => eventSeq(a) - eventSeq(b));
  } else {
    for (const event of list) {
      const seq = eventSeq(event);
      if (seq <= state.lastEventSeq) continue;
      state.events.push(event);
      added++;
    }
  }
  if (state.events.length) state.lastEventSeq = Math.max(state.lastEventSeq, eventSeq(state.events[state.events.length - 1]));
  if (state.events.length > EVENT_BUFFER) state.events.splice(0, state.events.length - EVENT_BUFFER);
  if (state.eventsOffset > 0 && added > 0 && !state.eventsFilter) state.eventsOffset += added;
  return added;
}

const renderEventsSoon = throttled(() => renderEvents(), 200);
const refreshAgentsSoon = throttled(() => refreshAgents(true), 300);
const flushHostEventsSoon = throttled(() => flushHostEvents(), 100);
let pendingHostEvents = [];

// host.event notifications are queued and taken in batches: a busy daemon
// can send thousands a second, and the page must stay responsive.
function onHostEvent(event) {
  if (event && typeof event === "object") pendingHostEvents.push(event);
  flushHostEventsSoon();
}

function flushHostEvents() {
  const batch = pendingHostEvents;
  pendingHostEvents = [];
  let gap = false;
  let approvals = false;
  let agents = false;
  for (const event of batch) {
    const kind = String(event.kind);
    if (kind === "host.gap") {
      gap = true;
      banner(event.message || "Some host events were dropped; catching up.");
    } else if (kind.startsWith("approval.")) {
      const approval = event.payload && event.payload.approval;
      if (approval && approval.id) {
        state.approvals.set(approval.id, approval);
        approvals = true;
      }
    } else if (kind.startsWith("agent.")) {
      agents = true;
    }
  }
  mergeEvents(batch);
  if (gap) {
    call("host.events", { limit: EVENT_HISTORY }).then((history) => {
      mergeEvents(history.events || [], true);
      renderEventsSoon();
    }).catch(() => {});
  }
  if (approvals) renderApprovals();
  if (agents) refreshAgentsSoon();
  if (state.view === "events") renderEventsSoon();
}

function filteredEvents() {
  const needle = state.eventsFilter.toLowerCase();
  if (!needle) return state.events;
  return state.events.filter((e) =>
    String(e.kind).toLowerCase().includes(needle)
    || String(e.agent_id || "").toLowerCase().includes(needle)
    || String(e.message || "").toLowerCase().includes(needle));
}

function renderEvents() {
  const events = filteredEvents();
  const total = events.length;
  const maxOffset = Math.max(0, Math.floor((total - 1) / EVENTS_PER_PAGE) * EVENTS_PER_PAGE);
  state.eventsOffset = Math.min(state.eventsOffset, maxOffset);
  const end = total - state.eventsOffset;
  const start = Math.max(0, end - EVENTS_PER_PAGE);
  const rows = [];
  for (let i = end - 1; i >= start; i--) {
    const e = events[i];
    const tr = el("tr", { attrs: { "data-event-id": e.id } });
    tr.appendChild(td(clock(e.timestamp), "time"));
    tr.appendChild(td(e.kind, "kind", "event-kind"));
    tr.appendChild(td(e.agent_id || ""));
    tr.appendChild(td(compact(e.message, 300), "", "event-message"));
    tr.appendChild(td(compact(e.payload, 300), "payload"));
    rows.push(tr);
  }
  $("events-table").querySelector("tbody").replaceChildren(...rows);
  const page = Math.floor(state.eventsOffset / EVENTS_PER_PAGE) + 1;
  const pages = Math.max(1, Math.ceil(total / EVENTS_PER_PAGE));
  $("events-page").textContent = `page ${page} of ${pages}`;
  $("events-count").textContent = `${total} events${state.eventsFilter ? " match" : ""} (newest first; the page keeps the last ${EVENT_BUFFER})`;
  $("events-newer").disabled = state.eventsOffset === 0;
  $("events-older").disabled = state.eventsOffset >= maxOffset;
}

// -- chat ------------------------------------------------------------------------------------------------

function renderChatAgents() {
  const select = $("chat-agent");
  const attached = state.agents.filter((a) => a.attached).map((a) => a.id);
  const current = select.value;
  const options = attached.map((id) => el("option", { text: id, attrs: { value: id } }));
  if (options.length === 0) options.push(el("option", { text: "(no attached agent)", attrs: { value: "" } }));
  select.replaceChildren(...options);
  if (attached.includes(current)) select.value = current;
  $("chat-send").disabled = attached.length === 0;
}

function randomId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function sendChat(ev) {
  ev.preventDefault();
  const agentId = $("chat-agent").value;
  const prompt = $("chat-prompt").value.trim();
  if (!agentId || !prompt) return;
  const sessionId = `chat-${randomId()}`;
  const log = $("chat-log");
  log.appendChild(el("div", { className: "bubble user", text: prompt, attrs: { "data-testid": "chat-prompt" } }));
  const reply = el("div", { className: "bubble agent streaming", attrs: { "data-session-id": sessionId, "data-testid": "chat-reply" } });
  reply.appendChild(el("div", { className: "who", text: agentId }));
  const text = el("div", { className: "reply-text", attrs: { "data-testid": "chat-reply-text" } });
  reply.appendChild(text);
  const extras = el("div", { className: "reply-extras" });
  reply.appendChild(extras);
  log.appendChild(reply);
  log.scrollTop = log.scrollHeight;
  state.chats.set(sessionId, { reply, text, extras, agentId, done: false });
  state.activeChat = sessionId;
  $("chat-prompt").value = "";
  $("chat-cancel").disabled = false;
  try {
    await call("agents.chat", { agent_id: agentId, prompt, session_id: sessionId });
  } catch (err) {
    finishChat(sessionId, `error: ${errorText(err)}`, true);
  }
}

function finishChat(sessionId, message, bad = false) {
  const chat = state.chats.get(sessionId);
  if (!chat || chat.done) return;
  chat.done = true;
  chat.reply.classList.remove("streaming");
  chat.reply.dataset.done = "1";
  if (message) chat.extras.appendChild(el("div", { className: bad ? "bad" : "muted", text: message }));
  if (state.activeChat === sessionId) $("chat-cancel").disabled = true;
}

function onChatEvent(event) {
  if (!event || typeof event.session_id !== "string") return;
  const chat = state.chats.get(event.session_id);
  if (!chat) return;
  const kind = event.kind;
  if (kind === "token" && typeof event.delta === "string") {
    chat.text.appendChild(document.createTextNode(event.delta));
  } else if (kind === "done") {
    finishChat(event.session_id, "");
  } else if (kind === "error") {
    finishChat(event.session_id, `error: ${event.message || "the chat failed"}`, true);
  } else if (kind === "approval_pending" && typeof event.approval_id === "string") {
    chat.extras.appendChild(chatApproval(event.session_id, event.approval_id, event));
  } else {
    chat.extras.appendChild(el("div", { className: "muted", text: `${kind}: ${compact(event.message ?? event.payload ?? "", 200)}` }));
  }
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function chatApproval(sessionId, approvalId, event) {
  const box = el("div", { className: "chat-approval", attrs: { "data-approval-id": approvalId } });
  box.appendChild(el("span", { text: `The agent asks for approval${event.message ? `: ${event.message}` : ""}` }));
  const decide = async (approved, button) => {
    for (const b of box.querySelectorAll("button")) b.disabled = true;
    try {
      const answer = await call("agents.chat.approve", { session_id: sessionId, approval_id: approvalId, decision: { approved } });
      box.appendChild(el("span", { className: "muted", text: answer.resolved ? (approved ? " approved" : " denied") : " (the agent did not take it)" }));
    } catch (err) {
      box.appendChild(el("span", { className: "bad", text: ` ${errorText(err)}` }));
      button.disabled = false;
    }
  };
  const yes = el("button", { text: "Approve", attrs: { type: "button" } });
  const no = el("button", { text: "Deny", attrs: { type: "button" } });
  yes.addEventListener("click", () => decide(true, yes));
  no.addEventListener("click", () => decide(false, no));
  box.append(yes, no);
  return box;
}

async function cancelChat() {
  const sessionId = state.activeChat;
  if (!sessionId) return;
  try {
    await call("agents.chat.cancel", { session_id: sessionId });
  } finally {
    finishChat(sessionId, "cancelled");
  }
}

// -- A2UI surfaces ------------------------------------------------------------------------------------

async function loadSurfaces() {
  await call("a2ui/subscribe", {});
  const surfaces = await call("a2ui.surfaces", {});
  const seen = new Set();
  for (const surface of Array.isArray(surfaces) ? surfaces : []) {
    seen.add(surface.surfaceId);
    upsertSurface(surface);
  }
  for (const id of Array.from(state.surfaces.keys())) {
    if (!seen.has(id)) removeSurface(id);
  }
  renderSurfaceCount();
}

function renderSurfaceCount() {
  $("surfaces-count").textContent = String(state.surfaces.size);
  $("surfaces-empty").hidden = state.surfaces.size > 0;
}

function upsertSurface(surface) {
  if (!surface || typeof surface.surfaceId !== "string") return;
  let entry = state.surfaces.get(surface.surfaceId);
  if (!entry) {
    const card = el("article", { className: "card surface-card", attrs: { "data-surface-id": surface.surfaceId, "data-testid": "surface" } });
    const head = el("header");
    const title = el("h3", { text: surface.surfaceId });
    const meta = el("span", { className: "muted" });
    head.append(title, meta);
    const status = el("div", { className: "note surface-status", attrs: { "data-testid": "surface-status" } });
    const view = new SurfaceView(surface, { onAction: (action, button) => sendAction(action, button, status) });
    card.append(head, view.element, status);
    entry = { card, view, meta, status };
    state.surfaces.set(surface.surfaceId, entry);
    $("surfaces-list").appendChild(card);
  } else {
    entry.view.update(surface);
  }
  const owner = surface.owner ? ` · owner ${surface.owner.kind}${surface.owner.taskId ? ` task ${surface.owner.taskId}` : ""}` : "";
  entry.meta.textContent = `updated ${when(surface.updatedAt)}${owner}`;
  renderSurfaceCount();
}

function removeSurface(surfaceId) {
  const entry = state.surfaces.get(surfaceId);
  if (!entry) return;
  entry.card.remove();
  state.surfaces.delete(surfaceId);
  renderSurfaceCount();
}

async function sendAction(action, button, status) {
  if (button) button.disabled = true;
  status.textContent = `sending ${action.name}…`;
  status.classList.remove("bad");
  try {
    const answer = await call("a2ui.action", action, { timeoutMs: 30000 });
    const route = answer && answer.route ? answer.route : {};
    const delivered = route.kind === "a2a" ? (route.delivered ? ", delivered to its A2A task" : `, not delivered: ${route.error || route.status || "?"}`) : "";
    status.textContent = `sent ${action.name}${delivered}`;
  } catch (err) {
    status.textContent = `${action.name} failed: ${errorText(err)}`;
    status.classList.add("bad");
  } finally {
    if (button) button.disabled = false;
  }
}

function onA2uiEvent(params) {
  if (!params || typeof params !== "object") return;
  const result = params.result || {};
  if (params.kind === "a2ui.surface_updated" && result.surface) upsertSurface(result.surface);
  else if (params.kind === "a2ui.surface_deleted") removeSurface(result.surfaceId);
  else if (params.kind === "a2ui.gap") loadSurfaces().catch(() => {});
}

// -- request counters -----------------------------------------------------------------------------------

async function pollStats() {
  if (state.loggedOut) return;
  try {
    const res = await fetch("/api/stats", { credentials: "same-origin", cache: "no-store" });
    if (res.status === 401) {
      showLoggedOut("Session ended", "This dashboard session has ended.");
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const sample = await res.json();
    state.stats.push(sample);
    if (state.stats.length > STATS_SAMPLES) state.stats.shift();
  } catch (_) {
    state.stats.push(null); // a break in the lines
    if (state.stats.length > STATS_SAMPLES) state.stats.shift();
  }
  renderStats();
}

function p95(bounds, counts) {
  const total = counts.reduce((a, b) => a + b, 0);
  if (total === 0) return null;
  let seen = 0;
  for (let i = 0; i < counts.length; i++) {
    seen += counts[i];
    if (seen >= 0.95 * total) return i < bounds.length ? bounds[i] * 1000 : Infinity;
  }
  return null;
}

function renderStats() {
  const rate = [];
  const latency = [];
  let window = null;
  const base = performance.now() / 1000;
  state.stats.forEach((sample, i) => {
    const t = base - (state.stats.length - 1 - i) * (STATS_POLL_MS / 1000);
    const prev = state.stats[i - 1];
    if (!sample || !prev) {
      rate.push({ t, v: null });
      latency.push({ t, v: null });
      return;
    }
    const dt = sample.time - prev.time;
    const dn = sample.requests - prev.requests;
    rate.push({ t, v: dt > 0 ? dn / dt : null });
    latency.push({ t, v: dn > 0 ? ((sample.seconds - prev.seconds) / dn) * 1000 : null });
    window = { dn, buckets: sample.buckets.map((c, k) => c - (prev.buckets[k] || 0)), bounds: sample.bounds };
  });
  const last = [...state.stats].reverse().find((s) => s);
  const lastRate = [...rate].reverse().find((p) => p.v !== null);
  $("header-rate").textContent = lastRate ? `${lastRate.v.toFixed(1)} req/s` : "";
  if (state.view !== "metrics") return;
  const span = ((STATS_SAMPLES - 1) * STATS_POLL_MS) / 1000;
  drawLineChart($("chart-rate"), rate, { label: "requests per second", unit: "req/s", spanSeconds: span, className: "rate" });
  drawLineChart($("chart-latency"), latency, { label: "mean latency", unit: "ms", spanSeconds: span, className: "latency" });
  const summary = $("stats-summary");
  const facts = [];
  if (last) {
    const tail = window && window.dn > 0 ? p95(window.bounds, window.buckets) : null;
    facts.push(["requests", last.requests], ["errors", last.errors], ["in flight", last.in_flight],
      ["sessions", last.sessions], ["p95 (last 2 s)", tail === null ? "–" : tail === Infinity ? "over the top bucket" : `≤ ${tail} ms`],
      ["run turns", last.run_turns], ["agent restarts", last.agent_restarts],
      ["callback timeouts", last.callback_timeouts], ["dropped frames", last.subscriber_drops]);
  }
  summary.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

// -- logout ----------------------------------------------------------------------------------------------

async function logout() {
  $("logout").disabled = true;
  // The daemon closes the page's socket while it answers: that close is expected.
  state.loggingOut = true;
  try {
    const res = await fetch("/logout", {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": state.session.csrf },
    });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    state.loggedOut = true;
    if (state.rpc) state.rpc.close(1000, "logged out");
    showLoggedOut("Logged out", "The session is closed and its socket with it.");
  } catch (err) {
    state.loggingOut = false;
    banner(`Logout failed: ${errorText(err)}`);
    $("logout").disabled = false;
    if (state.rpc === null) reconnectLater();
  }
}

// -- start -----------------------------------------------------------------------------------------------

function wire() {
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => selectView(tab.dataset.view));
  }
  $("logout").addEventListener("click", logout);
  $("agents-refresh").addEventListener("click", () => refreshAgents(true));
  $("runs-refresh").addEventListener("click", () => refreshRuns(true));
  $("runs-newer").addEventListener("click", () => {
    state.runs.offset = Math.max(0, state.runs.offset - RUNS_PER_PAGE);
    refreshRuns(true);
  });
  $("runs-older").addEventListener("click", () => {
    state.runs.offset += RUNS_PER_PAGE;
    refreshRuns(true);
  });
  const filter = $("runs-agent-filter");
  filter.addEventListener("change", () => {
    state.runs.agent = filter.value.trim();
    state.runs.offset = 0;
    refreshRuns(true);
  });
  $("turns-earlier").addEventListener("click", () => {
    const trace = state.trace;
    if (!trace) return;
    const current = trace.page === null ? turnPages(trace) - 1 : trace.page;
    trace.page = Math.max(0, current - 1);
    renderTrace();
  });
  $("turns-later").addEventListener("click", () => {
    const trace = state.trace;
    if (!trace || trace.page === null) return;
    trace.page = trace.page + 1 >= turnPages(trace) - 1 ? null : trace.page + 1;
    renderTrace();
  });
  $("events-newer").addEventListener("click", () => {
    state.eventsOffset = Math.max(0, state.eventsOffset - EVENTS_PER_PAGE);
    renderEvents();
  });
  $("events-older").addEventListener("click", () => {
    state.eventsOffset += EVENTS_PER_PAGE;
    renderEvents();
  });
  $("events-latest").addEventListener("click", () => {
    state.eventsOffset = 0;
    renderEvents();
  });
  $("events-filter").addEventListener("input", throttled(() => {
    state.eventsFilter = $("events-filter").value.trim();
    state.eventsOffset = 0;
    renderEvents();
  }, 150));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-cancel").addEventListener("click", cancelChat);
  $("chat-prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("chat-form").requestSubmit();
  });
  // Supervised agents send no events: poll them (every 10 s while another view is shown).
  setInterval(() => refreshAgents(), AGENT_POLL_MS);
  setInterval(() => {
    if (state.view === "runs" && state.runs.offset === 0 && Date.now() - state.runs.polledAt >= RUNS_POLL_MS) refreshRuns();
  }, 1000);
  setInterval(pollStats, STATS_POLL_MS);
}

async function boot() {
  let res;
  try {
    res = await fetch("/api/session", { credentials: "same-origin", cache: "no-store" });
  } catch (err) {
    showLoggedOut("Unreachable", `The daemon did not answer: ${errorText(err)}`);
    return;
  }
  if (res.status === 401) {
    showLoggedOut("Not logged in", "This browser has no dashboard session.");
    return;
  }
  state.session = await res.json();
  $("daemon-version").textContent = `car-twisted ${state.session.version}`;
  wire();
  selectView(location.hash.replace(/^#/, "") || "agents");
  pollStats();
  await connect();
}

boot();
