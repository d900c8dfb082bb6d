/* global URL */
// Node ESM resolve hook for running TF.js's own op tests: every import of tfjs-core and
// tfjs-backend-cpu resolves to their ES module builds (one copy of each, as the spec files use),
// and the extensionless relative imports inside those builds are retried with `.js`.
const ESM = {
  '@tensorflow/tfjs-core': '@tensorflow/tfjs-core/dist/index.js',
  '@tensorflow/tfjs-backend-cpu': '@tensorflow/tfjs-backend-cpu/dist/index.js',
};

export async function resolve(specifier, context, next) {
  if (ESM[specifier]) return next(ESM[specifier], context);
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

// seedrandom is CommonJS with properties set after creation (alea, xor128, ...), which Node's
// named-export detection cannot see; serve an ES module that re-exports them.
export async function load(url, context, next) {
  if (/\/node_modules\/seedrandom\/index\.js$/.test(url)) {
    const file = new URL(url).pathname;
    const source = [
      `import { createRequire } from 'node:module';`,
      `const m = createRequire(${JSON.stringify(file)})(${JSON.stringify(file)});`,
      `export default m;`,
      `export const alea = m.alea, xor128 = m.xor128, xorwow = m.xorwow, xorshift7 = m.xorshift7,`,
      `  xor4096 = m.xor4096, tychei = m.tychei;`,
    ].join('\n');
    return { format: 'module', source, shortCircuit: true };
  }
  return next(url, context);
}
