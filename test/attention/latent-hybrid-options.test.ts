import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import { GRU, type HybridModule } from '../../src/attention/hybrid.js';
import { Module } from '../../src/nn/module.js';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { fromConfig, toConfig } from '../../src/io/config.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose } from './helpers.js';

// Multi-head latent attention's cache, the hybrid module's forms and the GRU's masks, and the errors
// of the options of latent attention, the hybrid module, qkvReceiveDiffResiduals, relPosKwargs and
// residualFnKwargs (their numbers against the reference: test/attention/options-parity.test.ts).

const ids = (xs: number[][]): tf.Tensor => tf.tensor2d(xs, [xs.length, xs[0]!.length], 'int32');
const errorOf = (fn: () => unknown): string => {
  try {
    const m = fn() as { dispose?: () => void };
    m?.dispose?.();
  } catch (e) {
    return (e as Error).message;
  }
  return '(no error)';
};

describe('multi-head latent attention: the cache holds the latents', () => {
  for (const [name, extra, vShape] of [
    ['latents only', {}, [1, 1, 5, 10]],
    ['rotary sub-heads', { attnLatentRopeSubheads: 2, rotaryPosEmb: true }, [1, 2, 5, 4]],
  ] as const) {
    it(`${name}: cached decoding equals the full pass, the cache is [b, 1, t, dimLatentKv]`, () => {
      manualSeed(5);
      const model = new TransformerWrapper({
        numTokens: 20,
        maxSeqLen: 16,
        attnLayers: new Decoder({
          dim: 16,
          depth: 2,
          heads: 4,
          attnDimHead: 4,
          attnUseLatentKv: true,
          attnDimLatentKv: 10,
          ...extra,
        }),
      });
      model.eval();
      const before = tf.memory().numTensors;
      tf.tidy(() => {
        const x = ids([[3, 1, 4, 1, 5, 9, 2]]);
        const full = model.forward(x);
        let st = model.forwardWithState(tf.slice(x, [0, 0], [1, 4]), { returnCache: true });
        const outs = [st.logits];
        for (let t = 5; t <= 7; t++) {
          const prev = st.cache!;
          st = model.forwardWithState(tf.slice(x, [0, 0], [1, t]), { cache: prev, returnCache: true });
          if (t === 5) {
            expect(prev.kvs[0]!.k.shape).toEqual([1, 1, 4, 10]);
            expect(st.cache!.kvs[0]!.v.shape).toEqual(vShape);
          }
          prev.dispose();
          outs.push(st.logits);
        }
        st.cache!.dispose();
        expectClose(tf.concat(outs, 1), full, 1e-5, 1e-4);
      });
      expect(tf.memory().numTensors).toBe(before);
      model.dispose();
    });
  }
});

describe('GRU', () => {
  it('a masked (right-padded) row gives what the row alone gives, and zeros past its end', () => {
    manualSeed(7);
    for (const bidirectional of [false, true]) {
      const gru = new GRU({ inputSize: 6, hiddenSize: 5, numLayers: 2, bidirectional });
      tf.tidy(() => {
        const x = tf.randomNormal([2, 9, 6], 0, 1, 'float32', 3);
        const lens = [9, 4];
        const mask = tf.less(
          tf.expandDims(tf.range(0, 9, 1, 'int32'), 0),
          tf.tensor2d([[9], [4]], [2, 1], 'int32'),
        );
        const out = gru.forward(x, { mask }).out;
        expect(out.shape).toEqual([2, 9, bidirectional ? 10 : 5]);
        lens.forEach((len, row) => {
          const alone = gru.forward(tf.slice(x, [row, 0, 0], [1, len, -1])).out;
          expectClose(tf.slice(out, [row, 0, 0], [1, len, -1]), alone, 1e-6, 1e-5);
          if (len < 9) {
            const tail = tf.slice(out, [row, len, 0], [1, -1, -1]);
            expect(tf.max(tf.abs(tail)).dataSync()[0]).toBe(0);
          }
        });
      });
      gru.dispose();
    }
  });

  it('clone() copies the parameters into new variables', () => {
    const gru = new GRU({ inputSize: 3, hiddenSize: 2 });
    const copy = gru.clone();
    const [a, b] = [gru.namedParameters(), copy.namedParameters()];
    expect(b.map(([n]) => n)).toEqual(['weight_ih_l0', 'weight_hh_l0', 'bias_ih_l0', 'bias_hh_l0']);
    a.forEach(([, v], i) => {
      expect(b[i]![1]).not.toBe(v);
      expect(Array.from(b[i]![1].dataSync())).toEqual(Array.from(v.dataSync()));
    });
    gru.dispose();
    copy.dispose();
  });
});

describe('hybrid module forms', () => {
  const base = { heads: 2, dimHead: 4, hybridFoldAxialDim: 1 };

  it('a factory is called once per attention layer, with the layer dim', () => {
    const dims: number[] = [];
    const layers = new Encoder({
      dim: 8,
      depth: 3,
      heads: 2,
      attnDimHead: 4,
      attnHybridFoldAxialDim: 2,
      attnHybridModule: (dim: number): HybridModule => {
        dims.push(dim);
        return new GRU({ inputSize: dim, hiddenSize: 8 });
      },
    });
    expect(dims).toEqual([8, 8, 8]);
    layers.dispose();
  });

  it('a module is copied (the attention owns its copy, as the reference deep-copies it)', () => {
    const gru = new GRU({ inputSize: 8, hiddenSize: 8 });
    const attn = new Attention(8, { ...base, hybridModule: gru });
    const own = attn.hybrid!.fn;
    expect(own).not.toBe(gru);
    expect(Array.from(own.namedParameters()[0]![1].dataSync())).toEqual(
      Array.from(gru.namedParameters()[0]![1].dataSync()),
    );
    attn.dispose();
    gru.dispose();
  });

  it('rejects bad hybrid options with the option, what was expected and what came', () => {
    const gru = (): GRU => new GRU({ inputSize: 8, hiddenSize: 8 });
    expect(errorOf(() => new Attention(8, { heads: 2, dimHead: 4, hybridModule: { type: 'gru' } }))).toBe(
      'hybridFoldAxialDim: expected a positive integer with hybridModule (1: no folding), got null',
    );
    expect(errorOf(() => new Attention(8, { heads: 2, dimHead: 4, hybridFoldAxialDim: 2 }))).toBe(
      'hybridFoldAxialDim: expected a hybridModule with it, got none',
    );
    expect(
      errorOf(
        () => new Attention(8, { ...base, hybridModule: { type: 'lstm' } as unknown as { type: 'gru' } }),
      ),
    ).toBe(`hybridModule.type: expected 'gru', got "lstm"`);
    expect(errorOf(() => new Attention(8, { ...base, hybridModule: { type: 'gru', hiddenSize: 0 } }))).toBe(
      'hybridModule.hiddenSize: expected a positive integer, got 0',
    );
    expect(
      errorOf(() => new Attention(8, { ...base, hybridModule: { type: 'gru', size: 3 } as never })),
    ).toBe('hybridModule.size: expected an option of a GRU spec, got an unknown option');
    expect(errorOf(() => new Attention(8, { ...base, hybridModule: { type: 'gru', hiddenSize: 6 } }))).toBe(
      '(no error)',
    );
    class NoClone extends Module {
      forward(x: tf.Tensor): { out: tf.Tensor } {
        return { out: x };
      }
    }
    expect(errorOf(() => new Attention(8, { ...base, hybridModule: new NoClone() as HybridModule }))).toMatch(
      /^hybridModule: expected a spec .*, a factory \(dim\) => module, or a module with forward and clone, got a NoClone without clone\(\)$/,
    );
    expect(
      errorOf(() => new Attention(8, { ...base, hybridModule: () => 3 as unknown as HybridModule })),
    ).toMatch(/^hybridModule: expected a spec .*, got 3$/);
    expect(errorOf(() => new Attention(8, { ...base, hybridMaskKwarg: '', hybridModule: gru() }))).toBe(
      'hybridMaskKwarg: expected a non-empty string, got ""',
    );
    expect(errorOf(() => new Attention(8, { ...base, valueDimHead: 2, hybridModule: gru() }))).toBe(
      'valueDimHead: expected dimHead (4) with hybridModule (both outputs are normed per head of dimHead), got 2',
    );
  });

  it('a hybrid output of the wrong width fails at the forward, naming what it expected', () => {
    const attn = new Attention(8, { ...base, hybridModule: { type: 'gru', hiddenSize: 6 } });
    const x = tf.zeros([1, 3, 8]);
    expect(errorOf(() => attn.forward(x))).toBe(
      'hybridModule: expected 8 output features (heads * dimHead), got 6',
    );
    x.dispose();
    attn.dispose();
  });

  it('a stack with a hybrid module recomputes instead of caching (its state spans the sequence)', () => {
    const layers = new Decoder({
      dim: 8,
      depth: 1,
      heads: 2,
      attnDimHead: 4,
      attnHybridModule: { type: 'gru' },
      attnHybridFoldAxialDim: 1,
    });
    expect(layers.canCacheKv).toBe(false);
    layers.dispose();
  });
});

describe('option errors', () => {
  const attn = (o: object) => () => new Attention(16, { heads: 4, dimHead: 4, ...o });
  const dec = (o: object) => () => new Decoder({ dim: 16, depth: 1, heads: 4, attnDimHead: 4, ...o });
  const cases: [string, () => unknown, string][] = [
    [
      'useLatentQ without its size',
      attn({ useLatentQ: true }),
      'dimLatentQ: expected a positive integer with useLatentQ, got null',
    ],
    [
      'useLatentKv without its size',
      attn({ useLatentKv: true }),
      'dimLatentKv: expected a positive integer with useLatentKv, got null',
    ],
    [
      'a latent size of 0',
      attn({ useLatentQ: true, dimLatentQ: 0 }),
      'dimLatentQ: expected a positive integer, got 0',
    ],
    [
      'rotary sub-heads without latent key/values',
      attn({ latentRopeSubheads: 2 }),
      'latentRopeSubheads: expected useLatentKv true with it, got 2',
    ],
    [
      'rotary sub-heads and rotateNumHeads',
      attn({ useLatentKv: true, dimLatentKv: 8, latentRopeSubheads: 2, rotateNumHeads: 2 }),
      'rotateNumHeads: expected null with latentRopeSubheads (which sets the rotated heads), got 2',
    ],
    [
      'more sub-heads than key/value heads',
      attn({ useLatentKv: true, dimLatentKv: 8, latentRopeSubheads: 5 }),
      'latentRopeSubheads: expected at most the key/value heads (4), got 5',
    ],
    [
      'latent queries of another size with a learned value residual mix',
      attn({ useLatentQ: true, dimLatentQ: 8, learnedValueResidualMix: true }),
      'dimLatentQ: expected 16 (dim) with learnedValueResidualMix, which mixes from the latent queries, got 8',
    ],
    [
      'three inputs with latent key/values',
      attn({ qkvReceiveDiffResiduals: true, useLatentKv: true, dimLatentKv: 8 }),
      'qkvReceiveDiffResiduals: expected no useLatentKv with it (that option reads one input x, here there are three)',
    ],
    [
      'qkvReceiveDiffResiduals without hyper-connections',
      dec({ qkvReceiveDiffResiduals: true }),
      'qkvReceiveDiffResiduals: expected numResidualStreams > 1 with it (the three inputs are mixed from the residual streams), got numResidualStreams 1',
    ],
    [
      'qkvReceiveDiffResiduals given as an attention option',
      dec({ numResidualStreams: 2, attnQkvReceiveDiffResiduals: true }),
      'attnQkvReceiveDiffResiduals: expected none (a stack option: set qkvReceiveDiffResiduals), got true',
    ],
    [
      'relPosKwargs without a scheme',
      dec({ relPosKwargs: { slopes: [1, 0.5] } }),
      'relPosKwargs.slopes: expected alibiPosBias true (slopes are ALiBi head slopes), got alibiPosBias false',
    ],
    [
      'relPosKwargs with an unknown key',
      dec({ alibiPosBias: true, relPosKwargs: { heads: 2 } }),
      "relPosKwargs.heads: expected only slopes (the stack sets the scheme's other arguments), got an unknown key",
    ],
    [
      'more slopes than heads',
      dec({ alibiPosBias: true, relPosKwargs: { slopes: [1, 1, 1, 1, 1] } }),
      'relPosKwargs.slopes: expected at most heads values 4, got 5',
    ],
    [
      'slopes that are not numbers',
      dec({ alibiPosBias: true, relPosKwargs: { slopes: ['a'] } }),
      'relPosKwargs.slopes: expected a non-empty list of finite numbers, got ["a"]',
    ],
    [
      'residualFnKwargs.tanh without hyper-connections',
      dec({ residualFnKwargs: { tanh: false } }),
      'residualFnKwargs.tanh: expected numResidualStreams > 1 (it is an option of hyper-connections), got numResidualStreams 1',
    ],
    [
      'residualFnKwargs with an unknown key',
      dec({ numResidualStreams: 2, residualFnKwargs: { layerIndex: 1 } }),
      "residualFnKwargs.layerIndex: expected only tanh (the stack sets the residual's other arguments), got an unknown key",
    ],
  ];
  for (const [name, fn, message] of cases) it(name, () => expect(errorOf(fn)).toBe(message));

  it('three inputs: x must be [3, b, n, dim]', () => {
    const a = new Attention(8, { heads: 2, dimHead: 4, qkvReceiveDiffResiduals: true });
    const x = tf.zeros([2, 3, 8]);
    expect(errorOf(() => a.forward(x))).toBe(
      'x: expected [3, batch, seq, 8] (query, key and value inputs: qkvReceiveDiffResiduals), got [2, 3, 8]',
    );
    x.dispose();
    a.dispose();
  });
});

describe('JSON configs', () => {
  const layers = {
    type: 'Decoder',
    dim: 16,
    depth: 1,
    heads: 4,
    attn_dim_head: 4,
    attn_use_latent_q: true,
    attn_dim_latent_q: 12,
    attn_use_latent_kv: true,
    attn_dim_latent_kv: 10,
    attn_latent_rope_subheads: 2,
    rotary_pos_emb: true,
    attn_hybrid_module: { type: 'gru', hidden_size: 16 },
    attn_hybrid_fold_axial_dim: 2,
    num_residual_streams: 2,
    residual_fn_kwargs: { tanh: false },
  };

  it('accepts the options in snake_case and writes them back (toConfig) to the same model', () => {
    const model = fromConfig({
      wrapper: 'TransformerWrapper',
      num_tokens: 24,
      max_seq_len: 16,
      attn_layers: layers,
    });
    const names = model.namedParameters().map(([n]) => n);
    for (const n of [
      'to_latent_q.weight',
      'to_latent_kv.weight',
      'to_rotateable_k.weight',
      'hybrid_module.fn.weight_ih_l0',
      'hybrid_norms.1.gamma',
      'hybrid_mix.weight',
    ])
      expect(names).toContain(`attn_layers.layers.0.1.${n}`);
    const config = toConfig(model);
    expect(config.attnLayers).toMatchObject({
      attnUseLatentQ: true,
      attnDimLatentQ: 12,
      attnLatentRopeSubheads: 2,
      attnHybridModule: { type: 'gru', hidden_size: 16 },
      attnHybridFoldAxialDim: 2,
      residualFnKwargs: { tanh: false },
    });
    const again = fromConfig(JSON.parse(JSON.stringify(config)));
    expect(again.namedParameters().map(([n, v]) => `${n} ${v.shape.join('x')}`)).toEqual(
      model.namedParameters().map(([n, v]) => `${n} ${v.shape.join('x')}`),
    );
    model.dispose();
    again.dispose();
  });

  it('a hybrid module given as code has no JSON form: toConfig says so', () => {
    const model = new TransformerWrapper({
      numTokens: 24,
      maxSeqLen: 16,
      attnLayers: new Decoder({
        dim: 8,
        depth: 1,
        heads: 2,
        attnDimHead: 4,
        attnHybridFoldAxialDim: 1,
        attnHybridModule: (dim: number) => new GRU({ inputSize: dim, hiddenSize: 8 }),
      }),
    });
    expect(errorOf(() => toConfig(model))).toBe(
      "toConfig: attnHybridModule is code (a function or module), which has no JSON form (a spec {type: 'gru', ...} has)",
    );
    model.dispose();
  });

  it('names the key path of a bad value', () => {
    const build = (extra: object) => () =>
      fromConfig({
        wrapper: 'TransformerWrapper',
        num_tokens: 24,
        max_seq_len: 16,
        attn_layers: { ...layers, ...extra },
      });
    expect(errorOf(build({ attn_dim_latent_q: 0 }))).toBe(
      'attnLayers.attnDimLatentQ: expected a positive integer, got 0',
    );
    expect(errorOf(build({ attn_hybrid_module: { type: 'lstm' } }))).toBe(
      `attnLayers.attnHybridModule.type: expected 'gru', got "lstm"`,
    );
    expect(errorOf(build({ attn_hybrid_module: { type: 'gru', num_layers: 1.5 } }))).toBe(
      'attnLayers.attnHybridModule.numLayers: expected a positive integer, got 1.5',
    );
    expect(errorOf(build({ attn_hybrid_fold_axial_dim: -1 }))).toBe(
      'attnLayers.attnHybridFoldAxialDim: expected a positive integer, got -1',
    );
    expect(errorOf(build({ qkv_receive_diff_residuals: 'yes' }))).toBe(
      'attnLayers.qkvReceiveDiffResiduals: expected a boolean, got "yes"',
    );
    expect(errorOf(build({ rel_pos_kwargs: { slopes: [1] } }))).toBe(
      'attnLayers.relPosKwargs.slopes: expected alibiPosBias true (slopes are ALiBi head slopes), got alibiPosBias false',
    );
  });
});
