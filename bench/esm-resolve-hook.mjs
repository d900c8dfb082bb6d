// Node ESM resolve hook: @tensorflow/tfjs-core's ESM files (dist/**) use extensionless relative
// imports, which Node's ESM resolver rejects. This retries such imports with `.js` so that
// `@tensorflow/tfjs-core/dist/register_all_gradients.js` loads under plain node/tsx.
export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context);
  } catch (e) {
    const parent = context.parentURL ?? '';
    if (specifier.startsWith('.') && parent.includes('/@tensorflow/') && !specifier.endsWith('.js')) {
      try {
        return await next(`${specifier}.js`, context);
      } catch {
        return next(`${specifier}/index.js`, context);
      }
    }
    throw e;
  }
}
