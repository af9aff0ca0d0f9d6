// A small JSON-RPC 2.0 client over one WebSocket: request ids, a map of
// pending calls (each with a timeout), and handlers for notifications.

export class RpcError extends Error {
  constructor(error) {
    super(error && typeof error.message === "string" ? error.message : "JSON-RPC error");
    this.code = error && typeof error.code === "number" ? error.code : 0;
    this.data = error ? error.data : undefined;
  }
}

export class RpcClient {
  constructor(url, { timeoutMs = 30000 } = {}) {
    this.url = url;
    this.timeoutMs = timeoutMs;
    this.nextId = 1;
    this.pending = new Map();
    this.handlers = new Map();
    this.closeHandlers = [];
    this.socket = null;
  }

  // Resolves once the socket is open; rejects if it never opens.
  connect() {
    return new Promise((resolve, reject) => {
      let opened = false;
      const socket = new WebSocket(this.url);
      this.socket = socket;
      socket.addEventListener("open", () => {
        opened = true;
        resolve(this);
      });
      socket.addEventListener("message", (ev) => this._receive(ev.data));
      socket.addEventListener("close", (ev) => {
        this._failAll(new RpcError({ code: -32000, message: "connection closed" }));
        if (!opened) {
          reject(new RpcError({ code: -32000, message: "could not connect" }));
          return;
        }
        for (const handler of this.closeHandlers) handler(ev);
      });
    });
  }

  get open() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  on(method, handler) {
    if (!this.handlers.has(method)) this.handlers.set(method, []);
    this.handlers.get(method).push(handler);
  }

  onClose(handler) {
    this.closeHandlers.push(handler);
  }

  call(method, params, { timeoutMs } = {}) {
    if (!this.open) return Promise.reject(new RpcError({ code: -32000, message: "not connected" }));
    const id = this.nextId++;
    const message = { jsonrpc: "2.0", id, method };
    if (params !== undefined) message.params = params;
    return new Promise((resolve, reject) => {
      const wait = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
      const timer = wait > 0
        ? setTimeout(() => {
          this.pending.delete(id);
          reject(new RpcError({ code: -32000, message: `${method}: no answer within ${wait / 1000} s` }));
        }, wait)
        : null;
      this.pending.set(id, { resolve, reject, timer });
      this.socket.send(JSON.stringify(message));
    });
  }

  close(code = 1000, reason = "") {
    if (this.socket !== null) this.socket.close(code, reason);
  }

  _receive(text) {
    if (typeof text !== "string") return; // binary frames are for voice, not this page
    let message;
    try {
      message = JSON.parse(text);
    } catch (_) {
      return;
    }
    const batch = Array.isArray(message) ? message : [message];
    for (const item of batch) this._dispatch(item);
  }

  _dispatch(message) {
    if (message === null || typeof message !== "object") return;
    if (typeof message.method === "string") {
      if (message.id !== undefined && message.id !== null) {
        // The daemon asks something of this page: it serves nothing.
        this.socket.send(JSON.stringify({
          jsonrpc: "2.0",
          id: message.id,
          error: { code: -32601, message: `the dashboard does not serve ${message.method}` },
        }));
        return;
      }
      for (const handler of this.handlers.get(message.method) || []) {
        try {
          handler(message.params);
        } catch (err) {
          console.error(`handler for ${message.method} failed`, err);
        }
      }
      return;
    }
    const call = this.pending.get(message.id);
    if (call === undefined) return;
    this.pending.delete(message.id);
    if (call.timer !== null) clearTimeout(call.timer);
    if ("error" in message) call.reject(new RpcError(message.error));
    else call.resolve(message.result);
  }

  _failAll(error) {
    for (const call of this.pending.values()) {
      if (call.timer !== null) clearTimeout(call.timer);
      call.reject(error);
    }
    this.pending.clear();
  }
}
