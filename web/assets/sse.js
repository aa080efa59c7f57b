// Server-Sent Events decoding for the playground, in the browser with no dependency.
//
// Hand-written because the browser's EventSource cannot POST or send an
// Authorization header. It follows the rules the official OpenAI SDKs apply
// (tests/fixtures/openai-sdk-error-mapping.md §2): lines end in \n, \r\n or \r;
// lines starting with ":" are comments; one space after "field:" is stripped;
// several data lines join with "\n"; an event is dispatched only at a blank line.

/** Incremental SSE decoder: feed it text as it arrives, get whole events back. */
export class SseDecoder {
  constructor() {
    this.buffer = '';
    this.data = [];
    this.event = null;
  }

  /**
   * Decodes the next piece of the stream. Returns the events completed by it,
   * each `{event, data}` (`event` is null when the stream sent no `event:` line).
   */
  push(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) break;
      // A lone \r at the very end may be the first half of \r\n: wait for more.
      if (m[0] === '\r' && m.index === this.buffer.length - 1) break;
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      const ev = this.line(line);
      if (ev) events.push(ev);
    }
    return events;
  }

  /** Ends the stream. An event with no blank line after it is dropped, as the SDKs do. */
  end() {
    this.buffer = '';
    this.data = [];
    this.event = null;
    return [];
  }

  line(line) {
    if (line === '') {
      if (this.data.length === 0 && this.event === null) return null;
      const ev = { event: this.event, data: this.data.join('\n') };
      this.data = [];
      this.event = null;
      return ev;
    }
    if (line.startsWith(':')) return null;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.event = value;
    return null;
  }
}

/**
 * Turns decoded events of a chat.completion stream into what the playground shows:
 * `{type:'done'}`, `{type:'error', error}`, or `{type:'chunk', content, usage, finishReason}`.
 * Throws SyntaxError on data that is not JSON, like the SDKs.
 */
export function interpretChatEvent(ev) {
  if (ev.data === '[DONE]') return { type: 'done' };
  const json = JSON.parse(ev.data);
  if (json && typeof json === 'object' && json.error) {
    return { type: 'error', error: json.error };
  }
  if (ev.event === 'error') {
    return { type: 'error', error: { message: 'An error occurred during streaming' } };
  }
  const choice = Array.isArray(json?.choices) ? json.choices[0] : undefined;
  return {
    type: 'chunk',
    content: typeof choice?.delta?.content === 'string' ? choice.delta.content : '',
    finishReason: choice?.finish_reason ?? null,
    usage: json?.usage ?? null,
    model: json?.model ?? null,
  };
}

/**
 * Turns decoded events of a Responses API stream into the same items as
 * `interpretChatEvent`: text deltas are content, `response.completed` (or
 * `.incomplete`) ends the reply with its usage, `error` and `response.failed` are errors.
 * Throws SyntaxError on data that is not JSON, like the SDKs.
 */
export function interpretResponsesEvent(ev) {
  const json = JSON.parse(ev.data);
  const kind = json?.type ?? ev.event;
  if (kind === 'error') {
    return { type: 'error', error: json?.error ?? { message: json?.message ?? 'An error occurred during streaming' } };
  }
  if (kind === 'response.failed') {
    return { type: 'error', error: json?.response?.error ?? { message: 'The response failed' } };
  }
  if (kind === 'response.completed' || kind === 'response.incomplete') {
    const u = json?.response?.usage;
    const usage = u ? { prompt_tokens: u.input_tokens, completion_tokens: u.output_tokens, total_tokens: u.total_tokens } : null;
    return { type: 'done', usage };
  }
  return {
    type: 'chunk',
    content: kind === 'response.output_text.delta' && typeof json.delta === 'string' ? json.delta : '',
    finishReason: null,
    usage: null,
    model: json?.response?.model ?? null,
  };
}
