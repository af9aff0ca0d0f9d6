// The dashboard page: a live view of the daemon over /ws.
//
// The socket is already the host's (the session cookie let it in): the
// page negotiates the protocol with server.handshake, subscribes to host
// events, A2UI events and the run it shows, and polls what has no events
// (the supervised agents' status, the request counters).  Daemon data is
// untrusted text: it reaches the DOM only through textContent.
//
// This module boots the page, switches views and wires the socket; each
// view lives in its own module.

import { refreshAgents } from "./agents.js";
import { renderApprovals } from "./approvals.js";
import { cancelChat, onChatEvent, sendChat } from "./chat.js";
import { $, errorText, throttled } from "./dom.js";
import { EVENT_HISTORY, EVENTS_PER_PAGE, mergeEvents, onHostEvent, renderEvents } from "./events.js";
import { pollStats, renderStats, STATS_POLL_MS } from "./metrics.js";
import { RpcClient } from "./rpc.js";
import { onTraceEvent, refreshRuns, renderTrace, resubscribeTrace, RUNS_PER_PAGE, turnPages } from "./runs.js";
import { banner, setConnection, showLoggedOut, state } from "./state.js";
import { loadSurfaces, onA2uiEvent } from "./surfaces.js";

const PROTOCOL_VERSION = 3;
const AGENT_POLL_MS = 2000;
const RUNS_POLL_MS = 5000;

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
