// keen-client.js: a small client for the keen_stream hub's WebSocket protocol (docs/protocol.md),
// an ES module with no dependencies and no build step. Served by the hub at
// /monitor/keen-client.js; docs/monitor.md describes its API.
//
// It follows the same rules as the Python client (keen_stream/client.py):
// - reconnects by itself, round robin over the hub URLs, with exponential backoff and jitter
//   (each wait drawn between half and all of min(backoffMax, backoffInitial * 2**failures); a
//   connection that had worked is retried at once, after a little jitter);
// - authenticates again (an `auth` frame: browsers cannot set headers on a WebSocket, and a
//   token never goes in a URL) and resubscribes with `since` = the cursor of the last event it
//   handed out, dropping events at or before it (cursors compared as pairs of integers), so
//   the caller sees each event once, in cursor order;
// - `recovered: false` is an explicit signal (onGap, status "reloading"): reload state and go
//   on from the gap's cursor;
// - closes 1009, 4001, 4003, 4004, 4005, 4006 are not retried (onError gets a StreamClosedError);
// - a connection with no traffic for pingTimeout after a ping is dropped and reconnected.
// It never logs, and never puts the token anywhere but the auth frame.

const CURSOR = /^[0-9]{1,19}-[0-9]{1,19}$/;

/** A cursor "<xid>-<id>" as the pair of integers it is ordered by (BigInts: 19 digits). */
export function parseCursor(text) {
  if (typeof text !== "string" || !CURSOR.test(text)) {
    throw new TypeError(`not a stream cursor: ${String(text).slice(0, 40)}`);
  }
  const [xid, id] = text.split("-");
  return [BigInt(xid), BigInt(id)];
}

/** -1, 0 or 1 as cursor `a` is before, at or after cursor `b`. */
export function compareCursors(a, b) {
  const [ax, ai] = parseCursor(a);
  const [bx, bi] = parseCursor(b);
  if (ax !== bx) return ax < bx ? -1 : 1;
  if (ai !== bi) return ai < bi ? -1 : 1;
  return 0;
}

/** Milliseconds to wait before attempt `failures` + 1 (0 failures: the connection had worked). */
export function backoffDelay(failures, initial, max, random = Math.random) {
  if (failures === 0) return random() * initial;
  const ceiling = Math.min(max, initial * 2 ** Math.min(failures, 30));
  return ceiling / 2 + (random() * ceiling) / 2;
}

/** Close codes after which a new attempt cannot succeed, and their names. */
export const FATAL_CLOSES = Object.freeze({
  1009: "frame_too_large",
  4001: "authentication_failed",
  4003: "token_rejected",
  4004: "token_expired",
  4005: "token_revoked",
  4006: "account_inactive",
});

/** `error` codes after which the same subscribe is sent again, after a backoff. */
const RETRY_ERRORS = new Set(["unavailable", "since_expired", "rate_limited", "internal_error"]);

/** The hub closed with a code that says retrying will not help (`code`, `reason`, `kind`). */
export class StreamClosedError extends Error {
  constructor(code, reason) {
    super(`the hub closed the connection: ${code} ${reason || ""}`.trim());
    this.name = "StreamClosedError";
    this.code = code;
    this.reason = reason || "";
    this.kind = FATAL_CLOSES[code] || "closed";
  }
}

/** The hub refused the subscribe (`errorCode`: session_not_found, forbidden, ...). */
export class SubscriptionRejectedError extends Error {
  constructor(errorCode, message) {
    super(`${errorCode}: ${message}`);
    this.name = "SubscriptionRejectedError";
    this.errorCode = errorCode;
  }
}

/** `recovered: false` with no onGap handler: reload state, then follow from `cursor`. */
export class StreamGapError extends Error {
  constructor(gap) {
    super(`events after ${gap.since} cannot be recovered (${gap.reason}); resume at ${gap.cursor}`);
    this.name = "StreamGapError";
    Object.assign(this, gap);
  }
}

/** Too many attempts in a row failed (`maxAttempts`). */
export class StreamUnavailableError extends Error {
  constructor(failures, cause) {
    super(`${failures} attempts in a row failed: ${cause}`);
    this.name = "StreamUnavailableError";
  }
}

/**
 * new KeenClient(urls, {token | tokenProvider, ...}): follows the hub's event stream.
 * `urls`: one WebSocket URL or several (round robin). `tokenProvider`: a function returning a
 * token or a promise of one, called at every connection attempt. Times in milliseconds.
 */
export class KeenClient {
  constructor(urls, options = {}) {
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    if (this.urls.length === 0) throw new TypeError("at least one hub URL is needed");
    const { token, tokenProvider } = options;
    if ((token == null) === (tokenProvider == null)) {
      throw new TypeError("pass either token or tokenProvider");
    }
    this._tokenProvider = tokenProvider || (() => token);
    this.refreshable = tokenProvider != null;
    this.clientType = options.clientType ?? "browser";
    this.backoffInitial = options.backoffInitial ?? 500;
    this.backoffMax = options.backoffMax ?? 30000;
    this.maxAttempts = options.maxAttempts ?? null;
    this.openTimeout = options.openTimeout ?? 10000;
    this.pingInterval = options.pingInterval ?? 25000;
    this.pingTimeout = options.pingTimeout ?? 10000;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.random = options.random ?? Math.random;
    this._next = 0;
    this._subscriptions = new Set();
  }

  /** Start a subscription on a connection of its own; see Subscription. */
  subscribe(options = {}) {
    const sub = new Subscription(this, options);
    this._subscriptions.add(sub);
    sub._start();
    return sub;
  }

  /** End every subscription. */
  close() {
    for (const sub of [...this._subscriptions]) sub.close();
  }

  _url() {
    const url = this.urls[this._next % this.urls.length];
    this._next += 1;
    return url;
  }

  _delay(failures) {
    return backoffDelay(failures, this.backoffInitial, this.backoffMax, this.random);
  }

  async _token() {
    const value = await this._tokenProvider();
    if (typeof value !== "string" || !value) {
      throw new TypeError("tokenProvider must return a non-empty string");
    }
    return value;
  }
}

/**
 * One subscription (docs/protocol.md, section 2). Options: scope, sessions, events, since, and
 * the callbacks onEvent(event), onStatus(status, detail), onGap(gap) (may return a promise:
 * events wait for it), onReady(readyFrame), onError(error) (the subscription has ended).
 * Also an async iterator of events (`for await (const event of sub)`).
 *
 * `status`: "connecting" (first attempt), "live" (subscribed), "reconnecting" (the connection
 * ended, waiting or retrying), "reloading" (recovered: false, while onGap runs), "closed",
 * "failed". `cursor`: the resume point (the last event handed out). `reconnects`: how many.
 */
export class Subscription {
  constructor(client, options) {
    this.client = client;
    this.options = options;
    this.cursor = options.since ?? null;
    if (this.cursor !== null) parseCursor(this.cursor);
    this.status = "idle";
    this.ready = null;
    this.reconnects = 0;
    this.error = null;
    this._failures = 0;
    this._ws = null;
    this._timers = new Set();
    this._chain = Promise.resolve();
    this._queue = [];
    this._waiters = [];
    this._iterating = false;
    this._refreshed = false;
  }

  close() {
    if (this.status === "closed" || this.status === "failed") return;
    this._end("closed", null);
  }

  [Symbol.asyncIterator]() {
    this._iterating = true;
    return {
      next: () => {
        if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
        if (this.error) return Promise.reject(this.error);
        if (this.status === "closed") return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
      },
      return: () => {
        this.close();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }

  // --- internals ------------------------------------------------------------------------------
  _setStatus(status, detail = {}) {
    if (this.status === status && status !== "reconnecting") return;
    this.status = status;
    this.options.onStatus?.(status, detail);
  }

  _later(fn, ms) {
    const handle = setTimeout(() => {
      this._timers.delete(handle);
      fn();
    }, ms);
    this._timers.add(handle);
    return handle;
  }

  _clearTimers() {
    for (const handle of this._timers) clearTimeout(handle);
    this._timers.clear();
    clearInterval(this._pinger);
  }

  _ended() {
    return this.status === "closed" || this.status === "failed";
  }

  _start() {
    this._setStatus("connecting");
    this._connect();
  }

  async _connect() {
    if (this._ended()) return;
    const client = this.client;
    const url = client._url();
    let token;
    try {
      token = await client._token();
    } catch (error) {
      this._end("failed", error);
      return;
    }
    if (this._ended()) return;
    let ws;
    try {
      ws = new client.WebSocket(url);
    } catch (error) {
      this._retry(String(error), true);
      return;
    }
    const conn = { ws, authenticated: false, pongTimer: null };
    this._ws = conn;
    const opened = this._later(() => this._drop(conn, "no ready frame in time", true), client.openTimeout);
    ws.onopen = () => {
      // The token goes in the first frame only, never in the URL (the hub refuses that).
      ws.send(JSON.stringify({ type: "auth", token, client_type: client.clientType }));
    };
    ws.onmessage = (message) => {
      if (this._ws !== conn) return;
      this._alive(conn);
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      if (frame && frame.type === "ready") clearTimeout(opened);
      // Frames are handled one after another, even when onGap returns a promise.
      this._chain = this._chain.then(() => this._handle(conn, frame)).catch((error) => {
        this._end("failed", error);
      });
    };
    ws.onclose = (event) => {
      if (this._ws !== conn) return;
      clearTimeout(opened);
      this._chain = this._chain.then(() => this._closed(conn, event.code, event.reason));
    };
    ws.onerror = () => {}; // a close event follows
  }

  /** Traffic proves the connection alive: cancel the pending ping timeout. */
  _alive(conn) {
    if (conn.pongTimer !== null) {
      clearTimeout(conn.pongTimer);
      this._timers.delete(conn.pongTimer);
      conn.pongTimer = null;
    }
  }

  _startPinging(conn) {
    clearInterval(this._pinger);
    let n = 0;
    this._pinger = setInterval(() => {
      if (this._ws !== conn || conn.pongTimer !== null) return;
      n += 1;
      conn.ws.send(JSON.stringify({ type: "ping", id: n }));
      conn.pongTimer = this._later(
        () => this._drop(conn, "no answer to a ping", false),
        this.client.pingTimeout,
      );
    }, this.client.pingInterval);
  }

  _sendSubscribe(conn) {
    const o = this.options;
    const frame = { type: "subscribe", id: "keen-client" };
    if (o.scope != null) frame.scope = o.scope;
    if (o.sessions != null) frame.sessions = [...o.sessions].map(String);
    if (o.events != null) frame.events = [...o.events];
    if (this.cursor !== null) frame.since = this.cursor;
    conn.ws.send(JSON.stringify(frame));
  }

  async _handle(conn, frame) {
    if (this._ws !== conn || !frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "ready":
        conn.authenticated = true;
        this.ready = frame;
        this.options.onReady?.(frame);
        this._startPinging(conn);
        this._sendSubscribe(conn);
        return;
      case "subscribed":
        await this._subscribed(conn, frame);
        return;
      case "event":
        this._event(frame);
        return;
      case "error":
        this._error(conn, frame);
        return;
      default: // pong, unsubscribed: nothing to do
    }
  }

  async _subscribed(conn, frame) {
    this._failures = 0;
    this._refreshed = false; // the connection works: its token's expiry is a new one to refresh
    const cursor = String(frame.cursor);
    if (frame.recovered !== false) {
      if (this.cursor === null) this.cursor = cursor; // a fresh subscription starts here
      this._setStatus("live", { cursor: this.cursor });
      return;
    }
    const gap = { reason: String(frame.reason || "unknown"), cursor, since: this.cursor };
    this.cursor = cursor; // whatever the caller does next starts from the new position
    if (!this.options.onGap) throw new StreamGapError(gap);
    this._setStatus("reloading", gap);
    await this.options.onGap(gap);
    if (this._ws === conn) this._setStatus("live", { cursor: this.cursor });
  }

  _event(frame) {
    if (this.cursor !== null && compareCursors(frame.cursor, this.cursor) <= 0) {
      return; // already handed out (a replay overlapping what we have)
    }
    this.cursor = frame.cursor;
    this.options.onEvent?.(frame);
    if (this._iterating) {
      const waiter = this._waiters.shift();
      if (waiter) waiter.resolve({ value: frame, done: false });
      else this._queue.push(frame);
    }
  }

  _error(conn, frame) {
    const code = String(frame.code);
    const message = String(frame.message || "");
    if (!RETRY_ERRORS.has(code)) throw new SubscriptionRejectedError(code, message);
    // The subscribe did not take, or its replay stopped: the same subscribe, from the cursor.
    if (!this._countFailure(`${code}: ${message}`)) return;
    this._later(() => {
      if (this._ws === conn) this._sendSubscribe(conn);
    }, this.client._delay(this._failures));
  }

  _closed(conn, code, reason) {
    if (this._ws !== conn || this._ended()) return;
    const fatal = FATAL_CLOSES[code];
    if (code === 4004 && conn.authenticated && this.client.refreshable && !this._refreshed) {
      // Expired while connected: once more with a fresh token (again after each connection
      // that subscribed, so an hourly token on a quiet stream is refreshed every hour).
      this._refreshed = true;
      this._reconnect(0);
      return;
    }
    if (fatal) {
      this._end("failed", new StreamClosedError(code, reason));
      return;
    }
    this._retry(`closed ${code} ${reason || ""}`.trim(), !(conn.authenticated && this._failures === 0));
  }

  /** Give up on `conn` now (no waiting for a close handshake a dead peer never answers). */
  _drop(conn, why, failed) {
    if (this._ws !== conn || this._ended()) return;
    this._detach(conn);
    this._retry(why, failed);
  }

  _detach(conn) {
    const ws = conn.ws;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(1000);
    } catch {
      // already closing
    }
    if (this._ws === conn) this._ws = null;
    clearInterval(this._pinger);
  }

  _retry(why, failed) {
    if (this._ended()) return;
    if (this._ws) this._detach(this._ws);
    if (failed) {
      if (!this._countFailure(why)) return;
    }
    this._reconnect(failed ? this._failures : 0, why);
  }

  _countFailure(why) {
    this._failures += 1;
    const limit = this.client.maxAttempts;
    if (limit !== null && this._failures >= limit) {
      this._end("failed", new StreamUnavailableError(this._failures, why));
      return false;
    }
    return true;
  }

  _reconnect(failures, why = "") {
    if (this._ws) this._detach(this._ws);
    const delay = this.client._delay(failures);
    this._setStatus("reconnecting", { why, delay, attempt: this._failures + 1 });
    this._later(() => {
      if (this._ended()) return;
      this.reconnects += 1;
      this._connect();
    }, delay);
  }

  _end(status, error) {
    this._clearTimers();
    if (this._ws) this._detach(this._ws);
    this.client._subscriptions.delete(this);
    this.error = error;
    this._setStatus(status, error ? { error } : {});
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
    if (error) this.options.onError?.(error);
  }
}
