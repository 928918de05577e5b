// The dashboard's script: polls /dashboard.json and redraws. Text from the daemon is set
// with textContent only, never parsed as HTML.
'use strict';

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
// Errors the page met, for a person with the console closed (and for the browser test).
window.stagedErrors = [];
// In the capture phase, so that a resource that failed to load counts too.
window.addEventListener('error', (e) => window.stagedErrors.push(String(e.message || e.target?.src || 'error')), true);
document.addEventListener('securitypolicyviolation', (e) => window.stagedErrors.push(`CSP refused ${e.blockedURI} (${e.violatedDirective})`));
window.addEventListener('unhandledrejection', (e) => window.stagedErrors.push(String(e.reason)));
const consoleError = console.error.bind(console);
console.error = (...args) => {
  window.stagedErrors.push(args.map(String).join(' '));
  consoleError(...args);
};

let token = sessionStorage.getItem('staged-token') || '';
let polls = 0;

function headers() {
  return token ? { Authorization: 'Bearer ' + token } : {};
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function duration(secs) {
  if (secs === null || secs === undefined) return '–';
  const neg = secs < 0;
  let s = Math.abs(secs);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const out = d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  return neg ? `${out} overdue` : out;
}

function figure(parent, value, label) {
  const f = el('div', null, 'figure');
  f.append(el('b', value), el('span', label));
  parent.append(f);
}

function fill(tbody, rows, cells) {
  tbody.replaceChildren(...rows.map((r) => {
    const tr = document.createElement('tr');
    for (const c of cells(r, tr)) tr.append(c);
    return tr;
  }));
}

function td(text, cls) {
  return el('td', text, cls);
}

function num(v) {
  return td(v, 'num');
}

function bar(j) {
  const b = el('div', null, 'bar');
  b.title = `${j.ready} ready, ${j.failed} failed, ${j.waiting} waiting of ${j.total}`;
  const total = Math.max(j.total, 1);
  for (const [cls, n] of [['ready', j.ready], ['failed', j.failed]]) {
    const seg = el('div', null, cls);
    seg.style.width = `${(100 * n) / total}%`;
    b.append(seg);
  }
  const cell = td();
  cell.append(b);
  return cell;
}

// An hour of intervals, oldest on the left; missing ones (a daemon up for less than an
// hour) are drawn as zero so that the time axis is the same on every poll.
function sparkline(label, values, intervalSecs) {
  const slots = Math.max(values.length, Math.round(3600 / Math.max(intervalSecs, 1)));
  const padded = Array(slots - values.length).fill(0).concat(values);
  const row = el('div', null, 'spark');
  row.dataset.series = label;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${slots} 40`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const line = document.createElementNS(ns, 'polyline');
  const max = Math.max(1, ...padded);
  line.setAttribute('points', padded.map((v, i) => `${i},${38 - (36 * v) / max}`).join(' '));
  line.setAttribute('vector-effect', 'non-scaling-stroke');
  svg.append(line);
  const sum = values.reduce((a, b) => a + b, 0);
  const head = el('div', null, 'spark-head');
  head.append(el('span', label), el('span', `${sum} in the last hour, at most ${Math.max(...padded)} per ${intervalSecs} s`, 'muted'));
  row.append(head, svg);
  return row;
}

function render(d) {
  $('version').textContent = `v${d.version}`;
  $('store').textContent = d.store;
  $('adapter').textContent = d.adapter ? `${d.adapter.name} ${d.adapter.version} (${d.adapter.telescope})` : 'no adapter';
  const status = $('status');
  status.textContent = `updated ${new Date(d.now_ms).toLocaleTimeString()}`;
  status.className = '';

  $('warnings').hidden = d.warnings.length === 0;
  $('warning-list').replaceChildren(...d.warnings.map((w) => el('li', w)));

  const totals = $('totals');
  totals.replaceChildren();
  if (d.totals) {
    $('totals-age').textContent = `as of ${duration(d.totals.age_secs)} ago`;
    figure(totals, d.totals.jobs_in_flight, 'jobs in flight');
    figure(totals, d.totals.jobs_complete, 'jobs complete');
    figure(totals, d.totals.files_ready, 'files ready');
    figure(totals, d.totals.files_failed, 'files failed');
    figure(totals, d.totals.files_waiting, 'files waiting');
  } else {
    totals.append(el('span', 'reading the store…', 'muted'));
  }

  const kafka = $('kafka');
  kafka.replaceChildren();
  if (d.kafka) {
    const k = d.kafka;
    const state = el('b', k.connected ? 'connected' : k.stalled ? 'stalled' : 'not connected');
    state.className = k.connected ? '' : 'pill bad';
    const f = el('div', null, 'figure');
    f.id = 'kafka-state';
    f.dataset.connected = String(k.connected);
    f.append(state, el('span', k.in_group ? 'in its group' : 'not in its group'));
    kafka.append(f);
    figure(kafka, k.lag === null ? '–' : k.lag, 'lag');
    figure(kafka, k.last_message_secs === null ? '–' : duration(k.last_message_secs), 'since the last message');
  } else {
    kafka.append(el('span', 'no [kafka] configured', 'muted'));
  }

  const ob = $('outbox-totals');
  ob.replaceChildren();
  figure(ob, d.outbox.pending, 'pending');
  figure(ob, d.outbox.failing, 'failing');
  figure(ob, d.outbox.next_attempt_in_secs === null ? '–' : duration(d.outbox.next_attempt_in_secs), 'next attempt');

  const t = d.throughput;
  $('sparks').replaceChildren(
    sparkline('jobs accepted', t.accepted, t.interval_secs),
    sparkline('files staged', t.files, t.interval_secs),
    sparkline('callbacks', t.callbacks, t.interval_secs),
  );

  fill($('scout').tBodies[0], d.scout, (n, tr) => {
    tr.dataset.node = n.node;
    tr.dataset.ejected = String(n.ejected);
    const state = td();
    state.append(el('span', n.ejected ? 'ejected' : 'healthy', n.ejected ? 'pill bad' : 'pill'));
    return [td(n.node), state, num(n.latency_ms === null ? '–' : `${n.latency_ms.toFixed(1)} ms`),
      num(n.successes), num(n.failures)];
  });
  if (d.scout.length === 0) {
    const tr = el('tr');
    tr.append(el('td', 'no [scout] nodes configured', 'muted'));
    $('scout').tBodies[0].replaceChildren(tr);
  }

  $('jobs-note').textContent = d.totals && d.totals.jobs_in_flight > d.jobs.length
    ? `(the newest ${d.jobs.length} of ${d.totals.jobs_in_flight})` : '';
  fill($('jobs').tBodies[0], d.jobs, (j, tr) => {
    tr.id = `job-${j.job_id}`;
    tr.dataset.ready = j.ready;
    tr.dataset.failed = j.failed;
    tr.dataset.waiting = j.waiting;
    tr.dataset.total = j.total;
    return [td(j.job_id), td(j.state), bar(j), num(j.ready), num(j.failed), num(j.waiting),
      num(j.total), num(duration(j.age_secs)),
      num(j.next_stage_in_secs === null ? '–' : duration(j.next_stage_in_secs)), td(j.submitted_by || '')];
  });

  fill($('outbox').tBodies[0], d.outbox.due, (c) => [td(c.job_id), num(c.return_code),
    num(c.attempts), num(duration(c.next_attempt_in_secs)), td(c.destination),
    td(c.last_error || '')]);

  fill($('finished').tBodies[0], d.finished, (f, tr) => {
    tr.id = `finished-${f.job_id}`;
    const code = td(null, 'num');
    code.append(el('span', f.return_code, f.return_code === 0 ? 'pill' : 'pill bad'));
    const report = td();
    if (f.report) {
      const b = el('button', 'failure report', 'link');
      b.addEventListener('click', () => showReport(f.job_id, f.report));
      report.append(b);
    }
    return [td(f.request_id ? `stage request ${f.request_id}` : f.job_id), code, num(duration(f.duration_secs)), num(duration(f.finished_secs_ago)),
      num(f.ready), num(f.failed), num(f.total), td(f.delivered ? 'yes' : 'no'), report];
  });
}

async function showReport(jobId, url) {
  const r = await fetch(url, { headers: headers() });
  const body = await r.json().catch(() => null);
  $('report-title').textContent = `Failure report of job ${jobId}`;
  $('report').textContent = JSON.stringify(body, null, 2);
  $('report-box').hidden = false;
}

async function poll() {
  let r;
  try {
    r = await fetch('/dashboard.json', { headers: headers(), cache: 'no-store' });
  } catch (e) {
    $('status').textContent = 'the daemon does not answer';
    $('status').className = 'down';
    return;
  }
  if (r.status === 401 || r.status === 403) {
    $('login').hidden = false;
    $('status').textContent = r.status === 401 ? 'a token is needed' : 'the token lacks the read scope';
    $('status').className = 'down';
    return;
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    $('status').textContent = `error ${r.status}: ${body.errormsg || ''}`;
    $('status').className = 'down';
    return;
  }
  $('login').hidden = true;
  render(await r.json());
  polls += 1;
  document.body.dataset.polls = String(polls);
}

$('login-form').addEventListener('submit', (e) => {
  e.preventDefault();
  token = $('token').value.trim();
  sessionStorage.setItem('staged-token', token);
  poll();
});

poll();
setInterval(poll, POLL_MS);
