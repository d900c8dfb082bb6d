/**
 * Gradient of the fused `XtAttention` kernel: inputs {q, k, v, mask?}, attrs {scale, causal}.
 * The backward pass is one native kernel (`XtAttentionGrad`) returning [dq, dk, dv].
 */
import * as tf from '@tensorflow/tfjs-core';
import type { NamedAttrMap, Tensor } from '@tensorflow/tfjs-core';

export const XT_ATTENTION = 'XtAttention';
export const XT_ATTENTION_GRAD = 'XtAttentionGrad';

let registered = false;

export function registerAttentionGradient(): void {
  if (registered) return;
  registered = true;
  tf.registerGradient({
    kernelName: XT_ATTENTION,
    inputsToSave: ['q', 'k', 'v', 'mask'],
    gradFunc: (dy: Tensor | Tensor[], saved: Tensor[], attrs: NamedAttrMap) => {
      const [q, k, v, mask] = saved;
      // computed here, outside the per-input tidy scopes, so all three survive
      const inputs: tf.NamedTensorMap = { dy: dy as Tensor, q, k, v };
      if (mask) inputs.mask = mask;
      const [dq, dk, dv] = tf.engine().runKernel(XT_ATTENTION_GRAD, inputs, attrs) as Tensor[];
      return { q: () => dq, k: () => dk, v: () => dv };
    },
  });
}
