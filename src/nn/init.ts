/**
 * Random tensors drawn from the library's generator (`Rng`), for parameter initialisation and
 * dropout masks. A backend may register `XtRandomFill` to draw them without building the values in
 * JavaScript:
 *
 *   XtRandomFill  no inputs; attrs {shape, kind: 0 uniform in [a, b) | 1 normal (mean a, std b),
 *                 a, b, state: Float64Array [s0, s1, s2, s3, hasSpare, spare]}
 *                 output float32 [shape]: the values `Rng.fillUniform` / `Rng.fillNormal` would
 *                 give from that state, which the kernel advances in place as they would
 *
 * So the same seed gives the same tensor on every backend (normal draws go through each platform's
 * log, sin and cos, which may differ in the last bit of a double, almost never in a float32).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Rng } from '../utils/random.js';

export const XT_RANDOM_FILL = 'XtRandomFill';

function nativeFill(rng: Rng, shape: number[], kind: 0 | 1, a: number, b: number): tf.Tensor | null {
  const backend = tf.getBackend();
  if (!backend || !tf.getKernel(XT_RANDOM_FILL, backend)) return null;
  const state = rng.saveState();
  const out = tf.engine().runKernel(XT_RANDOM_FILL, {}, {
    shape,
    kind,
    a,
    b,
    state,
  } as unknown as tf.NamedAttrMap) as tf.Tensor;
  rng.loadState(state);
  return out;
}

function checkShape(shape: number[]): void {
  if (!shape.every((d) => Number.isInteger(d) && d >= 0))
    throw new Error(`shape: expected non-negative integers, got [${shape}]`);
}

/** float32 [shape] uniform in [low, high) from `rng` (advancing it by one draw per value). */
export function uniformTensor(rng: Rng, shape: number[], low: number, high: number): tf.Tensor {
  checkShape(shape);
  return (
    nativeFill(rng, shape, 0, low, high) ??
    tf.tensor(rng.fillUniform(tf.util.sizeFromShape(shape), low, high), shape)
  );
}

/** float32 [shape] normal with `mean` and `std` from `rng` (Box-Muller, as `Rng.normal`). */
export function normalTensor(rng: Rng, shape: number[], mean: number, std: number): tf.Tensor {
  checkShape(shape);
  return (
    nativeFill(rng, shape, 1, mean, std) ??
    tf.tensor(rng.fillNormal(tf.util.sizeFromShape(shape), mean, std), shape)
  );
}
