// The docs site and the playground in a real browser (Debian's chromium, driven by
// playwright-core) against the whole gateway that `scripts/run` starts: nginx with the
// module, the sidecar and the mock provider.
//
//   cd tests && npm ci && node --test web/
//
// AFR_WEB_URL=http://127.0.0.1:PORT AFR_WEB_KEY=afr_… runs the same tests against a
// gateway that is already running; add that gateway's AFR_HOME to also run the tests that
// create keys or set the mock's knobs (without AFR_HOME they are skipped). Set the mock's
// chunk_interval_ms yourself then (POST /_mock/config), or replies come in one paint.
// Screenshots go to target/web-artifacts/.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
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
// Well-formed (afr_ + 40 base62) but never issued: the module must answer 401.
const UNKNOWN_KEY = `afr_${'Z9'.repeat(20)}`;
const CHUNK_INTERVAL_MS = 40;
// About 20 words: a reply of about 23 deltas, about a second long.
const SHORT_MESSAGE = 'Tell me, in a few friendly words, what an nginx module does and why a gateway would want one there.';
// 400 words: a reply of about 16 s, far longer than the Stop test waits.
const LONG_MESSAGE = Array.from({ length: 400 }, (_, i) => `word${i}`).join(' ');

let origin;
let key;
/** The runtime directory of the gateway under test (keys.toml, sidecar.toml), if known. */
let afrHome = null;
/** Whether this file started the gateway (and so stops it). */
let ownStack = false;
let browser;



/**
 * Waits until the gateway answers GET /v1/models with `status` for the key (keys.toml is
 * hot-reloaded within 2 s). A 200 uses one request of the key's rate limit.
 */
async function waitForKey(secret, status = 200, deadlineMs = 15000) {
  const end = Date.now() + deadlineMs;
  let last = '';
  while (Date.now() < end) {
    try {
      const res = await fetch(`${origin}/v1/models`, { headers: { Authorization: `Bearer ${secret}` } });
      if (res.status === status) return;
      last = `${res.status} ${await res.text()}`;
    } catch (err) {
      last = err.message;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`gateway did not answer ${status} for the new key in time: ${last}`);
}

async function newKey(name, extra = []) {
  // Unique per run, so a reused AFR_HOME keeps working.
  const id = `${name}-${Date.now().toString(36)}`;
  const afr = path.join(REPO, 'target', 'release', 'afr');
  const { stdout } = await exec(afr, ['key', 'new', '--id', id, '--name', `web test ${id}`, ...extra,
    '--file', path.join(afrHome, 'keys.toml')]);
  const m = KEY_RE.exec(stdout);
  assert.ok(m, `afr key new printed no key: ${stdout}`);
  return m[0];
}

// Evaluated when tests are declared, before the `before` hook runs.
function afrHomeKnown() {
  return !process.env.AFR_WEB_URL || Boolean(process.env.AFR_HOME);
}

/** The mock provider's origin, read from the sidecar config scripts/run wrote. */
function mockOrigin() {
  if (!afrHome) return null;
  const file = path.join(afrHome, 'sidecar.toml');
  if (!fs.existsSync(file)) return null;
  const m = /base_url\s*=\s*"http:\/\/127\.0\.0\.1:(\d+)/.exec(fs.readFileSync(file, 'utf8'));
  return m ? `http://127.0.0.1:${m[1]}` : null;
}

/** A page that records console errors and uncaught exceptions. */
async function openPage(urlPath) {
  const page = await browser.newPage();
  const problems = [];
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console: ${msg.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  page.on('requestfailed', (req) => {
    // An aborted stream (the Stop button) is expected to fail; nothing else is.
    if (!req.url().includes('/v1/chat/completions')) problems.push(`requestfailed: ${req.url()}`);
  });
  await page.goto(`${origin}${urlPath}`, { waitUntil: 'load' });
  return { page, problems };
}

/** Enters the key in the playground and waits for the live model list. */
async function playgroundWithKey(secret) {
  const opened = await openPage('/playground');
  const { page } = opened;
  await page.fill('#api-key', secret);
  await page.dispatchEvent('#api-key', 'change');
  await page.waitForSelector('#model[data-source="live"]', { timeout: 10000 });
  return opened;
}

/** Records every change of the last assistant reply's length, with timestamps. */
async function watchReply(page) {
  await page.evaluate(() => {
    window.__growth = [];
    const conv = document.getElementById('conversation');
    new MutationObserver(() => {
      const replies = conv.querySelectorAll('.msg.assistant .content');
      const last = replies[replies.length - 1];
      if (!last) return;
      const len = last.textContent.length;
      const g = window.__growth;
      if (!g.length || g[g.length - 1].len !== len) g.push({ t: performance.now(), len });
    }).observe(conv, { subtree: true, childList: true, characterData: true });
  });
}

async function lastReply(page) {
  return page.evaluate(() => {
    const msgs = document.querySelectorAll('#conversation .msg.assistant');
    const m = msgs[msgs.length - 1];
    return m ? { state: m.dataset.state, text: m.querySelector('.content').textContent, note: m.querySelector('.note')?.textContent ?? null } : null;
  });
}

async function sendMessage(page, text) {
  await page.fill('#message', text);
  await page.click('#send');
}

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium`);
  if (process.env.AFR_WEB_URL) {
    origin = process.env.AFR_WEB_URL.replace(/\/$/, '');
    key = process.env.AFR_WEB_KEY;
    assert.ok(key, 'AFR_WEB_URL needs AFR_WEB_KEY');
    afrHome = process.env.AFR_HOME || null;
  } else {
    afrHome = fs.mkdtempSync(path.join(os.tmpdir(), 'afr-web-'));
    // nginx's workers (not root) read keys.toml here on hot reload; mkdtemp makes it 0700.
    fs.chmodSync(afrHome, 0o755);
    ownStack = true;
    const port = await freePort();
    origin = `http://127.0.0.1:${port}`;
    // The mock streams one delta per word of "Mock reply to: <message>"; spacing them out
    // lets the test see the reply grow, and a long message makes a long stream to stop.
    await run(path.join(REPO, 'scripts', 'run'), ['--detach'], {
      AFR_HOME: afrHome,
      AFR_PORT: String(port),
      AFR_MOCK_ARGS: `--chunk-interval-ms ${CHUNK_INTERVAL_MS}`,
    });
    key = await newKey('web-tests');
    await waitForKey(key);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}, { timeout: 30 * 60 * 1000 });

after(async () => {
  await browser?.close();
  if (ownStack) {
    await run(path.join(REPO, 'scripts', 'run'), ['--stop'], { AFR_HOME: afrHome }).catch((err) => {
      console.error(err.message);
    });
    fs.rmSync(afrHome, { recursive: true, force: true });
  }
}, { timeout: 60 * 1000 });

describe('pages', () => {
  // The bare /docs and /playground go through nginx's redirect to the directory.
  for (const [urlPath, heading] of [['/', /OpenAI-compatible/], ['/docs', /Documentation/], ['/playground', /Playground/]]) {
    test(`${urlPath} loads with no console errors`, async () => {
      const { page, problems } = await openPage(urlPath);
      assert.match(await page.textContent('h1'), heading);
      // Give module scripts a moment to run and report.
      await page.waitForLoadState('networkidle');
      assert.deepEqual(problems, []);
      if (urlPath === '/docs') {
        for (const id of ['overview', 'authentication', 'chat-completions', 'models', 'streaming', 'rate-limits', 'usage', 'errors']) {
          assert.ok(await page.isVisible(`#${id}`), `docs section #${id}`);
        }
        // Examples name this host's base URL, and every example has a copy button.
        assert.equal(await page.textContent('#overview ~ .table-wrap [data-base-url]'), `${origin}/v1`);
        const pres = await page.$$eval('pre', (els) => els.length);
        const buttons = await page.$$eval('pre + .copy-btn', (els) => els.length);
        assert.ok(pres > 10);
        assert.equal(buttons, pres);
        await page.screenshot({ path: path.join(ARTIFACTS, 'docs.png'), fullPage: true });
      }
      await page.close();
    });
  }

  test('example tabs switch by keyboard, and Copy copies the example shown', async () => {
    const context = await browser.newContext();
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
    const page = await context.newPage();
    await page.goto(`${origin}/docs/`, { waitUntil: 'load' });
    const set = page.locator('#chat-completions ~ .tabs').first();
    await set.locator('[role="tab"][aria-selected="true"]').focus();
    await page.keyboard.press('ArrowRight');
    assert.equal(await set.locator('[role="tab"][aria-selected="true"]').textContent(), 'JavaScript');
    // The choice applies to every example on the page.
    const selected = await page.$$eval('[role="tab"][aria-selected="true"]', (els) => [...new Set(els.map((e) => e.textContent))]);
    assert.deepEqual(selected, ['JavaScript']);
    const panel = set.locator('[role="tabpanel"]:not([hidden])');
    await panel.locator('.copy-btn').click();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.equal(copied, await panel.locator('pre').textContent());
    assert.match(copied, new RegExp(`baseURL: '${origin}/v1'`));
    await context.close();
  });

  test('docs Models section loads the live list with a key', async () => {
    const { page, problems } = await openPage('/docs');
    await page.fill('#models-key', key);
    await page.click('#models-form button[type="submit"]');
    await page.waitForSelector('#models-table[data-source="live"]', { timeout: 10000 });
    const ids = await page.$$eval('#models-table tbody code', (els) => els.map((e) => e.textContent));
    const live = await (await fetch(`${origin}/v1/models`, { headers: { Authorization: `Bearer ${key}` } })).json();
    assert.deepEqual(ids, live.data.map((m) => m.id));
    assert.ok(ids.length > 0);
    assert.deepEqual(problems, []);
    await page.close();
  });
});

describe('accessibility (axe-core: WCAG 2 A/AA, contrast included)', () => {
  const axeSource = fs.readFileSync(path.join(REPO, 'tests/node_modules/axe-core/axe.min.js'), 'utf8');
  for (const urlPath of ['/', '/docs/', '/playground/']) {
    for (const colorScheme of ['light', 'dark']) {
      test(`${urlPath} in the ${colorScheme} scheme has no violations`, async () => {
        // The pages' CSP forbids inline scripts, and axe is injected as one.
        const context = await browser.newContext({ colorScheme, bypassCSP: true });
        const page = await context.newPage();
        await page.goto(`${origin}${urlPath}`, { waitUntil: 'networkidle' });
        await page.addScriptTag({ content: axeSource });
        const violations = await page.evaluate(async () => {
          // eslint-disable-next-line no-undef
          const r = await axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] });
          return r.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')}`);
        });
        assert.deepEqual(violations, []);
        await context.close();
      });
    }
  }
});

describe('responsive', () => {
  for (const urlPath of ['/', '/docs/', '/playground/']) {
    test(`${urlPath} fits a 360 px wide screen`, async () => {
      const context = await browser.newContext({ viewport: { width: 360, height: 740 } });
      const page = await context.newPage();
      await page.goto(`${origin}${urlPath}`, { waitUntil: 'networkidle' });
      // Wide code and tables scroll inside their own boxes; the page itself must not.
      const { scrollWidth, innerWidth } = await page.evaluate(() => ({
        scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
      }));
      assert.ok(scrollWidth <= innerWidth, `page is ${scrollWidth} px wide in a ${innerWidth} px viewport`);
      if (urlPath === '/docs/') {
        await page.screenshot({ path: path.join(ARTIFACTS, 'docs-mobile.png') });
      }
      await context.close();
    });
  }
});

describe('playground', () => {
  test('the model list is filled from GET /v1/models; the key stays in the tab', async () => {
    const { page, problems } = await playgroundWithKey(key);
    const urls = [];
    page.on('request', (req) => urls.push(req.url()));
    const options = await page.$$eval('#model option', (els) => els.map((e) => e.value));
    const live = await (await fetch(`${origin}/v1/models`, { headers: { Authorization: `Bearer ${key}` } })).json();
    // The playground chats, so it lists the models that serve chat completions.
    const chat = live.data.filter((m) => m.endpoints.includes('chat/completions')).map((m) => m.id);
    assert.deepEqual(options, chat);
    assert.ok(options.length > 0);
    assert.ok(chat.length < live.data.length, 'the shipped catalogue has an embedding model the playground leaves out');

    // Survives a reload of the tab (sessionStorage), and lives nowhere else.
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('#model[data-source="live"]', { timeout: 10000 });
    assert.equal(await page.inputValue('#api-key'), key);
    assert.equal(await page.evaluate(() => localStorage.length), 0);
    assert.deepEqual(await page.context().cookies(), []);
    assert.ok(urls.length > 0 && urls.every((u) => !u.includes(key)), 'the key must never be in a URL');
    assert.deepEqual(problems, []);

    // Forget key empties the field and the tab's storage.
    await page.click('#forget-key');
    assert.equal(await page.inputValue('#api-key'), '');
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    await page.close();
  });

  test('settings outside the contract ranges are refused before sending', async () => {
    const { page } = await playgroundWithKey(key);
    let posts = 0;
    page.on('request', (req) => { if (req.method() === 'POST') posts++; });
    for (const [field, value, message] of [
      ['#temperature', '2.5', /Temperature must be a number from 0.0 to 2.0/],
      ['#temperature', '-0.1', /Temperature must be a number from 0.0 to 2.0/],
      ['#max-tokens', '0', /Max tokens must be a positive whole number/],
      ['#max-tokens', '1.5', /Max tokens must be a positive whole number/],
    ]) {
      await page.fill('#temperature', '0.7');
      await page.fill('#max-tokens', '');
      await page.fill(field, value);
      await sendMessage(page, 'Hi');
      await page.waitForSelector('#error:not([hidden])');
      assert.match(await page.textContent('#error'), message);
    }
    assert.equal(posts, 0);
    await page.close();
  });

  test('system prompt, temperature and max_tokens reach the provider', async (t) => {
    const mock = mockOrigin();
    if (!mock) {
      t.skip('mock provider address unknown');
      return;
    }
    const { page, problems } = await playgroundWithKey(key);
    await page.fill('#system-prompt', 'You are terse.');
    await page.fill('#temperature', '1.3');
    await page.fill('#max-tokens', '3');
    await sendMessage(page, 'Count to ten for me please');
    await page.waitForSelector('#conversation .msg.assistant[data-state="done"]', { timeout: 15000 });
    // The mock cuts its reply to max_tokens pieces and reports that many completion tokens.
    assert.equal((await lastReply(page)).text, 'Mock reply to:');
    assert.match(await page.textContent('#stat-tokens'), /\+ 3 completion =/);
    const log = await (await fetch(`${mock}/_mock/requests`)).json();
    const sent = log.requests.filter((r) => JSON.stringify(r.body).includes('Count to ten for me please')).pop();
    assert.ok(sent, 'the mock saw the request');
    assert.deepEqual(sent.body.messages[0], { role: 'system', content: 'You are terse.' });
    assert.equal(sent.body.temperature, 1.3);
    // gpt-4o-mini's route keeps max_tokens as is (gpt-5 routes rename it).
    assert.equal(sent.body.max_tokens ?? sent.body.max_completion_tokens, 3);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('the API switch sends the conversation to the Responses API and back', async (t) => {
    const mock = mockOrigin();
    if (!mock) {
      t.skip('mock provider address unknown');
      return;
    }
    const { page, problems } = await playgroundWithKey(key);
    await page.fill('#system-prompt', 'You are terse.');
    await page.selectOption('#api', 'responses');
    await sendMessage(page, 'Hello over responses');
    await page.waitForSelector('#conversation .msg.assistant[data-state="done"]', { timeout: 15000 });
    assert.equal((await lastReply(page)).text, 'Mock reply to: Hello over responses');
    assert.match(await page.textContent('#stat-tokens'), /\d+ prompt \+ 6 completion = \d+/);
    await page.selectOption('#api', 'chat');
    await sendMessage(page, 'And back to chat');
    await page.waitForFunction(() => document.querySelectorAll('#conversation .msg.assistant[data-state="done"]').length === 2, null, { timeout: 15000 });
    assert.equal((await lastReply(page)).text, 'Mock reply to: And back to chat');
    const log = await (await fetch(`${mock}/_mock/requests`)).json();
    // The first request with these words: the chat turn after it carries them as history.
    const sent = (words) => log.requests.find((r) => JSON.stringify(r.body).includes(words));
    const viaResponses = sent('Hello over responses');
    assert.equal(viaResponses.path, '/v1/responses');
    assert.equal(viaResponses.body.instructions, 'You are terse.');
    assert.deepEqual(viaResponses.body.input, [{ role: 'user', content: 'Hello over responses' }]);
    const viaChat = sent('And back to chat');
    assert.equal(viaChat.path, '/v1/chat/completions');
    assert.deepEqual(viaChat.body.messages.map((m) => m.content), [
      'You are terse.', 'Hello over responses', 'Mock reply to: Hello over responses', 'And back to chat',
    ]);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('a message streams a multi-chunk reply, growing over time', async () => {
    const { page, problems } = await playgroundWithKey(key);
    await watchReply(page);
    await sendMessage(page, SHORT_MESSAGE);
    // Mid-stream: some text shown while the reply is still streaming.
    await page.waitForFunction(() => {
      const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
      return m && m.dataset.state === 'streaming' && m.querySelector('.content').textContent.length > 0;
    }, null, { timeout: 15000 });
    await page.waitForFunction(() => {
      const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
      return m && m.dataset.state !== 'streaming' && m.dataset.state !== 'waiting';
    }, null, { timeout: 30000 });

    const reply = await lastReply(page);
    assert.equal(reply.state, 'done', `reply ended as ${reply.state}: ${reply.note}`);
    assert.ok(reply.text.length > 0);
    const growth = await page.evaluate(() => window.__growth);
    const lengths = growth.map((g) => g.len).filter((n) => n > 0);
    assert.ok(lengths.length >= 3, `reply should grow in at least 3 steps, saw ${JSON.stringify(growth)}`);
    for (let i = 1; i < lengths.length; i++) assert.ok(lengths[i] > lengths[i - 1], 'reply only grows');
    const nonEmpty = growth.filter((g) => g.len > 0);
    const spread = nonEmpty[nonEmpty.length - 1].t - nonEmpty[0].t;
    assert.ok(spread >= 50, `growth should be spread over time, not one paint (${spread} ms)`);

    // Stats of the last response.
    assert.match(await page.textContent('#stat-status'), /^200/);
    assert.match(await page.textContent('#stat-ttft'), /\d+(\.\d+)? m?s/);
    assert.match(await page.textContent('#stat-latency'), /\d+(\.\d+)? m?s/);
    assert.match(await page.textContent('#stat-tokens'), /\d+ prompt \+ \d+ completion = \d+/);
    assert.match(await page.textContent('#rl-limit'), /^\d+$/);
    assert.match(await page.textContent('#rl-remaining'), /^\d+$/);
    assert.match(await page.textContent('#rl-reset'), /^\d{10}/);

    // Multi-turn: a second message goes out with the first exchange, then Clear empties.
    // Keyboard: Enter in the message box sends.
    await page.fill('#message', 'And once more, in one short sentence please?');
    await page.press('#message', 'Enter');
    await page.waitForFunction(() => document.querySelectorAll('#conversation .msg.assistant[data-state="done"]').length === 2, null, { timeout: 30000 });
    assert.equal(await page.$$eval('#conversation .msg', (els) => els.length), 4);
    await page.click('#clear');
    assert.equal(await page.$$eval('#conversation .msg', (els) => els.length), 0);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('an unknown key shows the 401 message and what to do', async () => {
    const direct = await fetch(`${origin}/v1/chat/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${UNKNOWN_KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }),
    });
    assert.equal(direct.status, 401);
    const expected = (await direct.json()).error.message;

    const page = await browser.newPage();
    await page.goto(`${origin}/playground`);
    await page.fill('#api-key', UNKNOWN_KEY);
    await sendMessage(page, 'Hello?');
    await page.waitForSelector('#error:not([hidden])', { timeout: 10000 });
    const box = await page.textContent('#error');
    assert.match(box, /401 Unauthorized/);
    assert.equal(await page.textContent('#error .error-message'), expected);
    assert.match(await page.textContent('#error .error-advice'), /Check your API key/);
    // The rejected turn is handed back for a retry, not kept in the conversation.
    assert.equal(await page.inputValue('#message'), 'Hello?');
    assert.equal(await page.$$eval('#conversation .msg', (els) => els.length), 0);
    await page.close();
  });

  test('an expired key shows the 403 message and what to do', { skip: afrHomeKnown() ? false : 'needs AFR_HOME (creates a key)' }, async () => {
    const expired = await newKey('web-expired', ['--expires', '2020-01-01T00:00:00Z']);
    await waitForKey(expired, 403);
    const page = await browser.newPage();
    await page.goto(`${origin}/playground/`);
    await page.fill('#api-key', expired);
    await sendMessage(page, 'Still there?');
    await page.waitForSelector('#error:not([hidden])', { timeout: 10000 });
    assert.match(await page.textContent('#error'), /403 Forbidden/);
    assert.match(await page.textContent('#error .error-message'), /expired/);
    assert.match(await page.textContent('#error .error-advice'), /disabled or expired/);
    await page.close();
  });

  test('over the rate limit shows when to send again', { skip: afrHomeKnown() ? false : 'needs AFR_HOME (creates a key)' }, async () => {
    const limited = await newKey('web-rpm1', ['--rpm', '1']);
    await waitForKey(limited); // the key's one request of this minute
    const page = await browser.newPage();
    await page.goto(`${origin}/playground/`);
    await page.fill('#api-key', limited);
    await sendMessage(page, 'One more?');
    await page.waitForSelector('#error:not([hidden])', { timeout: 10000 });
    assert.match(await page.textContent('#error'), /429 Too Many Requests/);
    assert.match(await page.textContent('#error .error-advice'), /You can send again in \d+ s \(at /);
    assert.equal(await page.textContent('#rl-limit'), '1');
    assert.equal(await page.textContent('#rl-remaining'), '0');
    await page.close();
  });

  test('a key with tpm and a budget shows its token headers and remaining budget', { skip: afrHomeKnown() ? false : 'needs AFR_HOME (creates a key)' }, async () => {
    const key = await newKey('web-tokens', ['--tpm', '100000', '--budget-usd', '5', '--budget-per', 'month']);
    await waitForKey(key);
    const page = await browser.newPage();
    await page.goto(`${origin}/playground/`);
    assert.equal(await page.textContent('#rl-tokens-limit'), '—');
    await page.fill('#api-key', key);
    await sendMessage(page, 'Count my tokens?');
    await page.waitForFunction(() => /^\d+$/.test(document.querySelector('#rl-tokens-remaining').textContent), null, { timeout: 30000 });
    assert.equal(await page.textContent('#rl-tokens-limit'), '100000');
    assert.ok(Number(await page.textContent('#rl-tokens-remaining')) < 100000, 'the request reserved tokens');
    assert.match(await page.textContent('#rl-tokens-reset'), /^(\d+ms|(\d+h)?(\d+m)?\d+s)$/);
    assert.match(await page.textContent('#rl-budget'), /^\$\d+\.\d{6}$/);
    await page.close();
  });

  test('an error event mid-stream shows the error and keeps the partial reply', async (t) => {
    const mock = mockOrigin();
    if (!mock) {
      t.skip('mock provider address unknown (AFR_WEB_URL mode, or no sidecar.toml)');
      return;
    }
    const config = async (knobs) => {
      const res = await fetch(`${mock}/_mock/config`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(knobs),
      });
      assert.ok(res.ok, `POST /_mock/config: ${res.status}`);
    };
    const { page, problems } = await playgroundWithKey(key);
    const before = await (await fetch(`${mock}/_mock/config`)).json();
    await config({ ...before, error_after_chunks: 3 });
    try {
      await sendMessage(page, SHORT_MESSAGE);
      await page.waitForFunction(() => {
        const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
        return m && !['waiting', 'streaming'].includes(m.dataset.state);
      }, null, { timeout: 15000 });
    } finally {
      await config(before);
    }
    const reply = await lastReply(page);
    assert.equal(reply.state, 'error');
    assert.ok(reply.text.length > 0, 'the deltas before the error stay visible');
    assert.match(reply.note, /Incomplete/);
    assert.ok(await page.isVisible('#error'));
    assert.match(await page.textContent('#error'), /The stream failed/);
    assert.ok((await page.textContent('#error .error-message')).length > 0);
    assert.match(await page.textContent('#error .error-advice'), /incomplete/);
    assert.deepEqual(problems, []);
    await page.close();
  });

  test('Stop ends a long stream', async () => {
    const { page, problems } = await playgroundWithKey(key);
    await watchReply(page);
    await sendMessage(page, LONG_MESSAGE);
    await page.waitForFunction(() => {
      const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
      return m && m.dataset.state === 'streaming' && m.querySelector('.content').textContent.length > 0;
    }, null, { timeout: 15000 });
    // A few words in, still far from the end of the 400-word reply.
    await page.waitForFunction(() => {
      const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
      return m.querySelector('.content').textContent.length > 40;
    }, null, { timeout: 15000 });
    await page.screenshot({ path: path.join(ARTIFACTS, 'playground-streaming.png'), fullPage: true });
    assert.equal((await lastReply(page)).state, 'streaming', 'screenshot taken mid-stream');
    await page.click('#stop');
    await page.waitForFunction(() => {
      const m = [...document.querySelectorAll('#conversation .msg.assistant')].pop();
      return m.dataset.state !== 'streaming';
    }, null, { timeout: 5000 });
    const stopped = await lastReply(page);
    assert.equal(stopped.state, 'stopped', 'the stream must end by Stop, not by itself');
    assert.equal(stopped.note, 'Stopped.');
    assert.ok(await page.isEnabled('#send'));
    assert.ok(await page.isDisabled('#stop'));
    // Nothing more arrives after Stop.
    await page.waitForTimeout(500);
    assert.equal((await lastReply(page)).text, stopped.text);
    // And the gateway cancelled the upstream request (the mock saw the client go).
    const mock = mockOrigin();
    if (mock) {
      let outcome = null;
      for (let i = 0; i < 30 && outcome !== 'client_disconnected'; i++) {
        const log = await (await fetch(`${mock}/_mock/requests`)).json();
        const streams = log.requests.filter((r) => r.stream && JSON.stringify(r.body).includes('word399'));
        outcome = streams.length ? streams[streams.length - 1].outcome : null;
        if (outcome !== 'client_disconnected') await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(outcome, 'client_disconnected', 'Stop must cancel the upstream stream');
    }
    assert.deepEqual(problems, []);
    await page.close();
  });
});
