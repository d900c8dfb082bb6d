/**
 * Cross-entropy over class logits. A backend may register it as one kernel pair; the library uses
 * it where the active backend has both, and otherwise runs the same math as ordinary ops.
 *
 *   XtCrossEntropy      inputs {logits: float32 [N, C], target: int32 [N]}, attrs {ignoreIndex}
 *                       outputs [losses: float32 [N], logp: float32 [N, C]]
 *                       logp = log_softmax(logits) over C (kept for the backward pass);
 *                       losses[i] = -logp[i, target[i]], and 0 where target[i] == ignoreIndex
 *   XtCrossEntropyGrad  inputs {dy: float32 [N], logp: float32 [N, C], target: int32 [N]},
 *                       attrs {ignoreIndex}
 *                       output dlogits = (exp(logp) - onehot(target)) * dy[:, None], and 0 on the
 *                       ignored rows: the analytic gradient of the row losses, with no one-hot
 *                       built (the target column is corrected in place)
 *
 * Composite (the fallback, and what the kernels must equal): logp = logSoftmax(logits);
 * losses = -sum(logp * oneHot(target), -1) * valid.
 */
import * as tf from '@tensorflow/tfjs-core';
import { backendHasKernel } from './fused.js';

export const XT_CROSS_ENTROPY = 'XtCrossEntropy';
export const XT_CROSS_ENTROPY_GRAD = 'XtCrossEntropyGrad';

let registered = false;

/** Registers the gradient of XtCrossEntropy (idempotent; done on import). */
export function registerLossGradients(): void {
  if (registered) return;
  registered = true;
  tf.registerGradient({
    kernelName: XT_CROSS_ENTROPY,
    inputsToSave: ['target'],
    outputsToSave: [false, true],
    gradFunc: (dy, saved, attrs) => {
      const [target, logp] = saved as [tf.Tensor, tf.Tensor];
      // only the row losses carry a gradient; logp's (if any) is not used
      const dRows = Array.isArray(dy) ? dy[0]! : dy;
      return {
        logits: () =>
          tf.engine().runKernel(XT_CROSS_ENTROPY_GRAD, { dy: dRows, logp, target }, attrs) as tf.Tensor,
        target: () => tf.zerosLike(target),
      };
    },
  });
}
registerLossGradients();

function checkArgs(logits: tf.Tensor, target: tf.Tensor): void {
  if (logits.dtype !== 'float32' || logits.rank < 1)
    throw new Error(`logits: expected float32 [..., classes], got ${logits.dtype} [${logits.shape}]`);
  if (target.dtype !== 'int32') throw new Error(`target: expected int32 class ids, got ${target.dtype}`);
  const lead = logits.shape.slice(0, -1);
  if (!tf.util.arraysEqual(lead, target.shape))
    throw new Error(`target: expected shape [${lead}] (the logits' leading axes), got [${target.shape}]`);
}

/**
 * Cross-entropy of each position, as torch's F.cross_entropy(reduction='none') with
 * ignore_index (0 at ignored positions). logits: [..., c] float32, target: [...] int32 -> [...].
 * `fused: false` forces the composite.
 */
export function crossEntropyRows(
  logits: tf.Tensor,
  target: tf.Tensor,
  ignoreIndex = -100,
  fused = true,
): tf.Tensor {
  checkArgs(logits, target);
  return tf.tidy(() => {
    const c = logits.shape[logits.rank - 1]!;
    const flat = tf.reshape(logits, [-1, c]);
    const t = tf.reshape(target, [-1]);
    let rows: tf.Tensor;
    if (fused && backendHasKernel(XT_CROSS_ENTROPY) && backendHasKernel(XT_CROSS_ENTROPY_GRAD)) {
      const [losses, logp] = tf
        .engine()
        .runKernel(XT_CROSS_ENTROPY, { logits: flat, target: t }, { ignoreIndex }) as tf.Tensor[];
      logp!.dispose();
      rows = losses!;
    } else {
      const valid = tf.notEqual(t, ignoreIndex);
      const safe = tf.where(valid, t, tf.zerosLike(t));
      const logp = tf.logSoftmax(flat, -1);
      const picked = tf.sum(tf.mul(logp, tf.oneHot(safe, c)), -1);
      rows = tf.mul(tf.neg(picked), tf.cast(valid, 'float32'));
    }
    return tf.reshape(rows, target.shape);
  });
}

/**
 * Mean cross-entropy over the positions whose target is not `ignoreIndex`, as torch's
 * F.cross_entropy with ignore_index (NaN when every target is ignored).
 * logits: [..., c] float32, target: [...] int32 -> scalar.
 */
export function crossEntropy(
  logits: tf.Tensor,
  target: tf.Tensor,
  ignoreIndex = -100,
  fused = true,
): tf.Scalar {
  return tf.tidy(() => {
    const rows = crossEntropyRows(logits, target, ignoreIndex, fused);
    const count = tf.sum(tf.cast(tf.notEqual(target, ignoreIndex), 'float32'));
    return tf.div(tf.sum(rows), count) as tf.Scalar;
  });
}
