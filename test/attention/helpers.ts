import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'vitest';
import { Rng } from '../../src/utils/random.js';

/** A seeded normal tensor. */
export function randn(shape: number[], seed: number): tf.Tensor {
  const rng = new Rng(seed);
  const n = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(rng.fillNormal(n, 0, 1), shape, 'float32');
}

/** Asserts |a - b| <= atol + rtol |b| everywhere. */
export function expectClose(a: tf.Tensor, b: tf.Tensor, atol = 1e-5, rtol = 1e-4): void {
  expect(a.shape).toEqual(b.shape);
  const x = a.dataSync();
  const y = b.dataSync();
  let worst = 0;
  let at = -1;
  for (let i = 0; i < x.length; i++) {
    const err = Math.abs(x[i]! - y[i]!) - (atol + rtol * Math.abs(y[i]!));
    if (!(err <= worst)) {
      worst = Number.isNaN(err) ? Infinity : err;
      at = i;
    }
  }
  if (at >= 0) throw new Error(`tensors differ at flat index ${at}: ${x[at]} vs ${y[at]}`);
}
