'use strict';
// The ephemera GitHub Action: exchange the job's OIDC ID token for short-lived credentials
// (main), and revoke the lease when the job ends (post). Node built-ins only: global fetch,
// fs, crypto. Nothing to install, bundle or audit beyond this directory.
//
// Every function takes a context `ctx` (env, write, sleep, random) so the tests can drive it
// with a fake runner environment; `defaultContext()` is the real runner.

const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');

const MAX_ATTEMPTS = 4;
const BASE_DELAY_MS = 1000;
const MAX_DELAY_MS = 20000;
const REQUEST_TIMEOUT_MS = 30000;
const STATE_LEASE_ID = 'lease_id';
// The files `main` writes for a renewable lease; `post` deletes them (their paths are not secret).
const STATE_LEASE_FILE = 'lease_file';
const STATE_AWS_CONFIG = 'aws_config_file';
// The AWS profile `main` writes for a renewable lease's aws credential.
const AWS_PROFILE = 'ephemera';
const RENEW_SCRIPT = path.join(__dirname, 'renew.js');
// Credential fields that are not secret; every other string field of a credential is masked
// (a postgres credential's `password` and `dsn` are; its `username`, `host`, `database` are not;
// an ssh credential's `private_key` is, its certificate and public key are not).
const PUBLIC_FIELDS = new Set([
  'kind', 'revocation', 'expires_at', 'expiration', 'region', 'owner', 'api_url', 'username', 'host', 'database',
  'certificate', 'public_key', 'key_id', 'serial', 'valid_after', 'valid_before',
]);
// Where a returned `github` credential's token goes by default: what the `gh` CLI reads.
const GITHUB_TOKEN_ENV = 'GH_TOKEN';

function defaultContext() {
  return {
    env: process.env,
    write: (s) => process.stdout.write(s),
    sleep: (ms) => new Promise((resolve) => setTimeout(resolve, ms)),
    random: Math.random,
  };
}

class ActionError extends Error {}

// ---- inputs ---------------------------------------------------------------------------------

/** An input as the runner passes it: `INPUT_<NAME>`, uppercased, dashes kept, spaces → `_`. */
function getInput(ctx, name) {
  const value = ctx.env[`INPUT_${name.replace(/ /g, '_').toUpperCase()}`];
  return (value || '').trim();
}

function getRequiredInput(ctx, name) {
  const value = getInput(ctx, name);
  if (!value) throw new ActionError(`input \`${name}\` is required`);
  return value;
}

/** A YAML-1.2-core boolean input; `fallback` when empty (which may be `undefined` = auto). */
function getBooleanInput(ctx, name, fallback) {
  const value = getInput(ctx, name);
  if (value === '') return fallback;
  if (['true', 'True', 'TRUE'].includes(value)) return true;
  if (['false', 'False', 'FALSE'].includes(value)) return false;
  throw new ActionError(`input \`${name}\` must be \`true\` or \`false\`, not \`${value}\``);
}

/** `text` parsed as JSON, or undefined when it is not JSON (a proxy's HTML error page, say). */
function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** The broker's base URL, without trailing slashes; https, or http on loopback only. */
function brokerUrl(ctx) {
  return checkBrokerUrl(getRequiredInput(ctx, 'broker-url'), 'input `broker-url`', "the job's ID token");
}

/**
 * `raw` without trailing slashes, if it is https (or http on loopback). `what` names the URL in
 * errors, `sent` the bearer credential that would travel to it.
 */
function checkBrokerUrl(raw, what, sent) {
  raw = String(raw).replace(/\/+$/, '');
  let url;
  try {
    url = new URL(raw);
  } catch {
    throw new ActionError(`${what} is not a URL: \`${raw}\``);
  }
  const loopback = ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname);
  if (url.protocol !== 'https:' && !(url.protocol === 'http:' && loopback)) {
    throw new ActionError(
      `${what} must be https:// (plain http is accepted on loopback only, ` +
        `since ${sent} is sent to it): \`${raw}\``
    );
  }
  return raw;
}

// ---- workflow commands and file commands ----------------------------------------------------

function escapeData(s) {
  return String(s).replace(/%/g, '%25').replace(/\r/g, '%0D').replace(/\n/g, '%0A');
}

function info(ctx, message) {
  ctx.write(`${message}\n`);
}

function command(ctx, name, message) {
  ctx.write(`::${name}::${escapeData(message)}\n`);
}

/**
 * Registers a secret with the runner's log masker: one `::add-mask::` per line, because the
 * runner masks each registered string separately and a multi-line value in one command would
 * not match what a later step prints line by line.
 */
function mask(ctx, value) {
  if (value === undefined || value === null) return;
  const text = String(value);
  const lines = new Set([text, ...text.split(/\r\n|\r|\n/)]);
  for (const line of lines) {
    if (line.trim() === '' || /[\r\n]/.test(line)) continue;
    ctx.write(`::add-mask::${escapeData(line)}\n`);
  }
}

/** Appends `NAME<<DELIM\nvalue\nDELIM\n` to a runner file command (GITHUB_ENV, _OUTPUT, _STATE). */
function fileCommand(ctx, fileVar, name, value) {
  const file = ctx.env[fileVar];
  if (!file) {
    throw new ActionError(`${fileVar} is not set: this action needs a GitHub Actions runner (2.297 or newer)`);
  }
  const text = String(value);
  const delimiter = `ghadelimiter_${crypto.randomUUID()}`;
  if (name.includes(delimiter) || text.includes(delimiter)) {
    throw new ActionError(`unexpected input: the value of \`${name}\` contains the delimiter`);
  }
  if (/[\r\n]/.test(name) || name.includes('<<') || name.includes('=')) {
    throw new ActionError(`invalid name for ${fileVar}: \`${name}\``);
  }
  fs.appendFileSync(file, `${name}<<${delimiter}${os.EOL}${text}${os.EOL}${delimiter}${os.EOL}`, 'utf8');
}

const exportVariable = (ctx, name, value) => fileCommand(ctx, 'GITHUB_ENV', name, value);
const setOutput = (ctx, name, value) => fileCommand(ctx, 'GITHUB_OUTPUT', name, value);
const saveState = (ctx, name, value) => fileCommand(ctx, 'GITHUB_STATE', name, value);

/** Parses a file written with the heredoc form back to `{name: value}` (the tests use it). */
function parseFileCommands(text) {
  const result = {};
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line === '') continue;
    const heredoc = line.indexOf('<<');
    const eq = line.indexOf('=');
    if (heredoc > 0 && (eq < 0 || heredoc < eq)) {
      const name = line.slice(0, heredoc);
      const delimiter = line.slice(heredoc + 2);
      const value = [];
      i++;
      while (i < lines.length && lines[i] !== delimiter) value.push(lines[i++]);
      if (i >= lines.length) throw new Error(`unterminated heredoc for ${name}`);
      result[name] = value.join('\n');
    } else if (eq > 0) {
      result[line.slice(0, eq)] = line.slice(eq + 1);
    } else {
      throw new Error(`malformed file command line: ${line}`);
    }
  }
  return result;
}

/** A short SHA-256 fingerprint of a secret, safe to log: lets two logs be compared. */
function fingerprint(value) {
  return `sha256:${crypto.createHash('sha256').update(String(value)).digest('hex').slice(0, 16)}`;
}

// ---- HTTP: ID token, retries ----------------------------------------------------------------

class RetryableError extends Error {}

/** The job's OIDC ID token for `audience`, from the runner's token endpoint; masked at once. */
async function getIdToken(ctx, audience) {
  const url = ctx.env.ACTIONS_ID_TOKEN_REQUEST_URL;
  const token = ctx.env.ACTIONS_ID_TOKEN_REQUEST_TOKEN;
  if (!url || !token) {
    throw new ActionError(
      'the job cannot request an OIDC ID token: ACTIONS_ID_TOKEN_REQUEST_URL / ' +
        'ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set. Add this to the workflow or the job:\n' +
        '  permissions:\n    id-token: write\n    contents: read\n' +
        '(pull requests from forks never get an ID token)'
    );
  }
  const full = `${url}${url.includes('?') ? '&' : '?'}audience=${encodeURIComponent(audience)}`;
  let response;
  try {
    response = await fetch(full, {
      headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (e) {
    throw new RetryableError(`cannot reach the runner's ID token endpoint: ${describe(e)}`);
  }
  const text = await response.text().catch(() => '');
  if (response.status === 429 || response.status >= 500) {
    throw new RetryableError(`the runner's ID token endpoint answered ${response.status}`);
  }
  if (!response.ok) {
    throw new ActionError(`the runner's ID token endpoint answered ${response.status}`);
  }
  const value = parseJson(text)?.value;
  if (typeof value !== 'string' || value === '') {
    throw new ActionError("the runner's ID token endpoint answered without a token");
  }
  mask(ctx, value);
  return value;
}

function describe(e) {
  const cause = e && e.cause && (e.cause.code || e.cause.message);
  return cause ? `${e.message} (${cause})` : String((e && e.message) || e);
}

/** Backoff before attempt `attempt + 1`: exponential, full-jittered in [50%, 100%]. */
function backoffMs(ctx, attempt, retryAfterSecs) {
  const exp = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** (attempt - 1));
  const jittered = Math.round(exp * (0.5 + 0.5 * ctx.random()));
  if (retryAfterSecs > 0) return Math.min(MAX_DELAY_MS, Math.max(jittered, retryAfterSecs * 1000));
  return jittered;
}

/**
 * POSTs `body` to the broker with a fresh ID token per attempt. Retries network errors, 429 and
 * 5xx only (up to MAX_ATTEMPTS); returns `{status, body}` for any other answer.
 */
async function callBroker(ctx, { base, audience, route, body }) {
  let lastError;
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    let retryAfter = 0;
    try {
      const idToken = await getIdToken(ctx, audience);
      let response;
      try {
        response = await fetch(`${base}${route}`, {
          method: 'POST',
          headers: {
            Authorization: `Bearer ${idToken}`,
            'Content-Type': 'application/json',
            Accept: 'application/json',
            'User-Agent': 'ephemera-github-action',
          },
          body: JSON.stringify(body),
          signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
        });
      } catch (e) {
        throw new RetryableError(`cannot reach the broker at ${base}: ${describe(e)}`);
      }
      const text = await response.text().catch(() => '');
      const parsed = parseJson(text);
      if (response.status === 429 || response.status >= 500) {
        retryAfter = Number(response.headers.get('retry-after')) || 0;
        throw new RetryableError(`the broker answered ${response.status}${errorSuffix(parsed)}`);
      }
      return { status: response.status, body: parsed };
    } catch (e) {
      if (!(e instanceof RetryableError)) throw e;
      lastError = e;
      if (attempt === MAX_ATTEMPTS) break;
      const delay = backoffMs(ctx, attempt, retryAfter);
      info(ctx, `attempt ${attempt}/${MAX_ATTEMPTS} failed: ${e.message}; retrying in ${(delay / 1000).toFixed(1)}s`);
      await ctx.sleep(delay);
    }
  }
  throw new ActionError(`giving up after ${MAX_ATTEMPTS} attempts: ${lastError.message}`);
}

function errorSuffix(body) {
  const err = body && body.error;
  if (!err) return '';
  return `: ${err.code}: ${err.message}${err.request_id ? ` (request ${err.request_id})` : ''}`;
}

// ---- main -----------------------------------------------------------------------------------

/** The claims of an ID token (its payload, unverified): what the broker saw. Not secret. */
function decodeClaims(idToken) {
  try {
    return JSON.parse(Buffer.from(idToken.split('.')[1], 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
}

function shellQuote(s) {
  return /^[A-Za-z0-9_./:@%+=-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Explains a 403: the denial (it names the claim) and the `policy explain` command to run. */
async function reportDenial(ctx, { policy, audience, body }) {
  const err = (body && body.error) || {};
  command(ctx, 'error', `ephemera denied policy \`${policy}\`: ${err.message || 'policy_denied'}` +
    (err.request_id ? ` (request ${err.request_id})` : ''));
  // The claims this job presents (a fresh token has the same claims but `jti`, `iat`, `exp`).
  let claims;
  try {
    claims = decodeClaims(await getIdToken(ctx, audience));
  } catch {
    claims = undefined;
  }
  const dir = ctx.env.RUNNER_TEMP || os.tmpdir();
  const file = path.join(dir, 'ephemera-claims.json');
  if (claims) {
    fs.writeFileSync(file, `${JSON.stringify(claims, null, 2)}\n`);
    info(ctx, "::group::This job's ID token claims (save them as claims.json)");
    info(ctx, JSON.stringify(claims, null, 2));
    info(ctx, '::endgroup::');
    info(ctx, `The claims are also in ${file} on the runner.`);
  }
  info(ctx, 'An operator can see which rule decided with:');
  info(ctx, `  ephemera policy explain --policy ${shellQuote(policy)} --claims claims.json`);
  throw new ActionError(`policy \`${policy}\` denied this job: ${err.message || 'policy_denied'}`);
}

/**
 * Every secret string of a credential: each string field but the known public ones, so a field
 * this version does not know is masked (deny by default). Only strings: the broker sends every
 * secret as a string field of its own, while arrays and objects are public scope (a github
 * credential's `repositories`, `permissions`). Masking their items would be harmful, not safe:
 * the runner would star out `write` or `config` wherever any later step prints it.
 */
function secretsOf(credential) {
  if (typeof credential === 'string') return [credential];
  if (!credential || typeof credential !== 'object') return [];
  return Object.entries(credential)
    .filter(([key, value]) => typeof value === 'string' && !PUBLIC_FIELDS.has(key))
    .map(([, value]) => value);
}

/** The `main` step. Returns false (after an `::error::`) when the step must fail. */
async function run(ctx = defaultContext()) {
  try {
    await exchange(ctx);
    return true;
  } catch (e) {
    command(ctx, 'error', e instanceof ActionError ? e.message : `unexpected error: ${e && e.stack ? e.stack : e}`);
    return false;
  }
}

async function exchange(ctx) {
  const base = brokerUrl(ctx);
  const policy = getRequiredInput(ctx, 'policy');
  const audience = getInput(ctx, 'audience') || base;
  const ttl = getInput(ctx, 'ttl');
  const exportAws = getBooleanInput(ctx, 'export-aws-env', undefined);
  const awsProfile = getBooleanInput(ctx, 'aws-profile', undefined);
  const jwtOutput = getBooleanInput(ctx, 'jwt-output', false);
  const githubTokenEnv = githubTokenEnvInput(ctx);
  getBooleanInput(ctx, 'revoke', true); // validated here, so a typo fails before anything is minted

  const body = ttl ? { policy, ttl } : { policy };
  const { status, body: reply } = await callBroker(ctx, { base, audience, route: '/v1/exchange', body });
  if (status === 403) await reportDenial(ctx, { policy, audience, body: reply });
  if (status === 401) {
    throw new ActionError(
      `the broker rejected the ID token${errorSuffix(reply)}. Check that \`audience\` (${audience}) ` +
        "is one the broker's issuer configuration accepts"
    );
  }
  if (status !== 201 || !reply || typeof reply.lease_id !== 'string') {
    throw new ActionError(`unexpected answer from the broker: ${status}${errorSuffix(reply)}`);
  }

  // Mask first: nothing is written anywhere before every secret line is registered, the renew
  // token of a renewable lease included.
  const credentials = reply.credentials && typeof reply.credentials === 'object' ? reply.credentials : {};
  for (const credential of Object.values(credentials)) {
    for (const secret of secretsOf(credential)) mask(ctx, secret);
  }
  if (reply.renew) mask(ctx, reply.renew.token); // even in a reply too malformed to renew with
  const renew = renewalOf(reply);
  // Then the lease id, so `post` revokes even if a later step of `main` fails.
  saveState(ctx, STATE_LEASE_ID, reply.lease_id);
  setOutput(ctx, 'lease-id', reply.lease_id);
  setOutput(ctx, 'expires-at', reply.expires_at || '');

  info(ctx, `ephemera lease ${reply.lease_id} (policy ${reply.policy}, job ${reply.job}), expires ${reply.expires_at}`);
  if (renew) info(ctx, `  renewable until ${renew.until} (renew token ${fingerprint(renew.token)})`);
  const aws = [];
  const jwts = [];
  const github = [];
  for (const [name, credential] of Object.entries(credentials)) {
    const prints = secretsOf(credential).map(fingerprint).join(', ');
    info(ctx, `  credential \`${name}\`: ${credential.kind}, revocation ${credential.revocation}, ` +
      `expires ${credential.expires_at}, ${prints}`);
    if (credential.kind === 'aws') aws.push([name, credential]);
    if (credential.kind === 'jwt') jwts.push([name, credential]);
    if (credential.kind === 'github') github.push([name, credential]);
  }

  const awsMode = awsExportMode(ctx, { policy, aws, exportAws, awsProfile, renewable: Boolean(renew) });
  const files = renew ? writeLeaseFiles(ctx, { base, reply, awsConfig: awsMode === 'profile' }) : undefined;
  if (awsMode === 'profile') exportAwsProfile(ctx, aws[0], files);
  if (awsMode === 'env') exportAwsEnv(ctx, aws[0]);
  exportGithubToken(ctx, { policy, github, envName: githubTokenEnv });

  if (jwtOutput) {
    for (const [name, c] of jwts) {
      setOutput(ctx, `jwt-${name}`, c.token);
      info(ctx, `JWT \`${name}\` is in the step output \`jwt-${name}\``);
    }
    if (jwts.length === 1) setOutput(ctx, 'jwt', jwts[0][1].token);
  } else if (jwts.length > 0) {
    info(ctx, 'JWTs are not exposed as step outputs (set `jwt-output: true` to get them)');
  }
}

/** The reply's `renew` ({token, until}) when the policy made the lease renewable. */
function renewalOf(reply) {
  const renew = reply.renew;
  if (!renew || typeof renew.token !== 'string' || renew.token === '' || typeof renew.until !== 'string') return undefined;
  return renew;
}

/**
 * How a returned aws credential reaches later steps: `profile` (an AWS config profile that
 * renews it from the lease file), `env` (static AWS_* variables) or `none`; warns when the
 * inputs asked for something the reply cannot give.
 */
function awsExportMode(ctx, { policy, aws, exportAws, awsProfile, renewable }) {
  if (exportAws === false) {
    if (awsProfile === true) command(ctx, 'warning', 'aws-profile is true but export-aws-env is false: no aws credential is exported');
    return 'none';
  }
  if (aws.length > 1) {
    command(ctx, 'warning', `policy \`${policy}\` returned ${aws.length} aws credentials ` +
      `(${aws.map(([n]) => n).join(', ')}); none was exported to AWS_* because the choice would be ambiguous`);
    return 'none';
  }
  if (aws.length === 0) {
    const asked = exportAws === true ? 'export-aws-env' : awsProfile === true ? 'aws-profile' : undefined;
    if (asked) command(ctx, 'warning', `${asked} is true but policy \`${policy}\` returned no aws credential`);
    return 'none';
  }
  if (renewable && awsProfile !== false) return 'profile';
  if (awsProfile === true) {
    command(ctx, 'warning', `aws-profile is true but policy \`${policy}\` does not make leases renewable ` +
      '(no `renew` in it): the credential is exported as static AWS_* variables instead');
  }
  return 'env';
}

function exportAwsEnv(ctx, [name, c]) {
  exportVariable(ctx, 'AWS_ACCESS_KEY_ID', c.access_key_id);
  exportVariable(ctx, 'AWS_SECRET_ACCESS_KEY', c.secret_access_key);
  exportVariable(ctx, 'AWS_SESSION_TOKEN', c.session_token);
  if (c.region) {
    exportVariable(ctx, 'AWS_REGION', c.region);
    exportVariable(ctx, 'AWS_DEFAULT_REGION', c.region);
  }
  info(ctx, `exported credential \`${name}\` to AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN` +
    (c.region ? ', AWS_REGION, AWS_DEFAULT_REGION' : ''));
}

// ---- github credentials: the installation token ---------------------------------------------

/**
 * Input `github-token-env`: the variable a returned `github` credential's token is exported to,
 * or undefined for `false` (no export). Empty or `true` is the default, GH_TOKEN.
 */
function githubTokenEnvInput(ctx) {
  const value = getInput(ctx, 'github-token-env');
  if (['false', 'False', 'FALSE'].includes(value)) return undefined;
  if (value === '' || ['true', 'True', 'TRUE'].includes(value)) return GITHUB_TOKEN_ENV;
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(value)) {
    throw new ActionError('input `github-token-env` must be an environment variable name matching ' +
      `^[A-Za-z_][A-Za-z0-9_]*$ (a letter or _, then letters, digits, _), or \`false\`, not \`${value}\``);
  }
  // The runner keeps GITHUB_* and RUNNER_* for itself: it would not overwrite GITHUB_TOKEN with
  // ours, and later steps would silently use its token. Any case: Windows names ignore it.
  // NODE_OPTIONS is on the runner's own block list for GITHUB_ENV.
  if (/^(GITHUB|RUNNER)_/i.test(value) || value.toUpperCase() === 'NODE_OPTIONS') {
    throw new ActionError(`input \`github-token-env\` must not be \`${value}\`: names starting with GITHUB_ or ` +
      'RUNNER_ (and NODE_OPTIONS) are reserved, the runner refuses to overwrite them from GITHUB_ENV. ' +
      `Use another name, e.g. the default ${GITHUB_TOKEN_ENV}`);
  }
  return value;
}

/**
 * Exports the one returned `github` credential's token to `envName` (GH_TOKEN by default: the
 * `gh` CLI reads it, and after `gh auth setup-git` so does `git`). With several, none: which
 * one a step would get would be a guess.
 */
function exportGithubToken(ctx, { policy, github, envName }) {
  if (github.length === 0) return;
  const names = github.map(([n]) => n).join(', ');
  if (!envName) {
    info(ctx, oneLine(`github-token-env is false: the token of github credential ${names} is not exported`));
    return;
  }
  if (github.length > 1) {
    command(ctx, 'warning', `policy \`${policy}\` returned ${github.length} github credentials ` +
      `(${names}); none was exported to ${envName} because the choice would be ambiguous`);
    return;
  }
  const [name, c] = github[0];
  if (typeof c.token !== 'string' || c.token === '') {
    throw new ActionError(`unexpected answer from the broker: github credential \`${name}\` has no \`token\``);
  }
  exportVariable(ctx, envName, c.token);
  const ending = c.revocation === 'immediate'
    ? 'the broker revokes it when the lease ends'
    : `it stays valid until ${c.expires_at} (revocation ${c.revocation})`;
  info(ctx, oneLine(`exported credential \`${name}\` (${githubScope(c)}) to ${envName}; ${ending}`));
}

/** `owner o, repositories a, b; contents: write`: what a github credential may do, for the log. */
function githubScope(c) {
  const repositories = Array.isArray(c.repositories) ? c.repositories.join(', ') : '(none listed)';
  const permissions = c.permissions && typeof c.permissions === 'object'
    ? Object.entries(c.permissions).map(([k, v]) => `${k}: ${v}`).join(', ')
    : '(none listed)';
  return `owner ${c.owner}, repositories ${repositories}; ${permissions}`;
}

/**
 * `text` on one line. The runner reads a workflow command (`::add-mask::`, `::stop-commands::`)
 * at the start of any line: a reply's value with a line break in it could start one.
 */
function oneLine(text) {
  return String(text).replace(/[\r\n]+/g, ' ');
}

// ---- renewable leases: the lease file and the AWS profile -----------------------------------

const STATIC_AWS_VARS = ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN'];

/**
 * Writes the lease file (and, with `awsConfig`, the AWS config file) of a renewable lease into
 * RUNNER_TEMP, mode 0600. Their paths go to the state first, so `post` deletes them even if
 * `main` fails halfway through writing. Returns the paths.
 */
function writeLeaseFiles(ctx, { base, reply, awsConfig }) {
  const safe = reply.lease_id.replace(/[^A-Za-z0-9_]/g, '');
  const dir = ctx.env.RUNNER_TEMP || os.tmpdir();
  const files = { lease: path.join(dir, `ephemera-lease-${safe}.json`) };
  if (awsConfig) files.awsConfig = path.join(dir, `ephemera-aws-config-${safe}`);
  saveState(ctx, STATE_LEASE_FILE, files.lease);
  if (files.awsConfig) saveState(ctx, STATE_AWS_CONFIG, files.awsConfig);
  writePrivateFile(files.lease, `${JSON.stringify(leaseFileOf(base, reply))}\n`);
  setOutput(ctx, 'lease-file', files.lease);
  info(ctx, `lease file ${files.lease} (mode 0600; the post step deletes it)`);
  return files;
}

/**
 * The lease file, field for field as `ephemera exchange --lease-file` writes it, so the CLI's
 * `credential-process` and `token` read it too. `renew_token` is the secret.
 */
function leaseFileOf(base, reply) {
  return {
    broker: base,
    lease_id: reply.lease_id,
    policy: reply.policy || '',
    renew_token: reply.renew.token,
    until: reply.renew.until,
  };
}

/** Written whole or not at all: a new 0600 file beside `file`, then renamed over it. */
function writePrivateFile(file, text) {
  const tmp = `${file}.tmp`;
  fs.rmSync(tmp, { force: true });
  const fd = fs.openSync(tmp, 'wx', 0o600);
  try {
    fs.fchmodSync(fd, 0o600); // whatever the umask
    fs.writeFileSync(fd, text);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/**
 * Exports the aws credential as an AWS config profile whose `credential_process` renews the
 * lease (`renew.js`), instead of static variables that would expire with the credential.
 */
function exportAwsProfile(ctx, [name, c], files) {
  const region = /^[A-Za-z0-9-]+$/.test(c.region || '') ? c.region : undefined;
  writePrivateFile(files.awsConfig, awsConfigText({ leaseFile: files.lease, region }));
  exportVariable(ctx, 'AWS_CONFIG_FILE', files.awsConfig);
  exportVariable(ctx, 'AWS_PROFILE', AWS_PROFILE);
  if (region) {
    exportVariable(ctx, 'AWS_REGION', region);
    exportVariable(ctx, 'AWS_DEFAULT_REGION', region);
  }
  // Static keys come first in every SDK's credential chain, before any profile: ones an earlier
  // step exported would shadow this profile. An empty value counts as unset in the SDKs.
  const shadowing = STATIC_AWS_VARS.filter((v) => ctx.env[v]);
  for (const v of shadowing) exportVariable(ctx, v, '');
  info(ctx, `exported credential \`${name}\` as the AWS profile \`${AWS_PROFILE}\` in ${files.awsConfig} ` +
    `(AWS_CONFIG_FILE, AWS_PROFILE${region ? ', AWS_REGION, AWS_DEFAULT_REGION' : ''}): the AWS CLI and SDKs ` +
    'renew the session from the lease file whenever it expires, until the lease ends');
  if (shadowing.length > 0) info(ctx, `cleared ${shadowing.join(', ')} (set by an earlier step), which would shadow the profile`);
}

/** The AWS config file: one profile whose `credential_process` runs `renew.js` on the lease file. */
function awsConfigText({ leaseFile, region }) {
  const argv = [process.execPath, RENEW_SCRIPT, 'credential-process', '--lease-file', leaseFile];
  return [
    '# Written by the ephemera action; its post step deletes it.',
    `[profile ${AWS_PROFILE}]`,
    `credential_process = ${argv.map(processArg).join(' ')}`,
    ...(region ? [`region = ${region}`] : []),
    '',
  ].join('\n');
}

/**
 * One word of a `credential_process` command line. The SDKs split it differently (botocore:
 * shlex; Go, JS, Java: `sh -c`; Windows: `cmd /C`), so a plain word stays bare (cmd mangles
 * several quoted words) and anything else is double-quoted, refusing what double quotes do not
 * keep literal in all of them.
 */
function processArg(word) {
  const plain = process.platform === 'win32' ? /^[A-Za-z0-9_.\\/:@+=,-]+$/ : /^[A-Za-z0-9_./:@+=,-]+$/;
  if (plain.test(word)) return word;
  const unsafe = process.platform === 'win32' ? /["%!\r\n]/ : /["$`\\%!\r\n]/;
  if (unsafe.test(word)) {
    throw new ActionError(`cannot put \`${word}\` in an AWS credential_process command line: set aws-profile to false`);
  }
  return `"${word}"`;
}

// ---- renew.js: `credential-process` and `token` from a lease file ---------------------------

const EXIT_OTHER = 1;
const EXIT_USAGE = 2;
const EXIT_DENIED = 3;
const EXIT_INVALID_TOKEN = 4;
const EXIT_UNREACHABLE = 5;
const RENEW_USAGE =
  'usage: node renew.js credential-process --lease-file F\n' +
  '       node renew.js token --lease-file F --credential NAME';

/** A failure of `renew.js`, with the exit code of the same failure of the `ephemera` CLI. */
class RenewalError extends Error {
  constructor(message, exit = EXIT_OTHER) {
    super(message);
    this.exit = exit;
  }
}

/**
 * `node renew.js credential-process|token …`, the lease file's renewal like `ephemera
 * credential-process` / `ephemera token`: resolves to {exit, out}, where `out` is for stdout.
 * Errors and retry notes go to `ctx.write` (stderr), one line each, never with the renew token.
 */
async function renewCommand(ctx, argv) {
  let secret;
  try {
    const args = parseRenewArgs(argv);
    const lease = readLeaseFile(args.leaseFile);
    secret = lease.renew_token;
    const reply = await renewLease(ctx, lease);
    const out = args.command === 'credential-process' ? credentialProcess(reply) : credentialToken(reply, args.credential);
    return { exit: 0, out };
  } catch (e) {
    let message = String((e && e.message) || e);
    if (secret) message = message.split(secret).join('[renew token]');
    ctx.write(`ephemera: ${message}\n`);
    return { exit: e instanceof RenewalError ? e.exit : EXIT_OTHER, out: '' };
  }
}

function parseRenewArgs(argv) {
  const [command, ...rest] = argv;
  if (command !== 'credential-process' && command !== 'token') throw new RenewalError(RENEW_USAGE, EXIT_USAGE);
  const flags = {};
  for (let i = 0; i < rest.length; i += 2) {
    const [flag, value] = [rest[i], rest[i + 1]];
    if (!['--lease-file', '--credential'].includes(flag) || value === undefined) throw new RenewalError(RENEW_USAGE, EXIT_USAGE);
    flags[flag] = value;
  }
  const leaseFile = flags['--lease-file'];
  const credential = flags['--credential'];
  if (!leaseFile || (command === 'token') !== (credential !== undefined)) throw new RenewalError(RENEW_USAGE, EXIT_USAGE);
  return { command, leaseFile, credential };
}

/** A lease file; an error names the file and the field, never the file's text (a secret). */
function readLeaseFile(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new RenewalError(`--lease-file ${file}: ${e.code || e.message}`);
  }
  let lease;
  try {
    lease = JSON.parse(text);
  } catch {
    throw new RenewalError(`--lease-file ${file}: not a lease file (not JSON)`);
  }
  for (const key of ['broker', 'lease_id', 'renew_token']) {
    if (!lease || typeof lease[key] !== 'string' || lease[key] === '') {
      throw new RenewalError(`--lease-file ${file}: not a lease file (no \`${key}\`)`);
    }
  }
  return lease;
}

/**
 * `POST {broker}/v1/leases/{id}/renew` with the renew token: the reply (the exchange reply's
 * shape, fresh credentials). Network errors, 429 and 5xx are retried (a renewal is not
 * replay-protected, so the same token may be sent again); redirects are not followed.
 */
async function renewLease(ctx, lease) {
  let base;
  try {
    base = checkBrokerUrl(lease.broker, "the lease file's `broker`", 'the renew token');
  } catch (e) {
    throw new RenewalError(e.message);
  }
  const id = lease.lease_id.replace(/[^A-Za-z0-9_]/g, '');
  const url = `${base}/v1/leases/${id}/renew`;
  let lastError;
  for (let attempt = 1; attempt <= MAX_ATTEMPTS; attempt++) {
    try {
      return await renewOnce(url, lease.renew_token);
    } catch (e) {
      if (!(e instanceof RetryableError)) throw e;
      lastError = e;
    }
    if (attempt === MAX_ATTEMPTS) break;
    const delay = backoffMs(ctx, attempt, lastError.retryAfter || 0);
    ctx.write(`ephemera: attempt ${attempt}/${MAX_ATTEMPTS} failed: ${lastError.message}; retrying in ${(delay / 1000).toFixed(1)}s\n`);
    await ctx.sleep(delay);
  }
  throw new RenewalError(lastError.message, EXIT_UNREACHABLE);
}

async function renewOnce(url, token) {
  let response;
  try {
    response = await fetch(url, {
      method: 'POST',
      headers: {
        Authorization: `Bearer ${token}`,
        'Content-Type': 'application/json',
        Accept: 'application/json',
        'User-Agent': 'ephemera-github-action',
      },
      body: '{}',
      redirect: 'manual', // a redirect would carry the renew token somewhere the lease file does not name
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
  } catch (e) {
    throw new RetryableError(`unreachable: ${url}: ${describe(e)}`);
  }
  const text = await response.text().catch(() => '');
  const parsed = parseJson(text);
  if (response.status === 429 || response.status >= 500) {
    const e = new RetryableError(`the broker answered ${response.status}${errorSuffix(parsed)}`);
    e.retryAfter = Number(response.headers.get('retry-after')) || 0;
    throw e;
  }
  if (response.status !== 200 || !parsed || typeof parsed !== 'object') {
    const err = parsed && parsed.error;
    const message = err ? `${err.code}: ${err.message}${err.request_id ? ` (request ${err.request_id})` : ''}` : `the broker answered ${response.status}`;
    const exit = { 401: EXIT_INVALID_TOKEN, 403: EXIT_DENIED }[response.status] || EXIT_OTHER;
    throw new RenewalError(message, exit);
  }
  return parsed;
}

/**
 * The AWS `credential_process` document of the reply's one aws credential. `Expiration` is the
 * earlier of the STS session's end and the credential's (`expires_at`), so the SDK asks again
 * before the broker revokes the session (as `ephemera credential-process` does).
 */
function credentialProcess(reply) {
  const aws = Object.entries((reply && reply.credentials) || {}).filter(([, c]) => c && c.kind === 'aws');
  if (aws.length !== 1) {
    throw new RenewalError(aws.length === 0
      ? 'credential-process: the policy granted no `aws` credential'
      : `credential-process: the policy granted ${aws.length} \`aws\` credentials (${aws.map(([n]) => n).join(', ')}); it needs exactly one`);
  }
  const [name, c] = aws[0];
  const field = (key) => {
    if (typeof c[key] !== 'string' || c[key] === '') throw new RenewalError(`credential-process: credential \`${name}\` has no \`${key}\``);
    return c[key];
  };
  const sessionEnd = field('expiration');
  const expiration = typeof c.expires_at === 'string' && earlier(c.expires_at, sessionEnd) ? c.expires_at : sessionEnd;
  const doc = {
    Version: 1,
    AccessKeyId: field('access_key_id'),
    SecretAccessKey: field('secret_access_key'),
    SessionToken: field('session_token'),
    Expiration: expiration,
  };
  return `${JSON.stringify(doc)}\n`;
}

/** Is time `a` before `b`? False when either does not parse (then the session's end is used). */
function earlier(a, b) {
  const [x, y] = [Date.parse(a), Date.parse(b)];
  return Number.isFinite(x) && Number.isFinite(y) && x < y;
}

/** The named credential's `token` (a broker JWT), or the whole credential as JSON. */
function credentialToken(reply, name) {
  const credentials = (reply && reply.credentials) || {};
  const c = Object.prototype.hasOwnProperty.call(credentials, name) ? credentials[name] : undefined;
  if (!c) {
    throw new RenewalError(`token: the lease has no credential \`${String(name).slice(0, 64)}\` (it has: ${Object.keys(credentials).join(', ')})`);
  }
  return typeof c.token === 'string' ? `${c.token}\n` : `${JSON.stringify(c)}\n`;
}

// ---- post -----------------------------------------------------------------------------------

/**
 * The `post` step: revokes the saved lease, then deletes the lease file and the AWS config file
 * of a renewable lease (also when the revoke failed or is off). Never fails the job.
 */
async function post(ctx = defaultContext()) {
  try {
    await revoke(ctx);
  } finally {
    removeLeaseFiles(ctx);
  }
}

/** Revokes the saved lease; a failure is a warning. */
async function revoke(ctx) {
  const backstop = 'the broker still ends the lease when the job completes (webhook) or when its TTL runs out';
  let leaseId;
  try {
    leaseId = (ctx.env[`STATE_${STATE_LEASE_ID}`] || '').trim();
    if (!getBooleanInput(ctx, 'revoke', true)) {
      info(ctx, `revoke is false: lease ${leaseId || '(none)'} is left to its TTL`);
      return;
    }
    if (!leaseId) {
      info(ctx, 'no lease to revoke (the exchange did not complete)');
      return;
    }
    const base = brokerUrl(ctx);
    const audience = getInput(ctx, 'audience') || base;
    const { status, body } = await callBroker(ctx, { base, audience, route: '/v1/revoke', body: { lease_id: leaseId } });
    if (status !== 200 || !body) throw new ActionError(`the broker answered ${status}${errorSuffix(body)}`);
    const revoked = Array.isArray(body.revoked) ? body.revoked : [];
    const pending = Array.isArray(body.pending) ? body.pending : [];
    if (revoked.includes(leaseId)) {
      info(ctx, `revoked lease ${leaseId}`);
    } else if (pending.includes(leaseId)) {
      info(ctx, `lease ${leaseId} ended; revocation of some credentials is pending at the backend ` +
        '(e.g. an IAM deny still propagating); the broker retries it');
    } else {
      info(ctx, `lease ${leaseId} was already ended (revoked or expired); nothing to do`);
    }
  } catch (e) {
    const why = e instanceof ActionError ? e.message : String((e && e.message) || e);
    command(ctx, 'warning', `could not revoke ephemera lease ${leaseId || ''}: ${why}. This does not fail the job: ${backstop}.`);
  }
}

/** Deletes the files `main` saved in the state (and a half-written `.tmp` of each). */
function removeLeaseFiles(ctx) {
  for (const key of [STATE_LEASE_FILE, STATE_AWS_CONFIG]) {
    const file = (ctx.env[`STATE_${key}`] || '').trim();
    // Only what `main` names: an `ephemera-` file, never anything else a state could hold.
    if (!file || !path.basename(file).startsWith('ephemera-')) continue;
    try {
      fs.rmSync(file, { force: true });
      fs.rmSync(`${file}.tmp`, { force: true });
      info(ctx, `deleted ${file}`);
    } catch (e) {
      command(ctx, 'warning', `could not delete ${file}: ${e.code || e.message}`);
    }
  }
}

module.exports = {
  ActionError,
  AWS_PROFILE,
  GITHUB_TOKEN_ENV,
  MAX_ATTEMPTS,
  RENEW_SCRIPT,
  STATE_AWS_CONFIG,
  STATE_LEASE_FILE,
  STATE_LEASE_ID,
  awsConfigText,
  backoffMs,
  callBroker,
  credentialProcess,
  defaultContext,
  escapeData,
  exportVariable,
  fileCommand,
  fingerprint,
  getBooleanInput,
  getIdToken,
  getInput,
  mask,
  parseFileCommands,
  post,
  readLeaseFile,
  renewCommand,
  renewLease,
  run,
  saveState,
  setOutput,
};
