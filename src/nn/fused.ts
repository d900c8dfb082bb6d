/**
 * Fused kernels a backend may register (`tf.registerKernel`) to run common layer pieces as one step.
 * The library calls them only when the active backend has them, and otherwise runs the same math
 * as ordinary ops. Their gradients are registered here, once: each calls the backend's backward
 * kernel when it has one, else ordinary ops.
 *
 *   XtLayerNorm      inputs {x: float32 [..., d], gamma: float32 [d]}
 *                    attrs  {epsilon: number, gammaOffset: number}
 *                    output (x - mean) / sqrt(var + epsilon) * (gamma + gammaOffset), over the last
 *                    axis with the biased variance
 *   XtLayerNormGrad  inputs {dy, x, gamma}, same attrs -> [dx, dgamma]
 *   XtGelu           inputs {x: float32} -> x * 0.5 * (1 + erf(x / sqrt 2))
 *   XtGeluGrad       inputs {dy, x} -> dx
 *   XtRotary         inputs {x: float32 [b, h, n, w], cos, sin: float32 broadcastable to x, whole
 *                    last axis}, attrs {transpose: boolean}
 *                    output x * cos + swap(x) * sin, where swap exchanges features 2i and 2i + 1
 *                    (sin carries the rotation's signs); transpose: x * cos + swap(x * sin), which
 *                    is the gradient of the former with respect to x
 */
import * as tf from '@tensorflow/tfjs-core';

export const XT_LAYER_NORM = 'XtLayerNorm';
export const XT_LAYER_NORM_GRAD = 'XtLayerNormGrad';
export const XT_GELU = 'XtGelu';
export const XT_GELU_GRAD = 'XtGeluGrad';
export const XT_ROTARY = 'XtRotary';

let fusedEnabled = true;

/**
 * Turns the fused kernels on or off (default on); off, every backend runs the ordinary-op paths.
 * Returns the previous setting.
 */
export function setFusedKernels(on: boolean): boolean {
  const prev = fusedEnabled;
  fusedEnabled = on;
  return prev;
}

/** True when the active backend registered kernel `name` (and fused kernels are on). */
export function backendHasKernel(name: string): boolean {
  if (!fusedEnabled) return false;
  const backend = tf.getBackend();
  return backend != null && tf.getKernel(name, backend) != null;
}

function run(name: string, inputs: tf.NamedTensorMap, attrs: Record<string, unknown> = {}): tf.Tensor {
  return tf.engine().runKernel(name, inputs, attrs as tf.NamedAttrMap) as tf.Tensor;
}

/** LayerNorm's backward pass in ordinary ops. dy, x: [..., d]; gamma: [d] -> [dx, dgamma]. */
export function layerNormBackward(
  dy: tf.Tensor,
  x: tf.Tensor,
  gamma: tf.Tensor,
  eps: number,
  offset: number,
): [tf.Tensor, tf.Tensor] {
  return tf.tidy(() => {
    const d = x.shape[x.rank - 1]!;
    const mean = tf.mean(x, -1, true);
    const centered = tf.sub(x, mean);
    const rstd = tf.rsqrt(tf.add(tf.mean(tf.square(centered), -1, true), eps));
    const xhat = tf.mul(centered, rstd);
    const g = tf.mul(dy, offset !== 0 ? tf.add(gamma, offset) : gamma);
    const dx = tf.mul(
      rstd,
      tf.sub(tf.sub(g, tf.mean(g, -1, true)), tf.mul(xhat, tf.mean(tf.mul(g, xhat), -1, true))),
    );
    const dgamma = tf.reshape(tf.sum(tf.reshape(tf.mul(dy, xhat), [-1, d]), 0), [d]);
    return [dx, dgamma];
  });
}

/** The exact GELU's backward pass in ordinary ops: dy * (Φ(x) + x φ(x)). dy, x: same shape. */
export function geluBackward(dy: tf.Tensor, x: tf.Tensor): tf.Tensor {
  return tf.tidy(() => {
    const cdf = tf.mul(0.5, tf.add(1, tf.erf(tf.mul(x, Math.SQRT1_2))));
    const pdf = tf.mul(tf.exp(tf.mul(tf.square(x), -0.5)), 1 / Math.sqrt(2 * Math.PI));
    return tf.mul(dy, tf.add(cdf, tf.mul(x, pdf)));
  });
}

let registered = false;

/** Registers the gradients of the fused kernels (idempotent; done on import). */
export function registerFusedGradients(): void {
  if (registered) return;
  registered = true;
  tf.registerGradient({
    kernelName: XT_LAYER_NORM,
    inputsToSave: ['x', 'gamma'],
    gradFunc: (dy, saved, attrs) => {
      const [x, gamma] = saved as [tf.Tensor, tf.Tensor];
      const eps = attrs.epsilon as number;
      const offset = (attrs.gammaOffset as number | undefined) ?? 0;
      // computed here, outside the per-input scopes, so that both survive
      const [dx, dgamma] = backendHasKernel(XT_LAYER_NORM_GRAD)
        ? (tf.engine().runKernel(XT_LAYER_NORM_GRAD, { dy: dy as tf.Tensor, x, gamma }, attrs) as tf.Tensor[])
        : layerNormBackward(dy as tf.Tensor, x, gamma, eps, offset);
      return { x: () => dx!, gamma: () => dgamma! };
    },
  });
  tf.registerGradient({
    kernelName: XT_GELU,
    inputsToSave: ['x'],
    gradFunc: (dy, saved) => {
      const [x] = saved as [tf.Tensor];
      return {
        x: () =>
          backendHasKernel(XT_GELU_GRAD)
            ? run(XT_GELU_GRAD, { dy: dy as tf.Tensor, x })
            : geluBackward(dy as tf.Tensor, x),
      };
    },
  });
  tf.registerGradient({
    kernelName: XT_ROTARY,
    inputsToSave: ['cos', 'sin'],
    gradFunc: (dy, saved, attrs) => {
      const [cos, sin] = saved as [tf.Tensor, tf.Tensor];
      return { x: () => run(XT_ROTARY, { x: dy as tf.Tensor, cos, sin }, { transpose: !attrs.transpose }) };
    },
  });
}
registerFusedGradients();

/**
 * Bias-less LayerNorm as one kernel when the backend has it, else null. x: [..., d] float32;
 * gamma: [d]; the scale is gamma + gammaOffset.
 */
export function fusedLayerNorm(
  x: tf.Tensor,
  gamma: tf.Tensor,
  epsilon: number,
  gammaOffset: number,
): tf.Tensor | null {
  if (x.dtype !== 'float32' || x.rank < 1 || !backendHasKernel(XT_LAYER_NORM)) return null;
  return run(XT_LAYER_NORM, { x, gamma }, { epsilon, gammaOffset });
}

/** Exact GELU as one kernel when the backend has it, else null. x: any shape, float32. */
export function fusedGelu(x: tf.Tensor): tf.Tensor | null {
  if (x.dtype !== 'float32' || !backendHasKernel(XT_GELU)) return null;
  return run(XT_GELU, { x });
}

/**
 * x * cos + swap(x) * sin as one kernel when the backend has it, else null. x: [b, h, n, w];
 * cos, sin: broadcastable to x with the whole last axis.
 */
export function fusedRotary(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor | null {
  if (x.dtype !== 'float32' || x.rank !== 4 || !backendHasKernel(XT_ROTARY)) return null;
  return run(XT_ROTARY, { x, cos, sin }, { transpose: false });
}
