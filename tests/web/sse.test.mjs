// The playground's SSE decoder (web/assets/sse.js) against the recorded OpenAI streams in
// tests/fixtures, split at every byte boundary the network could choose.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
// web/ is served as-is to browsers and has no package.json marking it ESM; load the module
// from its source text.
const src = fs.readFileSync(path.join(REPO, 'web/assets/sse.js'), 'utf8');
const { SseDecoder, interpretChatEvent, interpretResponsesEvent } = await import(`data:text/javascript,${encodeURIComponent(src)}`);

function decodeAll(pieces) {
  const d = new SseDecoder();
  const events = [];
  for (const p of pieces) events.push(...d.push(p));
  d.end();
  return events;
}

function replyOf(events) {
  let text = '';
  let usage = null;
  let done = false;
  for (const ev of events) {
    const item = interpretChatEvent(ev);
    if (item.type === 'done') { done = true; break; }
    assert.equal(item.type, 'chunk');
    text += item.content;
    if (item.usage) usage = item.usage;
  }
  return { text, usage, done };
}

for (const name of ['openai-chat-stream.sse', 'openai-chat-stream-no-usage.sse', 'openai-chat-stream-2024-variant.sse']) {
  test(`decodes ${name} whole and split at every offset`, () => {
    const raw = fs.readFileSync(path.join(REPO, 'tests/fixtures', name), 'utf8');
    const whole = replyOf(decodeAll([raw]));
    assert.ok(whole.done, 'ends with [DONE]');
    assert.ok(whole.text.length > 0);
    if (name === 'openai-chat-stream.sse') assert.equal(typeof whole.usage.total_tokens, 'number');
    for (let i = 1; i < raw.length; i += 7) {
      assert.deepEqual(replyOf(decodeAll([raw.slice(0, i), raw.slice(i)])), whole, `split at ${i}`);
    }
    // CRLF line endings, split between \r and \n.
    const crlf = raw.replace(/\n/g, '\r\n');
    const at = crlf.indexOf('\r\n') + 1;
    assert.deepEqual(replyOf(decodeAll([crlf.slice(0, at), crlf.slice(at)])), whole);
  });
}

test('comments, multi-line data and an event without a blank line after it', () => {
  const events = decodeAll([': keep-alive\n\ndata: {"a":\ndata: 1}\n\ndata: {"lost":true}\n']);
  assert.deepEqual(events, [{ event: null, data: '{"a":\n1}' }]);
});

test('a mid-stream error event is reported as an error', () => {
  const [ev] = decodeAll(['data: {"error":{"message":"provider failed","type":"server_error","param":null,"code":"upstream_error"}}\n\n']);
  const item = interpretChatEvent(ev);
  assert.equal(item.type, 'error');
  assert.equal(item.error.message, 'provider failed');
});

test('data that is not JSON throws, as in the SDKs', () => {
  assert.throws(() => interpretChatEvent({ event: null, data: '{oops' }), SyntaxError);
});

test('a recorded Responses stream reads as its text deltas, then done with its usage', () => {
  for (const name of ['openai-responses-stream.sse', 'openai-responses-stream-2026-variant.sse']) {
    const raw = fs.readFileSync(path.join(REPO, 'tests/fixtures', name), 'utf8');
    const items = decodeAll([raw]).map(interpretResponsesEvent);
    const done = items.filter((i) => i.type === 'done');
    assert.equal(done.length, 1, name);
    assert.equal(items[items.length - 1].type, 'done', name);
    assert.ok(done[0].usage.completion_tokens > 0 && done[0].usage.prompt_tokens > 0, name);
    const text = items.map((i) => i.content ?? '').join('');
    assert.ok(text.length > 0, name);
    assert.equal(items.filter((i) => i.type === 'error').length, 0, name);
  }
  const errors = decodeAll([fs.readFileSync(path.join(REPO, 'tests/fixtures/openai-responses-stream-error.sse'), 'utf8')])
    .map(interpretResponsesEvent)
    .filter((i) => i.type === 'error');
  assert.ok(errors.length >= 1 && errors[0].error.message, 'the recorded error event is an error');
});
