// The dashboard page: models, datasets, training jobs with a live loss / learning-rate chart, and a
// generation playground, all over the service's /v1 API (see api.js).
import uPlot from '/dashboard/vendor/uPlot.esm.js';
import { api, apiKey, download, followJob, setApiKey, upload, events } from '/dashboard/api.js';
import { PRESETS } from '/dashboard/presets.js';

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
};
const fmt = (n) => (typeof n === 'number' && Number.isFinite(n) ? n.toLocaleString('en-US') : '–');
const num = (id) => {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
};

/** Shows a service error (or any failure) at the top of the page until clicked. */
function showError(e) {
  const message = e instanceof Error ? e.message : String(e);
  const item = el('li', { textContent: message, title: 'click to dismiss' });
  item.onclick = () => item.remove();
  $('errors').append(item);
}
const guarded =
  (fn) =>
  async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      showError(e);
    }
  };

// ---- models ----
let models = [];

async function loadModels() {
  models = (await api('GET', '/v1/models')).models;
  $('model-rows').replaceChildren(
    ...models.map((m) => {
      const get = el('button', { type: 'button', textContent: 'Weights' });
      get.onclick = guarded(async () => {
        const blob = await download(`/v1/models/${m.id}/weights`);
        const a = el('a', { href: URL.createObjectURL(blob), download: `${m.name}.safetensors` });
        a.click();
        setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
      });
      const del = el('button', { type: 'button', textContent: 'Delete' });
      del.onclick = guarded(async () => {
        if (!confirm(`Delete model ${m.name}?`)) return;
        await api('DELETE', `/v1/models/${m.id}`);
        await loadModels();
      });
      const row = el(
        'tr',
        {},
        el('td', { textContent: m.name, title: m.id }),
        el('td', { textContent: fmt(m.parameters) }),
        el('td', { textContent: m.tokenizer }),
        el('td', { textContent: new Date(m.createdAt).toLocaleString() }),
        el('td', {}, get, ' ', del),
      );
      row.dataset.id = m.id;
      return row;
    }),
  );
  for (const id of ['train-model', 'gen-model'])
    fillSelect($(id), models, (m) => `${m.name} (${fmt(m.parameters)})`);
}

function fillSelect(select, items, label) {
  const keep = select.value;
  select.replaceChildren(...items.map((x) => el('option', { value: x.id, textContent: label(x) })));
  if (items.some((x) => x.id === keep)) select.value = keep;
}

function readDefinition() {
  try {
    return JSON.parse($('model-config').value);
  } catch (e) {
    throw new Error(`definition: expected JSON, got a parse error (${e.message})`, { cause: e });
  }
}

let countTimer = 0;
let countSeq = 0;
/** Asks the service for the definition's parameter count (after typing pauses). */
function scheduleCount() {
  clearTimeout(countTimer);
  const out = $('model-count');
  out.dataset.state = 'pending';
  countTimer = setTimeout(async () => {
    const seq = ++countSeq;
    let text;
    let state = 'ok';
    try {
      const r = await api('POST', '/v1/models/parameters', {
        config: readDefinition(),
        tokenizer: $('model-tokenizer').value,
      });
      text = `${fmt(r.parameters)} parameters · vocabulary ${fmt(r.numTokens)} · context ${fmt(r.maxSeqLen)}`;
      out.dataset.parameters = String(r.parameters);
    } catch (e) {
      text = e.message;
      state = 'error';
    }
    if (seq !== countSeq) return;
    out.textContent = text;
    out.dataset.state = state;
  }, 300);
}

function choosePreset(key) {
  const p = PRESETS[key];
  $('model-name').value = p.name;
  $('model-tokenizer').value = p.tokenizer;
  $('model-config').value = JSON.stringify(p.config, null, 2);
  scheduleCount();
}

function setupModels() {
  const select = $('model-preset');
  select.replaceChildren(
    ...Object.entries(PRESETS).map(([k, p]) => el('option', { value: k, textContent: p.label })),
  );
  select.onchange = () => choosePreset(select.value);
  $('model-config').oninput = scheduleCount;
  $('model-tokenizer').onchange = scheduleCount;
  $('model-form').onsubmit = guarded(async (e) => {
    e.preventDefault();
    $('model-create').disabled = true;
    try {
      await api('POST', '/v1/models', {
        name: $('model-name').value,
        tokenizer: $('model-tokenizer').value,
        config: readDefinition(),
      });
      await loadModels();
    } finally {
      $('model-create').disabled = false;
    }
  });
  choosePreset(select.value);
}

// ---- datasets ----
async function loadDatasets() {
  const { datasets } = await api('GET', '/v1/datasets');
  $('dataset-rows').replaceChildren(
    ...datasets.map((d) => {
      const del = el('button', { type: 'button', textContent: 'Delete' });
      del.onclick = guarded(async () => {
        if (!confirm(`Delete dataset ${d.name}?`)) return;
        await api('DELETE', `/v1/datasets/${d.id}`);
        await loadDatasets();
      });
      const row = el(
        'tr',
        {},
        el('td', { textContent: d.name, title: d.id }),
        el('td', { textContent: fmt(d.bytes) }),
        el('td', { textContent: new Date(d.createdAt).toLocaleString() }),
        el('td', {}, del),
      );
      row.dataset.id = d.id;
      return row;
    }),
  );
  fillSelect($('train-dataset'), datasets, (d) => `${d.name} (${fmt(d.bytes)} bytes)`);
}

function setupDatasets() {
  $('dataset-form').onsubmit = guarded(async (e) => {
    e.preventDefault();
    const file = $('dataset-file').files[0];
    if (!file) throw new Error('file: choose a text file to upload');
    const bar = $('dataset-progress');
    bar.hidden = false;
    bar.value = 0;
    $('dataset-upload').disabled = true;
    try {
      await upload('/v1/datasets', file, (f) => (bar.value = f));
      $('dataset-form').reset();
      await loadDatasets();
    } finally {
      $('dataset-upload').disabled = false;
    }
  });
}

// ---- training ----
const JOBS_ITEM = 'xt-train-jobs';
const savedJobs = () => JSON.parse(localStorage.getItem(JOBS_ITEM) ?? '[]');

/** The job on screen: its chart data, follower and live rate. */
const training = { job: null, follower: null, chart: null, data: [[], [], []], rate: null };

function makeChart() {
  const box = $('loss-chart');
  box.replaceChildren();
  training.data = [[], [], []];
  training.chart = new uPlot(
    {
      width: Math.max(480, box.clientWidth || 640),
      height: 280,
      scales: { x: { time: false }, lr: { auto: true } },
      series: [
        { label: 'step' },
        { label: 'loss', stroke: '#d0342c', width: 2 },
        { label: 'learning rate', stroke: '#2c6bd0', width: 1.5, scale: 'lr', points: { show: false } },
      ],
      axes: [
        { label: 'step' },
        { label: 'loss' },
        { side: 1, scale: 'lr', label: 'learning rate', grid: { show: false } },
      ],
    },
    training.data,
    box,
  );
  box.dataset.points = '0';
}

function addPoint({ step, loss, learningRate }) {
  const [steps, losses, rates] = training.data;
  // a job resumed from a checkpoint repeats the steps after it: the curve continues from there
  while (steps.length && steps[steps.length - 1] >= step) {
    steps.pop();
    losses.pop();
    rates.pop();
  }
  steps.push(step);
  losses.push(loss);
  rates.push(learningRate);
  training.chart.setData(training.data);
  const box = $('loss-chart');
  box.dataset.points = String(steps.length);
  box.dataset.firstLoss = String(losses[0]);
  box.dataset.lastLoss = String(loss);
}

function onJobEvent(ev) {
  const d = ev.data;
  if (ev.event === 'progress') {
    addPoint(d);
    $('job-step').textContent = fmt(d.step);
    $('job-steps').textContent = fmt(d.steps);
    $('job-loss').textContent = d.loss.toFixed(4);
    $('job-tps').textContent = fmt(Math.round(d.tokensPerSecond));
    const now = performance.now();
    training.rate ??= { t: now, step: d.step };
    const perMs = (d.step - training.rate.step) / (now - training.rate.t);
    $('job-eta').textContent = perMs > 0 ? `${Math.ceil((d.steps - d.step) / perMs / 1000)} s` : '–';
    setJobState('active');
  } else if (ev.event === 'checkpoint') {
    $('job-checkpoints').append(
      el('li', { textContent: `step ${d.step ?? '?'}${d.loss ? ` · loss ${d.loss.toFixed(4)}` : ''}` }),
    );
  } else if (ev.event === 'tokenizing') {
    setJobState(`tokenizing ${Math.round((d.progress ?? 0) * 100)}%`);
  } else if (['completed', 'failed', 'cancelled'].includes(ev.event)) {
    setJobState(ev.event);
    $('job-eta').textContent = '–';
    if (ev.event === 'failed') showError(`job ${training.job}: ${d.error ?? 'failed'}`);
  }
}

function setJobState(state) {
  $('job-state').textContent = state;
  $('job-state').dataset.state = state;
  $('job-cancel').disabled = ['completed', 'failed', 'cancelled'].includes(state);
}

/** Shows a job: its whole curve from the first event, then live events until it ends. */
async function showJob(jobId) {
  training.follower?.stop();
  const job = await api('GET', `/v1/jobs/${jobId}`);
  training.job = jobId;
  training.rate = null;
  $('job-view').hidden = false;
  $('job-title').textContent = `job ${jobId.slice(0, 8)}`;
  $('job-checkpoints').replaceChildren();
  $('job-step').textContent = '0';
  setJobState(job.state);
  makeChart();
  for (const li of $('job-list').children) li.classList.toggle('current', li.dataset.id === jobId);
  training.follower = followJob(jobId, onJobEvent, (m) => showError(`job ${jobId.slice(0, 8)}: ${m}`));
}

function renderJobs() {
  const names = new Map(models.map((m) => [m.id, m.name]));
  $('job-list').replaceChildren(
    ...savedJobs().map((j) => {
      const li = el('li', {
        textContent: `${j.id.slice(0, 8)} · ${names.get(j.modelId) ?? 'deleted model'} · ${new Date(j.createdAt).toLocaleString()}`,
      });
      li.dataset.id = j.id;
      li.classList.toggle('current', j.id === training.job);
      li.onclick = guarded(() => showJob(j.id));
      return li;
    }),
  );
}

function setupTraining() {
  $('train-form').onsubmit = guarded(async (e) => {
    e.preventDefault();
    const body = {
      datasetId: $('train-dataset').value,
      steps: num('train-steps'),
      batchSize: num('train-batch'),
      seqLen: num('train-seq'),
      learningRate: num('train-lr'),
      warmupSteps: num('train-warmup'),
      checkpointEvery: num('train-ckpt'),
      seed: num('train-seed'),
    };
    const modelId = $('train-model').value;
    const { jobId } = await api('POST', `/v1/models/${modelId}/train`, body);
    localStorage.setItem(
      JOBS_ITEM,
      JSON.stringify(
        [{ id: jobId, modelId, createdAt: new Date().toISOString() }, ...savedJobs()].slice(0, 50),
      ),
    );
    renderJobs();
    await showJob(jobId);
  });
  $('job-cancel').onclick = guarded(async () => {
    if (training.job) await api('DELETE', `/v1/jobs/${training.job}`);
  });
}

// ---- playground ----
let generation = null;

function setupPlayground() {
  $('gen-form').onsubmit = guarded(async (e) => {
    e.preventDefault();
    generation?.abort();
    const ac = new AbortController();
    generation = ac;
    const stop = $('gen-stop')
      .value.split('\n')
      .filter((s) => s.length);
    const body = {
      prompt: $('gen-prompt').value,
      maxTokens: num('gen-max'),
      temperature: num('gen-temperature'),
      topK: num('gen-topk'),
      topP: num('gen-topp'),
      minP: num('gen-minp'),
      seed: num('gen-seed'),
      stop: stop.length ? stop : undefined,
      stream: true,
    };
    const out = $('gen-output');
    out.replaceChildren(el('span', { className: 'prompt', textContent: body.prompt }));
    const text = el('span', { className: 'generated' });
    out.append(text);
    out.dataset.tokens = '0';
    const state = (s) => {
      $('gen-state').textContent = s;
      out.dataset.state = s;
    };
    for (const id of ['gen-ttft', 'gen-tps']) $(id).textContent = '–';
    $('gen-count').textContent = '0';
    state('waiting');
    $('gen-start').disabled = true;
    $('gen-stop-button').disabled = false;
    const t0 = performance.now();
    let first = 0;
    let count = 0;
    let ended = false;
    delete out.dataset.jobId;
    try {
      for await (const ev of events(`/v1/models/${$('gen-model').value}/generate`, {
        method: 'POST',
        body,
        signal: ac.signal,
      })) {
        if (ev.event === 'start') {
          out.dataset.jobId = ev.data.jobId;
        } else if (ev.event === 'token') {
          const now = performance.now();
          if (!count) {
            first = now;
            $('gen-ttft').textContent = `${Math.round(now - t0)} ms`;
            state('streaming');
          }
          count += 1;
          text.textContent += ev.data.text;
          out.dataset.tokens = String(count);
          $('gen-count').textContent = String(count);
          if (count > 1) $('gen-tps').textContent = ((count - 1) / ((now - first) / 1000)).toFixed(1);
        } else if (ev.event === 'done') {
          $('gen-tps').textContent = ev.data.tokensPerSecond.toFixed(1);
          out.dataset.doneText = ev.data.text;
          state(`done (${ev.data.finishReason})`);
          ended = true;
        } else if (ev.event === 'failed' || ev.event === 'cancelled' || ev.event === 'error') {
          state(ev.event);
          showError(`generation: ${ev.data.error ?? ev.data.message ?? ev.event}`);
          ended = true;
        }
      }
      // a stream that closes without its end leaves no generation running here: say so
      if (!ended) {
        state('error');
        showError('generation: the stream ended before the generation did');
      }
    } catch (err) {
      if (ac.signal.aborted) state('stopped');
      else {
        state('error');
        throw err;
      }
    } finally {
      $('gen-start').disabled = false;
      $('gen-stop-button').disabled = true;
    }
  });
  $('gen-stop-button').onclick = () => generation?.abort();
}

// ---- start ----
async function refresh() {
  await loadModels();
  await loadDatasets();
  renderJobs();
}

function setup() {
  $('api-key').value = apiKey();
  $('key-form').onsubmit = guarded(async (e) => {
    e.preventDefault();
    setApiKey($('api-key').value.trim());
    $('errors').replaceChildren();
    await refresh();
    scheduleCount();
  });
  setupModels();
  setupDatasets();
  setupTraining();
  setupPlayground();
  guarded(refresh)();
  window.dashboard = { training };
}

setup();
