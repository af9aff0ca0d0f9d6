// The page's shared state, the RPC call through the current socket, and
// the page-wide chrome (connection badge, banner, logged-out panel).

import { $ } from "./dom.js";

export const state = {
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

export async function call(method, params, options) {
  if (state.rpc === null) throw new Error("not connected to the daemon");
  return state.rpc.call(method, params, options);
}

export function setConnection(text, stateName) {
  const badge = $("conn-status");
  badge.textContent = text;
  badge.dataset.state = stateName;
}

export function banner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

export function showLoggedOut(title, text) {
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
