'use strict';
// End to end: the real broker (`ephemera serve --dev`), the real `main.js`, `post.js` and
// `renew.js` as child processes with a fake runner environment. The loopback ID token endpoint
// hands out real dev tokens minted by the broker's `POST /dev/token`.
//
// EPHEMERA_BIN names the broker binary (default: <repo>/target/debug/ephemera; scripts/test
// builds it first).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const path = require('path');
const { execFile } = require('child_process');
const lib = require('../lib.js');
const { idTokenEndpoint, runnerEnv, startDevBroker } = require('./helpers.js');

const ACTION_DIR = path.resolve(__dirname, '..');
const REPO = path.resolve(ACTION_DIR, '..', '..');
const BIN = process.env.EPHEMERA_BIN || path.join(REPO, 'target', 'debug', 'ephemera');

/** A renewable policy the default dev token satisfies: a broker JWT `api` of 2 minutes, renewed for up to 1 hour. */
const RENEWABLE_POLICY = `issuer: github
match:
  repository_id: "100001"
ttl: {default: 2m, max: 5m}
renew: {max_lease: 1h}
grants:
  api: {backend: jwt, audience: https://api.dev.ephemera.invalid}
`;

/** Runs `node <script> …args` with `env` (and only that, plus PATH); resolves {code, stdout, stderr}. */
function runNode(script, env, args = []) {
  return run(process.execPath, [path.join(ACTION_DIR, script), ...args], env);
}

function run(file, args, env) {
  return new Promise((resolve) => {
    execFile(file, args, { env: { PATH: process.env.PATH, ...env }, timeout: 60000 },
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
const stateEnvOf = (state) => Object.fromEntries(Object.entries(state).map(([k, v]) => [`STATE_${k}`, v]));

test('end to end against the real broker: main, then post', { timeout: 120000 }, async (t) => {
  assert.ok(
    fs.existsSync(BIN),
    `the broker binary ${BIN} does not exist: run \`cargo build\` first (scripts/test does), or set EPHEMERA_BIN`
  );
  const broker = await startDevBroker(BIN, { 'renewable.yaml': RENEWABLE_POLICY });
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
      const stateEnv = stateEnvOf(state);
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

  await t.test('a renewable lease: main writes the lease file, renew.js and the CLI renew from it, post revokes and deletes it', async () => {
    const runner = runnerEnv({ inputs: { 'broker-url': broker.url, policy: 'renewable', 'jwt-output': 'true' }, idTokenUrl: idp.requestUrl });
    try {
      const main = await runNode('main.js', runner.env);
      assert.equal(main.code, 0, `main failed:\n${main.stdout}\n${main.stderr}`);
      const outputs = read(runner.files.GITHUB_OUTPUT);
      const state = read(runner.files.GITHUB_STATE);
      const leaseFile = outputs['lease-file'];
      assert.equal(leaseFile, path.join(runner.dir, `ephemera-lease-${outputs['lease-id']}.json`));
      assert.deepEqual(state, { lease_id: outputs['lease-id'], lease_file: leaseFile });
      assert.equal(fs.statSync(leaseFile).mode & 0o777, 0o600);
      const lease = JSON.parse(fs.readFileSync(leaseFile, 'utf8'));
      assert.deepEqual(Object.keys(lease), ['broker', 'lease_id', 'policy', 'renew_token', 'until']);
      assert.equal(lease.lease_id, outputs['lease-id']);
      assert.equal(lease.policy, 'renewable');
      assert.equal(lease.until, outputs['expires-at']);
      assert.match(lease.renew_token, /^ephr_/);
      // The renew token is masked before anything else and otherwise never printed.
      const lines = main.stdout.split('\n').filter(Boolean);
      const firstOther = lines.findIndex((l) => !l.startsWith('::add-mask::'));
      assert.ok(lines.slice(0, firstOther).includes(`::add-mask::${lease.renew_token}`), main.stdout);
      assert.equal(main.stdout.split(lease.renew_token).length, 2, 'the renew token appears outside its mask command');
      assert.ok(main.stdout.includes(lib.fingerprint(lease.renew_token)));
      assert.deepEqual(read(runner.files.GITHUB_ENV), {}, 'no aws credential, no AWS profile');

      // The action's renew.js renews: a fresh, live JWT of the same lease.
      const renewed = await runNode('renew.js', {}, ['token', '--lease-file', leaseFile, '--credential', 'api']);
      assert.equal(renewed.code, 0, renewed.stderr);
      const fresh = renewed.stdout.trim();
      assert.equal(fresh.split('.').length, 3);
      assert.notEqual(fresh, outputs['jwt-api']);
      assert.equal((await introspect(broker.url, fresh)).active, true);
      // The file has the CLI's shape: `ephemera token --lease-file` renews from it as well.
      const cli = await run(BIN, ['token', '--lease-file', leaseFile, '--credential', 'api'], {});
      assert.equal(cli.code, 0, cli.stderr);
      assert.equal((await introspect(broker.url, cli.stdout.trim())).active, true);
      // No aws credential in this lease: credential-process says so (exit 1), without the token.
      const noAws = await runNode('renew.js', {}, ['credential-process', '--lease-file', leaseFile]);
      assert.equal(noAws.code, 1);
      assert.match(noAws.stderr, /granted no `aws` credential/);

      const copy = path.join(runner.dir, 'lease-copy.json');
      fs.copyFileSync(leaseFile, copy);
      const post = await runNode('post.js', { ...runner.env, ...stateEnvOf(state) });
      assert.equal(post.code, 0, `post failed:\n${post.stdout}\n${post.stderr}`);
      assert.match(post.stdout, new RegExp(`revoked lease ${state.lease_id}`));
      assert.match(post.stdout, new RegExp(`deleted ${leaseFile.replace(/[.]/g, '\\.')}`));
      assert.ok(!fs.existsSync(leaseFile), 'post deletes the lease file');
      assert.ok(!post.stdout.includes(lease.renew_token) && !post.stderr.includes(lease.renew_token));
      for (const jwt of [outputs['jwt-api'], fresh, cli.stdout.trim()]) {
        assert.deepEqual(await introspect(broker.url, jwt), { active: false }, 'every credential of the lease ends with it');
      }

      // The lease has ended: a renewal is refused (409), and the renew token is not in the message.
      const ended = await runNode('renew.js', {}, ['token', '--lease-file', copy, '--credential', 'api']);
      assert.equal(ended.code, 1, ended.stdout);
      assert.equal(ended.stdout, '');
      assert.match(ended.stderr, /^ephemera: lease_not_renewable: /);
      assert.ok(!ended.stderr.includes(lease.renew_token));
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
