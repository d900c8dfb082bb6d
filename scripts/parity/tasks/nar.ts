import * as tf from '@tensorflow/tfjs-core';
import {
  NonAutoregressiveWrapper,
  type NARForwardOptions,
  type NARTrainNoise,
  type NonAutoregressiveWrapperOptions,
} from '../../../src/generation/nonautoregressive-wrapper.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { input, modelSpec, specToConfig, type CaseSpec, type ParityCase } from '../case.js';
import { compareTensors, type Comparison } from '../compare.js';
import { asShape, compareLossAndGrads } from '../helpers.js';
import { registerTask } from '../registry.js';

type NarSpec = CaseSpec & { nar: Record<string, unknown>; token_critic?: CaseSpec };

/**
 * The wrapper of a nar case: NonAutoregressiveWrapper(net of the spec, spec.nar in camelCase,
 * tokenCritic: the TransformerWrapper of spec.token_critic) with every param.* loaded strictly, eval mode.
 */
async function buildWrapper(c: ParityCase): Promise<NonAutoregressiveWrapper> {
  const { fromConfig, camelKey } = await import('../../../src/io/config.js');
  const spec = modelSpec(c) as NarSpec;
  const net = fromConfig(specToConfig(spec)) as TransformerWrapper;
  const critic = spec.token_critic
    ? (fromConfig(specToConfig(spec.token_critic)) as TransformerWrapper)
    : null;
  const opts = Object.fromEntries(Object.entries(spec.nar).map(([k, v]) => [camelKey(k), v]));
  const w = new NonAutoregressiveWrapper(net, {
    ...(opts as Partial<NonAutoregressiveWrapperOptions> & { maskId: number }),
    tokenCritic: critic,
  });
  try {
    w.loadStateDict(c.params, { strict: true });
  } catch (e) {
    w.dispose();
    throw e;
  }
  return w.eval();
}

/** The recorded draws of a nar case as the wrapper's noise. */
function noiseOf(c: ParityCase): NARTrainNoise {
  const i = c.inputs;
  return {
    times: input(c, 'noise.times'),
    perm: input(c, 'noise.perm'),
    noReplace: i['noise.no_replace'] ?? null,
    randomToken: i['noise.random_token_order']
      ? { order: i['noise.random_token_order'], tokens: input(c, 'noise.random_tokens') }
      : null,
    selfCondition: input(c, 'noise.self_condition').dataSync()[0] === 1,
    generatorTemperature: input(c, 'noise.generator_temperature').dataSync()[0]!,
    gumbel: i['noise.gumbel'] ?? null,
  };
}

/**
 * nar: forward(input.x, {onlyTrainGenerator, onlyTrainCritic, generatorSampleTemperature, noise: the
 * recorded draws}) against output.loss / generator_loss / critic_loss, and every gradient of the loss.
 */
registerTask('nar', async (c) => {
  const w = await buildWrapper(c);
  try {
    const flag = (k: string): boolean => input(c, k).dataSync()[0] === 1;
    const opts: NARForwardOptions = {
      onlyTrainGenerator: flag('only_train_generator'),
      onlyTrainCritic: flag('only_train_critic'),
      noise: noiseOf(c),
    };
    if (c.inputs.generator_sample_temperature)
      opts.generatorSampleTemperature = c.inputs.generator_sample_temperature.dataSync()[0]!;
    const named = w.namedParameters().filter(([, v]) => v.trainable);
    let parts: { generator: tf.Tensor | null; critic: tf.Tensor | null } = { generator: null, critic: null };
    const { value, grads } = tf.variableGrads(
      () => {
        const l = w.forward(input(c, 'x'), opts);
        parts = {
          generator: l.generatorLoss && tf.keep(l.generatorLoss.clone()),
          critic: l.criticLoss && tf.keep(l.criticLoss.clone()),
        };
        return l.loss;
      },
      named.map(([, v]) => v),
    );
    const out: Comparison[] = [];
    for (const [key, t] of [
      ['generator_loss', parts.generator],
      ['critic_loss', parts.critic],
    ] as const) {
      if (!t) continue;
      const shaped = asShape(t, [1]);
      out.push(compareTensors(`output.${key}`, shaped, c.outputs[key] ?? shaped));
      if (!c.outputs[key])
        out.push({
          name: `output.${key}`,
          ok: false,
          maxAbsErr: Infinity,
          message: `output.${key}: the reference returned None`,
        });
      tf.dispose([t, shaped]);
    }
    return [...out, ...compareLossAndGrads(c, value, grads, named)];
  } finally {
    w.dispose();
  }
});

/**
 * nar_generate: maskSchedule() against output.mask_num_tokens, and generate({batchSize,
 * startTemperature, filterThres, noiseLevelScale, noise: the recorded Gumbel noise}) against output.seq.
 */
registerTask('nar_generate', async (c) => {
  const w = await buildWrapper(c);
  try {
    const num = (k: string): number => input(c, k).dataSync()[0]!;
    const steps = w.options.steps;
    const at = (k: string): tf.Tensor[] => Array.from({ length: steps }, (_, s) => input(c, `${k}.${s}`));
    const seq = await w.generate({
      batchSize: num('batch_size'),
      startTemperature: num('start_temperature'),
      filterThres: num('filter_thres'),
      noiseLevelScale: num('noise_level_scale'),
      noise: {
        gumbel: at('noise.gumbel'),
        ...(w.tokenCritic ? { criticGumbel: at('noise.critic_gumbel') } : {}),
      },
    });
    const counts = tf.tensor1d(w.maskSchedule(), 'int32');
    const out = [
      compareTensors('output.seq', seq, c.outputs.seq!),
      compareTensors('output.mask_num_tokens', counts, c.outputs.mask_num_tokens!),
    ];
    tf.dispose([seq, counts]);
    return out;
  } finally {
    w.dispose();
  }
});
