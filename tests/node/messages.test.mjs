// The official Anthropic TypeScript SDK (@anthropic-ai/sdk) against the whole gateway
// on /v1/messages: nginx takes the key from x-api-key, the sidecar translates the
// Messages API for the quickstart's OpenAI-speaking mock and back, streams and tool
// use included. (The Anthropic passthrough is covered by tests/e2e/test_messages.py.)
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import Anthropic from '@anthropic-ai/sdk';
import { startGateway } from './stack.mjs';

let gw;
let key;
const client = (apiKey = key) => new Anthropic({ baseURL: gw.base, apiKey, maxRetries: 0, timeout: 20_000 });
const weather = {
  name: 'get_weather',
  description: 'Current weather at a location',
  input_schema: { type: 'object', properties: { location: { type: 'string' } }, required: ['location'] },
};

before(async () => {
  gw = await startGateway();
  key = await gw.newKey(`node-msg-${Date.now() % 1e8}`, '--rpm', '1000');
});
after(() => gw?.stop());

test('messages.create with a system prompt', async () => {
  const msg = await client().messages.create({
    model: 'gpt-4o-mini',
    max_tokens: 200,
    system: 'You are a helpful assistant.',
    messages: [{ role: 'user', content: 'Say hello from Node.' }],
  });
  assert.equal(msg.type, 'message');
  assert.equal(msg.content[0].text, 'Mock reply to: Say hello from Node.');
  assert.equal(msg.stop_reason, 'end_turn');
  assert.equal(msg.usage.input_tokens, 1 + 5 + 1 + 4);
  assert.equal(msg.usage.output_tokens, 7);
});

test('messages.stream: text deltas, final message, X-RateLimit headers', async () => {
  const stream = client().messages.stream({
    model: 'gpt-4o-mini',
    max_tokens: 200,
    messages: [{ role: 'user', content: 'stream to Node' }],
  });
  let text = '';
  stream.on('text', (t) => (text += t));
  const final = await stream.finalMessage();
  assert.equal(text, 'Mock reply to: stream to Node');
  assert.equal(final.usage.output_tokens, 6);
  const { response } = await client()
    .messages.create({ model: 'gpt-4o-mini', max_tokens: 50, messages: [{ role: 'user', content: 'hi' }], stream: true })
    .withResponse();
  assert.equal(response.headers.get('x-ratelimit-limit'), '1000');
  assert.ok(Number(response.headers.get('x-ratelimit-remaining')) < 1000);
});

test('messages.stream with a tool use', async () => {
  const stream = client().messages.stream({
    model: 'gpt-4o-mini',
    max_tokens: 200,
    tools: [weather],
    messages: [{ role: 'user', content: 'Paris' }],
  });
  const final = await stream.finalMessage();
  assert.equal(final.stop_reason, 'tool_use');
  const call = final.content.find((b) => b.type === 'tool_use');
  assert.equal(call.name, 'get_weather');
  assert.deepEqual(call.input, { location: 'Paris' });
});

test('messages.countTokens', async () => {
  const counted = await client().messages.countTokens({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Hello, Claude' }],
  });
  // An OpenAI-compatible route cannot count: the gateway's estimate (afr-core/src/estimate.rs),
  // every key and string of the messages at a quarter token a character, plus 8 of framing.
  const units = 'role'.length + 'user'.length + 'content'.length + 'Hello, Claude'.length;
  assert.equal(counted.input_tokens, Math.ceil(units / 4) + 8);
});

test('typed errors: AuthenticationError, BadRequestError, RateLimitError', async () => {
  const ask = { model: 'gpt-4o-mini', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] };
  await assert.rejects(
    client('afr_' + 'Z'.repeat(40)).messages.create(ask),
    (e) => e instanceof Anthropic.AuthenticationError && e.status === 401 && e.error.error.type === 'authentication_error',
  );
  await assert.rejects(
    client().messages.create({ ...ask, model: 'no-such-model' }),
    (e) => e instanceof Anthropic.BadRequestError && e.error.error.type === 'invalid_request_error',
  );
  const limited = await gw.newKey(`node-msg-rl-${Date.now() % 1e8}`, '--rpm', '1');
  await assert.rejects(
    (async () => {
      // newKey's readiness probe may have used the one request already.
      for (let i = 0; i < 2; i++) await client(limited).messages.create(ask);
    })(),
    (e) => e instanceof Anthropic.RateLimitError && Number(e.headers.get('retry-after')) >= 1,
  );
});
