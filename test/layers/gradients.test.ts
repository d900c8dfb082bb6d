import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';
import type { AttentionLayersOptions } from '../../src/layers/options.js';
import {
  TransformerWrapper,
  type TransformerWrapperOptions,
} from '../../src/wrappers/transformer-wrapper.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { manualSeed } from '../../src/utils/random.js';

const base = { dim: 8, depth: 2, heads: 2, attnDimHead: 4 };

const layerCases: [string, AttentionLayersOptions][] = [
  ['rotary', { rotaryPosEmb: true }],
  ['rotary xpos', { rotaryXpos: true }],
  ['rel pos bias', { relPosBias: true }],
  ['dynamic pos bias', { dynamicPosBias: true, dynamicPosBiasLogDistance: true }],
  ['alibi', { alibiPosBias: true, alibiNumHeads: 1 }],
  ['macaron + sandwich norm', { macaron: true, sandwichNorm: true }],
  ['post-norm residual attention', { preNorm: false, residualAttn: true }],
  ['gate residual + scale residual', { gateResidual: true, scaleResidual: true }],
  ['shift tokens', { shiftTokens: 2 }],
  ['norms', { useRmsnorm: true }],
  ['scalenorm', { useScalenorm: true }],
  ['simple rmsnorm', { useSimpleRmsnorm: true }],
  ['ff variants', { ffGlu: true, ffSwish: true, ffPostActLn: true, ffNoBias: true }],
  ['relu squared', { ffReluSquared: true }],
  ['resiDual', { resiDual: true, resiDualScale: 0.5 }],
  ['layerscale + softclamp', { useLayerscale: true, layerscaleInitValue: 0.1, softclampOutput: true }],
  ['unet + reinject', { depth: 4, unetSkips: true, reinjectInput: true, learnedReinjectInputGate: true }],
  ['weight tie', { weightTieLayers: true }],
  ['sandwich coef', { depth: 3, sandwichCoef: 1 }],
];

const wrapperCases: [string, Partial<TransformerWrapperOptions>][] = [
  [
    'memory tokens + l2norm embed + post emb norm',
    { numMemoryTokens: 2, l2normEmbed: true, postEmbNorm: true },
  ],
  ['emb dim projection + tied embedding off', { embDim: 6, embFracGradient: 0.5 }],
  ['tied embedding + scaled sinusoidal', { tieEmbedding: true, scaledSinuPosEmb: true }],
];

function finiteGradsFor(net: TransformerWrapper): void {
  const ar = new AutoregressiveWrapper(net);
  const x = tf.tensor2d(
    [
      [1, 2, 3, 4, 5, 6, 7],
      [7, 6, 5, 4, 3, 2, 1],
    ],
    [2, 7],
    'int32',
  );
  const before = tf.memory().numTensors;
  const { value, grads } = tf.variableGrads(() => ar.forward(x));
  expect(Number.isFinite(value.dataSync()[0]!)).toBe(true);
  const missing: string[] = [];
  const bad: string[] = [];
  for (const [name, v] of net.namedParameters()) {
    const g = grads[v.name];
    if (!g) missing.push(name);
    else if (!g.dataSync().every(Number.isFinite)) bad.push(name);
  }
  value.dispose();
  tf.dispose(Object.values(grads));
  expect(tf.memory().numTensors).toBe(before);
  expect(missing).toEqual([]);
  expect(bad).toEqual([]);
  x.dispose();
  ar.dispose();
}

describe('every option trains: finite gradients for every parameter', () => {
  for (const [name, opts] of layerCases) {
    it(name, () => {
      manualSeed(1);
      const net = new TransformerWrapper({
        numTokens: 10,
        maxSeqLen: 8,
        attnLayers: new Decoder({ ...base, ...opts }),
      });
      finiteGradsFor(net);
    });
  }
  for (const [name, opts] of wrapperCases) {
    it(name, () => {
      manualSeed(2);
      const net = new TransformerWrapper({
        numTokens: 10,
        maxSeqLen: 8,
        ...opts,
        attnLayers: new Decoder(base),
      });
      finiteGradsFor(net);
    });
  }
  it('encoder with masks', () => {
    manualSeed(3);
    const net = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      attnLayers: new Encoder({ ...base, shiftTokens: 1 }),
    });
    finiteGradsFor(net);
  });
});
