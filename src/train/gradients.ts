/**
 * Registers TF.js's gradient functions, which `@tensorflow/tfjs-core` leaves out of its Node
 * build. Their module (`dist/register_all_gradients.js`) is an ES module build with extensionless
 * relative imports that Node's own resolver rejects, so under plain Node / tsx a small resolve hook
 * retries those imports with `.js`. Bundlers and vitest import it directly.
 */
import * as tf from '@tensorflow/tfjs-core';

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

/** Registers every TF.js gradient once (idempotent; safe to call from many places). */
export function ensureGradients(): Promise<void> {
  if (gradientsRegistered()) return Promise.resolve();
  pending ??= (async () => {
    const spec = '@tensorflow/tfjs-core/dist/register_all_gradients.js';
    const mod = (await import('node:module')) as { register?: (url: string) => void };
    mod.register?.(`data:text/javascript,${encodeURIComponent(HOOK)}`);
    await import(spec);
    if (!gradientsRegistered()) throw new Error('ensureGradients: TF.js gradients could not be registered');
  })();
  return pending;
}
