/**
 * Demo: trains a small byte-level decoder on text found in this repository (README.md, docs/) and
 * in installed packages' READMEs, shows a progress bar with the falling loss, then samples text.
 *
 *   npm run demo -- [--steps 200] [--batch 8] [--seq-len 64] [--dim 64] [--depth 2] [--lr 1e-2]
 *                   [--sample-len 200] [--prompt "The "] [--seed 0] [--backend torch|wasm|cpu]
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import cliProgress from 'cli-progress';
import { initBackend } from '../src/backend/index.js';
import { AutoregressiveWrapper } from '../src/generation/autoregressive-wrapper.js';
import { createTokenizer } from '../src/io/tokenizer.js';
import { Decoder } from '../src/layers/attention-layers.js';
import { splitTokens, tokenizeText } from '../src/train/data.js';
import { Trainer } from '../src/train/trainer.js';
import { manualSeed } from '../src/utils/random.js';
import { TransformerWrapper } from '../src/wrappers/transformer-wrapper.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

interface Flags {
  steps: number;
  batch: number;
  seqLen: number;
  dim: number;
  depth: number;
  lr: number;
  sampleLen: number;
  prompt: string;
  seed: number;
  backend?: string;
}

function parseFlags(argv: string[]): Flags {
  const f: Flags = {
    steps: 200,
    batch: 8,
    seqLen: 64,
    dim: 64,
    depth: 2,
    lr: 1e-2,
    sampleLen: 200,
    prompt: 'The ',
    seed: 0,
  };
  const numeric: Record<string, keyof Flags> = {
    '--steps': 'steps',
    '--batch': 'batch',
    '--seq-len': 'seqLen',
    '--dim': 'dim',
    '--depth': 'depth',
    '--lr': 'lr',
    '--sample-len': 'sampleLen',
    '--seed': 'seed',
  };
  const args = argv.filter((a) => a !== '--');
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const [key, inline] = a.includes('=')
      ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]
      : [a, undefined];
    const value = (): string => {
      const v = inline ?? args[++i];
      if (v === undefined) throw new Error(`${key}: expected a value`);
      return v;
    };
    if (key === '--help' || key === '-h') {
      console.log(
        'usage: npm run demo -- [--steps N] [--batch N] [--seq-len N] [--dim N] [--depth N] [--lr X]',
      );
      console.log(
        '                       [--sample-len N] [--prompt TEXT] [--seed N] [--backend torch|wasm|cpu]',
      );
      process.exit(0);
    } else if (key in numeric) {
      const v = Number(value());
      if (!Number.isFinite(v) || v <= 0) throw new Error(`${key}: expected a positive number, got ${v}`);
      (f as unknown as Record<string, number>)[numeric[key]!] = v;
    } else if (key === '--prompt') f.prompt = value();
    else if (key === '--backend') f.backend = value();
    else throw new Error(`unknown flag ${a} (try --help)`);
  }
  return f;
}

/** Prose to learn from: this repository's docs, then READMEs of installed packages. */
function corpus(maxBytes = 300_000): { text: string; sources: string[] } {
  const files: string[] = [];
  const add = (p: string): void => {
    if (existsSync(p) && !files.includes(p)) files.push(p);
  };
  add(path.join(root, 'README.md'));
  for (const dir of ['docs', 'doc']) {
    const d = path.join(root, dir);
    if (existsSync(d)) for (const f of readdirSync(d).sort()) if (f.endsWith('.md')) add(path.join(d, f));
  }
  for (const pkg of [
    'fastify',
    'cli-progress',
    'bullmq',
    'debug',
    'ajv',
    'avvio',
    'ioredis',
    'prom-client',
    'commander',
    'semver',
  ]) {
    add(path.join(root, 'node_modules', pkg, 'README.md'));
  }
  let text = '';
  const sources: string[] = [];
  for (const f of files) {
    if (text.length >= maxBytes) break;
    text += readFileSync(f, 'utf8') + '\n\n';
    sources.push(path.relative(root, f));
  }
  return { text: text.slice(0, maxBytes), sources };
}

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2));
  let backend = await initBackend(flags.backend ?? process.env.XT_BACKEND);
  // training needs the gradient of the embedding lookup (UnsortedSegmentSum), which the wasm
  // backend does not implement: train on the cpu backend then
  if (tf.getBackend() === 'wasm' && !tf.getKernel('UnsortedSegmentSum', 'wasm')) {
    await import('@tensorflow/tfjs-backend-cpu');
    await tf.setBackend('cpu');
    backend = { ...backend, backend: 'cpu' };
    console.log('wasm lacks a kernel training needs (UnsortedSegmentSum): training on the cpu backend');
  }
  const tokenizer = createTokenizer('byte');
  const { text, sources } = corpus();
  const tokens = tokenizeText(text, tokenizer);
  const data = splitTokens(tokens, 0.05);
  console.log(
    `corpus: ${tokens.length} bytes from ${sources.length} files (${sources.slice(0, 4).join(', ')}${sources.length > 4 ? ', ...' : ''})`,
  );

  manualSeed(flags.seed);
  const net = new TransformerWrapper({
    numTokens: tokenizer.vocabSize,
    maxSeqLen: flags.seqLen,
    attnLayers: new Decoder({
      dim: flags.dim,
      depth: flags.depth,
      heads: 4,
      attnDimHead: Math.max(8, Math.floor(flags.dim / 4)),
      rotaryPosEmb: true,
    }),
  });
  const model = new AutoregressiveWrapper(net);
  console.log(
    `model: ${model.numParameters().toLocaleString()} parameters on ${backend.backend} (${backend.device})`,
  );

  const trainer = new Trainer(model, data, {
    totalSteps: flags.steps,
    batchSize: flags.batch,
    seqLen: flags.seqLen,
    learningRate: flags.lr,
    warmupSteps: Math.min(20, Math.floor(flags.steps / 10)),
    minLearningRate: flags.lr / 10,
    weightDecay: 0.01,
    gradClip: 1,
    evalBatches: 4,
    seed: flags.seed,
  });
  const start = trainer.evaluate();
  console.log(
    `validation loss before training: ${start.loss.toFixed(3)} (perplexity ${start.perplexity.toFixed(1)})`,
  );

  const bar = new cliProgress.SingleBar(
    {
      format: 'training [{bar}] {value}/{total} | loss {loss} | lr {lr} | {tps} tok/s | eta {eta_formatted}',
      hideCursor: true,
    },
    cliProgress.Presets.shades_classic,
  );
  bar.start(flags.steps, 0, { loss: '-', lr: '-', tps: '-' });
  const t0 = performance.now();
  let smooth: number | undefined;
  const checkpoints: string[] = [];
  await trainer.run({
    onStep: (r) => {
      smooth = smooth === undefined ? r.loss : 0.9 * smooth + 0.1 * r.loss;
      bar.update(r.step, {
        loss: smooth.toFixed(3),
        lr: r.learningRate.toExponential(1),
        tps: Math.round(r.tokensPerSecond),
      });
      if (r.step % Math.max(1, Math.floor(flags.steps / 5)) === 0)
        checkpoints.push(`step ${r.step}: loss ${smooth.toFixed(3)}`);
    },
  });
  bar.stop();
  const seconds = (performance.now() - t0) / 1000;
  for (const c of checkpoints) console.log(`  ${c}`);
  const end = trainer.evaluate();
  console.log(
    `validation loss after ${flags.steps} steps (${seconds.toFixed(1)} s): ${end.loss.toFixed(3)} (perplexity ${end.perplexity.toFixed(1)})`,
  );

  const prompt = tokenizer.encode(flags.prompt);
  const out: number[] = [];
  process.stdout.write(`\nsample: ${flags.prompt}`);
  for await (const step of model.generateStream([prompt], flags.sampleLen, {
    temperature: 0.8,
    filterLogitsFn: 'top_k',
    filterKwargs: { k: 20 },
    seed: flags.seed,
  })) {
    out.push(step.tokens[0]!);
  }
  process.stdout.write(tokenizer.decode(out) + '\n');
  trainer.dispose();
  model.dispose();
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
