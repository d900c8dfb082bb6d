/**
 * Mixed precision. `bf16` runs as torch.autocast with dtype=bfloat16: matrix products and attention
 * take bfloat16 copies of their float32 operands (accumulating in float32) and keep their results in
 * bfloat16, which TF.js sees as float32 (the torch backend stores them in half the memory); shape
 * ops, GELU and its gradient, and sums, differences, products and quotients of two bfloat16 tensors
 * keep bfloat16, with a float32 operand give float32; every other op (normalisation, softmax,
 * reductions, the loss, the optimizer) reads float32. Parameters and optimizer state stay float32.
 * It needs the `torch` backend (LibTorch has bfloat16 kernels on CPU and CUDA); `fp32` runs
 * everywhere.
 */
import * as tf from '@tensorflow/tfjs-core';

export const PRECISIONS = ['fp32', 'bf16'] as const;
export type Precision = (typeof PRECISIONS)[number];

interface PrecisionBackend {
  setPrecision(p: Precision): Precision;
}

function precisionBackend(): PrecisionBackend | null {
  const b = tf.backend() as unknown as Partial<PrecisionBackend>;
  return typeof b.setPrecision === 'function' ? (b as PrecisionBackend) : null;
}

/**
 * Checks a precision option: one of PRECISIONS, and `bf16` only on a backend that computes it.
 * `name` is the option's name in the error (`precision`, `train.precision`, ...).
 */
export function checkPrecision(value: unknown, name = 'precision'): Precision {
  if (value === undefined) return 'fp32';
  if (typeof value !== 'string' || !(PRECISIONS as readonly string[]).includes(value))
    throw new Error(`${name}: expected one of ${PRECISIONS.join(', ')}, got ${JSON.stringify(value)}`);
  if (value === 'bf16' && !precisionBackend())
    throw new Error(
      `${name}: bf16 needs the torch backend (LibTorch), the active backend is ${tf.getBackend()}; use fp32`,
    );
  return value as Precision;
}

/**
 * Runs `fn` (synchronous) at `precision` and restores the previous setting after it, also when
 * it throws. `fp32` or undefined on a backend without mixed precision just runs `fn`.
 */
export function withPrecision<T>(precision: Precision | undefined, fn: () => T): T {
  const b = precisionBackend();
  if (!b) {
    if (precision === 'bf16') checkPrecision(precision);
    return fn();
  }
  const before = b.setPrecision(precision ?? 'fp32');
  try {
    return fn();
  } finally {
    b.setPrecision(before);
  }
}
