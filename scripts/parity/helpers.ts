import * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../src/nn/module.js';
import { buildModel, expected, type ParityCase } from './case.js';
import { compareTensors, type Comparison } from './compare.js';

/** Builds the case's model, runs `fn` with it, and disposes the model whatever happens. */
export async function withModel<M extends Module, T>(
  c: ParityCase,
  fn: (model: M) => Promise<T> | T,
): Promise<T> {
  const model = await buildModel<M>(c);
  try {
    return await fn(model);
  } finally {
    model.dispose();
  }
}

/**
 * Compares produced tensors with the case's `output.<key>` of the same key, disposing the produced
 * tensors. `actual` maps output keys (without `output.`) to tensors.
 */
export function compareOutputs(c: ParityCase, actual: Record<string, tf.Tensor>): Comparison[] {
  try {
    return Object.entries(actual).map(([key, t]) => compareTensors(`output.${key}`, t, expected(c, key)));
  } finally {
    tf.dispose(Object.values(actual));
  }
}

/** A tensor's value as a tensor of `shape` (the same numbers), e.g. a scalar loss as `[1]`. */
export function asShape(t: tf.Tensor, shape: readonly number[]): tf.Tensor {
  const size = shape.reduce((a, b) => a * b, 1);
  if (t.size !== size) return t;
  return tf.reshape(t, [...shape]);
}
