'use strict';
// End to end: the real broker (`ephemera serve --dev`), the real `main.js` and `post.js` as
// child processes with a fake runner environment. The loopback ID token endpoint hands out
// real dev tokens minted by the broker's `POST /dev/token`.
//
// EPHEMERA_BIN names the broker binary (default: <repo>/target/debug/ephemera; scripts/test
// builds it first).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawn, execFile } = require('child_process');
const lib = require('../lib.js');
const { idTokenEndpoint, runnerEnv } = require('./helpers.js');

const ACTION_DIR = path.resolve(__dirname, '..');
const REPO = path.resolve(ACTION_DIR, '..', '..');
const BIN = process.env.EPHEMERA_BIN || path.join(REPO, 'target', 'debug', 'ephemera');

/** Starts `ephemera serve --dev` on a free loopback port; resolves once /readyz answers 200. */
async function startBroker() {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-e2e-data-'));
  // An empty working directory, so the broker serves the built-in `dev` policy only.
  const child = spawn(BIN, ['serve', '--dev', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    cwd: dataDir,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const url = await new Promise((resolve, reject) => {
    let stdout = '';
    const timer = setTimeout(() => reject(new Error(`broker did not start in 20s; stderr:\n${stderr}`)), 20000);
    child.stdout.on('data', (d) => {
      stdout += d;
      const line = stdout.split('\n')[0];
      if (stdout.includes('\n')) {
        clearTimeout(timer);
        const m = line.match(/^ephemera listening on (http:\/\/127\.0\.0\.1:\d+)$/);
        if (m) resolve(m[1]);
        else reject(new Error(`unexpected first line from the broker: ${line}`));
      }
    });
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`broker exited with ${code}; stderr:\n${stderr}`));
    });
  });
  for (let i = 0; ; i++) {
    const ready = await fetch(`${url}/readyz`).then((r) => r.status, () => 0);
    if (ready === 200) break;
    if (i > 100) throw new Error(`broker not ready; stderr:\n${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  const stop = async () => {
    if (child.exitCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
    fs.rmSync(dataDir, { recursive: true, force: true });
  };
  return { url, stop, stderr: () => stderr };
}

/** Runs `node <script>` with `env` (and only that, plus PATH); resolves {code, stdout, stderr}. */
function runNode(script, env) {
  return new Promise((resolve) => {
    execFile(process.execPath, [path.join(ACTION_DIR, script)], { env: { PATH: process.env.PATH, ...env }, timeout: 60000 },
      (error, stdout, stderr) => resolve({ code: error ? error.code : 0, stdout, stderr }));
  });
}

async function introspect(broker, token) {
  const r = await fetch(`${broker}/v1/introspect`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ token }).toString(),
  });
  assert.equal(r.status, 200);
  return r.json();
}

const read = (file) => lib.parseFileCommands(fs.readFileSync(file, 'utf8'));

test('end to end against the real broker: main, then post', { timeout: 120000 }, async (t) => {
  assert.ok(
    fs.existsSync(BIN),
    `the broker binary ${BIN} does not exist: run \`cargo build\` first (scripts/test does), or set EPHEMERA_BIN`
  );
  const broker = await startBroker();
  // The runner's ID token endpoint, backed by the dev broker's issuer: real, signed tokens.
  const idp = await idTokenEndpoint(async (audience) => {
    assert.equal(audience, broker.url, 'the audience defaults to the broker URL');
    const r = await fetch(`${broker.url}/dev/token`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' });
    if (r.status !== 200) throw new Error(`dev token: ${r.status}`);
    return (await r.text()).trim();
  });
  t.after(async () => {
    await idp.close();
    await broker.stop();
  });

  await t.test('main exchanges, post revokes: the JWT is live after main and inactive after post', async () => {
    const runner = runnerEnv({ inputs: { 'broker-url': `${broker.url}/`, policy: 'dev', 'jwt-output': 'true', ttl: '10m' }, idTokenUrl: idp.requestUrl });
    try {
      const main = await runNode('main.js', runner.env);
      assert.equal(main.code, 0, `main failed:\n${main.stdout}\n${main.stderr}`);
      const outputs = read(runner.files.GITHUB_OUTPUT);
      const state = read(runner.files.GITHUB_STATE);
      assert.match(outputs['lease-id'], /^lse_/);
      assert.equal(state.lease_id, outputs['lease-id']);
      const jwt = outputs['jwt-api'];
      assert.ok(jwt && jwt.split('.').length === 3, 'no jwt-api output');
      assert.equal(outputs.jwt, jwt);
      // Masked first, and never printed otherwise.
      const lines = main.stdout.split('\n').filter(Boolean);
      assert.ok(lines[0].startsWith('::add-mask::'));
      assert.ok(lines.includes(`::add-mask::${jwt}`));
      assert.equal(main.stdout.split(jwt).length, 2, 'the JWT appears outside its mask command');
      assert.ok(main.stdout.includes(outputs['lease-id']));
      assert.ok(main.stdout.includes(lib.fingerprint(jwt)));
      assert.deepEqual(read(runner.files.GITHUB_ENV), {}, 'the dev policy grants no aws credential');

      const live = await introspect(broker.url, jwt);
      assert.equal(live.active, true, JSON.stringify(live));

      // The runner hands the saved state to the post step as STATE_<name>.
      const stateEnv = Object.fromEntries(Object.entries(state).map(([k, v]) => [`STATE_${k}`, v]));
      const post = await runNode('post.js', { ...runner.env, ...stateEnv });
      assert.equal(post.code, 0, `post failed:\n${post.stdout}\n${post.stderr}`);
      assert.match(post.stdout, new RegExp(`revoked lease ${state.lease_id}`));
      assert.doesNotMatch(post.stdout, /::warning::|::error::/);
      assert.deepEqual(await introspect(broker.url, jwt), { active: false });

      // post again: the lease is already revoked, which is fine (the broker's revoke is
      // idempotent and may report the lease as revoked again).
      const again = await runNode('post.js', { ...runner.env, ...stateEnv });
      assert.equal(again.code, 0);
      assert.match(again.stdout, /revoked lease|already ended/);
      assert.doesNotMatch(again.stdout, /::warning::|::error::/);
    } finally {
      runner.cleanup();
    }
  });

  await t.test('a denied policy: main fails, names the claim and prints the explain command', async () => {
    const runner = runnerEnv({ inputs: { 'broker-url': broker.url, policy: 'nope' }, idTokenUrl: idp.requestUrl });
    try {
      const main = await runNode('main.js', runner.env);
      assert.equal(main.code, 1, main.stdout);
      assert.match(main.stdout, /::error::ephemera denied policy `nope`: claim `\w+` did not match policy `nope`/);
      assert.match(main.stdout, /ephemera policy explain --policy nope --claims claims\.json/);
      assert.match(main.stdout, /"repository": "ephemera-dev\/demo"/);
      assert.deepEqual(read(runner.files.GITHUB_STATE), {});
      // post after a failed main: nothing to revoke, no warning.
      const post = await runNode('post.js', runner.env);
      assert.equal(post.code, 0);
      assert.match(post.stdout, /no lease to revoke/);
    } finally {
      runner.cleanup();
    }
  });

  await t.test('post with the broker gone: a warning, exit code 0', async () => {
    const runner = runnerEnv({ inputs: { 'broker-url': 'http://127.0.0.1:9' }, idTokenUrl: idp.requestUrl });
    try {
      // Port 9 (discard) is closed on loopback; the retries back off 1.75-3.5 s in total.
      const post = await runNode('post.js', { ...runner.env, STATE_lease_id: 'lse_gone' });
      assert.equal(post.code, 0);
      assert.match(post.stdout, /::warning::could not revoke ephemera lease lse_gone: .*webhook.*TTL/);
    } finally {
      runner.cleanup();
    }
  });
});
