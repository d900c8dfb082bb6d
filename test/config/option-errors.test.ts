import { describe, expect, it } from 'vitest';
import { fromConfig, snakeKey } from '../../src/io/config.js';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { XTransformer, type XTransformerOptions } from '../../src/wrappers/xtransformer.js';
import { OptionError } from '../../src/utils/errors.js';
import type { AttentionLayersOptions } from '../../src/layers/options.js';

/** The message of what `fn` throws (an OptionError), or '(no error)'. */
function errorOf(fn: () => { dispose(): void }): string {
  try {
    fn().dispose();
  } catch (e) {
    expect(e).toBeInstanceOf(OptionError);
    return (e as Error).message;
  }
  return '(no error)';
}

const snake = (o: Record<string, unknown>): Record<string, unknown> =>
  Object.fromEntries(Object.entries(o).map(([k, v]) => [snakeKey(k), v]));

const base = { dim: 8, depth: 1, heads: 2 };

// a stack's bad options, the class they are given to and the error it must give
const stackCases: [Record<string, unknown>, 'Encoder' | 'Decoder', string][] = [
  [{ depth: -1 }, 'Decoder', 'depth: expected a positive integer, got -1'],
  [{ heads: 2.5 }, 'Decoder', 'heads: expected a positive integer, got 2.5'],
  [{ attnDimHead: 0 }, 'Decoder', 'attnDimHead: expected a positive integer, got 0'],
  [{ attnDropout: 1.5 }, 'Encoder', 'attnDropout: expected a number in [0, 1), got 1.5'],
  [{ crossAttnDimHead: 0 }, 'Decoder', 'crossAttnDimHead: expected a positive integer, got 0'],
  [{ ffGlu: 'yes' }, 'Decoder', 'ffGlu: expected a boolean, got "yes"'],
  [
    { ffMult: 1e-3 },
    'Decoder',
    'ffMult: expected a factor that makes the feedforward size floor(dim * mult) an integer in [1, 2147483647] (dim is 8), got 0.001',
  ],
  [{ attnKvHeads: 3 }, 'Decoder', 'attnKvHeads: expected a divisor of heads (2), got 3'],
  [
    { attnFlash: true, attnSparseTopk: 2 },
    'Decoder',
    'attnFlash: expected false with sparseTopk attention (it needs the attention matrix, which flash does not form), got true',
  ],
  [
    { attnHybridModule: { type: 'lstm' }, attnHybridFoldAxialDim: 1 },
    'Decoder',
    `attnHybridModule.type: expected 'gru', got "lstm"`,
  ],
  [
    { rotaryXpos: true },
    'Encoder',
    'rotaryXpos: expected a causal (Decoder) stack with it: xpos is not compatible with bidirectional attention, got a bidirectional stack',
  ],
  [
    { shiftTokens: [1, -1] },
    'Decoder',
    'shiftTokens: expected a non-negative integer or a list of them, got [1,-1]',
  ],
  [
    { layerDropout: [0.1, 2] },
    'Decoder',
    'layerDropout: expected a number in [0, 1) or a list of them, got [0.1,2]',
  ],
  [{ numResidualStreams: 0 }, 'Decoder', 'numResidualStreams: expected a positive integer, got 0'],
  [{ bogus: 1 }, 'Decoder', 'bogus: expected an option of Decoder, got an unknown option'],
  [{ attnBogus: 1 }, 'Encoder', 'attnBogus: expected an option of Attention, got an unknown option'],
  [{ causal: true }, 'Decoder', 'causal: expected none (a Decoder sets causal true), got true'],
  [{ causal: false }, 'Encoder', 'causal: expected none (an Encoder sets causal false), got false'],
];

describe('the library and JSON configs give the same option errors', () => {
  for (const [bad, type, message] of stackCases) {
    it(`${type} ${JSON.stringify(bad)}`, () => {
      const opts = { ...base, ...bad };
      const Stack = type === 'Encoder' ? Encoder : Decoder;
      expect(errorOf(() => new Stack(opts as AttentionLayersOptions))).toBe(message);
      expect(errorOf(() => fromConfig({ wrapper: type, ...opts }))).toBe(message);
      expect(errorOf(() => fromConfig({ wrapper: type, ...snake(opts) }))).toBe(message);
      const lm = { wrapper: 'TransformerWrapper', num_tokens: 10, max_seq_len: 8 };
      expect(errorOf(() => fromConfig({ ...lm, attn_layers: { type, ...snake(opts) } }))).toBe(
        `attnLayers.${message}`,
      );
    });
  }

  const wrapperCases: [Record<string, unknown>, string][] = [
    [{ numTokens: 0 }, 'numTokens: expected a positive integer, got 0'],
    [{ maxSeqLen: -1 }, 'maxSeqLen: expected a non-negative integer, got -1'],
    [{ embDropout: 1 }, 'embDropout: expected a number in [0, 1), got 1'],
    [{ numOutputHeads: 2, tieEmbedding: true }, 'numOutputHeads: expected 1 with tieEmbedding, got 2'],
    [{ bogus: true }, 'bogus: expected an option of TransformerWrapper, got an unknown option'],
  ];
  for (const [bad, message] of wrapperCases) {
    it(`TransformerWrapper ${JSON.stringify(bad)}`, () => {
      const opts = { numTokens: 10, maxSeqLen: 8, ...bad };
      const layers = new Decoder(base);
      expect(errorOf(() => new TransformerWrapper({ ...opts, attnLayers: layers } as never))).toBe(message);
      layers.dispose();
      const attnLayers = { type: 'Decoder', ...base };
      expect(errorOf(() => fromConfig({ wrapper: 'TransformerWrapper', ...opts, attnLayers }))).toBe(message);
      expect(
        errorOf(() => fromConfig({ wrapper: 'TransformerWrapper', ...snake(opts), attn_layers: attnLayers })),
      ).toBe(message);
    });
  }

  it('XTransformer names each side option with its prefix', () => {
    const x = {
      dim: 8,
      encNumTokens: 10,
      encMaxSeqLen: 8,
      encDepth: 1,
      decNumTokens: 10,
      decMaxSeqLen: 8,
      decDepth: 1,
    };
    const cases: [Record<string, unknown>, string][] = [
      [{ encDepth: -1 }, 'encDepth: expected a positive integer, got -1'],
      [{ decAttnDimHead: 0 }, 'decAttnDimHead: expected a positive integer, got 0'],
      [{ decNumTokens: undefined }, 'decNumTokens: expected a positive integer, got undefined'],
      [
        { decCrossAttend: false },
        'decCrossAttend: expected none (the decoder always cross-attends), got false',
      ],
    ];
    for (const [bad, message] of cases) {
      const opts = { ...x, ...bad };
      expect(errorOf(() => new XTransformer(opts as XTransformerOptions))).toBe(message);
      expect(errorOf(() => fromConfig({ wrapper: 'XTransformer', ...snake(opts) }))).toBe(message);
    }
  });
});
