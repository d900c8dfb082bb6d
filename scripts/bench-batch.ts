/**
 * Continuous batching in the library alone: time per `BatchDecoder` step with b sequences decoding
 * together (the prefills not counted), the tokens per second that makes, and the first step's time
 * per sequence (each prompt's prefill and first token).
 *   npm run bench:batch -- [--dim 256] [--depth 4] [--batches 1,8,32] [--steps 100] [--prompt 8]
 *                          [--max-seq-len prompt + steps + 24] [--warmup 15]
 * Before any batch size is timed, the sizes take untimed turns (a batch's prefills and its steps
 * each) for --warmup seconds (at least one turn): V8 keeps optimizing the decoding code for 10 to
 * 20 s of steps, and a size timed in a fresh process would find it less optimized than the next.
 * The model is a byte-level decoder with rotary positions, heads 4, as `bench:service` streams from;
 * `--vocab N` gives it N tokens instead of 256 (a tokenizer's vocabulary: each step's output
 * products and sampling grow with it). Sequences sample at temperature 1 with the default top-k,
 * or with `--top-p X` the nucleus filter at X.
 * With a --max-seq-len below prompt + steps, the sequences decode past it: each step keeps the last
 * maxSeqLen - 1 positions of every cache (a sliding window).
 * On the torch backend's CPU device, the last column says what share of the timed steps' shared
 * chunks (their larger products and attention, see XT_HELPER_THREADS) the helper threads computed.
 * With --kernels, a second table splits a step's time by kernel, and what runs outside kernels
 * (JavaScript and the tensor engine), for each batch size: where the time of each added row goes.
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/backend/index.js';
import { loadAddon } from '../src/backend/torch/native.js';
import { BatchDecoder } from '../src/generation/batch-decoder.js';
import { Decoder } from '../src/layers/attention-layers.js';
import { manualSeed } from '../src/utils/random.js';
import { TransformerWrapper } from '../src/wrappers/transformer-wrapper.js';
import { nonNegativeNumber, option, positiveInt, positiveInts } from './args.js';

const dim = positiveInt('dim', option('dim', '256'));
const depth = positiveInt('depth', option('depth', '4'));
const steps = positiveInt('steps', option('steps', '100'));
const promptLen = positiveInt('prompt', option('prompt', '8'));
const maxSeqLen = positiveInt('max-seq-len', option('max-seq-len', String(promptLen + steps + 24)));
const batches = positiveInts('batches', '1,8,32');
const vocab = positiveInt('vocab', option('vocab', '256'));
const topPOption = option('top-p', '');
const topP = topPOption === '' ? null : Number(topPOption);
if (topP !== null && !(topP > 0 && topP <= 1))
  throw new Error(`--top-p: expected a number in (0, 1], got ${topPOption}`);
const filter = topP === null ? {} : { filterLogitsFn: 'topP' as const, filterKwargs: { thres: topP } };
const byKernel = process.argv.includes('--kernels');
const warmup = nonNegativeNumber('warmup', option('warmup', '15'));

const info = await initBackend(process.env.XT_BACKEND);
manualSeed(0);
const net = new TransformerWrapper({
  numTokens: vocab,
  maxSeqLen,
  attnLayers: new Decoder({ dim, depth, heads: 4, rotaryPosEmb: true }),
});
net.eval();
console.log(
  `backend ${info.backend} (${info.device}), decoder dim ${dim} depth ${depth}, vocabulary ${vocab}, ` +
    `${net.numParameters().toLocaleString()} parameters, prompts of ${promptLen} tokens, maxSeqLen ${maxSeqLen}, ` +
    `${steps} steps per batch size\n`,
);
// the torch backend's helper threads (XT_HELPER_THREADS): the share of the steps' work they took
const addon = info.backend === 'torch' && info.device === 'cpu' ? loadAddon() : null;
const helperThreads = addon?.helpers().threads ?? 0;
if (helperThreads)
  console.log(
    `${helperThreads} helper thread${helperThreads > 1 ? 's' : ''} (XT_HELPER_THREADS) ${helperThreads > 1 ? 'share' : 'shares'} each step's larger products and attention\n`,
  );
console.log(
  `| sequences | prefill ms per sequence | ms per step | tokens/s | against one sequence |${helperThreads ? ' chunks by helpers |' : ''}`,
);
console.log(`| ---: | ---: | ---: | ---: | ---: |${helperThreads ? ' ---: |' : ''}`);
// --kernels: each kernel of the backend timed while `timing` is on (the timed steps of each size)
let timing = false;
const kernelMs = new Map<string, number>();
if (byKernel)
  for (const k of tf.getKernelsForBackend(tf.getBackend())) {
    const run = k.kernelFunc;
    k.kernelFunc = ((args: Parameters<typeof run>[0]) => {
      if (!timing) return run(args);
      const t = performance.now();
      try {
        return run(args);
      } finally {
        kernelMs.set(k.kernelName, (kernelMs.get(k.kernelName) ?? 0) + performance.now() - t);
      }
    }) as typeof run;
  }
const perKernel: { b: number; step: number; kernels: Map<string, number> }[] = [];

/** b sequences' prompts, queued in a new decoder. */
function decoderOf(b: number): BatchDecoder {
  const d = new BatchDecoder(net, { maxBatch: b });
  for (let i = 0; i < b; i++) {
    const prompt = Array.from({ length: promptLen }, (_, j) => (j * 31 + i * 7 + 1) % vocab);
    d.add(prompt, { maxTokens: steps + 1, temperature: 1, seed: i, ...filter });
  }
  return d;
}

const warmStart = performance.now();
do {
  for (const b of batches) {
    const d = decoderOf(b);
    for (let s = 0; s <= steps; s++) d.step();
    d.dispose();
  }
} while (performance.now() - warmStart < warmup * 1000);

let one = 0;
let byHelpers = '';
for (const b of batches) {
  // every size ran in the warm-up: its code is compiled and its buffers allocated
  const d = decoderOf(b);
  const p0 = performance.now();
  d.step(); // the prefills and each sequence's first token
  const prefill = (performance.now() - p0) / b;
  kernelMs.clear();
  const shared0 = addon?.helpers() ?? null;
  timing = byKernel;
  const t0 = performance.now();
  for (let s = 0; s < steps; s++) d.step();
  const ms = (performance.now() - t0) / steps;
  timing = false;
  if (shared0) {
    const h = addon!.helpers();
    const chunks = h.chunks - shared0.chunks;
    byHelpers = chunks
      ? `${Math.round((100 * (h.helperChunks - shared0.helperChunks)) / chunks)}% of ${chunks.toLocaleString()}`
      : 'none shared';
  }
  d.dispose();
  if (byKernel)
    perKernel.push({ b, step: ms, kernels: new Map([...kernelMs].map(([k, t]) => [k, t / steps])) });
  const tps = (b / ms) * 1000;
  if (b === 1) one = tps;
  const ratio = one && b > 1 ? `${(tps / one).toFixed(1)}x` : '';
  console.log(
    `| ${b} | ${prefill.toFixed(2)} | ${ms.toFixed(2)} | ${Math.round(tps).toLocaleString()} | ${ratio} |${helperThreads ? ` ${byHelpers} |` : ''}`,
  );
}
if (byKernel) {
  console.log('\nms per step by kernel (the timed steps above):\n');
  console.log(`| kernel | ${perKernel.map((p) => `${p.b} sequence${p.b > 1 ? 's' : ''}`).join(' | ')} |`);
  console.log(`| --- |${perKernel.map(() => ' ---: |').join('')}`);
  const last = perKernel[perKernel.length - 1]!.kernels;
  const names = [...new Set(perKernel.flatMap((p) => [...p.kernels.keys()]))].sort(
    (a, b) => (last.get(b) ?? 0) - (last.get(a) ?? 0),
  );
  const shown = names.slice(0, 10);
  const row = (label: string, f: (p: (typeof perKernel)[number]) => number) =>
    console.log(`| ${label} | ${perKernel.map((p) => f(p).toFixed(3)).join(' | ')} |`);
  const sum = (p: (typeof perKernel)[number], keys: string[]) =>
    keys.reduce((s, k) => s + (p.kernels.get(k) ?? 0), 0);
  for (const k of shown) row(k, (p) => p.kernels.get(k) ?? 0);
  if (names.length > shown.length) row('other kernels', (p) => sum(p, names.slice(shown.length)));
  row('outside kernels', (p) => p.step - sum(p, names));
  row('step', (p) => p.step);
}
net.dispose();
