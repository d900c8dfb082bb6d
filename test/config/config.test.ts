import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { fromConfig, toConfig, camelKey, type BuiltModel } from '../../src/io/config.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { ViTransformerWrapper } from '../../src/wrappers/vit.js';
import { ContinuousTransformerWrapper } from '../../src/wrappers/continuous.js';
import { XValTransformerWrapper } from '../../src/wrappers/xval.js';
import { XTransformer } from '../../src/wrappers/xtransformer.js';
import { CrossAttender, Decoder, Encoder } from '../../src/layers/attention-layers.js';

const layers = { type: 'Decoder', dim: 8, depth: 1, heads: 2, attnDimHead: 4 };
const lm = { wrapper: 'TransformerWrapper', numTokens: 10, maxSeqLen: 8, attnLayers: layers };
/** A flat XTransformer config in the reference's snake_case. */
const xt = {
  wrapper: 'XTransformer',
  dim: 8,
  enc_num_tokens: 10,
  enc_max_seq_len: 8,
  enc_depth: 1,
  dec_num_tokens: 10,
  dec_max_seq_len: 8,
  dec_depth: 1,
};

const shapes = (m: BuiltModel): [string, number[]][] => m.namedParameters().map(([n, v]) => [n, v.shape]);
const maxDiff = (a: tf.Tensor, b: tf.Tensor): number =>
  tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]!);

function fails(config: unknown): string {
  try {
    fromConfig(config).dispose();
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
}

describe('fromConfig errors name the key path', () => {
  it('rejects a negative depth', () => {
    expect(fails({ ...lm, attnLayers: { ...layers, depth: -1 } })).toBe(
      'attnLayers.depth: expected a positive integer, got -1',
    );
  });
  it('rejects unknown keys at every level', () => {
    expect(fails({ ...lm, bogus: 1 })).toBe(
      'bogus: expected an option of TransformerWrapper, got an unknown option',
    );
    expect(fails({ ...lm, attnLayers: { ...layers, bogus: true } })).toMatch(
      /^attnLayers\.bogus: expected an option of Decoder, got an unknown option$/,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, attnBogus: true } })).toMatch(
      /^attnLayers\.attnBogus: expected an option of Attention, got an unknown option$/,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, ff_bogus: true } })).toMatch(
      /^attnLayers\.ffBogus: expected an option of FeedForward, got an unknown option$/,
    );
    expect(fails({ ...lm, wrapper: 'Nope' })).toMatch(/^wrapper: expected one of TransformerWrapper, /);
    expect(fails({ ...lm, attnLayers: { ...layers, type: 'Stack' } })).toMatch(
      /^attnLayers\.type: expected one of /,
    );
  });
  it('rejects wrong types and out-of-range values', () => {
    expect(fails({ ...lm, attnLayers: { ...layers, ffGlu: 'yes' } })).toBe(
      'attnLayers.ffGlu: expected a boolean, got "yes"',
    );
    expect(fails({ ...lm, attnLayers: { ...layers, heads: 2.5 } })).toBe(
      'attnLayers.heads: expected a positive integer, got 2.5',
    );
    expect(fails({ ...lm, embDropout: 1.5 })).toBe('embDropout: expected a number in [0, 1), got 1.5');
    expect(fails({ ...lm, numTokens: '10' })).toBe('numTokens: expected a positive integer, got "10"');
    expect(fails({ ...lm, attnLayers: { ...layers, attnDropout: -0.1 } })).toBe(
      'attnLayers.attnDropout: expected a number in [0, 1), got -0.1',
    );
    expect(fails({ ...lm, attnLayers: { ...layers, customLayers: ['a', 'x'] } })).toMatch(
      /^attnLayers\.customLayers: expected a non-empty list of 'a', 'c', 'f'/,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, disable_abs_pos_emb: 1 } })).toBe(
      'attnLayers.disableAbsPosEmb: expected a boolean, got 1',
    );
    expect(fails({ ...lm, maxSeqLen: undefined })).toBe(
      'maxSeqLen: expected a non-negative integer, got undefined',
    );
    expect(fails({ wrapper: 'TransformerWrapper', numTokens: 10, maxSeqLen: 8 })).toMatch(
      /^attnLayers: expected an object/,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, dim: undefined } })).toBe(
      'attnLayers.dim: expected a positive integer, got undefined',
    );
  });
  it('prefixes the constructors own checks with the path', () => {
    expect(fails({ ...lm, attnLayers: { ...layers, type: 'Encoder', causal: true } })).toMatch(
      /^attnLayers\.causal: /,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, type: 'Encoder', rotaryXpos: true } })).toMatch(
      /^attnLayers\.rotaryXpos: /,
    );
    expect(fails({ ...lm, attnLayers: { ...layers, preNorm: false, sandwichNorm: true } })).toMatch(
      /^attnLayers\.sandwichNorm: /,
    );
    expect(
      fails({
        wrapper: 'ViTransformerWrapper',
        imageSize: 10,
        patchSize: 4,
        attnLayers: { ...layers, type: 'Encoder' },
      }),
    ).toMatch(/^imageSize: expected a multiple of patchSize 4, got 10/);
  });
  it('rejects a feedforward factor whose size floor(dim * ffMult) is zero or beyond a tensor dimension', () => {
    for (const ffMult of [2 ** 53, 1e308, 2 ** 28, 1e-3]) {
      const inner = Math.floor(layers.dim * ffMult);
      expect([ffMult, inner >= 1 && inner < 2 ** 31]).toEqual([ffMult, false]);
      expect(fails({ ...lm, attnLayers: { ...layers, ffMult } })).toBe(
        `attnLayers.ffMult: expected a factor that makes the feedforward size floor(dim * mult) an integer in [1, 2147483647] (dim is 8), got ${JSON.stringify(ffMult)}`,
      );
    }
    // the largest and smallest factors that still give a size: a size of 1 builds
    expect(fails({ ...lm, attnLayers: { ...layers, ffMult: 1 / layers.dim } })).toBe('no error');
    expect(fails({ ...xt, dec_ff_mult: 2 ** 53 })).toMatch(
      /^decFfMult: expected a factor that makes the feedforward size floor\(dim \* mult\)/,
    );
  });
  it('rejects a key given both in snake_case and camelCase', () => {
    expect(fails({ ...lm, max_seq_len: 8 })).toBe(
      'maxSeqLen: expected one spelling of the key, got both maxSeqLen and max_seq_len',
    );
  });
  it('names flat XTransformer options', () => {
    const x = xt;
    expect(fails({ ...x, enc_depth: -1 })).toBe('encDepth: expected a positive integer, got -1');
    expect(fails({ ...x, dec_attn_bogus: 1 })).toBe(
      'decAttnBogus: expected an option of Attention, got an unknown option',
    );
    expect(fails({ ...x, depth: 2 })).toMatch(/^depth: expected an option of XTransformer \(encoder/);
    expect(fails({ ...x, dec_num_tokens: undefined })).toMatch(/^decNumTokens: expected a positive integer/);
  });
});

describe('fromConfig builds every wrapper', () => {
  it('accepts the reference snake_case keys exactly like camelCase', () => {
    const snake = {
      wrapper: 'TransformerWrapper',
      num_tokens: 10,
      max_seq_len: 8,
      post_emb_norm: true,
      attn_layers: {
        type: 'Decoder',
        dim: 8,
        depth: 1,
        heads: 2,
        attn_dim_head: 4,
        ff_glu: true,
        rotary_pos_emb: true,
      },
    };
    const camel = {
      wrapper: 'TransformerWrapper',
      numTokens: 10,
      maxSeqLen: 8,
      postEmbNorm: true,
      attnLayers: {
        type: 'Decoder',
        dim: 8,
        depth: 1,
        heads: 2,
        attnDimHead: 4,
        ffGlu: true,
        rotaryPosEmb: true,
      },
    };
    const a = fromConfig(snake);
    const b = fromConfig(JSON.stringify(camel));
    expect(a).toBeInstanceOf(TransformerWrapper);
    expect(shapes(a)).toEqual(shapes(b));
    expect(shapes(a).map(([n]) => n)).toContain('attn_layers.layers.1.1.ff.0.proj.weight');
    expect(toConfig(a)).toEqual(toConfig(b));
    a.dispose();
    b.dispose();
    expect(camelKey('attn_qk_norm_dim_scale')).toBe('attnQkNormDimScale');
  });

  it('builds the right classes', () => {
    const cases: [unknown, new (...a: never[]) => unknown][] = [
      [lm, TransformerWrapper],
      [
        {
          wrapper: 'ViTransformerWrapper',
          image_size: 8,
          patch_size: 4,
          attn_layers: { ...layers, type: 'Encoder' },
        },
        ViTransformerWrapper,
      ],
      [
        { wrapper: 'ContinuousTransformerWrapper', max_seq_len: 8, dim_in: 3, attn_layers: layers },
        ContinuousTransformerWrapper,
      ],
      [
        {
          wrapper: 'XValTransformerWrapper',
          num_tokens: 5,
          max_seq_len: 8,
          numerical_token_id: 4,
          attn_layers: layers,
        },
        XValTransformerWrapper,
      ],
      [
        {
          wrapper: 'XTransformer',
          dim: 8,
          enc_num_tokens: 5,
          enc_max_seq_len: 8,
          enc_depth: 1,
          dec_num_tokens: 5,
          dec_max_seq_len: 8,
          dec_depth: 1,
        },
        XTransformer,
      ],
      [{ wrapper: 'CrossAttender', dim: 8, depth: 1 }, CrossAttender],
      [{ wrapper: 'Encoder', dim: 8, depth: 1 }, Encoder],
      [{ ...lm, attnLayers: { ...layers, type: 'Decoder' } }, TransformerWrapper],
    ];
    for (const [config, cls] of cases) {
      const m = fromConfig(config);
      expect(m).toBeInstanceOf(cls);
      m.dispose();
    }
    const d = fromConfig({ wrapper: 'Decoder', dim: 8, depth: 1, cross_attend: true });
    expect(d).toBeInstanceOf(Decoder);
    d.dispose();
  });
});

describe('toConfig round trip', () => {
  const configs: Record<string, unknown> = {
    TransformerWrapper: {
      ...lm,
      numMemoryTokens: 2,
      attnLayers: { ...layers, rotaryPosEmb: true, ffGlu: true, attnQkNorm: true, shiftTokens: [1, 0] },
    },
    ViTransformerWrapper: {
      wrapper: 'ViTransformerWrapper',
      imageSize: 8,
      patchSize: 4,
      numClasses: 3,
      postEmbNorm: true,
      attnLayers: { ...layers, type: 'Encoder' },
    },
    ContinuousTransformerWrapper: {
      wrapper: 'ContinuousTransformerWrapper',
      maxSeqLen: 8,
      dimIn: 3,
      dimOut: 2,
      numMemoryTokens: 1,
      attnLayers: { ...layers, useRmsnorm: true },
    },
    XValTransformerWrapper: {
      wrapper: 'XValTransformerWrapper',
      numTokens: 5,
      maxSeqLen: 8,
      numericalTokenId: 4,
      attnLayers: layers,
    },
    XTransformer: {
      wrapper: 'XTransformer',
      dim: 8,
      tieTokenEmb: true,
      encNumTokens: 5,
      encMaxSeqLen: 8,
      encDepth: 1,
      encHeads: 2,
      encAttnDimHead: 4,
      decNumTokens: 5,
      decMaxSeqLen: 8,
      decDepth: 1,
      decHeads: 2,
      decCrossResidualAttn: true,
    },
    CrossAttender: { wrapper: 'CrossAttender', dim: 8, depth: 1, heads: 2, attnDimHead: 4 },
  };

  const inputs = (name: string): { run: (m: BuiltModel) => tf.Tensor; dispose: () => void } => {
    const ids = tf.tensor([[1, 2, 3, 4]], [1, 4], 'int32');
    const img = tf.randomNormal([1, 3, 8, 8], 0, 1, 'float32', 1);
    const vec = tf.randomNormal([1, 4, 3], 0, 1, 'float32', 2);
    const ctx = tf.randomNormal([1, 3, 8], 0, 1, 'float32', 3);
    const nums = tf.tensor([[0, 1.5, 0, 2]]);
    const run = (m: BuiltModel): tf.Tensor => {
      switch (name) {
        case 'ViTransformerWrapper':
          return (m as ViTransformerWrapper).forward(img);
        case 'ContinuousTransformerWrapper':
          return (m as ContinuousTransformerWrapper).forward(vec);
        case 'XValTransformerWrapper': {
          const { logits, numerical } = (m as XValTransformerWrapper).forward(ids, nums);
          numerical.dispose();
          return logits;
        }
        case 'XTransformer':
          return (m as XTransformer).forward(ids, ids);
        case 'CrossAttender': {
          const r = (m as CrossAttender).forward(ctx, { context: ctx });
          return r.out;
        }
        default:
          return (m as TransformerWrapper).forward(ids);
      }
    };
    return { run, dispose: () => tf.dispose([ids, img, vec, ctx, nums]) };
  };

  for (const [name, config] of Object.entries(configs)) {
    it(`${name}: same config, parameters and outputs`, () => {
      const a = fromConfig(config).eval();
      const json = toConfig(a);
      expect(json.wrapper).toBe(name);
      const b = fromConfig(JSON.parse(JSON.stringify(json))).eval();
      expect(toConfig(b)).toEqual(json);
      expect(shapes(b)).toEqual(shapes(a));
      expect(Object.keys(b.stateDict())).toEqual(Object.keys(a.stateDict()));
      b.loadStateDict(a.stateDict());
      const io = inputs(name);
      const ya = io.run(a);
      const yb = io.run(b);
      expect(maxDiff(ya, yb)).toBe(0);
      tf.dispose([ya, yb]);
      io.dispose();
      a.dispose();
      b.dispose();
    });
  }

  it('writes only non-default options, in camelCase', () => {
    const m = fromConfig({
      wrapper: 'TransformerWrapper',
      num_tokens: 10,
      max_seq_len: 8,
      attn_layers: { ...layers, attn_flash: true },
    });
    expect(toConfig(m)).toEqual({
      wrapper: 'TransformerWrapper',
      numTokens: 10,
      maxSeqLen: 8,
      attnLayers: { type: 'Decoder', dim: 8, depth: 1, heads: 2, attnDimHead: 4, attnFlash: true },
    });
    m.dispose();
  });
});
