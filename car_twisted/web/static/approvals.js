// The approvals view: pending approvals as cards, the latest resolved ones
// in a table.

import { $, compact, el, errorText, td, when } from "./dom.js";
import { call, state } from "./state.js";

const RESOLVED_SHOWN = 20;

let approvalCards = new Map();

export function renderApprovals() {
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
