/**
 * Benchmark: training and generation throughput of the library on one or more backends.
 *
 *   npm run bench -- [--config small|base] [--backend torch[,cpu,...]] [--threads N] [--json] [--baseline]
 *
 * `small` is the workload of ../shared/bench/torch_reference.py: vocab 256, dim 256, depth 4, heads 4,
 * rotary, seq 256, batch 4, Adam lr 3e-4; generation batch 1, prompt 16, 240 new tokens, greedy, with
 * and without a key/value cache. Each backend runs in its own child process (so peak RSS is its own).
 * `--baseline` also runs the PyTorch script (same threads) and prints ratios.
 * `--json` prints one line per backend: {"backend","config","train_tok_s","gen_tok_s_cache",
 * "gen_tok_s_nocache","peak_rss_mb"} (and one "pytorch" line with --baseline).
 */
import type * as TF from '@tensorflow/tfjs-core';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
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

const CONFIGS: Record<string, BenchConfig> = {
  small: {
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
  },
  base: {
    vocab: 256,
    dim: 512,
    depth: 6,
    heads: 8,
    seq: 512,
    batch: 4,
    trainSteps: 4,
    warmupSteps: 1,
    prompt: 16,
    newTokens: 240,
  },
};

interface Result {
  backend: string;
  config: string;
  train_tok_s: number;
  gen_tok_s_cache: number;
  gen_tok_s_nocache: number;
  peak_rss_mb: number;
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
  manualSeed(0);
  const c = config;
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
    const { value, grads } = variableGradsLean(() => model.forward(x) as TF.Scalar, vars);
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
    const out = await model.generate([prompt], c.newTokens, { temperature: 0, cacheKv });
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
    train_tok_s: Math.round(trainTokS),
    gen_tok_s_cache: Math.round(genCache),
    gen_tok_s_nocache: Math.round(genNoCache),
    peak_rss_mb: Math.round(peak),
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

/** PyTorch baseline: the shared reference script, with its peak RSS. */
async function baseline(): Promise<Result & { torch: string }> {
  const script = path.join('..', 'shared', 'bench', 'torch_reference.py');
  if (!existsSync(path.join(root, script))) throw new Error(`--baseline: ${script} not found`);
  const py = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
  const wrapper = [
    'import resource, runpy, sys, json',
    `sys.argv = [${JSON.stringify(script)}, '--threads', '${threads}']`,
    `runpy.run_path(${JSON.stringify(script)}, run_name='__main__')`,
    "print('XTRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
  ].join('\n');
  progress('[pytorch] running the reference script');
  const out = await runChild(py, ['-c', wrapper], process.env);
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
    config: 'small',
    train_tok_s: r.train_tok_s,
    gen_tok_s_cache: r.gen_tok_s_cache,
    gen_tok_s_nocache: r.gen_tok_s_nocache,
    peak_rss_mb: rss ? Math.round(Number(rss.split(/\s+/)[1]) / 1024) : NaN,
    torch: r.torch,
  };
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

async function main(): Promise<void> {
  const childBackend = opt('--child');
  if (childBackend) return child(childBackend);
  const backends = (opt('--backend') ?? process.env.XT_BACKEND ?? 'torch').split(',').map((s) => s.trim());
  const results: Result[] = [];
  const runner = await childCommand();
  for (const b of backends) {
    progress(`[${b}] config=${configName} threads=${threads}`);
    const out = await runChild(
      process.execPath,
      [...runner, '--child', b, '--config', configName, '--threads', String(threads)],
      { ...process.env, XT_NUM_THREADS: String(threads) },
    );
    const line = out.split('\n').find((l) => l.startsWith('XTBENCH '));
    if (!line) throw new Error(`bench: backend ${b} produced no result`);
    const r = JSON.parse(line.slice(8)) as Result;
    results.push(r);
    if (json) console.log(JSON.stringify(r));
    else
      console.log(
        `${r.backend} (${r.config}, ${threads} thread${threads > 1 ? 's' : ''}): train ${r.train_tok_s} tok/s, ` +
          `generation ${r.gen_tok_s_cache} tok/s with kv cache, ${r.gen_tok_s_nocache} tok/s without, ` +
          `peak RSS ${r.peak_rss_mb} MB`,
      );
  }
  if (argv.includes('--baseline')) {
    if (configName !== 'small') {
      console.log('baseline: the PyTorch reference script runs the small config only; skipped');
      return;
    }
    const py = await baseline();
    if (json) console.log(JSON.stringify(py));
    else
      console.log(
        `pytorch ${py.torch} (small, ${threads} thread${threads > 1 ? 's' : ''}): train ${py.train_tok_s} tok/s, ` +
          `generation ${py.gen_tok_s_cache} tok/s with kv cache, ${py.gen_tok_s_nocache} tok/s without, ` +
          `peak RSS ${py.peak_rss_mb} MB`,
      );
    for (const r of results) {
      const ratio = {
        backend: r.backend,
        vs: 'pytorch',
        train: +(r.train_tok_s / py.train_tok_s).toFixed(2),
        gen_cache: +(r.gen_tok_s_cache / py.gen_tok_s_cache).toFixed(2),
        gen_nocache: +(r.gen_tok_s_nocache / py.gen_tok_s_nocache).toFixed(2),
        peak_rss: +(r.peak_rss_mb / py.peak_rss_mb).toFixed(2),
      };
      if (json) console.log(JSON.stringify(ratio));
      else
        console.log(
          `${r.backend} / pytorch: train ${ratio.train}x, generation ${ratio.gen_cache}x with kv cache, ` +
            `${ratio.gen_nocache}x without, peak RSS ${ratio.peak_rss}x`,
        );
    }
  }
}

await main();
