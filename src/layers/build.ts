import { Module } from '../nn/module.js';
import { FeedForward, type FeedForwardOptions } from '../nn/feedforward.js';
import type { Norm } from '../nn/norms.js';
import { GRUGating, HyperConnection, Residual, type ResidualFn } from '../nn/residual.js';
import {
  AdaptiveLayerScale,
  LayerScale,
  Scale,
  ShiftTokens,
  type BranchOut,
  type Callable,
} from '../nn/branch.js';
import { Attention } from '../attention/attention.js';
import {
  attentionDefaults,
  type AttentionForwardOptions,
  type AttentionOptions,
} from '../attention/types.js';
import { renamingOptions } from '../utils/errors.js';
import type { AttentionLayersOwnOptions } from './options.js';
import type { LayerType } from './plan.js';

/**
 * The branch of a layer: attention or feedforward, maybe wrapped (macaron scale, token shift,
 * layerscale), called as `forward(x, opts, condition)` whatever it is.
 */
export type LayerBlock = Module & Callable<AttentionForwardOptions, BranchOut>;

/** The three norm slots of a layer (pre-branch, post-branch, post-main), indexed 0..2 as the reference. */
export class NormSlots extends Module {
  constructor(
    readonly pre: Norm | null,
    readonly postBranch: Norm | null,
    readonly postMain: Norm | null,
  ) {
    super();
    if (pre) this.registerModule('0', pre);
    if (postBranch) this.registerModule('1', postBranch);
    if (postMain) this.registerModule('2', postMain);
  }
}

/** One layer: `0` norms, `1` the branch, `2` the residual; `attention` the branch's attention, if any. */
export class LayerEntry extends Module {
  constructor(
    readonly norms: NormSlots,
    readonly block: LayerBlock,
    readonly residual: ResidualFn,
    readonly attention: Attention | null,
  ) {
    super();
    this.registerModule('0', norms);
    this.registerModule('1', block);
    this.registerModule('2', residual);
  }
}

/** What every layer of a stack is built from. */
export interface LayerBuildContext {
  o: AttentionLayersOwnOptions;
  attn: Partial<AttentionOptions>;
  cross: Partial<AttentionOptions>;
  ff: Partial<FeedForwardOptions>;
  /** A new norm of the stack's kind. */
  normFn: () => Norm;
  /** Whether the layers normalise before their branch (pre-norm without ResiDual). */
  preNorm: boolean;
  /** The condition's feature size after the stack's adaptive condition MLP. */
  dimCondition: number;
}

/**
 * Layer `ind` of type `type`: its norms, its branch and its residual. shift: its token shift;
 * learnedValueResidualMix: whether a self-attention layer learns its value residual mix.
 */
export function buildLayer(
  ctx: LayerBuildContext,
  type: LayerType,
  ind: number,
  shift: number,
  learnedValueResidualMix: boolean,
): LayerEntry {
  const { o, normFn, preNorm } = ctx;
  // branch, residual, norms: the order in which the seeded generator draws their weights
  const { block, attention } = buildBlock(ctx, type, shift, learnedValueResidualMix);
  const residual = buildResidual(o, type, ind);
  const norms = new NormSlots(
    preNorm ? normFn() : null,
    o.sandwichNorm ? normFn() : null,
    preNorm ? null : normFn(),
  );
  return new LayerEntry(norms, block, residual, attention);
}

function buildBlock(
  ctx: LayerBuildContext,
  type: LayerType,
  shift: number,
  learnedValueResidualMix: boolean,
): { block: LayerBlock; attention: Attention | null } {
  const { o } = ctx;
  let attention: Attention | null = null;
  let block: LayerBlock;
  if (type === 'a') {
    block = attention = buildAttention(
      o.dim,
      {
        heads: o.heads,
        causal: o.causal,
        ...ctx.attn,
        qkvReceiveDiffResiduals: o.qkvReceiveDiffResiduals,
        learnedValueResidualMix,
      },
      {},
    );
  } else if (type === 'c') {
    block = attention = buildAttention(o.dim, { heads: o.heads, ...ctx.attn }, ctx.cross);
  } else {
    const f = new FeedForward(o.dim, ctx.ff);
    block = o.macaron ? new Scale(0.5, f) : f;
  }
  if (shift > 0) {
    const range: number[] = [];
    for (let i = o.causal ? 0 : -shift; i <= shift; i++) range.push(i);
    block = new ShiftTokens(range, block);
  }
  if (o.useLayerscale) block = new LayerScale(block, o.dim, o.layerscaleInitValue, o.normAddUnitOffset);
  else if (o.useAdaptiveLayerscale) block = new AdaptiveLayerScale(block, o.dim, ctx.dimCondition);
  return { block, attention };
}

function buildResidual(o: AttentionLayersOwnOptions, type: LayerType, ind: number): ResidualFn {
  if (o.numResidualStreams > 1)
    return new HyperConnection(
      o.dim,
      ind,
      o.numResidualStreams,
      o.residualFnKwargs.tanh ?? true,
      type === 'a' && o.qkvReceiveDiffResiduals ? 3 : 1,
    );
  const scale = { scaleResidual: o.scaleResidual, scaleResidualConstant: o.scaleResidualConstant };
  return o.gateResidual ? new GRUGating(o.dim, scale) : new Residual(o.dim, scale);
}

/**
 * Builds an Attention; an option error is re-thrown under the name the caller used (`flash` ->
 * `attnFlash`, or `crossAttn...` for a cross-attention override). Options the stack sets itself
 * (heads, causal, qkvReceiveDiffResiduals) keep their names.
 */
function buildAttention(
  dim: number,
  base: Partial<AttentionOptions>,
  cross: Partial<AttentionOptions>,
): Attention {
  const stackSet = ['heads', 'causal', 'qkvReceiveDiffResiduals'];
  return renamingOptions(
    (e) => {
      const key = e.path.split('.')[0]!;
      if (!(key in attentionDefaults) || stackSet.includes(key)) return e;
      return e.prefixed(key in cross ? 'crossAttn' : 'attn');
    },
    () => new Attention(dim, { ...base, ...cross }),
  );
}
