import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { normalTensor } from '../nn/init.js';
import { Encoder } from '../layers/attention-layers.js';
import type { AttentionLayersOptions } from '../layers/options.js';
import { OptionError, checkTensor, renamingOptions } from '../utils/errors.js';
import { getRng } from '../utils/random.js';
import { fmt, runLayers } from './common.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';

/** Options of the encoder inside `NeoMLP`: an `Encoder`'s options without `dim` and `depth`. */
export type NeoMLPEncoderOptions = Omit<AttentionLayersOptions, 'dim' | 'depth' | 'causal'>;

/** Options of `NeoMLP` (camelCase of the reference's keyword names). */
export interface NeoMLPOptions {
  /** Number of input features (one token each). */
  dimIn: number;
  /** Number of hidden nodes (one learned token each). */
  dimHidden: number;
  /** Number of outputs (one learned token each). */
  dimOut: number;
  /** Width of every token. */
  dimModel: number;
  /** Depth of the encoder. */
  depth: number;
  /**
   * The encoder's other options; replaces the default as a whole, as the reference's keyword does
   * (so `{heads: 2}` alone gives the Encoder's own attnDimHead of 64).
   */
  encoderKwargs: NeoMLPEncoderOptions;
}

export const neoMLPDefaults: NeoMLPOptions = {
  dimIn: 0,
  dimHidden: 0,
  dimOut: 0,
  dimModel: 0,
  depth: 0,
  encoderKwargs: { attnDimHead: 16, heads: 4 },
};

/** What `NeoMLP.forwardWithEmbeds` returns; the caller owns every tensor. */
export interface NeoMLPOutput {
  /** output: [b, dimOut] (or [dimOut] for an unbatched input). */
  output: tf.Tensor;
  /** The encoder's output at the input, hidden and output tokens: [b, dimIn | dimHidden | dimOut, dimModel]. */
  inputEmbed: tf.Tensor;
  hiddenEmbed: tf.Tensor;
  outputEmbed: tf.Tensor;
}

/**
 * Random Fourier features of scalars: cos(2 pi (t w + b)) with a frozen `proj` (Linear 1 -> dim).
 * t: [...] -> [..., dim].
 */
class RandomFourierEmbed extends Module {
  proj: Linear;

  constructor(dim: number) {
    super();
    this.proj = this.registerModule('proj', new Linear(1, dim));
    for (const v of this.proj.parameters()) v.trainable = false;
  }

  forward(t: tf.Tensor): tf.Tensor {
    return tf.tidy(() => tf.cos(tf.mul(this.proj.forward(tf.expandDims(t, -1)), 2 * Math.PI)));
  }
}

/**
 * NeoMLP (the reference's `neo_mlp.NeoMLP`): an MLP whose input features, hidden units and outputs
 * are tokens of a fully connected graph, with message passing done by an `Encoder`. Each input
 * feature is embedded with random Fourier features plus its learned embedding; the outputs are read
 * from the output tokens by one weight vector each. Parameters: `input_embed` [dimIn, dimModel],
 * `hidden_embed` [dimHidden, dimModel], `output_embed` [dimOut, dimModel],
 * `random_fourier.0.proj.{weight,bias}` (frozen), `random_fourier.1.{weight,bias}`, `transformer.*`,
 * `to_output_weights` [dimOut, dimModel], `to_output_bias` [dimOut].
 */
export class NeoMLP extends Module {
  readonly options: NeoMLPOptions;
  inputEmbed: tf.Variable;
  hiddenEmbed: tf.Variable;
  outputEmbed: tf.Variable;
  randomFourier: ModuleList;
  transformer: Encoder;
  toOutputWeights: tf.Variable;
  toOutputBias: tf.Variable;

  constructor(options: Partial<NeoMLPOptions> & Omit<NeoMLPOptions, 'encoderKwargs'>) {
    super();
    if (typeof options !== 'object' || options === null)
      throw new Error(
        `options: expected an object {dimIn, dimHidden, dimOut, dimModel, depth}, got ${fmt(options)}`,
      );
    checkOptionValues(options, neoMLPDefaults, 'NeoMLP');
    for (const k of ['dimIn', 'dimHidden', 'dimOut', 'dimModel', 'depth']) requireOption(options, k);
    const o: NeoMLPOptions = { ...neoMLPDefaults, ...stripUndefined(options) };
    const kw = o.encoderKwargs;
    if (typeof kw !== 'object' || kw === null || Array.isArray(kw))
      throw OptionError.of('encoderKwargs', 'an object of Encoder options', kw);
    for (const k of ['dim', 'depth', 'causal'])
      if (k in kw)
        throw OptionError.of(
          `encoderKwargs.${k}`,
          'none (NeoMLP sets it: dimModel, depth; an Encoder is not causal)',
          (kw as Record<string, unknown>)[k],
        );
    this.options = { ...o, encoderKwargs: { ...kw } };
    const rng = getRng();
    const { dimIn, dimHidden, dimOut, dimModel } = o;
    this.inputEmbed = this.registerParameter('input_embed', normalTensor(rng, [dimIn, dimModel], 0, 0.02));
    this.hiddenEmbed = this.registerParameter(
      'hidden_embed',
      normalTensor(rng, [dimHidden, dimModel], 0, 0.02),
    );
    this.outputEmbed = this.registerParameter('output_embed', normalTensor(rng, [dimOut, dimModel], 0, 0.02));
    this.randomFourier = this.registerModule(
      'random_fourier',
      new ModuleList<Module>([new RandomFourierEmbed(dimModel), new Linear(dimModel, dimModel)]),
    );
    this.transformer = this.registerModule(
      'transformer',
      renamingOptions(
        (e) => e.in('encoderKwargs'),
        () => new Encoder({ ...kw, dim: dimModel, depth: o.depth }),
      ),
    );
    this.toOutputWeights = this.registerParameter(
      'to_output_weights',
      normalTensor(rng, [dimOut, dimModel], 0, 1),
    );
    this.toOutputBias = this.registerParameter('to_output_bias', tf.zeros([dimOut]));
  }

  /** x: [b, dimIn] (or [dimIn]) float32 -> [b, dimOut] (or [dimOut]). */
  forward(x: tf.Tensor): tf.Tensor {
    const r = this.forwardWithEmbeds(x);
    tf.dispose([r.inputEmbed, r.hiddenEmbed, r.outputEmbed]);
    return r.output;
  }

  /** As `forward`, with the encoder's output at every token (the reference's `return_embeds`). */
  forwardWithEmbeds(x: tf.Tensor): NeoMLPOutput {
    const { dimIn, dimHidden, dimOut } = this.options;
    checkTensor('x', x, { dtype: 'float32', desc: `features [batch, ${dimIn}] or [${dimIn}]` });
    if (x.rank !== 1 && x.rank !== 2)
      throw new Error(`x: expected shape [batch, ${dimIn}] or [${dimIn}], got [${x.shape.join(', ')}]`);
    if (x.shape[x.rank - 1] !== dimIn)
      throw new Error(
        `x: expected ${dimIn} features (dimIn) in the last dimension, got [${x.shape.join(', ')}]`,
      );
    const noBatch = x.rank === 1;
    return tf.tidy(() => {
      const xb = noBatch ? tf.expandDims(x, 0) : x;
      const b = xb.shape[0]!;
      const fourier = this.randomFourier.at(1) as Linear;
      const feats = fourier.forward((this.randomFourier.at(0) as RandomFourierEmbed).forward(xb));
      const tile = (t: tf.Tensor): tf.Tensor => tf.tile(tf.expandDims(t, 0), [b, 1, 1]);
      const tokens = tf.concat(
        [tf.add(feats, this.inputEmbed), tile(this.hiddenEmbed), tile(this.outputEmbed)],
        1,
      );
      const { out } = runLayers(this.transformer, tokens);
      const [inputEmbed, hiddenEmbed, outputEmbed] = tf.split(out, [dimIn, dimHidden, dimOut], 1) as [
        tf.Tensor,
        tf.Tensor,
        tf.Tensor,
      ];
      // one weight vector per output token: [b, dimOut, d] . [dimOut, d] -> [b, dimOut]
      let output = tf.add(tf.sum(tf.mul(outputEmbed!, this.toOutputWeights), -1), this.toOutputBias);
      if (noBatch) output = tf.reshape(output, [dimOut]);
      return { output, inputEmbed, hiddenEmbed, outputEmbed };
    }) as unknown as NeoMLPOutput;
  }
}
