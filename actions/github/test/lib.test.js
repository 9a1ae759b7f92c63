'use strict';
// Unit tests of the action with a fake runner: masking, retries, file commands, the missing
// id-token permission, 401/403 handling and the post step's warnings.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const lib = require('../lib.js');
const { fakeBroker, fakeContext, fakeJwt, idTokenEndpoint, listen, runnerEnv } = require('./helpers.js');

const LEASE = 'lse_01TESTLEASE';
const MULTILINE = 'first-secret-line\nsecond-secret-line\r\nthird%secret-line';

function granted({ aws = true, jwt = true } = {}) {
  const credentials = {};
  if (aws) {
    credentials.aws = {
      kind: 'aws', revocation: 'deny-policy', expires_at: '2030-01-01T00:10:00Z', expiration: '2030-01-01T00:10:00Z',
      access_key_id: 'ASIATESTACCESSKEY', secret_access_key: MULTILINE, session_token: 'session-token-value',
      region: 'eu-west-1',
    };
  }
  if (jwt) credentials.api = { kind: 'jwt', revocation: 'immediate', expires_at: '2030-01-01T00:10:00Z', token: 'eyJ.jwt-value.sig' };
  return [201, { lease_id: LEASE, policy: 'deploy', job: 'github:1:2:1:3', expires_at: '2030-01-01T00:10:00Z', credentials }];
}

/** Sets up an ID token endpoint, a fake broker with `answers` and a runner env; runs `fn`. */
async function withRunner(answers, inputs, fn, opts = {}) {
  const idp = await idTokenEndpoint(opts.mint);
  const broker = await fakeBroker(answers);
  const runner = runnerEnv({
    inputs: { 'broker-url': broker.url, policy: 'deploy', ...inputs },
    idTokenUrl: opts.noIdToken ? undefined : idp.requestUrl,
    extra: opts.extra,
  });
  const ctx = fakeContext(runner.env);
  try {
    await fn({ ctx, idp, broker, runner, read: (name) => lib.parseFileCommands(fs.readFileSync(runner.files[name], 'utf8')) });
  } finally {
    runner.cleanup();
    await idp.close();
    await broker.close();
  }
}

// ---- masking --------------------------------------------------------------------------------

test('mask: every line of a multi-line secret gets its own ::add-mask::, escaped', () => {
  const ctx = fakeContext({});
  lib.mask(ctx, MULTILINE);
  assert.deepEqual(ctx.lines(), [
    '::add-mask::first-secret-line',
    '::add-mask::second-secret-line',
    '::add-mask::third%25secret-line',
  ]);
  const single = fakeContext({});
  lib.mask(single, 'one-line');
  assert.deepEqual(single.lines(), ['::add-mask::one-line']);
});

test('run: every secret line is masked before anything else is written, and never printed', async () => {
  await withRunner([granted()], { 'jwt-output': 'true' }, async ({ ctx, read, runner }) => {
    assert.equal(await lib.run(ctx), true);
    const lines = ctx.lines();
    const firstOther = lines.findIndex((l) => !l.startsWith('::add-mask::'));
    const masks = lines.filter((l) => l.startsWith('::add-mask::'));
    assert.ok(firstOther > 0, ctx.text());
    assert.ok(lines.slice(firstOther).every((l) => !l.startsWith('::add-mask::')), 'a mask came after other output');
    for (const secret of ['first-secret-line', 'second-secret-line', 'third%25secret-line', 'session-token-value', 'ASIATESTACCESSKEY', 'eyJ.jwt-value.sig']) {
      assert.ok(masks.includes(`::add-mask::${secret}`), `not masked: ${secret}`);
    }
    // The ID token is masked too (it is a bearer credential for the exchange).
    assert.ok(masks.some((l) => l.startsWith('::add-mask::eyJ') && l.split('.').length === 3 && !l.includes('jwt-value')));
    // No secret appears in any non-mask line; the fingerprints do.
    const rest = lines.slice(firstOther).join('\n');
    for (const secret of ['first-secret-line', 'second-secret-line', 'third%secret-line', 'session-token-value', 'ASIATESTACCESSKEY', 'jwt-value']) {
      assert.ok(!rest.includes(secret), `secret in log: ${secret}`);
    }
    assert.ok(rest.includes(LEASE));
    assert.ok(rest.includes(lib.fingerprint(MULTILINE)));
    assert.match(lib.fingerprint('x'), /^sha256:[0-9a-f]{16}$/);
    // Nothing was written to the state/env files before the masks: they are written after.
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE });
    assert.deepEqual(read('GITHUB_ENV'), {
      AWS_ACCESS_KEY_ID: 'ASIATESTACCESSKEY',
      AWS_SECRET_ACCESS_KEY: MULTILINE.replace('\r\n', '\n'),
      AWS_SESSION_TOKEN: 'session-token-value',
      AWS_REGION: 'eu-west-1',
      AWS_DEFAULT_REGION: 'eu-west-1',
    });
    const outputs = read('GITHUB_OUTPUT');
    assert.equal(outputs['lease-id'], LEASE);
    assert.equal(outputs['jwt-api'], 'eyJ.jwt-value.sig');
    assert.equal(outputs.jwt, 'eyJ.jwt-value.sig');
    assert.ok(runner.env.GITHUB_ENV);
  });
});

test('run: JWTs are not step outputs unless jwt-output is true; export-aws-env false exports nothing', async () => {
  await withRunner([granted()], { 'export-aws-env': 'false' }, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true);
    const outputs = read('GITHUB_OUTPUT');
    assert.equal(outputs['lease-id'], LEASE);
    assert.equal(outputs['jwt-api'], undefined);
    assert.equal(outputs.jwt, undefined);
    assert.deepEqual(read('GITHUB_ENV'), {});
  });
});

test('run: two aws credentials are not exported (ambiguous), with a warning', async () => {
  const [status, body] = granted({ jwt: false });
  body.credentials.aws2 = { ...body.credentials.aws };
  await withRunner([[status, body]], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true);
    assert.deepEqual(read('GITHUB_ENV'), {});
    assert.match(ctx.text(), /::warning::.*2 aws credentials/);
  });
});

// ---- retries --------------------------------------------------------------------------------

test('retries: 429 then 201 succeeds, with a fresh ID token for the second attempt', async () => {
  const limited = [429, { error: { code: 'rate_limited', message: 'slow down', request_id: 'req_1' } }];
  await withRunner([limited, granted()], { audience: 'https://aud.example' }, async ({ ctx, idp, broker, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.equal(broker.requests.length, 2);
    assert.equal(idp.requests.length, 2);
    assert.deepEqual(idp.requests, ['https://aud.example', 'https://aud.example']);
    const [a, b] = broker.requests.map((r) => r.authorization);
    assert.notEqual(a, b, 'the retry reused the ID token');
    assert.deepEqual(broker.requests[0].body, { policy: 'deploy' });
    assert.equal(ctx.sleeps.length, 1);
    assert.equal(read('GITHUB_OUTPUT')['lease-id'], LEASE);
  });
});

test('retries: 500 on every attempt gives up after MAX_ATTEMPTS, fresh token each time, backoff grows', async () => {
  const down = [500, { error: { code: 'internal', message: 'internal error', request_id: 'req_2' } }];
  await withRunner([down], { ttl: '10m' }, async ({ ctx, idp, broker, read }) => {
    assert.equal(await lib.run(ctx), false);
    assert.equal(broker.requests.length, lib.MAX_ATTEMPTS);
    assert.equal(idp.requests.length, lib.MAX_ATTEMPTS);
    assert.equal(new Set(broker.requests.map((r) => r.authorization)).size, lib.MAX_ATTEMPTS);
    assert.deepEqual(broker.requests[0].body, { policy: 'deploy', ttl: '10m' });
    assert.equal(ctx.sleeps.length, lib.MAX_ATTEMPTS - 1);
    for (let i = 1; i < ctx.sleeps.length; i++) assert.ok(ctx.sleeps[i] > ctx.sleeps[i - 1], String(ctx.sleeps));
    assert.match(ctx.text(), /::error::giving up after 4 attempts: the broker answered 500: internal/);
    assert.deepEqual(read('GITHUB_STATE'), {});
  });
});

test('retries: a network error (broker down) is retried, then fails clearly', async () => {
  const closed = await listen(() => {});
  const deadUrl = closed.url;
  await closed.close();
  await withRunner([granted()], { 'broker-url': deadUrl }, async ({ ctx, idp }) => {
    assert.equal(await lib.run(ctx), false);
    assert.equal(idp.requests.length, lib.MAX_ATTEMPTS);
    assert.match(ctx.text(), /::error::giving up after 4 attempts: cannot reach the broker at http:\/\/127\.0\.0\.1:\d+/);
  });
});

test('retries: Retry-After is honoured (capped) and jitter stays within [50%, 100%] of the step', () => {
  const ctx = { random: () => 0 };
  assert.equal(lib.backoffMs(ctx, 1, 0), 500);
  assert.equal(lib.backoffMs({ random: () => 1 }, 3, 0), 4000);
  assert.equal(lib.backoffMs(ctx, 1, 3), 3000);
  assert.equal(lib.backoffMs(ctx, 1, 3600), 20000);
});

test('403 is not retried: prints the deciding claim and the policy explain command', async () => {
  const denied = [403, { error: { code: 'policy_denied', message: 'claim `ref` did not match policy `deploy`', request_id: 'req_3' } }];
  await withRunner([denied], {}, async ({ ctx, broker, runner, read }) => {
    assert.equal(await lib.run(ctx), false);
    assert.equal(broker.requests.length, 1);
    const text = ctx.text();
    assert.match(text, /::error::ephemera denied policy `deploy`: claim `ref` did not match policy `deploy` \(request req_3\)/);
    assert.match(text, /ephemera policy explain --policy deploy --claims claims\.json/);
    assert.match(text, /"ref": "refs\/heads\/main"/);
    const saved = JSON.parse(fs.readFileSync(`${runner.dir}/ephemera-claims.json`, 'utf8'));
    assert.equal(saved.repository, 'acme/web');
    assert.deepEqual(read('GITHUB_STATE'), {});
  });
});

test('401 is not retried and points at the audience', async () => {
  const invalid = [401, { error: { code: 'invalid_token', message: 'the token is not valid for this broker', request_id: 'req_4' } }];
  await withRunner([invalid], {}, async ({ ctx, broker }) => {
    assert.equal(await lib.run(ctx), false);
    assert.equal(broker.requests.length, 1);
    assert.match(ctx.text(), /::error::the broker rejected the ID token: invalid_token.*Check that `audience` \(http:\/\/127\.0\.0\.1:\d+\)/);
  });
});

// ---- the missing permission, bad inputs -----------------------------------------------------

test('missing id-token permission: a clear message naming `permissions: id-token: write`', async () => {
  await withRunner([granted()], {}, async ({ ctx, broker }) => {
    assert.equal(await lib.run(ctx), false);
    assert.equal(broker.requests.length, 0);
    const text = ctx.text();
    assert.match(text, /::error::the job cannot request an OIDC ID token/);
    assert.match(text, /permissions:%0A    id-token: write/);
  }, { noIdToken: true });
});

test('bad inputs fail before anything is requested', async () => {
  await withRunner([granted()], { 'broker-url': 'http://broker.example.com' }, async ({ ctx, broker, idp }) => {
    assert.equal(await lib.run(ctx), false);
    assert.match(ctx.text(), /must be https:\/\//);
    assert.equal(broker.requests.length + idp.requests.length, 0);
  });
  await withRunner([granted()], { revoke: 'yes' }, async ({ ctx, broker }) => {
    assert.equal(await lib.run(ctx), false);
    assert.match(ctx.text(), /input `revoke` must be `true` or `false`/);
    assert.equal(broker.requests.length, 0);
  });
});

// ---- file commands --------------------------------------------------------------------------

test('file commands: heredoc form with a fresh random delimiter, parsed back exactly', () => {
  const runner = runnerEnv();
  try {
    const ctx = fakeContext(runner.env);
    lib.exportVariable(ctx, 'MULTI', 'a\nb=c\n<<not-a-delimiter');
    lib.exportVariable(ctx, 'PLAIN', 'value');
    lib.setOutput(ctx, 'out', 'x');
    lib.saveState(ctx, 'lease_id', LEASE);
    const env = fs.readFileSync(runner.files.GITHUB_ENV, 'utf8');
    const delimiters = [...env.matchAll(/^([A-Z]+)<<(ghadelimiter_[0-9a-f-]{36})$/gm)].map((m) => m[2]);
    assert.equal(delimiters.length, 2, env);
    assert.notEqual(delimiters[0], delimiters[1]);
    assert.ok(env.endsWith(`${delimiters[1]}\n`));
    assert.deepEqual(lib.parseFileCommands(env), { MULTI: 'a\nb=c\n<<not-a-delimiter', PLAIN: 'value' });
    assert.deepEqual(lib.parseFileCommands(fs.readFileSync(runner.files.GITHUB_OUTPUT, 'utf8')), { out: 'x' });
    assert.deepEqual(lib.parseFileCommands(fs.readFileSync(runner.files.GITHUB_STATE, 'utf8')), { lease_id: LEASE });
    assert.equal(ctx.out.length, 0, 'file commands write nothing to the log');
    assert.throws(() => lib.exportVariable(fakeContext({}), 'X', 'y'), /GITHUB_ENV is not set/);
  } finally {
    runner.cleanup();
  }
});

test('inputs: INPUT_ names are uppercased with dashes kept', () => {
  const ctx = fakeContext({ 'INPUT_BROKER-URL': ' https://b.example ', 'INPUT_JWT-OUTPUT': 'True' });
  assert.equal(lib.getInput(ctx, 'broker-url'), 'https://b.example');
  assert.equal(lib.getBooleanInput(ctx, 'jwt-output', false), true);
  assert.equal(lib.getBooleanInput(ctx, 'export-aws-env', undefined), undefined);
});

// ---- post -----------------------------------------------------------------------------------

test('post: revokes the saved lease with a fresh ID token', async () => {
  await withRunner([[200, { revoked: [LEASE], pending: [] }]], {}, async ({ ctx, broker, idp }) => {
    await lib.post(ctx);
    assert.equal(idp.requests.length, 1);
    assert.deepEqual(broker.requests.map((r) => [r.route, r.body]), [['/v1/revoke', { lease_id: LEASE }]]);
    assert.match(ctx.text(), /revoked lease lse_01TESTLEASE/);
    assert.doesNotMatch(ctx.text(), /::warning::|::error::/);
  }, { extra: { STATE_lease_id: LEASE } });
});

test('post: a lease already revoked is fine (revoke is idempotent)', async () => {
  await withRunner([[200, { revoked: [], pending: [] }]], {}, async ({ ctx }) => {
    await lib.post(ctx);
    assert.match(ctx.text(), /already ended/);
    assert.doesNotMatch(ctx.text(), /::warning::|::error::/);
  }, { extra: { STATE_lease_id: LEASE } });
});

test('post: a failing broker is a warning naming the backstop, never a failure', async () => {
  const down = [503, { error: { code: 'unavailable', message: 'the broker cannot record credentials right now', request_id: 'req_5' } }];
  await withRunner([down], {}, async ({ ctx, broker }) => {
    const before = process.exitCode;
    await lib.post(ctx);
    assert.equal(process.exitCode, before);
    assert.equal(broker.requests.length, lib.MAX_ATTEMPTS);
    const text = ctx.text();
    assert.match(text, /::warning::could not revoke ephemera lease lse_01TESTLEASE: giving up after 4 attempts/);
    assert.match(text, /webhook/);
    assert.match(text, /TTL/);
    assert.doesNotMatch(text, /::error::/);
  }, { extra: { STATE_lease_id: LEASE } });
  // A 4xx is not retried, and is a warning too.
  await withRunner([[401, { error: { code: 'invalid_token', message: 'no' } }]], {}, async ({ ctx, broker }) => {
    await lib.post(ctx);
    assert.equal(broker.requests.length, 1);
    assert.match(ctx.text(), /::warning::could not revoke.*401/);
  }, { extra: { STATE_lease_id: LEASE } });
  // Without the ID token permission: a warning as well.
  await withRunner([[200, {}]], {}, async ({ ctx, broker }) => {
    await lib.post(ctx);
    assert.equal(broker.requests.length, 0);
    assert.match(ctx.text(), /::warning::could not revoke.*id-token: write/);
  }, { noIdToken: true, extra: { STATE_lease_id: LEASE } });
});

test('post: nothing saved, or revoke false → no request', async () => {
  await withRunner([[200, {}]], {}, async ({ ctx, broker, idp }) => {
    await lib.post(ctx);
    assert.match(ctx.text(), /no lease to revoke/);
    assert.equal(broker.requests.length + idp.requests.length, 0);
  });
  await withRunner([[200, {}]], { revoke: 'false' }, async ({ ctx, broker }) => {
    await lib.post(ctx);
    assert.match(ctx.text(), /revoke is false/);
    assert.equal(broker.requests.length, 0);
  }, { extra: { STATE_lease_id: LEASE } });
});

test('fakeJwt claims decode (helper sanity)', () => {
  assert.equal(JSON.parse(Buffer.from(fakeJwt({ a: 1 }).split('.')[1], 'base64url')).a, 1);
});
