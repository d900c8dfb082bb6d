/**
 * `npm run bench:filters`: the top-k and top-p sampling filters (as sampling runs them, at their
 * defaults: k = 10% of the vocabulary, thres 0.9) on 8 rows of standard-normal logits, at
 * vocabularies of 256, 32,000 and 100,277, in milliseconds per call (the best of 7 passes).
 *   npm run bench:filters -- [--rows 8] [--vocabs 256,32000,100277] [--baseline]
 * --baseline also runs bench/filters_reference.py (plain PyTorch, the filters as x-transformers
 * defines them) in the same run and prints the ratios. Both sides run on one thread
 * (XT_NUM_THREADS, OMP_NUM_THREADS and OPENBLAS_NUM_THREADS pinned to 1).
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { option, positiveInt, positiveInts } from './args.js';

for (const k of ['XT_NUM_THREADS', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'])
  process.env[k] = '1';
const rows = positiveInt('rows', option('rows', '8'));
const vocabs = positiveInts('vocabs', '256,32000,100277');
const baseline = process.argv.includes('--baseline');

const tf = await import('@tensorflow/tfjs-core');
const { initBackend } = await import('../src/backend/index.js');
const { topK, topP } = await import('../src/generation/filters.js');
const info = await initBackend(process.env.XT_BACKEND);

type Case = { filter: string; vocab: number; ms: number };
const ours: Case[] = [];
for (const [name, filter] of [
  ['topK', topK],
  ['topP', topP],
] as const)
  for (const vocab of vocabs) {
    const x = tf.randomNormal([rows, vocab], 0, 1, 'float32', 0);
    const once = () => tf.dispose(filter(x, {}));
    for (let i = 0; i < 3; i++) once();
    const n = Math.max(1, Math.floor(2_000_000 / (rows * vocab)));
    let best = Infinity;
    for (let pass = 0; pass < 7; pass++) {
      const t0 = performance.now();
      for (let i = 0; i < n; i++) once();
      best = Math.min(best, (performance.now() - t0) / n);
    }
    ours.push({ filter: name, vocab, ms: best });
    x.dispose();
  }

let torch: Map<string, number> | null = null;
let torchVersion = '';
if (baseline) {
  const script = fileURLToPath(new URL('../bench/filters_reference.py', import.meta.url));
  const py = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
  const r = spawnSync(py, [script, '--threads', '1', '--rows', String(rows), '--vocabs', vocabs.join(',')], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`--baseline: ${script} failed: ${r.stderr || r.error}`);
  torch = new Map();
  for (const line of r.stdout.split('\n').filter((l) => l.startsWith('{'))) {
    const c = JSON.parse(line) as Case & { torch: string };
    torch.set(`${c.filter}/${c.vocab}`, c.ms);
    torchVersion = c.torch;
  }
}

console.log(
  `backend ${info.backend} (${info.device}), ${rows} rows, 1 thread${torch ? `; PyTorch ${torchVersion}, 1 thread` : ''}\n`,
);
console.log(`| filter | vocabulary | ours ms |${torch ? ' PyTorch ms | ratio |' : ''}`);
console.log(`| --- | ---: | ---: |${torch ? ' ---: | ---: |' : ''}`);
for (const c of ours) {
  const t = torch?.get(`${c.filter}/${c.vocab}`);
  const extra = t === undefined ? '' : ` ${t.toFixed(3)} | ${(t / c.ms).toFixed(2)}x |`;
  console.log(`| ${c.filter} | ${c.vocab.toLocaleString()} | ${c.ms.toFixed(3)} |${extra}`);
}
