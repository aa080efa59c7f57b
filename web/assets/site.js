// Shared behaviour of every page: the base URL of this host in examples, copy buttons,
// example-language tabs, and the two things Docs and Playground both need from the
// gateway (the API key the reader pasted, and GET /v1/models).

/** The OpenAI base URL of the gateway that served this page. */
export function baseUrl() {
  return `${location.origin}/v1`;
}

// The key lives in this tab's sessionStorage only: never in a URL, a cookie or a log,
// and gone when the tab closes. Docs and Playground share it within the tab.
const KEY_SLOT = 'afr-api-key';

/** The API key pasted in this tab, or "". */
export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_SLOT) || '';
  } catch {
    return '';
  }
}

/** Remember (or, with "", forget) the API key for this tab. */
export function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_SLOT, key);
    else sessionStorage.removeItem(KEY_SLOT);
  } catch {
    // Storage disabled: the key stays in the page's memory only.
  }
}

/** Keys are `afr_` followed by at least 32 base62 characters (design §3). */
export function looksLikeKey(key) {
  return /^afr_[A-Za-z0-9]{32,}$/.test(key);
}

/** The default catalogue (design §3), shown until a live list is fetched. */
export const DEFAULT_MODELS = [
  { id: 'gpt-5-mini', tier: 'Fast', description: 'Fastest response, best for simple tasks' },
  { id: 'gpt-4o-mini', tier: 'Smart', description: 'Best balance of speed and intelligence' },
  { id: 'gpt-5-chat', tier: 'Pro', description: 'Most capable model for complex reasoning' },
];

/** An HTTP failure from the gateway, carrying the OpenAI error body and headers. */
export class GatewayError extends Error {
  constructor(status, error, headers) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.error = error || null;
    this.headers = headers || new Headers();
  }
}

/** Reads an OpenAI error body (`{"error":{…}}`) from a failed response. */
export async function readError(res) {
  let error = null;
  try {
    const body = await res.json();
    error = body && typeof body === 'object' ? body.error || body : null;
  } catch {
    // Not JSON (e.g. an HTML error page from a proxy in front of the gateway).
  }
  return new GatewayError(res.status, error, res.headers);
}

/**
 * GET /v1/models with the given key. Resolves to `[{id, tier, description, owned_by, kind}]`;
 * rejects with a GatewayError on an HTTP error.
 */
export async function fetchModels(key, signal) {
  const res = await fetch('/v1/models', {
    headers: { Authorization: `Bearer ${key}` },
    signal,
  });
  if (!res.ok) throw await readError(res);
  const body = await res.json();
  const data = Array.isArray(body?.data) ? body.data : [];
  return data.map((m) => ({
    id: String(m.id),
    tier: m.tier ?? m.metadata?.tier ?? '',
    description: m.description ?? m.metadata?.description ?? '',
    owned_by: m.owned_by ?? '',
    kind: m.kind ?? 'chat',
  }));
}

/**
 * Seconds to wait before retrying: Retry-After when the gateway sent it (exact for a 429,
 * since the window slides), else the time until X-RateLimit-Reset.
 */
export function retryAfterSeconds(headers, now = Date.now()) {
  const retryAfter = headers.get('Retry-After');
  if (retryAfter !== null && retryAfter.trim() !== '' && !Number.isNaN(Number(retryAfter))) {
    return Math.max(0, Math.ceil(Number(retryAfter)));
  }
  const reset = Number(headers.get('X-RateLimit-Reset'));
  if (Number.isFinite(reset) && reset > 0) {
    return Math.max(0, Math.ceil(reset - now / 1000));
  }
  return null;
}

/**
 * What the reader should do about an error, in one sentence, per design §3.
 * `err` is a GatewayError (HTTP status) or an error event received mid-stream.
 */
export function adviceFor(err) {
  const wait = err.headers ? retryAfterSeconds(err.headers) : null;
  switch (err.status) {
    case 400: {
      const param = err.error?.param;
      return param
        ? `Fix the request field "${param}" and send again.`
        : 'Fix the request (JSON, required fields, value ranges, model) and send again.';
    }
    case 401:
      return 'Check your API key: it must be the whole afr_… secret your operator gave you, sent as "Authorization: Bearer afr_…".';
    case 403:
      return 'This key is disabled or expired (the message says which). Ask the operator of this gateway to re-enable or renew it.';
    case 413:
      return 'The request is too large for the gateway. Shorten the conversation (or clear it) and send again.';
    case 429: {
      if (wait === null) return 'Rate limit reached for this key. Wait a little and send again.';
      const at = new Date(Date.now() + wait * 1000).toLocaleTimeString();
      return `Rate limit reached for this key. You can send again in ${wait} s (at ${at}).`;
    }
    case 500:
      return 'Every provider for this model failed. Try again in a moment or pick another model.';
    case 503:
      return wait === null
        ? 'The gateway has no provider available right now. Retry in a little while.'
        : `The gateway has no provider available right now. Retry after ${wait} s.`;
    default:
      if (err.status === undefined || err.status === 0) {
        return 'The provider failed while streaming: the reply above is incomplete. Send the message again.';
      }
      return 'Unexpected response from the gateway.';
  }
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain-HTTP hosts other than localhost have no Clipboard API.
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.style.position = 'fixed';
  area.style.opacity = '0';
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('copy refused');
}

/** Puts a copy button on every `pre` in the page (wrapping it in `.code`). */
function addCopyButtons(root = document) {
  for (const pre of root.querySelectorAll('pre')) {
    if (pre.parentElement?.classList.contains('code')) continue;
    const wrap = document.createElement('div');
    wrap.className = 'code';
    pre.replaceWith(wrap);
    wrap.append(pre);
    pre.tabIndex = 0; // scrollable code must be reachable by keyboard
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'copy-btn';
    btn.textContent = 'Copy';
    const label = pre.getAttribute('aria-label') || pre.dataset.lang || 'example';
    btn.setAttribute('aria-label', `Copy ${label}`);
    btn.addEventListener('click', async () => {
      try {
        await copyText(pre.textContent);
        btn.textContent = 'Copied';
      } catch {
        btn.textContent = 'Select & copy';
        const range = document.createRange();
        range.selectNodeContents(pre);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
      }
      setTimeout(() => { btn.textContent = 'Copy'; }, 1500);
    });
    wrap.append(btn);
  }
}

/**
 * Example-language tabs (WAI-ARIA tabs pattern). Markup is `<div class="tabs">` holding one
 * `pre[data-lang]` per language, readable stacked without JavaScript; this builds the tab
 * list. Click or arrow keys switch, and the choice applies to every tab set on the page.
 */
function setUpTabs() {
  const LANG_NAMES = { curl: 'curl', js: 'JavaScript', python: 'Python', sse: 'Raw stream' };
  const sets = [...document.querySelectorAll('.tabs')];
  sets.forEach((set, n) => {
    const list = document.createElement('div');
    list.setAttribute('role', 'tablist');
    list.setAttribute('aria-label', set.dataset.label || 'Example language');
    for (const pre of set.querySelectorAll(':scope > pre[data-lang]')) {
      const lang = pre.dataset.lang;
      const panel = document.createElement('div');
      panel.id = `tabs-${n}-${lang}`;
      panel.setAttribute('role', 'tabpanel');
      pre.replaceWith(panel);
      panel.append(pre);
      const tab = document.createElement('button');
      tab.type = 'button';
      tab.id = `${panel.id}-tab`;
      tab.dataset.lang = lang;
      tab.setAttribute('role', 'tab');
      tab.setAttribute('aria-controls', panel.id);
      panel.setAttribute('aria-labelledby', tab.id);
      tab.textContent = LANG_NAMES[lang] || lang;
      list.append(tab);
    }
    set.prepend(list);
  });
  const selectIn = (set, lang, focus) => {
    for (const tab of set.querySelectorAll('[role="tab"]')) {
      const on = tab.dataset.lang === lang;
      tab.setAttribute('aria-selected', String(on));
      tab.tabIndex = on ? 0 : -1;
      document.getElementById(tab.getAttribute('aria-controls')).hidden = !on;
      if (on && focus) tab.focus();
    }
  };
  const select = (lang, focusIn) => {
    for (const set of sets) {
      // A set without this language keeps its current choice.
      if (set.querySelector(`[role="tab"][data-lang="${lang}"]`)) selectIn(set, lang, set === focusIn);
    }
  };
  for (const set of sets) {
    const tabs = [...set.querySelectorAll('[role="tab"]')];
    tabs.forEach((tab, i) => {
      tab.addEventListener('click', () => select(tab.dataset.lang));
      tab.addEventListener('keydown', (e) => {
        let next = null;
        if (e.key === 'ArrowRight') next = tabs[(i + 1) % tabs.length];
        else if (e.key === 'ArrowLeft') next = tabs[(i - 1 + tabs.length) % tabs.length];
        else if (e.key === 'Home') next = tabs[0];
        else if (e.key === 'End') next = tabs[tabs.length - 1];
        if (next) {
          e.preventDefault();
          select(next.dataset.lang, set);
        }
      });
    });
    selectIn(set, tabs[0].dataset.lang, false);
  }
}

/** Fills `[data-base-url]` and `[data-origin]` with this host's addresses. */
function fillHostAddresses() {
  for (const el of document.querySelectorAll('[data-base-url]')) el.textContent = baseUrl();
  for (const el of document.querySelectorAll('[data-origin]')) el.textContent = location.origin;
}

/** Labels each cell of a table with a header row with its column, for narrow screens. */
export function labelTableCells(root = document) {
  for (const table of root.querySelectorAll('table')) {
    const heads = [...table.querySelectorAll('thead th')].map((th) => th.textContent.trim());
    if (!heads.length) continue;
    table.classList.add('stack');
    for (const tr of table.querySelectorAll('tbody tr')) {
      [...tr.children].forEach((td, i) => {
        if (heads[i]) td.dataset.label = heads[i];
      });
    }
  }
}

fillHostAddresses();
setUpTabs();
addCopyButtons();
labelTableCells();
