'use strict';
// A fake runner for the tests: temporary file-command files, a loopback ID token endpoint, a
// programmable fake broker, and the real broker in dev mode. Node built-ins only.

const fs = require('fs');
const os = require('os');
const path = require('path');
const http = require('http');
const { spawn } = require('child_process');

const REQUEST_TOKEN = 'runner-request-token';

function listen(handler) {
  return new Promise((resolve) => {
    const server = http.createServer(handler);
    server.listen(0, '127.0.0.1', () => {
      resolve({ server, url: `http://127.0.0.1:${server.address().port}`, close: () => closeServer(server) });
    });
  });
}

function closeServer(server) {
  server.closeAllConnections();
  return new Promise((resolve) => server.close(() => resolve()));
}

function readBody(req) {
  return new Promise((resolve) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
  });
}

/** A fake JWT with `claims` (unsigned: the fake broker never verifies it). */
function fakeJwt(claims) {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${enc({ alg: 'ES256', typ: 'JWT' })}.${enc(claims)}.c2ln`;
}

/**
 * The runner's ID token endpoint on loopback. `mint(audience)` makes each token (default: a
 * fake JWT with a counter in `jti`); `requests` records every audience asked for.
 */
async function idTokenEndpoint(mint) {
  const requests = [];
  let n = 0;
  const s = await listen(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    if (req.headers.authorization !== `Bearer ${REQUEST_TOKEN}`) {
      res.writeHead(401).end();
      return;
    }
    const audience = url.searchParams.get('audience');
    requests.push(audience);
    n++;
    try {
      const value = mint ? await mint(audience) : fakeJwt({ repository: 'acme/web', ref: 'refs/heads/main', jti: `t${n}` });
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ count: 1, value }));
    } catch (e) {
      res.writeHead(500).end(String(e));
    }
  });
  // The runner's URL already carries a query string; the action appends `&audience=`.
  return { ...s, requestUrl: `${s.url}/token?api-version=2.0`, requests };
}

/**
 * A fake broker: `answers` is a list of [status, body] (or functions of the request) served in
 * order, the last repeated. `requests` records {route, authorization, body}.
 */
async function fakeBroker(answers) {
  const requests = [];
  const s = await listen(async (req, res) => {
    const body = await readBody(req);
    const request = { route: req.url, authorization: req.headers.authorization, body: body ? JSON.parse(body) : undefined };
    requests.push(request);
    let answer = answers[Math.min(requests.length - 1, answers.length - 1)];
    if (typeof answer === 'function') answer = answer(request);
    const [status, reply, headers] = answer;
    res.writeHead(status, { 'content-type': 'application/json', ...(headers || {}) }).end(JSON.stringify(reply));
  });
  return { ...s, requests };
}

/** A temporary runner environment: INPUT_* from `inputs`, file-command files, ID token vars. */
function runnerEnv({ inputs = {}, idTokenUrl, extra = {} } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-action-'));
  const files = {};
  for (const name of ['GITHUB_ENV', 'GITHUB_OUTPUT', 'GITHUB_STATE']) {
    files[name] = path.join(dir, name.toLowerCase());
    fs.writeFileSync(files[name], '');
  }
  const env = { ...files, RUNNER_TEMP: dir, ...extra };
  for (const [k, v] of Object.entries(inputs)) env[`INPUT_${k.toUpperCase()}`] = v;
  if (idTokenUrl) {
    env.ACTIONS_ID_TOKEN_REQUEST_URL = idTokenUrl;
    env.ACTIONS_ID_TOKEN_REQUEST_TOKEN = REQUEST_TOKEN;
  }
  return { dir, env, files, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** A context for lib.js that records output and sleeps instead of sleeping. */
function fakeContext(env) {
  const out = [];
  const sleeps = [];
  return {
    env,
    out,
    sleeps,
    text: () => out.join(''),
    lines: () => out.join('').split('\n').filter((l) => l !== ''),
    write: (s) => out.push(s),
    sleep: async (ms) => sleeps.push(ms),
    random: () => 0.5,
  };
}

/**
 * Starts `bin serve --dev` on a free loopback port; resolves once /readyz answers 200. It runs in
 * a working directory of its own whose `./policies` holds `policies` ({file name: YAML}), besides
 * the built-in `dev` policy. Resolves {url, stop, stderr}.
 */
async function startDevBroker(bin, policies = {}) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-e2e-data-'));
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ephemera-e2e-cwd-'));
  fs.mkdirSync(path.join(workDir, 'policies'));
  for (const [name, yaml] of Object.entries(policies)) fs.writeFileSync(path.join(workDir, 'policies', name), yaml);
  const child = spawn(bin, ['serve', '--dev', '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    cwd: workDir,
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
    fs.rmSync(workDir, { recursive: true, force: true });
  };
  return { url, stop, stderr: () => stderr };
}

module.exports = { REQUEST_TOKEN, fakeBroker, fakeContext, fakeJwt, idTokenEndpoint, listen, readBody, runnerEnv, startDevBroker };
