// The surfaces view: A2UI surfaces as cards (surface.js draws each one).

import { $, el, errorText, when } from "./dom.js";
import { call, state } from "./state.js";
import { SurfaceView } from "./surface.js";

export async function loadSurfaces() {
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

export function onA2uiEvent(params) {
  if (!params || typeof params !== "object") return;
  const result = params.result || {};
  if (params.kind === "a2ui.surface_updated" && result.surface) upsertSurface(result.surface);
  else if (params.kind === "a2ui.surface_deleted") removeSurface(result.surfaceId);
  else if (params.kind === "a2ui.gap") loadSurfaces().catch(() => {});
}
