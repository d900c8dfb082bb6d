/**
 * Generation throughput with the KV cache at short and long context:
 *   npx tsx scripts/bench-generate.ts [--contexts 64,1024] [--tokens 32] [--dim 256] [--depth 4]
 * Prints, per context length, the prefill time and the decoding speed after it (new tokens per
 * second), cached and (for the short context) uncached.
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/backend/index.js';
import { decodeStream } from '../src/generation/generate.js';
import { Decoder } from '../src/layers/attention-layers.js';
import { manualSeed } from '../src/utils/random.js';
import { TransformerWrapper } from '../src/wrappers/transformer-wrapper.js';
import { option } from './args.js';

async function main(): Promise<void> {
  const info = await initBackend(process.env.XT_BACKEND);
  const contexts = option('contexts', '64,1024').split(',').map(Number);
  const tokens = Number(option('tokens', '32'));
  const dim = Number(option('dim', '256'));
  const depth = Number(option('depth', '4'));
  manualSeed(0);
  const maxSeqLen = Math.max(...contexts) + tokens;
  const net = new TransformerWrapper({
    numTokens: 256,
    maxSeqLen,
    attnLayers: new Decoder({ dim, depth, heads: 8, attnDimHead: dim / 8, rotaryPosEmb: true }),
  });
  net.eval();
  console.log(
    `backend ${info.backend} (${info.device}), model dim ${dim} depth ${depth}, ${net.numParameters().toLocaleString()} parameters`,
  );
  for (const ctx of contexts) {
    const prompt = [Array.from({ length: ctx }, (_, i) => (i * 7) % 256)];
    for (const cacheKv of ctx === Math.min(...contexts) ? [true, false] : [true]) {
      // the first step runs the whole prompt (prefill); the following ones decode one token each
      let t0 = performance.now();
      let prefill = 0;
      for await (const step of decodeStream(net, prompt, tokens + 1, { temperature: 0, cacheKv })) {
        if (step.index === 0) {
          prefill = performance.now() - t0;
          t0 = performance.now();
        }
      }
      const perToken = (performance.now() - t0) / tokens;
      console.log(
        `context ${String(ctx).padStart(5)} ${cacheKv ? 'cached  ' : 'uncached'}: prefill ${prefill.toFixed(0)} ms, ` +
          `${(1000 / perToken).toFixed(1)} tokens/s (${perToken.toFixed(1)} ms/token)`,
      );
    }
  }
  console.log(`tensors alive: ${tf.memory().numTensors}`);
  net.dispose();
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
