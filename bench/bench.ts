/**
 * Benchmark: training and generation throughput of the library on one or more backends.
 *
 *   npm run bench -- [--config small|small-32k|gpt2|base] [--backend torch[,cpu,...]] [--threads N]
 *                    [--best] [--json] [--baseline] [--build-only] [--precision fp32|bf16]
 *
 * The configs are the workloads of ../shared/bench/torch_reference.py: `small` is vocab 256, dim 256,
 * depth 4, heads 4, rotary, seq 256, batch 4, Adam lr 3e-4; `small-32k` the same with vocab 32,000;
 * `gpt2` vocab 32,000, dim 768, depth 12, heads 12, seq 1024, batch 8 (`base`, dim 512, depth 6,
 * seq 512, has no PyTorch twin). Generation: batch 1, prompt 16, 240 new tokens, greedy, with and
 * without a key/value cache. Each backend runs in its own child process (so peak RSS is its own).
 *
 * Threads are pinned on both sides: `--threads N` (default 1) sets LibTorch's threads and, through
 * OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS, every BLAS pool, so "1 thread" is one
 * core for us and for PyTorch. `--best` instead runs each side at its best on all cores: ours with
 * every core, its OpenMP threads passive (the default) and spinning (OMP_WAIT_POLICY=ACTIVE),
 * PyTorch with each of (1 intra-op thread, all-core BLAS), (all, all) and (all, 1 BLAS thread),
 * keeping the setting that trains fastest.
 * `--build-only` only builds the model (parameter initialisation) and reports how long it took.
 * `--precision bf16` trains and generates with bfloat16 matrix products and attention (the PyTorch
 * baseline then runs under torch.autocast(bfloat16) with scaled_dot_product_attention: `--bf16`).
 * XT_DEVICE=cuda runs ours on the GPU (the baseline follows with `--device cuda`).
 * `--baseline` also runs the PyTorch script (same vocabulary, same threads) and prints ratios.
 * `--json` prints one line per run: {"backend","config","threads","train_tok_s","gen_tok_s_cache",
 * "gen_tok_s_nocache","peak_rss_mb","build_ms"} (a "pytorch" line with --baseline, then the ratios).
 */
import type * as TF from '@tensorflow/tfjs-core';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface BenchConfig {
  vocab: number;
  dim: number;
  depth: number;
  heads: number;
  seq: number;
  batch: number;
  trainSteps: number;
  warmupSteps: number;
  prompt: number;
  newTokens: number;
}

const SMALL: BenchConfig = {
  vocab: 256,
  dim: 256,
  depth: 4,
  heads: 4,
  seq: 256,
  batch: 4,
  trainSteps: 8,
  warmupSteps: 2,
  prompt: 16,
  newTokens: 240,
};

const CONFIGS: Record<string, BenchConfig> = {
  small: SMALL,
  'small-32k': { ...SMALL, vocab: 32000 },
  gpt2: { ...SMALL, vocab: 32000, dim: 768, depth: 12, heads: 12, seq: 1024, batch: 8 },
  base: { ...SMALL, dim: 512, depth: 6, heads: 8, seq: 512, trainSteps: 4, warmupSteps: 1 },
};

interface Result {
  backend: string;
  config: string;
  /** intra-op threads / BLAS threads */
  threads: string;
  train_tok_s: number;
  gen_tok_s_cache: number;
  gen_tok_s_nocache: number;
  peak_rss_mb: number;
  /** building the model (parameter initialisation), ms; ours only */
  build_ms?: number;
  precision?: string;
  device?: string;
}

const here = path.dirname(fileURLToPath(import.meta.url));
/** The package root (this file also runs bundled from build/bench/). */
const root = (() => {
  let dir = here;
  for (let i = 0; i < 6 && !existsSync(path.join(dir, 'package.json')); i++) dir = path.dirname(dir);
  return dir;
})();
const argv = process.argv.slice(2);
const opt = (name: string, dflt?: string): string | undefined => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : dflt;
};
const configName = opt('--config', 'small')!;
const config = CONFIGS[configName];
if (!config)
  throw new Error(`--config: expected one of ${Object.keys(CONFIGS).join(', ')}, got "${configName}"`);
const threads = Number(opt('--threads', process.env.XT_NUM_THREADS ?? '1'));
if (!Number.isInteger(threads) || threads < 1)
  throw new Error(`--threads: expected a positive integer, got "${opt('--threads')}"`);
const json = argv.includes('--json');
const precisionArg = opt('--precision', 'fp32')!;
if (precisionArg !== 'fp32' && precisionArg !== 'bf16')
  throw new Error(`--precision: expected fp32 or bf16, got "${precisionArg}"`);
const precision: 'fp32' | 'bf16' = precisionArg;
const cudaRun = (process.env.XT_DEVICE ?? '').trim().toLowerCase() === 'cuda';

function progress(msg: string): void {
  process.stderr.write(`bench: ${msg}\n`);
}

/** Child: one backend, prints one JSON result line on stdout. */
async function child(backendName: string): Promise<void> {
  process.env.XT_NUM_THREADS = String(threads);
  process.env.XT_QUIET_FALLBACK ??= '1';
  const tf = await import('@tensorflow/tfjs-core');
  const { initBackend } = await import('../src/backend/index.js');
  await initBackend(backendName, () => {});
  const { ensureGradients } = await import('../src/train/gradients.js');
  await ensureGradients();
  const { TransformerWrapper } = await import('../src/wrappers/transformer-wrapper.js');
  const { Decoder } = await import('../src/layers/attention-layers.js');
  const { AutoregressiveWrapper } = await import('../src/generation/autoregressive-wrapper.js');
  const { AdamW } = await import('../src/train/optimizer.js');
  const { variableGradsLean } = await import('../src/train/backprop.js');
  const { manualSeed, Rng } = await import('../src/utils/random.js');
  const { withPrecision } = await import('../src/backend/precision.js');
  const { backendInfo } = await import('../src/backend/index.js');
  manualSeed(0);
  const c = config;
  const built = performance.now();
  const net = new TransformerWrapper({
    numTokens: c.vocab,
    maxSeqLen: c.seq,
    attnLayers: new Decoder({
      dim: c.dim,
      depth: c.depth,
      heads: c.heads,
      attnDimHead: c.dim / c.heads,
      rotaryPosEmb: true,
      attnFlash: true,
    }),
  });
  const buildMs = performance.now() - built;
  if (argv.includes('--build-only')) {
    const parameters = net.namedParameters().reduce((n, [, v]) => n + v.size, 0);
    process.stdout.write(
      `XTBUILD ${JSON.stringify({ backend: backendName, config: configName, parameters, build_ms: Math.round(buildMs) })}\n`,
    );
    return;
  }
  const model = new AutoregressiveWrapper(net);
  const params = model.namedParameters();
  const opt = new AdamW(params, { learningRate: 3e-4, weightDecay: 0 });
  const vars = params.map(([, v]) => v);
  const names = new Map(params.map(([n, v]) => [v.name, n]));
  const rng = new Rng(0);
  const data = new Int32Array(c.batch * (c.seq + 1));
  for (let k = 0; k < data.length; k++) data[k] = rng.int(0, c.vocab);
  const x = tf.tensor2d(data, [c.batch, c.seq + 1], 'int32');

  const step = (): void => {
    // the Trainer's backward pass: each gradient is freed as soon as it has been used
    const { value, grads } = withPrecision(precision, () =>
      variableGradsLean(() => model.forward(x) as TF.Scalar, vars),
    );
    value.dataSync();
    const named: Record<string, TF.Tensor> = {};
    for (const [k, g] of Object.entries(grads)) named[names.get(k) ?? k] = g;
    opt.apply(named);
    tf.dispose([value, ...Object.values(grads)]);
  };
  model.train();
  const total = c.warmupSteps + c.trainSteps;
  let t0 = 0;
  for (let s = 0; s < total; s++) {
    if (s === c.warmupSteps) t0 = performance.now();
    progress(`[${backendName}] train step ${s + 1}/${total}`);
    step();
  }
  const trainTokS = (c.batch * c.seq * c.trainSteps) / ((performance.now() - t0) / 1000);

  model.eval();
  const prompt = new Array<number>(c.prompt);
  for (let k = 0; k < c.prompt; k++) prompt[k] = rng.int(0, c.vocab);
  const gen = async (cacheKv: boolean): Promise<number> => {
    const start = performance.now();
    const out = await model.generate([prompt], c.newTokens, { temperature: 0, cacheKv, precision });
    out.dispose();
    return c.newTokens / ((performance.now() - start) / 1000);
  };
  progress(`[${backendName}] generation warm-up`);
  await gen(true);
  progress(`[${backendName}] generation with kv cache`);
  const genCache = await gen(true);
  progress(`[${backendName}] generation without kv cache`);
  const genNoCache = await gen(false);
  x.dispose();
  opt.dispose();
  const peak = process.resourceUsage().maxRSS / 1024;
  const r: Result = {
    backend: backendName,
    config: configName,
    threads: `${threads}/${process.env.OPENBLAS_NUM_THREADS ?? '?'}`,
    train_tok_s: Math.round(trainTokS),
    gen_tok_s_cache: Math.round(genCache),
    gen_tok_s_nocache: Math.round(genNoCache),
    peak_rss_mb: Math.round(peak),
    build_ms: Math.round(buildMs),
    precision,
    device: backendInfo()?.device ?? 'cpu',
  };
  process.stdout.write(`XTBENCH ${JSON.stringify(r)}\n`);
}

function runChild(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} exited with ${code}`))));
  });
}

/** The environment of a measured child: LibTorch's threads and every BLAS pool pinned. */
function pinned(intra: number, blas: number): NodeJS.ProcessEnv {
  const b = String(blas);
  return {
    ...process.env,
    XT_NUM_THREADS: String(intra),
    OMP_NUM_THREADS: b,
    OPENBLAS_NUM_THREADS: b,
    MKL_NUM_THREADS: b,
  };
}

/**
 * Our library on one backend, in a child process. `waitPolicy`: OpenMP's (the library sets PASSIVE
 * unless told; ACTIVE spins, which trains faster on cores nothing else uses).
 */
async function ours(
  runner: string[],
  backend: string,
  intra: number,
  blas: number,
  waitPolicy?: 'ACTIVE' | 'PASSIVE',
): Promise<Result> {
  progress(
    `[${backend}] config=${configName} threads=${intra} blas=${blas}${waitPolicy ? ` omp=${waitPolicy}` : ''}`,
  );
  const env = pinned(intra, blas);
  if (waitPolicy) env.OMP_WAIT_POLICY = waitPolicy;
  const out = await runChild(
    process.execPath,
    [
      ...runner,
      '--child',
      backend,
      '--config',
      configName,
      '--threads',
      String(intra),
      '--precision',
      precision,
    ],
    env,
  );
  const line = out.split('\n').find((l) => l.startsWith('XTBENCH '));
  if (!line) throw new Error(`bench: backend ${backend} produced no result`);
  const r = JSON.parse(line.slice(8)) as Result;
  if (waitPolicy) r.threads += ` omp ${waitPolicy.toLowerCase()}`;
  return r;
}

/** PyTorch baseline: the shared reference script on the same workload, with its peak RSS. */
async function pytorch(intra: number, blas: number): Promise<Result & { torch: string }> {
  const script = path.join('..', 'shared', 'bench', 'torch_reference.py');
  if (!existsSync(path.join(root, script))) throw new Error(`--baseline: ${script} not found`);
  const py = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
  const args = ['--threads', String(intra), '--config', configName, '--vocab', String(config.vocab)];
  if (cudaRun) args.push('--device', 'cuda');
  if (precision === 'bf16') args.push('--bf16');
  const wrapper = [
    'import resource, runpy, sys, json',
    `sys.argv = [${JSON.stringify(script)}, ${args.map((a) => JSON.stringify(a)).join(', ')}]`,
    `runpy.run_path(${JSON.stringify(script)}, run_name='__main__')`,
    "print('XTRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
  ].join('\n');
  progress(`[pytorch] config=${configName} threads=${intra} blas=${blas}`);
  const out = await runChild(py, ['-c', wrapper], pinned(intra, blas));
  const line = out.split('\n').find((l) => l.trim().startsWith('{'));
  const rss = out.split('\n').find((l) => l.startsWith('XTRSS'));
  if (!line) throw new Error(`--baseline: no JSON line from ${script}`);
  const r = JSON.parse(line) as {
    train_tok_s: number;
    gen_tok_s_cache: number;
    gen_tok_s_nocache: number;
    torch: string;
  };
  return {
    backend: 'pytorch',
    config: configName,
    threads: `${intra}/${blas}`,
    train_tok_s: r.train_tok_s,
    gen_tok_s_cache: r.gen_tok_s_cache,
    gen_tok_s_nocache: r.gen_tok_s_nocache,
    peak_rss_mb: rss ? Math.round(Number(rss.split(/\s+/)[1]) / 1024) : NaN,
    torch: r.torch,
    precision,
    device: cudaRun ? 'cuda' : 'cpu',
  };
}

/** Runs every setting and keeps the one that trains fastest. */
async function best<T extends Result, S extends unknown[]>(
  settings: S[],
  run: (...s: S) => Promise<T>,
): Promise<T> {
  let top: T | null = null;
  for (const s of settings) {
    const r = await run(...s);
    progress(`[${r.backend}] threads ${r.threads}: train ${r.train_tok_s} tok/s`);
    if (!top || r.train_tok_s > top.train_tok_s) top = r;
  }
  return top!;
}

/**
 * How a child runs: this file bundled to plain JavaScript (build/bench/bench-child.mjs, dependencies
 * left external) so that the measured process carries no TypeScript loader; through tsx when the
 * bundler is unavailable.
 */
async function childCommand(): Promise<string[]> {
  const self = fileURLToPath(import.meta.url);
  const tsxArgs = [path.join(root, 'node_modules', 'tsx', 'dist', 'cli.mjs'), self];
  if (!self.endsWith('.ts')) return [self];
  try {
    const esbuild = await import('esbuild');
    const outfile = path.join(root, 'build', 'bench', 'bench-child.mjs');
    await esbuild.build({
      entryPoints: [self],
      bundle: true,
      platform: 'node',
      format: 'esm',
      target: 'node20',
      packages: 'external',
      outfile,
      logLevel: 'silent',
    });
    return [outfile];
  } catch (e) {
    progress(`children run through tsx (bundling failed: ${(e as Error).message})`);
    return tsxArgs;
  }
}

function describe(r: Result & { torch?: string }): string {
  const who = r.torch ? `pytorch ${r.torch}` : r.backend;
  return (
    `${who} (${r.config}, threads ${r.threads}): train ${r.train_tok_s} tok/s, ` +
    `generation ${r.gen_tok_s_cache} tok/s with kv cache, ${r.gen_tok_s_nocache} tok/s without, ` +
    `peak RSS ${r.peak_rss_mb} MB` +
    (r.build_ms !== undefined ? `, model built in ${r.build_ms} ms` : '')
  );
}

async function main(): Promise<void> {
  const childBackend = opt('--child');
  if (childBackend) return child(childBackend);
  const backends = (opt('--backend') ?? process.env.XT_BACKEND ?? 'torch').split(',').map((s) => s.trim());
  const cores = os.availableParallelism?.() ?? os.cpus().length;
  const all = argv.includes('--best');
  const results: Result[] = [];
  const runner = await childCommand();
  if (argv.includes('--build-only')) {
    for (const b of backends) {
      const out = await runChild(
        process.execPath,
        [...runner, '--child', b, '--config', configName, '--threads', String(threads), '--build-only'],
        pinned(threads, threads),
      );
      const line = out.split('\n').find((l) => l.startsWith('XTBUILD '));
      if (!line) throw new Error(`bench: backend ${b} produced no result`);
      const r = JSON.parse(line.slice(8)) as { parameters: number; build_ms: number };
      console.log(
        json
          ? JSON.stringify(r)
          : `${b} (${configName}): ${r.parameters} parameters built in ${r.build_ms} ms`,
      );
    }
    return;
  }
  for (const b of backends) {
    const r = all
      ? await best<Result, [number, number, 'ACTIVE' | 'PASSIVE']>(
          [
            [cores, cores, 'PASSIVE'],
            [cores, cores, 'ACTIVE'],
          ],
          (i, t, w) => ours(runner, b, i, t, w),
        )
      : await ours(runner, b, threads, threads);
    results.push(r);
    console.log(json ? JSON.stringify(r) : describe(r));
  }
  if (!argv.includes('--baseline')) return;
  if (configName === 'base') {
    console.log('baseline: the PyTorch reference script has no `base` config; skipped');
    return;
  }
  const py = all
    ? await best(
        [
          [1, cores],
          [cores, cores],
          [cores, 1],
        ],
        pytorch,
      )
    : await pytorch(threads, threads);
  console.log(json ? JSON.stringify(py) : describe(py));
  for (const r of results) {
    const ratio = {
      backend: r.backend,
      vs: 'pytorch',
      config: configName,
      threads: `${r.threads} vs ${py.threads}`,
      train: +(r.train_tok_s / py.train_tok_s).toFixed(2),
      gen_cache: +(r.gen_tok_s_cache / py.gen_tok_s_cache).toFixed(2),
      gen_nocache: +(r.gen_tok_s_nocache / py.gen_tok_s_nocache).toFixed(2),
      peak_rss: +(r.peak_rss_mb / py.peak_rss_mb).toFixed(2),
    };
    console.log(
      json
        ? JSON.stringify(ratio)
        : `${r.backend} / pytorch (threads ${ratio.threads}): train ${ratio.train}x, generation ${ratio.gen_cache}x ` +
            `with kv cache, ${ratio.gen_nocache}x without, peak RSS ${ratio.peak_rss}x`,
    );
  }
}

await main();
