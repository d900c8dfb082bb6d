import type * as tf from '@tensorflow/tfjs-core';

/** Formats a shape as `[2, 3, 4]` for error messages. */
export function fmtShape(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

/**
 * Checks a tensor's rank, dimensions (null = any) and optionally dtype, throwing an Error that names
 * the argument, what was expected and what came.
 */
export function checkTensor(
  name: string,
  t: tf.Tensor | undefined | null,
  expected: {
    shape?: readonly (number | null)[];
    rank?: number;
    dtype?: tf.DataType | readonly tf.DataType[];
    desc?: string;
  },
): asserts t is tf.Tensor {
  const desc = expected.desc ? ` (${expected.desc})` : '';
  if (t === undefined || t === null) throw new Error(`${name}: expected a tensor${desc}, got ${String(t)}`);
  if (expected.rank !== undefined && t.rank !== expected.rank) {
    throw new Error(
      `${name}: expected a tensor of rank ${expected.rank}${desc}, got shape ${fmtShape(t.shape)}`,
    );
  }
  if (expected.shape) {
    const s = expected.shape;
    const ok = s.length === t.rank && s.every((d, i) => d === null || d === t.shape[i]);
    if (!ok) {
      const want = `[${s.map((d) => (d === null ? '*' : String(d))).join(', ')}]`;
      throw new Error(`${name}: expected shape ${want}${desc}, got ${fmtShape(t.shape)}`);
    }
  }
  if (expected.dtype) {
    const allowed = Array.isArray(expected.dtype) ? expected.dtype : [expected.dtype];
    if (!allowed.includes(t.dtype)) {
      throw new Error(`${name}: expected dtype ${allowed.join(' or ')}, got ${t.dtype}`);
    }
  }
}
