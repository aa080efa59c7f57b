// Playground: a multi-turn chat against this gateway, streamed with fetch + ReadableStream,
// through Chat Completions or the Responses API (the `API` setting).
//
// fetch rather than EventSource because EventSource can neither POST nor send an
// Authorization header. The key stays in memory and this tab's sessionStorage; it is
// never put in a URL and never logged.

import {
  DEFAULT_MODELS, GatewayError, adviceFor, fetchModels, readError, storedKey, storeKey,
} from './site.js';
import { SseDecoder, interpretChatEvent, interpretResponsesEvent } from './sse.js';

const $ = (id) => document.getElementById(id);
const el = {
  key: $('api-key'),
  toggleKey: $('toggle-key'),
  forgetKey: $('forget-key'),
  model: $('model'),
  api: $('api'),
  reloadModels: $('reload-models'),
  modelsStatus: $('models-status'),
  system: $('system-prompt'),
  tempRange: $('temperature-range'),
  temp: $('temperature'),
  maxTokens: $('max-tokens'),
  conversation: $('conversation'),
  error: $('error'),
  announce: $('announce'),
  composer: $('composer'),
  message: $('message'),
  send: $('send'),
  stop: $('stop'),
  clear: $('clear'),
  status: $('stat-status'),
  latency: $('stat-latency'),
  ttft: $('stat-ttft'),
  tokens: $('stat-tokens'),
  rlLimit: $('rl-limit'),
  rlRemaining: $('rl-remaining'),
  rlReset: $('rl-reset'),
  rlTokensLimit: $('rl-tokens-limit'),
  rlTokensRemaining: $('rl-tokens-remaining'),
  rlTokensReset: $('rl-tokens-reset'),
  rlBudget: $('rl-budget'),
};

const STATUS_TEXT = {
  400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 413: 'Payload Too Large', 429: 'Too Many Requests',
  500: 'Internal Server Error', 502: 'Bad Gateway', 503: 'Service Unavailable', 504: 'Gateway Timeout',
};

/** The conversation sent with each request: `{role, content}` of user and assistant turns. */
let history = [];
/** The AbortController of the request in flight, if any. */
let inflight = null;
let resetTimer = null;
/** Bumped by Clear, so a request still finishing does not write into the new conversation. */
let epoch = 0;

// ---------- settings ----------

function currentKey() {
  return el.key.value.trim();
}

function fillModels(allModels, selected) {
  // The playground chats: embedding models (kind "embedding") are not offered.
  const models = allModels.filter((m) => !m.kind || m.kind === 'chat');
  const keep = selected || el.model.value;
  el.model.replaceChildren(...models.map((m) => {
    const opt = document.createElement('option');
    opt.value = m.id;
    opt.textContent = m.tier ? `${m.id} (${m.tier})` : m.id;
    if (m.description) opt.title = m.description;
    return opt;
  }));
  if (models.some((m) => m.id === keep)) el.model.value = keep;
}

let modelsRequest = null;
async function loadModels() {
  const key = currentKey();
  if (!key) {
    el.modelsStatus.textContent = 'Default catalogue. Enter your key to load this gateway\'s models.';
    return;
  }
  modelsRequest?.abort();
  const ctrl = new AbortController();
  modelsRequest = ctrl;
  el.modelsStatus.textContent = 'Loading models…';
  try {
    const models = await fetchModels(key, ctrl.signal);
    fillModels(models);
    el.model.dataset.source = 'live';
    el.modelsStatus.textContent = `${models.length} model${models.length === 1 ? '' : 's'} available to this key.`;
  } catch (err) {
    if (err.name === 'AbortError') return;
    el.modelsStatus.textContent = err instanceof GatewayError
      ? `Could not load models (${err.status}). See the error below.`
      : 'Could not reach the gateway to load models.';
    if (err instanceof GatewayError) {
      showRateLimit(err.headers);
      showError(err);
    }
  } finally {
    if (modelsRequest === ctrl) modelsRequest = null;
  }
}

function syncTemperature(from, to) {
  to.value = from.value;
}

/** Reads and checks the numeric settings against the contract's ranges (design §3). */
function readParams() {
  const temperature = Number(el.temp.value);
  if (el.temp.value.trim() === '' || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
    return { problem: 'Temperature must be a number from 0.0 to 2.0.', field: el.temp };
  }
  const raw = el.maxTokens.value.trim();
  let maxTokens = null;
  if (raw !== '') {
    maxTokens = Number(raw);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      return { problem: 'Max tokens must be a positive whole number (or empty for the default, 4096).', field: el.maxTokens };
    }
  }
  return { temperature, maxTokens };
}

// ---------- display ----------

function showProblem(text, field) {
  el.error.replaceChildren();
  const p = document.createElement('p');
  p.textContent = text;
  el.error.append(p);
  el.error.hidden = false;
  field?.focus();
}

/** Shows an OpenAI error (HTTP status or mid-stream event) with what to do about it. */
function showError(err) {
  el.error.replaceChildren();
  const title = document.createElement('p');
  const strong = document.createElement('strong');
  strong.textContent = err.status
    ? `${err.status} ${STATUS_TEXT[err.status] || 'Error'}`
    : 'The stream failed';
  title.append(strong);
  const code = err.error?.code || err.error?.type;
  if (code) title.append(` · ${code}`);
  const message = document.createElement('p');
  message.className = 'error-message';
  message.textContent = err.error?.message || err.message || 'No error message was sent.';
  const advice = document.createElement('p');
  advice.className = 'error-advice';
  advice.textContent = `What to do: ${adviceFor(err)}`;
  el.error.append(title, message, advice);
  el.error.hidden = false;
}

function hideError() {
  el.error.hidden = true;
  el.error.replaceChildren();
}

function fmtMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function showRateLimit(headers) {
  showTokensAndBudget(headers);
  const limit = headers.get('X-RateLimit-Limit');
  const remaining = headers.get('X-RateLimit-Remaining');
  const reset = headers.get('X-RateLimit-Reset');
  el.rlLimit.textContent = limit ?? '— (not sent)';
  el.rlRemaining.textContent = remaining ?? '— (not sent)';
  clearInterval(resetTimer);
  if (reset === null) {
    el.rlReset.textContent = '— (not sent)';
    return;
  }
  const at = Number(reset);
  const render = () => {
    const left = Math.max(0, Math.ceil(at - Date.now() / 1000));
    const when = Number.isFinite(at) ? new Date(at * 1000).toLocaleTimeString() : '?';
    el.rlReset.textContent = `${reset} (${when}, in ${left} s)`;
    if (left === 0) clearInterval(resetTimer);
  };
  render();
  resetTimer = setInterval(render, 1000);
}

/**
 * OpenAI's token headers and the gateway's remaining budget: sent only for keys with a
 * `tpm` or a `budget`, so "no limit" stands where they are absent.
 */
function showTokensAndBudget(headers) {
  const none = 'no limit';
  el.rlTokensLimit.textContent = headers.get('x-ratelimit-limit-tokens') ?? none;
  el.rlTokensRemaining.textContent = headers.get('x-ratelimit-remaining-tokens') ?? none;
  el.rlTokensReset.textContent = headers.get('x-ratelimit-reset-tokens') ?? none;
  const budget = headers.get('x-afr-budget-remaining-usd');
  el.rlBudget.textContent = budget === null ? none : `$${budget}`;
}

function addMessage(role, text) {
  el.conversation.querySelector('.empty')?.remove();
  const wrap = document.createElement('div');
  wrap.className = `msg ${role}`;
  const label = document.createElement('div');
  label.className = 'role';
  label.textContent = role === 'user' ? 'You' : 'Assistant';
  const content = document.createElement('div');
  content.className = 'content';
  const textNode = document.createTextNode(text);
  content.append(textNode);
  wrap.append(label, content);
  el.conversation.append(wrap);
  el.conversation.scrollTop = el.conversation.scrollHeight;
  return { wrap, textNode };
}

function noteOn(wrap, text) {
  const note = document.createElement('div');
  note.className = 'note';
  note.textContent = text;
  wrap.append(note);
}

function setBusy(busy) {
  el.send.disabled = busy;
  el.stop.disabled = !busy;
  el.composer.setAttribute('aria-busy', String(busy));
}

// ---------- sending ----------

async function send() {
  if (inflight) return;
  hideError();
  const key = currentKey();
  if (!key) {
    showProblem('Paste your API key (afr_…) in Settings first.', el.key);
    return;
  }
  const text = el.message.value.trim();
  if (!text) {
    el.message.focus();
    return;
  }
  const params = readParams();
  if (params.problem) {
    showProblem(params.problem, params.field);
    return;
  }
  if (!el.model.value) {
    showProblem('Pick a model first.', el.model);
    return;
  }

  const system = el.system.value.trim();
  const responsesApi = el.api.value === 'responses';
  let body;
  if (responsesApi) {
    // The whole conversation goes as `input` (store-free): nothing depends on
    // a response stored at one provider, so any route can serve each turn.
    body = {
      model: el.model.value,
      input: [...history, { role: 'user', content: text }],
      store: false,
      stream: true,
      temperature: params.temperature,
    };
    if (system) body.instructions = system;
    if (params.maxTokens !== null) body.max_output_tokens = params.maxTokens;
  } else {
    const messages = [];
    if (system) messages.push({ role: 'system', content: system });
    messages.push(...history, { role: 'user', content: text });
    body = {
      model: el.model.value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: params.temperature,
    };
    if (params.maxTokens !== null) body.max_tokens = params.maxTokens;
  }
  const interpret = responsesApi ? interpretResponsesEvent : interpretChatEvent;

  const user = addMessage('user', text);
  el.message.value = '';
  const reply = addMessage('assistant', '');
  reply.wrap.classList.add('streaming');
  reply.wrap.dataset.state = 'waiting';

  const ctrl = new AbortController();
  const myEpoch = epoch;
  inflight = ctrl;
  setBusy(true);
  el.status.textContent = 'sending…';
  el.latency.textContent = '…';
  el.ttft.textContent = '…';
  el.tokens.textContent = '…';

  const t0 = performance.now();
  let firstToken = null;
  let usage = null;
  // done | stopped | error (mid-reply) | ended (no [DONE]) | rejected (HTTP error) | unreachable
  let outcome = 'ended';
  let content = '';

  try {
    const res = await fetch(responsesApi ? '/v1/responses' : '/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${key}` },
      body: JSON.stringify(body),
      signal: ctrl.signal,
    });
    showRateLimit(res.headers);
    el.status.textContent = `${res.status} ${STATUS_TEXT[res.status] || res.statusText || ''}`.trim();
    if (!res.ok) throw await readError(res);

    reply.wrap.dataset.state = 'streaming';
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    const decoder = new SseDecoder();
    read: for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const ev of decoder.push(value)) {
        const item = interpret(ev);
        if (item.usage) usage = item.usage;
        if (item.type === 'done') {
          outcome = 'done';
          break read;
        }
        if (item.type === 'error') {
          outcome = 'error';
          showError({ status: undefined, error: item.error });
          break read;
        }
        if (item.content) {
          if (firstToken === null) {
            firstToken = performance.now() - t0;
            el.ttft.textContent = fmtMs(firstToken);
          }
          content += item.content;
          reply.textNode.appendData(item.content);
          el.conversation.scrollTop = el.conversation.scrollHeight;
        }
      }
    }
    if (outcome === 'done') {
      // The answer is complete, but its body may still have bytes to come (a
      // Responses stream's last chunk after `response.completed`): read to the
      // end rather than cancel, which the browser counts as a failed request.
      while (!(await reader.read()).done) { /* nothing more to show */ }
    } else {
      reader.cancel().catch(() => {});
    }
  } catch (err) {
    if (err.name === 'AbortError') {
      outcome = 'stopped';
    } else if (err instanceof GatewayError) {
      outcome = 'rejected';
      showError(err);
    } else if (err instanceof SyntaxError) {
      outcome = 'error';
      showError({ status: undefined, error: { message: `The gateway sent a malformed event: ${err.message}` } });
    } else if (reply.wrap.dataset.state === 'streaming') {
      outcome = 'error';
      showProblem(`The connection to the gateway broke during the reply (${err.message}). The reply is incomplete; send the message again.`);
    } else {
      outcome = 'unreachable';
      el.status.textContent = '— (no response)';
      showProblem(`Could not reach the gateway (${err.message}). Check your connection and that the gateway is running, then send again.`);
    }
  } finally {
    inflight = null;
    setBusy(false);
  }

  const elapsed = performance.now() - t0;
  el.latency.textContent = fmtMs(elapsed);
  if (firstToken === null) el.ttft.textContent = '—';
  el.tokens.textContent = usage
    ? `${usage.prompt_tokens ?? '?'} prompt + ${usage.completion_tokens ?? '?'} completion = ${usage.total_tokens ?? '?'}`
    : '— (no usage reported)';
  reply.wrap.classList.remove('streaming');
  reply.wrap.dataset.state = outcome;
  if (myEpoch !== epoch) return; // cleared meanwhile

  if (outcome === 'rejected' || outcome === 'unreachable') {
    // No reply started: take the turn back so it can be fixed and sent again.
    user.wrap.remove();
    reply.wrap.remove();
    el.message.value = text;
    if (!el.conversation.querySelector('.msg')) resetConversationView();
    el.announce.textContent = outcome === 'rejected' ? 'The request was rejected.' : 'The gateway could not be reached.';
    return;
  }
  history.push({ role: 'user', content: text });
  if (content) history.push({ role: 'assistant', content });
  if (outcome === 'stopped') noteOn(reply.wrap, 'Stopped.');
  else if (outcome === 'error') noteOn(reply.wrap, 'Incomplete: the stream failed (see the error above).');
  else if (outcome === 'ended') noteOn(reply.wrap, 'Incomplete: the stream ended without [DONE].');
  el.announce.textContent = outcome === 'done' ? 'Reply complete.' : `Reply ${outcome}.`;
}

function stop() {
  inflight?.abort();
}

function resetConversationView() {
  const p = document.createElement('p');
  p.className = 'empty';
  p.textContent = 'No messages yet. Type below and press Enter (Shift+Enter for a new line).';
  el.conversation.replaceChildren(p);
}

function clearConversation() {
  epoch += 1;
  stop();
  history = [];
  hideError();
  resetConversationView();
  el.message.focus();
}

// ---------- wiring ----------

fillModels(DEFAULT_MODELS, 'gpt-4o-mini');
el.key.value = storedKey();
if (el.key.value) loadModels();

el.key.addEventListener('change', () => {
  storeKey(currentKey());
  loadModels();
});
el.toggleKey.addEventListener('click', () => {
  const show = el.key.type === 'password';
  el.key.type = show ? 'text' : 'password';
  el.toggleKey.textContent = show ? 'Hide' : 'Show';
  el.toggleKey.setAttribute('aria-pressed', String(show));
});
el.forgetKey.addEventListener('click', () => {
  el.key.value = '';
  storeKey('');
  fillModels(DEFAULT_MODELS, 'gpt-4o-mini');
  el.modelsStatus.textContent = 'Key forgotten. Default catalogue shown.';
  el.key.focus();
});
el.reloadModels.addEventListener('click', loadModels);
el.tempRange.addEventListener('input', () => syncTemperature(el.tempRange, el.temp));
el.temp.addEventListener('input', () => syncTemperature(el.temp, el.tempRange));
document.getElementById('settings').addEventListener('submit', (e) => e.preventDefault());

el.composer.addEventListener('submit', (e) => {
  e.preventDefault();
  send();
});
el.message.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && inflight) {
    e.preventDefault();
    stop();
  }
});
el.stop.addEventListener('click', stop);
el.clear.addEventListener('click', clearConversation);
