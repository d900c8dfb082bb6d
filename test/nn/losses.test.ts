import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import {
  crossEntropy,
  crossEntropyRows,
  XT_CROSS_ENTROPY,
  XT_CROSS_ENTROPY_GRAD,
} from '../../src/nn/losses.js';
import { backendHasKernel } from '../../src/nn/fused.js';
import { ensureGradients } from '../../src/train/gradients.js';
import { Rng } from '../../src/utils/random.js';

await ensureGradients();

// Cross-entropy, native kernel and composite, against a double-precision computation written out
// here: loss_i = logsumexp(x_i) - x_i[t_i]; d loss_mean / d x_i = (softmax(x_i) - onehot(t_i)) / count.

const N = 7;
const C = 11;
const IGNORE = -100;

function inputs(): { x: Float32Array; t: Int32Array } {
  const rng = new Rng(5);
  const x = Float32Array.from({ length: N * C }, () => rng.normal(0, 3));
  // a very confident row, and two ignored targets
  x[2 * C + 4] = 40;
  const t = Int32Array.from({ length: N }, () => rng.int(0, C));
  t[2] = 4;
  t[1] = IGNORE;
  t[5] = IGNORE;
  return { x, t };
}

function reference(x: Float32Array, t: Int32Array): { rows: number[]; mean: number; grad: number[] } {
  const rows: number[] = [];
  const grad = new Array<number>(N * C).fill(0);
  let count = 0;
  for (let i = 0; i < N; i++) if (t[i] !== IGNORE) count++;
  for (let i = 0; i < N; i++) {
    const row = Array.from(x.subarray(i * C, (i + 1) * C));
    const max = Math.max(...row);
    const sum = row.reduce((a, v) => a + Math.exp(v - max), 0);
    const lse = max + Math.log(sum);
    if (t[i] === IGNORE) {
      rows.push(0);
      continue;
    }
    rows.push(lse - row[t[i]!]!);
    for (let j = 0; j < C; j++) grad[i * C + j] = (Math.exp(row[j]! - lse) - (j === t[i] ? 1 : 0)) / count;
  }
  return { rows, mean: rows.reduce((a, v) => a + v, 0) / count, grad };
}

function close(actual: ArrayLike<number>, expected: ArrayLike<number>, atol: number, rtol: number): void {
  expect(actual.length).toBe(expected.length);
  for (let k = 0; k < expected.length; k++) {
    const e = expected[k]!;
    const a = actual[k]!;
    if (!(Math.abs(a - e) <= atol + rtol * Math.abs(e))) expect.fail(`[${k}]: expected ${e}, got ${a}`);
  }
}

describe('crossEntropy', () => {
  it('registers the native kernel pair exactly on the torch backend', () => {
    const torch = tf.getBackend() === 'torch';
    expect(backendHasKernel(XT_CROSS_ENTROPY)).toBe(torch);
    expect(backendHasKernel(XT_CROSS_ENTROPY_GRAD)).toBe(torch);
  });

  for (const fused of [true, false]) {
    const how = fused ? 'the backend kernel where it has one' : 'the composite';
    it(`${how}: row losses, the mean over non-ignored targets and its gradient`, () => {
      const { x, t } = inputs();
      const ref = reference(x, t);
      const logits = tf.variable(tf.tensor2d(x, [N, C]));
      const target = tf.tensor1d(t, 'int32');
      const before = tf.memory().numTensors;
      const rows = crossEntropyRows(logits, target, IGNORE, fused);
      close(rows.dataSync(), ref.rows, 1e-5, 1e-6);
      const { value, grads } = tf.variableGrads(() => crossEntropy(logits, target, IGNORE, fused), [logits]);
      close(value.dataSync(), [ref.mean], 1e-6, 1e-6);
      close(grads[logits.name]!.dataSync(), ref.grad, 1e-7, 1e-5);
      tf.dispose([rows, value, grads[logits.name]!]);
      expect(tf.memory().numTensors).toBe(before);
      tf.dispose([logits, target]);
    });
  }

  it('keeps leading axes, gives NaN when every target is ignored, and names bad arguments', () => {
    const logits = tf.zeros([2, 3, 4]);
    const target = tf.tensor2d(
      [
        [0, 1, 2],
        [3, 0, 1],
      ],
      [2, 3],
      'int32',
    );
    const rows = crossEntropyRows(logits, target);
    expect(rows.shape).toEqual([2, 3]);
    close(rows.dataSync(), new Array(6).fill(Math.log(4)), 1e-6, 1e-6);
    const none = crossEntropy(logits, tf.fill([2, 3], IGNORE, 'int32'), IGNORE);
    expect(Number.isNaN(none.dataSync()[0])).toBe(true);
    expect(() => crossEntropy(logits, tf.zeros([2, 4], 'int32'))).toThrow(/target: expected shape \[2,3\]/);
    expect(() => crossEntropy(logits, tf.zeros([2, 3]))).toThrow(/target: expected int32/);
    tf.dispose([logits, target, rows, none]);
  });
});
