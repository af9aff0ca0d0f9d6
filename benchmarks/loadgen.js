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
//             --output-bytes N makes each turn's output N characters
//             (default 1, "o").  --zero-mask 1 masks the load frames with
//             the all-zero key: at large batches ws's JavaScript masking
//             loop otherwise makes this process the bottleneck.
//             --stalled-subscribers K (with --host-token): for every run
//             this process opens (the first ones during set-up, then each
//             spare), K extra connections subscribe to it and then never
//             read again.  They are raw TCP sockets with a hand-made
//             WebSocket upgrade, authenticated as the host role
//             (session.auth {host_token}) and handshaken ahead of time (a
//             pool of 2 x K x --conns); given a run, one sends
//             runs.subscribe {run_id}, reads up to its reply and pauses the
//             socket (socket.pause()): the daemon's output to it backs up
//             into the kernel buffers, Twisted's write buffer and the
//             daemon's per-subscriber queue, and is then dropped.  A spare
//             run is subscribed to as soon as it is started, and a
//             connection rolls over to it only once its K subscriptions are
//             acknowledged (batches wait otherwise: counted as gate waits),
//             so every turn of every run reaches the subscribers as a live
//             event.  A run's stalled connections are closed (destroyed,
//             unread data and all) once its runs.complete is acknowledged;
//             the set-up waits for the first runs' subscriptions.  At the end,
//             a host connection asks the bench server's bench.sub_stats how
//             the subscriptions fared (queue overflows).  --subscribers-read 1
//             is the control: the same subscribers, but they keep reading
//             (and discarding) everything after the subscribe reply.
//   hold      no load: open --conns connections, authenticate each
//             (session.auth, server.handshake) and keep them open and
//             silent (ws answers the daemon's keep-alive pings), for the
//             connections scenario.  Prints one JSON line
//             {"event":"ready",...} once all are authenticated, then holds
//             them until its stdin closes or --seconds pass, closes them
//             and prints the result line ({"event":"done",...}: among
//             others, how many the daemon closed meanwhile).
// echo2 and callback both cost two network round trips per operation.
//
// --open-window W (any mode): at most W connections are opened and not
// yet authenticated at once; the next one is opened when one's
// session.auth is answered.  The daemon admits only a few unauthenticated
// connections per peer (and in all) and drops the oldest beyond that, so
// hundreds of connections must be opened at a pace it accepts.  0 (the
// default): all at once.
//
// The whole run is bounded: at most --max-requests measured-loop requests
// are sent in total, and a hard timer exits the process (status 2) if
// anything hangs.  The result is one JSON object on stdout.
"use strict";

const crypto = require("node:crypto");
const net = require("node:net");
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
    outputBytes: 1,
    stalledSubscribers: 0,
    hostToken: "",
    subscribersRead: 0,
    zeroMask: 0,
    openWindow: 0,
  };
  const numeric = new Set([
    "conns", "depth", "seconds", "warmup", "maxRequests", "connectTimeout", "drain",
    "batch", "runLimit", "outputBytes", "stalledSubscribers", "subscribersRead", "zeroMask",
    "openWindow",
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
  if (!["echo", "echo2", "callback", "runs", "hold"].includes(opts.mode)) {
    throw new Error(`--mode must be echo, echo2, callback, runs or hold, not ${opts.mode}`);
  }
  if (!Number.isInteger(opts.openWindow)) throw new Error("--open-window must be an integer >= 0");
  if (!(opts.batch >= 1 && opts.batch <= opts.runLimit && Number.isInteger(opts.batch))) {
    throw new Error("--batch must be an integer between 1 and --run-limit");
  }
  if (!(Number.isInteger(opts.outputBytes) && opts.outputBytes >= 1)) {
    throw new Error("--output-bytes must be an integer >= 1");
  }
  if (!Number.isInteger(opts.stalledSubscribers)) {
    throw new Error("--stalled-subscribers must be an integer >= 0");
  }
  if (opts.stalledSubscribers > 0 && (opts.mode !== "runs" || !opts.hostToken)) {
    throw new Error("--stalled-subscribers needs --mode runs and --host-token");
  }
  return opts;
}

// One masked client text frame (RFC 6455 5.2).
function clientFrame(text) {
  const payload = Buffer.from(text);
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x81, 0x80 | n])
    : n < 65536 ? Buffer.from([0x81, 0x80 | 126, n >> 8, n & 0xff])
    : (() => { const b = Buffer.alloc(10); b[0] = 0x81; b[1] = 0x80 | 127;
               b.writeBigUInt64BE(BigInt(n), 2); return b; })();
  const mask = crypto.randomBytes(4);
  for (let i = 0; i < n; i++) payload[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, payload]);
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

  if (opts.mode === "hold") {
    hold(opts);
    return;
  }

  // A paced open (--open-window) takes a while for many connections.
  const openAllowance = opts.openWindow > 0 ? opts.conns / 50 : 0;
  const hardLimitMs =
    (opts.connectTimeout + openAllowance + opts.warmup + opts.seconds + opts.drain + 5) * 1000;
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
  const output = opts.outputBytes === 1 ? "o"
    : "abcdefghijklmnopqrstuvwxyz0123456789 ".repeat(Math.ceil(opts.outputBytes / 37))
      .slice(0, opts.outputBytes);
  const turnsJson = JSON.stringify(
    Array.from({ length: opts.batch }, () => ({ prompt: "p", output })));
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
  let finishing = false; // the end: subscribers closed, asking for bench.sub_stats
  // --stalled-subscribers
  const K = opts.stalledSubscribers;
  const target = new URL(opts.url);
  const stalledAll = new Set(); // every subscriber connection not yet closed by us
  const pool = []; // authenticated host connections not yet given a run
  const poolTarget = K * opts.conns * 2; // two runs' worth per load connection
  const stalled = {
    opened: 0, // host connections opened (the pool included)
    subscribed: 0, // subscribe replies received (then the socket is paused)
    live: 0, // ... of which the run was still in progress (a live subscription)
    late: 0, // ... of which the run already had turns (cursor > 0): never, with the gate
    late_turns: 0, // sum of those cursors (turns in the snapshot, not streamed)
    aborted: 0, // given a run, closed by us before the subscribe reply
    closed_by_server: 0, // closed by the daemon: should not happen within a run
    max_open: 0, // most host connections open at once (pool included)
    subscribe_ms: [], // runs.subscribe sent -> reply
    gate_waits: 0, // roll-overs that waited for the spare run's subscriptions
    gate_wait_ms: 0, // total time batches were held back by those waits
    reading: opts.subscribersRead > 0, // control: the subscribers read (and discard) everything
    bytes_read: 0, // control: bytes read after the subscribe reply
  };

  // A host connection (hand-made WebSocket upgrade, session.auth
  // {host_token}, server.handshake), kept in the pool until given a run.
  function openHost() {
    const sock = net.connect({ host: target.hostname, port: Number(target.port) });
    const st = { sock, runId: null, onSubscribed: null, ready: false, sentAt: 0,
                 closing: false, subscribed: false };
    stalled.opened++;
    stalledAll.add(st);
    if (stalledAll.size > stalled.max_open) stalled.max_open = stalledAll.size;
    const chunks = [];
    let have = 0;
    let need = 2; // bytes needed before the next parse attempt
    let upgraded = false;
    const bad = (msg) => {
      errors++;
      if (firstError === null) firstError = { stalled_subscriber: msg };
      closeStalled(st);
    };
    sock.setNoDelay(true);
    sock.on("connect", () => {
      const key = crypto.randomBytes(16).toString("base64");
      sock.write(`GET ${target.pathname || "/"} HTTP/1.1\r\nHost: ${target.host}\r\n` +
                 `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
                 "Sec-WebSocket-Version: 13\r\n\r\n");
    });
    const onData = (chunk) => {
      chunks.push(chunk);
      have += chunk.length;
      if (have < need) return; // no quadratic re-joining of a large reply
      let buf = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
      chunks.length = 0;
      if (!upgraded) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) {
          chunks.push(buf);
          need = have + 1;
          return;
        }
        const status = buf.subarray(0, buf.indexOf("\r\n")).toString();
        if (!/^HTTP\/1\.1 101 /.test(status)) return bad(`upgrade refused: ${status}`);
        upgraded = true;
        buf = buf.subarray(end + 4);
        // Pipelined: the daemon handles one connection's frames in order.
        sock.write(Buffer.concat([
          clientFrame(JSON.stringify({ jsonrpc: "2.0", id: 0, method: "session.auth",
                                       params: { host_token: opts.hostToken } })),
          clientFrame(handshakeFrame),
        ]));
      }
      while (buf.length >= 2) {
        const op = buf[0] & 0x0f;
        let len = buf[1] & 0x7f;
        let off = 2;
        if (len === 126) {
          off = 4;
          if (buf.length >= 4) len = buf.readUInt16BE(2);
        } else if (len === 127) {
          off = 10;
          if (buf.length >= 10) len = Number(buf.readBigUInt64BE(2));
        }
        if (buf.length < off || buf.length < off + len) break;
        const payload = buf.subarray(off, off + len);
        buf = buf.subarray(off + len);
        if (op === 8) return bad(`closed by the daemon (${payload.subarray(2)})`);
        if (op !== 1) continue; // ping etc.
        let msg;
        try {
          msg = JSON.parse(payload.toString());
        } catch (e) {
          return bad("unparsable frame");
        }
        if (msg.error !== undefined) return bad(`id ${msg.id}: ${JSON.stringify(msg.error)}`);
        if (msg.id === 2) {
          st.ready = true;
          if (st.runId !== null) sendSubscribe(st);
          continue;
        }
        if (msg.id !== 5) continue; // the auth reply
        const r = msg.result;
        if (!r || r.run_id !== st.runId || typeof r.cursor !== "number") {
          return bad(`runs.subscribe answered ${JSON.stringify(r).slice(0, 200)}`);
        }
        // From here on: never read again (the control, --subscribers-read 1:
        // read and discard everything, without parsing).
        sock.removeListener("data", onData);
        if (opts.subscribersRead) sock.on("data", (c) => { stalled.bytes_read += c.length; });
        else sock.pause();
        st.subscribed = true;
        stalled.subscribed++;
        if (r.status === "in_progress") stalled.live++;
        if (r.cursor > 0) {
          stalled.late++;
          stalled.late_turns += r.cursor;
        }
        stalled.subscribe_ms.push(performance.now() - st.sentAt);
        if (st.onSubscribed) st.onSubscribed();
        return;
      }
      if (buf.length) chunks.push(buf);
      have = buf.length;
      need = buf.length < 2 ? 2 : frameNeed(buf);
    };
    sock.on("data", onData);
    sock.on("error", (err) => {
      if (!st.closing) bad(`socket error: ${err.message}`);
    });
    sock.on("close", () => {
      if (!st.closing) {
        stalled.closed_by_server++;
        bad("closed by the daemon");
      }
    });
    return st;
  }

  // Bytes needed for the whole frame starting at buf (or for its header).
  function frameNeed(buf) {
    const len = buf[1] & 0x7f;
    if (len < 126) return 2 + len;
    if (len === 126) return buf.length < 4 ? 4 : 4 + buf.readUInt16BE(2);
    return buf.length < 10 ? 10 : 10 + Number(buf.readBigUInt64BE(2));
  }

  function sendSubscribe(st) {
    st.sentAt = performance.now();
    st.sock.write(clientFrame(JSON.stringify({ jsonrpc: "2.0", id: 5, method: "runs.subscribe",
                                               params: { run_id: st.runId } })));
  }

  function fillPool() {
    while (pool.length < poolTarget && !finished && !finishing) pool.push(openHost());
  }

  function closeStalled(st) {
    if (st.closing) return;
    st.closing = true;
    if (st.runId !== null && !st.subscribed) stalled.aborted++;
    stalledAll.delete(st);
    const i = pool.indexOf(st);
    if (i >= 0) pool.splice(i, 1);
    st.sock.destroy();
  }

  // K subscribers to runId from the pool, remembered on conn; done() when
  // all of them are subscribed.
  function subscribeStalled(conn, runId, done) {
    if (K === 0) {
      if (done) done();
      return;
    }
    let left = K;
    const list = [];
    conn.stalled.set(runId, list);
    for (let i = 0; i < K; i++) {
      const st = pool.length ? pool.shift() : openHost();
      st.runId = runId;
      st.onSubscribed = () => { if (--left === 0 && done) done(); };
      if (st.ready) sendSubscribe(st);
      list.push(st);
    }
    fillPool();
  }

  function releaseStalled(conn, runId) {
    const list = conn.stalled.get(runId);
    if (list === undefined) return;
    conn.stalled.delete(runId);
    for (const st of list) closeStalled(st);
  }

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
    for (const st of [...stalledAll]) closeStalled(st);
    clearTimeout(hardTimer);
    process.exitCode = 1;
  }

  function makeConn(index) {
    const ws = new WebSocket(opts.url, {
      perMessageDeflate: false,
      handshakeTimeout: opts.connectTimeout * 1000,
      // --zero-mask 1: the all-zero masking key (legal); ws then writes the
      // payload as is instead of masking it in JavaScript.  The daemon still
      // unmasks (XOR with zero).
      ...(opts.zeroMask ? { generateMask: (mask) => mask.fill(0) } : {}),
    });
    const conn = {
      ws,
      phase: "connecting",
      nextId: 100, // ids 0, 2, 3 and 4 are the auth, handshake, register and first runs.start
      inFlight: new Map(), // id -> start time of its operation
      firstLeg: new Set(), // echo2: ids of first echoes (a second one follows)
      done: false,
      // runs mode:
      run: null, // current run: {id, reserved (turns sent to it), inFlight, retired}
      spare: null, // a started, unused run: {id, ready (its subscribers are subscribed)}
      gateSince: null, // when batches started waiting for the spare's subscribers
      startPending: false, // a runs.start is outstanding
      waiting: 0, // batches that could not be sent yet (no run with room)
      batchRun: new Map(), // batch request id -> its run object
      ctrl: new Map(), // control request id -> "start" | "complete"
      closing: false, // runs mode: drained of batches, completing the open runs
      stalled: new Map(), // run id -> its stalled subscriber connections
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
      conn.ctrl.set(id, { kind, runId: params.run_id });
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
      if (conn.spare === null || !conn.spare.ready) {
        // The gate: a run is used only once its stalled subscribers are
        // subscribed, so they get every turn as a live event.
        if (conn.spare !== null && conn.gateSince === null) {
          conn.gateSince = performance.now();
          stalled.gate_waits++;
        }
        conn.run = null;
        requestStart();
        return null;
      }
      conn.run = { id: conn.spare.id, reserved: 0, inFlight: 0, retired: false, completed: false };
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
        completeRun({ id: conn.spare.id });
        conn.spare = null;
      }
      if (conn.ctrl.size === 0 && conn.phase === "load") {
        conn.phase = "drained";
        maybeFinish();
      }
    };
    const onCtrlReply = ({ kind, runId }, msg) => {
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
        releaseStalled(conn, runId);
        maybeDrained();
        return;
      }
      runsStarted++;
      conn.startPending = false;
      const spare = { id: msg.result.run_id, ready: false };
      conn.spare = spare;
      subscribeStalled(conn, spare.id, () => {
        spare.ready = true;
        if (conn.spare === spare) releaseWaiting();
      });
      if (conn.closing) maybeDrained();
    };
    // Batches held back for want of a (subscribed) run go out now.
    const releaseWaiting = () => {
      if (conn.closing || conn.phase !== "load") return;
      if (conn.gateSince !== null) {
        stalled.gate_wait_ms += performance.now() - conn.gateSince;
        conn.gateSince = null;
      }
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
          const ctrl = conn.ctrl.get(msg.id);
          conn.ctrl.delete(msg.id);
          onCtrlReply(ctrl, msg);
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
        openNext(); // this one is no guest any more
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
        conn.phase = "subscribers";
        subscribeStalled(conn, conn.run.id, () => {
          if (conn.phase !== "subscribers") return;
          conn.phase = "ready";
          ready++;
          if (ready === opts.conns) startLoad();
        });
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
      setTimeout(() => finishUp(true), opts.drain * 1000).unref();
    }, measureEnd - t0 + 1).unref();
  }

  function maybeFinish() {
    if (finished) return;
    for (const c of conns) if (c.phase !== "drained") return;
    finishUp(false);
  }

  // With stalled subscribers: close the ones left, give the daemon a moment
  // to see the closes, then ask it (bench.sub_stats, on a fresh host
  // connection) how the subscriptions fared.
  function finishUp(drainTimedOut) {
    if (finished || finishing) return;
    if (K === 0) return report(drainTimedOut, null);
    finishing = true;
    for (const st of [...stalledAll]) closeStalled(st);
    setTimeout(() => {
      const ws = new WebSocket(opts.url, { perMessageDeflate: false });
      let stats = null;
      const done = () => {
        clearTimeout(timer);
        ws.terminate();
        finishing = false;
        report(drainTimedOut, stats);
      };
      const timer = setTimeout(done, 5000);
      ws.on("open", () => {
        ws.send(JSON.stringify({ jsonrpc: "2.0", id: 0, method: "session.auth",
                                 params: { host_token: opts.hostToken } }));
        ws.send(handshakeFrame);
        ws.send(JSON.stringify({ jsonrpc: "2.0", id: 6, method: "bench.sub_stats",
                                 params: { reset: true } }));
      });
      ws.on("message", (data) => {
        const msg = JSON.parse(data.toString());
        if (msg.id === 6) {
          stats = msg.result !== undefined ? msg.result : { error: msg.error };
          done();
        }
      });
      ws.on("error", () => done());
    }, 300);
  }

  function report(drainTimedOut, subStats) {
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
      output_bytes: runsMode ? opts.outputBytes : null,
      stalled_subscribers: runsMode ? K : null,
      stalled: K > 0 ? (() => {
        const ms = stalled.subscribe_ms.sort((a, b) => a - b);
        const { subscribe_ms, ...counts } = stalled;
        return { ...counts, subscribe_p50_ms: percentile(ms, 0.5),
                 subscribe_max_ms: ms.length ? ms[ms.length - 1] : null };
      })() : null,
      sub_stats: subStats,
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

  // --open-window: the first W now, then one per authenticated connection.
  let opened = 0;
  function openNext() {
    if (opts.openWindow > 0 && opened < opts.conns && !finished) conns.push(makeConn(opened++));
  }

  fillPool();
  const first = opts.openWindow > 0 ? Math.min(opts.openWindow, opts.conns) : opts.conns;
  while (opened < first) conns.push(makeConn(opened++));
}

// --mode hold: open and authenticate --conns connections, at most
// --open-window of them unauthenticated at once, then hold them silent
// until stdin closes or --seconds pass.
function hold(opts) {
  const window = opts.openWindow > 0 ? opts.openWindow : opts.conns;
  const authFrame = JSON.stringify({
    jsonrpc: "2.0", id: 0, method: "session.auth", params: { token: opts.token },
  });
  const handshakeFrame = JSON.stringify({
    jsonrpc: "2.0", id: 2, method: "server.handshake",
    params: { protocol_version: 3, client_version: "bench", required_capabilities: [] },
  });
  const t0 = performance.now();
  // Opening must progress: at least 50 connections a second on average.
  const openLimitMs = (opts.connectTimeout + opts.conns / 50) * 1000;
  const st = {
    opened: 0, authenticated: 0, held: 0, guests: 0, max_guests: 0,
    closed_by_server: 0, closed_by_server_while_held: 0, errors: 0, first_error: null,
    unexpected: 0, pings: 0,
  };
  const conns = [];
  const authMs = []; // TCP connect started -> session.auth answered
  let readyAt = null;
  let state = "opening"; // -> "holding" -> "closing"
  const error = (msg) => {
    st.errors++;
    if (st.first_error === null) st.first_error = msg;
  };
  const openTimer = setTimeout(() => {
    error(`not all connections authenticated within ${openLimitMs} ms ` +
          `(${st.authenticated} of ${opts.conns})`);
    finish();
  }, openLimitMs);

  const openOne = () => {
    const index = st.opened++;
    st.guests++;
    if (st.guests > st.max_guests) st.max_guests = st.guests;
    const started = performance.now();
    const ws = new WebSocket(opts.url, {
      perMessageDeflate: false, handshakeTimeout: opts.connectTimeout * 1000,
    });
    const c = { ws, phase: "connecting" };
    conns.push(c);
    ws.on("open", () => {
      c.phase = "auth";
      ws.send(authFrame);
    });
    ws.on("ping", () => { st.pings++; }); // ws answers it (autoPong)
    ws.on("message", (data) => {
      let msg;
      try {
        msg = JSON.parse(data.toString());
      } catch (e) {
        error(`connection ${index}: unparsable frame`);
        return;
      }
      if (msg.error !== undefined) {
        error(`connection ${index}: ${c.phase} refused: ${JSON.stringify(msg.error)}`);
        return;
      }
      if (c.phase === "auth" && msg.id === 0) {
        authMs.push(performance.now() - started);
        st.authenticated++;
        st.guests--;
        c.phase = "handshake";
        ws.send(handshakeFrame);
        pump();
      } else if (c.phase === "handshake" && msg.id === 2) {
        c.phase = "held";
        st.held++;
        if (st.held === opts.conns) ready();
      } else {
        st.unexpected++;
      }
    });
    ws.on("error", (err) => {
      if (c.phase !== "closing") error(`connection ${index}: ${err.message}`);
    });
    ws.on("close", () => {
      if (c.phase === "closing") return;
      st.closed_by_server++;
      if (c.phase === "held") {
        st.held--;
        if (state === "holding") st.closed_by_server_while_held++;
      } else {
        error(`connection ${index} closed during ${c.phase}`);
        if (c.phase === "connecting" || c.phase === "auth") st.guests--;
        if (state === "opening") finish(); // it will never be ready
      }
      c.phase = "closed";
    });
  };
  const pump = () => {
    while (state === "opening" && st.guests < window && st.opened < opts.conns) openOne();
  };

  const ready = () => {
    if (state !== "opening") return;
    state = "holding";
    clearTimeout(openTimer);
    readyAt = performance.now();
    const ms = authMs.slice().sort((a, b) => a - b);
    process.stdout.write(JSON.stringify({
      event: "ready", held: st.held, open_s: (readyAt - t0) / 1000,
      opened_per_s: opts.conns / ((readyAt - t0) / 1000),
      auth_p50_ms: percentile(ms, 0.5), auth_p99_ms: percentile(ms, 0.99),
      auth_max_ms: ms.length ? ms[ms.length - 1] : null, max_guests: st.max_guests,
    }) + "\n");
    setTimeout(finish, opts.seconds * 1000).unref();
  };

  let done = false;
  function finish() {
    if (done) return;
    done = true;
    clearTimeout(openTimer);
    const held = st.held;
    state = "closing";
    for (const c of conns) {
      c.phase = "closing";
      c.ws.terminate();
    }
    process.stdout.write(JSON.stringify({
      event: "done", conns: opts.conns, ...st, held_at_end: held,
      held_s: readyAt === null ? null : (performance.now() - readyAt) / 1000,
    }) + "\n");
    process.exit(st.errors > 0 || held !== opts.conns ? 1 : 0);
  }

  process.stdin.on("end", finish);
  process.stdin.on("close", finish);
  process.stdin.resume();
  pump();
}

main();
