// The operator's dashboard (/dashboard/ on the sidecar's admin listener, loopback only):
// every key's spend and the top spenders (/api/usage), errors and latency by provider
// (/api/providers), the breakers' states over the last hour (/api/breakers) and the
// fleet's mode (/api/fleet). Refreshes itself every 30 s.

import {
  count, daySeconds, daysBetween, download, drawChart, fillTable, firstDay, ms, seriesByDay, toCsv, usd, utcDay,
} from './charts.js';

const $ = (id) => document.getElementById(id);
const el = {
  form: $('controls'),
  range: $('range'),
  load: $('load'),
  exportKeys: $('export-keys'),
  exportProviders: $('export-providers'),
  error: $('error'),
  status: $('status'),
  report: $('report'),
  spend: $('total-spend'),
  keys: $('total-keys'),
  requests: $('total-requests'),
  errors: $('total-errors'),
  fleet: $('fleet-mode'),
  chartTop: $('chart-top'),
  chartBreakers: $('chart-breakers'),
  chartErrors: $('chart-errors'),
  chartLatency: $('chart-latency'),
  keysTable: $('keys-table'),
  providersTable: $('providers-table'),
};

/** Keys drawn in the top spenders' chart. */
const TOP = 5;
const REFRESH_MS = 30_000;
const STATES = ['closed', 'half_open', 'open'];

const KEY_COLUMNS = [
  { label: 'Key', csv: 'key_id', value: (r) => r.key_id },
  { label: 'Requests', csv: 'requests', value: (r) => r.requests, show: (r) => count(r.requests), numeric: true },
  { label: 'Prompt tokens', csv: 'prompt_tokens', value: (r) => r.prompt_tokens, show: (r) => count(r.prompt_tokens), numeric: true },
  { label: 'Completion tokens', csv: 'completion_tokens', value: (r) => r.completion_tokens, show: (r) => count(r.completion_tokens), numeric: true },
  { label: 'Total tokens', csv: 'total_tokens', value: (r) => r.total_tokens, show: (r) => count(r.total_tokens), numeric: true },
  { label: 'Cost (USD)', csv: 'cost_usd', value: (r) => r.cost_usd, show: (r) => usd(r.cost_usd), numeric: true },
  { label: 'Unpriced', csv: 'unpriced_requests', value: (r) => r.unpriced_requests, show: (r) => count(r.unpriced_requests), numeric: true },
  { label: 'Errors', csv: 'errors', value: (r) => r.errors, show: (r) => count(r.errors), numeric: true },
];

const PROVIDER_COLUMNS = [
  { label: 'Provider', csv: 'provider', value: (r) => r.provider },
  { label: 'Day', csv: 'day', value: (r) => r.day },
  { label: 'Answers', csv: 'attempts', value: (r) => r.attempts, show: (r) => count(r.attempts), numeric: true },
  { label: 'Errors', csv: 'errors', value: (r) => r.errors, show: (r) => count(r.errors), numeric: true },
  { label: '429 / 5xx', csv: 'provider_errors', value: (r) => r.provider_errors, show: (r) => count(r.provider_errors), numeric: true },
  { label: 'Mean latency', csv: 'latency_avg_ms', value: (r) => r.latency_avg_ms, show: (r) => ms(r.latency_avg_ms), numeric: true },
  { label: 'Max latency', csv: 'latency_max_ms', value: (r) => r.latency_max_ms, show: (r) => ms(r.latency_max_ms), numeric: true },
  { label: 'Mean first token', csv: 'ttft_avg_ms', value: (r) => r.ttft_avg_ms ?? '', show: (r) => (r.ttft_avg_ms == null ? '–' : ms(r.ttft_avg_ms)), numeric: true },
];

let shown = null;
let timer = null;

async function getJson(url) {
  const res = await fetch(url, { cache: 'no-store' });
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      message = (await res.json())?.error?.message || message;
    } catch { /* not JSON */ }
    throw new Error(`${url}: ${message}`);
  }
  return res.json();
}

async function load(event) {
  event?.preventDefault();
  clearTimeout(timer);
  el.error.hidden = true;
  const days = Number(el.range.value) || 30;
  const first = firstDay(days);
  el.load.disabled = true;
  try {
    const [keys, byDay, providers, breakers, fleet] = await Promise.all([
      getJson(`/api/usage?since=${first}&by=key`),
      getJson(`/api/usage?since=${first}&by=key,day`),
      getJson(`/api/providers?since=${first}`),
      getJson('/api/breakers'),
      getJson('/api/fleet'),
    ]);
    render(first, keys.data, byDay.data, providers.data, breakers, fleet);
    el.status.textContent = 'Dashboard updated.';
  } catch (err) {
    el.error.textContent = `Could not load the dashboard: ${err.message}`;
    el.error.hidden = false;
  } finally {
    el.load.disabled = false;
    timer = setTimeout(load, REFRESH_MS);
  }
}

function render(first, keys, byDay, providers, breakers, fleet) {
  const today = utcDay();
  const days = daysBetween(first, today);
  const x = days.map(daySeconds);
  const sum = (rows, f) => rows.reduce((a, r) => a + (Number(r[f]) || 0), 0);

  const ranked = [...keys].sort((a, b) => b.cost_usd - a.cost_usd || b.total_tokens - a.total_tokens);
  el.spend.textContent = usd(sum(keys, 'cost_usd'));
  el.keys.textContent = count(keys.length);
  el.requests.textContent = count(sum(keys, 'requests'));
  el.errors.textContent = count(sum(keys, 'errors'));
  el.fleet.textContent = fleetText(fleet);
  el.report.hidden = false;

  const top = new Set(ranked.slice(0, TOP).map((r) => r.key_id));
  const topSpend = seriesByDay(byDay.filter((r) => top.has(r.key_id)), days, 'key_id', (r) => r.cost_usd);
  drawChart(el.chartTop, {
    x,
    series: topSpend.labels.map((label, i) => ({ label, values: topSpend.values[i] })),
    yFormat: usd,
  });

  const errors = seriesByDay(providers, days, 'provider', (r) => r.errors);
  drawChart(el.chartErrors, {
    x,
    series: errors.labels.map((label, i) => ({ label, values: errors.values[i], bars: days.length <= 14 })),
    yFormat: count,
  });
  // Mean latency per day: null (a gap) on a day without answers, not 0 ms.
  const latency = seriesByDay(providers, days, 'provider', (r) => r.latency_avg_ms);
  const answered = seriesByDay(providers, days, 'provider', (r) => r.attempts);
  drawChart(el.chartLatency, {
    x,
    series: latency.labels.map((label, i) => ({
      label,
      values: latency.values[i].map((v, d) => (answered.values[i][d] ? v : null)),
    })),
    yFormat: ms,
  });
  renderBreakers(breakers);

  fillTable(el.keysTable, KEY_COLUMNS, ranked);
  fillTable(el.providersTable, PROVIDER_COLUMNS, providers);
  shown = { first, today, keys: ranked, providers };
  el.exportKeys.disabled = false;
  el.exportProviders.disabled = false;
  el.report.dataset.loaded = 'true';
}

/** One stepped line per provider: 0 closed, 1 half-open, 2 open. */
function renderBreakers(breakers) {
  const samples = breakers.samples || [];
  const x = samples.map((s) => s.unix_ms / 1000);
  drawChart(el.chartBreakers, {
    x,
    height: 200,
    yRange: [-0.2, 2.2],
    ySplits: [0, 1, 2],
    series: (breakers.providers || []).map((name) => ({
      label: name,
      step: true,
      values: samples.map((s) => {
        const i = STATES.indexOf(s.states[name]);
        return i < 0 ? null : i;
      }),
    })),
    yFormat: (v) => (Number.isInteger(v) ? (['closed', 'half-open', 'open'][v] ?? '') : ''),
  });
}

function fleetText(fleet) {
  switch (fleet.mode) {
    case 'global': return 'global (Redis up)';
    case 'local': return `local shares (Redis down; ${count(fleet.local_reservations)} reservations decided locally)`;
    default: return 'single node';
  }
}

el.form.addEventListener('submit', load);
el.exportKeys.addEventListener('click', () => {
  if (shown) download(`afr-keys-${shown.first}-to-${shown.today}.csv`, toCsv(KEY_COLUMNS, shown.keys));
});
el.exportProviders.addEventListener('click', () => {
  if (shown) download(`afr-providers-${shown.first}-to-${shown.today}.csv`, toCsv(PROVIDER_COLUMNS, shown.providers));
});
load();
