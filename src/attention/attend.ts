import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import type { CoPE } from './cope.js';
import { OptionError, fmtShape } from '../utils/errors.js';
import {
  MASK_VALUE,
  causalKeep,
  dropoutSeeded,
  maskedFill,
  noGrad,
  padAxis,
  repeatKvHeads,
  straightThrough,
} from './ops.js';

/**
 * The fused attention kernel a backend may register (`tf.registerKernel`):
 *
 *   kernelName: 'XtAttention'
 *   inputs:  q    float32 [b, h, i, d]
 *            k    float32 [b, h, j, d]       (key/value heads already repeated to h)
 *            v    float32 [b, h, j, dv]
 *            mask bool    [b|1, h|1, i|1, j] (optional; true = may attend; broadcast over size-1 axes)
 *   attrs:   scale  number  (logits are (q . k) * scale)
 *            causal boolean (right-aligned: query r may attend key c iff c <= j - i + r)
 *   output:  float32 [b, h, i, dv] = softmax(logits masked to -3.4028234663852886e38) . v, computed
 *            in float32, and 0 for every query row whose `mask` row has no true entry (the causal
 *            mask alone never empties a row).
 *
 * Gradients: when a gradient config is registered for 'XtAttention' (`tf.registerGradient`, e.g.
 * one calling a native backward kernel, with inputsToSave ['q', 'k', 'v', 'mask']) and a mask is
 * given, `attend` calls the kernel directly and the engine uses that gradient (only q, k and v need
 * one; mask is never differentiated). Otherwise `attend` wraps the kernel in `tf.customGrad` with
 * `attendBackward`, an analytic backward made of ordinary ops. When an additive bias is given (ALiBi, T5), or the kernel is not
 * registered for the active backend, `attend` runs the composite path, which gives the same numbers.
 */
export const XT_ATTENTION_KERNEL = 'XtAttention';
/** Optional native backward of `XtAttention`: inputs {dy, q, k, v, mask?}, same attrs, outputs [dq, dk, dv]. */
export const XT_ATTENTION_GRAD_KERNEL = 'XtAttentionGrad';

/** Options of `attend`. */
export interface AttendFnOptions {
  /** Logit scale (default d^-0.5). */
  scale?: number;
  causal?: boolean;
  /** mask: [b, j] key padding, or [b|1, h|1, i|1, j] bool; true = may attend. */
  mask?: tf.Tensor | null;
  /** attnBias: additive [h, i, j] or [b|1, h, i, j]. */
  attnBias?: tf.Tensor | null;
  /** Dropout on the attention matrix (applied only when `training`). */
  dropout?: number;
  training?: boolean;
  /** Use the registered fused kernel when the backend has one (default true). */
  useKernel?: boolean;
}

/** True when the active backend registered the fused attention kernel. */
export function hasFusedAttentionKernel(): boolean {
  const backend = tf.getBackend();
  return backend != null && tf.getKernel(XT_ATTENTION_KERNEL, backend) != null;
}

function checkQkv(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor): void {
  if (q.rank !== 4) throw new Error(`q: expected [batch, heads, i, dimHead], got shape ${fmtShape(q.shape)}`);
  if (k.rank !== 4)
    throw new Error(`k: expected [batch, kvHeads, j, dimHead], got shape ${fmtShape(k.shape)}`);
  if (v.rank !== 4)
    throw new Error(`v: expected [batch, kvHeads, j, valueDimHead], got shape ${fmtShape(v.shape)}`);
  const [b, h, , d] = q.shape as [number, number, number, number];
  const [kb, kh, kj, kd] = k.shape as [number, number, number, number];
  if (kb !== b || kd !== d || h % kh !== 0)
    throw new Error(
      `k: expected [${b}, a divisor of ${h}, j, ${d}] to match q ${fmtShape(q.shape)}, got ${fmtShape(k.shape)}`,
    );
  if (v.shape[0] !== b || v.shape[1] !== kh || v.shape[2] !== kj)
    throw new Error(
      `v: expected [${b}, ${kh}, ${kj}, dv] to match k ${fmtShape(k.shape)}, got ${fmtShape(v.shape)}`,
    );
}

/** Normalises a mask to rank 4 bool [b|1, h|1, i|1, j], checking it against [b, h, i, j]. */
function mask4(mask: tf.Tensor, b: number, h: number, i: number, j: number): tf.Tensor {
  if (mask.dtype !== 'bool') throw new Error(`mask: expected dtype bool, got ${mask.dtype}`);
  const m = mask.rank === 2 ? tf.reshape(mask, [mask.shape[0]!, 1, 1, mask.shape[1]!]) : mask;
  const want = [b, h, i, j];
  if (m.rank !== 4 || !m.shape.every((s, ax) => s === 1 || s === want[ax]))
    throw new Error(
      `mask: expected [${b}, ${j}] or a shape broadcastable to ${fmtShape(want)}, got ${fmtShape(mask.shape)}`,
    );
  return m;
}

/** Rows [b|1, h|1, i|1, 1] that have at least one key to attend to under `mask`. */
function rowHasKey(mask: tf.Tensor): tf.Tensor {
  return tf.any(mask, -1, true);
}

/**
 * Plain softmax attention with masks and bias, in the reference's order of operations.
 * q: [b, h, i, d], k: [b, h, j, d], v: [b, h, j, dv] -> [b, h, i, dv].
 */
function compositeAttend(
  q: tf.Tensor,
  k: tf.Tensor,
  v: tf.Tensor,
  scale: number,
  causal: boolean,
  mask: tf.Tensor | null,
  bias: tf.Tensor | null,
  dropout: number,
  training: boolean,
): tf.Tensor {
  const i = q.shape[2]!;
  const j = k.shape[2]!;
  let sim = tf.mul(tf.matMul(q, k, false, true), scale);
  if (bias) sim = tf.add(sim, bias);
  if (mask) sim = maskedFill(sim, mask, MASK_VALUE);
  if (causal) sim = maskedFill(sim, causalKeep(i, j), MASK_VALUE);
  let attn = tf.softmax(sim, -1);
  attn = dropoutSeeded(attn, dropout, training);
  let out = tf.matMul(attn, v);
  if (mask) out = tf.where(rowHasKey(mask), out, tf.zerosLike(out));
  return out;
}

/**
 * The backward pass of the `XtAttention` contract, in ordinary ops (for a backend's gradient config,
 * or the customGrad wrapper). dy: [b, h, i, dv]; q: [b, h, i, d]; k: [b, h, j, d]; v: [b, h, j, dv];
 * mask: bool [b|1, h|1, i|1, j] -> [dq, dk, dv].
 */
export function attendBackward(
  dy: tf.Tensor,
  q: tf.Tensor,
  k: tf.Tensor,
  v: tf.Tensor,
  opts: { scale: number; causal: boolean; mask?: tf.Tensor | null },
): tf.Tensor[] {
  return tf.tidy(() => {
    const { scale, causal } = opts;
    const mask = opts.mask ?? null;
    const i = q.shape[2]!;
    const j = k.shape[2]!;
    let sim = tf.mul(tf.matMul(q, k, false, true), scale);
    if (mask) sim = maskedFill(sim, mask, MASK_VALUE);
    if (causal) sim = maskedFill(sim, causalKeep(i, j), MASK_VALUE);
    const p = tf.softmax(sim, -1);
    const g = mask ? tf.where(rowHasKey(mask), dy, tf.zerosLike(dy)) : dy;
    const dv = tf.matMul(p, g, true, false);
    const dp = tf.matMul(g, v, false, true);
    const ds = tf.mul(p, tf.sub(dp, tf.sum(tf.mul(dp, p), -1, true)));
    const dq = tf.mul(tf.matMul(ds, k), scale);
    const dk = tf.mul(tf.matMul(ds, q, true, false), scale);
    return [dq, dk, dv];
  });
}

/** The fused kernel, with an analytic backward. */
function kernelAttend(
  q: tf.Tensor,
  k: tf.Tensor,
  v: tf.Tensor,
  scale: number,
  causal: boolean,
  mask: tf.Tensor | null,
): tf.Tensor {
  // a gradient config that saves `mask` cannot run without one (the engine would save a missing
  // input), so mask-less calls keep the customGrad wrapper
  if (mask && tf.getGradient(XT_ATTENTION_KERNEL)) {
    return tf.engine().runKernel(XT_ATTENTION_KERNEL, { q, k, v, mask }, {
      scale,
      causal,
    } as unknown as tf.NamedAttrMap) as tf.Tensor;
  }
  const fused = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [qq, kk, vv, save] = args as [tf.Tensor, tf.Tensor, tf.Tensor, tf.GradSaveFunc];
    save([qq, kk, vv]);
    const inputs: tf.NamedTensorMap = mask ? { q: qq, k: kk, v: vv, mask } : { q: qq, k: kk, v: vv };
    const value = tf.engine().runKernel(XT_ATTENTION_KERNEL, inputs, {
      scale,
      causal,
    } as unknown as tf.NamedAttrMap) as tf.Tensor;
    const gradFunc = (dy: tf.Tensor, saved: tf.Tensor[]): tf.Tensor[] => {
      const [sq, sk, sv] = saved as [tf.Tensor, tf.Tensor, tf.Tensor];
      // a backend with a native backward kernel computes [dq, dk, dv] in one step
      if (tf.getKernel(XT_ATTENTION_GRAD_KERNEL, tf.getBackend())) {
        const gradInputs: tf.NamedTensorMap = { dy, q: sq, k: sk, v: sv };
        if (mask) gradInputs.mask = mask;
        return tf.engine().runKernel(XT_ATTENTION_GRAD_KERNEL, gradInputs, {
          scale,
          causal,
        } as unknown as tf.NamedAttrMap) as tf.Tensor[];
      }
      return attendBackward(dy, sq, sk, sv, { scale, causal, mask });
    };
    return { value, gradFunc };
  });
  return (fused as (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => tf.Tensor)(q, k, v);
}

/**
 * Scaled dot-product attention as one fused step (the `flash` path): the registered
 * `XtAttention` kernel when the active backend has one and no bias is given, else the composite
 * ops with the same numbers. Key/value heads may divide the query heads (grouped-query).
 * q: [b, h, i, d], k: [b, kvh, j, d], v: [b, kvh, j, dv] -> [b, h, i, dv].
 */
export function attend(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, opts: AttendFnOptions = {}): tf.Tensor {
  checkQkv(q, k, v);
  return tf.tidy(() => {
    const [b, h, i, d] = q.shape as [number, number, number, number];
    const j = k.shape[2]!;
    const scale = opts.scale ?? d ** -0.5;
    const kk = repeatKvHeads(k, h);
    const vv = repeatKvHeads(v, h);
    const mask = opts.mask ? mask4(opts.mask, b, h, i, j) : null;
    let bias: tf.Tensor | null = null;
    if (opts.attnBias) {
      const ab = opts.attnBias;
      const ok =
        (ab.rank === 3 && ab.shape[0] === h && ab.shape[1] === i && ab.shape[2] === j) ||
        (ab.rank === 4 &&
          (ab.shape[0] === 1 || ab.shape[0] === b) &&
          ab.shape[1] === h &&
          ab.shape[2] === i &&
          ab.shape[3] === j);
      if (!ok)
        throw new Error(
          `attnBias: expected [${h}, ${i}, ${j}] or [${b}, ${h}, ${i}, ${j}], got ${fmtShape(ab.shape)}`,
        );
      bias = ab;
    }
    const causal = opts.causal ?? false;
    const training = opts.training ?? false;
    const dropout = opts.dropout ?? 0;
    const canFuse =
      (opts.useKernel ?? true) && !bias && !(training && dropout > 0) && hasFusedAttentionKernel();
    if (canFuse) return kernelAttend(q, kk, vv, scale, causal, mask);
    return compositeAttend(q, kk, vv, scale, causal, mask, bias, dropout, training);
  });
}

/**
 * Selective attention (arXiv 2410.02703, section 3.3): the first head's positive logits, summed over
 * earlier queries, are subtracted from every head's logits, so a token can mask itself from the
 * future. The first query's own key (column j - i) and each query's own position never gate.
 * sim: [b, h, i, j] -> [b, h, i, j].
 */
export function selectiveAttn(sim: tf.Tensor): tf.Tensor {
  const [b, , i, j] = sim.shape as [number, number, number, number];
  let gate = tf.relu(tf.squeeze(tf.slice(sim, [0, 0, 0, 0], [-1, 1, -1, -1]), [1])); // [b, i, j]
  const col = tf.reshape(tf.range(0, j, 1, 'int32'), [1, j]);
  const row = tf.reshape(tf.range(0, i, 1, 'int32'), [i, 1]);
  // zero the column of the first query's position, the diagonal and (when j > i) the keys before the queries
  const sos = tf.notEqual(col, tf.scalar(j - i, 'int32'));
  const eye = tf.logicalOr(
    tf.equal(tf.sub(col, tf.scalar(j - i, 'int32')), row),
    tf.less(col, tf.scalar(j - i, 'int32')),
  );
  const keep = tf.cast(tf.logicalAnd(sos, tf.logicalNot(eye)), 'float32');
  gate = tf.mul(gate, keep);
  // only gate the future: query r takes the sum over queries < r
  gate = tf.slice(
    tf.pad(gate, [
      [0, 0],
      [1, 0],
      [0, 0],
    ]),
    [0, 0, 0],
    [b, i, j],
  );
  gate = tf.cumsum(gate, 1);
  return tf.sub(sim, tf.expandDims(gate, 1));
}

/** A 1x1 convolution across heads (nn.Conv2d(heads, heads, 1, bias=False)), initialised to identity. */
export class HeadMix extends Module {
  readonly weight: tf.Variable;
  constructor(readonly heads: number) {
    super();
    this.weight = this.registerParameter(
      'weight',
      tf.tidy(() => tf.reshape(tf.eye(heads), [heads, heads, 1, 1])),
    );
  }

  /** x: [b, h, i, j] -> [b, h, i, j], out[:, o] = sum_c weight[o, c] x[:, c]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const [b, h, i, j] = x.shape as [number, number, number, number];
      const w = tf.reshape(this.weight, [h, h]);
      const flat = tf.reshape(tf.transpose(x, [0, 2, 3, 1]), [-1, h]);
      const mixed = tf.matMul(flat, w, false, true);
      return tf.transpose(tf.reshape(mixed, [b, i, j, h]), [0, 3, 1, 2]);
    });
  }
}

/** Options of the `Attend` module (the reference's Attend kwargs). */
export interface AttendModuleOptions {
  heads: number;
  causal: boolean;
  dropout: number;
  preTalkingHeads: boolean;
  postTalkingHeads: boolean;
  preScalePostTalkingHeads: boolean;
  sparseTopk: number | null;
  sparseTopkStraightThrough: boolean;
  /** Logit scale (default d^-0.5). */
  scale: number | null;
  l2Distance: boolean;
  sigmoid: boolean;
  /** Replaces the attention function (softmax): logits [b, h, i, j] -> weights [b, h, i, j]. */
  customAttnFn?: ((logits: tf.Tensor) => tf.Tensor) | null;
  /** Selective attention (arXiv 2410.02703): tokens may stop later tokens from attending to them. */
  selective: boolean;
  hard: boolean;
  flash: boolean;
  addZeroKv: boolean;
  softclampLogits: boolean;
  logitSoftclampValue: number;
  /** Contextual position encoding added to the masked logits (registered as `cope`). */
  cope?: CoPE | null;
}

/** What `Attend.forward` returns. */
export interface AttendResult {
  out: tf.Tensor;
  qkSimilarities?: tf.Tensor;
  preSoftmaxAttn?: tf.Tensor;
  postSoftmaxAttn?: tf.Tensor;
}

/**
 * The core attention step (the reference's `Attend`): logits, talking heads, bias, masks, the
 * attention function (softmax, sigmoid, sparse top-k, hard), dropout and the weighted sum.
 * Holds the talking-heads parameters (`pre_softmax_talking_heads`, `post_softmax_talking_heads`,
 * `pre_scale_post_talking_heads`).
 */
export class Attend extends Module {
  readonly options: AttendModuleOptions;
  readonly preSoftmaxTalkingHeads: HeadMix | null = null;
  readonly postSoftmaxTalkingHeads: HeadMix | null = null;
  readonly preScalePostTalkingHeads: HeadMix | null = null;
  readonly cope: CoPE | null = null;

  constructor(options: AttendModuleOptions) {
    super();
    this.options = options;
    const o = options;
    const sparse = o.sparseTopk != null;
    const notWithFlash = (what: string): OptionError =>
      new OptionError(
        'flash',
        `false with ${what} (it needs the attention matrix, which flash does not form)`,
        'true',
      );
    if (o.flash && o.sigmoid) throw notWithFlash('sigmoid attention');
    if (o.flash && o.hard) throw notWithFlash('hard attention');
    if (o.flash && sparse) throw notWithFlash('sparseTopk attention');
    if ([o.sigmoid, o.hard, o.l2Distance, sparse].filter(Boolean).length > 1)
      throw OptionError.of('sigmoid', 'at most one of sigmoid, hard, l2Distance, sparseTopk', {
        sigmoid: o.sigmoid,
        hard: o.hard,
        l2Distance: o.l2Distance,
        sparseTopk: o.sparseTopk,
      });
    if (o.flash && (o.preTalkingHeads || o.postTalkingHeads || o.preScalePostTalkingHeads))
      throw notWithFlash('talking heads (preTalkingHeads, postTalkingHeads, preScalePostTalkingHeads)');
    if (o.flash && o.selective) throw notWithFlash('selective attention');
    if (o.selective && !o.causal)
      throw new OptionError(
        'selective',
        'causal attention (selective is for autoregression)',
        'causal false',
      );
    if (o.softclampLogits && o.flash) throw notWithFlash('softclampLogits');
    if (o.softclampLogits && !(o.logitSoftclampValue > 0))
      throw OptionError.of('logitSoftclampValue', 'a positive number', o.logitSoftclampValue);
    if (sparse && !(Number.isInteger(o.sparseTopk) && o.sparseTopk! > 0))
      throw OptionError.of('sparseTopk', 'a positive integer', o.sparseTopk);
    if (o.preTalkingHeads)
      this.preSoftmaxTalkingHeads = this.registerModule('pre_softmax_talking_heads', new HeadMix(o.heads));
    if (o.postTalkingHeads)
      this.postSoftmaxTalkingHeads = this.registerModule('post_softmax_talking_heads', new HeadMix(o.heads));
    if (o.preScalePostTalkingHeads)
      this.preScalePostTalkingHeads = this.registerModule(
        'pre_scale_post_talking_heads',
        new HeadMix(o.heads),
      );
    if (o.cope) {
      if (o.flash) throw notWithFlash('CoPE (useCope)');
      this.cope = this.registerModule('cope', o.cope);
    }
  }

  /**
   * q: [b, h, i, d], k: [b, kvh, j, d], v: [b, kvh, j, dv]; mask: [b, j] or [b|1, h|1, i|1, j] bool;
   * attnBias: [h, i, j] or [b|1, h, i, j]; prevAttn: [b, h, i, j]. Returns out: [b, h, i, dv] and,
   * on the non-fused path, the attention matrices [b, h, i, j].
   */
  forward(
    q: tf.Tensor,
    k: tf.Tensor,
    v: tf.Tensor,
    args: { mask?: tf.Tensor | null; attnBias?: tf.Tensor | null; prevAttn?: tf.Tensor | null } = {},
  ): AttendResult {
    checkQkv(q, k, v);
    const o = this.options;
    return tf.tidy(() => {
      const [b, h, , d] = q.shape as [number, number, number, number];
      const scale = o.scale ?? d ** -0.5;
      let k4 = repeatKvHeads(k, h);
      let v4 = repeatKvHeads(v, h);
      let mask = args.mask ?? null;
      let bias = args.attnBias ?? null;
      const i = q.shape[2]!;
      if (mask) mask = mask4(mask, b, h, i, k.shape[2]!);
      if (bias && bias.rank === 3) bias = tf.expandDims(bias, 0);
      if (o.addZeroKv) {
        k4 = padAxis(k4, 2, 1, 0, 0);
        v4 = padAxis(v4, 2, 1, 0, 0);
        if (mask) mask = padAxis(mask, 3, 1, 0, 1);
        if (bias) bias = padAxis(bias, 3, 1, 0, 0);
      }
      const j = k4.shape[2]!;
      if (args.prevAttn) {
        const p = args.prevAttn;
        if (p.rank !== 4 || p.shape[0] !== b || p.shape[1] !== h || p.shape[2] !== i || p.shape[3] !== j)
          throw new Error(`prevAttn: expected [${b}, ${h}, ${i}, ${j}], got ${fmtShape(p.shape)}`);
      }
      if (o.flash) {
        if (args.prevAttn)
          throw new Error('prevAttn: residual attention is not compatible with flash attention');
        let qf = q;
        let kf = k4;
        if (o.l2Distance) {
          // -|q - k|^2 as a dot product: [2q, |q|^2, -1] . [k, -1, |k|^2]
          const qn = tf.sum(tf.square(q), -1, true);
          const kn = tf.sum(tf.square(k4), -1, true);
          qf = tf.concat([tf.mul(q, 2), qn, tf.neg(tf.onesLike(qn))], -1);
          kf = tf.concat([k4, tf.neg(tf.onesLike(kn)), kn], -1);
        }
        const out = attend(qf, kf, v4, {
          scale,
          causal: o.causal,
          mask,
          attnBias: bias,
          dropout: o.dropout,
          training: this.training,
        });
        return { out };
      }

      let sim: tf.Tensor;
      if (!o.l2Distance) {
        sim = tf.matMul(q, k4, false, true);
      } else {
        const qq = tf.sum(tf.square(q), -1, true);
        const kk = tf.reshape(tf.sum(tf.square(k4), -1), [b, h, 1, j]);
        const dist = tf.relu(tf.sub(tf.add(qq, kk), tf.mul(tf.matMul(q, k4, false, true), 2)));
        sim = tf.neg(dist);
      }
      sim = tf.mul(sim, scale);
      if (args.prevAttn) sim = tf.add(sim, args.prevAttn);
      const qkSimilarities = sim;
      let preToPostScale: tf.Tensor | null = null;
      if (this.preScalePostTalkingHeads) preToPostScale = this.preScalePostTalkingHeads.forward(sim);
      if (this.preSoftmaxTalkingHeads) sim = tf.add(sim, this.preSoftmaxTalkingHeads.forward(sim));
      if (bias) sim = tf.add(sim, bias);
      if (o.softclampLogits) sim = tf.mul(tf.tanh(tf.div(sim, o.logitSoftclampValue)), o.logitSoftclampValue);
      if (mask) sim = maskedFill(sim, mask, MASK_VALUE);
      if (o.causal) sim = maskedFill(sim, causalKeep(i, j), MASK_VALUE);
      if (this.cope) sim = tf.add(sim, this.cope.forward(q, sim));
      if (o.selective) sim = selectiveAttn(sim);
      const preSoftmaxAttn = sim;
      let attn = this.attnFn(sim);
      const postSoftmaxAttn = attn;
      attn = dropoutSeeded(attn, o.dropout, this.training);
      if (this.postSoftmaxTalkingHeads) attn = this.postSoftmaxTalkingHeads.forward(attn);
      if (preToPostScale) attn = tf.mul(attn, preToPostScale);
      let out = tf.matMul(attn, v4);
      if (mask) out = tf.where(rowHasKey(mask), out, tf.zerosLike(out));
      return { out, qkSimilarities, preSoftmaxAttn, postSoftmaxAttn };
    });
  }

  /** The attention function on logits [b, h, i, j]. */
  private attnFn(logits: tf.Tensor): tf.Tensor {
    const o = this.options;
    if (o.customAttnFn) return o.customAttnFn(logits);
    if (o.sigmoid) return tf.sigmoid(logits);
    if (o.hard) {
      const n = logits.shape[logits.rank - 1]!;
      const oneHot = noGrad((l) => tf.cast(tf.oneHot(tf.argMax(l, -1), n), 'float32'), logits);
      return straightThrough(oneHot, tf.softmax(logits, -1));
    }
    if (o.sparseTopk != null) {
      const n = logits.shape[logits.rank - 1]!;
      const topk = Math.min(o.sparseTopk, n);
      const keep = noGrad((l) => {
        const kth = tf.slice(tf.topk(l, topk).values, [0, 0, 0, topk - 1], [-1, -1, -1, 1]);
        return tf.logicalAnd(tf.greaterEqual(l, kth), tf.greater(l, MASK_VALUE));
      }, logits);
      const topkAttn = tf.softmax(maskedFill(logits, keep, MASK_VALUE), -1);
      if (!o.sparseTopkStraightThrough) return topkAttn;
      return straightThrough(topkAttn, tf.softmax(logits, -1));
    }
    return tf.softmax(logits, -1);
  }
}
