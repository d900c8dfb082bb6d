import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { getRng } from '../utils/random.js';
import { MASK_VALUE, causalKeep, maskedFill, noGrad } from './ops.js';

/** Options of `CoPE` (the reference's kwargs in camelCase). */
export interface CoPEOptions {
  heads: number;
  /** Number of learned position embeddings; counted positions are clamped below it. */
  maxPos: number;
  /** Interpolate between integer positions with a softmax over distances instead of linearly. */
  softOnehot: boolean;
  /** Mix heads (1x1 convolution, `talking_heads.weight`) before the gates. */
  talkingHeads: boolean;
  softOnehotTemp: number;
}

export const copeDefaults: CoPEOptions = {
  heads: 8,
  maxPos: 16,
  softOnehot: false,
  talkingHeads: false,
  softOnehotTemp: 5e-2,
};

/** nn.Conv2d(heads, heads, 1, bias=False) with torch's default init: uniform +-1/sqrt(heads). */
class Conv1x1 extends Module {
  readonly weight: tf.Variable;
  constructor(heads: number) {
    super();
    const bound = 1 / Math.sqrt(heads);
    this.weight = this.registerParameter(
      'weight',
      tf.tensor4d(getRng().fillUniform(heads * heads, -bound, bound), [heads, heads, 1, 1]),
    );
  }
  /** x: [b, h, i, j] -> [b, h, i, j]. */
  forward(x: tf.Tensor): tf.Tensor {
    const [b, h, i, j] = x.shape as [number, number, number, number];
    const flat = tf.reshape(tf.transpose(x, [0, 2, 3, 1]), [-1, h]);
    const mixed = tf.matMul(flat, tf.reshape(this.weight, [h, h]), false, true);
    return tf.transpose(tf.reshape(mixed, [b, i, j, h]), [0, 3, 1, 2]);
  }
}

/**
 * Contextual position encoding (CoPE, arXiv 2405.18719, appendix B): positions are counted by
 * sigmoid gates over the (masked) attention logits, from each key to the query, and the query's
 * dot product with the interpolated position embeddings is added to the logits.
 * Parameters: `pos_emb` [maxPos, dimHead] (zero init), `talking_heads.weight`; buffer `positions`.
 */
export class CoPE extends Module {
  readonly options: CoPEOptions;
  readonly posEmb: tf.Variable;
  readonly talkingHeads: Conv1x1 | null = null;

  /** dim: the head dimension. */
  constructor(dim: number, options: Partial<CoPEOptions> = {}) {
    super();
    const o = { ...copeDefaults, ...options };
    if (!Number.isInteger(o.maxPos) || o.maxPos <= 0)
      throw new Error(`maxPos: expected a positive integer, got ${o.maxPos}`);
    this.options = o;
    this.posEmb = this.registerParameter('pos_emb', tf.zeros([o.maxPos, dim]));
    if (o.talkingHeads) this.talkingHeads = this.registerModule('talking_heads', new Conv1x1(o.heads));
    if (o.softOnehot) this.registerBuffer('positions', tf.range(0, o.maxPos, 1, 'int32'));
  }

  /** query: [b, h, i, d], attnLogits: [b, h, i, j] (masked) -> the additive logits [b, h, i, j]. */
  forward(query: tf.Tensor, attnLogits: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const o = this.options;
      let logits = attnLogits;
      if (this.talkingHeads) {
        const [, , i, j] = logits.shape as [number, number, number, number];
        logits = maskedFill(this.talkingHeads.forward(logits), causalKeep(i, j), MASK_VALUE);
      }
      const gates = tf.sigmoid(logits);
      const pos = tf.minimum(tf.cumsum(gates, 3, false, true), o.maxPos - 1); // [b, h, i, j]
      const [b, h, i, d] = query.shape as [number, number, number, number];
      // 2-d matMul: the gradient of a broadcast rank-2 operand is not reduced by BatchMatMul's
      const logitsInt = tf.reshape(tf.matMul(tf.reshape(query, [-1, d]), this.posEmb, false, true), [
        b,
        h,
        i,
        this.options.maxPos,
      ]); // [b, h, i, P]
      const P = o.maxPos;
      if (o.softOnehot) {
        const positions = tf.cast(this.getBuffer('positions'), 'float32');
        const diff = tf.abs(tf.sub(tf.expandDims(pos, -1), positions)); // [b, h, i, j, P]
        const soft = tf.softmax(tf.div(tf.neg(diff), o.softOnehotTemp), -1);
        return tf.sum(tf.mul(soft, tf.expandDims(logitsInt, 3)), -1);
      }
      const pick = (idx: tf.Tensor): tf.Tensor => {
        const oneHot = noGrad((p) => tf.cast(tf.oneHot(tf.cast(p, 'int32'), P), 'float32'), idx);
        return tf.sum(tf.mul(oneHot, tf.expandDims(logitsInt, 3)), -1);
      };
      const floor = noGrad((p) => tf.floor(p), pos);
      const ceilVals = pick(noGrad((p) => tf.ceil(p), pos));
      const floorVals = pick(floor);
      const w = tf.sub(pos, floor);
      return tf.add(tf.mul(ceilVals, w), tf.mul(floorVals, tf.sub(1, w)));
    });
  }
}
