// The key holder's usage dashboard (/dashboard/): one GET /v1/usage with the key pasted
// here gives the rows (by model and UTC day), the key's limits (its budget with the
// period's end) and, in the module's headers on that very response, the rate-limit
// headroom now. The key stays in this tab's sessionStorage, as in the playground.

import { adviceFor, readError, storedKey, storeKey } from './site.js';
import {
  count, daySeconds, daysBetween, download, drawChart, fillTable, firstDay, seriesByDay, toCsv, usd, utcDay,
} from './charts.js';

const $ = (id) => document.getElementById(id);
const el = {
  form: $('controls'),
  key: $('api-key'),
  range: $('range'),
  load: $('load'),
  exportCsv: $('export'),
  error: $('error'),
  status: $('status'),
  report: $('report'),
  spend: $('total-spend'),
  tokens: $('total-tokens'),
  requests: $('total-requests'),
  errors: $('total-errors'),
  chartSpend: $('chart-spend'),
  chartTokens: $('chart-tokens'),
  chartBudget: $('chart-budget'),
  budgetSummary: $('budget-summary'),
  rpmMeter: $('rpm-meter'),
  rpmText: $('rpm-text'),
  tpmMeter: $('tpm-meter'),
  tpmText: $('tpm-text'),
  budgetMeter: $('budget-meter'),
  budgetText: $('budget-text'),
  table: $('usage-table'),
};

/** The columns of the table and of the CSV export, in order. */
const COLUMNS = [
  { label: 'Day', csv: 'day', value: (r) => r.day },
  { label: 'Model', csv: 'model', value: (r) => r.model },
  { label: 'Requests', csv: 'requests', value: (r) => r.requests, show: (r) => count(r.requests), numeric: true },
  { label: 'Prompt tokens', csv: 'prompt_tokens', value: (r) => r.prompt_tokens, show: (r) => count(r.prompt_tokens), numeric: true },
  { label: 'Completion tokens', csv: 'completion_tokens', value: (r) => r.completion_tokens, show: (r) => count(r.completion_tokens), numeric: true },
  { label: 'Total tokens', csv: 'total_tokens', value: (r) => r.total_tokens, show: (r) => count(r.total_tokens), numeric: true },
  { label: 'Cost (USD)', csv: 'cost_usd', value: (r) => r.cost_usd, show: (r) => usd(r.cost_usd), numeric: true },
  { label: 'Errors', csv: 'errors', value: (r) => r.errors, show: (r) => count(r.errors), numeric: true },
];

/** What the last load showed, for the CSV export. */
let shown = null;

function showError(text) {
  el.error.textContent = text;
  el.error.hidden = false;
}

async function load(event) {
  event?.preventDefault();
  el.error.hidden = true;
  const key = el.key.value.trim();
  if (!key) {
    showError('Paste your API key (afr_…) first.');
    el.key.focus();
    return;
  }
  storeKey(key);
  const days = Number(el.range.value) || 30;
  const first = firstDay(days);
  // One request covers the range shown and the budget's period (this UTC month at most).
  const monthStart = `${utcDay().slice(0, 8)}01`;
  const since = first < monthStart ? first : monthStart;
  el.load.disabled = true;
  el.status.textContent = 'Loading usage…';
  try {
    const res = await fetch(`/v1/usage?since=${since}&by=model,day`, {
      headers: { Authorization: `Bearer ${key}` },
    });
    if (!res.ok) {
      const err = await readError(res);
      showError(`${err.message} ${adviceFor(err)}`.trim());
      el.status.textContent = 'Could not load usage.';
      return;
    }
    const body = await res.json();
    render(body, res.headers, first);
    el.status.textContent = `Usage of key ${body.key_id} loaded.`;
  } catch (err) {
    showError(`The gateway did not answer: ${err.message}`);
  } finally {
    el.load.disabled = false;
  }
}

function render(body, headers, first) {
  const today = utcDay();
  const all = Array.isArray(body.data) ? body.data : [];
  const rows = all.filter((r) => r.day >= first);
  const days = daysBetween(first, today);
  const x = days.map(daySeconds);

  const sum = (f) => rows.reduce((a, r) => a + (Number(r[f]) || 0), 0);
  el.spend.textContent = usd(sum('cost_usd'));
  el.tokens.textContent = count(sum('total_tokens'));
  el.requests.textContent = count(sum('requests'));
  el.errors.textContent = count(sum('errors'));

  el.report.hidden = false;
  const spend = seriesByDay(rows, days, 'model', (r) => r.cost_usd);
  drawChart(el.chartSpend, {
    x,
    series: spend.labels.map((label, i) => ({ label, values: spend.values[i] })),
    yFormat: usd,
  });
  const tokens = seriesByDay(rows, days, 'model', (r) => r.total_tokens);
  drawChart(el.chartTokens, {
    x,
    series: tokens.labels.map((label, i) => ({ label, values: tokens.values[i] })),
    yFormat: count,
  });
  renderBudget(body.limits?.budget ?? null, all);
  renderHeadroom(headers, body.limits ?? {});
  fillTable(el.table, COLUMNS, rows);
  shown = { keyId: body.key_id, first, today, rows };
  el.exportCsv.disabled = false;
  el.report.dataset.loaded = 'true';
}

/**
 * The budget's period from its start to its end: what was left at the end of each day
 * (the limit less the usage store's spend so far), what is left now (the ledger's figure,
 * requests in flight counted), and the even pace that would end at zero.
 */
function renderBudget(budget, rows) {
  if (!budget) {
    el.budgetSummary.textContent = 'This key has no budget.';
    el.chartBudget.replaceChildren();
    delete el.chartBudget.dataset.drawn;
    return;
  }
  const start = Date.parse(budget.period_start) / 1000;
  const end = Date.parse(budget.period_end) / 1000;
  const now = Date.now() / 1000;
  const startDay = budget.period_start.slice(0, 10);
  const today = utcDay();
  const x = [start];
  const left = [budget.limit_usd];
  let spent = 0;
  for (const day of daysBetween(startDay, today)) {
    if (day === today) break;
    spent += rows.filter((r) => r.day === day).reduce((a, r) => a + (Number(r.cost_usd) || 0), 0);
    x.push(daySeconds(day) + 86400);
    left.push(Math.max(0, budget.limit_usd - spent));
  }
  x.push(Math.max(now, x[x.length - 1] + 1));
  left.push(budget.remaining_usd);
  x.push(end);
  left.push(null);
  const pace = x.map((t, i) => (i === 0 ? budget.limit_usd : t === end ? 0 : null));
  drawChart(el.chartBudget, {
    x,
    xRange: [start, end],
    series: [
      { label: 'Budget left', values: left, step: false },
      { label: 'Even pace', values: pace, dash: [6, 4], color: '#8a8f98', spanGaps: true },
    ],
    yFormat: usd,
  });
  const ends = new Date(budget.period_end).toUTCString().replace(':00 GMT', ' UTC');
  el.budgetSummary.textContent = `${usd(budget.remaining_usd)} left of ${usd(budget.limit_usd)} this ${budget.per}; `
    + `${usd(budget.spent_usd)} spent or reserved. The period ends ${ends}.`;
}

/** The rate-limit headers of the /v1/usage response itself: where the key stands now. */
function renderHeadroom(headers, limits) {
  const rpmLimit = Number(headers.get('x-ratelimit-limit'));
  const rpmLeft = Number(headers.get('x-ratelimit-remaining'));
  const reset = Number(headers.get('x-ratelimit-reset'));
  if (Number.isFinite(rpmLimit) && rpmLimit > 0) {
    meter(el.rpmMeter, rpmLeft, rpmLimit);
    const when = Number.isFinite(reset) && reset > 0 ? `, full again ${new Date(reset * 1000).toLocaleTimeString()}` : '';
    el.rpmText.textContent = `${count(rpmLeft)} of ${count(rpmLimit)} left${when}`;
  } else {
    el.rpmText.textContent = 'not sent';
  }
  const tpmLimit = headers.get('x-ratelimit-limit-tokens');
  if (tpmLimit !== null) {
    const tpmLeft = Number(headers.get('x-ratelimit-remaining-tokens'));
    meter(el.tpmMeter, tpmLeft, Number(tpmLimit));
    el.tpmText.textContent = `${count(tpmLeft)} of ${count(tpmLimit)} left, resets in ${headers.get('x-ratelimit-reset-tokens') ?? '?'}`;
  } else {
    meter(el.tpmMeter, 0, 1);
    el.tpmText.textContent = limits.tpm ? count(limits.tpm) : 'no limit';
  }
  const budgetLeft = headers.get('x-afr-budget-remaining-usd');
  if (budgetLeft !== null && limits.budget) {
    meter(el.budgetMeter, Number(budgetLeft), limits.budget.limit_usd);
    el.budgetText.textContent = `$${budgetLeft} of ${usd(limits.budget.limit_usd)} left this ${limits.budget.per}`;
  } else {
    meter(el.budgetMeter, 0, 1);
    el.budgetText.textContent = 'no budget';
  }
}

function meter(m, value, max) {
  m.max = max > 0 ? max : 1;
  m.value = Math.max(0, Math.min(value, m.max));
  m.low = m.max * 0.2;
  m.optimum = m.max;
}

function exportCsv() {
  if (!shown) return;
  download(`afr-usage-${shown.keyId}-${shown.first}-to-${shown.today}.csv`, toCsv(COLUMNS, shown.rows));
}

el.key.value = storedKey();
el.form.addEventListener('submit', load);
el.exportCsv.addEventListener('click', exportCsv);
if (el.key.value) load();
