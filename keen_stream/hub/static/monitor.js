// The live monitor (docs/monitor.md): agent-session trees and credit transactions as they
// happen, from the hub's event stream through keen-client.js.
//
// Where state comes from: every session event carries the session's whole small state
// (keen_stream/sql/events.sql), so the page needs no snapshot of the tables. It asks the hub
// where the retained stream starts (GET /monitor/origin, with the token), subscribes with that
// `since`, and the hub replays every event it still retains (KEEN_EVENT_RETENTION, 24 h by
// default) before going live; per session the page keeps the event with the highest
// `version`. When a resume answers `recovered: false` (the page was away longer than the
// window) it reloads the same way: a new subscription from the origin. Rows it showed that no
// retained event refreshes stay, greyed as stale, until their session's next event.
//
// All user data goes into the page as text (textContent / attributes), never as HTML.
import { KeenClient } from "./keen-client.js";

const TOKEN_KEY = "keen.monitor.token";
const MAX_CREDITS = 300;

const $ = (id) => document.getElementById(id);
const state = {
  sessions: new Map(), // id -> {id, userId, rootId, parentId, data, version, stale}
  credits: new Map(), // transaction_id -> {userId, sessionId, rootId, data}
  users: new Set(),
  admin: false,
  fresh: new Set(), // credit rows to flash once
};
let client = null;
let subscription = null;
let renderTimer = null;
let generation = 0; // callbacks of a subscription that was replaced are ignored
let currentToken = null;
let reloadsInRow = 0;

// --- money: decimal strings, exact (scaled integers), never floats --------------------------
const SCALE = 6;
function micros(text) {
  if (text == null || text === "") return null;
  const m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(String(text));
  if (!m) return null;
  const frac = (m[3] || "").padEnd(SCALE, "0").slice(0, SCALE);
  const value = BigInt(m[2]) * 10n ** BigInt(SCALE) + BigInt(frac);
  return m[1] ? -value : value;
}
function formatMicros(value, minDecimals = 2) {
  const negative = value < 0n;
  const abs = negative ? -value : value;
  const unit = 10n ** BigInt(SCALE);
  let frac = (abs % unit).toString().padStart(SCALE, "0").replace(/0+$/, "");
  frac = frac.padEnd(minDecimals, "0");
  return `${negative ? "-" : ""}${abs / unit}${frac ? "." + frac : ""}`;
}
function money(text, minDecimals = 2) {
  const value = micros(text);
  return value === null ? "—" : formatMicros(value, minDecimals);
}

// --- elements --------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
function metric(cls, value, label) {
  return el("span", { class: `metric ${cls}` }, String(value), el("small", { text: label }));
}
function short(id) {
  return id ? `${String(id).slice(0, 8)}…` : "—";
}
function clock(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString([], { hour12: false });
}

// --- status and banner -----------------------------------------------------------------------
function setStatus(kind, text) {
  const status = $("status");
  status.dataset.state = kind;
  status.textContent = text;
}
function banner(kind, text) {
  const node = $("banner");
  if (!kind) {
    node.hidden = true;
    node.dataset.kind = "";
    node.textContent = "";
    return;
  }
  node.hidden = false;
  node.dataset.kind = kind;
  node.textContent = text;
}

function onStatus(status, detail) {
  document.body.dataset.reconnects = String(subscription ? subscription.reconnects : 0);
  switch (status) {
    case "connecting":
      setStatus("connecting", "connecting…");
      break;
    case "live":
      setStatus("live", "live");
      if ($("banner").dataset.kind === "reconnecting") banner(null);
      break;
    case "reconnecting":
      setStatus("reconnecting", "reconnecting…");
      banner(
        "reconnecting",
        `Connection to the hub lost (${detail.why || "closed"}); reconnecting, attempt ` +
          `${detail.attempt}. Nothing is missed: the page resumes where it stopped.`,
      );
      break;
    case "reloading":
      setStatus("reloading", "reloading");
      break;
    case "failed":
      setStatus("failed", "stopped");
      break;
    case "closed":
      setStatus("signed-out", "signed out");
      break;
    default:
  }
}

function onGap(gap) {
  // recovered: false: what was missed is gone from the hub. Reload: a new subscription from
  // the origin replays everything still retained. Rows no retained event refreshes stay, as
  // stale. Three reloads in a row without an event between: go on from the gap's cursor.
  for (const session of state.sessions.values()) session.stale = true;
  document.body.dataset.reloads = String(Number(document.body.dataset.reloads || 0) + 1);
  banner(
    "reloaded",
    `Reloaded: events missed while away are no longer kept by the hub (${gap.reason}); ` +
      "the view was rebuilt from the events it retains. Greyed rows may be out of date " +
      "until their session changes again.",
  );
  scheduleRender();
  reloadsInRow += 1;
  if (reloadsInRow <= 3) watch(currentToken, { reload: true });
}

// Closes (and /monitor/origin refusals) after which this token will not work again.
const REFUSED_TOKEN = new Set([
  "authentication_failed", "token_rejected", "token_expired", "token_revoked", "account_inactive",
]);

function onError(error) {
  banner("failed", `Stopped: ${error.message}.`);
  if (REFUSED_TOKEN.has(error && error.kind)) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("login").hidden = false;
  }
}

function onReady(ready) {
  state.admin = Boolean(ready.admin);
  const who = $("who");
  who.hidden = false;
  who.textContent = `user ${short(ready.user_id)}${state.admin ? " · admin: all users" : ""}`;
  $("filter-user-label").hidden = !state.admin;
}

// --- events ----------------------------------------------------------------------------------
function onEvent(event) {
  // How many events the client handed out, and the last cursor: what a test compares with the
  // database to prove nothing was repeated or missed.
  document.body.dataset.events = String(Number(document.body.dataset.events || 0) + 1);
  document.body.dataset.cursor = event.cursor;
  reloadsInRow = 0;
  state.users.add(event.user_id);
  if (event.event_type.startsWith("session.")) {
    const known = state.sessions.get(event.session_id);
    // Two changes of one session may arrive in either order: keep the newest version. A
    // stale row takes the same version again (a reload replays what it already had).
    if (known && (known.stale ? known.version > event.version : known.version >= event.version)) {
      return;
    }
    state.sessions.set(event.session_id, {
      id: event.session_id,
      userId: event.user_id,
      rootId: event.root_session_id,
      parentId: event.data.parent_session_id,
      data: event.data,
      version: event.version,
      stale: false,
    });
  } else if (event.event_type.startsWith("credit.")) {
    const id = String(event.data.transaction_id);
    if (!state.credits.has(id)) state.fresh.add(id);
    state.credits.set(id, {
      userId: event.user_id,
      sessionId: event.session_id,
      rootId: event.root_session_id,
      data: event.data,
    });
    if (state.credits.size > MAX_CREDITS) {
      state.credits.delete(state.credits.keys().next().value); // the oldest (insertion order)
    }
  }
  scheduleRender();
}

// --- rendering -------------------------------------------------------------------------------
function scheduleRender() {
  if (renderTimer === null) renderTimer = setTimeout(render, 30);
}

function treesOf() {
  // Parents whose events are not retained (or not here yet) get a placeholder node, hung under
  // their root, so sub-agents always show in their tree.
  const nodes = new Map(state.sessions);
  const ensure = (id, from) => {
    if (nodes.has(id)) return;
    const isRoot = id === from.rootId;
    nodes.set(id, {
      id, userId: from.userId, rootId: from.rootId, parentId: isRoot ? null : from.rootId,
      data: null, version: -1, stale: false, placeholder: true,
    });
    if (!isRoot) ensure(from.rootId, from);
  };
  for (const session of state.sessions.values()) {
    if (session.parentId) ensure(session.parentId, session);
  }
  const children = new Map();
  const roots = [];
  for (const session of nodes.values()) {
    if (!session.parentId) {
      roots.push(session);
      continue;
    }
    if (!children.has(session.parentId)) children.set(session.parentId, []);
    children.get(session.parentId).push(session);
  }
  const byStart = (a, b) =>
    String(a.data?.start_time || "").localeCompare(String(b.data?.start_time || ""));
  for (const list of children.values()) list.sort(byStart);
  roots.sort((a, b) => byStart(b, a));
  return { roots, children };
}

function walk(root, children, visit) {
  visit(root);
  for (const child of children.get(root.id) || []) walk(child, children, visit);
}

function matches(root, children) {
  const user = $("filter-user").value;
  if (state.admin && user && root.userId !== user) return false;
  const q = $("filter-session").value.trim().toLowerCase();
  if (!q) return true;
  let found = false;
  walk(root, children, (s) => {
    const handle = String(s.data?.session_handle || "").toLowerCase();
    if (handle.includes(q) || String(s.id).startsWith(q)) found = true;
  });
  return found;
}

function sessionNode(session, children) {
  const d = session.data;
  const classes = ["session"];
  if (session.stale) classes.push("stale");
  if (session.placeholder) classes.push("placeholder");
  const li = el("li", {
    class: classes.join(" "),
    "data-session-id": session.id,
    "data-parent-id": session.parentId || "",
    "data-handle": d ? d.session_handle : "",
    "data-status": d ? d.status : "",
    "data-stale": session.stale ? "true" : "false",
  });
  if (!d) {
    li.append(el("div", { class: "row" },
      el("span", { class: "handle", text: `session ${short(session.id)}` }),
      el("span", { text: "no retained event yet" })));
  } else {
    li.append(el("div", { class: "row", title: session.stale ? "may be out of date" : null },
      el("span", { class: "handle", title: `${d.session_handle} (${session.id})`,
                   text: d.session_handle }),
      el("span", { class: `badge status status-${d.status}`, text: d.status }),
      el("span", { class: "badge phase", text: d.phase }),
      metric("iterations", d.iteration_count, "iterations"),
      metric("tools", d.tool_calls_count, "tool calls"),
      metric("tokens", d.tokens_used, "tokens"),
      metric("cost", `$${money(d.claude_cost_usd, 2)}`, `${money(d.keen_cost_credits)} cr`)));
    if (d.error_message) {
      li.append(el("div", { class: "error-message", text: d.error_message }));
    }
  }
  const kids = children.get(session.id) || [];
  if (kids.length) {
    const ul = el("ul", { class: "nodes" });
    for (const kid of kids) ul.append(sessionNode(kid, children));
    li.append(ul);
  }
  return li;
}

function treeCard(root, children) {
  let count = 0;
  let running = 0;
  let cost = 0n;
  walk(root, children, (s) => {
    if (!s.data) return;
    count += 1;
    if (s.data.status === "running") running += 1;
    cost += micros(s.data.claude_cost_usd) || 0n;
  });
  const d = root.data;
  const head = el("div", { class: "tree-head" },
    el("span", { class: "title", text: d ? d.session_handle : `session ${short(root.id)}` }),
    state.admin ? el("span", { class: "who", text: `user ${short(root.userId)}` }) : null,
    el("span", { class: "who", text: `${count} session${count === 1 ? "" : "s"}, ${running} running` }),
    el("span", { class: "who", text: `cost $${formatMicros(cost)}` }));
  if (d) {
    const used = micros(d.budget_used) || 0n;
    const budget = micros(d.credit_budget);
    const box = el("span", { class: "budget" });
    if (budget !== null && budget > 0n) {
      const pct = used >= budget ? 100n : (used * 100n) / budget;
      const bar = el("span", { class: used > budget ? "bar over" : "bar" });
      const fill = el("div");
      fill.style.width = `${pct}%`; // a CSSOM write, allowed by the style-src policy
      bar.append(fill);
      box.append(bar, el("span", { class: "budget-text",
        text: `budget ${formatMicros(used)} / ${formatMicros(budget)} cr` }));
    } else {
      box.append(el("span", { class: "budget-text", text: `budget used ${formatMicros(used)} cr` }));
    }
    head.append(box);
  }
  const ul = el("ul", { class: "nodes" });
  ul.append(sessionNode(root, children));
  return el("div", { class: "tree", "data-root-id": root.id, "data-user-id": root.userId }, head, ul);
}

function creditRow(id, credit, visibleRoots) {
  const d = credit.data;
  const session = credit.sessionId ? state.sessions.get(credit.sessionId) : null;
  const amount = micros(d.amount) || 0n;
  const tr = el("tr", {
    class: state.fresh.has(id) ? "credit fresh" : "credit",
    "data-transaction-id": id,
    "data-user-id": credit.userId,
    "data-session-id": credit.sessionId || "",
    title: state.admin ? `user ${credit.userId}` : null,
  },
    el("td", { class: "time", text: clock(d.created_at) }),
    el("td", { class: "type", text: d.transaction_type }),
    el("td", { class: `amount ${amount < 0n ? "negative" : "positive"}`, text: money(d.amount) }),
    el("td", { class: "balance", text: money(d.balance_after) }),
    el("td", { class: "session", text: session?.data ? session.data.session_handle : "—" }),
    el("td", { class: "description", title: d.description || "", text: d.description || "" }));
  tr.hidden = visibleRoots !== null && !visibleRoots.has(credit.rootId);
  return tr;
}

function render() {
  renderTimer = null;
  const { roots, children } = treesOf();
  const trees = $("trees");
  const shown = [];
  for (const root of roots) if (matches(root, children)) shown.push(root);
  trees.replaceChildren(...shown.map((root) => treeCard(root, children)));
  $("no-sessions").hidden = shown.length > 0;

  // Credits follow the filters: the user's, and those of the trees shown.
  const user = state.admin ? $("filter-user").value : "";
  const filtered = $("filter-session").value.trim() !== "";
  const visibleRoots = filtered ? new Set(shown.map((r) => r.id)) : null;
  const rows = [];
  for (const [id, credit] of [...state.credits.entries()].reverse()) {
    if (user && credit.userId !== user) continue;
    rows.push(creditRow(id, credit, visibleRoots));
  }
  state.fresh.clear();
  $("credits").tBodies[0].replaceChildren(...rows);
  $("no-credits").hidden = rows.some((r) => !r.hidden);

  const select = $("filter-user");
  if (state.admin && select.options.length - 1 !== state.users.size) {
    const current = select.value;
    select.replaceChildren(el("option", { value: "", text: "everyone" }),
      ...[...state.users].sort().map((u) => el("option", { value: u, text: u })));
    select.value = current;
  }
  let sessions = 0;
  for (const s of state.sessions.values()) if (s.data) sessions += 1;
  $("counts").textContent = `${sessions} sessions · ${state.credits.size} transactions`;
}

// --- start and stop --------------------------------------------------------------------------
function hubUrl() {
  const url = new URL("/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  return url.href;
}

/** Where the retained stream starts: the `since` that replays all of it (docs/monitor.md). */
async function origin(token) {
  const response = await fetch(new URL("origin", location.href), {
    headers: { Authorization: `Bearer ${token}` },
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    const error = new Error(`the hub refused the token (${body.error || response.status})`);
    error.kind = "token_rejected";
    throw error;
  }
  if (!response.ok) return null;
  return String((await response.json()).since);
}

async function watch(token, { reload = false } = {}) {
  stop();
  const mine = generation;
  currentToken = token;
  if (!reload) {
    forget();
    document.body.dataset.events = "0";
    banner(null);
    reloadsInRow = 0;
  }
  $("login").hidden = true;
  $("main").hidden = false;
  setStatus(reload ? "reloading" : "connecting", reload ? "reloading" : "connecting…");
  let since = null;
  try {
    since = await origin(token);
  } catch (error) {
    if (mine !== generation) return;
    if (error.kind) {
      onError(error);
      setStatus("failed", "stopped");
      return;
    }
    // The hub is unreachable: the client retries; "0-0" is the origin until anything is pruned.
  }
  if (mine !== generation) return;
  const current = (fn) => (...args) => (mine === generation ? fn(...args) : undefined);
  client = new KeenClient(hubUrl(), { token, clientType: "monitor" });
  const sub = client.subscribe({
    // Admins see everyone (scope "all", set once `ready` says admin; others get "mine");
    // the filters narrow the view.
    since: since || "0-0",
    onEvent: current(onEvent),
    onStatus: current(onStatus),
    onGap: current(onGap),
    onError: current(onError),
    onReady: current((ready) => {
      onReady(ready);
      // Read before each subscribe: admin status can change between connections (4007).
      sub.options.scope = ready.admin ? "all" : undefined;
    }),
  });
  subscription = sub;
}

/** Empty the view: another token (another person, in the same tab) sees nothing of this one's,
 * not even before its own first event, nor hidden in the page. */
function forget() {
  state.sessions.clear();
  state.credits.clear();
  state.users.clear();
  state.fresh.clear();
  state.admin = false;
  $("who").hidden = true;
  $("who").textContent = "";
  $("filter-user").replaceChildren(el("option", { value: "", text: "everyone" }));
  $("filter-user-label").hidden = true;
  $("filter-session").value = "";
  clearTimeout(renderTimer);
  render();
}

function stop() {
  generation += 1;
  if (client) client.close();
  client = null;
  subscription = null;
}

function init() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token");
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    watch(token);
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    stop();
    forget();
    $("main").hidden = true;
    $("login").hidden = false;
    banner(null);
    setStatus("signed-out", "signed out");
  });
  $("filter-session").addEventListener("input", scheduleRender);
  $("filter-user").addEventListener("change", scheduleRender);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) watch(saved);
}

init();
