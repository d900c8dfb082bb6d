/**
 * Per-kernel profile of one training step and one cached generation on the chosen backend:
 *   npx tsx bench/profile.ts [--backend torch] [--threads 1] [--steps 2] [--vocab 256] [--precision fp32|bf16]
 * Prints kernels by total time (calls, ms) and which ran on the cpu fallback. `--precision bf16`
 * trains and generates with bfloat16 products and attention (as `npm run bench -- --precision bf16`).
 */
import * as tf from '@tensorflow/tfjs-core';

const argv = process.argv.slice(2);
const opt = (name: string, dflt: string): string => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1]! : dflt;
};
process.env.XT_NUM_THREADS = opt('--threads', '1');
const backendName = opt('--backend', 'torch');
const { initBackend } = await import('../src/backend/index.js');
await initBackend(backendName, () => {});
const { ensureGradients } = await import('../src/train/gradients.js');
await ensureGradients();
const { FALLBACK_USED } = await import('../src/backend/torch/kernels.js');
const { TransformerWrapper } = await import('../src/wrappers/transformer-wrapper.js');
const { Decoder } = await import('../src/layers/attention-layers.js');
const { AutoregressiveWrapper } = await import('../src/generation/autoregressive-wrapper.js');
const { AdamW } = await import('../src/train/optimizer.js');
const { variableGradsLean } = await import('../src/train/backprop.js');
const { checkPrecision, withPrecision } = await import('../src/backend/precision.js');
const precision = checkPrecision(opt('--precision', 'fp32'), '--precision');

const stats = new Map<string, { n: number; ms: number }>();
for (const cfg of tf.getKernelsForBackend(backendName)) {
  const f = cfg.kernelFunc;
  (cfg as { kernelFunc: tf.KernelFunc }).kernelFunc = (args) => {
    const t = performance.now();
    const r = f(args);
    const s = stats.get(cfg.kernelName) ?? { n: 0, ms: 0 };
    s.n++;
    s.ms += performance.now() - t;
    stats.set(cfg.kernelName, s);
    return r;
  };
}

const vocab = Number(opt('--vocab', '256'));
const net = new TransformerWrapper({
  numTokens: vocab,
  maxSeqLen: 256,
  attnLayers: new Decoder({
    dim: 256,
    depth: 4,
    heads: 4,
    attnDimHead: 64,
    rotaryPosEmb: true,
    attnFlash: true,
  }),
});
const model = new AutoregressiveWrapper(net);
const params = model.namedParameters();
const adam = new AdamW(params, { learningRate: 3e-4, weightDecay: 0 });
const vars = params.map(([, v]) => v);
const names = new Map(params.map(([n, v]) => [v.name, n]));
const x = tf.randomUniformInt([4, 257], 0, vocab, { seed: 1 } as never) as tf.Tensor;

function report(title: string, wall: number): void {
  const rows = [...stats.entries()].sort((a, b) => b[1].ms - a[1].ms);
  const total = rows.reduce((a, [, s]) => a + s.ms, 0);
  const calls = rows.reduce((a, [, s]) => a + s.n, 0);
  console.log(
    `${title}: wall ${wall.toFixed(0)} ms, in kernels ${total.toFixed(0)} ms, ${calls} kernel calls`,
  );
  for (const [k, s] of rows.slice(0, 25))
    console.log(`  ${k.padEnd(22)} ${String(s.n).padStart(6)} ${s.ms.toFixed(1).padStart(9)}`);
  stats.clear();
}

const steps = Number(opt('--steps', '2'));
model.train();
for (let s = 0; s < steps; s++) {
  stats.clear();
  const t = performance.now();
  const { value, grads } = withPrecision(precision, () =>
    variableGradsLean(() => model.forward(x) as tf.Scalar, vars),
  );
  value.dataSync();
  const named: Record<string, tf.Tensor> = {};
  for (const [k, g] of Object.entries(grads)) named[names.get(k) ?? k] = g;
  adam.apply(named);
  tf.dispose([value, ...Object.values(grads)]);
  report(`train step ${s + 1}`, performance.now() - t);
}
model.eval();
const t = performance.now();
const out = await model.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], 64, {
  temperature: 0,
  cacheKv: true,
  precision,
});
out.dispose();
report('generate 64 tokens with cache', performance.now() - t);
console.log('fallback kernels:', [...FALLBACK_USED].join(', ') || 'none');
console.log('peak rss MB', Math.round(process.resourceUsage().maxRSS / 1024));
