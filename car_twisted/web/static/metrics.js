// The metrics view: /api/stats polled, drawn as rate and latency charts
// (the request rate also shows in the header on every view).

import { $, el } from "./dom.js";
import { showLoggedOut, state } from "./state.js";
import { drawLineChart } from "./svg.js";

export const STATS_POLL_MS = 2000;
const STATS_SAMPLES = 61;

export async function pollStats() {
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

export function renderStats() {
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
