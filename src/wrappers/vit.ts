import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { LayerNorm } from '../nn/norms.js';
import { dropout } from '../nn/functional.js';
import { getRng } from '../utils/random.js';
import { fmt, repeatBatch, runLayers, type LayersLike } from './common.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';
import { OptionError } from '../utils/errors.js';

/** Options of `ViTransformerWrapper` (the reference's keyword arguments in camelCase). */
export interface ViTransformerWrapperOptions {
  /** Side of the (square) image the positions are learned for; a multiple of `patchSize`. */
  imageSize: number;
  /** Side of each square patch. */
  patchSize: number;
  /** The attention stack, usually an `Encoder`. */
  attnLayers: LayersLike;
  /** Channels of the image (default 3). */
  channels?: number;
  /** Classes of the `mlp_head` (none: the wrapper returns embeddings). */
  numClasses?: number | null;
  /** LayerNorm after adding positions. */
  postEmbNorm?: boolean;
  /** Learned register tokens appended to the patches (and removed after the layers). */
  numRegisterTokens?: number;
  /** Dropout on the patch embeddings (train mode). */
  embDropout?: number;
}

/** Scalar options of `ViTransformerWrapper` with the reference's defaults (imageSize, patchSize have none). */
export const viTransformerWrapperDefaults = {
  imageSize: 0,
  patchSize: 0,
  channels: 3,
  numClasses: null as number | null,
  postEmbNorm: false,
  numRegisterTokens: 0,
  embDropout: 0,
};

export type ViTransformerWrapperConfig = typeof viTransformerWrapperDefaults;

/** Per-call options of `ViTransformerWrapper.forward`. */
export interface ViTForwardOptions {
  /** Return the embeddings [b, numPatches, dim] instead of the class logits. */
  returnEmbeddings?: boolean;
}

/**
 * Vision transformer: square patches (flattened as (p1 p2 c)) -> LayerNorm, Linear, LayerNorm
 * (`patch_to_embedding.0/1/2`) + learned positions (`pos_embedding` [1, numPatches, dim]) -> attention
 * layers -> mean over patches -> `mlp_head` (when `numClasses`).
 */
export class ViTransformerWrapper extends Module {
  readonly options: ViTransformerWrapperConfig;
  readonly dim: number;
  readonly numPatches: number;
  posEmbedding: tf.Variable;
  registerTokens: tf.Variable | null = null;
  patchToEmbedding: ModuleList;
  postEmbNorm: LayerNorm | null = null;
  attnLayers: LayersLike;
  mlpHead: Linear | null = null;

  constructor(options: ViTransformerWrapperOptions) {
    super();
    const { attnLayers: _given, ...given } = options;
    checkOptionValues(given, viTransformerWrapperDefaults, 'ViTransformerWrapper');
    requireOption(given, 'imageSize');
    requireOption(given, 'patchSize');
    const o = { ...viTransformerWrapperDefaults, ...stripUndefined(options) };
    const { imageSize, patchSize, channels } = o;
    if (imageSize % patchSize !== 0)
      throw new OptionError('imageSize', `a multiple of patchSize ${patchSize}`, String(imageSize));
    if (!(options.attnLayers instanceof Module))
      throw OptionError.of('attnLayers', 'an AttentionLayers module', options.attnLayers);
    this.options = {
      imageSize,
      patchSize,
      channels,
      numClasses: o.numClasses,
      postEmbNorm: o.postEmbNorm,
      numRegisterTokens: o.numRegisterTokens,
      embDropout: o.embDropout,
    };
    const dim = options.attnLayers.dim;
    this.dim = dim;
    this.numPatches = (imageSize / patchSize) ** 2;
    const patchDim = channels * patchSize ** 2;
    const rng = getRng();

    this.posEmbedding = this.registerParameter(
      'pos_embedding',
      tf.tensor3d(rng.fillNormal(this.numPatches * dim, 0, 1), [1, this.numPatches, dim]),
    );
    if (o.numRegisterTokens > 0) {
      this.registerTokens = this.registerParameter(
        'register_tokens',
        tf.tensor2d(rng.fillNormal(o.numRegisterTokens * dim, 0, 1), [o.numRegisterTokens, dim]),
      );
    }
    this.patchToEmbedding = this.registerModule(
      'patch_to_embedding',
      new ModuleList<Module>([new LayerNorm(patchDim), new Linear(patchDim, dim), new LayerNorm(dim)]),
    );
    if (o.postEmbNorm) this.postEmbNorm = this.registerModule('post_emb_norm', new LayerNorm(dim));
    this.attnLayers = this.registerModule('attn_layers', options.attnLayers);
    if (o.numClasses !== null) this.mlpHead = this.registerModule('mlp_head', new Linear(dim, o.numClasses));
  }

  /**
   * img: [b, channels, h, w] float32 (h, w multiples of patchSize, at most imageSize^2 / patchSize^2
   * patches) -> logits [b, numClasses] (without `numClasses` the head is the identity, as in the
   * reference: the mean embedding [b, dim]), or embeddings [b, numPatches, dim] with `returnEmbeddings`.
   */
  forward(img: tf.Tensor, opts: ViTForwardOptions = {}): tf.Tensor {
    const { logits, embeddings } = this.run(img, !opts.returnEmbeddings);
    if (logits) {
      embeddings.dispose();
      return logits;
    }
    return embeddings;
  }

  /**
   * img: [b, channels, h, w] -> logits [b, numClasses] (the mean embedding [b, dim] without
   * `numClasses`) and embeddings [b, numPatches, dim].
   */
  forwardWithEmbeddings(img: tf.Tensor): { logits: tf.Tensor; embeddings: tf.Tensor } {
    const { logits, embeddings } = this.run(img, true);
    return { logits: logits!, embeddings };
  }

  /** Splits img into flattened patches: [b, c, h, w] -> [b, (h/p)(w/p), p * p * c]. */
  patchify(img: tf.Tensor): tf.Tensor {
    this.checkImage(img);
    const p = this.options.patchSize;
    const [b, c, h, w] = img.shape as [number, number, number, number];
    return tf.tidy(() => {
      const x = tf.reshape(img, [b, c, h / p, p, w / p, p]);
      return tf.reshape(tf.transpose(x, [0, 2, 4, 3, 5, 1]), [b, (h / p) * (w / p), p * p * c]);
    });
  }

  private checkImage(img: tf.Tensor): void {
    const { channels, patchSize: p, imageSize } = this.options;
    if (!(img instanceof tf.Tensor)) throw new Error(`img: expected a tensor, got ${fmt(img)}`);
    if (img.rank !== 4) {
      throw new Error(
        `img: expected shape [batch, ${channels}, ${imageSize}, ${imageSize}], got [${img.shape.join(', ')}]`,
      );
    }
    const [, c, h, w] = img.shape as [number, number, number, number];
    if (c !== channels)
      throw new Error(
        `img: expected ${channels} channels (dimension 1), got shape [${img.shape.join(', ')}]`,
      );
    if (h % p !== 0 || w % p !== 0) {
      throw new Error(
        `img: expected height and width divisible by patchSize ${p}, got shape [${img.shape.join(', ')}]`,
      );
    }
    if ((h / p) * (w / p) > this.numPatches) {
      throw new Error(
        `img: expected at most ${this.numPatches} patches (imageSize ${imageSize}), got ${(h / p) * (w / p)} from shape [${img.shape.join(', ')}]`,
      );
    }
    if (img.dtype !== 'float32') throw new Error(`img: expected dtype float32, got ${img.dtype}`);
  }

  private run(img: tf.Tensor, withLogits: boolean): { logits: tf.Tensor | null; embeddings: tf.Tensor } {
    this.checkImage(img);
    const [embeddings, logits] = tf.tidy(() => {
      let x = this.patchify(img);
      for (const m of this.patchToEmbedding) x = (m as LayerNorm | Linear).forward(x);
      const [b, n] = x.shape as [number, number, number];
      x = tf.add(x, tf.slice(this.posEmbedding, [0, 0, 0], [1, n, this.dim]));
      if (this.postEmbNorm) x = this.postEmbNorm.forward(x);
      x = dropout(x, this.options.embDropout, this.training);
      if (this.registerTokens) x = tf.concat([x, repeatBatch(this.registerTokens, b)], 1);
      let { out: embed } = runLayers(this.attnLayers, x);
      if (this.registerTokens) embed = tf.slice(embed, [0, 0, 0], [b, n, this.dim]);
      if (!withLogits) return [embed];
      const pooled = tf.mean(embed, -2);
      return [embed, this.mlpHead ? this.mlpHead.forward(pooled) : pooled];
    });
    return { logits: logits ?? null, embeddings: embeddings! };
  }
}
