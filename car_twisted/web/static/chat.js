// The chat view: prompts to attached agents and their streamed replies.

import { $, compact, el, errorText } from "./dom.js";
import { call, state } from "./state.js";

export function renderChatAgents() {
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

export async function sendChat(ev) {
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

export function onChatEvent(event) {
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

export async function cancelChat() {
  const sessionId = state.activeChat;
  if (!sessionId) return;
  try {
    await call("agents.chat.cancel", { session_id: sessionId });
  } finally {
    finishChat(sessionId, "cancelled");
  }
}
