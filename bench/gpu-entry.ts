/**
 * Entry of a bundled run on a machine that has LibTorch but no Node modules, such as a GPU node
 * reached without network (bundle it with esbuild; the gradients are registered statically here,
 * since such a bundle has no node_modules to import them from at run time):
 *   node bundle.mjs check                 bench/gpu-check.ts
 *   node bundle.mjs bench --child torch --config gpt2 --precision bf16 ...   one bench child
 */
import '@tensorflow/tfjs-core/dist/register_all_gradients';

const mode = process.argv[2];
if (mode === 'check') {
  const { gpuCheck } = await import('./gpu-check.js');
  process.exitCode = (await gpuCheck()) ? 1 : 0;
} else if (mode === 'bench') {
  process.argv.splice(2, 1);
  await import('./bench.js');
} else {
  throw new Error(`mode: expected check or bench, got ${JSON.stringify(mode)}`);
}
