'use strict';
// The GitLab template's renewable-lease path (`ephemera.gitlab-ci.yml`), run with `sh` as GitLab
// runs it: the lease file, the AWS profile whose credential_process is the real `ephemera` CLI,
// and after_script deleting both. The non-renewable path is tested in tests/clients_gitlab.rs.
//
//   EPHEMERA_BIN=$PWD/target/debug/ephemera node --test actions/gitlab/test/
//
// Against the real dev broker for a renewable JWT lease; against a fake broker for an aws
// credential (a real one needs moto: tests/cli_aws.rs covers the CLI's side of it).

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFile } = require('child_process');
const { listen, readBody, startDevBroker } = require('../../github/test/helpers.js');

const REPO = path.resolve(__dirname, '..', '..', '..');
const BIN = process.env.EPHEMERA_BIN || path.join(REPO, 'target', 'debug', 'ephemera');
const TEMPLATE = path.join(__dirname, '..', 'ephemera.gitlab-ci.yml');
const RENEW_TOKEN = 'ephr_GitLabTemplateRenewToken-0123456789_abcdefABCDEF';
const LEASE = 'lse_01GITLABFAKE';

/** A renewable policy the default GitLab dev token (project 200001) satisfies. */
const RENEWABLE_POLICY = `issuer: gitlab
match: {project_id: "200001"}
ttl: {default: 2m, max: 5m}
renew: {max_lease: 1h}
grants: {api: {backend: jwt, audience: https://api.example}}
`;
/** The same without `renew`: the template's path for it is unchanged. */
const PLAIN_POLICY = RENEWABLE_POLICY.replace('renew: {max_lease: 1h}\n', '');

/**
 * The `.ephemera` job's `before_script` and `after_script`, each item's lines joined as GitLab
 * runs them. The template's shape only: lists of `- |` block scalars.
 */
function templateScripts() {
  const lines = fs.readFileSync(TEMPLATE, 'utf8').split('\n');
  const script = (key) => {
    const start = lines.indexOf(`  ${key}:`);
    assert.ok(start > 0, `no ${key} in the template`);
    const out = [];
    for (let i = start + 1; i < lines.length; i++) {
      const line = lines[i];
      if (line === '    - |') continue;
      if (line !== '' && !line.startsWith('      ')) break;
      out.push(line.slice(6));
    }
    return out.join('\n');
  };
  return { before: script('before_script'), after: script('after_script') };
}

/** `sh -c script` in `dir` with only PATH and `env`; resolves {code, stdout, stderr}. */
function sh(script, dir, env) {
  return new Promise((resolve) => {
    execFile('sh', ['-c', script], { cwd: dir, env: { PATH: process.env.PATH, ...env }, timeout: 90000 },
      (error, stdout, stderr) => resolve({ code: error ? error.code : 0, stdout, stderr, all: `${stdout}\n${stderr}` }));
  });
}

/** A directory holding `ephemera` (a link to the binary), to put first on PATH. */
function cliDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-cli-'));
  fs.symlinkSync(BIN, path.join(dir, 'ephemera'));
  return dir;
}

const modeOf = (file) => fs.statSync(file).mode & 0o777;

test('template: a renewable lease against the real broker: lease file, renewals with the CLI, after_script revokes and deletes', { timeout: 120000 }, async (t) => {
  assert.ok(fs.existsSync(BIN), `the broker binary ${BIN} does not exist: run \`cargo build\`, or set EPHEMERA_BIN`);
  const broker = await startDevBroker(BIN, { 'renewable-gitlab.yaml': RENEWABLE_POLICY, 'plain-gitlab.yaml': PLAIN_POLICY });
  const project = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-project-'));
  const bin = cliDir();
  t.after(async () => {
    await broker.stop();
    fs.rmSync(project, { recursive: true, force: true });
    fs.rmSync(bin, { recursive: true, force: true });
  });
  const devToken = async () => (await (await fetch(`${broker.url}/dev/token`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"issuer":"gitlab"}' })).text()).trim();
  const env = {
    PATH: `${bin}:${process.env.PATH}`,
    EPHEMERA_BROKER_URL: broker.url, EPHEMERA_POLICY: 'renewable-gitlab', EPHEMERA_ID_TOKEN: await devToken(), CI_PROJECT_DIR: project,
  };
  const introspect = async (jwt) => (await (await fetch(`${broker.url}/v1/introspect`, { method: 'POST', body: new URLSearchParams({ token: jwt }) })).json()).active;
  const { before, after } = templateScripts();

  // before_script, then the job's script in the same shell: it renews a JWT from the lease file.
  const job = `set -e\n${before}\n` +
    'test -z "${EPHEMERA_RENEW_TOKEN:-}"\n' +
    'test -z "${AWS_CONFIG_FILE:-}"\n' +
    'printf "%s" "$EPHEMERA_API_TOKEN" > exchanged.jwt\n' +
    'ephemera token --lease-file "$EPHEMERA_LEASE_FILE" --credential api > renewed.jwt\n' +
    'echo "script sees $EPHEMERA_LEASE_FILE"';
  const out = await sh(job, project, env);
  assert.equal(out.code, 0, out.all);
  const leaseFile = path.join(project, '.ephemera.env.lease.json');
  assert.match(out.stdout, new RegExp(`ephemera: lease file ${leaseFile.replace(/[.]/g, '\\.')} \\(renewable until `));
  assert.match(out.stdout, /script sees .*\.ephemera\.env\.lease\.json/);
  assert.equal(modeOf(leaseFile), 0o600);
  const lease = JSON.parse(fs.readFileSync(leaseFile, 'utf8'));
  assert.deepEqual(Object.keys(lease), ['broker', 'lease_id', 'policy', 'renew_token', 'until']);
  assert.equal(lease.broker, broker.url);
  assert.equal(lease.policy, 'renewable-gitlab');
  assert.match(lease.lease_id, /^lse_/);
  assert.match(lease.renew_token, /^ephr_/);
  assert.ok(!out.all.includes(lease.renew_token), 'the renew token reached the log');
  const exchanged = fs.readFileSync(path.join(project, 'exchanged.jwt'), 'utf8');
  const renewed = fs.readFileSync(path.join(project, 'renewed.jwt'), 'utf8').trim();
  assert.notEqual(renewed, exchanged);
  assert.equal(await introspect(renewed), true);

  const copy = path.join(project, 'lease-copy.json');
  fs.copyFileSync(leaseFile, copy);
  const done = await sh(after, project, env);
  assert.equal(done.code, 0, done.all);
  assert.match(done.stdout, new RegExp(`ephemera: deleted ${leaseFile.replace(/[.]/g, '\\.')}`));
  assert.match(done.stdout, new RegExp(`ephemera: lease ${lease.lease_id} revoked`));
  assert.ok(!fs.existsSync(leaseFile) && !fs.existsSync(path.join(project, '.ephemera.env')));
  assert.equal(await introspect(renewed), false, 'the renewal ended with the lease');
  assert.equal(await introspect(exchanged), false);
  const ended = await sh(`ephemera token --lease-file "${copy}" --credential api`, project, env);
  assert.notEqual(ended.code, 0);
  assert.match(ended.stderr, /lease_not_renewable/);

  // A policy without `renew`: no lease file, nothing new in the log or the environment.
  const plainEnv = { ...env, EPHEMERA_POLICY: 'plain-gitlab', EPHEMERA_ID_TOKEN: await devToken() };
  const plain = await sh(`set -e\n${before}\ntest -z "\${EPHEMERA_LEASE_FILE:-}"`, project, plainEnv);
  assert.equal(plain.code, 0, plain.all);
  assert.doesNotMatch(plain.all, /lease file|AWS profile/);
  assert.deepEqual(fs.readdirSync(project).filter((f) => f.startsWith('.ephemera')), ['.ephemera.env']);
  const plainDone = await sh(after, project, plainEnv);
  assert.equal(plainDone.code, 0, plainDone.all);
  assert.match(plainDone.stdout, /ephemera: lease lse_\w+ revoked/);
  assert.doesNotMatch(plainDone.stdout, /deleted/);
});

/** A fake broker: the exchange in the env format (one aws credential, renewable), renewals, revoke. */
async function fakeAwsBroker() {
  const requests = [];
  const env = [
    ['EPHEMERA_LEASE_ID', LEASE], ['EPHEMERA_EXPIRES_AT', '2030-01-01T01:00:00Z'], ['EPHEMERA_JOB', 'gitlab:20:302'],
    ['EPHEMERA_POLICY', 'deploy'], ['EPHEMERA_RENEW_TOKEN', RENEW_TOKEN], ['EPHEMERA_RENEW_UNTIL', '2030-01-01T01:00:00Z'],
    ['EPHEMERA_AWS_KIND', 'aws'], ['EPHEMERA_AWS_ACCESS_KEY_ID', 'ASIAEXCHANGED'],
    ['AWS_ACCESS_KEY_ID', 'ASIAEXCHANGED'], ['AWS_SECRET_ACCESS_KEY', 'exchanged/secret'], ['AWS_SESSION_TOKEN', 'exchanged-session'],
    ['AWS_REGION', 'eu-west-1'], ['AWS_DEFAULT_REGION', 'eu-west-1'],
  ].map(([k, v]) => `export ${k}='${v}'\n`).join('');
  const renewal = {
    lease_id: LEASE, policy: 'deploy', job: 'gitlab:20:302', expires_at: '2030-01-01T01:00:00Z',
    credentials: { aws: { kind: 'aws', revocation: 'deny-policy', expires_at: '2030-01-01T00:15:00Z', expiration: '2030-01-01T00:20:00Z', region: 'eu-west-1', access_key_id: 'ASIARENEWED', secret_access_key: 'renewed/secret', session_token: 'renewed-session' } },
  };
  const s = await listen(async (req, res) => {
    await readBody(req);
    requests.push({ route: req.url, authorization: req.headers.authorization });
    if (req.url === '/v1/exchange') res.writeHead(201, { 'content-type': 'text/plain' }).end(env);
    else if (req.url === `/v1/leases/${LEASE}/renew`) res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(renewal));
    else if (req.url === '/v1/revoke') res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ revoked: [LEASE], pending: [] }));
    else res.writeHead(404).end();
  });
  return { ...s, requests };
}

test('template: one aws credential of a renewable lease becomes an AWS profile renewed by `ephemera credential-process`', { timeout: 120000 }, async (t) => {
  assert.ok(fs.existsSync(BIN), `the broker binary ${BIN} does not exist: run \`cargo build\`, or set EPHEMERA_BIN`);
  const broker = await fakeAwsBroker();
  const bin = cliDir();
  t.after(async () => {
    await broker.close();
    fs.rmSync(bin, { recursive: true, force: true });
  });
  const { before, after } = templateScripts();
  // The job's script: no static keys, the profile's command prints a fresh session.
  const script = 'test -z "${AWS_ACCESS_KEY_ID:-}${AWS_SECRET_ACCESS_KEY:-}${AWS_SESSION_TOKEN:-}"\n' +
    'test "$AWS_PROFILE" = ephemera\n' +
    'sh -c "$(sed -n "s/^credential_process = //p" "$AWS_CONFIG_FILE")" > process.json\n';

  for (const [name, extraEnv, profile] of [
    ['with the CLI on PATH', { PATH: `${bin}:${process.env.PATH}` }, true],
    ['without the CLI', {}, false],
    ['with EPHEMERA_AWS_PROFILE=false', { PATH: `${bin}:${process.env.PATH}`, EPHEMERA_AWS_PROFILE: 'false' }, false],
  ]) {
    const project = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-project-'));
    try {
      const env = { EPHEMERA_BROKER_URL: broker.url, EPHEMERA_POLICY: 'deploy', EPHEMERA_ID_TOKEN: 'x.y.z', CI_PROJECT_DIR: project, ...extraEnv };
      const staticKeys = 'test "$AWS_ACCESS_KEY_ID" = ASIAEXCHANGED && test -z "${AWS_CONFIG_FILE:-}"\n';
      const out = await sh(`set -e\n${before}\n${profile ? script : staticKeys}`, project, env);
      assert.equal(out.code, 0, `${name}:\n${out.all}`);
      assert.ok(!out.all.includes(RENEW_TOKEN) && !out.all.includes('exchanged/secret'), `${name}: a secret reached the log`);
      const config = path.join(project, '.ephemera.env.aws-config');
      const leaseFile = path.join(project, '.ephemera.env.lease.json');
      assert.equal(modeOf(leaseFile), 0o600, name);
      if (profile) {
        assert.match(out.stdout, /ephemera: AWS profile ephemera in .* renews the session/);
        assert.equal(modeOf(config), 0o600);
        assert.equal(fs.readFileSync(config, 'utf8'),
          `[profile ephemera]\ncredential_process = "${bin}/ephemera" credential-process --lease-file "${leaseFile}"\nregion = eu-west-1\n`);
        assert.deepEqual(JSON.parse(fs.readFileSync(path.join(project, 'process.json'), 'utf8')), {
          Version: 1, AccessKeyId: 'ASIARENEWED', SecretAccessKey: 'renewed/secret', SessionToken: 'renewed-session',
          Expiration: '2030-01-01T00:15:00Z',
        });
        const renewal = broker.requests.at(-1);
        assert.deepEqual(renewal, { route: `/v1/leases/${LEASE}/renew`, authorization: `Bearer ${RENEW_TOKEN}` });
      } else {
        assert.ok(!fs.existsSync(config), name);
        if (!extraEnv.EPHEMERA_AWS_PROFILE) assert.match(out.stdout, /no ephemera binary in the image/);
      }
      const done = await sh(after, project, env);
      assert.equal(done.code, 0, done.all);
      assert.match(done.stdout, new RegExp(`ephemera: lease ${LEASE} revoked`));
      assert.deepEqual(fs.readdirSync(project).filter((f) => f.startsWith('.ephemera')), [], `${name}: after_script left files`);
    } finally {
      fs.rmSync(project, { recursive: true, force: true });
    }
  }
});
