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
//   runs      one "runs.record_turns" batch of --batch turns
//             ({"prompt":"p","output":"o"} each) on this connection's
//             current run, acknowledged by the daemon only once the batch's
//             JSONL lines are written to the run file.  Each connection
//             authenticates as agent "bench-<index>" (session.auth
//             {agent_id, token}) and opens a run (runs.start) during set-up.
//             A run takes at most --run-limit turns (the daemon's ceiling):
//             a batch that would pass it goes to a fresh run, started ahead
//             of time (one spare run per connection is kept open), and the
//             full run is closed with runs.complete once its last batch is
//             acknowledged; the runs still open at the end are completed
//             while draining.  A reply with ok:false (e.g. dropped:
//             "run_turn_limit") counts as an error.
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
    batch: 1,
    runLimit: 2000,
  };
  const numeric = new Set([
    "conns", "depth", "seconds", "warmup", "maxRequests", "connectTimeout", "drain",
    "batch", "runLimit",
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
  if (!["echo", "echo2", "callback", "runs"].includes(opts.mode)) {
    throw new Error(`--mode must be echo, echo2, callback or runs, not ${opts.mode}`);
  }
  if (!(opts.batch >= 1 && opts.batch <= opts.runLimit && Number.isInteger(opts.batch))) {
    throw new Error("--batch must be an integer between 1 and --run-limit");
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
  const runStartFrame = JSON.stringify({
    jsonrpc: "2.0", id: 4, method: "runs.start", params: { intent: "bench" },
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
  const runsMode = opts.mode === "runs";
  // runs: the batch is the same every time; only id and run_id change.
  const turnsJson = JSON.stringify(
    Array.from({ length: opts.batch }, () => ({ prompt: "p", output: "o" })));
  const recordMid = ',"method":"runs.record_turns","params":{"run_id":';
  const recordTail = `,"turns":${turnsJson}}}`;
  // Batches that fit in one run (a batch never straddles two).
  const runCapacity = Math.floor(opts.runLimit / opts.batch) * opts.batch;

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
  let runsStarted = 0; // runs mode: runs.start acknowledged
  let runsCompleted = 0; // runs mode: runs.complete acknowledged
  let badRecord = 0; // runs mode: record_turns replies that were not ok:true
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
      nextId: 100, // ids 0, 2, 3 and 4 are the auth, handshake, register and first runs.start
      inFlight: new Map(), // id -> start time of its operation
      firstLeg: new Set(), // echo2: ids of first echoes (a second one follows)
      done: false,
      // runs mode:
      run: null, // current run: {id, reserved (turns sent to it), inFlight, retired}
      spare: null, // a started, unused run id
      startPending: false, // a runs.start is outstanding
      waiting: 0, // batches that could not be sent yet (no run with room)
      batchRun: new Map(), // batch request id -> its run object
      ctrl: new Map(), // control request id -> "start" | "complete"
      closing: false, // runs mode: drained of batches, completing the open runs
    };

    // Start one operation: its first (or only) request.
    const send = () => {
      if (runsMode) {
        const run = runWithRoom();
        if (run === null) {
          conn.waiting++;
          return;
        }
        const id = conn.nextId++;
        run.reserved += opts.batch;
        run.inFlight++;
        conn.batchRun.set(id, run);
        conn.inFlight.set(id, performance.now());
        budget--;
        totalSent++;
        ws.send(reqHead + id + recordMid + JSON.stringify(run.id) + recordTail);
        return;
      }
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
      if (runsMode) requestStart(); // the spare run
      for (let i = 0; i < opts.depth && budget > 0; i++) send();
    };

    // -- runs mode: run rollover --------------------------------------------
    const sendCtrl = (kind, method, params) => {
      const id = conn.nextId++;
      conn.ctrl.set(id, kind);
      ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params }));
    };
    const requestStart = () => {
      if (conn.startPending || conn.spare !== null) return;
      conn.startPending = true;
      sendCtrl("start", "runs.start", { intent: "bench" });
    };
    const completeRun = (run) => {
      run.completed = true;
      sendCtrl("complete", "runs.complete", { run_id: run.id, outcome: null });
    };
    // The run the next batch goes to, rolling over to the spare one when
    // the current run is full; null when no run has room yet.
    const runWithRoom = () => {
      const cur = conn.run;
      if (cur !== null && cur.reserved + opts.batch <= runCapacity) return cur;
      if (cur !== null && !cur.retired) {
        cur.retired = true;
        if (cur.inFlight === 0) completeRun(cur);
      }
      if (conn.spare === null) {
        conn.run = null;
        requestStart();
        return null;
      }
      conn.run = { id: conn.spare, reserved: 0, inFlight: 0, retired: false, completed: false };
      conn.spare = null;
      requestStart();
      return conn.run;
    };
    // After the window: once no batch is in flight, complete the open runs
    // (the current one and the spare), then the connection is drained.
    const finishRuns = () => {
      if (conn.closing || conn.inFlight.size > 0) return;
      conn.closing = true;
      conn.waiting = 0;
      maybeDrained();
    };
    conn.finishRuns = finishRuns;
    const maybeDrained = () => {
      if (!conn.closing || conn.startPending) return; // a started run must be completed too
      if (conn.run !== null && !conn.run.completed && conn.run.inFlight === 0) completeRun(conn.run);
      if (conn.spare !== null) {
        completeRun({ id: conn.spare });
        conn.spare = null;
      }
      if (conn.ctrl.size === 0 && conn.phase === "load") {
        conn.phase = "drained";
        maybeFinish();
      }
    };
    const onCtrlReply = (kind, msg) => {
      if (msg.error !== undefined || msg.result === undefined ||
          (kind === "start" && typeof (msg.result && msg.result.run_id) !== "string") ||
          (kind === "complete" && !(msg.result && msg.result.ok === true))) {
        errors++;
        if (firstError === null) firstError = { [`runs.${kind}`]: msg.error || msg.result };
        if (kind === "start") conn.startPending = false;
        maybeDrained();
        return;
      }
      if (kind === "complete") {
        runsCompleted++;
        maybeDrained();
        return;
      }
      runsStarted++;
      conn.startPending = false;
      conn.spare = msg.result.run_id;
      if (conn.closing) {
        maybeDrained();
        return;
      }
      // Batches held back for want of a run go out now.
      let n = conn.waiting;
      conn.waiting = 0;
      while (n-- > 0 && performance.now() < sendStop && budget > 0) send();
      if (conn.inFlight.size === 0 && !(performance.now() < sendStop && budget > 0)) finishRuns();
    };
    // A record_turns reply for batch id (already removed from inFlight).
    const onBatchReply = (id) => {
      const run = conn.batchRun.get(id);
      conn.batchRun.delete(id);
      run.inFlight--;
      if (run.retired && run.inFlight === 0 && !run.completed) completeRun(run);
    };
    const recordOk = (result) =>
      result !== null && typeof result === "object" && result.ok === true &&
      result.count === opts.batch;

    ws.on("open", () => {
      conn.phase = "auth";
      ws.send(runsMode
        ? JSON.stringify({ jsonrpc: "2.0", id: 0, method: "session.auth",
                           params: { agent_id: `bench-${index}`, token: opts.token } })
        : authFrame);
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
        if (runsMode && conn.ctrl.has(msg.id)) {
          const kind = conn.ctrl.get(msg.id);
          conn.ctrl.delete(msg.id);
          onCtrlReply(kind, msg);
          return;
        }
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
        if (runsMode) onBatchReply(msg.id);
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
        } else if (runsMode && !recordOk(msg.result)) {
          errors++;
          badRecord++;
          if (firstError === null) firstError = msg.result;
        } else {
          opsDone++;
          if (now >= measureStart && now < measureEnd) record(now - sentAt);
        }
        if (now < sendStop && budget > 0) {
          send();
        } else if (runsMode) {
          finishRuns();
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
      } else if (conn.phase === "handshake" && msg.id === 2 && runsMode) {
        conn.phase = "runstart";
        ws.send(runStartFrame);
      } else if (conn.phase === "runstart" && msg.id === 4) {
        if (!msg.result || typeof msg.result.run_id !== "string") {
          fail(`connection ${index}: runs.start answered ${JSON.stringify(msg.result)}`);
          return;
        }
        runsStarted++;
        conn.run = { id: msg.result.run_id, reserved: 0, inFlight: 0, retired: false, completed: false };
        conn.phase = "ready";
        ready++;
        if (ready === opts.conns) startLoad();
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
      // runs: a connection with nothing in flight (all batches waiting for
      // a run) would otherwise never wind down.
      if (runsMode) for (const c of conns) if (c.phase === "load") c.finishRuns();
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
      batch: runsMode ? opts.batch : null,
      turns_per_s: runsMode ? (nLat * opts.batch) / opts.seconds : null,
      turns_acked: runsMode ? opsDone * opts.batch : null,
      runs_started: runsMode ? runsStarted : null,
      runs_completed: runsMode ? runsCompleted : null,
      bad_record_replies: badRecord,
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
