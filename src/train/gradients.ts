/**
 * Registers TF.js's gradient functions, which `@tensorflow/tfjs-core` leaves out of its Node
 * build. Their module (`dist/register_all_gradients.js`) is an ES module build with extensionless
 * relative imports that Node's own resolver rejects, so under plain Node / tsx a small resolve hook
 * retries those imports with `.js`. Bundlers and vitest import it directly.
 */
import * as tf from '@tensorflow/tfjs-core';
import { broadcastView } from '../nn/functional.js';

const HOOK = `
export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context);
  } catch (e) {
    const parent = context.parentURL ?? '';
    if (specifier.startsWith('.') && parent.includes('/@tensorflow/tfjs-core/dist/') && !specifier.endsWith('.js')) {
      return next(specifier + '.js', context);
    }
    throw e;
  }
}`;

let pending: Promise<void> | null = null;

/** True when the gradients are registered (checked through a common one). */
export function gradientsRegistered(): boolean {
  return tf.getGradient('Neg') !== undefined && tf.getGradient('BatchMatMul') !== undefined;
}

/** x's shape with the reduced axes of attrs.axis set to 1, and how many values each output sums. */
function reduced(x: tf.Tensor, axis: unknown): { keptShape: number[]; size: number } {
  const axes = tf.util.parseAxisParam(axis as number | number[], x.shape);
  const keptShape = x.shape.slice();
  let size = 1;
  for (const a of axes) {
    size *= x.shape[a]!;
    keptShape[a] = 1;
  }
  return { keptShape, size };
}

/**
 * TF.js's gradients of Sum and Mean multiply dy by `ones(x.shape)`, a JavaScript array of the input's
 * size built and uploaded on every backward pass (the whole logits tensor, for a loss). These give
 * the same values by broadcasting dy, which backends do without building anything in JavaScript
 * (the torch backend returns a view).
 */
const broadcastGradients: tf.GradConfig[] = [
  {
    kernelName: 'Sum',
    inputsToSave: ['x'],
    gradFunc: (dy, saved, attrs) => {
      const [x] = saved as [tf.Tensor];
      const { keptShape } = reduced(x, attrs.axis);
      return { x: () => broadcastView(tf.reshape(dy as tf.Tensor, keptShape), x.shape) };
    },
  },
  {
    kernelName: 'Mean',
    inputsToSave: ['x'],
    gradFunc: (dy, saved, attrs) => {
      const [x] = saved as [tf.Tensor];
      const { keptShape, size } = reduced(x, attrs.axis);
      return { x: () => broadcastView(tf.div(tf.reshape(dy as tf.Tensor, keptShape), size), x.shape) };
    },
  },
];

/** True when the broadcasting gradients above are the registered ones. */
function broadcastGradientsRegistered(): boolean {
  return broadcastGradients.every((g) => tf.getGradient(g.kernelName)?.gradFunc === g.gradFunc);
}

function registerBroadcastGradients(): void {
  for (const g of broadcastGradients) tf.registerGradient(g);
}

/** Registers every TF.js gradient once (idempotent; safe to call from many places). */
export function ensureGradients(): Promise<void> {
  if (gradientsRegistered()) {
    if (!broadcastGradientsRegistered()) registerBroadcastGradients();
    return Promise.resolve();
  }
  pending ??= (async () => {
    const spec = '@tensorflow/tfjs-core/dist/register_all_gradients.js';
    const mod = (await import('node:module')) as { register?: (url: string) => void };
    mod.register?.(`data:text/javascript,${encodeURIComponent(HOOK)}`);
    await import(spec);
    if (!gradientsRegistered()) throw new Error('ensureGradients: TF.js gradients could not be registered');
    registerBroadcastGradients();
  })();
  return pending;
}
