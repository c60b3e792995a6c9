// Unit tests of keen-client.js's own logic (node --test; run by tests/unit/test_js_client.py):
// cursor order, de-duplication across a resume, backoff bounds, closes that are not retried,
// recovered: false. The WebSocket is a fake the test drives; the real hub is exercised by
// tests/integration/test_monitor_browser.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  KeenClient,
  backoffDelay,
  compareCursors,
  parseCursor,
} from "../../keen_stream/hub/static/keen-client.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = false;
    FakeSocket.all.push(this);
    queueMicrotask(() => this.onopen?.());
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.closed = true;
  }
  frame(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  drop(code, reason = "") {
    this.onclose?.({ code, reason });
  }
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));
const event = (cursor, extra = {}) => ({ type: "event", cursor, version: 1, event_type: "session.progress", data: {}, ...extra });

function client(extra = {}) {
  FakeSocket.all = [];
  return new KeenClient(["ws://a/ws", "ws://b/ws"], {
    token: "ks_secret",
    WebSocket: FakeSocket,
    backoffInitial: 1,
    backoffMax: 4,
    pingInterval: 100000,
    ...extra,
  });
}

test("cursors compare as pairs of integers, beyond 2**53", () => {
  assert.equal(compareCursors("9-10", "10-1"), -1); // not as strings
  assert.equal(compareCursors("10-2", "10-10"), -1);
  assert.equal(compareCursors("9007199254740993-1", "9007199254740992-1"), 1);
  assert.equal(compareCursors("5-5", "5-5"), 0);
  assert.deepEqual(parseCursor("1-2"), [1n, 2n]);
  assert.throws(() => parseCursor("1-2-3"), TypeError);
  assert.throws(() => parseCursor(12), TypeError);
});

test("backoff doubles up to the ceiling, drawn between half and all of it", () => {
  assert.equal(backoffDelay(1, 500, 30000, () => 0), 500);
  assert.equal(backoffDelay(1, 500, 30000, () => 1), 1000);
  assert.equal(backoffDelay(3, 500, 30000, () => 0), 2000);
  assert.equal(backoffDelay(40, 500, 30000, () => 1), 30000);
  assert.equal(backoffDelay(40, 500, 30000, () => 0), 15000);
  assert.ok(backoffDelay(0, 500, 30000, () => 0.5) <= 500); // had worked: a little jitter
});

test("auth frame first, then subscribe; the token is in no URL", async () => {
  const sub = client().subscribe({ scope: "mine", since: "0-0" });
  await tick();
  const [ws] = FakeSocket.all;
  assert.equal(ws.url, "ws://a/ws");
  assert.deepEqual(ws.sent[0], { type: "auth", token: "ks_secret", client_type: "browser" });
  ws.frame({ type: "ready", user_id: "u", admin: false, cursor: "1-1" });
  await tick();
  assert.deepEqual(ws.sent[1], { type: "subscribe", id: "keen-client", scope: "mine", since: "0-0" });
  sub.close();
});

test("a resume repeats nothing and loses nothing, in cursor order, on the next URL", async () => {
  const got = [];
  const statuses = [];
  const sub = client().subscribe({
    onEvent: (e) => got.push(e.cursor),
    onStatus: (s) => statuses.push(s),
  });
  await tick();
  let ws = FakeSocket.all[0];
  ws.frame({ type: "ready", cursor: "1-1" });
  ws.frame({ type: "subscribed", cursor: "1-1", recovered: true });
  ws.frame(event("1-2"));
  ws.frame(event("2-3"));
  ws.frame(event("2-3")); // a repeat
  await tick();
  ws.drop(1012, "restart");
  await tick();
  await tick();
  ws = FakeSocket.all[1];
  assert.equal(ws.url, "ws://b/ws");
  ws.frame({ type: "ready", cursor: "2-3" });
  await tick();
  assert.equal(ws.sent.at(-1).since, "2-3");
  ws.frame({ type: "subscribed", cursor: "3-9", recovered: true });
  ws.frame(event("1-2")); // replay overlapping what was handed out
  ws.frame(event("2-3"));
  ws.frame(event("3-1"));
  ws.frame(event("10-1"));
  await tick();
  assert.deepEqual(got, ["1-2", "2-3", "3-1", "10-1"]);
  assert.deepEqual(statuses, ["connecting", "live", "reconnecting", "live"]);
  assert.equal(sub.cursor, "10-1");
  assert.equal(sub.reconnects, 1);
  sub.close();
});

for (const code of [4001, 4003, 4004, 4005, 4006, 1009]) {
  test(`close ${code} is not retried`, async () => {
    let error = null;
    const sub = client().subscribe({ onError: (e) => { error = e; } });
    await tick();
    FakeSocket.all[0].frame({ type: "ready", cursor: "1-1" });
    await tick();
    FakeSocket.all[0].drop(code, "no");
    await tick();
    await tick();
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(sub.status, "failed");
    assert.equal(error.code, code);
  });
}

test("a connection that keeps failing gives up after maxAttempts", async () => {
  let error = null;
  client({ maxAttempts: 3 }).subscribe({ onError: (e) => { error = e; } });
  for (let i = 0; i < 3; i += 1) {
    await tick();
    FakeSocket.all.at(-1).drop(1006);
    await tick();
    await tick();
  }
  assert.equal(FakeSocket.all.length, 3);
  assert.equal(error?.name, "StreamUnavailableError");
});

test("recovered: false calls onGap, reports reloading, and goes on from the new cursor", async () => {
  const gaps = [];
  const statuses = [];
  const got = [];
  const sub = client().subscribe({
    since: "5-5",
    onGap: async (gap) => { gaps.push(gap); await tick(); },
    onStatus: (s) => statuses.push(s),
    onEvent: (e) => got.push(e.cursor),
  });
  await tick();
  const ws = FakeSocket.all[0];
  ws.frame({ type: "ready", cursor: "9-9" });
  ws.frame({ type: "subscribed", cursor: "9-9", recovered: false, reason: "since_expired" });
  ws.frame(event("9-10")); // waits for onGap
  await tick();
  await tick();
  assert.deepEqual(gaps, [{ reason: "since_expired", cursor: "9-9", since: "5-5" }]);
  assert.deepEqual(statuses, ["connecting", "reloading", "live"]);
  assert.deepEqual(got, ["9-10"]);
  sub.close();
});

test("an async iterator yields events and ends on close", async () => {
  const sub = client().subscribe({});
  await tick();
  const ws = FakeSocket.all[0];
  ws.frame({ type: "ready", cursor: "1-1" });
  ws.frame({ type: "subscribed", cursor: "1-1", recovered: true });
  const it = sub[Symbol.asyncIterator]();
  ws.frame(event("1-2"));
  assert.equal((await it.next()).value.cursor, "1-2");
  const pending = it.next();
  sub.close();
  assert.equal((await pending).done, true);
});
