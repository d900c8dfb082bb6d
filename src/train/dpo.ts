import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { TransformerWrapper } from '../wrappers/transformer-wrapper.js';
import { checkKnownKeys, fmt } from '../wrappers/common.js';
import { fromConfig, toConfig } from '../io/config.js';
import { checkTensor } from '../utils/errors.js';
import { ensureGradients } from './gradients.js';

// gradients of the log-softmax and the gather (TF.js's Node build leaves them out; see ensureGradients)
await ensureGradients();

/** Options of `DPO` (camelCase of the reference's keyword names). */
export interface DPOOptions {
  /** Temperature of the preference: the loss is -log sigmoid(beta * (policy margin - reference margin)). */
  beta: number;
  /** Padding id: where a sequence mask is not given, positions holding it are left out (null: none). */
  padId: number | null;
}

export const dpoDefaults: DPOOptions = { beta: 0.1, padId: null };

/** Per-call options of `DPO.forward`. */
export interface DPOForwardOptions {
  /** promptMask: [b, n] bool, true at the prompt's positions (left out of the log-likelihoods). Required. */
  promptMask: tf.Tensor;
  /** preferredSeqMask / unpreferredSeqMask: [b, n] bool, true = counts (default: not padId, or all). */
  preferredSeqMask?: tf.Tensor;
  unpreferredSeqMask?: tf.Tensor;
}

/**
 * Direct preference optimisation (the reference's `dpo.DPO`, after Rafailov et al. 2023, appendix B)
 * of an autoregressive `TransformerWrapper`: the policy (the model given, trained) and a frozen
 * reference copy taken at construction. `forward` gives the mean over the batch of
 * -log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l))), where each term is the mean log-likelihood
 * of a sequence's next tokens under that model, over the positions its mask keeps (the mask read at
 * the input positions, seq[:, :-1], as the reference does) outside the prompt.
 * Parameters: `policy_model.*` (trainable) and `ref_model.*` (frozen: not trainable).
 */
export class DPO extends Module {
  readonly options: DPOOptions;
  policyModel: TransformerWrapper;
  refModel: TransformerWrapper;

  /**
   * `model`: the policy. `refModel`: the frozen reference (default: a copy of `model` now, with its
   * own weights); it must have the policy's configuration, and is owned (and frozen) by the DPO.
   */
  constructor(model: TransformerWrapper, options: Partial<DPOOptions> = {}, refModel?: TransformerWrapper) {
    super();
    if (!(model instanceof TransformerWrapper))
      throw new Error(
        `model: expected a TransformerWrapper, got ${fmt((model as unknown as object | null)?.constructor?.name ?? model)}`,
      );
    checkKnownKeys('DPO', options, Object.keys(dpoDefaults));
    const o: DPOOptions = { ...dpoDefaults, ...options };
    if (typeof o.beta !== 'number' || !Number.isFinite(o.beta))
      throw new Error(`beta: expected a finite number, got ${fmt(o.beta)}`);
    if (o.padId !== null && !Number.isInteger(o.padId))
      throw new Error(`padId: expected an integer or null, got ${fmt(o.padId)}`);
    this.options = o;
    let ref = refModel;
    if (ref === undefined) {
      ref = fromConfig(toConfig(model)) as TransformerWrapper;
      ref.loadStateDict(model.stateDict());
    } else if (!(ref instanceof TransformerWrapper) || ref === model) {
      throw new Error('refModel: expected a TransformerWrapper other than the policy model');
    } else {
      const shapes = (m: Module): string => JSON.stringify(m.namedParameters().map(([n, v]) => [n, v.shape]));
      if (shapes(ref) !== shapes(model))
        throw new Error("refModel: expected the policy model's parameter names and shapes");
    }
    for (const v of ref.parameters()) v.trainable = false;
    ref.eval();
    this.policyModel = this.registerModule('policy_model', model);
    this.refModel = this.registerModule('ref_model', ref);
  }

  /** The policy's parameters (what an optimiser updates), as the reference's `parameters()`. */
  policyParameters(): tf.Variable[] {
    return this.policyModel.parameters();
  }

  /**
   * preferredSeq, unpreferredSeq: [b, n] int32 (prompt then answer, n >= 2) -> scalar DPO loss.
   * The reference model runs in eval mode without gradients; the policy in its own mode.
   */
  forward(preferredSeq: tf.Tensor, unpreferredSeq: tf.Tensor, opts: DPOForwardOptions): tf.Scalar {
    const [b, n] = this.validate(preferredSeq, unpreferredSeq, opts);
    this.refModel.eval();
    return tf.tidy(() => {
      const seqMask = (seq: tf.Tensor, given?: tf.Tensor): tf.Tensor | undefined =>
        given ?? (this.options.padId !== null ? tf.notEqual(seq, this.options.padId) : undefined);
      const notPrompt = tf.logicalNot(opts.promptMask);
      const keepW = maskAtInputs(and(notPrompt, seqMask(preferredSeq, opts.preferredSeqMask)), b, n);
      const keepL = maskAtInputs(and(notPrompt, seqMask(unpreferredSeq, opts.unpreferredSeqMask)), b, n);
      const ref = tf.tidy(() =>
        tf.sub(
          maskedMean(seqLogProbs(this.refModel, preferredSeq), keepW),
          maskedMean(seqLogProbs(this.refModel, unpreferredSeq), keepL),
        ),
      );
      const policy = tf.sub(
        maskedMean(seqLogProbs(this.policyModel, preferredSeq), keepW),
        maskedMean(seqLogProbs(this.policyModel, unpreferredSeq), keepL),
      );
      // -log sigmoid(z) = softplus(-z)
      const z = tf.mul(tf.sub(policy, ref), this.options.beta);
      return tf.mean(tf.softplus(tf.neg(z))) as tf.Scalar;
    });
  }

  private validate(w: tf.Tensor, l: tf.Tensor, opts: DPOForwardOptions): [number, number] {
    checkTensor('preferredSeq', w, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq]' });
    checkTensor('unpreferredSeq', l, { shape: w.shape, dtype: 'int32' });
    const [b, n] = w.shape as [number, number];
    if (n < 2)
      throw new Error(`preferredSeq: expected at least 2 positions (inputs and next tokens), got ${n}`);
    if (!opts || !opts.promptMask)
      throw new Error('promptMask: expected a [batch, seq] bool tensor (true at the prompt), got undefined');
    checkTensor('promptMask', opts.promptMask, { shape: [b, n], dtype: 'bool' });
    if (opts.preferredSeqMask)
      checkTensor('preferredSeqMask', opts.preferredSeqMask, { shape: [b, n], dtype: 'bool' });
    if (opts.unpreferredSeqMask)
      checkTensor('unpreferredSeqMask', opts.unpreferredSeqMask, { shape: [b, n], dtype: 'bool' });
    return [b, n];
  }
}

function and(a: tf.Tensor, b: tf.Tensor | undefined): tf.Tensor {
  return b ? tf.logicalAnd(a, b) : a;
}

/** The reference reads a [b, n] mask at the input positions: [b, n] -> [b, n - 1] float. */
function maskAtInputs(mask: tf.Tensor, b: number, n: number): tf.Tensor {
  return tf.cast(tf.slice(mask, [0, 0], [b, n - 1]), 'float32');
}

/** log p(seq[:, t + 1] | seq[:, :t + 1]) under `model`: seq [b, n] -> [b, n - 1]. */
function seqLogProbs(model: TransformerWrapper, seq: tf.Tensor): tf.Tensor {
  const [b, n] = seq.shape as [number, number];
  const logits = model.forward(tf.slice(seq, [0, 0], [b, n - 1]));
  const logp = tf.logSoftmax(logits, -1);
  const target = tf.oneHot(tf.slice(seq, [0, 1], [b, n - 1]), logp.shape[2]!);
  return tf.sum(tf.mul(logp, target), -1);
}

/** Mean of x [b, m] over the positions mask [b, m] keeps (sum / max(count, 1e-5)) -> [b]. */
function maskedMean(x: tf.Tensor, mask: tf.Tensor): tf.Tensor {
  return tf.div(tf.sum(tf.mul(x, mask), -1), tf.maximum(tf.sum(mask, -1), 1e-5));
}
