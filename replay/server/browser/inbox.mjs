// The web inbox in real headless Chromium, against a running `keel serve` (started by
// replay/cli/tests/browser_spec.rs, which passes what this needs in the environment):
// log in with a token, open the inbox, see the escalation's context, submit an invalid
// supplied output and see the inline error, approve with a reason, and see the run
// complete on its page without a reload; then, on the page of a second waiting run fed by
// the event stream, see it complete when someone else resolves it, with no reload and no
// polling. Screenshots go to KEEL_ARTIFACTS.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import path from "node:path";

const { KEEL_URL, KEEL_TOKEN, KEEL_RUN, KEEL_ARTIFACTS, KEEL_CHROMIUM } = process.env;
for (const [k, v] of Object.entries({ KEEL_URL, KEEL_TOKEN, KEEL_RUN, KEEL_ARTIFACTS, KEEL_CHROMIUM })) {
  if (!v) throw new Error(`${k} is not set`);
}
const step = (s) => console.log(`browser: ${s}`);

const browser = await chromium.launch({ executablePath: KEEL_CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
try {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const outside = [];
  const problems = [];
  await context.route("**/*", (route) => {
    const u = route.request().url();
    if (u.startsWith(KEEL_URL) || u.startsWith("blob:") || u.startsWith("data:")) return route.continue();
    outside.push(u);
    return route.abort();
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("response", (r) => { if (r.status() === 404 || r.status() >= 500) problems.push(`${r.status()} ${r.url()}`); });
  let loads = 0;
  page.on("load", () => { loads += 1; });
  // The JSON event pages the page asked for after a seq (what its polling fallback reads).
  const polls = [];
  page.on("request", (r) => { if (/\/v1\/runs\/[^/]+\/events\?.*after=/.test(r.url())) polls.push(r.url()); });
  const liveMode = () => page.locator("#live-state").getAttribute("data-mode");

  step("log in (a wrong token first)");
  await page.goto(`${KEEL_URL}/ui/`);
  const token = page.getByLabel("Token");
  await token.fill("keel_not-a-token");
  await token.press("Enter");
  await page.getByText("That token is not valid.").waitFor();
  assert.equal(await token.getAttribute("aria-invalid"), "true");
  await token.fill(KEEL_TOKEN);
  await page.getByRole("button", { name: "Log in" }).click();

  step("the inbox lists the escalation, oldest first, with its deadline and default");
  const link = page.locator(`#inbox a[href="#/escalation/${KEEL_RUN}"]`);
  await link.waitFor();
  const headers = await page.locator("#inbox thead th").allTextContents();
  for (const h of ["Deadline", "Default", "Question", "Escalated"]) assert.ok(headers.includes(h), `inbox header ${h}: ${headers}`);
  const times = await page.locator("#inbox tbody td:nth-child(6) time").evaluateAll((ts) => ts.map((t) => t.getAttribute("datetime")));
  assert.ok(times.length >= 2, `several escalations: ${times}`);
  assert.deepEqual(times, [...times].sort(), "oldest first");
  const stored = await page.evaluate(() => ({ s: sessionStorage.getItem("keel.token"), c: document.cookie }));
  assert.equal(stored.s, KEEL_TOKEN, "the token is in sessionStorage");
  assert.equal(stored.c, "", "no cookie");
  // The inbox follows the status stream, not a timer.
  await page.locator('#live-state[data-mode="streaming"]').waitFor();
  const others = await page.locator("#inbox a[href^='#/escalation/']").evaluateAll((as) => as.map((a) => a.getAttribute("href").split("/").pop()));
  const second = others.find((r) => r !== KEEL_RUN);
  assert.ok(second, `a second waiting run: ${others}`);
  await page.screenshot({ path: path.join(KEEL_ARTIFACTS, "inbox.png"), fullPage: true });

  step("the escalation page shows its context");
  await link.focus();
  await page.keyboard.press("Enter");
  await page.locator("#question").waitFor();
  assert.match(await page.locator("#question").innerText(), /\S/);
  assert.equal(await page.locator("#cause").innerText(), "CriticalVerdict");
  assert.match(await page.locator("#why").innerText(), /refund of \d+ cents is above/);
  assert.ok((await page.locator("#attempts tbody tr").count()) >= 1, "each attempt listed");
  assert.match(await page.locator("#attempts").innerText(), /evaluated: Critical/);
  assert.match(await page.locator("#budget").innerText(), /cost/);
  assert.match(await page.locator("#output").innerText(), /within_limit/);
  assert.match(await page.locator("#task-input").innerText(), /refund_cents/);
  assert.ok((await page.locator("#alternatives, #alt-h + p").count()) >= 1, "alternatives section");
  await page.screenshot({ path: path.join(KEEL_ARTIFACTS, "escalation.png"), fullPage: true });

  step("an invalid supplied output is refused inline, nothing sent");
  await page.getByLabel("Supply the output").check();
  const out = page.locator("#supplied-output");
  await out.fill('{"approved": true,');
  await page.getByLabel("Reason (required)").fill("customer is a long-standing one");
  await page.getByRole("button", { name: "Record the decision" }).click();
  await page.locator("#output-errors li").first().waitFor();
  assert.match(await page.locator("#output-errors").innerText(), /not JSON/);
  assert.equal(await out.getAttribute("aria-invalid"), "true");
  assert.equal(await page.evaluate(() => document.activeElement && document.activeElement.id), "supplied-output", "focus moves to the field");
  // The page's schema check (what runs before a supplied output is sent when the task
  // has an output schema; the demo's escalated task has none), on the demo's
  // draft_reply schema.
  const schema = { type: "object", required: ["reply", "tone", "answers"], properties: { reply: { type: "string", minLength: 1 }, tone: { type: "string" }, answers: { type: "string" } } };
  const found = await page.evaluate((s) => [validate(s, { reply: "", tone: 1 }, ""), validate(s, { reply: "Hi", tone: "warm", answers: "refund" }, ""), validate(s, [], "")], schema);
  assert.deepEqual(found, [
    ['the output: "answers" is required', "reply: shorter than 1 characters", "tone: expected string, found integer"],
    [],
    ["the output: expected object, found array"],
  ]);
  // The escalated task (check_policy) has an output schema: an output that breaks it is
  // refused inline, and nothing is recorded.
  assert.equal(await page.locator("#schema").count(), 1, "the task's output schema is shown");
  const eventsBefore = (await (await fetch(`${KEEL_URL}/v1/runs/${KEEL_RUN}/events?limit=10000`, { headers: { Authorization: `Bearer ${KEEL_TOKEN}` } })).json()).events.length;
  await out.fill('{"within_limit": "yes"}');
  await page.getByRole("button", { name: "Record the decision" }).click();
  await page.locator("#output-errors li", { hasText: "within_limit: expected boolean, found string" }).waitFor();
  assert.equal(await out.getAttribute("aria-invalid"), "true");
  await out.fill("{}");
  await page.getByRole("button", { name: "Record the decision" }).click();
  await page.locator("#output-errors li", { hasText: '"within_limit" is required' }).waitFor();
  const eventsAfter = (await (await fetch(`${KEEL_URL}/v1/runs/${KEEL_RUN}/events?limit=10000`, { headers: { Authorization: `Bearer ${KEEL_TOKEN}` } })).json()).events.length;
  assert.equal(eventsAfter, eventsBefore, "nothing recorded for a refused output");

  step("a decision without a reason is refused inline");
  await page.getByLabel("Approve").check();
  await page.getByLabel("Reason (required)").fill("   ");
  await page.getByRole("button", { name: "Record the decision" }).click();
  await page.getByText("Say why: the reason is recorded with your decision.").waitFor();

  step("approve with a reason; the run completes on its page without a reload");
  const loadsBefore = loads;
  await page.evaluate(() => { window.__sameDocument = true; });
  await page.getByLabel("Reason (required)").fill("refund checked with the customer by phone");
  await page.getByRole("button", { name: "Record the decision" }).click();
  await page.waitForURL((u) => u.hash === `#/run/${KEEL_RUN}`);
  await page.locator("#run-status", { hasText: "Completed" }).waitFor({ timeout: 60_000 });
  assert.equal(await page.evaluate(() => window.__sameDocument), true, "no reload");
  assert.equal(loads, loadsBefore, "no page load");
  assert.match(await page.locator("#timeline").innerText(), /HumanResolved/);
  assert.match(await page.locator("#timeline").innerText(), /refund checked with the customer by phone/);
  assert.ok((await page.locator("#plan g.node").count()) >= 3, "the plan graph");
  assert.match(await page.locator("#fsm-path").innerText(), /AwaitingHuman[\s\S]*Completed/);
  await page.screenshot({ path: path.join(KEEL_ARTIFACTS, "run.png"), fullPage: true });

  step("the run list filters by status");
  await page.getByRole("link", { name: "Runs" }).click();
  await page.locator("#runs").waitFor();
  await page.getByLabel("Status").selectOption("AwaitingHuman");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL((u) => u.hash === "#/runs?status=AwaitingHuman");
  // The URL changes before the page handles it: wait for the filtered table itself.
  const filtered = page.locator('#runs[data-status="AwaitingHuman"]');
  await filtered.locator("tbody tr").first().waitFor();
  const statuses = await filtered.locator("tbody td:nth-child(3)").allInnerTexts();
  assert.ok(statuses.length >= 1 && statuses.every((s) => s === "AwaitingHuman"), `${statuses}`);
  assert.equal(await filtered.locator(`a[href="#/run/${KEEL_RUN}"]`).count(), 0, "the decided run left the filter");

  step("a run's page follows its event stream: resolved elsewhere, it completes with no reload and no polling");
  const loadsThen = loads;
  await page.evaluate((r) => { location.hash = `#/run/${r}`; }, second);
  await page.locator("#run-status", { hasText: "AwaitingHuman" }).waitFor();
  await page.locator('#live-state[data-mode="streaming"]').waitFor();
  const resolved = await fetch(`${KEEL_URL}/v1/runs/${second}/resolve`, {
    method: "POST",
    headers: { Authorization: `Bearer ${KEEL_TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ decision: "approve", reason: "approved from another window" }),
  });
  assert.equal(resolved.status, 200, await resolved.text());
  await page.locator("#run-status", { hasText: "Completed" }).waitFor({ timeout: 60_000 });
  assert.match(await page.locator("#timeline").innerText(), /approved from another window/);
  assert.equal(loads, loadsThen, "no page load");
  // The stream ends with the run and the page says so; it does not fall back to polling.
  await page.locator('#live-state[data-mode="run finished"]').waitFor({ timeout: 10_000 })
    .catch(async () => assert.fail(`live mode: ${await liveMode()}`));
  assert.deepEqual(polls, [], "no polling: the events came by the stream");

  assert.deepEqual(outside, [], "nothing fetched from outside the server");
  assert.deepEqual(problems, [], "no script error");
  step("ok");
} finally {
  await browser.close();
}
