// Docs page: the Models table, refreshed live from GET /v1/models once the reader
// gives a key (the endpoint needs one). Until then it shows the default catalogue.

import { adviceFor, fetchModels, labelTableCells, storedKey, storeKey } from './site.js';

const form = document.getElementById('models-form');
const input = document.getElementById('models-key');
const status = document.getElementById('models-status');
const tbody = document.querySelector('#models-table tbody');

function cell(text, code = false) {
  const td = document.createElement('td');
  if (code) {
    const c = document.createElement('code');
    c.textContent = text;
    td.append(c);
  } else {
    td.textContent = text;
  }
  return td;
}

async function refresh(key) {
  status.classList.remove('error');
  status.textContent = 'Loading models from this gateway…';
  try {
    const models = await fetchModels(key);
    const rows = models.map((m) => {
      const tr = document.createElement('tr');
      tr.append(cell(m.id, true), cell(m.tier || '—'), cell(m.description || '—'));
      return tr;
    });
    tbody.replaceChildren(...rows);
    labelTableCells(tbody.closest('.table-wrap'));
    tbody.closest('table').dataset.source = 'live';
    status.textContent = `Live list for your key: ${models.length} model${models.length === 1 ? '' : 's'}.`;
  } catch (err) {
    status.classList.add('error');
    status.textContent = err.status
      ? `Could not load models: ${err.status} ${err.message.replace(/\.$/, '')}. ${adviceFor(err)}`
      : `Could not reach the gateway: ${err.message}.`;
  }
}

if (form) {
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) {
      status.classList.add('error');
      status.textContent = 'Paste an API key first.';
      input.focus();
      return;
    }
    storeKey(key);
    refresh(key);
  });
  const key = storedKey();
  if (key) {
    input.value = key;
    refresh(key);
  }
}
