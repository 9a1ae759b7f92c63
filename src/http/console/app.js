// ephemera operator console (issue 20). Plain modern JavaScript, no build step, no dependency.
//
// Every action goes through the admin API with the admin token in the `Authorization` header:
// the console has no power the API lacks, and since no cookie carries the token, no other site
// can make the browser act with it (CSRF-safe by construction). The token lives in
// sessionStorage for this tab only, never in a URL.
//
// Attack: lease data (claims, job keys, branch names, policy names) is written by CI users, who
// may write markup into a branch name. It is only ever put on the page as text (DOM nodes and
// `textContent`), never parsed as HTML; the Content-Security-Policy refuses inline script besides.

const TOKEN_KEY = 'ephemera.admin-token';
const REFRESH_MS = 5000;
const STATES = ['active', 'revoking', 'irrevocable', 'revoked', 'expired'];
const LIVE = new Set(['active']);

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const signOutButton = document.getElementById('sign-out');
const statusLine = document.getElementById('status');
let timers = [];

// ---- small helpers ---------------------------------------------------------------------------

/** An element with attributes and children; strings become text nodes, never markup. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle('error', isError);
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class Refused extends Error {}

/** One admin API call. A 401 signs the console out: the token is wrong or was rotated. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token()}`, Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: 'no-store' });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (resp.status === 401) throw new Refused('the broker refused the admin token');
  if (!resp.ok) {
    let err = `HTTP ${resp.status}`;
    if (data && data.error && data.error.message) err = `${data.error.message} (${data.error.code}, ${data.error.request_id})`;
    else if (data && Array.isArray(data.errors)) err = data.errors.map((e) => (typeof e === 'string' ? e : JSON.stringify(e))).join('\n');
    throw new Error(err);
  }
  return data;
}

function clearTimers() {
  for (const t of timers) clearInterval(t);
  timers = [];
}

/** Seconds until an RFC 3339 time, as `12m 05s`, or `ended`. */
function timeLeft(iso, now = Date.now()) {
  const secs = Math.floor((Date.parse(iso) - now) / 1000);
  if (!(secs > 0)) return 'ended';
  const h_ = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  const pad = (n) => String(n).padStart(2, '0');
  return h_ > 0 ? `${h_}h ${pad(m)}m` : `${m}m ${pad(s)}s`;
}

/** A claim as text (`null` when absent). */
function claim(lease, name) {
  const v = lease.claims ? lease.claims[name] : undefined;
  return v === undefined || v === null ? null : String(v);
}

/** The platform of a lease, from its job key's prefix (`github:…`, `gitlab:…`). */
function platform(lease) {
  return String(lease.job).split(':')[0];
}

function repository(lease) {
  return claim(lease, 'repository') || claim(lease, 'project_path') || claim(lease, 'pipeline_slug') || '';
}

function actor(lease) {
  return claim(lease, 'actor') || claim(lease, 'user_login') || claim(lease, 'actor_id') || claim(lease, 'user_id') || '';
}

/** Asks before ending leases; resolves true when confirmed. The text says how many. */
function confirmEnd(text, button) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-ok').textContent = button;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true }));
}

function failed(e) {
  if (e instanceof Refused) return signOut('The admin token was refused; sign in again.');
  say(`Failed: ${e.message}`, true);
}

// ---- sign-in -------------------------------------------------------------------------------

function showSignIn(message) {
  clearTimers();
  nav.hidden = true;
  signOutButton.hidden = true;
  const input = h('input', { id: 'admin-token', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' });
  const error = h('p', { id: 'signin-error', class: 'error', role: 'alert' }, message || '');
  const form = h('form', { class: 'signin', 'aria-describedby': 'signin-help' },
    h('h1', {}, 'Sign in'),
    h('p', { id: 'signin-help', class: 'muted' },
      'The admin token of this broker ([admin] in its config; in serve --dev, the admin-token file in the data directory). It is kept for this tab only.'),
    h('div', { class: 'field' }, h('label', { for: 'admin-token' }, 'Admin token'), input),
    error,
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api('GET', '/v1/leases?state=active');
      say('');
      location.hash = '#/leases';
      route();
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      error.textContent = e instanceof Refused ? 'The admin token was refused.' : `Could not reach the broker: ${e.message}`;
      input.focus();
    }
  });
  main.replaceChildren(form);
  input.focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  say('');
  showSignIn(message);
}

signOutButton.addEventListener('click', () => signOut('Signed out.'));

// ---- leases --------------------------------------------------------------------------------

const filters = { state: '', policy: '', job: '', repository: '', actor: '', platform: '' };

function matches(lease) {
  const has = (value, want) => !want || String(value || '').toLowerCase().includes(want.toLowerCase());
  return (!filters.state || lease.state === filters.state)
    && has(lease.policy, filters.policy)
    && has(lease.job, filters.job)
    && has(repository(lease), filters.repository)
    && has(actor(lease), filters.actor)
    && (!filters.platform || platform(lease) === filters.platform);
}

function credentialBadges(lease) {
  return lease.credentials.map((c) => h('span', { class: 'badge', title: `backend ${c.backend}` }, `${c.name}: ${c.kind} · ${c.revocation}`));
}

async function showLeases() {
  clearTimers();
  const heading = h('h1', {}, 'Leases');
  const counts = h('ul', { class: 'counts', 'aria-label': 'Leases by state' });
  const tbody = h('tbody');
  const caption = h('caption', {}, 'Loading…');
  const table = h('table', { id: 'leases' }, caption,
    h('thead', {}, h('tr', {}, ['Lease', 'Job', 'Policy', 'Repository', 'Actor', 'State', 'Time left', 'Credentials', ''].map((t) => h('th', { scope: 'col' }, t)))),
    tbody);
  const field = (name, label, control) => {
    control.id = `filter-${name}`;
    control.value = filters[name];
    control.addEventListener('input', () => { filters[name] = control.value; render(); });
    return h('div', { class: 'field' }, h('label', { for: control.id }, label), control);
  };
  const select = (options) => h('select', {}, h('option', { value: '' }, 'any'), options.map((o) => h('option', { value: o }, o)));
  const endMatching = h('button', { type: 'button', class: 'danger', id: 'end-matching', disabled: true }, 'End matching live leases');
  main.replaceChildren(heading,
    h('div', { class: 'filters', role: 'search' },
      field('state', 'State', select(STATES)),
      field('policy', 'Policy', h('input', { type: 'search' })),
      field('job', 'Job', h('input', { type: 'search' })),
      field('repository', 'Repository', h('input', { type: 'search' })),
      field('actor', 'Actor', h('input', { type: 'search' })),
      field('platform', 'Platform', select(['github', 'gitlab', 'buildkite', 'circleci', 'azure-pipelines', 'bitbucket', 'jenkins', 'generic'])),
      endMatching),
    counts,
    h('div', { class: 'table-box' }, table));

  let leases = [];
  let truncated = false;
  function render() {
    const byState = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const l of leases) byState[l.state] = (byState[l.state] || 0) + 1;
    counts.replaceChildren(...STATES.map((s) => h('li', { 'data-state': s }, `${s}: ${byState[s]}`)));
    const shown = leases.filter(matches);
    const live = shown.filter((l) => LIVE.has(l.state));
    caption.textContent = `${shown.length} of ${leases.length} leases${truncated ? ' (the broker listed its first 1,000; narrow the filters)' : ''}`;
    endMatching.disabled = live.length === 0;
    endMatching.textContent = `End ${live.length} matching live lease${live.length === 1 ? '' : 's'}`;
    endMatching.onclick = async () => {
      const ids = live.map((l) => l.id);
      const ok = await confirmEnd(`This ends ${ids.length} live lease${ids.length === 1 ? '' : 's'}: every one listed with state active under the current filters. Their credentials are revoked at their backends.`, `End ${ids.length} lease${ids.length === 1 ? '' : 's'}`);
      if (!ok) return;
      try {
        const reply = await api('POST', '/v1/leases/revoke', { lease_ids: ids });
        say(`Ended ${reply.revoked.length} lease(s)${reply.pending.length ? `; ${reply.pending.length} pending at their backends (retried)` : ''}.`);
        await load();
      } catch (e) { failed(e); }
    };
    tbody.replaceChildren(...shown.map((l) => h('tr', { 'data-lease': l.id },
      h('td', { class: 'mono' }, h('a', { href: `#/leases/${encodeURIComponent(l.id)}` }, l.id)),
      h('td', { class: 'mono' }, l.job),
      h('td', {}, l.policy),
      h('td', {}, repository(l)),
      h('td', {}, actor(l)),
      h('td', { class: `state state-${l.state}` }, l.state),
      h('td', { 'data-expires': LIVE.has(l.state) ? l.expires_at : '' }, LIVE.has(l.state) ? timeLeft(l.expires_at) : '—'),
      h('td', {}, credentialBadges(l)),
      h('td', {}, LIVE.has(l.state) ? h('button', { type: 'button', class: 'danger', onclick: () => endOne(l) }, 'End') : ''))));
  }
  async function endOne(lease) {
    const ok = await confirmEnd(`This ends 1 live lease, ${lease.id} of job ${lease.job}. Its credentials are revoked at their backends.`, 'End 1 lease');
    if (!ok) return;
    try {
      await api('DELETE', `/v1/leases/${encodeURIComponent(lease.id)}`);
      say(`Ended lease ${lease.id}.`);
      await load();
    } catch (e) { failed(e); }
  }
  async function load() {
    try {
      const data = await api('GET', '/v1/leases');
      leases = data.leases;
      truncated = data.truncated;
      render();
    } catch (e) { failed(e); }
  }
  await load();
  timers.push(setInterval(load, REFRESH_MS));
  timers.push(setInterval(() => {
    for (const cell of tbody.querySelectorAll('td[data-expires]')) {
      if (cell.dataset.expires) cell.textContent = timeLeft(cell.dataset.expires);
    }
  }, 1000));
}

async function showLease(id) {
  clearTimers();
  let lease;
  try {
    lease = await api('GET', `/v1/leases/${encodeURIComponent(id)}`);
  } catch (e) {
    if (e instanceof Refused) return failed(e);
    main.replaceChildren(h('h1', {}, 'Lease'), h('p', { class: 'error' }, `No such lease: ${e.message}`), h('a', { href: '#/leases' }, 'Back to leases'));
    return;
  }
  const row = (k, v) => [h('dt', {}, k), h('dd', {}, v === null || v === undefined || v === '' ? '—' : v)];
  const live = LIVE.has(lease.state);
  const endJob = h('button', { type: 'button', class: 'danger', id: 'end-job' }, 'End every lease of this job');
  endJob.addEventListener('click', async () => {
    try {
      const data = await api('GET', `/v1/leases?job=${encodeURIComponent(lease.job)}&state=active`);
      const n = data.leases.length;
      const ok = await confirmEnd(`This ends ${n} live lease${n === 1 ? '' : 's'} of job ${lease.job}: every credential the job holds, at every backend.`, `End ${n} lease${n === 1 ? '' : 's'}`);
      if (!ok) return;
      const reply = await api('POST', '/v1/jobs/revoke', { job: lease.job });
      say(`Ended ${reply.revoked.length} lease(s) of the job${reply.pending.length ? `; ${reply.pending.length} pending (retried)` : ''}.`);
      await showLease(id);
    } catch (e) { failed(e); }
  });
  const endThis = h('button', { type: 'button', class: 'danger', id: 'end-lease', disabled: !live }, 'End this lease');
  endThis.addEventListener('click', async () => {
    const ok = await confirmEnd(`This ends 1 live lease, ${lease.id}. Its credentials are revoked at their backends.`, 'End 1 lease');
    if (!ok) return;
    try {
      await api('DELETE', `/v1/leases/${encodeURIComponent(lease.id)}`);
      say(`Ended lease ${lease.id}.`);
      await showLease(id);
    } catch (e) { failed(e); }
  });
  const claims = Object.entries(lease.claims || {});
  const auditSection = h('div', { id: 'lease-audit' }, h('p', { class: 'muted' }, 'Reading the audit file…'));
  const auditRow = (e) => h('tr', { 'data-event': e.event },
    h('td', { class: 'mono' }, e.time || ''),
    h('td', {}, e.event || ''),
    h('td', {}, e.decision || e.outcome || ''),
    h('td', { class: 'mono' }, e.request_id || '—'),
    h('td', {}, e.reason || e.error || (e.credentials && !Array.isArray(e.credentials) ? Object.keys(e.credentials).join(', ') : '')));
  api('GET', `/v1/leases/${encodeURIComponent(lease.id)}/audit`).then((a) => {
    if (!a.audit) {
      auditSection.replaceChildren(h('p', { class: 'muted' }, 'No audit file is configured ([audit] file).'));
      return;
    }
    const { events, complete, scanned_bytes: scanned } = a.found;
    const where = complete ? '' : ` in the last ${Math.round(scanned / 1048576)} MiB of the audit file`;
    auditSection.replaceChildren(h('div', { class: 'table-box' }, h('table', { id: 'audit-events' },
      h('caption', {}, `${events.length} event${events.length === 1 ? '' : 's'} naming this lease${where}`),
      h('thead', {}, h('tr', {}, ['Time', 'Event', 'Decision', 'Request id', 'Detail'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, events.map(auditRow)))));
  }).catch((e) => { if (e instanceof Refused) failed(e); else auditSection.replaceChildren(h('p', { class: 'error' }, e.message)); });
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/leases' }, '← All leases')),
    h('h1', {}, 'Lease ', h('span', { class: 'mono' }, lease.id)),
    h('dl', { class: 'fields', id: 'lease-fields' },
      row('State', h('span', { class: `state state-${lease.state}`, id: 'lease-state' }, lease.state)),
      row('Reason', lease.reason),
      row('Job', h('span', { class: 'mono' }, lease.job)),
      row('Policy', lease.policy),
      row('Issuer', lease.issuer),
      row('Created', lease.created_at),
      row('Expires', `${lease.expires_at}${live ? ` (${timeLeft(lease.expires_at)} left)` : ''}`),
      row('Revocation attempts', String(lease.attempts)),
      row('Next attempt', lease.next_attempt_at),
      row('Last error', lease.last_error),
      row('Renewals', lease.renewal ? `${lease.renewal.count}, last ${lease.renewal.last_at || 'never'}, until ${lease.renewal.until}` : 'not renewable')),
    h('div', { class: 'toolbar' }, endThis, endJob),
    h('h2', {}, 'Credentials'),
    h('div', { class: 'table-box' }, h('table', {},
      h('thead', {}, h('tr', {}, ['Name', 'Kind', 'Backend', 'Revocation'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, lease.credentials.map((c) => h('tr', {}, h('td', {}, c.name), h('td', {}, c.kind), h('td', {}, c.backend), h('td', {}, c.revocation)))))),
    h('h2', {}, 'Audit events'),
    auditSection,
    h('h2', {}, 'Claims it was granted on'),
    h('div', { class: 'table-box' }, h('table', { id: 'claims' },
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Claim'), h('th', { scope: 'col' }, 'Value'))),
      h('tbody', {}, claims.map(([k, v]) => h('tr', {}, h('td', { class: 'mono' }, k), h('td', { class: 'mono' }, typeof v === 'string' ? v : JSON.stringify(v))))))));
}

// ---- decisions and explain -----------------------------------------------------------------

/** The refusal the explain view starts from (set by a Decisions row's "Explain"). */
let explainFrom = null;

async function showDecisions() {
  clearTimers();
  const tbody = h('tbody');
  const caption = h('caption', {}, 'Loading…');
  main.replaceChildren(h('h1', {}, 'Decisions'),
    h('p', { class: 'muted' }, 'The most recent refused exchanges and token exchanges of this broker (at most 200, newest first), with the rule that decided each.'),
    h('div', { class: 'table-box' }, h('table', { id: 'refusals' }, caption,
      h('thead', {}, h('tr', {}, ['Time', 'Endpoint', 'Policy', 'Code', 'Deciding claim', 'Reason', 'Job', ''].map((t) => h('th', { scope: 'col' }, t)))),
      tbody)));
  async function load() {
    try {
      const { refusals } = await api('GET', '/v1/refusals');
      caption.textContent = `${refusals.length} recent refusal${refusals.length === 1 ? '' : 's'}`;
      tbody.replaceChildren(...refusals.map((r) => h('tr', { 'data-request': r.request_id },
        h('td', { class: 'mono' }, r.time),
        h('td', {}, r.endpoint),
        h('td', {}, r.policy),
        h('td', { class: 'mono' }, r.code),
        h('td', { class: 'mono' }, r.deciding_claim || '—'),
        h('td', {}, r.reason),
        h('td', { class: 'mono' }, r.job || '—'),
        h('td', {}, r.claims ? h('button', { type: 'button', onclick: () => { explainFrom = r; location.hash = '#/explain'; } }, 'Explain') : ''))));
    } catch (e) { failed(e); }
  }
  await load();
  timers.push(setInterval(load, REFRESH_MS));
}

async function showExplain() {
  clearTimers();
  let names = [];
  try { names = (await api('GET', '/v1/policies')).policies.map((p) => p.name); } catch (e) { return failed(e); }
  const from = explainFrom;
  explainFrom = null;
  const policy = h('select', { id: 'explain-policy' }, names.map((n) => h('option', { value: n }, n)));
  if (from && names.includes(from.policy)) policy.value = from.policy;
  const claims = h('textarea', { id: 'explain-claims', rows: 14, spellcheck: 'false', class: 'mono' });
  claims.value = from ? JSON.stringify(from.claims, null, 2) : '';
  const issuer = h('input', { id: 'explain-issuer', type: 'text', value: from && from.issuer ? from.issuer : '', placeholder: 'from the claims\' iss' });
  const out = h('div', { id: 'explain-result', 'aria-live': 'polite' });
  const form = h('form', { class: 'stack' },
    h('div', { class: 'filters' },
      h('div', { class: 'field' }, h('label', { for: 'explain-policy' }, 'Policy'), policy),
      h('div', { class: 'field' }, h('label', { for: 'explain-issuer' }, 'Issuer (optional)'), issuer)),
    h('div', { class: 'field' }, h('label', { for: 'explain-claims' }, 'Claims (JSON object)'), claims),
    h('div', { class: 'toolbar' }, h('button', { type: 'submit', class: 'primary' }, 'Explain')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    let parsed;
    try { parsed = JSON.parse(claims.value); } catch (e) { out.replaceChildren(h('p', { class: 'error' }, `The claims are not JSON: ${e.message}`)); return; }
    try {
      const body = { policy: policy.value, claims: parsed };
      if (issuer.value.trim()) body.issuer = issuer.value.trim();
      renderTrace(out, await api('POST', '/v1/explain', body));
    } catch (e) { if (e instanceof Refused) failed(e); else out.replaceChildren(h('p', { class: 'error' }, e.message)); }
  });
  main.replaceChildren(h('h1', {}, 'Explain a decision'),
    h('p', { class: 'muted' }, from ? `From the refusal ${from.request_id} at ${from.time}.` : 'Paste a claim set (the Action saves it on a denial) or pick a refusal under Decisions. Nothing is minted.'),
    form, out);
  if (from) form.requestSubmit();
}

/** `policy explain`'s trace as a table: every rule with its outcome, then the decision. */
function renderTrace(out, trace) {
  const mark = (pass) => h('span', { class: pass ? 'pass' : 'fail' }, pass ? 'pass' : 'FAIL');
  const rows = [
    h('tr', {}, h('td', {}, mark(trace.issuer.pass)), h('td', {}, 'issuer'), h('td', { class: 'mono' }, 'iss'),
      h('td', { class: 'mono' }, trace.issuer.token_issuer), h('td', { class: 'mono' }, trace.issuer.policy_issuer)),
    ...trace.rules.map((r) => h('tr', { 'data-claim': r.claim, 'data-section': r.section },
      h('td', {}, mark(r.pass)), h('td', {}, r.section), h('td', { class: 'mono' }, r.claim),
      h('td', { class: 'mono' }, r.value === null ? '(missing)' : JSON.stringify(r.value)), h('td', { class: 'mono' }, r.rule))),
  ];
  out.replaceChildren(
    h('h2', { id: 'decision' }, trace.decision === 'allow' ? 'Decision: allow' : `Decision: deny (deciding claim ${trace.deciding_claim})`),
    h('div', { class: 'table-box' }, h('table', { id: 'trace' },
      h('thead', {}, h('tr', {}, ['', 'Section', 'Claim', 'Value', 'Rule'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows))),
    trace.tools && trace.tools.length ? h('p', { class: 'muted' }, `Tools: ${trace.tools.map((t) => `${t.name} (${t.resource})`).join(', ')}`) : '');
}

// ---- policy change preview -----------------------------------------------------------------

async function showPreview() {
  clearTimers();
  let all;
  try { all = (await api('GET', '/v1/policies')).policies; } catch (e) { return failed(e); }
  // A candidate set is the policy files; built-in policies come with the binary and stay as they are.
  const policies = all.filter((p) => !p.builtin);
  if (!policies.length) {
    main.replaceChildren(h('h1', {}, 'Policy change preview'), h('p', {}, 'This broker loads no policy files (its policies are built in), so there is no change to preview.'));
    return;
  }
  const pick = h('select', { id: 'preview-policy' }, policies.map((p) => h('option', { value: p.name }, p.name)));
  const text = h('textarea', { id: 'preview-text', rows: 22, spellcheck: 'false', class: 'mono' });
  const out = h('div', { id: 'preview-result', 'aria-live': 'polite' });
  const load = () => { text.value = policies.find((p) => p.name === pick.value)?.text || ''; out.replaceChildren(); };
  pick.addEventListener('change', load);
  load();
  const form = h('form', {},
    h('div', { class: 'field' }, h('label', { for: 'preview-policy' }, 'Policy'), pick),
    h('div', { class: 'field' }, h('label', { for: 'preview-text' }, 'Its YAML, as it would be'), text),
    h('div', { class: 'toolbar' }, h('button', { type: 'submit', class: 'primary' }, 'Preview the change')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const candidate = Object.fromEntries(policies.map((p) => [p.name, p.name === pick.value ? text.value : p.text]));
    try {
      const result = await api('POST', '/v1/policies/diff', { policies: candidate });
      const ending = result.would_end;
      out.replaceChildren(
        h('h2', { id: 'preview-summary' }, ending.length ? `This change would end ${ending.length} live lease${ending.length === 1 ? '' : 's'}` : 'This change ends no live lease'),
        ending.length ? h('div', { class: 'table-box' }, h('table', { id: 'would-end' },
          h('thead', {}, h('tr', {}, ['Lease', 'Job', 'Policy', 'Why'].map((t) => h('th', { scope: 'col' }, t)))),
          h('tbody', {}, ending.map((e) => h('tr', { 'data-lease': e.lease_id },
            h('td', { class: 'mono' }, e.lease_id), h('td', { class: 'mono' }, e.job), h('td', {}, e.policy), h('td', {}, e.reason)))))) : '');
    } catch (e) {
      if (e instanceof Refused) return failed(e);
      out.replaceChildren(h('h2', { id: 'preview-summary', class: 'error' }, 'The change would not load'), h('pre', { class: 'mono error' }, e.message));
    }
  });
  main.replaceChildren(h('h1', {}, 'Policy change preview'),
    h('p', { class: 'muted' }, 'Edit a policy and see which live leases the change would end (policy diff). Nothing is changed: roll the file out as usual.'),
    form, out);
}

// ---- health --------------------------------------------------------------------------------

const SVG = 'http://www.w3.org/2000/svg';

/** Exchanges and denials per minute over the last hour, as bars (SVG made with DOM calls). */
function chart(minutes) {
  const width = 600, height = 140, bar = width / minutes.length;
  const top = Math.max(1, ...minutes.map((m) => m.issued + m.denied));
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('id', 'chart');
  const total = minutes.reduce((a, m) => [a[0] + m.issued, a[1] + m.denied], [0, 0]);
  svg.setAttribute('aria-label', `Last hour: ${total[0]} issued, ${total[1]} denied`);
  minutes.forEach((m, i) => {
    let y = height;
    for (const [n, cls] of [[m.issued, 'bar-issued'], [m.denied, 'bar-denied']]) {
      if (!n) continue;
      const hgt = (n / top) * (height - 10);
      y -= hgt;
      const rect = document.createElementNS(SVG, 'rect');
      for (const [k, v] of Object.entries({ x: i * bar + 1, y, width: bar - 2, height: hgt, class: cls })) rect.setAttribute(k, v);
      const title = document.createElementNS(SVG, 'title');
      title.textContent = `${new Date(m.at * 1000).toISOString().slice(11, 16)} UTC: ${m.issued} issued, ${m.denied} denied`;
      rect.append(title);
      svg.append(rect);
    }
  });
  return svg;
}

async function showHealth() {
  clearTimers();
  async function load() {
    let o;
    try { o = await api('GET', '/v1/overview'); } catch (e) { return failed(e); }
    const r = o.readiness;
    main.replaceChildren(h('h1', {}, 'Health'),
      h('dl', { class: 'fields', id: 'health-fields' },
        h('dt', {}, 'Ready'), h('dd', { id: 'health-ready', class: o.ready ? 'pass' : 'fail' }, o.ready ? 'ready' : 'not ready'),
        h('dt', {}, 'Lease store'), h('dd', {}, r.ledger),
        h('dt', {}, 'Policies'), h('dd', {}, `${r.policies.loaded} loaded, generation ${r.policies.generation}, last reload ${r.policies.last_reload}${r.policies.errors.length ? ` (${r.policies.errors.length} errors)` : ''}`),
        h('dt', {}, 'Leases'), h('dd', { id: 'health-leases' }, Object.entries(o.leases).map(([s, n]) => `${s} ${n}`).join(' · ') || 'the store did not answer'),
        h('dt', {}, 'Irrevocable'), h('dd', { id: 'health-irrevocable', class: o.leases.irrevocable ? 'fail' : '' }, String(o.leases.irrevocable ?? '—'))),
      h('h2', {}, 'Exchanges and denials, last hour'),
      h('figure', { class: 'chart' }, chart(o.minutes),
        h('figcaption', { class: 'muted' }, h('span', { class: 'key key-issued' }, 'issued'), ' ', h('span', { class: 'key key-denied' }, 'denied'), ' per minute; hover a bar for its figures.')),
      h('h2', {}, 'Issuers'),
      h('div', { class: 'table-box' }, h('table', { id: 'issuers' },
        h('thead', {}, h('tr', {}, ['Issuer', 'Platform', 'Keys', 'Key set age', 'Fetch failures'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, o.issuers.map((i) => h('tr', { 'data-issuer': i.name },
          h('td', {}, i.name), h('td', {}, i.platform), h('td', { class: i.keys ? '' : 'fail' }, String(i.keys)),
          h('td', {}, i.age_secs === null ? 'never loaded' : `${Math.round(i.age_secs / 60)} min${i.static ? ' (file)' : ''}`),
          h('td', {}, String(i.fetch_failures))))))),
      h('h2', {}, 'Backends'),
      h('div', { class: 'table-box' }, h('table', { id: 'backends' },
        h('thead', {}, h('tr', {}, ['Backend', 'Kind', 'Revocation', 'Live leases'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, o.backends.map((b) => h('tr', {}, h('td', {}, b.name), h('td', {}, b.kind), h('td', {}, b.revocation), h('td', {}, String(b.live))))))));
  }
  await load();
  timers.push(setInterval(load, REFRESH_MS * 2));
}

// ---- routing -------------------------------------------------------------------------------

function route() {
  if (!token()) return showSignIn();
  nav.hidden = false;
  signOutButton.hidden = false;
  const hash = location.hash || '#/leases';
  for (const a of nav.querySelectorAll('a')) {
    if (hash.startsWith(a.getAttribute('href'))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const lease = hash.match(/^#\/leases\/(.+)$/);
  const views = { '#/decisions': showDecisions, '#/explain': showExplain, '#/preview': showPreview, '#/health': showHealth };
  const view = lease ? showLease(decodeURIComponent(lease[1])) : (views[hash] || showLeases)();
  view.then(() => main.focus({ preventScroll: true }));
}

window.addEventListener('hashchange', route);
route();
