// keel's web inbox and run explorer. Plain JS, no build step, nothing fetched from
// anywhere but this server. The token lives in sessionStorage (this tab only, gone when
// it closes) and goes out as `Authorization: Bearer` on each request: the browser never
// attaches it by itself, so a page of another site cannot make a request in its name
// (docs/SERVER.md, "Login and CSRF"). Every text from the server is set with
// textContent, never parsed as HTML.
"use strict";

const TOKEN_KEY = "keel.token";
const POLL_MS = 2000;
const main = () => document.getElementById("main");
let stopLive = () => {};
// Bumped on every navigation: a view whose data arrives after the person moved on drops it.
let viewGen = 0;

// ---------- small DOM helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const S = (tag, attrs, ...children) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
};
const badge = (s) => h("span", { class: `badge s-${s}` }, s);
const pretty = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 2));
const parseJ = (v) => {
  if (typeof v !== "string") return v;
  try { return JSON.parse(v); } catch (_) { return v; }
};
const announce = (msg) => { document.getElementById("announce").textContent = msg; };
const money = (micros) => (micros === null || micros === undefined ? "–" : `${(micros / 1e6).toFixed(4)}`);
function show(...nodes) {
  main().replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}
function setTitle(t) { document.title = `${t} · keel`; }

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: "omit", cache: "no-store" });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (!r.ok) {
    const e = (data && data.error) || { code: "http_" + r.status, message: r.statusText };
    if (r.status === 401) { sessionStorage.removeItem(TOKEN_KEY); }
    throw new ApiError(r.status, e.code, e.message);
  }
  return data;
}

// Every event of a run, page by page.
async function allEvents(run, after) {
  const out = [];
  let a = after;
  for (let i = 0; i < 100; i++) {
    const q = a === undefined || a === null ? "" : `&after=${a}`;
    const page = await api("GET", `/v1/runs/${run}/events?limit=10000${q}`);
    out.push(...page.events);
    if (page.next_after === null || page.next_after === undefined) break;
    a = page.next_after;
  }
  return out;
}

// ---------- live updates ----------
//
// Pages follow the server's event streams (server-sent events): a run's page reads
// `GET /v1/runs/{run}/events` with `Accept: text/event-stream` (`id:` = seq; a reconnect
// sends `Last-Event-ID`), the lists (inbox, runs) read `GET /v1/events` (every run's
// status changes) and re-list when one comes. The browser's EventSource cannot send an
// Authorization header, so a stream is read with fetch (the same wire format). Only when
// a route answers anything but an event stream, or the stream fails (the server's cap on
// open streams, a proxy that buffers), does the page poll the JSON route instead.

// Reads the event stream at `path`, calls `onOpen()` once it answered and
// `onMsg({event, id, data})` per message; resolves when the server ends the stream (a
// run's tail ends with the run), rejects when it cannot be opened or fails.
async function readSse(path, extraHeaders, signal, onOpen, onMsg) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({ Accept: "text/event-stream", Authorization: `Bearer ${token}` }, extraHeaders);
  const r = await fetch(path, { headers, signal, credentials: "omit", cache: "no-store" });
  if (!r.ok || !(r.headers.get("content-type") || "").startsWith("text/event-stream") || !r.body) {
    const e = new Error("no event stream");
    e.status = r.status;
    throw e;
  }
  onOpen();
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let data = "", id = null, event = "message";
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) data += line.slice(5).trimStart();
        else if (line.startsWith("id:")) id = Number(line.slice(3).trim());
        else if (line.startsWith("event:")) event = line.slice(6).trim();
      }
      if (!data && id === null) continue; // a comment or keep-alive
      onMsg({ event, id, data: parseJ(data) });
    }
  }
}

function liveState(text) {
  const label = document.getElementById("live-state");
  label.textContent = text;
  label.dataset.mode = text.replace("live: ", "");
}

// `onEnd`: the run finished and its stream ended (nothing more will come).
function liveRun(run, lastSeq, onEvents, onEnd) {
  let stopped = false;
  const ctl = new AbortController();
  let last = lastSeq;
  const deliver = (evs) => {
    if (stopped) return; // a page left behind must not redraw over the current one
    const fresh = evs.filter((e) => last === null || e.seq > last);
    if (!fresh.length) return;
    last = fresh[fresh.length - 1].seq;
    onEvents(fresh, "stream");
  };
  async function poll() {
    liveState("live: polling");
    while (!stopped) {
      try { deliver(await allEvents(run, last)); } catch (e) { if (e.status === 401) { route(); return; } }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  }
  const headers = last !== null ? { "Last-Event-ID": String(last) } : {};
  readSse(`/v1/runs/${run}/events`, headers, ctl.signal, () => liveState("live: streaming"), (m) => {
    const ev = m.data && typeof m.data === "object" && !Array.isArray(m.data) ? m.data : {};
    if (ev.seq === undefined && m.id !== null) ev.seq = m.id;
    if (typeof ev.seq === "number") deliver([ev]);
  }).then(() => {
    if (stopped) return;
    liveState("live: run finished");
    if (onEnd) onEnd();
  }, () => { if (!stopped) poll(); });
  return () => { stopped = true; ctl.abort(); liveState(""); };
}

// Lists (inbox, runs) re-list when a run's status changes (the status stream; at most one
// re-list at a time, one more if changes came meanwhile), and on a shared database when the
// stream says runs may have changed elsewhere; else by polling.
function liveList(fn) {
  let stopped = false, busy = false, again = false;
  const ctl = new AbortController();
  const refresh = async () => {
    if (stopped) return;
    if (busy) { again = true; return; }
    busy = true;
    try { await fn(); } catch (e) { if (e.status === 401) { stopped = true; ctl.abort(); route(); } }
    busy = false;
    if (again) { again = false; refresh(); }
  };
  async function poll() {
    liveState("live: polling");
    while (!stopped) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      await refresh();
    }
  }
  readSse("/v1/events", {}, ctl.signal, () => liveState("live: streaming"), (m) => {
    // `elsewhere`: on a database several servers share, runs another server drives may
    // have changed (their changes are not in this server's stream).
    if (m.event === "status" || m.event === "lagged" || m.event === "elsewhere") refresh();
  }).then(() => { if (!stopped) poll(); }, () => { if (!stopped) poll(); });
  return () => { stopped = true; ctl.abort(); liveState(""); };
}

// ---------- login ----------

function loginView(message) {
  setTitle("Log in");
  const err = h("p", { id: "login-error", class: "error", role: "alert" }, message || "");
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true, "aria-describedby": "token-help login-error" });
  const form = h("form", { class: "login card", onsubmit: async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) { err.textContent = "Enter a token."; input.setAttribute("aria-invalid", "true"); input.focus(); return; }
    sessionStorage.setItem(TOKEN_KEY, t);
    try {
      await api("GET", "/v1/escalations");
      location.hash = location.hash && !location.hash.startsWith("#/login") ? location.hash : "#/inbox";
      route();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      err.textContent = e.status === 401 ? "That token is not valid." : `Cannot log in: ${e.message}`;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  } },
    h("h1", {}, "Log in to keel"),
    h("label", { for: "token" }, "Token"),
    input,
    h("p", { id: "token-help", class: "muted" }, "A token made with `keel token add NAME --role ROLE`. It is kept in this tab only (sessionStorage) and sent as a bearer header."),
    err,
    h("button", { type: "submit" }, "Log in"));
  show(form);
  input.focus();
}

// ---------- the inbox ----------

async function inboxView() {
  setTitle("Inbox");
  const body = h("div", {});
  show(h("h1", {}, "Escalations waiting for a person"), body);
  const render = async () => {
    const data = await api("GET", "/v1/escalations");
    const list = [...data.escalations].sort((a, b) => a.escalated_at_us - b.escalated_at_us);
    if (!list.length) { body.replaceChildren(h("p", { id: "inbox-empty" }, "Nothing waits for a decision.")); return; }
    body.replaceChildren(h("table", { id: "inbox" },
      h("caption", { class: "visually-hidden" }, "Open escalations, oldest first"),
      h("thead", {}, h("tr", {}, ["Run", "Workflow", "Cause", "Task", "Question", "Escalated", "Deadline", "Default"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, list.map((e) => h("tr", {},
        h("td", {}, h("a", { href: `#/escalation/${e.run}`, class: "mono" }, `${e.run.slice(0, 8)} #${e.number}`)),
        h("td", {}, e.workflow),
        h("td", {}, e.cause),
        h("td", {}, e.task || "–"),
        h("td", {}, e.question),
        h("td", {}, h("time", { datetime: e.escalated_at }, e.escalated_at)),
        h("td", {}, e.deadline_at ? h("time", { datetime: e.deadline_at }, e.deadline_at) : "none"),
        h("td", {}, e.default || "none"))))));
  };
  await render();
  stopLive = liveList(render);
}

// ---------- the escalation page ----------

// What a person needs to decide, from the run's state and its events.
function escalationContext(state, events) {
  const open = [...state.escalations].reverse().find((e) => !e.resolution) || state.escalations[state.escalations.length - 1];
  if (!open) return null;
  const escEv = events.filter((e) => e.kind === "Escalated" && e.event.number === open.number).pop();
  const taskId = open.task;
  let spec = null;
  for (const e of events) {
    if ((e.kind === "Planned" || e.kind === "Replanned") && e.event.plan) {
      const t = (e.event.plan.tasks || []).find((x) => x.id === taskId);
      if (t) spec = t;
    }
  }
  const task = state.tasks.find((t) => t.id === taskId) || null;
  const dispatched = events.filter((e) => e.kind === "TaskDispatched" && e.event.task === taskId);
  const lastInput = dispatched.length ? dispatched[dispatched.length - 1].event.input : null;
  const attempts = [];
  for (const e of events) {
    const ev = e.event;
    if (!ev || ev.task !== taskId) continue;
    if (e.kind === "TaskDispatched") attempts.push({ attempt: ev.attempt, model: ev.model, at: e.time, outcome: "dispatched" });
    const a = attempts.find((x) => x.attempt === ev.attempt);
    if (!a) continue;
    if (e.kind === "TaskFailed") { a.outcome = "failed"; a.error = `${ev.class}: ${ev.error}${ev.note ? ` (${ev.note})` : ""}`; a.source = ev.source; }
    if (e.kind === "TaskExecuted") a.outcome = ev.cached ? "executed (cached)" : "executed";
    if (e.kind === "TaskEvaluated") { a.outcome = `evaluated: ${ev.verdict}`; a.error = ev.notes; }
  }
  const replans = [];
  for (const e of events) {
    if (e.kind === "PlanRequested" || e.kind === "ReplanRequested") {
      const r = e.event.reason;
      let why = "initial plan";
      if (r && typeof r === "object") {
        if (r.Failure) why = `failure${r.Failure.task ? ` of ${r.Failure.task}` : ""}: ${r.Failure.reason}`;
        else if (r.HumanHint) why = `hint from ${r.HumanHint.by}: ${r.HumanHint.hint}`;
      } else if (typeof r === "string" && r !== "Initial") why = r;
      if (why !== "initial plan" || e.kind === "ReplanRequested") replans.push({ at: e.time, kind: e.kind, why });
    }
    if (e.kind === "Replanned") replans.push({ at: e.time, kind: "Replanned", why: `revision ${e.event.revision}: ${(e.event.superseded || []).length} task(s) superseded` });
    if (e.kind === "PlanRejected") replans.push({ at: e.time, kind: "PlanRejected", why: (e.event.errors || []).join("; ") });
  }
  return {
    open, task, spec, attempts, replans,
    deadline_ms: escEv ? escEv.event.deadline_ms : null,
    default_decision: escEv ? escEv.event.default_decision : null,
    escalated_at_us: open.escalated_at_us,
    schema: spec && spec.output_schema ? parseJ(spec.output_schema) : null,
    input: lastInput ? parseJ(lastInput.input) : spec ? parseJ(spec.input) : null,
    upstream: lastInput && lastInput.upstream ? Object.fromEntries(Object.entries(lastInput.upstream).map(([k, v]) => [k, parseJ(v)])) : {},
  };
}

function decisionName(d) {
  if (d === null || d === undefined) return "none";
  if (typeof d === "string") return d.replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
  return Object.keys(d)[0].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

function budgetTable(state) {
  const b = state.budget || {}, t = state.totals || {};
  const rows = Object.keys(b).filter((k) => k !== "deadline_ms").map((k) => {
    const limit = b[k], used = t[k] === undefined ? null : t[k];
    const left = limit === null || used === null ? null : Math.max(0, limit - used);
    const fmt = (v) => (v === null ? "–" : k === "cost_micros" ? money(v) : String(v));
    return h("tr", {}, h("th", { scope: "row" }, k === "cost_micros" ? "cost" : k.replace("_", " ")), h("td", {}, fmt(used)), h("td", {}, limit === null ? "no limit" : fmt(limit)), h("td", {}, fmt(left)));
  });
  return h("table", { id: "budget" }, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "budget"), h("th", { scope: "col" }, "used"), h("th", { scope: "col" }, "limit"), h("th", { scope: "col" }, "left"))), h("tbody", {}, rows));
}

async function escalationView(run) {
  setTitle(`Escalation ${run.slice(0, 8)}`);
  const gen = viewGen;
  const [state, events] = await Promise.all([api("GET", `/v1/runs/${run}`), allEvents(run)]);
  if (gen !== viewGen) return;
  const cx = escalationContext(state, events);
  if (!cx) { show(h("h1", {}, "No escalation"), h("p", {}, "This run never escalated. "), h("a", { href: `#/run/${run}` }, "Open the run")); return; }
  const o = cx.open;
  const deadline = cx.deadline_ms === null || cx.deadline_ms === undefined ? "none"
    : new Date(cx.escalated_at_us / 1000 + cx.deadline_ms).toISOString();
  const resolved = !!o.resolution || state.status !== "AwaitingHuman";
  show(
    h("h1", {}, `Escalation #${o.number} of run `, h("a", { href: `#/run/${run}`, class: "mono" }, run)),
    h("p", { class: "question", id: "question" }, o.question),
    h("div", { class: "grid2" },
      h("section", { class: "card", "aria-labelledby": "why-h" },
        h("h2", { id: "why-h" }, "Why it escalated"),
        h("dl", { class: "kv" },
          h("dt", {}, "cause"), h("dd", { id: "cause" }, o.cause),
          h("dt", {}, "why"), h("dd", { id: "why" }, o.why),
          h("dt", {}, "task"), h("dd", {}, o.task || "–"),
          h("dt", {}, "workflow"), h("dd", {}, `${state.workflow} v${state.workflow_version}`),
          h("dt", {}, "escalated"), h("dd", {}, o.escalated_at),
          h("dt", {}, "deadline"), h("dd", { id: "deadline" }, deadline),
          h("dt", {}, "default"), h("dd", { id: "default" }, decisionName(cx.default_decision)),
          h("dt", {}, "status"), h("dd", {}, badge(state.status)))),
      h("section", { class: "card", "aria-labelledby": "budget-h" },
        h("h2", { id: "budget-h" }, "Budget used and left"),
        budgetTable(state))),
    h("section", { "aria-labelledby": "att-h" },
      h("h2", { id: "att-h" }, "What was attempted"),
      cx.attempts.length ? h("table", { id: "attempts" },
        h("thead", {}, h("tr", {}, ["attempt", "model", "outcome", "error or notes", "at"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, cx.attempts.map((a) => h("tr", {}, h("td", {}, a.attempt), h("td", {}, a.model || "–"), h("td", {}, a.outcome), h("td", {}, a.error || "–"), h("td", {}, a.at))))) : h("p", { class: "muted" }, "No attempt of this task."),
      o.attempted.length ? h("ul", { id: "attempted" }, o.attempted.map((s) => h("li", {}, s))) : null),
    h("section", { "aria-labelledby": "alt-h" },
      h("h2", { id: "alt-h" }, "Alternatives tried"),
      (o.alternatives_tried.length || cx.replans.length)
        ? h("ul", { id: "alternatives" }, o.alternatives_tried.map((s) => h("li", {}, s)), cx.replans.map((r) => h("li", {}, `${r.kind} (${r.at}): ${r.why}`)))
        : h("p", { class: "muted" }, "No replan was tried.")),
    h("section", { "aria-labelledby": "out-h" },
      h("h2", { id: "out-h" }, "The output under review, beside its inputs"),
      h("div", { class: "grid2" },
        h("div", {}, h("h3", {}, "Output under review"), h("pre", { id: "output" }, cx.task && cx.task.output !== null && cx.task.output !== undefined ? pretty(cx.task.output) : "(no output)"),
          cx.schema ? h("div", {}, h("h3", {}, "Output schema"), h("pre", { id: "schema" }, pretty(cx.schema))) : null),
        h("div", {}, h("h3", {}, "Task input"), h("pre", { id: "task-input" }, cx.input === null ? "(none)" : pretty(cx.input)),
          h("h3", {}, "Upstream outputs"),
          Object.keys(cx.upstream).length ? Object.entries(cx.upstream).map(([k, v]) => h("div", {}, h("h3", { class: "mono" }, k), h("pre", {}, pretty(v)))) : h("p", { class: "muted" }, "No upstream task.")))),
    resolved ? h("p", { id: "resolved" }, "This escalation is decided",
      o.resolution ? `: ${o.resolution.decision} by ${o.resolution.by}${o.resolution.defaulted ? " (deadline default)" : ""}.` : ".",
      " ", h("a", { href: `#/run/${run}` }, "See the run")) : decideForm(run, o, cx),
  );
  main().focus();
  stopLive = liveRun(run, events.length ? events[events.length - 1].seq : null, () => { if (!document.activeElement || !document.activeElement.closest("form")) { stopLive(); escalationView(run); } });
}

const DECISIONS = [
  ["approve", "Approve", "approve"],
  ["supply_output", "Supply the output", "supply"],
  ["reject", "Reject", "reject"],
  ["replan_with_hint", "Replan with a hint", "replan"],
  ["abort", "Abort the run", "abort"],
];

function decideForm(run, esc, cx) {
  const offered = DECISIONS.filter(([opt]) => !esc.options.length || esc.options.includes(opt));
  const radios = offered.map(([opt, label, wire], i) => h("label", { class: "inline" },
    h("input", { type: "radio", name: "decision", value: wire, id: `d-${wire}`, required: true, checked: i === 0 }), label));
  const output = h("textarea", { id: "supplied-output", name: "output", rows: 6, spellcheck: "false", "aria-describedby": "output-errors" },
    cx.task && cx.task.output !== null && cx.task.output !== undefined ? JSON.stringify(cx.task.output, null, 2) : "");
  const outputErrors = h("ul", { id: "output-errors", class: "errors", role: "alert" });
  const outputBox = h("div", { id: "output-box", hidden: true }, h("label", { for: "supplied-output" }, "The output to record (JSON", cx.schema ? ", checked against the task's output schema)" : ")"), output, outputErrors);
  const hint = h("input", { type: "text", id: "hint", name: "hint", "aria-describedby": "hint-error" });
  const hintError = h("p", { id: "hint-error", class: "error", role: "alert" });
  const hintBox = h("div", { id: "hint-box", hidden: true }, h("label", { for: "hint" }, "Hint for the planner"), hint, hintError);
  const reason = h("textarea", { id: "reason", name: "reason", rows: 3, required: true, "aria-describedby": "reason-help reason-error" });
  const reasonError = h("p", { id: "reason-error", class: "error", role: "alert" });
  const formError = h("p", { id: "form-error", class: "error", role: "alert" });
  const submit = h("button", { type: "submit", id: "decide" }, "Record the decision");
  const chosen = () => { const c = document.querySelector("input[name=decision]:checked"); return c ? c.value : null; };
  const sync = () => { const d = chosen(); outputBox.hidden = d !== "supply"; hintBox.hidden = d !== "replan"; };
  const form = h("form", { class: "decide", id: "decide-form", novalidate: true, "aria-labelledby": "decide-h", onchange: sync, onsubmit: async (ev) => {
    ev.preventDefault();
    for (const el of [output, hint, reason]) el.removeAttribute("aria-invalid");
    outputErrors.replaceChildren(); hintError.textContent = ""; reasonError.textContent = ""; formError.textContent = "";
    const d = chosen();
    const body = { decision: d, reason: reason.value.trim() };
    let bad = null;
    if (d === "supply") {
      let v;
      try { v = JSON.parse(output.value); } catch (e) {
        outputErrors.replaceChildren(h("li", {}, `not JSON: ${e.message}`)); output.setAttribute("aria-invalid", "true"); bad = bad || output;
      }
      if (v !== undefined && cx.schema) {
        const errs = validate(cx.schema, v, "");
        if (errs.length) { outputErrors.replaceChildren(...errs.map((m) => h("li", {}, m))); output.setAttribute("aria-invalid", "true"); bad = bad || output; }
      }
      body.output = v;
    }
    if (d === "replan") {
      if (!hint.value.trim()) { hintError.textContent = "A replan needs a hint."; hint.setAttribute("aria-invalid", "true"); bad = bad || hint; }
      body.hint = hint.value.trim();
    }
    if (!body.reason) { reasonError.textContent = "Say why: the reason is recorded with your decision."; reason.setAttribute("aria-invalid", "true"); bad = bad || reason; }
    if (bad) { bad.focus(); announce("The decision was not sent: fix the fields marked in red."); return; }
    submit.disabled = true;
    try {
      const r = await api("POST", `/v1/runs/${run}/resolve`, body);
      announce(`Recorded: ${r.decision} by ${r.by}.`);
      stopLive();
      location.hash = `#/run/${run}`;
    } catch (e) {
      submit.disabled = false;
      if (e.code === "output_schema_mismatch" || e.code === "json_too_deep") { outputErrors.replaceChildren(h("li", {}, e.message)); output.setAttribute("aria-invalid", "true"); output.focus(); }
      else if (e.code === "reason_required" || e.code === "reason_too_long") { reasonError.textContent = e.message; reason.setAttribute("aria-invalid", "true"); reason.focus(); }
      else if (e.status === 401) { route(); }
      else { formError.textContent = `${e.code}: ${e.message}`; submit.focus(); }
    }
  } },
    h("h2", { id: "decide-h" }, "Decide"),
    h("fieldset", {}, h("legend", {}, "Decision"), radios),
    outputBox, hintBox,
    h("label", { for: "reason" }, "Reason (required)"),
    reason,
    h("p", { id: "reason-help", class: "muted" }, "Recorded on the run's log with your token's name."),
    reasonError, formError, submit);
  setTimeout(sync, 0);
  return form;
}

// A JSON Schema check in the browser, for the keywords task output schemas use; the
// server checks the full schema again (422 output_schema_mismatch is shown the same way).
function validate(schema, v, path) {
  const errs = [];
  const at = path || "the output";
  if (schema === true || schema === null || typeof schema !== "object") return errs;
  const typeOf = (x) => (x === null ? "null" : Array.isArray(x) ? "array" : Number.isInteger(x) ? "integer" : typeof x);
  if (schema.type) {
    const types = Array.isArray(schema.type) ? schema.type : [schema.type];
    const t = typeOf(v);
    const ok = types.some((ty) => ty === t || (ty === "number" && t === "integer"));
    if (!ok) { errs.push(`${at}: expected ${types.join(" or ")}, found ${t}`); return errs; }
  }
  if (schema.enum && !schema.enum.some((x) => JSON.stringify(x) === JSON.stringify(v))) errs.push(`${at}: must be one of ${JSON.stringify(schema.enum)}`);
  if ("const" in schema && JSON.stringify(schema.const) !== JSON.stringify(v)) errs.push(`${at}: must be ${JSON.stringify(schema.const)}`);
  if (typeof v === "string") {
    if (schema.minLength !== undefined && [...v].length < schema.minLength) errs.push(`${at}: shorter than ${schema.minLength} characters`);
    if (schema.maxLength !== undefined && [...v].length > schema.maxLength) errs.push(`${at}: longer than ${schema.maxLength} characters`);
    if (schema.pattern !== undefined) { try { if (!new RegExp(schema.pattern, "u").test(v)) errs.push(`${at}: does not match ${schema.pattern}`); } catch (_) { /* the server checks */ } }
  }
  if (typeof v === "number") {
    if (schema.minimum !== undefined && v < schema.minimum) errs.push(`${at}: less than ${schema.minimum}`);
    if (schema.maximum !== undefined && v > schema.maximum) errs.push(`${at}: more than ${schema.maximum}`);
  }
  if (Array.isArray(v)) {
    if (schema.minItems !== undefined && v.length < schema.minItems) errs.push(`${at}: fewer than ${schema.minItems} items`);
    if (schema.maxItems !== undefined && v.length > schema.maxItems) errs.push(`${at}: more than ${schema.maxItems} items`);
    if (schema.items && typeof schema.items === "object") v.forEach((x, i) => errs.push(...validate(schema.items, x, `${at}[${i}]`)));
  }
  if (v && typeof v === "object" && !Array.isArray(v)) {
    for (const k of schema.required || []) if (!(k in v)) errs.push(`${at}: "${k}" is required`);
    const props = schema.properties || {};
    for (const [k, x] of Object.entries(v)) {
      const p = path ? `${path}.${k}` : k;
      if (k in props) errs.push(...validate(props[k], x, p));
      else if (schema.additionalProperties === false) errs.push(`${at}: "${k}" is not allowed`);
      else if (schema.additionalProperties && typeof schema.additionalProperties === "object") errs.push(...validate(schema.additionalProperties, x, p));
    }
  }
  return errs;
}

// ---------- the run list ----------

const STATUSES = ["Accepted", "Planning", "Running", "AwaitingHuman", "Completed", "Failed", "Cancelled"];
const FINISHED = ["Completed", "Failed", "Cancelled"];

async function runsView(params) {
  setTitle("Runs");
  const status = h("select", { id: "f-status", name: "status" }, h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const workflow = h("input", { type: "text", id: "f-workflow", name: "workflow", value: params.get("workflow") || "" });
  const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter runs", onsubmit: (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (workflow.value.trim()) q.set("workflow", workflow.value.trim());
    location.hash = `#/runs?${q}`;
  } },
    h("div", {}, h("label", { for: "f-status" }, "Status"), status),
    h("div", {}, h("label", { for: "f-workflow" }, "Workflow"), workflow),
    h("button", { type: "submit" }, "Filter"));
  const body = h("div", {});
  show(h("h1", {}, "Runs"), filters, body);
  const render = async () => {
    const q = new URLSearchParams();
    for (const k of ["status", "workflow", "cursor"]) if (params.get(k)) q.set(k, params.get(k));
    q.set("limit", "100");
    const data = await api("GET", `/v1/runs?${q}`);
    const rows = data.runs.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/run/${r.run}`, class: "mono" }, r.run.slice(0, 8))),
      h("td", {}, r.workflow), h("td", {}, badge(r.status)),
      h("td", {}, r.accepted_at || ""), h("td", {}, money(r.cost_micros !== undefined ? r.cost_micros : (r.totals || {}).cost_micros))));
    const next = data.next_cursor ? (() => { const n = new URLSearchParams(params); n.set("cursor", data.next_cursor); return h("p", {}, h("a", { href: `#/runs?${n}` }, "Next page")); })() : null;
    // The table says which filter it shows (a script or a test waiting for the filtered
    // list cannot mistake the list it replaces for it).
    body.replaceChildren(rows.length ? h("table", { id: "runs", "data-status": params.get("status") || "", "data-workflow": params.get("workflow") || "" },
      h("thead", {}, h("tr", {}, ["Run", "Workflow", "Status", "Accepted", "Cost"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows)) : h("p", {}, "No run matches."), next);
  };
  await render();
  stopLive = liveList(render);
}

// ---------- the run page ----------

function planSvg(state) {
  const tasks = state.tasks;
  if (!tasks.length) return h("p", { class: "muted" }, "No plan yet.");
  const depth = {};
  const byId = Object.fromEntries(tasks.map((t) => [t.id, t]));
  const d = (id, seen) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const t = byId[id];
    const v = t ? Math.max(-1, ...t.depends_on.filter((x) => byId[x]).map((x) => d(x, seen))) + 1 : 0;
    depth[id] = v;
    return v;
  };
  tasks.forEach((t) => d(t.id, new Set()));
  const cols = {};
  tasks.forEach((t) => { (cols[depth[t.id]] = cols[depth[t.id]] || []).push(t); });
  const W = 170, H = 54, GX = 60, GY = 22, P = 16;
  const pos = {};
  let maxRows = 0;
  Object.entries(cols).forEach(([c, ts]) => { maxRows = Math.max(maxRows, ts.length); ts.forEach((t, r) => { pos[t.id] = { x: P + Number(c) * (W + GX), y: P + r * (H + GY) }; }); });
  const ncols = Object.keys(cols).length;
  const width = P * 2 + ncols * W + (ncols - 1) * GX, height = P * 2 + maxRows * H + (maxRows - 1) * GY;
  const color = { Done: "#1a7f37", Failed: "#cf222e", Skipped: "#8c959f", Escalated: "#8250df", Pending: "#9a6700", Ready: "#9a6700", Dispatched: "#0b57d0", Superseded: "#8c959f" };
  const svg = S("svg", { class: "plan", id: "plan", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-labelledby": "plan-title" },
    S("title", { id: "plan-title" }, `Plan: ${tasks.map((t) => `${t.id} ${t.status}`).join(", ")}`),
    S("defs", {}, S("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" }, S("path", { d: "M0,0 L10,5 L0,10 z", fill: "#57606a" }))));
  for (const t of tasks) for (const dep of t.depends_on) {
    if (!pos[dep]) continue;
    const a = pos[dep], b = pos[t.id];
    svg.append(S("line", { x1: a.x + W, y1: a.y + H / 2, x2: b.x, y2: b.y + H / 2, stroke: "#57606a", "stroke-width": 1.4, "marker-end": "url(#arrow)" }));
  }
  for (const t of tasks) {
    const p = pos[t.id], c = color[t.status] || "#57606a";
    svg.append(S("g", { class: "node", "data-task": t.id, "data-status": t.status },
      S("rect", { x: p.x, y: p.y, width: W, height: H, rx: 8, fill: "#fff", stroke: c, "stroke-width": 2.5 }),
      S("text", { x: p.x + 10, y: p.y + 21, "font-weight": 600, fill: "#1b1f24" }, t.id.length > 22 ? t.id.slice(0, 21) + "…" : t.id),
      S("text", { x: p.x + 10, y: p.y + 40, fill: c }, `${t.status}${t.attempt > 1 ? ` · attempt ${t.attempt}` : ""}`)));
  }
  return svg;
}

function eventSummary(e) {
  const ev = e.event || {};
  const bits = [];
  if (ev.task) bits.push(ev.task);
  if (ev.attempt !== undefined) bits.push(`attempt ${ev.attempt}`);
  if (ev.verdict) bits.push(`verdict ${ev.verdict}`);
  if (ev.error) bits.push(ev.error);
  if (ev.why) bits.push(ev.why);
  if (ev.decision !== undefined) bits.push(`${decisionName(ev.decision)} by ${ev.by}${ev.reason ? `: ${ev.reason}` : ""}`);
  else if (ev.by) bits.push(`by ${ev.by}${ev.reason ? `: ${ev.reason}` : ""}`);
  if (ev.summary) bits.push(ev.summary);
  if (e.kind === "RunFailed" && ev.reason) bits.push(ev.reason);
  if (ev.revision !== undefined) bits.push(`revision ${ev.revision}`);
  return bits.join(" · ");
}

// `endRedraws`: how many times in a row the page was drawn again because the run's
// stream ended with nothing new (bounded: a state that never reads finished cannot loop).
async function runView(run, endRedraws = 0) {
  setTitle(`Run ${run.slice(0, 8)}`);
  const gen = viewGen;
  // The state first, then the events: the events hold at least what the state was folded
  // from (fetched together, a state read before the run's last append could come with the
  // events after it, and the page showed "Running" beside a timeline ending in
  // RunCompleted, with no event left to redraw it: the stream's end redraws it now too).
  const state = await api("GET", `/v1/runs/${run}`);
  const events = await allEvents(run);
  if (gen !== viewGen) return;
  const path = [];
  for (const e of events) {
    const to = { RunAccepted: "Accepted", PlanRequested: "Planning", Planned: "Running", Replanned: "Running", ReplanRequested: "Planning", Escalated: "AwaitingHuman", HumanResolved: "Running", RunCompleted: "Completed", RunFailed: "Failed", RunCancelled: "Cancelled" }[e.kind];
    if (to && path[path.length - 1] !== to) path.push(to);
  }
  const open = state.escalations.find((x) => !x.resolution);
  const t = state.totals || {};
  show(
    h("h1", {}, "Run ", h("span", { class: "mono" }, run), " ", h("span", { id: "run-status" }, badge(state.status))),
    open ? h("p", { class: "question" }, "Waiting for a person: ", h("a", { href: `#/escalation/${run}`, id: "open-escalation" }, open.question)) : null,
    h("div", { class: "grid2" },
      h("section", { class: "card", "aria-labelledby": "sum-h" }, h("h2", { id: "sum-h" }, "Summary"),
        h("dl", { class: "kv" },
          h("dt", {}, "workflow"), h("dd", {}, `${state.workflow} v${state.workflow_version}`),
          h("dt", {}, "accepted"), h("dd", {}, state.accepted_at),
          h("dt", {}, "last event"), h("dd", {}, state.last_event_at),
          h("dt", {}, "cost"), h("dd", { id: "cost" }, money(t.cost_micros)),
          h("dt", {}, "tokens"), h("dd", {}, t.tokens),
          h("dt", {}, "calls"), h("dd", {}, `${t.llm_calls} LLM, ${t.tool_calls} tool`),
          h("dt", {}, "retries / replans"), h("dd", {}, `${t.retries} / ${t.replans}`),
          state.failure ? [h("dt", {}, "failure"), h("dd", { class: "error" }, state.failure)] : null)),
      h("section", { class: "card", "aria-labelledby": "fsm-h" }, h("h2", { id: "fsm-h" }, "FSM path"),
        h("ol", { class: "path", id: "fsm-path" }, path.map((p) => h("li", {}, badge(p)))),
        h("h3", {}, "Budget"), budgetTable(state))),
    h("section", { "aria-labelledby": "plan-h" }, h("h2", { id: "plan-h" }, `Plan (revision ${state.revision})`), planSvg(state)),
    state.result !== null && state.result !== undefined ? h("section", {}, h("h2", {}, "Result"), h("pre", { id: "result" }, pretty(state.result))) : null,
    h("section", { "aria-labelledby": "tl-h" }, h("h2", { id: "tl-h" }, "Timeline"),
      h("table", { id: "timeline" },
        h("thead", {}, h("tr", {}, ["seq", "time", "event", "detail"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, events.map((e) => h("tr", {}, h("td", {}, e.seq), h("td", {}, e.time), h("td", {}, e.kind), h("td", {}, eventSummary(e))))))),
    h("p", {}, h("a", { href: `/v1/runs/${run}/export?format=html`, id: "export-link", onclick: async (ev) => {
      ev.preventDefault();
      const r = await fetch(`/v1/runs/${run}/export?format=html`, { headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` }, credentials: "omit" });
      const url = URL.createObjectURL(await r.blob());
      const a = h("a", { href: url, download: `keel-run-${run}.html` });
      document.body.append(a); a.click(); a.remove();
    } }, "Download the HTML report")),
  );
  if (FINISHED.includes(state.status)) {
    // A finished run takes no more events: no stream to open, and the label says so at
    // once (in the same task that drew the page, so nobody sees it blank).
    liveState("live: run finished");
    stopLive = () => liveState("");
    return;
  }
  // A stream that ends without an event after the ones drawn: the run finished after the
  // state above was read; draw it again, finished (once more at most).
  const onEnd = () => { if (endRedraws < 2) { stopLive(); runView(run, endRedraws + 1); } };
  stopLive = liveRun(run, events.length ? events[events.length - 1].seq : null, () => { stopLive(); runView(run); }, onEnd);
}

// ---------- routing ----------

async function route() {
  viewGen += 1;
  stopLive();
  stopLive = () => {};
  const hash = location.hash || "#/inbox";
  const token = sessionStorage.getItem(TOKEN_KEY);
  document.getElementById("logout").hidden = !token;
  for (const [id, p] of [["nav-inbox", "#/inbox"], ["nav-runs", "#/runs"]]) {
    const a = document.getElementById(id);
    if (hash.startsWith(p)) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!token) { loginView(); return; }
  const [p, qs] = hash.slice(1).split("?");
  const parts = p.split("/").filter(Boolean);
  try {
    if (parts[0] === "escalation" && parts[1]) await escalationView(parts[1]);
    else if (parts[0] === "run" && parts[1]) await runView(parts[1]);
    else if (parts[0] === "runs") await runsView(new URLSearchParams(qs || ""));
    else await inboxView();
  } catch (e) {
    if (e.status === 401) { loginView("Your token is no longer valid: log in again."); return; }
    show(h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, `${e.code || "error"}: ${e.message}`));
  }
}

window.addEventListener("hashchange", () => { route(); main().focus(); });
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.hash = "#/inbox"; route(); });
  route();
});
