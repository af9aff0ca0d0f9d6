// The agents view: the supervised agents, polled (they send no events).

import { renderChatAgents } from "./chat.js";
import { $, el, errorText, note, td, when } from "./dom.js";
import { call, state } from "./state.js";

const AGENT_LOG_LINES = 6;

export async function refreshAgents(force = false) {
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

// What the view last drew, so that a poll bringing nothing new leaves the
// DOM (and a button under the pointer) alone.
let drawn = null;

function renderAgents() {
  const body = $("agents-table").querySelector("tbody");
  const shown = state.agents.slice(0, 100);
  const signature = JSON.stringify([shown, shown.map((a) => state.agentLogs.get(a.id) || [])]);
  if (signature === drawn) return;
  drawn = signature;
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
