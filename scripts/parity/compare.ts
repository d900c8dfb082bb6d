import * as tf from '@tensorflow/tfjs-core';

/** Parity tolerance: |a - e| <= atol + rtol * |e| elementwise (as numpy/torch allclose). */
export const ATOL = 1e-4;
export const RTOL = 1e-3;

/** The outcome of comparing one produced tensor with its expected value. */
export interface Comparison {
  /** which output (e.g. `output.logits`, `output.tokens (cached)`) */
  name: string;
  ok: boolean;
  /** largest |actual - expected| over finite pairs (0 for an exact comparison that matches) */
  maxAbsErr: number;
  /** why it failed, when it did */
  message?: string;
}

export interface CompareOptions {
  atol?: number;
  rtol?: number;
  /** exact equality (token ids); implied for int32 and bool expected values */
  exact?: boolean;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/**
 * Compares `actual` with `expected` (shapes must be identical). Floats: allclose with `atol`/`rtol`;
 * infinities must match exactly (`-inf` only equals `-inf`); NaN only equals NaN. Integers and
 * booleans (or `exact`): every element equal. Neither tensor is disposed.
 */
export function compareTensors(
  name: string,
  actual: tf.Tensor,
  expected: tf.Tensor,
  options: CompareOptions = {},
): Comparison {
  const atol = options.atol ?? ATOL;
  const rtol = options.rtol ?? RTOL;
  if (!sameShape(actual.shape, expected.shape)) {
    return {
      name,
      ok: false,
      maxAbsErr: Infinity,
      message: `${name}: shape [${actual.shape.join(', ')}], expected [${expected.shape.join(', ')}]`,
    };
  }
  const exact = options.exact ?? expected.dtype !== 'float32';
  const a = actual.dataSync();
  const e = expected.dataSync();
  let maxAbsErr = 0;
  let bad = 0;
  let firstBad = -1;
  for (let i = 0; i < e.length; i++) {
    const x = Number(a[i]);
    const y = Number(e[i]);
    let ok: boolean;
    if (exact) {
      ok = x === y;
      if (!ok) maxAbsErr = Math.max(maxAbsErr, Number.isFinite(x - y) ? Math.abs(x - y) : Infinity);
    } else if (Number.isNaN(y) || Number.isNaN(x)) {
      ok = Number.isNaN(x) && Number.isNaN(y);
      if (!ok) maxAbsErr = Infinity;
    } else if (!Number.isFinite(y) || !Number.isFinite(x)) {
      ok = x === y;
      if (!ok) maxAbsErr = Infinity;
    } else {
      const d = Math.abs(x - y);
      maxAbsErr = Math.max(maxAbsErr, d);
      ok = d <= atol + rtol * Math.abs(y);
    }
    if (!ok) {
      bad++;
      if (firstBad < 0) firstBad = i;
    }
  }
  if (bad === 0) return { name, ok: true, maxAbsErr };
  const at = unravel(firstBad, expected.shape);
  const what = exact ? 'differ' : `outside atol ${atol} + rtol ${rtol}`;
  return {
    name,
    ok: false,
    maxAbsErr,
    message:
      `${name}: ${bad} of ${e.length} elements ${what}; first at [${at.join(', ')}]: ` +
      `got ${String(a[firstBad])}, expected ${String(e[firstBad])}`,
  };
}

function unravel(index: number, shape: readonly number[]): number[] {
  const out: number[] = [];
  let r = index;
  for (let d = shape.length - 1; d >= 0; d--) {
    out.unshift(r % shape[d]!);
    r = Math.floor(r / shape[d]!);
  }
  return out;
}
