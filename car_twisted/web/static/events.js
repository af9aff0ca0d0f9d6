// Host events: the batched host.event handler (which also feeds the
// approvals and agents views) and the events view.

import { refreshAgents } from "./agents.js";
import { renderApprovals } from "./approvals.js";
import { $, clock, compact, el, td, throttled } from "./dom.js";
import { banner, call, state } from "./state.js";

const EVENT_BUFFER = 10000; // host events kept in the page
export const EVENT_HISTORY = 1000; // asked of host.events (the daemon keeps this many)
export const EVENTS_PER_PAGE = 100;

function eventSeq(event) {
  const match = /(\d+)$/.exec(String(event && event.id));
  return match ? Number(match[1]) : 0;
}

// Appends events newer than the newest held (or, with `rebuild`, merges
// and re-sorts: after a gap, history can fill holes).
export function mergeEvents(list, rebuild = false) {
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
export function onHostEvent(event) {
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

export function renderEvents() {
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
