// The official `openai` Node SDK on /v1/embeddings, /v1/completions and /v1/responses
// through the whole gateway (nginx -> module -> sidecar -> mock): float and base64
// embeddings, plain and streamed completions, responses.create, responses.stream with text
// deltas and with a function call, and a follow-up with previous_response_id.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startGateway } from './stack.mjs';

let gw;
let key;
const EMBED = 'text-embedding-3-small';
const client = () => new OpenAI({ baseURL: `${gw.base}/v1`, apiKey: key, maxRetries: 0, timeout: 20_000 });

before(async () => {
  gw = await startGateway();
  key = await gw.newKey(`node-ep-${Date.now() % 1e8}`, '--rpm', '1000');
});
after(() => gw?.stop());

test('embeddings.create: float, and base64 (the SDK default) decoded to floats', async () => {
  const floats = await client().embeddings.create({ model: EMBED, input: 'Hello, world!', encoding_format: 'float' });
  assert.equal(floats.object, 'list');
  assert.equal(floats.data[0].embedding.length, 1536);
  const packed = await client().embeddings.create({ model: EMBED, input: ['Hello, world!', 'again'], dimensions: 64 });
  assert.deepEqual(packed.data.map((d) => d.embedding.length), [64, 64]);
  assert.ok(packed.data[0].embedding.every((x) => typeof x === 'number'));
  assert.equal(packed.usage.prompt_tokens, 3);
});

test('completions.create: plain and streaming', async () => {
  const plain = await client().completions.create({ model: 'gpt-4o-mini', prompt: 'Tell me a joke' });
  assert.equal(plain.object, 'text_completion');
  assert.equal(plain.choices[0].text, 'Mock reply to: Tell me a joke');
  const stream = await client().completions.create({ model: 'gpt-4o-mini', prompt: 'Tell me a joke', stream: true });
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.text ?? '';
  assert.equal(text, 'Mock reply to: Tell me a joke');
});

test('responses.create, responses.stream with text deltas, and a follow-up', async () => {
  const first = await client().responses.create({ model: 'gpt-5-mini', input: 'Say hi' });
  assert.equal(first.output_text, 'Mock reply to: Say hi');
  const stream = client().responses.stream({ model: 'gpt-5-mini', input: 'Say hi', previous_response_id: first.id });
  const deltas = [];
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta') deltas.push(event.delta);
  }
  const final = await stream.finalResponse();
  assert.equal(deltas.join(''), 'Mock reply to: Say hi');
  assert.equal(final.status, 'completed');
  assert.equal(final.previous_response_id, first.id);
  await assert.rejects(
    client().responses.create({ model: 'gpt-5-mini', input: 'x', previous_response_id: 'resp_unknown' }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === 'previous_response_id',
  );
});

test('responses.stream with a function call', async () => {
  const tools = [{ type: 'function', name: 'get_weather', parameters: { type: 'object', properties: { location: { type: 'string' } } } }];
  const stream = client().responses.stream({ model: 'gpt-4o-mini', input: 'Weather in SF?', tools });
  let args = '';
  for await (const event of stream) {
    if (event.type === 'response.function_call_arguments.delta') args += event.delta;
  }
  const final = await stream.finalResponse();
  assert.deepEqual(JSON.parse(args), { location: 'San Francisco, CA' });
  assert.equal(final.output[0].type, 'function_call');
  assert.equal(final.output[0].name, 'get_weather');
});
