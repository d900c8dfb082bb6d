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

/**
 * The loss against output.loss and every trainable parameter's gradient against
 * output.grad.<name>: a listed gradient that never reached its parameter compares as zeros; a
 * gradient the reference does not list, or a listed one with no parameter, fails. Disposes `value`
 * and `grads`.
 */
export function compareLossAndGrads(
  c: ParityCase,
  value: tf.Tensor,
  grads: tf.NamedTensorMap,
  named: [string, tf.Variable][],
): Comparison[] {
  const out: Comparison[] = [];
  try {
    const loss = asShape(value, expected(c, 'loss').shape);
    out.push(compareTensors('output.loss', loss, expected(c, 'loss')));
    if (loss !== value) loss.dispose();
    const listed = new Set(
      Object.keys(c.outputs)
        .filter((k) => k.startsWith('grad.'))
        .map((k) => k.slice('grad.'.length)),
    );
    const fail = (name: string, message: string): Comparison => ({
      name,
      ok: false,
      maxAbsErr: Infinity,
      message,
    });
    for (const [pname, v] of named) {
      const g = grads[v.name];
      const key = `output.grad.${pname}`;
      if (listed.has(pname)) {
        const actual = g ?? tf.zerosLike(v);
        out.push(
          compareTensors(g ? key : `${key} (no gradient reached it)`, actual, c.outputs[`grad.${pname}`]!),
        );
        if (!g) actual.dispose();
        listed.delete(pname);
      } else if (g && tf.tidy(() => tf.max(tf.abs(g)).dataSync()[0]!) > 0) {
        out.push(fail(key, `${key}: a gradient the reference does not have`));
      }
    }
    for (const pname of listed)
      out.push(fail(`output.grad.${pname}`, `output.grad.${pname}: the model has no parameter ${pname}`));
  } finally {
    value.dispose();
    tf.dispose(Object.values(grads));
  }
  return out;
}
