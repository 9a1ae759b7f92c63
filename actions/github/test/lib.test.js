'use strict';
// Unit tests of the action with a fake runner: masking, github tokens, retries, file commands,
// the missing id-token permission, 401/403 handling, renewable leases (lease file, AWS profile,
// renew.js) and the post step's warnings and cleanup.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const path = require('path');
const { execFile } = require('child_process');
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

// ---- github credentials ---------------------------------------------------------------------

const GH_TOKEN = 'ghs_TESTinstallationTOKEN0123456789abcdef';
const GH_LINE = 'exported credential `gh` (owner octo-org, repositories octo-repo, config; ' +
  'contents: write, pull_requests: write) to GH_TOKEN; the broker revokes it when the lease ends';

/** A `github` credential as the broker returns it; `token` is its only secret. */
function githubCredential(token = GH_TOKEN) {
  return {
    kind: 'github', revocation: 'immediate', expires_at: '2030-01-01T00:10:00Z', owner: 'octo-org',
    repositories: ['octo-repo', 'config'], permissions: { contents: 'write', pull_requests: 'write' },
    api_url: 'https://api.github.com', token,
  };
}

/** `granted(opts)` (no aws, no jwt unless asked) plus a github credential per `{name: token}`. */
function grantedGithub(tokens = { gh: GH_TOKEN }, opts = { aws: false, jwt: false }) {
  const [status, body] = granted(opts);
  for (const [name, token] of Object.entries(tokens)) body.credentials[name] = githubCredential(token);
  return [status, body];
}

/** `secret` has its own ::add-mask:: and appears in no other output line. */
function assertMaskedOnly(ctx, secret) {
  const lines = ctx.lines();
  assert.ok(lines.includes(`::add-mask::${secret}`), `not masked: ${secret}\n${ctx.text()}`);
  assert.deepEqual(lines.filter((l) => !l.startsWith('::add-mask::') && l.includes(secret)), []);
}

/** What was masked, but the job's ID token (a fake JWT, `eyJ…`). */
const maskedValues = (ctx) => ctx.lines()
  .filter((l) => l.startsWith('::add-mask::') && !l.startsWith('::add-mask::eyJ'))
  .map((l) => l.slice('::add-mask::'.length));

test('run: one github credential: its token is masked, exported to GH_TOKEN by default, and logged with its scope', async () => {
  await withRunner([grantedGithub()], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assertMaskedOnly(ctx, GH_TOKEN);
    assert.deepEqual(read('GITHUB_ENV'), { GH_TOKEN });
    const lines = ctx.lines();
    const firstOther = lines.findIndex((l) => !l.startsWith('::add-mask::'));
    assert.ok(lines.indexOf(`::add-mask::${GH_TOKEN}`) < firstOther, 'the token was masked after other output');
    assert.ok(lines.includes(GH_LINE), ctx.text());
    assert.ok(lines.includes(`  credential \`gh\`: github, revocation immediate, expires 2030-01-01T00:10:00Z, ${lib.fingerprint(GH_TOKEN)}`), ctx.text());
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE });
  });
  // What the runner passes when the workflow leaves the input out is the same default.
  const yml = fs.readFileSync(path.join(__dirname, '..', 'action.yml'), 'utf8');
  assert.equal(yml.match(/^  github-token-env:\n(?: {4}.*\n| {6}.*\n)*? {4}default: (\S+)$/m)?.[1], lib.GITHUB_TOKEN_ENV);
  assert.equal(lib.GITHUB_TOKEN_ENV, 'GH_TOKEN');
});

test('run: only string fields outside the public ones are masked: not owner, api_url, repositories or permissions', async () => {
  const [status, body] = grantedGithub();
  Object.assign(body.credentials.gh, {
    unknown_field: 'a-field-this-version-does-not-know', nested: { deep: 'deep-value' }, count: 3, flag: true, nothing: null,
  });
  await withRunner([[status, body]], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    // Deny by default: an unknown string is masked; arrays, objects, numbers are not (nor a crash).
    assert.deepEqual(maskedValues(ctx).sort(), ['a-field-this-version-does-not-know', GH_TOKEN]);
    assert.equal(read('GITHUB_ENV').GH_TOKEN, GH_TOKEN);
  });
});

test('run: github-token-env names the variable the github token is exported to; `true` is GH_TOKEN', async () => {
  for (const [input, variable] of [['OCTO_TOKEN', 'OCTO_TOKEN'], ['_gh2', '_gh2'], ['true', 'GH_TOKEN']]) {
    await withRunner([grantedGithub()], { 'github-token-env': input }, async ({ ctx, read }) => {
      assert.equal(await lib.run(ctx), true, ctx.text());
      assert.deepEqual(read('GITHUB_ENV'), { [variable]: GH_TOKEN }, input);
      assert.ok(ctx.lines().includes(GH_LINE.replace('to GH_TOKEN;', `to ${variable};`)), ctx.text());
      assertMaskedOnly(ctx, GH_TOKEN);
    });
  }
});

test('run: github-token-env false exports no github token; an aws credential is still exported', async () => {
  await withRunner([grantedGithub({ gh: GH_TOKEN }, { aws: true, jwt: false })], { 'github-token-env': 'false' }, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.deepEqual(Object.keys(read('GITHUB_ENV')), ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_REGION', 'AWS_DEFAULT_REGION']);
    assert.match(ctx.text(), /github-token-env is false: the token of github credential gh is not exported/);
    assertMaskedOnly(ctx, GH_TOKEN);
  });
});

test('run: two github credentials are not exported (ambiguous), with a warning naming them', async () => {
  const other = 'ghs_OTHERinstallationTOKEN9876543210fedcba';
  await withRunner([grantedGithub({ gh: GH_TOKEN, config: other })], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.deepEqual(read('GITHUB_ENV'), {});
    assert.match(ctx.text(), /::warning::policy `deploy` returned 2 github credentials \(gh, config\); none was exported to GH_TOKEN because the choice would be ambiguous/);
    assertMaskedOnly(ctx, GH_TOKEN);
    assertMaskedOnly(ctx, other);
  });
});

test('github-token-env: a name the runner refuses or that is not a variable name fails before anything is requested', async () => {
  const reserved = /::error::input `github-token-env` must not be `[^`]+`: names starting with GITHUB_ or RUNNER_ \(and NODE_OPTIONS\) are reserved, the runner refuses to overwrite them/;
  const malformed = /::error::input `github-token-env` must be an environment variable name matching \^\[A-Za-z_\]\[A-Za-z0-9_\]\*\$ .*, not `[^`]+`/;
  for (const [input, expect] of [
    ['GITHUB_TOKEN', reserved], ['RUNNER_TEMP', reserved], ['github_token', reserved], ['NODE_OPTIONS', reserved],
    ['1X', malformed], ['A-B', malformed], ['GH TOKEN', malformed], ['GH_TOKEN=x', malformed],
  ]) {
    await withRunner([grantedGithub()], { 'github-token-env': input }, async ({ ctx, read, broker, idp }) => {
      assert.equal(await lib.run(ctx), false, input);
      assert.match(ctx.text(), expect, input);
      assert.ok(ctx.text().includes(`\`${input}\``), ctx.text());
      assert.equal(broker.requests.length + idp.requests.length, 0, `${input}: something was requested`);
      assert.deepEqual([read('GITHUB_ENV'), read('GITHUB_STATE')], [{}, {}]);
    });
  }
});

test('run: a github credential without a token fails the step, after the lease id is saved for the post step', async () => {
  const [status, body] = grantedGithub();
  delete body.credentials.gh.token;
  await withRunner([[status, body]], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), false);
    assert.match(ctx.text(), /::error::unexpected answer from the broker: github credential `gh` has no `token`/);
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE });
    assert.deepEqual(read('GITHUB_ENV'), {});
  });
});

test("run: a line break in a github credential's public fields cannot start a workflow command", async () => {
  const [status, body] = grantedGithub();
  body.credentials.gh.owner = 'octo-org\n::stop-commands::pause';
  body.credentials.gh.repositories = ['octo-repo\r\n::warning::injected'];
  await withRunner([[status, body]], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.equal(read('GITHUB_ENV').GH_TOKEN, GH_TOKEN);
    assert.deepEqual(ctx.lines().filter((l) => /^::(stop-commands|warning)::/.test(l)), []);
    assert.ok(ctx.lines().some((l) => l.startsWith('exported credential `gh` (owner octo-org ::stop-commands::pause')), ctx.text());
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

// ---- renewable leases ----------------------------------------------------------------------

const RENEW_TOKEN = 'ephr_TESTRENEWTOKENdoNotPrintMe0123456789abcdefABCDEF';
const UNTIL = '2030-01-01T01:00:00Z';

/** An exchange reply of a renewable lease (`renew`), with the credentials of `granted()`. */
function renewable(opts) {
  const [status, body] = granted(opts);
  return [status, { ...body, expires_at: UNTIL, renew: { token: RENEW_TOKEN, until: UNTIL } }];
}

const modeOf = (file) => fs.statSync(file).mode & 0o777;

/** The `credential_process = …` command of an AWS config file. */
function credentialProcessLine(config) {
  const line = config.split('\n').find((l) => l.startsWith('credential_process = '));
  assert.ok(line, config);
  return line.slice('credential_process = '.length);
}

/** Runs `command` with `sh -c`, as the Go, JS and Java SDKs run a credential_process. */
function sh(command, env = {}) {
  return new Promise((resolve) => {
    execFile('sh', ['-c', command], { env: { PATH: process.env.PATH, ...env }, timeout: 60000 },
      (error, stdout, stderr) => resolve({ code: error ? error.code : 0, stdout, stderr }));
  });
}

test('run: a renewable lease with one aws credential: a 0600 lease file and an AWS profile, no static keys', async () => {
  await withRunner([renewable()], {}, async ({ ctx, read, runner }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    const lines = ctx.lines();
    const firstOther = lines.findIndex((l) => !l.startsWith('::add-mask::'));
    // The renew token is masked with the credentials, before any other output.
    assert.ok(lines.slice(0, firstOther).includes(`::add-mask::${RENEW_TOKEN}`), ctx.text());
    assert.equal(ctx.text().split(RENEW_TOKEN).length, 2, 'the renew token appears outside its mask command');
    assert.ok(ctx.text().includes(`renew token ${lib.fingerprint(RENEW_TOKEN)}`));

    const leaseFile = `${runner.dir}/ephemera-lease-${LEASE}.json`;
    const configFile = `${runner.dir}/ephemera-aws-config-${LEASE}`;
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE, lease_file: leaseFile, aws_config_file: configFile });
    assert.equal(read('GITHUB_OUTPUT')['lease-file'], leaseFile);
    assert.equal(read('GITHUB_OUTPUT')['expires-at'], UNTIL);

    // The lease file: the CLI's shape exactly (`ephemera credential-process` reads it too), 0600.
    assert.equal(modeOf(leaseFile), 0o600);
    const lease = JSON.parse(fs.readFileSync(leaseFile, 'utf8'));
    assert.deepEqual(Object.keys(lease), ['broker', 'lease_id', 'policy', 'renew_token', 'until']);
    assert.deepEqual(lease, { broker: runner.env['INPUT_BROKER-URL'], lease_id: LEASE, policy: 'deploy', renew_token: RENEW_TOKEN, until: UNTIL });

    // The AWS config file: 0600, one profile renewing from the lease file, the region.
    assert.equal(modeOf(configFile), 0o600);
    const config = fs.readFileSync(configFile, 'utf8');
    assert.match(config, /^\[profile ephemera\]$/m);
    assert.match(config, /^region = eu-west-1$/m);
    assert.equal(credentialProcessLine(config), `${process.execPath} ${lib.RENEW_SCRIPT} credential-process --lease-file ${leaseFile}`);
    assert.ok(!config.includes(RENEW_TOKEN) && !config.includes('ASIATESTACCESSKEY'), 'no secret in the config file');

    // Instead of the static keys (they would shadow the profile and expire with the session).
    assert.deepEqual(read('GITHUB_ENV'), {
      AWS_CONFIG_FILE: configFile, AWS_PROFILE: 'ephemera', AWS_REGION: 'eu-west-1', AWS_DEFAULT_REGION: 'eu-west-1',
    });
    assert.match(ctx.text(), /exported credential `aws` as the AWS profile `ephemera`/);
    assert.equal(fs.readdirSync(runner.dir).filter((f) => f.endsWith('.tmp')).length, 0);
  });
});

test('run: AWS keys an earlier step exported are cleared, so they do not shadow the profile', async () => {
  const extra = { AWS_ACCESS_KEY_ID: 'AKIAEARLIER', AWS_SESSION_TOKEN: 'earlier-session' };
  await withRunner([renewable({ jwt: false })], {}, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    const env = read('GITHUB_ENV');
    assert.equal(env.AWS_ACCESS_KEY_ID, '');
    assert.equal(env.AWS_SESSION_TOKEN, '');
    assert.equal(env.AWS_SECRET_ACCESS_KEY, undefined, 'only what was set is cleared');
    assert.equal(env.AWS_PROFILE, 'ephemera');
    assert.match(ctx.text(), /cleared AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN/);
  }, { extra });
});

test('run: aws-profile false keeps the static variables for a renewable lease; the lease file is still written', async () => {
  await withRunner([renewable()], { 'aws-profile': 'false' }, async ({ ctx, read, runner }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.deepEqual(Object.keys(read('GITHUB_ENV')), ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_REGION', 'AWS_DEFAULT_REGION']);
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE, lease_file: `${runner.dir}/ephemera-lease-${LEASE}.json` });
    assert.equal(modeOf(`${runner.dir}/ephemera-lease-${LEASE}.json`), 0o600);
    assert.ok(!fs.existsSync(`${runner.dir}/ephemera-aws-config-${LEASE}`));
  });
});

test('run: aws-profile true for a lease that is not renewable: static variables and a warning', async () => {
  await withRunner([granted()], { 'aws-profile': 'true' }, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.equal(read('GITHUB_ENV').AWS_ACCESS_KEY_ID, 'ASIATESTACCESSKEY');
    assert.equal(read('GITHUB_ENV').AWS_PROFILE, undefined);
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE });
    assert.equal(read('GITHUB_OUTPUT')['lease-file'], undefined);
    assert.match(ctx.text(), /::warning::aws-profile is true but policy `deploy` does not make leases renewable/);
  });
  await withRunner([renewable()], { 'aws-profile': 'true', 'export-aws-env': 'false' }, async ({ ctx, read }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.deepEqual(read('GITHUB_ENV'), {});
    assert.match(ctx.text(), /::warning::aws-profile is true but export-aws-env is false/);
  });
  await withRunner([renewable()], { 'aws-profile': 'maybe' }, async ({ ctx, broker }) => {
    assert.equal(await lib.run(ctx), false);
    assert.match(ctx.text(), /input `aws-profile` must be `true` or `false`/);
    assert.equal(broker.requests.length, 0);
  });
});

test('run: a renewable lease without aws credentials: the lease file only', async () => {
  await withRunner([renewable({ aws: false })], {}, async ({ ctx, read, runner }) => {
    assert.equal(await lib.run(ctx), true, ctx.text());
    assert.deepEqual(read('GITHUB_ENV'), {});
    assert.deepEqual(read('GITHUB_STATE'), { lease_id: LEASE, lease_file: `${runner.dir}/ephemera-lease-${LEASE}.json` });
    assert.deepEqual(fs.readdirSync(runner.dir).filter((f) => f.startsWith('ephemera-')), [`ephemera-lease-${LEASE}.json`]);
  });
});

// ---- renew.js -------------------------------------------------------------------------------

/** A renewal reply: the exchange reply's shape, fresh credentials. */
function renewed({ expiration = '2030-01-01T00:20:00Z', expiresAt = '2030-01-01T00:15:00Z', awsCount = 1 } = {}) {
  const credentials = { api: { kind: 'jwt', revocation: 'immediate', expires_at: expiresAt, token: 'eyJ.renewed-jwt.sig' } };
  for (let i = 0; i < awsCount; i++) {
    credentials[i ? `aws${i}` : 'aws'] = {
      kind: 'aws', revocation: 'deny-policy', expires_at: expiresAt, expiration, region: 'eu-west-1',
      access_key_id: 'ASIARENEWED', secret_access_key: 'renewed/secret+key', session_token: 'renewed-session',
    };
  }
  return { lease_id: LEASE, policy: 'deploy', job: 'github:1:2:1:3', expires_at: UNTIL, credentials };
}

test('credentialProcess: the AWS document, Expiration the earlier of the session and the credential', () => {
  const doc = (reply) => JSON.parse(lib.credentialProcess(reply));
  assert.deepEqual(doc(renewed()), {
    Version: 1, AccessKeyId: 'ASIARENEWED', SecretAccessKey: 'renewed/secret+key', SessionToken: 'renewed-session',
    Expiration: '2030-01-01T00:15:00Z',
  });
  for (const [expiration, expiresAt, want] of [
    ['2030-01-01T00:20:00Z', '2030-01-01T00:15:00Z', '2030-01-01T00:15:00Z'], // the credential ends first (deny)
    ['2030-01-01T00:15:00Z', '2030-01-01T00:20:00Z', '2030-01-01T00:15:00Z'], // the STS session ends first
    ['2030-01-01T00:15:00Z', 'not a time', '2030-01-01T00:15:00Z'], // unparsable: the session's end
  ]) {
    assert.equal(doc(renewed({ expiration, expiresAt })).Expiration, want, `${expiration} / ${expiresAt}`);
  }
  assert.throws(() => lib.credentialProcess(renewed({ awsCount: 0 })), /granted no `aws` credential/);
  assert.throws(() => lib.credentialProcess(renewed({ awsCount: 2 })), /granted 2 `aws` credentials \(aws, aws1\); it needs exactly one/);
  assert.throws(() => lib.credentialProcess(renewed({ expiration: '' })), /credential `aws` has no `expiration`/);
});

test("renew.js: the profile's credential_process renews from the lease file and prints only the document", async () => {
  const broker = await fakeBroker([[200, renewed()]]);
  const runner = runnerEnv();
  try {
    const leaseFile = path.join(runner.dir, `ephemera-lease-${LEASE}.json`);
    fs.writeFileSync(leaseFile, JSON.stringify({ broker: `${broker.url}/`, lease_id: LEASE, policy: 'deploy', renew_token: RENEW_TOKEN, until: UNTIL }), { mode: 0o600 });
    const config = lib.awsConfigText({ leaseFile, region: 'eu-west-1' });
    const out = await sh(credentialProcessLine(config));
    assert.equal(out.code, 0, out.stderr);
    assert.equal(out.stderr, '');
    assert.deepEqual(JSON.parse(out.stdout), JSON.parse(lib.credentialProcess(renewed())));
    assert.deepEqual(broker.requests, [{ route: `/v1/leases/${LEASE}/renew`, authorization: `Bearer ${RENEW_TOKEN}`, body: {} }]);

    // The real AWS SDK for Python (botocore), when installed, reads the profile the same way.
    const python = [
      'import botocore.session',
      "c = botocore.session.Session(profile='ephemera').get_credentials().get_frozen_credentials()",
      'print(c.access_key, c.token)',
    ].join('\n');
    fs.writeFileSync(path.join(runner.dir, 'config'), config);
    const boto = await sh(`python3 -c "${python.replace(/"/g, '\\"')}"`, { AWS_CONFIG_FILE: path.join(runner.dir, 'config'), AWS_PROFILE: 'ephemera', HOME: runner.dir });
    if (boto.code === 0) assert.equal(boto.stdout.trim(), 'ASIARENEWED renewed-session');
    else assert.match(boto.stderr, /No module named|not found/, boto.stderr);
  } finally {
    runner.cleanup();
    await broker.close();
  }
});

test('renew.js: a lease that has ended, a bad token, bad usage and a bad lease file fail without the renew token', async () => {
  const notRenewable = [409, { error: { code: 'lease_not_renewable', message: 'the lease was revoked', request_id: 'req_9' } }];
  const invalid = [401, { error: { code: 'invalid_token', message: 'the renew token is not valid for this lease', request_id: 'req_10' } }];
  const broker = await fakeBroker([notRenewable, invalid]);
  const runner = runnerEnv();
  const run = async (argv) => {
    const ctx = fakeContext({});
    const result = await lib.renewCommand(ctx, argv);
    const all = ctx.text() + result.out;
    assert.ok(!all.includes(RENEW_TOKEN), `the renew token leaked: ${all}`);
    return { ...result, err: ctx.text() };
  };
  try {
    const leaseFile = path.join(runner.dir, 'lease.json');
    fs.writeFileSync(leaseFile, JSON.stringify({ broker: broker.url, lease_id: LEASE, policy: 'deploy', renew_token: RENEW_TOKEN, until: UNTIL }));
    const ended = await run(['credential-process', '--lease-file', leaseFile]);
    assert.deepEqual([ended.exit, ended.out], [1, '']);
    assert.equal(ended.err, 'ephemera: lease_not_renewable: the lease was revoked (request req_9)\n');
    const bad = await run(['token', '--lease-file', leaseFile, '--credential', 'api']);
    assert.deepEqual([bad.exit, bad.err], [4, 'ephemera: invalid_token: the renew token is not valid for this lease (request req_10)\n']);
    assert.equal(broker.requests.length, 2, 'a 4xx is not retried');

    for (const argv of [[], ['renew'], ['token', '--lease-file', leaseFile], ['credential-process', '--lease-file', leaseFile, '--credential', 'x'], ['credential-process', '--lease-file']]) {
      const usage = await run(argv);
      assert.equal(usage.exit, 2, String(argv));
      assert.match(usage.err, /usage: node renew\.js credential-process --lease-file F/);
    }
    fs.writeFileSync(leaseFile, `{"renew_token": "${RENEW_TOKEN}"`);
    assert.match((await run(['credential-process', '--lease-file', leaseFile])).err, /not a lease file \(not JSON\)/);
    fs.writeFileSync(leaseFile, JSON.stringify({ renew_token: RENEW_TOKEN }));
    assert.match((await run(['credential-process', '--lease-file', leaseFile])).err, /not a lease file \(no `broker`\)/);
    fs.writeFileSync(leaseFile, JSON.stringify({ broker: 'http://broker.example.com', lease_id: LEASE, renew_token: RENEW_TOKEN }));
    assert.match((await run(['credential-process', '--lease-file', leaseFile])).err, /must be https:\/\/.*since the renew token is sent to it/);
    assert.match((await run(['credential-process', '--lease-file', `${leaseFile}.missing`])).err, /ENOENT/);
    assert.equal(broker.requests.length, 2);
  } finally {
    runner.cleanup();
    await broker.close();
  }
});

test('renewLease: 503 then 200 is retried with the same renew token; the retry note goes to stderr', async () => {
  const down = [503, { error: { code: 'unavailable', message: 'try again', request_id: 'req_11' } }];
  const broker = await fakeBroker([down, [200, renewed()]]);
  try {
    const ctx = fakeContext({});
    const reply = await lib.renewLease(ctx, { broker: broker.url, lease_id: LEASE, renew_token: RENEW_TOKEN });
    assert.equal(reply.credentials.api.token, 'eyJ.renewed-jwt.sig');
    assert.equal(broker.requests.length, 2);
    assert.ok(broker.requests.every((r) => r.authorization === `Bearer ${RENEW_TOKEN}`));
    assert.equal(ctx.sleeps.length, 1);
    assert.match(ctx.text(), /^ephemera: attempt 1\/4 failed: the broker answered 503: unavailable/);
  } finally {
    await broker.close();
  }
});

test('renew.js: token mode prints the named credential of a fresh renewal', async () => {
  const broker = await fakeBroker([[200, renewed()]]);
  const runner = runnerEnv();
  try {
    const leaseFile = path.join(runner.dir, 'lease.json');
    fs.writeFileSync(leaseFile, JSON.stringify({ broker: broker.url, lease_id: LEASE, policy: 'deploy', renew_token: RENEW_TOKEN, until: UNTIL }));
    const out = await sh(`"${process.execPath}" "${lib.RENEW_SCRIPT}" token --lease-file "${leaseFile}" --credential api`);
    assert.deepEqual([out.code, out.stdout, out.stderr], [0, 'eyJ.renewed-jwt.sig\n', '']);
    const ctx = fakeContext({});
    const missing = await lib.renewCommand(ctx, ['token', '--lease-file', leaseFile, '--credential', 'nope']);
    assert.equal(missing.exit, 1);
    assert.match(ctx.text(), /the lease has no credential `nope` \(it has: api, aws\)/);
  } finally {
    runner.cleanup();
    await broker.close();
  }
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

test('post: deletes the lease file and the AWS config file, also when the revoke fails or is off', async () => {
  const down = [503, { error: { code: 'unavailable', message: 'down', request_id: 'req_12' } }];
  for (const [answers, inputs, expect] of [
    [[[200, { revoked: [LEASE], pending: [] }]], {}, /revoked lease/],
    [[down], {}, /::warning::could not revoke/],
    [[[200, {}]], { revoke: 'false' }, /revoke is false/],
    [[[200, {}]], { 'broker-url': 'http://broker.example.com' }, /::warning::could not revoke.*must be https/],
  ]) {
    const runner = runnerEnv();
    const leaseFile = path.join(runner.dir, `ephemera-lease-${LEASE}.json`);
    const configFile = path.join(runner.dir, `ephemera-aws-config-${LEASE}`);
    const keep = path.join(runner.dir, 'keep-me');
    for (const f of [leaseFile, `${leaseFile}.tmp`, configFile, keep]) fs.writeFileSync(f, RENEW_TOKEN);
    await withRunner(answers, inputs, async ({ ctx }) => {
      await lib.post(ctx);
      assert.match(ctx.text(), expect);
      assert.ok(ctx.text().includes(`deleted ${leaseFile}`) && ctx.text().includes(`deleted ${configFile}`), ctx.text());
      assert.ok(!ctx.text().includes(RENEW_TOKEN));
    }, { extra: { STATE_lease_id: LEASE, STATE_lease_file: leaseFile, STATE_aws_config_file: configFile } });
    assert.deepEqual(fs.readdirSync(runner.dir).filter((f) => !f.startsWith('github_')), ['keep-me']);
    fs.rmSync(runner.dir, { recursive: true, force: true });
  }
});

test('post: deletes only files main named (ephemera-…)', async () => {
  const runner = runnerEnv();
  try {
    const other = path.join(runner.dir, 'not-ours.json');
    fs.writeFileSync(other, 'x');
    const ctx = fakeContext({ ...runner.env, 'INPUT_REVOKE': 'false', STATE_lease_file: other });
    await lib.post(ctx);
    assert.ok(fs.existsSync(other));
    assert.doesNotMatch(ctx.text(), /deleted/);
  } finally {
    runner.cleanup();
  }
});

test('fakeJwt claims decode (helper sanity)', () => {
  assert.equal(JSON.parse(Buffer.from(fakeJwt({ a: 1 }).split('.')[1], 'base64url')).a, 1);
});

test('run: a postgres credential masks its password and dsn, not its user name, host or database', async () => {
  const reply = [201, { lease_id: LEASE, policy: 'deploy', job: 'github:1:2:1:3', expires_at: '2030-01-01T00:10:00Z',
    credentials: { db: { kind: 'postgres', revocation: 'immediate', expires_at: '2030-01-01T00:10:00Z',
      username: 'ephemera_lse_01abc', host: 'db.internal:5432', database: 'app', roles: ['app_readonly'],
      password: 'pg-password-value', dsn: 'postgresql://ephemera_lse_01abc:pg-password-value@db.internal:5432/app' } } }];
  await withRunner([reply], {}, async ({ ctx }) => {
    assert.equal(await lib.run(ctx), true);
    const masks = ctx.lines().filter((l) => l.startsWith('::add-mask::'));
    assert.ok(masks.includes('::add-mask::pg-password-value'), masks.join('\n'));
    assert.ok(masks.some((l) => l.includes('postgresql://')), 'the dsn holds the password');
    for (const value of ['ephemera_lse_01abc', 'db.internal:5432', 'app']) {
      assert.ok(!masks.includes(`::add-mask::${value}`), `${value} is not secret`);
    }
  });
});
