// What both usage dashboards share: charts drawn with uPlot (vendored at setup by
// scripts/vendor-web into /assets/vendor/, never from a CDN), number formats, tables and
// the CSV export. The key holder's view (/dashboard/ through nginx) and the operator's
// (/dashboard/ on the admin listener) each load this module.

import uPlot from '/assets/vendor/uPlot.esm.js';

/** Series colours: distinguishable in both colour schemes. */
export const PALETTE = ['#0b72d9', '#e3620b', '#1a9f47', '#b42fb8', '#c9a100', '#d63a3a', '#3aa6b9', '#7a5af8'];

const DAY_S = 86400;

/** `YYYY-MM-DD` (a UTC day) as Unix seconds at its start. */
export function daySeconds(day) {
  return Date.parse(`${day}T00:00:00Z`) / 1000;
}

/** Every UTC day from `first` to `last` (`YYYY-MM-DD`), both included. */
export function daysBetween(first, last) {
  const out = [];
  for (let t = daySeconds(first); t <= daySeconds(last); t += DAY_S) {
    out.push(new Date(t * 1000).toISOString().slice(0, 10));
  }
  return out;
}

/** US dollars, with cents, or sub-cent precision for small amounts. */
export function usd(n) {
  const v = Number(n) || 0;
  if (v !== 0 && Math.abs(v) < 0.01) return `$${v.toFixed(6)}`;
  return `$${v.toFixed(2)}`;
}

/** An integer with thousands separators. */
export function count(n) {
  return (Number(n) || 0).toLocaleString('en-US');
}

/**
 * Milliseconds: two significant digits below 1 ms (a loopback provider answers in
 * tenths: one decimal drew every axis tick as "0.1 ms"), one decimal below 10 ms, whole
 * above.
 */
export function ms(n) {
  const v = Number(n) || 0;
  if (v > 0 && v < 1) return `${Number(v.toPrecision(2))} ms`;
  return v < 10 ? `${v.toFixed(1)} ms` : `${count(Math.round(v))} ms`;
}

/**
 * Sums `rows` into one series per value of `seriesKey`, over `days`:
 * `{ labels: [..], values: [[..per day], ..] }`, 0 where a day has no row.
 */
export function seriesByDay(rows, days, seriesKey, valueOf) {
  const labels = [...new Set(rows.map((r) => r[seriesKey] ?? ''))].sort();
  const index = new Map(days.map((d, i) => [d, i]));
  const values = labels.map(() => days.map(() => 0));
  for (const r of rows) {
    const i = index.get(r.day);
    if (i === undefined) continue;
    values[labels.indexOf(r[seriesKey] ?? '')][i] += Number(valueOf(r)) || 0;
  }
  return { labels, values };
}

/**
 * Draws a chart into `container` (replacing what was there) and keeps it as wide as the
 * container. `x` is Unix seconds; each series is `{label, values, color?, dash?, step?,
 * bars?, spanGaps?}`; `yRange` and `ySplits` fix the y axis (the breakers' three states).
 * Returns the uPlot instance.
 */
export function drawChart(container, {
  x, series, yLabel = '', yFormat = (v) => String(v), height = 240, xRange = null, yRange = null, ySplits = null,
}) {
  container.replaceChildren();
  const width = Math.max(280, container.clientWidth || 600);
  const opts = {
    width,
    height,
    legend: { show: true, live: false },
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true, ...(xRange ? { range: () => xRange } : {}) },
      y: { range: yRange ? () => yRange : (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] },
    },
    axes: [
      { stroke: cssVar('--fg-muted'), grid: { stroke: cssVar('--border'), width: 1 } },
      {
        label: yLabel,
        stroke: cssVar('--fg-muted'),
        grid: { stroke: cssVar('--border'), width: 1 },
        values: (u, ticks) => ticks.map(yFormat),
        ...(ySplits ? { splits: () => ySplits } : {}),
        size: 70,
      },
    ],
    series: [
      {},
      ...series.map((s, i) => {
        const color = s.color || PALETTE[i % PALETTE.length];
        const out = {
          label: s.label,
          stroke: color,
          width: 2,
          points: { show: true, size: 6, fill: color },
          value: (u, v) => (v == null ? '–' : yFormat(v)),
        };
        if (s.dash) out.dash = s.dash;
        if (s.spanGaps) out.spanGaps = true;
        if (s.step) out.paths = uPlot.paths.stepped({ align: 1 });
        if (s.bars) {
          out.paths = uPlot.paths.bars({ size: [0.6, 40] });
          out.fill = `${color}cc`;
          out.points = { show: false };
        }
        return out;
      }),
    ],
  };
  const chart = new uPlot(opts, [x, ...series.map((s) => s.values)], container);
  const resize = new ResizeObserver(() => {
    const w = Math.max(280, container.clientWidth);
    if (Math.abs(w - chart.width) > 4) chart.setSize({ width: w, height });
  });
  resize.observe(container);
  container.dataset.drawn = 'true';
  return chart;
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || '#888';
}

/** Fills `tbody` with one row per item of `rows`, cells from `columns` (`{label, value}`). */
export function fillTable(table, columns, rows) {
  const thead = table.querySelector('thead') || table.createTHead();
  const tbody = table.querySelector('tbody') || table.createTBody();
  const head = document.createElement('tr');
  for (const c of columns) {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = c.label;
    if (c.numeric) th.className = 'num';
    head.append(th);
  }
  thead.replaceChildren(head);
  tbody.replaceChildren(...rows.map((r) => {
    const tr = document.createElement('tr');
    for (const c of columns) {
      const td = document.createElement('td');
      td.textContent = c.show ? c.show(r) : String(c.value(r) ?? '');
      td.dataset.label = c.label;
      if (c.numeric) td.className = 'num';
      tr.append(td);
    }
    return tr;
  }));
}

/** RFC 4180 CSV of `rows` with the `columns`' labels as the header line. */
export function toCsv(columns, rows) {
  const cell = (v) => {
    const s = v == null ? '' : String(v);
    return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  };
  const lines = [columns.map((c) => cell(c.csv || c.label)).join(',')];
  for (const r of rows) lines.push(columns.map((c) => cell(c.value(r))).join(','));
  return `${lines.join('\r\n')}\r\n`;
}

/** Offers `text` as a file download named `filename`. */
export function download(filename, text, type = 'text/csv;charset=utf-8') {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** The UTC day of `ms` (Unix milliseconds), `YYYY-MM-DD`. */
export function utcDay(ms = Date.now()) {
  return new Date(ms).toISOString().slice(0, 10);
}

/** The `since` days back from today (UTC), today included: `YYYY-MM-DD`. */
export function firstDay(days) {
  return utcDay(Date.now() - (days - 1) * DAY_S * 1000);
}
