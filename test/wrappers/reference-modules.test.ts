import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import { afterAll, beforeAll, describe } from 'vitest';
import { REFERENCE_MODULE_CASES } from '../../scripts/parity/paths.js';
import { registerTorchBackend } from '../../src/backend/torch/register.js';
import { paritySuite } from '../parity/suite.js';

// Reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32) of NeoMLP, MultiInputTransformerWrapper,
// DPO and NonAutoregressiveWrapper: forward outputs, losses and every gradient, on the torch backend
// and on the cpu backend. test/fixtures/reference-modules/generate.py writes them.

let previous = '';
beforeAll(() => {
  previous = tf.getBackend();
});
afterAll(async () => {
  if (previous) await tf.setBackend(previous);
});

for (const backend of ['torch', 'cpu'] as const) {
  describe(`on the ${backend} backend`, () => {
    beforeAll(async () => {
      if (backend === 'torch') {
        const r = registerTorchBackend();
        if (!r.ok) throw new Error(`torch backend: ${r.reason}`);
      }
      if (!(await tf.setBackend(backend))) throw new Error(`${backend} backend failed to initialise`);
    });
    paritySuite(`reference modules on ${backend}: parity with x-transformers 2.0.1`, REFERENCE_MODULE_CASES);
  });
}
