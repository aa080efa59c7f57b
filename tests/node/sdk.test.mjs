// The official `openai` Node SDK against the whole gateway (nginx -> module -> sidecar
// -> mock): the seed's examples, typed errors and rate-limit headers.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startGateway } from './stack.mjs';

let gw;
let key;
const messages = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Say hello from Node.' },
];
const client = (apiKey = key) => new OpenAI({ baseURL: `${gw.base}/v1`, apiKey, maxRetries: 0, timeout: 20_000 });

before(async () => {
  gw = await startGateway();
  key = await gw.newKey(`node-${Date.now() % 1e8}`, '--rpm', '1000');
});
after(() => gw?.stop());

test('chat.completions.create with system + user, temperature, max_tokens', async () => {
  const completion = await client().chat.completions.create({
    model: 'gpt-4o-mini',
    messages,
    temperature: 0.7,
    max_tokens: 200,
  });
  assert.equal(completion.choices[0].message.content, 'Mock reply to: Say hello from Node.');
  assert.equal(completion.usage.prompt_tokens, 1 + 5 + 1 + 4);
  assert.equal(completion.usage.completion_tokens, 7);
});

test('for await streaming loop prints the reply chunk by chunk', async () => {
  const stream = await client().chat.completions.create({ model: 'gpt-5-mini', messages, stream: true });
  let out = '';
  let deltas = 0;
  for await (const chunk of stream) {
    const piece = chunk.choices[0]?.delta?.content ?? '';
    if (piece) deltas += 1;
    out += piece;
  }
  assert.equal(out, 'Mock reply to: Say hello from Node.');
  assert.equal(deltas, 7);
});

test('models.list shows the default models with tiers', async () => {
  const models = [];
  for await (const m of client().models.list()) models.push(m);
  const tiers = Object.fromEntries(models.map((m) => [m.id, m.tier]));
  assert.deepEqual(tiers, {
    'gpt-5-mini': 'Fast',
    'gpt-4o-mini': 'Smart',
    'gpt-5-chat': 'Pro',
    'text-embedding-3-small': 'Fast',
  });
});

test('typed errors: BadRequestError, AuthenticationError, RateLimitError', async () => {
  await assert.rejects(
    client().chat.completions.create({ model: 'gpt-4o-mini', messages, temperature: 5 }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'temperature',
  );
  await assert.rejects(
    client('afr_' + 'Z'.repeat(40)).chat.completions.create({ model: 'gpt-4o-mini', messages }),
    (e) => e instanceof OpenAI.AuthenticationError && e.status === 401,
  );
  const limited = await gw.newKey(`node-rl-${Date.now() % 1e8}`, '--rpm', '1');
  await assert.rejects(
    client(limited).chat.completions.create({ model: 'gpt-4o-mini', messages }),
    (e) =>
      e instanceof OpenAI.RateLimitError &&
      e.headers.get('x-ratelimit-remaining') === '0' &&
      Number(e.headers.get('retry-after')) >= 1,
  );
});

test('X-RateLimit headers via withResponse on a stream', async () => {
  const { data: stream, response } = await client()
    .chat.completions.create({ model: 'gpt-4o-mini', messages, stream: true })
    .withResponse();
  assert.equal(response.headers.get('x-ratelimit-limit'), '1000');
  assert.ok(Number(response.headers.get('x-ratelimit-remaining')) < 1000);
  assert.ok(Number(response.headers.get('x-ratelimit-reset')) > Date.now() / 1000 - 1);
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  assert.ok(text.startsWith('Mock reply to:'));
});
