import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { fmtShape } from '../utils/errors.js';
import type { RotaryInput, RotaryTables } from './types.js';
import { fusedRotary } from '../nn/fused.js';

/** Options of `RotaryEmbedding` (the reference's kwargs in camelCase). */
export interface RotaryEmbeddingOptions {
  /** xpos length extrapolation (a persistent `scale` buffer). */
  useXpos: boolean;
  scaleBase: number;
  /** Positions are divided by this (>= 1), as in position interpolation. */
  interpolationFactor: number;
  base: number;
  /** NTK-aware rescale: base *= factor ** (dim / (dim - 2)). */
  baseRescaleFactor: number;
}

export const rotaryEmbeddingDefaults: RotaryEmbeddingOptions = {
  useXpos: false,
  scaleBase: 512,
  interpolationFactor: 1,
  base: 10000,
  baseRescaleFactor: 1,
};

/**
 * Rotary position embedding (RoFormer), optionally with xpos. Buffers as the reference:
 * `inv_freq` [dim / 2] (persistent) and, with xpos, `scale` [dim / 2] (persistent).
 */
export class RotaryEmbedding extends Module {
  readonly dim: number;
  readonly options: RotaryEmbeddingOptions;

  /** dim: number of rotated features per head (even). */
  constructor(dim: number, options: Partial<RotaryEmbeddingOptions> = {}) {
    super();
    if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0)
      throw new Error(`dim: expected a positive even integer, got ${dim}`);
    const o = { ...rotaryEmbeddingDefaults, ...options };
    if (!(o.interpolationFactor >= 1))
      throw new Error(`interpolationFactor: expected a number >= 1, got ${o.interpolationFactor}`);
    if (!(o.scaleBase > 0)) throw new Error(`scaleBase: expected a positive number, got ${o.scaleBase}`);
    this.dim = dim;
    this.options = o;
    // NTK-aware rescale (the reference divides by dim - 2, so it needs dim > 2 whenever it is used)
    const base = o.baseRescaleFactor === 1 ? o.base : o.base * o.baseRescaleFactor ** (dim / (dim - 2));
    const half = dim / 2;
    const inv = new Float32Array(half);
    for (let i = 0; i < half; i++) inv[i] = 1 / base ** Math.fround((2 * i) / dim);
    this.registerBuffer('inv_freq', tf.tensor1d(inv));
    if (o.useXpos) {
      const sc = new Float32Array(half);
      for (let i = 0; i < half; i++) sc[i] = (2 * i + 0.4 * dim) / (1.4 * dim);
      this.registerBuffer('scale', tf.tensor1d(sc));
    }
  }

  get invFreq(): tf.Tensor {
    return this.getBuffer('inv_freq');
  }

  /** Frequencies for positions 0 .. seqLen - 1. */
  forwardFromSeqLen(seqLen: number): RotaryInput {
    const t = tf.range(0, seqLen, 1, 'int32');
    const out = this.forward(t);
    t.dispose();
    return out;
  }

  /**
   * t: [n] or [b, n] integer positions -> freqs [1|b, n, dim] (each frequency repeated for a pair of
   * features) and, with xpos, xposScale [1|b, n, dim]. The caller owns the returned tensors.
   */
  forward(t: tf.Tensor): RotaryInput {
    if (t.rank !== 1 && t.rank !== 2)
      throw new Error(`t: expected positions [n] or [b, n], got ${fmtShape(t.shape)}`);
    return tf.tidy(() => {
      const pos = t.rank === 1 ? tf.expandDims(t, 0) : t;
      let freqs = tf.mul(tf.expandDims(tf.cast(pos, 'float32'), -1), this.invFreq);
      // dividing by 1 is exact: skip the op
      if (this.options.interpolationFactor !== 1) freqs = tf.div(freqs, this.options.interpolationFactor);
      freqs = interleave2(freqs);
      if (!this.options.useXpos) return { freqs };
      const maxPos = tf.add(tf.max(tf.cast(t, 'int32')), 1);
      const center = tf.floorDiv(maxPos, tf.scalar(2, 'int32'));
      const power = tf.div(tf.cast(tf.sub(tf.cast(pos, 'int32'), center), 'float32'), this.options.scaleBase);
      const scale = tf.pow(this.getBuffer('scale'), tf.expandDims(power, -1));
      return { freqs, xposScale: interleave2(scale) };
    });
  }
}

/** [..., d] -> [..., 2d] with each entry repeated twice in place (stack((x, x), -1) flattened). */
function interleave2(x: tf.Tensor): tf.Tensor {
  const d = x.shape[x.rank - 1]!;
  return tf.reshape(tf.stack([x, x], -1), [...x.shape.slice(0, -1), d * 2]);
}

/** Rotates feature pairs: (x0, x1) -> (-x1, x0). x: [..., d] with d even. */
export function rotateHalf(x: tf.Tensor): tf.Tensor {
  const d = x.shape[x.rank - 1]!;
  const pairs = tf.reshape(x, [...x.shape.slice(0, -1), d / 2, 2]);
  const [x1, x2] = tf.unstack(pairs, -1) as [tf.Tensor, tf.Tensor];
  return tf.reshape(tf.stack([tf.neg(x2), x1], -1), x.shape);
}

/** Takes the last n rows of freqs [n_k, r] / [b, n_k, r] and shapes them for t [b, h, n, d]. */
function lastRows(f: tf.Tensor, n: number, name: string): tf.Tensor {
  const f3 = f.rank === 2 ? tf.expandDims(f, 0) : f;
  if (f3.rank !== 3)
    throw new Error(`${name}: expected freqs [n, rotDim] or [b, n, rotDim], got ${fmtShape(f.shape)}`);
  const nk = f3.shape[1]!;
  if (nk < n)
    throw new Error(`${name}: expected frequencies for at least ${n} positions, got ${fmtShape(f.shape)}`);
  const sliced = nk === n ? f3 : tf.slice(f3, [0, nk - n, 0], [-1, n, -1]);
  return tf.expandDims(sliced, 1);
}

/**
 * Adds cos / sin tables to a rotary input (without xpos), so that the layers of one forward pass
 * share them instead of each computing cos and sin of the frequencies: keys use every row, queries
 * the last `queryLen`. `width` (the head dimension, >= rotDim) pads the tables with cos 1 / sin 0,
 * so that features past rotDim pass through without a slice and a concat. With xpos, or freqs not
 * [n_k, rotDim] / [b|1, n_k, rotDim], the input is returned as is. The tables are created in the
 * caller's scope (call it inside the tidy that runs the layers). `applyRotaryTables` uses them.
 */
export function prepareRotary(input: RotaryInput, queryLen: number, width: number): RotaryInput {
  const { freqs } = input;
  if (input.xposScale || input.tables || (freqs.rank !== 2 && freqs.rank !== 3)) return input;
  const rot = freqs.shape[freqs.rank - 1]!;
  const nk = freqs.shape[freqs.rank - 2]!;
  if (rot % 2 !== 0 || rot > width || queryLen > nk || queryLen < 1) return input;
  const f4 = tf.expandDims(freqs.rank === 2 ? tf.expandDims(freqs, 0) : freqs, 1); // [1|b, 1, n_k, rot]
  let cos = tf.cos(f4);
  // rotateHalf(x) * sin == swapped pairs of x * (sin with the even features negated); negation is exact
  const [b] = f4.shape as [number];
  const sign = tf.tensor1d(
    Array.from({ length: rot }, (_, i) => (i % 2 === 0 ? -1 : 1)),
    'float32',
  );
  let sin = tf.mul(tf.sin(f4), sign);
  if (rot < width) {
    cos = tf.concat([cos, tf.ones([b, 1, nk, width - rot])], -1);
    sin = tf.concat([sin, tf.zeros([b, 1, nk, width - rot])], -1);
  }
  const last = (x: tf.Tensor): tf.Tensor =>
    queryLen === nk ? x : tf.slice(x, [0, 0, nk - queryLen, 0], [-1, -1, queryLen, -1]);
  const swap = tf.tensor1d(
    Array.from({ length: width }, (_, i) => i ^ 1),
    'int32',
  );
  const tables: RotaryTables = { width, queryLen, cos, sin, cosQ: last(cos), sinQ: last(sin), swap };
  return { ...input, tables };
}

/**
 * Applies rotary embeddings with the tables of `prepareRotary`: t * cos + rotateHalf(t) * sin, with
 * the same numbers as `applyRotaryPosEmb`. t: [b, h, n, width] with n = tables.queryLen (queries)
 * or n_k (keys); returns null when t does not fit the tables (use `applyRotaryPosEmb` then).
 */
export function applyRotaryTables(t: tf.Tensor, tables: RotaryTables): tf.Tensor | null {
  if (t.rank !== 4 || t.shape[3] !== tables.width) return null;
  const n = t.shape[2]!;
  const nk = tables.cos.shape[2]!;
  const bt = tables.cos.shape[0]!;
  if (bt !== 1 && bt !== t.shape[0]) return null;
  let cos: tf.Tensor;
  let sin: tf.Tensor;
  if (n === tables.queryLen) {
    cos = tables.cosQ;
    sin = tables.sinQ;
  } else if (n === nk) {
    cos = tables.cos;
    sin = tables.sin;
  } else return null;
  const fused = fusedRotary(t, cos, sin);
  if (fused) return fused;
  const c = cos;
  const s = sin;
  // a custom gradient (dy * cos + pair-swapped dy * sin, the ops and order of the tape's own) keeps
  // none of the rotated intermediates for the backward pass; inside it nothing is recorded, so the
  // pairs (x0, x1) -> (x1, x0) are swapped with one gather (data movement only)
  // (the tables are saved: the scope that made them may end before the backward pass runs)
  const rotate = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [x, save] = args as [tf.Tensor, tf.GradSaveFunc];
    save([c, s, tables.swap]);
    return {
      value: tf.tidy(() => tf.add(tf.mul(x, c), tf.mul(tf.gather(x, tables.swap, -1), s))),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
        tf.tidy(() => {
          const [sc, ss, sw] = saved as [tf.Tensor, tf.Tensor, tf.Tensor];
          return tf.add(tf.gather(tf.mul(dy, ss), sw, -1), tf.mul(dy, sc));
        }),
    };
  }) as (x: tf.Tensor) => tf.Tensor;
  return rotate(t);
}

/**
 * Applies rotary embeddings to the first rotDim features of t, using the last n positions of freqs
 * (n = t's sequence length). t: [b, h, n, d]; freqs: [n_k, rotDim] or [b|1, n_k, rotDim];
 * scale: 1 or a tensor shaped as freqs (xpos). `name` names the argument in errors.
 */
export function applyRotaryPosEmb(
  t: tf.Tensor,
  freqs: tf.Tensor,
  scale: tf.Tensor | number = 1,
  name = 'rotary',
): tf.Tensor {
  return tf.tidy(() => {
    const n = t.shape[t.rank - 2]!;
    const d = t.shape[t.rank - 1]!;
    const rot = freqs.shape[freqs.rank - 1]!;
    if (rot > d || rot % 2 !== 0)
      throw new Error(
        `${name}: expected an even rotary dimension <= ${d}, got freqs ${fmtShape(freqs.shape)}`,
      );
    const f = lastRows(freqs, n, name);
    const s = typeof scale === 'number' ? scale : lastRows(scale, n, name);
    const tRot = rot === d ? t : tf.slice(t, [0, 0, 0, 0], [-1, -1, -1, rot]);
    // multiplying by a scale of 1 is exact: skip the op
    const scaled = (x: tf.Tensor): tf.Tensor => (s === 1 ? x : tf.mul(x, s));
    const rotated = tf.add(scaled(tf.mul(tRot, tf.cos(f))), scaled(tf.mul(rotateHalf(tRot), tf.sin(f))));
    if (rot === d) return rotated;
    return tf.concat([rotated, tf.slice(t, [0, 0, 0, rot], [-1, -1, -1, -1])], -1);
  });
}
