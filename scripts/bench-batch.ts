/**
 * Continuous batching in the library alone: time per `BatchDecoder` step with b sequences decoding
 * together (the prefills not counted), the tokens per second that makes, and the first step's time
 * per sequence (each prompt's prefill and first token).
 *   npm run bench:batch -- [--dim 256] [--depth 4] [--batches 1,8,32] [--steps 100] [--prompt 8]
 *                          [--max-seq-len prompt + steps + 24]
 * The model is a byte-level decoder with rotary positions, heads 4, as `bench:service` streams from.
 * With a --max-seq-len below prompt + steps, the sequences decode past it: each step keeps the last
 * maxSeqLen - 1 positions of every cache (a sliding window).
 */
import { initBackend } from '../src/backend/index.js';
import { BatchDecoder } from '../src/generation/batch-decoder.js';
import { Decoder } from '../src/layers/attention-layers.js';
import { manualSeed } from '../src/utils/random.js';
import { TransformerWrapper } from '../src/wrappers/transformer-wrapper.js';
import { option, positiveInt, positiveInts } from './args.js';

const dim = positiveInt('dim', option('dim', '256'));
const depth = positiveInt('depth', option('depth', '4'));
const steps = positiveInt('steps', option('steps', '100'));
const promptLen = positiveInt('prompt', option('prompt', '8'));
const maxSeqLen = positiveInt('max-seq-len', option('max-seq-len', String(promptLen + steps + 24)));
const batches = positiveInts('batches', '1,8,32');

const info = await initBackend(process.env.XT_BACKEND);
manualSeed(0);
const net = new TransformerWrapper({
  numTokens: 256,
  maxSeqLen,
  attnLayers: new Decoder({ dim, depth, heads: 4, rotaryPosEmb: true }),
});
net.eval();
console.log(
  `backend ${info.backend} (${info.device}), decoder dim ${dim} depth ${depth}, ` +
    `${net.numParameters().toLocaleString()} parameters, prompts of ${promptLen} tokens, maxSeqLen ${maxSeqLen}, ` +
    `${steps} steps per batch size\n`,
);
console.log('| sequences | prefill ms per sequence | ms per step | tokens/s | against one sequence |');
console.log('| ---: | ---: | ---: | ---: | ---: |');
let one = 0;
for (const b of batches) {
  // the first run compiles and allocates; the second is timed
  let ms = 0;
  let prefill = 0;
  for (let run = 0; run < 2; run++) {
    const d = new BatchDecoder(net, { maxBatch: b });
    for (let i = 0; i < b; i++) {
      const prompt = Array.from({ length: promptLen }, (_, j) => (j * 31 + i * 7 + 1) % 256);
      d.add(prompt, { maxTokens: steps + 1, temperature: 1, seed: i });
    }
    const p0 = performance.now();
    d.step(); // the prefills and each sequence's first token
    prefill = (performance.now() - p0) / b;
    const t0 = performance.now();
    for (let s = 0; s < steps; s++) d.step();
    ms = (performance.now() - t0) / steps;
    d.dispose();
  }
  const tps = (b / ms) * 1000;
  if (b === 1) one = tps;
  const ratio = one && b > 1 ? `${(tps / one).toFixed(1)}x` : '';
  console.log(
    `| ${b} | ${prefill.toFixed(2)} | ${ms.toFixed(2)} | ${Math.round(tps).toLocaleString()} | ${ratio} |`,
  );
}
net.dispose();
