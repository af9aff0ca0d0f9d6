// SVG drawing for the dashboard: the request-rate and latency line charts
// and a run's turn timeline.  Everything is built with createElementNS and
// textContent: no markup is parsed, so daemon text cannot become markup.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, text = undefined) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  if (text !== undefined) el.textContent = text;
  return el;
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

// One series as a line over time in `root` (an <svg>): the y axis from 0
// to a rounded maximum, the newest value printed at the right.
export function drawLineChart(root, points, { label, unit, spanSeconds = 120, className = "series" }) {
  const width = 600;
  const height = 170;
  const pad = { left: 44, right: 10, top: 22, bottom: 20 };
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("role", "img");
  clear(root);
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const defined = points.filter((p) => p.v !== null && Number.isFinite(p.v));
  const last = defined.length ? defined[defined.length - 1] : null;
  const maxY = niceMax(Math.max(0, ...defined.map((p) => p.v)));
  const now = points.length ? points[points.length - 1].t : 0;
  const x = (t) => pad.left + plotW * (1 - Math.min(1, Math.max(0, (now - t) / spanSeconds)));
  const y = (v) => pad.top + plotH * (1 - v / maxY);

  root.appendChild(svg("title", {}, `${label} (${unit})`));
  root.appendChild(svg("text", { x: pad.left, y: 14, class: "chart-label" }, `${label}`));
  root.appendChild(svg("text", {
    x: width - pad.right, y: 14, class: "chart-value", "text-anchor": "end", "data-testid": "chart-value",
  }, last ? `${formatNumber(last.v)} ${unit}` : "–"));
  for (const frac of [0, 0.5, 1]) {
    const gy = pad.top + plotH * (1 - frac);
    root.appendChild(svg("line", { x1: pad.left, x2: width - pad.right, y1: gy, y2: gy, class: "grid" }));
    root.appendChild(svg("text", { x: pad.left - 4, y: gy + 4, class: "axis", "text-anchor": "end" }, formatNumber(maxY * frac)));
  }
  root.appendChild(svg("text", { x: pad.left, y: height - 4, class: "axis" }, `-${spanSeconds}s`));
  root.appendChild(svg("text", { x: width - pad.right, y: height - 4, class: "axis", "text-anchor": "end" }, "now"));

  // Breaks in the data (a failed poll) break the line.
  let d = "";
  let pen = false;
  for (const p of points) {
    if (p.v === null || !Number.isFinite(p.v) || now - p.t > spanSeconds) {
      pen = false;
      continue;
    }
    d += `${pen ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
    pen = true;
  }
  root.appendChild(svg("path", { d, class: `line ${className}` }));
}

function timeOf(value) {
  if (typeof value === "number" && Number.isFinite(value)) return value > 1e11 ? value : value * 1000;
  if (typeof value !== "string") return null;
  const ms = Date.parse(value);
  return Number.isNaN(ms) ? null : ms;
}

function durationOf(turn) {
  for (const key of ["duration_ms", "latency_ms", "elapsed_ms"]) {
    if (typeof turn[key] === "number" && turn[key] >= 0) return turn[key];
  }
  if (typeof turn.duration_secs === "number" && turn.duration_secs >= 0) return turn.duration_secs * 1000;
  return null;
}

// When each turn ran, if the turns say (started_at / ended_at, or a start
// and a duration); null when any turn does not.
export function turnSpans(turns) {
  const spans = [];
  for (const turn of turns) {
    const start = timeOf(turn.started_at ?? turn.timestamp ?? turn.ts);
    if (start === null) return null;
    let end = timeOf(turn.ended_at);
    if (end === null) {
      const duration = durationOf(turn);
      end = duration === null ? start : start + duration;
    }
    spans.push({ turn, start, end: Math.max(start, end) });
  }
  return spans;
}

function statusClass(turn) {
  const status = typeof turn.status === "string" ? turn.status : "";
  if (turn.error || /fail|error|reject|denied/.test(status)) return "bad";
  if (/pending|running|progress/.test(status)) return "live";
  return "ok";
}

function textLength(value) {
  if (value === undefined || value === null) return 0;
  if (typeof value === "string") return value.length;
  try {
    return JSON.stringify(value).length;
  } catch (_) {
    return 0;
  }
}

function seconds(ms) {
  return ms >= 10000 ? `${(ms / 1000).toFixed(0)} s` : `${(ms / 1000).toFixed(1)} s`;
}

// A run's turns as a picture: one bar per turn.  With times, bars sit on
// a time axis from the run's start, stacked in lanes where they overlap;
// without, they stand side by side in order, as tall as their output.
export function drawTimeline(root, turns, { runStart = null, onSelect = null, selected = null } = {}) {
  const width = 800;
  clear(root);
  root.setAttribute("role", "img");
  const spans = turns.length ? turnSpans(turns) : null;
  const title = svg("title", {}, `${turns.length} turns`);
  root.appendChild(title);
  const bars = [];
  let height;
  if (turns.length === 0) {
    height = 40;
    root.appendChild(svg("text", { x: width / 2, y: 24, class: "axis", "text-anchor": "middle" }, "no turns yet"));
  } else if (spans !== null) {
    const t0 = Math.min(runStart ?? Infinity, ...spans.map((s) => s.start));
    const t1 = Math.max(...spans.map((s) => s.end), t0 + 1);
    const left = 8;
    const plotW = width - 16;
    const laneEnds = [];
    const laneHeight = 18;
    const maxLanes = 8;
    const placed = spans.map((s) => {
      let lane = laneEnds.findIndex((end) => end <= s.start);
      if (lane < 0) {
        lane = laneEnds.length < maxLanes ? laneEnds.length : maxLanes - 1;
      }
      laneEnds[lane] = Math.max(laneEnds[lane] ?? 0, s.end);
      return { ...s, lane };
    });
    const lanes = Math.max(1, laneEnds.length);
    height = 26 + lanes * (laneHeight + 4);
    const scale = plotW / (t1 - t0);
    for (const p of placed) {
      const x = left + (p.start - t0) * scale;
      const w = Math.max(2, (p.end - p.start) * scale);
      bars.push({ turn: p.turn, x, y: 4 + p.lane * (laneHeight + 4), w, h: laneHeight,
        label: `turn ${p.turn.index}: ${seconds(p.end - p.start)} from ${seconds(p.start - t0)}` });
    }
    const axisY = height - 4;
    for (let i = 0; i <= 4; i++) {
      const tx = left + (plotW * i) / 4;
      root.appendChild(svg("line", { x1: tx, x2: tx, y1: 0, y2: height - 16, class: "grid" }));
      root.appendChild(svg("text", {
        x: tx, y: axisY, class: "axis", "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle",
      }, `+${seconds(((t1 - t0) * i) / 4)}`));
    }
  } else {
    height = 90;
    const plotH = 64;
    const n = turns.length;
    const slot = (width - 16) / n;
    const sizes = turns.map((t) => Math.log1p(textLength(t.output) + textLength(t.prompt)));
    const maxSize = Math.max(1, ...sizes);
    turns.forEach((turn, i) => {
      const h = Math.max(3, (plotH * sizes[i]) / maxSize);
      bars.push({ turn, x: 8 + i * slot, y: 4 + plotH - h, w: Math.max(1, slot - (slot > 4 ? 2 : 0)), h,
        label: `turn ${turn.index}: ${textLength(turn.output)} characters of output` });
    });
    root.appendChild(svg("text", { x: 8, y: height - 6, class: "axis" }, "turn 0"));
    root.appendChild(svg("text", { x: width - 8, y: height - 6, class: "axis", "text-anchor": "end" },
      `turn ${turns[turns.length - 1].index} (bar height: size of prompt and output)`));
  }
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  for (const bar of bars) {
    const rect = svg("rect", {
      x: bar.x.toFixed(1), y: bar.y.toFixed(1), width: bar.w.toFixed(1), height: bar.h.toFixed(1), rx: 2,
      class: `bar ${statusClass(bar.turn)}${selected === bar.turn.index ? " selected" : ""}`,
      "data-testid": "timeline-bar", "data-turn-index": bar.turn.index,
    });
    const tool = typeof bar.turn.tool === "string" ? ` (${bar.turn.tool})` : "";
    rect.appendChild(svg("title", {}, bar.label + tool));
    if (onSelect) rect.addEventListener("click", () => onSelect(bar.turn.index));
    root.appendChild(rect);
  }
}
