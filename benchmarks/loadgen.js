#!/usr/bin/env node
// Pipelined JSON-RPC-over-WebSocket load generator for benchmarks/run.py.
//
// Opens --conns connections to --url.  Each connection authenticates
// (session.auth with --token), negotiates the protocol (server.handshake),
// and waits for every other connection to do the same.  Then each keeps
// --depth "bench.echo" requests in flight: every reply immediately triggers
// the next request on the same connection.  Replies that arrive during the
// first --warmup seconds are not counted; those that arrive during the
// following --seconds are, with their latency (send to reply).  After that
// window no new request is sent; outstanding replies are drained (bounded
// by --drain seconds) and the sockets are closed.
//
// --mode picks what one measured operation is (latency = start of the
// operation to its end, rps = operations completed per second):
//   echo      one "bench.echo" request and its reply (the default);
//   echo2     two "bench.echo" requests in sequence: the second is sent
//             when the first one's reply arrives; done at the second reply;
//   callback  one "proposal.submit" with a single tool_call action on the
//             tool "echo" (registered with tools.register during set-up).
//             The daemon calls the client back with "tools.execute"; the
//             load generator answers it at once (result = the call's
//             parameters) and the operation is done when the proposal's
//             reply arrives.  A reply whose action did not succeed counts
//             as an error.
// echo2 and callback both cost two network round trips per operation.
//
// The whole run is bounded: at most --max-requests measured-loop requests
// are sent in total, and a hard timer exits the process (status 2) if
// anything hangs.  The result is one JSON object on stdout.
"use strict";

const { performance } = require("node:perf_hooks");
const WebSocket = require("ws");

function parseArgs(argv) {
  const opts = {
    url: null,
    conns: 16,
    depth: 8,
    seconds: 4,
    warmup: 1,
    token: "",
    maxRequests: 20000000,
    connectTimeout: 10,
    drain: 5,
    method: "bench.echo",
    mode: "echo",
  };
  const numeric = new Set([
    "conns", "depth", "seconds", "warmup", "maxRequests", "connectTimeout", "drain",
  ]);
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}`);
    const key = arg.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in opts)) throw new Error(`unknown option ${arg}`);
    const value = argv[++i];
    if (value === undefined) throw new Error(`${arg} needs a value`);
    opts[key] = numeric.has(key) ? Number(value) : value;
    if (numeric.has(key) && !(opts[key] >= 0)) throw new Error(`${arg}: bad number ${value}`);
  }
  if (!opts.url) throw new Error("--url is required");
  if (opts.conns < 1 || opts.depth < 1) throw new Error("--conns and --depth must be >= 1");
  if (!(opts.seconds > 0)) throw new Error("--seconds must be > 0");
  if (!["echo", "echo2", "callback"].includes(opts.mode)) {
    throw new Error(`--mode must be echo, echo2 or callback, not ${opts.mode}`);
  }
  return opts;
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[idx];
}

function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`loadgen: ${e.message}\n`);
    process.exit(64);
  }

  const hardLimitMs =
    (opts.connectTimeout + opts.warmup + opts.seconds + opts.drain + 5) * 1000;
  const hardTimer = setTimeout(() => {
    process.stderr.write(`loadgen: hard time limit (${hardLimitMs} ms) reached; aborting\n`);
    process.exit(2);
  }, hardLimitMs);

  const authFrame = JSON.stringify({
    jsonrpc: "2.0", id: 0, method: "session.auth", params: { token: opts.token },
  });
  const handshakeFrame = JSON.stringify({
    jsonrpc: "2.0",
    id: 2,
    method: "server.handshake",
    params: { protocol_version: 3, client_version: "bench", required_capabilities: [] },
  });
  const registerFrame = JSON.stringify({
    jsonrpc: "2.0", id: 3, method: "tools.register", params: [{ name: "echo" }],
  });
  const reqHead = '{"jsonrpc":"2.0","id":';
  const reqTail = `,"method":${JSON.stringify(opts.method)},"params":{}}`;
  const proposalTail = `,"method":"proposal.submit","params":${JSON.stringify({
    proposal: {
      actions: [{ id: "a1", type: "tool_call", tool: "echo", parameters: { x: 1 } }],
    },
  })}}`;
  const callbackMode = opts.mode === "callback";
  const echo2Mode = opts.mode === "echo2";

  // Shared measurement state.
  let measureStart = Infinity; // performance.now() values, ms
  let measureEnd = Infinity;
  let sendStop = Infinity; // no request is sent at or after this time
  let totalSent = 0;
  let budget = opts.maxRequests;
  let errors = 0;
  let firstError = null;
  let unexpected = 0;
  let opsDone = 0; // operations completed over the whole run (warm-up included)
  let callbacks = 0; // tools.execute requests answered
  let latencies = new Float64Array(1 << 16);
  let nLat = 0;
  let ready = 0;
  let closedEarly = 0;
  let finished = false;
  const conns = [];

  function record(lat) {
    if (nLat === latencies.length) {
      const bigger = new Float64Array(latencies.length * 2);
      bigger.set(latencies);
      latencies = bigger;
    }
    latencies[nLat++] = lat;
  }

  function fail(msg) {
    if (finished) return;
    finished = true;
    process.stderr.write(`loadgen: ${msg}\n`);
    for (const c of conns) c.ws.terminate();
    clearTimeout(hardTimer);
    process.exitCode = 1;
  }

  function makeConn(index) {
    const ws = new WebSocket(opts.url, { perMessageDeflate: false, handshakeTimeout: opts.connectTimeout * 1000 });
    const conn = {
      ws,
      phase: "connecting",
      nextId: 100, // ids 0, 2 and 3 are the auth, handshake and register requests
      inFlight: new Map(), // id -> start time of its operation
      firstLeg: new Set(), // echo2: ids of first echoes (a second one follows)
      done: false,
    };

    // Start one operation: its first (or only) request.
    const send = () => {
      const id = conn.nextId++;
      conn.inFlight.set(id, performance.now());
      budget--;
      totalSent++;
      if (callbackMode) {
        ws.send(reqHead + id + proposalTail);
      } else {
        if (echo2Mode) conn.firstLeg.add(id);
        ws.send(reqHead + id + reqTail);
      }
    };
    // echo2: the second echo of the operation that started at sentAt.
    const sendSecond = (sentAt) => {
      const id = conn.nextId++;
      conn.inFlight.set(id, sentAt);
      totalSent++;
      ws.send(reqHead + id + reqTail);
    };
    // callback: answer the daemon's tools.execute at once.
    const answerCallback = (msg) => {
      callbacks++;
      const p = msg.params;
      const output = p && p.parameters !== undefined ? p.parameters : null;
      ws.send(JSON.stringify({ jsonrpc: "2.0", id: msg.id, result: output }));
    };
    // callback: did the proposal's only action succeed?
    const proposalOk = (result) =>
      result !== null && typeof result === "object" && Array.isArray(result.results) &&
      result.results.length === 1 && result.results[0].status === "succeeded";
    conn.start = () => {
      conn.phase = "load";
      for (let i = 0; i < opts.depth && budget > 0; i++) send();
    };

    ws.on("open", () => {
      conn.phase = "auth";
      ws.send(authFrame);
    });
    ws.on("message", (data, isBinary) => {
      const now = performance.now();
      let msg;
      try {
        msg = JSON.parse(isBinary ? data : data.toString());
      } catch (e) {
        fail(`connection ${index}: unparsable reply: ${String(data).slice(0, 200)}`);
        return;
      }
      if (conn.phase === "load") {
        if (callbackMode && msg.method !== undefined) {
          if (msg.method === "tools.execute" && typeof msg.id === "string") answerCallback(msg);
          else unexpected++;
          return;
        }
        const sentAt = conn.inFlight.get(msg.id);
        if (sentAt === undefined) {
          unexpected++;
          return;
        }
        conn.inFlight.delete(msg.id);
        if (msg.error !== undefined || msg.result === undefined) {
          errors++;
          if (firstError === null) firstError = msg.error || msg;
          conn.firstLeg.delete(msg.id);
        } else if (echo2Mode && conn.firstLeg.delete(msg.id)) {
          sendSecond(sentAt); // the operation goes on, whatever the time
          return;
        } else if (callbackMode && !proposalOk(msg.result)) {
          errors++;
          if (firstError === null) firstError = msg.result;
        } else {
          opsDone++;
          if (now >= measureStart && now < measureEnd) record(now - sentAt);
        }
        if (now < sendStop && budget > 0) {
          send();
        } else if (conn.inFlight.size === 0) {
          conn.phase = "drained";
          maybeFinish();
        }
        return;
      }
      if (msg.error !== undefined) {
        fail(`connection ${index}: ${conn.phase} refused: ${JSON.stringify(msg.error)}`);
        return;
      }
      if (conn.phase === "auth" && msg.id === 0) {
        conn.phase = "handshake";
        ws.send(handshakeFrame);
      } else if (conn.phase === "handshake" && msg.id === 2 && callbackMode) {
        conn.phase = "register";
        ws.send(registerFrame);
      } else if ((conn.phase === "handshake" && msg.id === 2) ||
                 (conn.phase === "register" && msg.id === 3)) {
        conn.phase = "ready";
        ready++;
        if (ready === opts.conns) startLoad();
      } else {
        unexpected++;
      }
    });
    ws.on("error", (err) => {
      if (conn.phase !== "closing") fail(`connection ${index}: ${err.message}`);
    });
    ws.on("close", () => {
      if (conn.phase !== "closing" && conn.phase !== "drained") {
        closedEarly++;
        if (conn.phase !== "load") fail(`connection ${index} closed during ${conn.phase}`);
        else {
          conn.inFlight.clear();
          conn.phase = "drained";
          maybeFinish();
        }
      }
    });
    return conn;
  }

  let started = false;
  function startLoad() {
    if (started || finished) return;
    started = true;
    const t0 = performance.now();
    measureStart = t0 + opts.warmup * 1000;
    measureEnd = measureStart + opts.seconds * 1000;
    sendStop = measureEnd;
    for (const c of conns) c.start();
    // If every connection stalls (no replies), the window still ends here.
    setTimeout(() => {
      sendStop = -Infinity;
      setTimeout(() => report(true), opts.drain * 1000).unref();
    }, measureEnd - t0 + 1).unref();
  }

  function maybeFinish() {
    if (finished) return;
    for (const c of conns) if (c.phase !== "drained") return;
    report(false);
  }

  function report(drainTimedOut) {
    if (finished) return;
    finished = true;
    clearTimeout(hardTimer);
    let outstanding = 0;
    for (const c of conns) {
      outstanding += c.inFlight.size;
      c.phase = "closing";
      c.ws.terminate();
    }
    const lat = latencies.subarray(0, nLat).sort();
    let sum = 0;
    for (let i = 0; i < lat.length; i++) sum += lat[i];
    const result = {
      url: opts.url,
      mode: opts.mode,
      conns: opts.conns,
      depth: opts.depth,
      warmup_s: opts.warmup,
      seconds: opts.seconds,
      completed: nLat,
      rps: nLat / opts.seconds,
      p50_ms: percentile(lat, 0.5),
      p90_ms: percentile(lat, 0.9),
      p99_ms: percentile(lat, 0.99),
      p999_ms: percentile(lat, 0.999),
      max_ms: lat.length ? lat[lat.length - 1] : null,
      mean_ms: lat.length ? sum / lat.length : null,
      sent: totalSent,
      ops_done: opsDone,
      callbacks,
      errors,
      first_error: firstError,
      unexpected,
      closed_early: closedEarly,
      outstanding_at_end: outstanding,
      drain_timed_out: drainTimedOut,
      budget_exhausted: budget <= 0,
    };
    process.stdout.write(JSON.stringify(result) + "\n");
    if (errors > 0 || closedEarly > 0) process.exitCode = 1;
  }

  for (let i = 0; i < opts.conns; i++) conns.push(makeConn(i));
}

main();
