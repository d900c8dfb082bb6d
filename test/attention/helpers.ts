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

/**
 * The attention of `Attention` written out from its weights with plain ops, independently of the
 * library's code paths: q, k, v projections, key/value head i % kvHeads for query head i (the
 * reference's `repeat('b h n d -> b (r h) n d')`), logits scaled by dimHead^-0.5, causal and key
 * masks, softmax over the allowed keys (a row with none gives 0), the output projection, and 0 at
 * masked query positions (as the reference's Attention does after `to_out`).
 */
export function explicitAttention(
  w: Record<string, tf.Tensor>,
  x: tf.Tensor,
  mask: tf.Tensor,
  heads: number,
  kvHeads: number,
  dimHead: number,
  /** added to the scaled logits: [1|b, heads, n, n] (a positional bias such as ALiBi) */
  bias?: tf.Tensor,
): tf.Tensor {
  return tf.tidy(() => {
    const [b, n] = x.shape as [number, number, number];
    const proj = (name: string, h: number): tf.Tensor =>
      tf.transpose(tf.reshape(tf.matMul(x, w[name]!, false, true), [b, n, h, dimHead]), [0, 2, 1, 3]);
    const q = proj('to_q.weight', heads);
    const kv = [proj('to_k.weight', kvHeads), proj('to_v.weight', kvHeads)];
    const pick = (t: tf.Tensor): tf.Tensor =>
      tf.gather(
        t,
        tf.tensor1d(
          Array.from({ length: heads }, (_, i) => i % kvHeads),
          'int32',
        ),
        1,
      );
    const [k, v] = kv.map(pick) as [tf.Tensor, tf.Tensor];
    let logits = tf.mul(tf.matMul(q, k, false, true), dimHead ** -0.5);
    if (bias) logits = tf.add(logits, bias);
    const pos = tf.range(0, n, 1, 'int32');
    const causal = tf.lessEqual(tf.reshape(pos, [1, 1, 1, n]), tf.reshape(pos, [1, 1, n, 1]));
    const allowed = tf.logicalAnd(causal, tf.reshape(mask, [b, 1, 1, n]));
    const weights = tf.softmax(tf.where(allowed, logits, tf.fill(logits.shape, -Infinity)));
    const anyKey = tf.any(allowed, -1, true);
    const out = tf.where(anyKey, tf.matMul(tf.where(allowed, weights, tf.zerosLike(weights)), v), 0);
    const merged = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, n, heads * dimHead]);
    const projected = tf.matMul(merged, w['to_out.weight']!, false, true);
    return tf.where(tf.reshape(mask, [b, n, 1]), projected, 0);
  });
}
