import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { Decoder, Encoder, dropoutSeq } from '../layers/attention-layers.js';
import type { AttentionLayersOptions, Prefixed } from '../layers/options.js';
import { TransformerWrapper, type TransformerWrapperOptions } from './transformer-wrapper.js';
import { AutoregressiveWrapper } from '../generation/autoregressive-wrapper.js';
import { decode, type GenerateOptions } from '../generation/generate.js';
import { getRng, type Rng } from '../utils/random.js';
import { checkMask, fmt, padMaskLeft } from './common.js';
import { OptionError, renamingOptions } from '../utils/errors.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';

/** Options of `XTransformer` that are not prefixed by `enc` / `dec`. */
export interface XTransformerOwnOptions {
  /** Model dimension of both stacks. */
  dim: number;
  /** The decoder uses the encoder's token embedding (same vocabulary). */
  tieTokenEmb: boolean;
  /** Target id excluded from the decoder loss. */
  ignoreIndex: number;
  /** Id that replaces ignoreIndex in the decoder inputs. */
  padValue: number;
  /** Fraction of encoder tokens dropped (in training) before the decoder cross-attends to them. */
  crossAttnTokensDropout: number;
}

export const xTransformerDefaults: XTransformerOwnOptions = {
  dim: 0,
  tieTokenEmb: false,
  ignoreIndex: -100,
  padValue: 0,
  crossAttnTokensDropout: 0,
};

/** Wrapper options each side takes (the rest of its prefixed options go to its attention stack). */
export const ENCODER_WRAPPER_KEYS = [
  'numTokens',
  'maxSeqLen',
  'embDropout',
  'numMemoryTokens',
  'scaledSinuPosEmb',
  'useAbsPosEmb',
] as const;
export const DECODER_WRAPPER_KEYS = [
  'numTokens',
  'maxSeqLen',
  'embDropout',
  'scaledSinuPosEmb',
  'useAbsPosEmb',
] as const;

type SideOptions = Partial<Omit<TransformerWrapperOptions, 'attnLayers'>> &
  Omit<AttentionLayersOptions, 'dim'>;

/**
 * Options of `XTransformer`: `dim`, the own options, and every encoder / decoder option prefixed by
 * `enc` / `dec` (`encNumTokens`, `encDepth`, `decHeads`, `decCrossResidualAttn`, ...), as the
 * reference's `enc_` / `dec_` keywords.
 */
export type XTransformerOptions = Partial<XTransformerOwnOptions> & { dim: number } & Prefixed<
    'enc',
    SideOptions
  > &
  Prefixed<'dec', SideOptions>;

/** Per-call options of `XTransformer.forward`. */
export interface XTransformerForwardOptions {
  /** mask: [b, nSrc] bool, true = keep (source padding; also the decoder's context mask) */
  mask?: tf.Tensor;
  /** attnMask: encoder self-attention mask */
  attnMask?: tf.Tensor;
  /** srcPrependEmbeds: [b, p, dim] embeddings placed before the source tokens */
  srcPrependEmbeds?: tf.Tensor;
  /** Generator for crossAttnTokensDropout (default: the library generator) */
  rng?: Rng;
}

function uncap(s: string): string {
  return s[0]!.toLowerCase() + s.slice(1);
}

/** Splits `enc*` / `dec*` keys off `options`: [enc (prefix removed), dec, rest]. */
export function splitEncDec(
  options: Record<string, unknown>,
): [Record<string, unknown>, Record<string, unknown>, Record<string, unknown>] {
  const enc: Record<string, unknown> = {};
  const dec: Record<string, unknown> = {};
  const rest: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(options)) {
    if (/^enc[A-Z]/.test(k)) enc[uncap(k.slice(3))] = v;
    else if (/^dec[A-Z]/.test(k)) dec[uncap(k.slice(3))] = v;
    else rest[k] = v;
  }
  return [enc, dec, rest];
}

/** Runs `fn`, re-throwing an option error of a side under its prefixed name (`depth` -> `encDepth`). */
function withPrefix<T>(prefix: 'enc' | 'dec', fn: () => T): T {
  return renamingOptions((e) => e.prefixed(prefix), fn);
}

/**
 * Encoder-decoder transformer: a TransformerWrapper over an `Encoder` (returning embeddings) and an
 * `AutoregressiveWrapper` around a TransformerWrapper over a cross-attending `Decoder`, as the
 * reference's XTransformer. `forward` returns the decoder's loss.
 */
export class XTransformer extends Module {
  readonly options: XTransformerOwnOptions;
  /** The prefixed options of each side as given (prefix removed), for `toConfig`. */
  readonly encOptions: Record<string, unknown>;
  readonly decOptions: Record<string, unknown>;
  encoder: TransformerWrapper;
  decoder: AutoregressiveWrapper;

  constructor(options: XTransformerOptions) {
    super();
    const [encGiven, decGiven, own] = splitEncDec(options as Record<string, unknown>);
    for (const k of Object.keys(own)) {
      if (!(k in xTransformerDefaults))
        throw new OptionError(
          k,
          'an option of XTransformer (encoder / decoder options take an enc / dec prefix)',
          'an unknown option',
        );
    }
    const o: XTransformerOwnOptions = {
      ...xTransformerDefaults,
      ...stripUndefined(own),
    } as XTransformerOwnOptions;
    checkOptionValues(own, xTransformerDefaults, 'XTransformer');
    requireOption(own, 'dim');
    const dim = o.dim;
    for (const [side, given] of [
      ['encDim', encGiven],
      ['decDim', decGiven],
    ] as const)
      if ('dim' in given)
        throw OptionError.of(side, 'none (dim sets the dimension of both stacks)', given.dim);
    if ('crossAttend' in decGiven)
      throw OptionError.of('decCrossAttend', 'none (the decoder always cross-attends)', decGiven.crossAttend);
    this.options = o;
    const enc = stripUndefined(encGiven);
    const dec = stripUndefined(decGiven);
    this.encOptions = { ...enc };
    this.decOptions = { ...dec };

    const [encWrap, encLayers] = pick(enc, ENCODER_WRAPPER_KEYS);
    const [decWrap, decLayers] = pick(dec, DECODER_WRAPPER_KEYS);
    const encStack = withPrefix(
      'enc',
      () => new Encoder({ ...(encLayers as Omit<AttentionLayersOptions, 'causal'>), dim }),
    );
    this.encoder = this.registerModule(
      'encoder',
      withPrefix(
        'enc',
        () =>
          new TransformerWrapper({
            ...(encWrap as Partial<TransformerWrapperOptions>),
            numTokens: encWrap.numTokens as number,
            maxSeqLen: encWrap.maxSeqLen as number,
            returnOnlyEmbed: true,
            attnLayers: encStack,
          }),
      ),
    );
    const decStack = withPrefix(
      'dec',
      () => new Decoder({ ...(decLayers as Omit<AttentionLayersOptions, 'causal'>), dim, crossAttend: true }),
    );
    const decNet = withPrefix(
      'dec',
      () =>
        new TransformerWrapper({
          ...(decWrap as Partial<TransformerWrapperOptions>),
          numTokens: decWrap.numTokens as number,
          maxSeqLen: decWrap.maxSeqLen as number,
          attnLayers: decStack,
        }),
    );
    if (o.tieTokenEmb) shareTokenEmbedding(decNet, this.encoder);
    this.decoder = this.registerModule(
      'decoder',
      new AutoregressiveWrapper(decNet, { ignoreIndex: o.ignoreIndex, padValue: o.padValue }),
    );
  }

  /**
   * src: [b, nSrc] int32, tgt: [b, nTgt + 1] int32 -> scalar decoder loss (teacher forcing on tgt,
   * cross-attending to the encoded source).
   */
  forward(src: tf.Tensor, tgt: tf.Tensor, opts: XTransformerForwardOptions = {}): tf.Scalar {
    const { context, contextMask } = this.encode(src, opts);
    try {
      return this.decoder.forward(tgt, { context, contextMask });
    } finally {
      context.dispose();
      contextMask?.dispose();
    }
  }

  /**
   * Encodes the source for the decoder: src: [b, nSrc] int32 -> context [b, p + nSrc, dim] and its
   * mask [b, p + nSrc] (when a mask was given), after crossAttnTokensDropout in training.
   */
  encode(
    src: tf.Tensor,
    opts: XTransformerForwardOptions = {},
  ): { context: tf.Tensor; contextMask?: tf.Tensor } {
    if (!(src instanceof tf.Tensor) || src.rank !== 2) {
      throw new Error(
        `src: expected token ids of shape [batch, seq], got ${src instanceof tf.Tensor ? `[${src.shape.join(', ')}]` : fmt(src)}`,
      );
    }
    const [b, n] = src.shape as [number, number];
    if (opts.mask) checkMask('mask', opts.mask, b, n);
    const pre = opts.srcPrependEmbeds;
    if (pre && (pre.rank !== 3 || pre.shape[0] !== b || pre.shape[2] !== this.encoder.dim)) {
      throw new Error(
        `srcPrependEmbeds: expected shape [${b}, *, ${this.encoder.dim}], got [${pre.shape.join(', ')}]`,
      );
    }
    return tf.tidy(() => {
      let context = this.encoder.forward(src, {
        mask: opts.mask,
        attnMask: opts.attnMask,
        prependEmbeds: pre,
        returnEmbeddings: true,
      });
      let contextMask = opts.mask && pre ? padMaskLeft(opts.mask, pre.shape[1]!) : opts.mask?.clone();
      if (this.training && this.options.crossAttnTokensDropout > 0) {
        [context, contextMask] = dropoutSeq(
          context,
          contextMask,
          this.options.crossAttnTokensDropout,
          opts.rng ?? getRng(),
        );
      }
      return contextMask ? { context, contextMask } : { context };
    });
  }

  /**
   * Encodes seqIn and decodes up to seqLen tokens after seqOutStart ([b, n] int32) cross-attending to
   * it; returns the new tokens [b, <= seqLen] int32.
   */
  generate(
    seqIn: tf.Tensor,
    seqOutStart: tf.Tensor,
    seqLen: number,
    opts: GenerateOptions & { mask?: tf.Tensor; attnMask?: tf.Tensor } = {},
  ): tf.Tensor {
    const { mask, attnMask, ...genOpts } = opts;
    const wasTraining = this.training;
    this.eval();
    const { context, contextMask } = this.encode(seqIn, { mask, attnMask });
    try {
      return decode(
        this.decoder.net,
        seqOutStart,
        seqLen,
        { ...genOpts, context, contextMask },
        this.decoder.padValue,
      );
    } finally {
      context.dispose();
      contextMask?.dispose();
      this.train(wasTraining);
    }
  }
}

function pick(
  o: Record<string, unknown>,
  keys: readonly string[],
): [Record<string, unknown>, Record<string, unknown>] {
  const a: Record<string, unknown> = {};
  const b: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) (keys.includes(k) ? a : b)[k] = v;
  return [a, b];
}

/**
 * Makes `target` use `source`'s token embedding module (the reference's
 * `decoder.token_emb = encoder.token_emb`): the parameter is then listed under both names in the
 * state dict and once in `namedParameters()`. target's own embedding is disposed.
 */
function shareTokenEmbedding(target: TransformerWrapper, source: TransformerWrapper): void {
  const src = source.tokenEmb;
  const dst = target.tokenEmb;
  const srcW = src.emb.weight;
  const dstW = dst.emb.weight;
  if (srcW.shape.join() !== dstW.shape.join()) {
    throw new Error(
      `tieTokenEmb: expected the same vocabulary on both sides, got encoder [${srcW.shape.join(', ')}] and decoder [${dstW.shape.join(', ')}]`,
    );
  }
  // Module keeps submodules in an ordered map; replacing the entry keeps its position, as
  // assigning a submodule attribute does in the reference.
  const modules = (target as unknown as { _modules: Map<string, Module> })._modules;
  if (!(modules instanceof Map) || modules.get('token_emb') !== dst) {
    throw new Error('tieTokenEmb: the decoder has no token_emb submodule to share');
  }
  modules.set('token_emb', src);
  target.tokenEmb = src;
  dst.dispose();
}
