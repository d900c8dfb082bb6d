import * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import type { GenerateOptions } from '../../../src/generation/generate.js';
import { expected, input } from '../case.js';
import { compareTensors, type Comparison } from '../compare.js';
import { withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface Generator extends Module {
  generate(prompts: tf.Tensor, seqLen: number, options?: GenerateOptions): Promise<tf.Tensor>;
}
type ArCtor = new (net: Module) => Generator;

/**
 * generate: AutoregressiveWrapper(model).generate(input.prompt, 10, {temperature: 0}), with and
 * without the KV cache; output.tokens exactly, both ways.
 */
registerTask('generate', async (c) => {
  const { AutoregressiveWrapper } =
    (await import('../../../src/generation/autoregressive-wrapper.js')) as unknown as {
      AutoregressiveWrapper: ArCtor;
    };
  return withModel<Module, Comparison[]>(c, async (model) => {
    const ar = new AutoregressiveWrapper(model);
    const prompt = input(c, 'prompt');
    const want = expected(c, 'tokens');
    const out: Comparison[] = [];
    for (const cacheKv of [true, false]) {
      const tokens = await ar.generate(prompt, want.shape[want.rank - 1]!, { temperature: 0, cacheKv });
      try {
        out.push(
          compareTensors(`output.tokens (${cacheKv ? 'cached' : 'uncached'})`, tokens, want, { exact: true }),
        );
      } finally {
        tokens.dispose();
      }
    }
    return out;
  });
});
