// The operator console (issue 20) in a real browser: headless Chromium from Debian's packages,
// driven by playwright-core (which never downloads a browser), against the real `ephemera`
// binary in `serve --dev` with real leases minted through its HTTP API. scripts/test runs it with
// EPHEMERA_BIN naming the release build; EPHEMERA_CHROMIUM overrides /usr/bin/chromium.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const BIN = process.env.EPHEMERA_BIN;
const CHROMIUM = process.env.EPHEMERA_CHROMIUM || '/usr/bin/chromium';
// Without the background-networking flags the closed network here refuses Chromium's own
// connections by the dozen (../shared/FACTS.md).
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run'];

let broker;
let browser;
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-console-'));

/** A policy file beside the built-in `dev` policy, for the preview (built-ins are not files). */
const DEMO_POLICY = `issuer: github
match:
  repository_id: "100001"
  ref: refs/heads/main
deny:
  event_name: [pull_request, pull_request_target, workflow_run]
  runner_environment: self-hosted
ttl: {default: 15m, max: 1h}
grants:
  api: {backend: jwt, audience: https://api.console.example}
`;

/** `serve --dev` on a free loopback port, in a folder whose `policies/` holds `console-demo`;
 * resolves once /readyz says ready. */
async function startBroker() {
  assert.ok(BIN, 'EPHEMERA_BIN must name the ephemera binary (scripts/test sets it)');
  const dataDir = path.join(scratch, 'data');
  fs.mkdirSync(path.join(scratch, 'policies'));
  fs.writeFileSync(path.join(scratch, 'policies', 'console-demo.yaml'), DEMO_POLICY);
  const child = spawn(BIN, ['serve', '--dev', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    cwd: scratch,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: 'warn' },
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const lines = createInterface({ input: child.stdout });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the broker did not start:\n${stderr}`)), 30000);
    lines.on('line', (line) => {
      const m = line.match(/^ephemera listening on (http:\/\/127\.0\.0\.1:\d+)$/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => reject(new Error(`the broker exited with ${code}:\n${stderr}`)));
  });
  for (let i = 0; i < 300; i++) {
    const r = await fetch(`${url}/readyz`).catch(() => null);
    if (r && r.status === 200) break;
    await new Promise((res) => setTimeout(res, 50));
  }
  const admin = fs.readFileSync(path.join(dataDir, 'admin-token'), 'utf8').trim();
  return { url, admin, child, stop: () => child.kill('SIGKILL') };
}

/** A dev token for a job of its own (distinct `run_id`). */
async function devToken(run, extraClaims = {}) {
  const claims = { run_id: String(run), check_run_id: String(run), ...extraClaims };
  const tokenResp = await fetch(`${broker.url}/dev/token`, { method: 'POST', body: JSON.stringify({ claims }), headers: { 'content-type': 'application/json' } });
  assert.equal(tokenResp.status, 200);
  return (await tokenResp.text()).trim();
}

async function exchange(token, policy) {
  const resp = await fetch(`${broker.url}/v1/exchange`, {
    method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify({ policy }),
  });
  return [resp.status, await resp.json()];
}

/** A lease of `policy` for a job of its own (distinct `run_id`), and its JWT. */
async function mintLease(run, extraClaims = {}, policy = 'dev') {
  const [status, body] = await exchange(await devToken(run, extraClaims), policy);
  assert.equal(status, 201, JSON.stringify(body));
  return { id: body.lease_id, job: body.job, jwt: body.credentials.api.token };
}

async function introspect(jwt) {
  const resp = await fetch(`${broker.url}/v1/introspect`, { method: 'POST', body: new URLSearchParams({ token: jwt }) });
  return resp.json();
}

/** A fresh page that reports every console error and uncaught exception. */
async function newPage() {
  const page = await browser.newPage();
  page.problems = [];
  page.on('console', (m) => { if (m.type() === 'error') page.problems.push(m.text()); });
  page.on('pageerror', (e) => page.problems.push(String(e)));
  return page;
}

async function signIn(page, token = broker.admin) {
  await page.goto(`${broker.url}/ui/`);
  await page.getByLabel('Admin token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

before(async () => {
  broker = await startBroker();
  browser = await chromium.launchPersistentContext(path.join(scratch, 'chromium-profile'), {
    executablePath: CHROMIUM, headless: true, args: FLAGS,
  });
});

after(async () => {
  await browser?.close();
  broker?.stop();
  fs.rmSync(scratch, { recursive: true, force: true });
});

test('a wrong admin token is refused and no lease is shown', async () => {
  await mintLease(9001);
  const page = await newPage();
  await signIn(page, 'not-the-admin-token');
  await page.getByText('The admin token was refused.').waitFor();
  assert.equal(await page.locator('#leases').count(), 0, 'the lease table must not render');
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'a refused token is not kept');
  await page.close();
});

test('signed in, the lease minted a second earlier is listed with its kind, guarantee and time left', async () => {
  const lease = await mintLease(9002);
  const page = await newPage();
  await signIn(page);
  const row = page.locator(`tr[data-lease="${lease.id}"]`);
  await row.waitFor();
  const cells = await row.locator('td').allTextContents();
  assert.equal(cells[1], lease.job);
  assert.equal(cells[2], 'dev');
  assert.equal(cells[3], 'ephemera-dev/demo');
  assert.equal(cells[5], 'active');
  assert.match(cells[6], /^1[45]m \d\ds$/, `time left of a 15-minute lease: ${cells[6]}`);
  assert.equal(cells[7], 'api: jwt · immediate');
  assert.match(await page.locator('li[data-state="active"]').textContent(), /^active: [1-9]\d*$/);
  // The token stays in this tab's sessionStorage: not in the URL, not in a cookie, not in localStorage.
  assert.ok(!page.url().includes(broker.admin));
  assert.equal((await browser.cookies()).length, 0);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  assert.deepEqual(page.problems, []);
  await page.close();
});

test('the filters narrow the table, by server fields and by claims', async () => {
  const lease = await mintLease(9003, { actor: 'filter-octocat' });
  const page = await newPage();
  await signIn(page);
  const row = page.locator(`tr[data-lease="${lease.id}"]`);
  await row.waitFor();
  await page.getByLabel('Actor').fill('filter-octo');
  assert.equal(await page.locator('#leases tbody tr').count(), 1, 'only the lease of that actor');
  await page.getByLabel('Policy').fill('no-such-policy');
  await row.waitFor({ state: 'detached' });
  await page.getByLabel('Policy').fill('');
  await page.getByLabel('State', { exact: true }).selectOption('revoked');
  await row.waitFor({ state: 'detached' });
  await page.getByLabel('State', { exact: true }).selectOption('active');
  await page.getByLabel('Platform').selectOption('github');
  await row.waitFor();
  await page.getByLabel('Platform').selectOption('gitlab');
  await row.waitFor({ state: 'detached' });
  await page.close();
});

test('ending a job from its lease asks with the count, ends it, and its JWT introspects inactive', async () => {
  const lease = await mintLease(9004);
  assert.equal((await introspect(lease.jwt)).active, true);
  const page = await newPage();
  await signIn(page);
  await page.locator(`tr[data-lease="${lease.id}"] a`).click();
  await page.locator('#lease-state').waitFor();
  assert.equal(await page.locator('#lease-state').textContent(), 'active');
  await page.getByRole('button', { name: 'End every lease of this job' }).click();
  const dialog = page.locator('dialog#confirm');
  await dialog.waitFor();
  assert.match(await dialog.locator('#confirm-text').textContent(), new RegExp(`^This ends 1 live lease of job ${lease.job}:`));
  await dialog.getByRole('button', { name: 'End 1 lease' }).click();
  await page.locator('#lease-state', { hasText: 'revoked' }).waitFor();
  assert.equal((await introspect(lease.jwt)).active, false);
  // The audit file's lines for this lease: its exchange, then its revocation by the admin.
  await page.locator('#audit-events tr[data-event="revocation"]').waitFor();
  const events = await page.locator('#audit-events tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.event));
  assert.deepEqual(events, ['exchange', 'revocation']);
  assert.equal(await page.locator('#audit-events tr[data-event="exchange"] td').nth(2).textContent(), 'allow');
  await page.close();
});

test('ending every matching lease says how many, and cancel ends none', async () => {
  const a = await mintLease(9005, { actor: 'leaver' });
  const b = await mintLease(9006, { actor: 'leaver' });
  const page = await newPage();
  await signIn(page);
  await page.locator(`tr[data-lease="${b.id}"]`).waitFor();
  await page.getByLabel('Actor').fill('leaver');
  const button = page.getByRole('button', { name: 'End 2 matching live leases' });
  await button.click();
  const dialog = page.locator('dialog#confirm');
  assert.match(await dialog.locator('#confirm-text').textContent(), /^This ends 2 live leases/);
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  assert.equal((await introspect(a.jwt)).active, true, 'cancel ends nothing');
  await button.click();
  await dialog.getByRole('button', { name: 'End 2 leases' }).click();
  await page.getByText(/^Ended 2 lease\(s\)/).waitFor();
  assert.equal((await introspect(a.jwt)).active, false);
  assert.equal((await introspect(b.jwt)).active, false);
  await page.close();
});

test('a claim written as markup is shown as text, under a strict CSP, with no violation', async () => {
  const markup = '<img src=x onerror="document.title=\'pwned\'">';
  const lease = await mintLease(9007, { actor: markup });
  const page = await newPage();
  const response = await page.goto(`${broker.url}/ui/`);
  const csp = response.headers()['content-security-policy'];
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src 'self';/);
  assert.match(csp, /frame-ancestors 'none'/);
  await page.getByLabel('Admin token').fill(broker.admin);
  await page.getByRole('button', { name: 'Sign in' }).click();
  const row = page.locator(`tr[data-lease="${lease.id}"]`);
  await row.waitFor();
  assert.equal(await row.locator('td').nth(4).textContent(), markup);
  assert.equal(await page.locator('#leases img').count(), 0, 'no element was made from the claim');
  assert.notEqual(await page.title(), 'pwned');
  assert.deepEqual(page.problems, [], 'no CSP violation or script error');
  await page.close();
});

test('a denied exchange is listed under Decisions and explained rule by rule', async () => {
  const [status, denial] = await exchange(await devToken(9101, { event_name: 'pull_request_target' }), 'dev');
  assert.equal(status, 403, JSON.stringify(denial));
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Decisions' }).click();
  const row = page.locator(`tr[data-request="${denial.error.request_id}"]`);
  await row.waitFor();
  const cells = await row.locator('td').allTextContents();
  assert.deepEqual([cells[1], cells[2], cells[3], cells[4]], ['exchange', 'dev', 'policy_denied', 'event_name']);
  await row.getByRole('button', { name: 'Explain' }).click();
  await page.locator('#decision').waitFor();
  assert.equal(await page.locator('#decision').textContent(), 'Decision: deny (deciding claim event_name)');
  const rule = page.locator('#trace tr[data-claim="event_name"][data-section="deny"] td');
  assert.equal(await rule.nth(0).textContent(), 'FAIL');
  assert.equal(await rule.nth(3).textContent(), '"pull_request_target"');
  // Pasting claims works the same: the default dev claims pass.
  const claims = JSON.parse(await page.locator('#explain-claims').inputValue());
  claims.event_name = 'push';
  await page.locator('#explain-claims').fill(JSON.stringify(claims));
  await page.getByRole('button', { name: 'Explain', exact: true }).click();
  await page.locator('#decision', { hasText: 'Decision: allow' }).waitFor();
  assert.deepEqual(page.problems, []);
  await page.close();
});

test('a policy change preview lists the live leases it would end, and a broken change its errors', async () => {
  const lease = await mintLease(9102, {}, 'console-demo');
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Policy preview' }).click();
  await page.locator('#preview-policy').selectOption('console-demo');
  const text = page.getByLabel('Its YAML, as it would be');
  await text.fill(DEMO_POLICY.replace('refs/heads/main', 'refs/heads/release'));
  await page.getByRole('button', { name: 'Preview the change' }).click();
  await page.locator(`#would-end tr[data-lease="${lease.id}"]`).waitFor();
  assert.match(await page.locator('#preview-summary').textContent(), /^This change would end [1-9]\d* live leases?$/);
  assert.equal((await introspect(lease.jwt)).active, true, 'a preview changes nothing');
  await text.fill('issuer: github\nmatch: {ref: [unclosed\n');
  await page.getByRole('button', { name: 'Preview the change' }).click();
  await page.locator('#preview-summary', { hasText: 'The change would not load' }).waitFor();
  await page.close();
});

test('health shows readiness, every issuer key set and the last hour of outcomes', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Health' }).click();
  await page.locator('#health-ready').waitFor();
  assert.equal(await page.locator('#health-ready').textContent(), 'ready');
  for (const issuer of ['github', 'gitlab', 'agents']) {
    const keys = await page.locator(`#issuers tr[data-issuer="${issuer}"] td`).nth(2).textContent();
    assert.ok(Number(keys) >= 1, `${issuer} has keys: ${keys}`);
  }
  assert.ok(await page.locator('#chart rect.bar-issued').count() >= 1, 'this hour saw exchanges');
  assert.ok(await page.locator('#chart rect.bar-denied').count() >= 1, 'and denials');
  assert.match(await page.locator('#chart').getAttribute('aria-label'), /^Last hour: [1-9]\d* issued, [1-9]\d* denied$/);
  assert.deepEqual(page.problems, []);
  await page.close();
});

test('keyboard alone signs in and moves between views, and 200 % zoom needs no sideways scroll', async () => {
  const page = await newPage();
  await page.setViewportSize({ width: 640, height: 900 }); // 1280 px at 200 % zoom
  await page.goto(`${broker.url}/ui/`);
  await page.keyboard.type(broker.admin); // the token field has the focus
  await page.keyboard.press('Enter');
  await page.locator('#leases').waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px; only the table box may`);
  // The view has the focus; the navigation is just before it.
  let reached = false;
  for (let i = 0; i < 12 && !reached; i++) {
    await page.keyboard.press('Shift+Tab');
    reached = await page.evaluate(() => document.activeElement?.textContent === 'Health');
  }
  assert.ok(reached, 'Shift+Tab reaches the Health link');
  await page.keyboard.press('Enter');
  await page.locator('#health-ready').waitFor();
  if (process.env.EPHEMERA_SCREENSHOTS) await screenshots();
  await page.close();
});

/** The views at 1280 × 800, into EPHEMERA_SCREENSHOTS (docs/console.md shows them). */
async function screenshots() {
  const dir = process.env.EPHEMERA_SCREENSHOTS;
  fs.mkdirSync(dir, { recursive: true });
  const lease = await mintLease(9201, { actor: 'octocat' });
  await mintLease(9202, { actor: 'hubot' }, 'console-demo');
  await exchange(await devToken(9203, { event_name: 'pull_request_target', actor: 'mallory' }), 'dev');
  const page = await newPage();
  await page.setViewportSize({ width: 1280, height: 800 });
  await signIn(page);
  await page.locator(`tr[data-lease="${lease.id}"]`).waitFor();
  await page.screenshot({ path: path.join(dir, 'leases.png') });
  await page.locator(`tr[data-lease="${lease.id}"] a`).click();
  await page.locator('#lease-state').waitFor();
  await page.screenshot({ path: path.join(dir, 'lease.png'), fullPage: true });
  await page.getByRole('link', { name: 'Decisions' }).click();
  await page.locator('#refusals tbody tr').first().waitFor();
  await page.screenshot({ path: path.join(dir, 'decisions.png') });
  await page.locator('#refusals tbody tr button').first().click();
  await page.locator('#decision').waitFor();
  await page.screenshot({ path: path.join(dir, 'explain.png'), fullPage: true });
  await page.getByRole('link', { name: 'Policy preview' }).click();
  await page.locator('#preview-policy').selectOption('console-demo');
  await page.getByLabel('Its YAML, as it would be').fill(DEMO_POLICY.replace('refs/heads/main', 'refs/heads/release'));
  await page.getByRole('button', { name: 'Preview the change' }).click();
  await page.locator('#would-end').waitFor();
  await page.screenshot({ path: path.join(dir, 'preview.png'), fullPage: true });
  await page.getByRole('link', { name: 'Health' }).click();
  await page.locator('#chart').waitFor();
  await page.screenshot({ path: path.join(dir, 'health.png'), fullPage: true });
  await page.close();
}
