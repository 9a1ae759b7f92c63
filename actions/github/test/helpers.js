'use strict';
// A fake runner for the tests: temporary file-command files, a loopback ID token endpoint and
// a programmable fake broker. Node built-ins only.

const fs = require('fs');
const os = require('os');
const path = require('path');
const http = require('http');

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

module.exports = { REQUEST_TOKEN, fakeBroker, fakeContext, fakeJwt, idTokenEndpoint, listen, readBody, runnerEnv };
