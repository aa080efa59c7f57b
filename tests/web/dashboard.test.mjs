// The usage dashboard's two views in a real browser (Debian's chromium through
// playwright-core) against the whole gateway that `scripts/run` starts, after recording
// usage through it: the key holder's view (/dashboard/ through nginx, their own key) and
// the operator's (/dashboard/ on the sidecar's admin listener). Checks that the numbers
// are the recorded ones, that the charts drew (a screenshot of each chart, decoded by the
// browser, must hold pixels of its series' colours), and the CSV exports.
//
//   cd tests && npm ci && node --test web/dashboard.test.mjs
//
// Screenshots go to target/web-artifacts/.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { freePort, run } from './harness.mjs';

const exec = promisify(execFile);
const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const ARTIFACTS = path.join(REPO, 'target', 'web-artifacts');
const CHROMIUM = process.env.AFR_CHROMIUM || '/usr/bin/chromium';
const KEY_RE = /afr_[A-Za-z0-9]{32,}/;
// The first two series colours of web/assets/charts.js's PALETTE.
const SERIES_RGB = [[0x0b, 0x72, 0xd9], [0xe3, 0x62, 0x0b]];

let afrHome;
let origin;
let admin;
let browser;
/** What was recorded, per key: `{id, secret, requests: {model: n}, tokens}`. */
const keys = {};
/** A key used only by the last test, whose requests fail. */
let faultKey;



async function newKey(id, extra) {
  const afr = path.join(REPO, 'target', 'release', 'afr');
  const { stdout } = await exec(afr, ['key', 'new', '--id', id, '--name', `dashboard ${id}`, ...extra,
    '--file', path.join(afrHome, 'keys.toml')]);
  const m = KEY_RE.exec(stdout);
  assert.ok(m, `afr key new printed no key: ${stdout}`);
  return m[0];
}

/** Waits until nginx knows the key (keys.toml is hot-reloaded within 2 s). */
async function waitForKey(secret) {
  const end = Date.now() + 15000;
  while (Date.now() < end) {
    const res = await fetch(`${origin}/v1/models`, { headers: { Authorization: `Bearer ${secret}` } });
    await res.arrayBuffer();
    if (res.status === 200) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error('the new key was not live within 15 s');
}

async function chat(secret, model) {
  const res = await fetch(`${origin}/v1/chat/completions`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${secret}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: `Hello from the dashboard test to ${model}` }] }),
  });
  const body = await res.json();
  assert.equal(res.status, 200, JSON.stringify(body));
  return body.usage.total_tokens;
}

/** The key's own usage as the API reports it, once the store holds `requests` rows. */
async function usageOnceStored(secret, requests) {
  const end = Date.now() + 15000;
  let body;
  while (Date.now() < end) {
    const res = await fetch(`${origin}/v1/usage?by=model`, { headers: { Authorization: `Bearer ${secret}` } });
    body = await res.json();
    const n = (body.data || []).reduce((a, r) => a + r.requests, 0);
    if (n >= requests) return body;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`usage not stored in time: ${JSON.stringify(body)}`);
}

/**
 * How many pixels of a screenshot of `locator` are near each series colour: the PNG is
 * decoded by the browser itself (a blank page, so no CSP applies), not just "a canvas
 * exists". `rows` limits the count to a band of the height (fractions, top is 0).
 */
async function seriesPixels(locator, name, rows = [0, 1]) {
  const png = await locator.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
  const page = await browser.newPage();
  try {
    return await page.evaluate(async ({ b64, colours, rows }) => {
      const img = new Image();
      img.src = `data:image/png;base64,${b64}`;
      await img.decode();
      const canvas = document.createElement('canvas');
      canvas.width = img.width;
      canvas.height = img.height;
      const ctx = canvas.getContext('2d');
      ctx.drawImage(img, 0, 0);
      const { data } = ctx.getImageData(0, 0, img.width, img.height);
      const counts = colours.map(() => 0);
      const [from, to] = rows.map((f) => Math.round(f * img.height) * img.width * 4);
      for (let i = from; i < to; i += 4) {
        colours.forEach(([r, g, b], c) => {
          if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60) counts[c] += 1;
        });
      }
      return counts;
    }, { b64: png.toString('base64'), colours: SERIES_RGB, rows });
  } finally {
    await page.close();
  }
}

async function openPage(url) {
  const page = await browser.newPage({ acceptDownloads: true });
  const problems = [];
  page.on('console', (msg) => { if (msg.type() === 'error') problems.push(`console: ${msg.text()}`); });
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  await page.goto(url, { waitUntil: 'load' });
  return { page, problems };
}

/** Clicks `selector`, waits for the download and parses it as CSV (no quoted commas here). */
async function downloadCsv(page, selector) {
  const [download] = await Promise.all([page.waitForEvent('download'), page.click(selector)]);
  const text = fs.readFileSync(await download.path(), 'utf8');
  const [header, ...lines] = text.trim().split(/\r\n/);
  const columns = header.split(',');
  const rows = lines.map((l) => Object.fromEntries(l.split(',').map((v, i) => [columns[i], v])));
  return { name: download.suggestedFilename(), columns, rows };
}

/** The mock provider's origin, from the sidecar config scripts/run wrote. */
function mockOrigin() {
  const conf = fs.readFileSync(path.join(afrHome, 'sidecar.toml'), 'utf8');
  const m = /base_url\s*=\s*"http:\/\/127\.0\.0\.1:(\d+)/.exec(conf);
  assert.ok(m, 'the mock provider is in sidecar.toml');
  return `http://127.0.0.1:${m[1]}`;
}

/** An HTTP GET with a chosen Host header (fetch does not let one set it). */
function getWithHost(url, host) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { headers: { Host: host } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
  });
}

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  afrHome = fs.mkdtempSync(path.join(os.tmpdir(), 'afr-dash-'));
  fs.chmodSync(afrHome, 0o755);
  const [port, adminPort] = [await freePort(), await freePort()];
  origin = `http://127.0.0.1:${port}`;
  admin = `http://127.0.0.1:${adminPort}`;
  await run(path.join(REPO, 'scripts', 'run'), ['--detach'], {
    AFR_HOME: afrHome, AFR_PORT: String(port), AFR_ADMIN_PORT: String(adminPort),
  });
  // A budgeted key with a token limit, and a plain one.
  const budgeted = await newKey('dash-budget', ['--rpm', '600', '--tpm', '100000', '--budget-usd', '5', '--budget-per', 'month']);
  const plain = await newKey('dash-plain', ['--rpm', '600']);
  faultKey = await newKey('dash-fault', ['--rpm', '600']);
  await Promise.all([waitForKey(budgeted), waitForKey(plain), waitForKey(faultKey)]);
  const plan = {
    'dash-budget': { secret: budgeted, models: { 'gpt-4o-mini': 3, 'gpt-5-mini': 2 } },
    'dash-plain': { secret: plain, models: { 'gpt-4o-mini': 4 } },
  };
  for (const [id, { secret, models }] of Object.entries(plan)) {
    keys[id] = { id, secret, requests: models, tokens: 0 };
    for (const [model, n] of Object.entries(models)) {
      for (let i = 0; i < n; i += 1) keys[id].tokens += await chat(secret, model);
    }
    const total = Object.values(models).reduce((a, b) => a + b, 0);
    keys[id].usage = await usageOnceStored(secret, total);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}, { timeout: 10 * 60 * 1000 });

after(async () => {
  await browser?.close();
  await run(path.join(REPO, 'scripts', 'run'), ['--stop'], { AFR_HOME: afrHome }).catch((err) => console.error(err.message));
  fs.rmSync(afrHome, { recursive: true, force: true });
}, { timeout: 60 * 1000 });

describe('key holder view (/dashboard/ through nginx)', () => {
  test('shows the key\'s recorded spend, tokens, budget and headroom, and the charts drew', async () => {
    const k = keys['dash-budget'];
    const { page, problems } = await openPage(`${origin}/dashboard`);
    await page.fill('#api-key', k.secret);
    await page.click('#load');
    await page.waitForSelector('#report[data-loaded="true"]', { timeout: 10000 });

    const cost = k.usage.data.reduce((a, r) => a + r.cost_usd, 0);
    assert.ok(cost > 0, 'the mock routes have prices');
    assert.equal(await page.textContent('#total-requests'), '5');
    assert.equal(await page.textContent('#total-tokens'), k.tokens.toLocaleString('en-US'));
    assert.equal(await page.textContent('#total-spend'), cost < 0.01 ? `$${cost.toFixed(6)}` : `$${cost.toFixed(2)}`);
    // One table row per model today, with the requests recorded.
    const rows = await page.$$eval('#usage-table tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    assert.deepEqual(rows.map((r) => [r[1], r[2]]).sort(), [['gpt-4o-mini', '3'], ['gpt-5-mini', '2']]);

    // The budget: $5 a month, ending on the first of next month (UTC).
    const now = new Date();
    const end = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
    const summary = await page.textContent('#budget-summary');
    assert.match(summary, /of \$5\.00 this month/);
    assert.ok(summary.includes(end.toUTCString().slice(0, 16)), `${summary} names the period's end ${end.toUTCString()}`);
    // Headroom from this page's own request: the key's 600 rpm and 100 000 tpm.
    assert.match(await page.textContent('#rpm-text'), /of 600 left/);
    assert.match(await page.textContent('#tpm-text'), /of 100,000 left/);
    assert.match(await page.textContent('#budget-text'), /of \$5\.00 left this month/);
    assert.ok(await page.$eval('#budget-meter', (m) => m.value > 4 && m.value <= 5));

    // Charts drew: each screenshot holds its series' colours (two models in the spend and
    // token charts; the budget line in the burn-down).
    for (const id of ['chart-spend', 'chart-tokens']) {
      const [first, second] = await seriesPixels(page.locator(`#${id} canvas`), `dashboard-key-${id}`);
      assert.ok(first > 30 && second > 30, `${id}: series pixels ${first}, ${second}`);
    }
    const [budgetLine] = await seriesPixels(page.locator('#chart-budget canvas'), 'dashboard-key-budget');
    assert.ok(budgetLine > 30, `burn-down pixels ${budgetLine}`);
    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-key.png'), fullPage: true });
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('exports the rows shown as CSV', async () => {
    const k = keys['dash-budget'];
    const { page } = await openPage(`${origin}/dashboard/`);
    await page.fill('#api-key', k.secret);
    await page.click('#load');
    await page.waitForSelector('#report[data-loaded="true"]');
    const csv = await downloadCsv(page, '#export');
    assert.match(csv.name, /^afr-usage-dash-budget-\d{4}-\d{2}-\d{2}-to-\d{4}-\d{2}-\d{2}\.csv$/);
    assert.deepEqual(csv.columns, ['day', 'model', 'requests', 'prompt_tokens', 'completion_tokens', 'total_tokens', 'cost_usd', 'errors']);
    const today = new Date().toISOString().slice(0, 10);
    const byModel = Object.fromEntries(k.usage.data.map((r) => [r.model, r]));
    assert.equal(csv.rows.length, 2);
    for (const row of csv.rows) {
      const want = byModel[row.model];
      assert.equal(row.day, today);
      assert.equal(Number(row.requests), k.requests[row.model]);
      assert.equal(Number(row.total_tokens), want.total_tokens);
      assert.equal(Number(row.cost_usd), want.cost_usd);
    }
    assert.equal(csv.rows.reduce((a, r) => a + Number(r.total_tokens), 0), k.tokens);
    await page.close();
  });

  test('a wrong key is told so; operator data is not reachable through nginx', async () => {
    const { page } = await openPage(`${origin}/dashboard/`);
    await page.fill('#api-key', `afr_${'Z9'.repeat(20)}`);
    await page.click('#load');
    await page.waitForSelector('#error:not([hidden])');
    assert.match(await page.textContent('#error'), /key/i);
    await page.close();
    const auth = { Authorization: `Bearer ${keys['dash-plain'].secret}` };
    for (const p of ['/api/usage?by=key', '/api/breakers', '/dashboard/operator.html', '/v1/api/usage']) {
      const res = await fetch(`${origin}${p}`, { headers: auth });
      await res.arrayBuffer();
      assert.equal(res.status, 404, p);
    }
    // A key holder cannot group by key (and so see other keys).
    const res = await fetch(`${origin}/v1/usage?by=key`, { headers: auth });
    const body = await res.json();
    assert.equal(res.status, 400);
    assert.equal(body.error.param, 'by');
  });
});

describe('operator view (/dashboard/ on the admin listener)', () => {
  test('shows every key\'s spend, providers, breakers and fleet mode, and the charts drew', async () => {
    const { page, problems } = await openPage(`${admin}/`);
    await page.waitForSelector('#report[data-loaded="true"]', { timeout: 10000 });
    assert.equal(new URL(page.url()).pathname, '/dashboard/');
    const table = await page.$$eval('#keys-table tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    const byKey = Object.fromEntries(table.map((r) => [r[0], r]));
    assert.equal(byKey['dash-budget'][1], '5');
    assert.equal(byKey['dash-plain'][1], '4');
    assert.equal(byKey['dash-budget'][4], keys['dash-budget'].tokens.toLocaleString('en-US'));
    assert.equal(byKey['dash-plain'][4], keys['dash-plain'].tokens.toLocaleString('en-US'));
    assert.equal(await page.textContent('#total-keys'), String(table.length));
    assert.equal(await page.textContent('#fleet-mode'), 'single node');
    // The mock answered all nine requests, without an error.
    const providers = await page.$$eval('#providers-table tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    assert.equal(providers.reduce((a, r) => a + Number(r[2]), 0), 9);
    assert.equal(providers.reduce((a, r) => a + Number(r[3]), 0), 0);

    const [a, b] = await seriesPixels(page.locator('#chart-top canvas'), 'dashboard-operator-top');
    assert.ok(a > 30 && b > 30, `top spenders pixels ${a}, ${b}`);
    // The breakers: a line across the last samples. Latency: all of it today, so one
    // point (about 25 pixels), and no line to draw to it.
    for (const [id, least] of [['chart-breakers', 30], ['chart-latency', 12]]) {
      const [first] = await seriesPixels(page.locator(`#${id} canvas`), `dashboard-operator-${id}`);
      assert.ok(first > least, `${id}: series pixels ${first}`);
    }
    // A loopback provider answers in hundredths of a millisecond: the latency axis's
    // ticks must tell them apart (one decimal drew every tick as "0.1 ms").
    const ticks = await page.evaluate(async () => {
      const { ms } = await import('/assets/charts.js');
      return [0.02, 0.04, 0.06, 0.5, 3.25, 1234].map(ms);
    });
    assert.deepEqual(ticks, ['0.02 ms', '0.04 ms', '0.06 ms', '0.5 ms', '3.3 ms', '1,234 ms']);
    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard-operator.png'), fullPage: true });
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('exports every key\'s spend and the providers as CSV', async () => {
    const { page } = await openPage(`${admin}/dashboard/`);
    await page.waitForSelector('#report[data-loaded="true"]');
    const csv = await downloadCsv(page, '#export-keys');
    assert.deepEqual(csv.columns.slice(0, 2), ['key_id', 'requests']);
    const rows = Object.fromEntries(csv.rows.map((r) => [r.key_id, r]));
    for (const k of Object.values(keys)) {
      const want = k.usage.data.reduce((acc, r) => ({ cost: acc.cost + r.cost_usd, requests: acc.requests + r.requests }), { cost: 0, requests: 0 });
      assert.equal(Number(rows[k.id].requests), want.requests, k.id);
      assert.equal(Number(rows[k.id].total_tokens), k.tokens, k.id);
      assert.ok(Math.abs(Number(rows[k.id].cost_usd) - want.cost) < 1e-9, k.id);
    }
    const providers = await downloadCsv(page, '#export-providers');
    assert.deepEqual(providers.columns.slice(0, 3), ['provider', 'day', 'attempts']);
    assert.equal(providers.rows.reduce((acc, r) => acc + Number(r.attempts), 0), 9);
    await page.close();
  });

  test('bad parameters are a 400 naming the parameter; other hosts are refused', async () => {
    for (const [p, param] of [['/api/usage?by=tier', 'by'], ['/api/usage?since=soon', 'since'], ['/api/providers?key=x', 'key']]) {
      const res = await fetch(`${admin}${p}`);
      const body = await res.json();
      assert.equal(res.status, 400, p);
      assert.equal(body.error.param, param, p);
      assert.equal(body.error.type, 'invalid_request_error');
    }
    const res = await fetch(`${admin}/api/usage?key=dash-plain&by=model`);
    const body = await res.json();
    assert.deepEqual(body.data.map((r) => [r.model, r.requests]), [['gpt-4o-mini', 4]]);
    // DNS rebinding: a page whose own name points at 127.0.0.1 gets nothing.
    assert.equal(await getWithHost(`${admin}/api/usage`, 'evil.example'), 403);
    assert.equal(await getWithHost(`${admin}/api/usage`, `localhost:${new URL(admin).port}`), 200);
  });

  // Last: it leaves the mock's breaker open and usage the tests above do not expect.
  test('a provider in trouble shows as errors and as its breaker opening', async () => {
    const mock = mockOrigin();
    const setMock = (knobs) => fetch(`${mock}/_mock/config`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(knobs),
    }).then((r) => assert.equal(r.status, 200));
    await setMock({ status: 500 });
    try {
      // Five failures open the breaker (the default); after that it refuses with 503.
      for (let i = 0; i < 6; i += 1) {
        const res = await fetch(`${origin}/v1/chat/completions`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${faultKey}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'fail' }] }),
        });
        await res.arrayBuffer();
        assert.ok(res.status >= 500, `status ${res.status}`);
      }
    } finally {
      await setMock({});
    }
    const breakers = await (await fetch(`${admin}/api/breakers`)).json();
    assert.equal(breakers.samples.at(-1).states.mock, 'open');
    assert.equal(breakers.samples[0].states.mock, 'closed');

    const { page, problems } = await openPage(`${admin}/dashboard/`);
    await page.waitForSelector('#report[data-loaded="true"]');
    // The failures' rows reach the store within the writer's batch interval.
    await page.waitForFunction(async () => {
      document.getElementById('load').click();
      await new Promise((r) => setTimeout(r, 300));
      return Number(document.getElementById('total-errors').textContent) > 0;
    }, null, { timeout: 10000, polling: 500 });
    const errorsCell = await page.$$eval('#providers-table tbody tr', (trs) => trs.map((tr) => Number(tr.children[4].textContent)));
    assert.ok(errorsCell.reduce((a, b) => a + b, 0) > 0, 'the 5xx column counts the failures');
    // The breaker's line now reaches "open", the top band of its chart (closed is at the bottom).
    const [open] = await seriesPixels(page.locator('#chart-breakers canvas'), 'dashboard-operator-breaker-open', [0, 0.3]);
    assert.ok(open > 10, `pixels at the open level: ${open}`);
    assert.deepEqual(problems, []);
    await page.close();
  });
});
