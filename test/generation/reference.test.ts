import * as tf from '@tensorflow/tfjs-core';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { ContinuousAutoregressiveWrapper } from '../../src/generation/continuous-autoregressive-wrapper.js';
import { XLAutoregressiveWrapper } from '../../src/generation/xl-autoregressive-wrapper.js';
import { XValAutoregressiveWrapper } from '../../src/generation/xval-autoregressive-wrapper.js';
import { fromConfig } from '../../src/io/config.js';
import { loadSafetensors } from '../../src/io/safetensors.js';
import type { Module } from '../../src/nn/module.js';
import type { ContinuousTransformerWrapper } from '../../src/wrappers/continuous.js';
import type { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import type { XValTransformerWrapper } from '../../src/wrappers/xval.js';

// Fixtures written by the reference (x-transformers 2.0.1 on PyTorch) with ./fixtures/generate.py.
const DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures');

interface Spec {
  wrapper: string;
  kwargs: Record<string, unknown>;
  attn_layers?: { type: string; kwargs: Record<string, unknown> };
}

interface Fixture {
  meta: { name: string; task: string; spec: Spec; amateur_spec?: Spec };
  t: Record<string, tf.Tensor>;
  build(prefix?: string, spec?: Spec): Module;
  dispose(): void;
}

function read(name: string): Fixture {
  const { metadata, tensors } = loadSafetensors(readFileSync(path.join(DIR, `${name}.safetensors`)));
  const meta = JSON.parse(metadata.case!) as Fixture['meta'];
  return {
    meta,
    t: tensors,
    build(prefix = 'param.', spec = meta.spec) {
      const config: Record<string, unknown> = { wrapper: spec.wrapper, ...spec.kwargs };
      if (spec.attn_layers) config.attnLayers = { type: spec.attn_layers.type, ...spec.attn_layers.kwargs };
      const model = fromConfig(config) as unknown as Module;
      const params: Record<string, tf.Tensor> = {};
      for (const [k, v] of Object.entries(tensors))
        if (k.startsWith(prefix)) params[k.slice(prefix.length)] = v;
      model.loadStateDict(params);
      model.eval();
      return model;
    },
    dispose: () => Object.values(tensors).forEach((x) => x.dispose()),
  };
}

const close = (a: number, b: number): void =>
  expect(Math.abs(a - b)).toBeLessThanOrEqual(1e-4 + 1e-3 * Math.abs(b));

const scalar = (x: tf.Tensor): number => {
  const v = x.dataSync()[0]!;
  x.dispose();
  return v;
};

const genCases = readdirSync(DIR)
  .filter((f) => f.startsWith('gen_') && f.endsWith('.safetensors'))
  .map((f) => f.replace('.safetensors', ''))
  .sort();

describe('generation against the reference', () => {
  it('finds the fixtures', () => expect(genCases.length).toBeGreaterThanOrEqual(7));

  for (const name of genCases) {
    it(name, async () => {
      const f = read(name);
      const net = f.build() as TransformerWrapper;
      const amateur = f.meta.amateur_spec
        ? (f.build('amateur.', f.meta.amateur_spec) as TransformerWrapper)
        : undefined;
      const ar = new AutoregressiveWrapper(net);
      const prompt = f.t['input.prompt']!;
      const seqLen = f.t['output.tokens_cached']!.shape[1]!;
      const opts = {
        temperature: 0,
        ...(f.t['input.prompt_lens'] ? { promptLens: f.t['input.prompt_lens'] } : {}),
        ...(f.t['input.eos_token'] ? { eosToken: f.t['input.eos_token'].dataSync()[0]! } : {}),
        ...(amateur ? { amateurModel: amateur } : {}),
        ...(f.t['input.context']
          ? { context: f.t['input.context'], contextMask: f.t['input.context_mask'] }
          : {}),
      };
      const before = tf.memory().numTensors;
      for (const cacheKv of [true, false]) {
        const want = f.t[`output.tokens_${cacheKv ? 'cached' : 'uncached'}`];
        if (!want) continue;
        const got = await ar.generate(prompt, seqLen, { ...opts, cacheKv });
        expect(got.arraySync(), `${name} (${cacheKv ? 'cached' : 'uncached'})`).toEqual(want.arraySync());
        got.dispose();
      }
      expect(tf.memory().numTensors).toBe(before);
      net.dispose();
      amateur?.dispose();
      f.dispose();
    });
  }
});

describe('task wrappers against the reference', () => {
  it('XLAutoregressiveWrapper: segment-weighted loss and generation with memory catch-up', async () => {
    const f = read('xl_wrapper');
    const net = f.build() as TransformerWrapper;
    const xl = new XLAutoregressiveWrapper(net);
    close(scalar(xl.forward(f.t['input.x']!)), f.t['output.loss']!.dataSync()[0]!);
    const want = f.t['output.tokens']!;
    const got = await xl.generate(f.t['input.prompt']!, want.shape[1]!, { filterKwargs: { k: 1 } });
    expect(got.arraySync()).toEqual(want.arraySync());
    got.dispose();
    net.dispose();
    f.dispose();
  });

  it('ContinuousAutoregressiveWrapper: loss (plain, masked, equal weight per sequence) and generation', async () => {
    const f = read('continuous_wrapper');
    const net = f.build() as ContinuousTransformerWrapper;
    const x = f.t['input.x']!;
    const mask = f.t['input.mask']!;
    close(scalar(new ContinuousAutoregressiveWrapper(net).forward(x)), f.t['output.loss']!.dataSync()[0]!);
    close(
      scalar(new ContinuousAutoregressiveWrapper(net).forward(x, { mask })),
      f.t['output.loss_masked']!.dataSync()[0]!,
    );
    close(
      scalar(new ContinuousAutoregressiveWrapper(net, { equalLossWeightBatch: true }).forward(x, { mask })),
      f.t['output.loss_masked_equal']!.dataSync()[0]!,
    );
    const gen = await new ContinuousAutoregressiveWrapper(net).generate(f.t['input.start']!, 5);
    const want = f.t['output.generated']!;
    expect(gen.shape).toEqual(want.shape);
    const g = gen.dataSync();
    want.dataSync().forEach((v, i) => close(g[i]!, v));
    gen.dispose();
    net.dispose();
    f.dispose();
  });

  it('XValAutoregressiveWrapper: cross-entropy plus weighted numerical loss, and generation', async () => {
    const f = read('xval_wrapper');
    const net = f.build() as XValTransformerWrapper;
    const w = new XValAutoregressiveWrapper(net, { numericalLossWeight: 2 });
    close(scalar(w.forward(f.t['input.x']!, f.t['input.nums']!)), f.t['output.loss']!.dataSync()[0]!);
    const r = await w.generate(f.t['input.start']!, f.t['input.start_nums']!, 8, { filterKwargs: { k: 1 } });
    expect(r.sampledTokenIds.arraySync()).toEqual(f.t['output.gen_ids']!.arraySync());
    expect(r.isNumberMask.arraySync()).toEqual(f.t['output.gen_is_number']!.arraySync());
    const got = r.sampledNumbers.dataSync();
    f.t['output.gen_nums']!.dataSync().forEach((v, i) =>
      Number.isNaN(v) ? expect(Number.isNaN(got[i]!)).toBe(true) : close(got[i]!, v),
    );
    tf.dispose([r.sampledTokenIds, r.sampledNumbers, r.isNumberMask]);
    net.dispose();
    f.dispose();
  });
});
