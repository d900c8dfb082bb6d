import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { AutoregressiveWrapper, crossEntropy } from '../../src/generation/autoregressive-wrapper.js';
import { ContinuousAutoregressiveWrapper } from '../../src/generation/continuous-autoregressive-wrapper.js';
import { XLAutoregressiveWrapper } from '../../src/generation/xl-autoregressive-wrapper.js';
import { XValAutoregressiveWrapper } from '../../src/generation/xval-autoregressive-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { ContinuousTransformerWrapper } from '../../src/wrappers/continuous.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { XValTransformerWrapper } from '../../src/wrappers/xval.js';
import { manualSeed } from '../../src/utils/random.js';

const V = 20;
const L = 8;

function xlNet(seed = 3): TransformerWrapper {
  manualSeed(seed);
  return new TransformerWrapper({
    numTokens: V,
    maxSeqLen: L,
    maxMemLen: L,
    attnLayers: new Decoder({ dim: 16, depth: 2, heads: 2, attnDimHead: 8, rotaryPosEmb: true }),
  });
}

function ids(b: number, n: number, seed: number): tf.Tensor {
  return tf.randomUniformInt([b, n], 0, V, seed);
}

const num = (t: tf.Tensor): number => {
  const v = t.dataSync()[0]!;
  t.dispose();
  return v;
};

describe('XLAutoregressiveWrapper', () => {
  it('equals the plain loss within one segment and weights segments by length with memories', () => {
    const net = xlNet();
    const xl = new XLAutoregressiveWrapper(net);
    const ar = new AutoregressiveWrapper(net);
    xl.eval();
    const short = ids(2, L + 1, 1);
    expect(num(xl.forward(short))).toBeCloseTo(num(ar.forward(short)), 5);

    // 2.5 segments: the same computation by hand
    const long = ids(2, 2 * L + 5, 2);
    const got = num(xl.forward(long));
    const want = tf.tidy(() => {
      const n = long.shape[1]! - 1;
      let mems: tf.Tensor[] | undefined;
      let total = 0;
      for (let s = 0; s < n; s += L) {
        const len = Math.min(L, n - s);
        const r = net.forwardWithState(tf.slice(long, [0, s], [2, len]), { mems, returnMems: true });
        mems = r.mems;
        total += crossEntropy(r.logits, tf.slice(long, [0, s + 1], [2, len])).dataSync()[0]! * (len / n);
      }
      return total;
    });
    expect(got).toBeCloseTo(want, 5);
    const before = tf.memory().numTensors;
    xl.forward(long).dispose();
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([short, long]);
    net.dispose();
  });

  it('generates like the plain decoder inside one segment, and across segments with memory catch-up', async () => {
    const net = xlNet();
    const xl = new XLAutoregressiveWrapper(net);
    const ar = new AutoregressiveWrapper(net);
    const prompt = tf.tensor2d(
      [
        [1, 2, 3],
        [4, 5, 6],
      ],
      undefined,
      'int32',
    );
    const a = await xl.generate(prompt, 5, { temperature: 0 });
    const b = await ar.generate(prompt, 5, { temperature: 0, cacheKv: false });
    expect(a.arraySync()).toEqual(b.arraySync());
    const c = await xl.generate(prompt, 5, { temperature: 0, cacheKv: false });
    expect(c.arraySync()).toEqual(b.arraySync());
    c.dispose();
    const before = tf.memory().numTensors;
    const longPrompt = ids(2, 2 * L + 3, 7);
    // rotary positions cannot follow the reference's cache across segments: recompute instead
    await expect(xl.generate(longPrompt, 12, { temperature: 0.9, seed: 4 })).rejects.toThrow(/cacheKv/);
    const g = await xl.generate(longPrompt, 12, { temperature: 0.9, seed: 4, cacheKv: false });
    expect(g.shape).toEqual([2, 12]);
    expect((g.arraySync() as number[][]).flat().every((t) => t >= 0 && t < V)).toBe(true);
    const g2 = await xl.generate(longPrompt, 12, { temperature: 0.9, seed: 4, cacheKv: false });
    expect(g2.arraySync()).toEqual(g.arraySync());
    tf.dispose([g, g2, longPrompt]);
    expect(tf.memory().numTensors).toBe(before);
    await expect(xl.generate(prompt, 0)).rejects.toThrow(/seqLen/);
    await expect(xl.generate(prompt, 2, { temperature: -1 })).rejects.toThrow(/temperature/);
    tf.dispose([a, b, prompt]);
    net.dispose();
  });
});

describe('ContinuousAutoregressiveWrapper', () => {
  function contNet(): ContinuousTransformerWrapper {
    manualSeed(8);
    return new ContinuousTransformerWrapper({
      maxSeqLen: L,
      dimIn: 3,
      dimOut: 3,
      attnLayers: new Decoder({ dim: 16, depth: 1, heads: 2, attnDimHead: 8 }),
    });
  }

  it('computes the MSE of the next vectors, with masks as the reference', () => {
    const net = contNet();
    const w = new ContinuousAutoregressiveWrapper(net);
    w.eval();
    const x = tf.randomNormal([2, 6, 3], 0, 1, 'float32', 5);
    const pred = net.forward(tf.slice(x, [0, 0, 0], [2, 5, 3]));
    const sq = tf.square(tf.sub(pred, tf.slice(x, [0, 1, 0], [2, 5, 3])));
    const sqv = sq.arraySync() as number[][][];
    const mean = (a: number[]): number => a.reduce((s, v) => s + v, 0) / a.length;
    expect(num(w.forward(x))).toBeCloseTo(mean(sqv.flat(2)), 5);
    // mask [b, n + 1]: row 0 keeps 3 positions, row 1 all 5
    const mask = tf.tensor2d(
      [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
      ],
      undefined,
      'bool',
    );
    const maskedPred = net.forward(tf.slice(x, [0, 0, 0], [2, 5, 3]), {
      mask: tf.slice(mask, [0, 0], [2, 5]),
    });
    const msq = tf.square(tf.sub(maskedPred, tf.slice(x, [0, 1, 0], [2, 5, 3]))).arraySync() as number[][][];
    const kept = [...msq[0]!.slice(0, 3).flat(), ...msq[1]!.flat()];
    expect(num(w.forward(x, { mask }))).toBeCloseTo(mean(kept), 5);
    const eq = new ContinuousAutoregressiveWrapper(net, { equalLossWeightBatch: true });
    const perSeq = [
      msq[0]!
        .slice(0, 3)
        .flat()
        .reduce((s, v) => s + v, 0) / 3,
      msq[1]!.flat().reduce((s, v) => s + v, 0) / 5,
    ];
    expect(num(eq.forward(x, { mask }))).toBeCloseTo(mean(perSeq), 5);
    tf.dispose([x, pred, sq, mask, maskedPred]);
    net.dispose();
  });

  it('generates vectors from the last maxSeqLen positions', async () => {
    const net = contNet();
    const w = new ContinuousAutoregressiveWrapper(net);
    const start = tf.randomNormal([2, 4, 3], 0, 1, 'float32', 6);
    const before = tf.memory().numTensors;
    const out = await w.generate(start, 7);
    expect(out.shape).toEqual([2, 7, 3]);
    // the first new vector is the model's prediction at the last prompt position
    const y = net.forward(start);
    const lastPred = tf.tidy(() => tf.slice(y, [0, 3, 0], [2, 1, 3]).arraySync()) as number[][][];
    const first = tf.tidy(() => tf.slice(out, [0, 0, 0], [2, 1, 3]).arraySync()) as number[][][];
    first.flat(2).forEach((v, i) => expect(v).toBeCloseTo(lastPred.flat(2)[i]!, 5));
    tf.dispose([y, out]);
    expect(tf.memory().numTensors).toBe(before);
    const one = tf.tidy(() => tf.squeeze(tf.slice(start, [0, 0, 0], [1, 4, 3]), [0]));
    const single = await w.generate(one, 2);
    expect(single.shape).toEqual([2, 3]);
    tf.dispose([single, start, one]);
    net.dispose();
  });
});

describe('XValAutoregressiveWrapper', () => {
  const NUM = 3;
  function xvalNet(): XValTransformerWrapper {
    manualSeed(12);
    return new XValTransformerWrapper({
      numTokens: V,
      maxSeqLen: L,
      numericalTokenId: NUM,
      attnLayers: new Decoder({ dim: 16, depth: 1, heads: 2, attnDimHead: 8 }),
    });
  }

  it('adds the squared error of numbers at numerical targets to the cross-entropy', () => {
    const net = xvalNet();
    const w = new XValAutoregressiveWrapper(net, { numericalLossWeight: 2 });
    w.eval();
    const x = tf.tensor2d(
      [
        [1, NUM, 4, NUM, 2],
        [NUM, 5, NUM, 6, -100],
      ],
      undefined,
      'int32',
    );
    const xn = tf.tensor2d(
      [
        [0, 1.5, 0, -2, 0],
        [0.5, 0, 3, 0, 0],
      ],
      undefined,
      'float32',
    );
    const got = num(w.forward(x, xn));
    // by hand
    const inp = tf.tensor2d(
      [
        [1, NUM, 4, NUM],
        [NUM, 5, NUM, 6],
      ],
      undefined,
      'int32',
    );
    const inpNum = tf.tensor2d(
      [
        [0, 1.5, 0, -2],
        [0.5, 0, 3, 0],
      ],
      undefined,
      'float32',
    );
    const { logits, numerical } = net.forward(inp, inpNum);
    const lp = tf.logSoftmax(logits).arraySync() as number[][][];
    const nv = numerical.arraySync() as number[][];
    const tgt = [
      [NUM, 4, NUM, 2],
      [5, NUM, 6, -100],
    ];
    const tnum = [
      [1.5, 0, -2, 0],
      [0, 3, 0, 0],
    ];
    let sum = 0;
    let count = 0;
    tgt.forEach((row, i) =>
      row.forEach((t, j) => {
        if (t === -100) return;
        let l = -lp[i]![j]![t]!;
        if (t === NUM) l += 2 * (nv[i]![j]! - tnum[i]![j]!) ** 2;
        sum += l;
        count++;
      }),
    );
    expect(got).toBeCloseTo(sum / count, 4);
    tf.dispose([x, xn, inp, inpNum, logits, numerical]);
    net.dispose();
  });

  it('generate returns ids, numbers (NaN off the numerical token) and the is-number mask', async () => {
    const net = xvalNet();
    const w = new XValAutoregressiveWrapper(net);
    const ids0 = tf.tensor2d(
      [
        [1, NUM, 2],
        [NUM, 4, 5],
      ],
      undefined,
      'int32',
    );
    const nums0 = tf.tensor2d(
      [
        [0, 0.7, 0],
        [1.2, 0, 0],
      ],
      undefined,
      'float32',
    );
    const before = tf.memory().numTensors;
    const r = await w.generate(ids0, nums0, 10, { filterLogitsFn: 'top_k', filterKwargs: { k: 4 }, seed: 1 });
    expect(r.sampledTokenIds.shape).toEqual([2, 10]);
    const idsOut = r.sampledTokenIds.arraySync() as number[][];
    const numsOut = r.sampledNumbers.arraySync() as number[][];
    const mask = r.isNumberMask.arraySync() as number[][];
    idsOut.forEach((row, i) =>
      row.forEach((t, j) => {
        expect(Boolean(mask[i]![j])).toBe(t === NUM);
        expect(Number.isNaN(numsOut[i]![j]!)).toBe(t !== NUM);
      }),
    );
    tf.dispose([r.sampledTokenIds, r.sampledNumbers, r.isNumberMask]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([ids0, nums0]);
    net.dispose();
  });
});
