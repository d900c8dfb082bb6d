import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Indexed, type FeedForwardOptions } from '../nn/feedforward.js';
import { makeNorm, type Norm, type NormKind } from '../nn/norms.js';
import { tidyObj } from '../nn/functional.js';
import { Linear } from '../nn/linear.js';
import { Attention, type RowRotaryTables } from '../attention/attention.js';
import { RotaryEmbedding, prepareRotary } from '../attention/rotary.js';
import { RelativePositionBias } from '../attention/relative-position-bias.js';
import { DynamicPositionBias } from '../attention/dynamic-position-bias.js';
import { AlibiPositionalBias } from '../attention/alibi.js';
import {
  attentionDefaults,
  isBackendKv,
  type AttentionForwardOptions,
  type AttentionIntermediates,
  type AttentionKv,
  type AttentionOptions,
  type KvEntry,
  type PositionBias,
  type RotaryInput,
} from '../attention/types.js';
import { freeBackendIds, tensorFromBackendId } from '../backend/index.js';
import { feedForwardDefaults, feedForwardInnerDim } from '../nn/feedforward.js';
import { OptionError, checkTensor, renamingOptions } from '../utils/errors.js';
import { checkOptionValues, requireOption } from '../utils/option-rules.js';
import { getRng, type Rng } from '../utils/random.js';
import { LayersCache, SharedRotaryTables } from './cache.js';
import { buildLayer, type LayerBuildContext, type LayerEntry } from './build.js';
import { planLayers, type LayerType } from './plan.js';
import {
  attentionLayersDefaults,
  type AttentionLayersOptions,
  type AttentionLayersOwnOptions,
} from './options.js';

export { LayersCache };

/** Per-call options of `AttentionLayers.forward`. */
export interface LayersForwardOptions {
  /** mask: [b, n] bool, true = keep. */
  mask?: tf.Tensor;
  /** context: [b, m, dimContext] (cross-attention). */
  context?: tf.Tensor;
  /** contextMask: [b, m] bool. */
  contextMask?: tf.Tensor;
  /** attnMask: [i, j], [h, i, j] or [b, h, i, j] bool, true = may attend. */
  attnMask?: tf.Tensor;
  /** selfAttnKvMask: [b, j] bool key mask of the self-attention layers. */
  selfAttnKvMask?: tf.Tensor;
  /** mems: one [b, m, dim] per self-attention layer (XL recurrence). */
  mems?: tf.Tensor[];
  /** memMasks: one [b, m] bool per self-attention layer. */
  memMasks?: tf.Tensor[];
  /** seqStartPos: [b] int32, first real position of left-padded rows. */
  seqStartPos?: tf.Tensor;
  /** Keys/values of earlier steps: only the last `cacheAge` positions of x are computed. */
  cache?: LayersCache;
  cacheAge?: number;
  /**
   * Rows of different lengths decoded together: x is [b, 1, dim], one new position per row, and
   * row i continues `rowCaches[i]` (a cache of that row alone). Attention runs row by row on its
   * own cache, everything else on all rows at once; `rowCaches` of the output holds each row's
   * cache including this step. See `rowsUnsupported` for the stacks this needs.
   */
  rowCaches?: LayersCache[];
  /** Return a `LayersCache` with this call's keys/values (also implied by `cache`). */
  returnCache?: boolean;
  /** Fill `hiddens` / `layerHiddens` / `attnIntermediates`. */
  returnHiddens?: boolean;
  /** Custom positions: [n] (rotary and ALiBi). */
  pos?: tf.Tensor;
  /** Precomputed rotary embedding. */
  rotaryPosEmb?: RotaryInput;
  /** Overrides the execution order of the layers (depth extrapolation). */
  layersExecuteOrder?: number[];
  /** condition: [b, dimCondition] or [b, n, dimCondition] for adaptive norms / layerscale. */
  condition?: tf.Tensor;
  /** Generator for layer dropout (default: the library generator). */
  rng?: Rng;
}

/** What `AttentionLayers.forward` returns. The caller owns every tensor in it. */
export interface LayersOutput {
  /** out: [b, n, dim]. */
  out: tf.Tensor;
  /** The input of each self-attention layer, before its norm: [b, n, dim] each (XL memories). */
  hiddens: tf.Tensor[];
  /** The stream before every layer and after the last, with returnHiddens. */
  layerHiddens: tf.Tensor[];
  /** Attention intermediates of every attention layer, with returnHiddens. */
  attnIntermediates: (AttentionIntermediates & { layerType: 'a' | 'c' })[];
  /** Keys/values including this call's, with returnCache or cache. */
  cache?: LayersCache;
  /** Each row's cache including this call's, with rowCaches. */
  rowCaches?: LayersCache[];
}

const PREFIXES = [
  ['crossAttn', 'cross'],
  ['attn', 'attn'],
  ['ff', 'ff'],
] as const;

/**
 * A stack's options by where they go: its own, attention (`attn*`), cross-attention (`crossAttn*`),
 * feedforward (`ff*`), each checked against the rule table under the name the caller used.
 */
function routeOptions(
  options: AttentionLayersOptions,
  owner: string,
): {
  own: Partial<AttentionLayersOwnOptions>;
  attn: Partial<AttentionOptions>;
  cross: Partial<AttentionOptions>;
  ff: Partial<FeedForwardOptions>;
} {
  const routed = { own: {}, attn: {}, cross: {}, ff: {} } as Record<
    'own' | 'attn' | 'cross' | 'ff',
    Record<string, unknown>
  >;
  for (const [k, v] of Object.entries(options)) {
    if (v === undefined) continue;
    const prefix = k in attentionLayersDefaults ? undefined : PREFIXES.find(([p]) => isPrefixed(k, p));
    if (!prefix) routed.own[k] = v;
    else routed[prefix[1]][k[prefix[0].length]!.toLowerCase() + k.slice(prefix[0].length + 1)] = v;
  }
  checkOptionValues(routed.own, attentionLayersDefaults, owner);
  renamingOptions(
    (e) => e.prefixed('attn'),
    () => checkOptionValues(routed.attn, attentionDefaults, 'Attention'),
  );
  renamingOptions(
    (e) => e.prefixed('crossAttn'),
    () => checkOptionValues(routed.cross, attentionDefaults, 'Attention'),
  );
  renamingOptions(
    (e) => e.prefixed('ff'),
    () => checkOptionValues(routed.ff, feedForwardDefaults, 'FeedForward'),
  );
  for (const [k, v] of [
    ['attn', routed.attn.qkvReceiveDiffResiduals],
    ['crossAttn', routed.cross.qkvReceiveDiffResiduals],
  ] as const)
    if (v !== undefined)
      throw OptionError.of(
        `${k}QkvReceiveDiffResiduals`,
        'none (a stack option: set qkvReceiveDiffResiduals)',
        v,
      );
  return {
    own: routed.own as Partial<AttentionLayersOwnOptions>,
    attn: routed.attn as Partial<AttentionOptions>,
    cross: routed.cross as Partial<AttentionOptions>,
    ff: routed.ff as Partial<FeedForwardOptions>,
  };
}

function isPrefixed(k: string, prefix: string): boolean {
  return k.startsWith(prefix) && k.length > prefix.length && /[A-Z]/.test(k[prefix.length]!);
}

/** The stack's norm (one kind for every slot) and whether it, or the layerscale, needs a condition. */
function normSetup(o: AttentionLayersOwnOptions): {
  normFn: () => Norm;
  needCondition: boolean;
  dimCondition: number;
  condMult: number;
} {
  const normKind: NormKind = o.useAdaptiveLayernorm
    ? 'adaptive_layernorm'
    : o.useAdaptiveRmsnorm
      ? 'adaptive_rmsnorm'
      : o.useScalenorm
        ? 'scalenorm'
        : o.useRmsnorm
          ? 'rmsnorm'
          : o.useSimpleRmsnorm
            ? 'simple_rmsnorm'
            : 'layernorm';
  const normNeedsCondition = o.useAdaptiveLayernorm || o.useAdaptiveRmsnorm;
  const dimCondition = o.dimCondition ?? o.dim;
  const condMult = o.adaptiveConditionMlp ? o.adaptiveConditionMlpExpansion : 1;
  const normFn = (): Norm =>
    makeNorm(normKind, o.dim, {
      unitOffset: !normNeedsCondition && o.normAddUnitOffset,
      dimCondition: dimCondition * condMult,
    });
  return { normFn, needCondition: normNeedsCondition || o.useAdaptiveLayerscale, dimCondition, condMult };
}

/** The state of one forward pass, carried from layer to layer. */
interface RunState {
  order: number[];
  /** the stream: [b, n, dim], or [(b * streams), n, dim] with hyper-connections */
  x: tf.Tensor;
  cond?: tf.Tensor;
  rotary?: RotaryInput;
  selfKvMask?: tf.Tensor;
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  mems: tf.Tensor[];
  memMasks: tf.Tensor[];
  cacheIter: AttentionKv[];
  wantCache: boolean;
  /** batch of the stream before hyper-connections widen it */
  bStream: number;
  /** ResiDual's second stream */
  outer: tf.Tensor | null;
  /** the input reinjected before every layer */
  inject: tf.Tensor | null;
  skipHiddens: tf.Tensor[];
  hiddens: tf.Tensor[];
  layerHiddens: tf.Tensor[];
  attnInters: (AttentionIntermediates & { layerType: 'a' | 'c' })[];
  newKvs: AttentionKv[];
  newKinds: boolean[];
  prevAttn?: tf.Tensor;
  prevCrossAttn?: tf.Tensor;
  /** value residual: the values of the first self- and cross-attention layer run */
  firstSelfValues?: tf.Tensor;
  firstCrossValues?: tf.Tensor;
  /** rows decoded together (rowCaches) */
  rows?: RowsState;
}

/** Rows of different lengths decoded together: each row's cache, new keys/values and rotary input. */
interface RowsState {
  caches: LayersCache[];
  /** the entry of each row's cache that the next attention layer continues */
  layer: number;
  /** each row's new entries, one per cached layer run so far */
  kvs: KvEntry[][];
  /** whether some are tensors (a layer that ran its rows one by one) */
  tensorEntries: boolean;
  rotary: RowRotary[];
  /** each row's full rotary tables for the one-call path (null without rotary) */
  fullTables: (RowRotaryTables | null)[] | null;
}

/** A row's rotary for its next position: the shared tables it holds, and its input for a layer run alone. */
interface RowRotary {
  tables: SharedRotaryTables | null;
  /** the RotaryInput of the row's positions (made on first use) */
  input(): RotaryInput | undefined;
}

/**
 * The stack of attention / feedforward layers of the reference's AttentionLayers: every option of
 * x-transformers 2.0.1's README (norm placement, residual variants, positional schemes, memories,
 * custom layer orders...). Parameter names follow the reference's state_dict
 * (`layers.{i}.{0 norms|1 branch|2 residual}`, `final_norm`, `rotary_pos_emb`, `rel_pos`).
 * Built in three steps: `planLayers` decides the layers from the options, `buildLayer` makes each
 * one, and the forward runs them in the planned order.
 */
export class AttentionLayers extends Module {
  readonly options: AttentionLayersOwnOptions;
  readonly attnOptions: Partial<AttentionOptions>;
  readonly crossAttnOptions: Partial<AttentionOptions>;
  readonly ffOptions: Partial<FeedForwardOptions>;
  readonly dim: number;
  readonly causal: boolean;
  readonly crossAttend: boolean;
  readonly layerTypes: LayerType[];
  readonly layersExecuteOrder: number[];
  readonly numAttnLayers: number;
  readonly disableAbsPosEmb: boolean;
  readonly layerDropouts: number[];
  readonly dimHead: number;
  /**
   * Whether KV-cached decoding gives the same numbers as recomputation: every attention layer can
   * cache, and no layer shifts tokens (a shifted layer would need earlier hidden states, which the
   * cache does not hold; the reference caches anyway and drifts, this stack recomputes instead).
   */
  readonly canCacheKv: boolean;
  /** Number of blocks, as the reference counts them (1 after weight tying). */
  readonly depth: number;
  /** Per layer index: the index of the earlier layer whose input a U-Net skip concatenates, or null. */
  readonly skipFrom: (number | null)[];
  skipCombines: Indexed;
  private readonly combines: (ConcatCombine | null)[];
  reinjectInputProj: Linear | null = null;
  /** Whether forward needs a `condition` (adaptive norms / layerscale). */
  readonly needCondition: boolean;
  readonly dimCondition: number;
  adaptiveMlp: Linear | null = null;
  /** Hyper-connections' learned stream embedding `stream_emb` [streams, dim] (streams > 1). */
  streamEmb: tf.Variable | null = null;
  learnedReinjectInputGate: Linear | null = null;
  layers: ModuleList<LayerEntry>;
  finalNorm: Norm | null = null;
  rotaryPosEmb: RotaryEmbedding | null = null;
  relPos: (Module & PositionBias) | null = null;

  constructor(options: AttentionLayersOptions) {
    super();
    const { own, attn, cross, ff } = routeOptions(options, new.target.name);
    requireOption(own, 'dim');
    const o: AttentionLayersOwnOptions = { ...attentionLayersDefaults, ...own };
    validate(o);
    renamingOptions(
      (e) => e.prefixed('ff'),
      () => feedForwardInnerDim(o.dim, ff.mult ?? feedForwardDefaults.mult),
    );
    this.options = o;
    this.dim = o.dim;
    this.causal = o.causal;
    this.crossAttend = o.crossAttend;
    this.attnOptions = o.zeroInitBranchOutput ? { ...attn, zeroInitOutput: true } : attn;
    this.crossAttnOptions = cross;
    this.ffOptions = o.zeroInitBranchOutput ? { ...ff, zeroInitOutput: true } : ff;
    this.dimHead = this.attnOptions.dimHead ?? attentionDefaults.dimHead;
    const flash = this.attnOptions.flash ?? false;
    this.disableAbsPosEmb = o.disableAbsPosEmb ?? (o.relPosBias || o.rotaryPosEmb || o.rotaryXpos);
    this.buildPositions(o, flash);
    if (flash && (o.residualAttn || o.crossResidualAttn))
      throw new OptionError('attnFlash', 'false with residualAttn / crossResidualAttn', 'true');

    const { normFn, needCondition, dimCondition, condMult } = normSetup(o);
    this.dimCondition = dimCondition;
    this.needCondition = needCondition;
    if (needCondition && o.adaptiveConditionMlp) {
      const mlp = this.registerModule('adaptive_mlp', new Indexed());
      this.adaptiveMlp = mlp.add(0, new Linear(dimCondition, dimCondition * condMult, { bias: false }));
    }

    const plan = planLayers(o);
    this.layerTypes = plan.layerTypes;
    this.layersExecuteOrder = plan.executeOrder;
    this.numAttnLayers = plan.numAttnLayers;
    this.depth = plan.depth;
    this.skipFrom = plan.skipFrom;
    this.layerDropouts = plan.layerDropouts;
    const skipCombines = this.registerModule('skip_combines', new Indexed());
    this.skipCombines = skipCombines;
    this.combines = this.skipFrom.map((from, ind) =>
      from === null ? null : skipCombines.add(ind, new ConcatCombine(o.dim, from)),
    );
    if (o.reinjectInput) {
      this.reinjectInputProj = this.registerModule(
        'reinject_input_proj',
        new Linear(o.dim, o.dim, { bias: false }),
      );
      if (o.learnedReinjectInputGate)
        this.learnedReinjectInputGate = this.registerModule(
          'learned_reinject_input_gate',
          new Linear(o.dim, 1, { bias: false }),
        );
    } else if (o.learnedReinjectInputGate)
      throw new OptionError('learnedReinjectInputGate', 'reinjectInput true with it', 'reinjectInput false');

    // as in the reference 2.0.1, preNormHasFinalNorm is accepted but a pre-norm stack always has a final norm
    const preNorm = o.preNorm && !o.resiDual;
    if (preNorm || o.resiDual) this.finalNorm = this.registerModule('final_norm', normFn());
    if (o.numResidualStreams > 1)
      this.streamEmb = this.registerParameter('stream_emb', tf.zeros([o.numResidualStreams, o.dim]));

    this.layers = this.registerModule('layers', new ModuleList<LayerEntry>());
    const ctx: LayerBuildContext = {
      o,
      attn: this.attnOptions,
      cross,
      ff: this.ffOptions,
      normFn,
      preNorm,
      dimCondition: dimCondition * condMult,
    };
    // as the reference: only self-attention layers after the first learn their value residual mix
    const learnedMix = o.learnedValueResidualMix && o.addValueResidual;
    const firstSelf = plan.layerTypes.indexOf('a');
    plan.layerTypes.forEach((type, ind) =>
      this.layers.push(buildLayer(ctx, type, ind, plan.shifts[ind]!, learnedMix && ind !== firstSelf)),
    );
    this.canCacheKv =
      plan.shifts.every((s) => s === 0) &&
      this.layers.items.every((l) => !(l.attention && !l.attention.canCacheKv));
  }

  /** The rotary embedding and the relative position scheme (`rotary_pos_emb`, `rel_pos`). */
  private buildPositions(o: AttentionLayersOwnOptions, flash: boolean): void {
    const dimHead = this.dimHead;
    if (o.rotaryPosEmb || o.rotaryXpos) {
      const rotDim = o.rotaryEmbDim ?? Math.floor(dimHead / 2);
      if (rotDim > dimHead)
        throw new OptionError('rotaryEmbDim', `at most the head dimension ${dimHead}`, String(rotDim));
      if (o.rotaryXpos && !o.causal)
        throw new OptionError(
          'rotaryXpos',
          'a causal (Decoder) stack with it: xpos is not compatible with bidirectional attention',
          'a bidirectional stack',
        );
      this.rotaryPosEmb = this.registerModule(
        'rotary_pos_emb',
        new RotaryEmbedding(rotDim, {
          useXpos: o.rotaryXpos,
          scaleBase: o.rotaryXposScaleBase,
          interpolationFactor: o.rotaryInterpolationFactor,
          baseRescaleFactor: o.rotaryBaseRescaleFactor,
        }),
      );
    }
    if ([o.alibiPosBias, o.relPosBias, o.dynamicPosBias].filter(Boolean).length > 1)
      throw new OptionError('relPosBias', 'at most one of relPosBias, dynamicPosBias, alibiPosBias', 'more');
    if (o.relPosNumBuckets > o.relPosMaxDistance)
      throw new OptionError(
        'relPosNumBuckets',
        `at most relPosMaxDistance ${o.relPosMaxDistance}`,
        String(o.relPosNumBuckets),
      );
    if ((o.relPosBias || o.dynamicPosBias) && flash)
      throw new OptionError(
        'attnFlash',
        `false with ${o.relPosBias ? 'relPosBias (T5 relative positional bias)' : 'dynamicPosBias'}`,
        'true',
      );
    let relPos: (Module & PositionBias) | null = null;
    if (o.relPosBias) {
      relPos = new RelativePositionBias(dimHead ** 0.5, {
        causal: o.causal,
        heads: o.heads,
        numBuckets: o.relPosNumBuckets,
        maxDistance: o.relPosMaxDistance,
      });
    } else if (o.dynamicPosBias) {
      relPos = new DynamicPositionBias(Math.floor(o.dim / 4), {
        heads: o.heads,
        logDistance: o.dynamicPosBiasLogDistance,
        depth: o.dynamicPosBiasMlpDepth,
        norm: o.dynamicPosBiasNorm,
      });
    } else if (o.alibiPosBias) {
      // as the reference, custom slopes set the number of ALiBi heads
      const slopes = o.relPosKwargs.slopes ?? null;
      const alibiHeads = slopes ? slopes.length : (o.alibiNumHeads ?? o.heads);
      if (alibiHeads > o.heads)
        throw new OptionError(
          slopes ? 'relPosKwargs.slopes' : 'alibiNumHeads',
          `at most heads ${slopes ? 'values ' : ''}${o.heads}`,
          String(alibiHeads),
        );
      relPos = new AlibiPositionalBias(alibiHeads, { totalHeads: o.heads, slopes });
    }
    if (relPos) this.relPos = this.registerModule('rel_pos', relPos);
  }

  /** Which attention layers (self or cross) a cache lists, in execution order: true = self-attention. */
  cachedLayerKinds(order = this.layersExecuteOrder): boolean[] {
    return order.filter((i) => this.layerTypes[i] !== 'f').map((i) => this.layerTypes[i] === 'a');
  }

  /**
   * Why this stack cannot decode rows of different lengths together (`rowCaches`), or null when it
   * can: that needs a causal stack that caches keys/values, without cross-attention, conditioning,
   * several residual streams, or attention that passes values or scores from layer to layer.
   */
  get rowsUnsupported(): string | null {
    const o = this.options;
    if (!this.causal) return 'not a causal stack (Decoder)';
    if (!this.canCacheKv) return 'a layer cannot decode with a key/value cache';
    if (this.crossAttend) return 'cross-attention (the context is per request)';
    if (this.needCondition) return 'adaptive norms or layerscale (a condition per row)';
    if (o.numResidualStreams > 1) return 'several residual streams (hyper-connections)';
    if (o.residualAttn) return 'residualAttn (attention scores passed between layers)';
    if (o.addValueResidual) return 'addValueResidual (values passed between layers)';
    return null;
  }

  private checkRows(x: tf.Tensor, opts: LayersForwardOptions): void {
    const rows = opts.rowCaches!;
    const why = this.rowsUnsupported;
    if (why) throw new Error(`rowCaches: this stack cannot decode rows together: ${why}`);
    if (x.shape[0] !== rows.length || x.shape[1] !== 1)
      throw new Error(
        `x: expected [${rows.length}, 1, ${this.dim}] (one new position per row of rowCaches), got [${x.shape.join(', ')}]`,
      );
    rows.forEach((c, i) => {
      if (c.isDisposed) throw new Error(`rowCaches[${i}]: expected a live cache, got a disposed one`);
      if (c.batch !== 1)
        throw new Error(`rowCaches[${i}]: expected the cache of one row, got batch ${c.batch}`);
    });
    const given: string[] = (
      ['cache', 'mask', 'attnMask', 'selfAttnKvMask', 'seqStartPos', 'pos', 'rotaryPosEmb'] as const
    ).filter((k) => opts[k] !== undefined);
    const extra = opts.mems?.length ? [...given, 'mems'] : given;
    if (extra.length) throw new Error(`rowCaches: expected no ${extra.join(', ')} with it`);
  }

  /** The rotary of one row's next position (and the tables it holds), as its own decoding step has. */
  private rowRotary(c: LayersCache): RowRotary {
    const rope = this.rotaryPosEmb;
    if (!rope) return { tables: null, input: () => undefined };
    const n = c.seqLen + 1;
    if (wantRotaryTables(rope, { cache: c })) {
      const tables = sharedRotaryTables(rope, n, this.dimHead, c.rotary);
      let sliced: RotaryInput | undefined;
      return { tables, input: () => (sliced ??= tables.slice(n, 1)) };
    }
    const rotary = prepareRotary(rope.forward(tf.range(0, n, 1, 'int32')), 1, this.dimHead);
    return { tables: null, input: () => rotary };
  }

  /**
   * x: [b, n, dim] -> out [b, n, dim] (with a cache: [b, cacheAge, dim]).
   * See `LayersForwardOptions` for the optional inputs.
   */
  forward(x: tf.Tensor, opts: LayersForwardOptions = {}): LayersOutput {
    this.checkInputs(x, opts);
    if (opts.rowCaches) return this.forwardRows(x, opts);
    const n = x.shape[1]!;
    let rotaryTables: SharedRotaryTables | null = null;
    let result;
    try {
      result = tidyObj(() => {
        const s = this.startRun(x, opts, (t) => (rotaryTables = t));
        this.runLayers(s, opts);
        return this.finishRun(s, x, opts);
      });
    } catch (e) {
      (rotaryTables as SharedRotaryTables | null)?.release();
      throw e;
    }

    // (assigned inside the scope above)
    const tables = rotaryTables as SharedRotaryTables | null;
    let cache: LayersCache | undefined;
    if (opts.returnCache || opts.cache) {
      const selfIdx = result.kinds.indexOf(true);
      const seqLen = selfIdx >= 0 ? result.kvs[selfIdx]!.k.shape[2]! : n;
      cache = new LayersCache(result.kvs, seqLen, result.kinds, tables);
    }
    // this call's reference: a new cache holds the tables now (or nothing does, and they are freed)
    tables?.release();
    if (!cache) {
      for (const kv of result.kvs) {
        kv.k.dispose();
        kv.v.dispose();
      }
    }
    return {
      out: result.out,
      hiddens: result.hiddens,
      layerHiddens: result.layerHiddens,
      attnIntermediates: result.attnIntermediates,
      cache,
    };
  }

  /** `forward` with rowCaches: each row attends over its own cache; returns each row's new cache. */
  private forwardRows(x: tf.Tensor, opts: LayersForwardOptions): LayersOutput {
    const caches = opts.rowCaches!;
    const rows: RowsState = {
      caches,
      layer: 0,
      kvs: caches.map(() => []),
      tensorEntries: false,
      rotary: [],
      fullTables: null,
    };
    const release = () => {
      for (const r of rows.rotary) r.tables?.release();
    };
    let result;
    try {
      result = tidyObj(() => {
        for (const c of caches) rows.rotary.push(this.rowRotary(c));
        if (this.rotaryPosEmb) rows.fullTables = rows.rotary.map((r) => r.tables?.fullTables() ?? null);
        const s = this.startRun(x, opts, () => undefined);
        s.rows = rows;
        this.runLayers(s, opts);
        // new entries that are tensors (a layer ran its rows one by one) leave the scope in rowKvs
        const done = this.finishRun(s, x, opts);
        return rows.tensorEntries ? { ...done, rowKvs: rows.kvs } : done;
      });
    } catch (e) {
      release();
      // the new entries held as backend ids (tensors went with the scope)
      freeBackendIds(rows.kvs.flatMap((kvs) => kvs.flatMap((e) => (isBackendKv(e) ? [e.k, e.v] : []))));
      throw e;
    }
    const kinds = this.cachedLayerKinds(opts.layersExecuteOrder ?? this.layersExecuteOrder);
    const rowCaches = caches.map((c, r) => {
      const kvs = rows.kvs[r]!;
      const tables = rows.rotary[r]!.tables;
      if (kvs.every(isBackendKv)) return LayersCache.fromBackend(kvs, c.seqLen + 1, kinds, tables);
      // a layer ran its rows one by one: every entry as tensors
      const tensors = kvs.map((e) =>
        isBackendKv(e)
          ? {
              k: tensorFromBackendId(e.k, e.kShape, 'float32'),
              v: tensorFromBackendId(e.v, e.vShape, 'float32'),
            }
          : e,
      );
      return new LayersCache(tensors, c.seqLen + 1, kinds, tables);
    });
    // each new cache holds its row's tables now
    release();
    return { out: result.out, hiddens: [], layerHiddens: [], attnIntermediates: [], rowCaches };
  }

  /** Runs the layers in order on the stream `s.x` (U-Net skips, layer dropout in training). */
  private runLayers(s: RunState, opts: LayersForwardOptions): void {
    const rng = opts.rng ?? getRng();
    for (const li of s.order) {
      s.skipHiddens.push(s.x);
      const combine = this.combines[li];
      if (combine) s.x = combine.forward(s.x, s.skipHiddens[combine.prevLayerInd]!);
      const p = this.layerDropouts[li]!;
      if (this.training && p > 0 && rng.random() < p) continue;
      this.runLayer(li, s, opts, rng);
    }
  }

  private checkInputs(x: tf.Tensor, opts: LayersForwardOptions): void {
    checkTensor('x', x, { rank: 3, dtype: 'float32' });
    if (x.shape[2] !== this.dim) throw new Error(`x: expected last dimension ${this.dim}, got ${x.shape[2]}`);
    const [b, n] = x.shape as [number, number, number];
    if (this.crossAttend && !opts.context)
      throw new Error('context: expected a tensor, this stack cross-attends');
    if (!this.crossAttend && opts.context)
      throw new Error('context: expected none, this stack has no cross-attention (crossAttend false)');
    if (opts.mask) checkTensor('mask', opts.mask, { shape: [b, n], dtype: 'bool' });
    if (opts.context) {
      checkTensor('context', opts.context, { rank: 3, dtype: 'float32' });
      if (opts.context.shape[0] !== b)
        throw new Error(`context: expected batch ${b}, got shape [${opts.context.shape.join(', ')}]`);
    }
    if (opts.contextMask) {
      if (!opts.context) throw new Error('contextMask: given without context');
      checkTensor('contextMask', opts.contextMask, { shape: [b, opts.context.shape[1]!], dtype: 'bool' });
    }
    if (opts.mems) {
      if (opts.mems.length !== this.numAttnLayers && opts.mems.length !== 0)
        throw new Error(
          `mems: expected ${this.numAttnLayers} tensors (one per self-attention layer), got ${opts.mems.length}`,
        );
      opts.mems.forEach((m, i) =>
        checkTensor(`mems[${i}]`, m, { shape: [b, null, this.dim], dtype: 'float32' }),
      );
    }
    if (opts.cache) {
      if (opts.cache.isDisposed) throw new Error('cache: expected a live cache, got a disposed one');
      if (!this.causal) throw new Error('cache: expected a causal stack (Decoder) for cached decoding');
      if (opts.mask || opts.attnMask) throw new Error('cache: cached decoding takes no mask / attnMask');
    }
    if (opts.rowCaches) this.checkRows(x, opts);
    if (this.needCondition && !opts.condition)
      throw new Error('condition: expected a tensor, this stack uses adaptive norms or layerscale');
    if (!this.needCondition && opts.condition)
      throw new Error('condition: expected none, this stack has no adaptive norms or layerscale');
    if (opts.condition) {
      const c = opts.condition;
      if ((c.rank !== 2 && c.rank !== 3) || c.shape[c.rank - 1] !== this.dimCondition || c.shape[0] !== b)
        throw new Error(
          `condition: expected shape [${b}, ${this.dimCondition}] or [${b}, n, ${this.dimCondition}], got [${c.shape.join(', ')}]`,
        );
    }
  }

  /**
   * Everything the layers share in one pass: the condition, key masks, rotary tables (`onTables`
   * receives shared ones, which outlive the pass), the positions a cache leaves to compute, the
   * widened stream of hyper-connections and the reinjected input.
   */
  private startRun(
    x0: tf.Tensor,
    opts: LayersForwardOptions,
    onTables: (t: SharedRotaryTables) => void,
  ): RunState {
    const o = this.options;
    const n = x0.shape[1]!;
    let x = x0;
    let cond: tf.Tensor | undefined;
    if (opts.condition) {
      cond = opts.condition.rank === 2 ? tf.expandDims(opts.condition, 1) : opts.condition;
      if (this.adaptiveMlp) {
        const hcond = this.adaptiveMlp.forward(cond);
        cond = tf.mul(hcond, tf.sigmoid(hcond));
      }
    }
    let selfKvMask = opts.selfAttnKvMask;
    if (opts.seqStartPos) {
      const leftPad = tf.greaterEqual(
        tf.expandDims(tf.range(0, n, 1, 'int32'), 0),
        tf.expandDims(tf.cast(opts.seqStartPos, 'int32'), -1),
      );
      selfKvMask = selfKvMask ? tf.logicalAnd(selfKvMask, leftPad) : leftPad;
    }
    const mems = opts.mems && opts.mems.length ? [...opts.mems] : [];
    let rotary = opts.rotaryPosEmb;
    // positions 0 .. n - 1 of a decoding run: sliced from tables shared along the run
    const memLen = mems[0] ? mems[0].shape[1]! : 0;
    const rangeRotary =
      this.rotaryPosEmb && !rotary && !opts.pos && !memLen && wantRotaryTables(this.rotaryPosEmb, opts);
    if (this.rotaryPosEmb && !rotary && !rangeRotary && !opts.rowCaches) {
      const pos =
        opts.pos ??
        (memLen ? tf.sub(tf.range(0, n + memLen, 1, 'int32'), memLen) : tf.range(0, n, 1, 'int32'));
      rotary = this.rotaryPosEmb.forward(pos);
    }
    let context = opts.context;
    if (opts.cache) {
      if (context) context = tf.slice(context, [0, 0, 0], [-1, 0, -1]);
      const age = opts.cacheAge ?? 1;
      if (age > 0 && age < n) x = tf.slice(x, [0, n - age, 0], [-1, age, -1]);
    }
    // cos / sin computed once for every layer
    if (rangeRotary) {
      const tables = sharedRotaryTables(this.rotaryPosEmb!, n, this.dimHead, opts.cache?.rotary ?? null);
      onTables(tables);
      rotary = tables.slice(n, x.shape[1]!);
    } else if (rotary) rotary = prepareRotary(rotary, x.shape[1]!, this.dimHead);

    const bStream = x.shape[0]!;
    if (this.streamEmb) {
      const [, nx, dx] = x.shape as [number, number, number];
      const widened = tf.add(tf.expandDims(x, 1), tf.expandDims(tf.expandDims(this.streamEmb, 0), 2));
      x = tf.reshape(widened, [bStream * o.numResidualStreams, nx, dx]);
    }
    let inject: tf.Tensor | null = null;
    if (this.reinjectInputProj) {
      inject = this.reinjectInputProj.forward(x);
      if (this.learnedReinjectInputGate)
        inject = tf.mul(inject, tf.sigmoid(this.learnedReinjectInputGate.forward(x)));
    }
    return {
      order: opts.layersExecuteOrder ?? this.layersExecuteOrder,
      x,
      cond,
      rotary,
      selfKvMask,
      context,
      contextMask: opts.contextMask,
      mems,
      memMasks: opts.memMasks ? [...opts.memMasks] : [],
      cacheIter: opts.cache ? [...opts.cache.kvs] : [],
      wantCache: opts.returnCache || !!opts.cache,
      bStream,
      outer: o.resiDual ? tf.mul(x, o.resiDualScale) : null,
      inject,
      skipHiddens: [],
      hiddens: [],
      layerHiddens: [],
      attnInters: [],
      newKvs: [],
      newKinds: [],
    };
  }

  /** Runs layer `li` on the stream `s.x`: norms, branch, residual, and what later layers take from it. */
  private runLayer(li: number, s: RunState, opts: LayersForwardOptions, rng: Rng): void {
    const o = this.options;
    const type = this.layerTypes[li]!;
    const entry = this.layers.at(li);
    let layerMem: tf.Tensor | undefined;
    let layerMemMask: tf.Tensor | undefined;
    if (type === 'a') {
      if (opts.returnHiddens) s.hiddens.push(s.x.clone());
      layerMem = s.mems.shift();
      layerMemMask = s.memMasks.shift();
    }
    if (type === 'c' && this.training && o.crossAttnTokensDropout > 0)
      [s.context, s.contextMask] = dropoutSeq(s.context!, s.contextMask, o.crossAttnTokensDropout, rng);
    const prep = entry.residual.prepare ? entry.residual.prepare(s.x) : null;
    const residual = prep ? prep.residual : s.x;
    const branchIn = prep ? prep.branchInput : s.x;
    if (opts.returnHiddens) s.layerHiddens.push(branchIn.clone());
    const { pre, postBranch, postMain } = entry.norms;
    let h = s.inject ? tf.add(branchIn, s.inject) : branchIn;
    if (pre) {
      h = pre.forward(h, s.cond);
      if (type === 'a' && layerMem) layerMem = pre.forward(layerMem, s.cond);
    }
    const needInter =
      s.wantCache || opts.returnHiddens || o.residualAttn || o.crossResidualAttn || o.addValueResidual;
    let blockOpts: AttentionForwardOptions | undefined;
    if (type === 'a')
      blockOpts = {
        mask: opts.mask,
        contextMask: s.selfKvMask,
        attnMask: opts.attnMask,
        relPos: this.relPos ?? undefined,
        pos: opts.pos,
        rotary: s.rotary,
        prevAttn: s.prevAttn,
        cache: s.cacheIter.shift(),
        mem: layerMem,
        memMask: layerMemMask,
        valueResidual: o.addValueResidual ? s.firstSelfValues : undefined,
        returnIntermediates: needInter,
        // only the keys and values are kept: no attention matrices passed on or returned
        cacheStep: s.wantCache && !opts.returnHiddens && !o.residualAttn,
      };
    else if (type === 'c')
      blockOpts = {
        context: s.context,
        mask: opts.mask,
        contextMask: s.contextMask,
        prevAttn: s.prevCrossAttn,
        cache: s.cacheIter.shift(),
        valueResidual: o.addValueResidual ? s.firstCrossValues : undefined,
        returnIntermediates: needInter,
      };
    const rows = s.rows;
    const r =
      type === 'a' && rows
        ? {
            out:
              this.attendRowsAtOnce(entry.block, h, rows) ??
              attendRows(h, rows, (i, hr, cache) =>
                entry.block.forward(
                  hr,
                  {
                    relPos: this.relPos ?? undefined,
                    rotary: rows.rotary[i]!.input(),
                    cache,
                    returnIntermediates: true,
                  },
                  s.cond,
                ),
              ),
          }
        : entry.block.forward(h, blockOpts, s.cond);
    let out = r instanceof tf.Tensor ? r : r.out;
    if (postBranch) out = postBranch.forward(out, s.cond);
    s.x = entry.residual.forward(out, residual, prep?.beta);
    if (s.outer) s.outer = tf.add(s.outer, tf.mul(out, o.resiDualScale));
    if (!(r instanceof tf.Tensor) && 'intermediates' in r)
      this.keepIntermediates(type as 'a' | 'c', r.intermediates as AttentionIntermediates, s, opts);
    if (postMain) s.x = postMain.forward(s.x, s.cond);
  }

  /**
   * Self-attention of rows decoded together as one kernel call (`Attention.decodeRows`): each row's
   * next cache goes to rows.kvs. Null where that does not apply (the rows then run one by one).
   */
  private attendRowsAtOnce(block: unknown, h: tf.Tensor, rows: RowsState): tf.Tensor | null {
    if (!(block instanceof Attention) || this.relPos) return null;
    const res = block.decodeRows(
      h,
      rows.caches.map((c) => c.entry(rows.layer)),
      rows.fullTables,
    );
    if (!res) return null;
    rows.layer++;
    res.kvs.forEach((kv, r) => rows.kvs[r]!.push(kv));
    return res.out;
  }

  /** What an attention layer leaves to the cache, the hiddens and the later layers. */
  private keepIntermediates(
    type: 'a' | 'c',
    inter: AttentionIntermediates,
    s: RunState,
    opts: LayersForwardOptions,
  ): void {
    const o = this.options;
    if (s.wantCache && inter.cachedKv) {
      s.newKvs.push(inter.cachedKv);
      s.newKinds.push(type === 'a');
    }
    if (opts.returnHiddens) s.attnInters.push({ ...inter, cachedKv: undefined, layerType: type });
    if (type === 'a' && !s.firstSelfValues) s.firstSelfValues = inter.values;
    if (type === 'c' && !s.firstCrossValues) s.firstCrossValues = inter.values;
    if (type === 'a' && o.residualAttn) s.prevAttn = inter.preSoftmaxAttn;
    if (type === 'c' && o.crossResidualAttn) s.prevCrossAttn = inter.preSoftmaxAttn;
  }

  /** The output after the last layer: soft-clamp, the streams summed, the final norm. */
  private finishRun(s: RunState, input: tf.Tensor, opts: LayersForwardOptions) {
    const o = this.options;
    let x = s.x;
    if (opts.returnHiddens) s.layerHiddens.push(x.clone());
    if (o.softclampOutput) x = tf.mul(tf.tanh(tf.div(x, o.softclampOutputValue)), o.softclampOutputValue);
    if (this.streamEmb) {
      const [, nx, dx] = x.shape as [number, number, number];
      x = tf.sum(tf.reshape(x, [s.bStream, o.numResidualStreams, nx, dx]), 1);
    }
    if (s.outer) x = tf.add(x, this.finalNorm!.forward(s.outer, s.cond));
    else if (this.finalNorm) x = this.finalNorm.forward(x, s.cond);
    return {
      out: x === input ? x.clone() : x,
      hiddens: s.hiddens,
      layerHiddens: s.layerHiddens,
      attnIntermediates: s.attnInters,
      kvs: s.newKvs,
      kinds: s.newKinds,
    };
  }
}

/** Concatenates an earlier hidden with the stream and projects back (`combine` [dim, 2 * dim], no bias). */
class ConcatCombine extends Module {
  combine: Linear;
  constructor(
    dim: number,
    readonly prevLayerInd: number,
  ) {
    super();
    this.combine = this.registerModule('combine', new Linear(dim * 2, dim, { bias: false }));
  }

  /** x, skip: [b, n, dim] -> [b, n, dim]. */
  forward(x: tf.Tensor, skip: tf.Tensor): tf.Tensor {
    return tf.tidy(() => this.combine.forward(tf.concat([skip, x], -1)));
  }
}

/** Checks the stack's own options against each other (the rule table has checked each one). */
function validate(o: AttentionLayersOwnOptions): void {
  const norms = [
    o.useScalenorm,
    o.useRmsnorm,
    o.useSimpleRmsnorm,
    o.useAdaptiveLayernorm,
    o.useAdaptiveRmsnorm,
  ].filter(Boolean).length;
  if (norms > 1)
    throw new OptionError(
      'useScalenorm',
      'at most one of useScalenorm, useRmsnorm, useSimpleRmsnorm, useAdaptiveLayernorm, useAdaptiveRmsnorm',
      `${norms}`,
    );
  if (o.useLayerscale && o.useAdaptiveLayerscale)
    throw new OptionError('useAdaptiveLayerscale', 'false with useLayerscale (at most one of them)', 'true');
  if (!o.preNorm && o.sandwichNorm)
    throw new OptionError('sandwichNorm', 'false with post-norm (preNorm false)', 'true');
  if (o.resiDual && o.sandwichNorm) throw new OptionError('sandwichNorm', 'false with resiDual', 'true');
  if (o.numResidualStreams > 1 && o.gateResidual)
    throw new OptionError(
      'numResidualStreams',
      '1 with gateResidual (hyper-connections replace the residual)',
      String(o.numResidualStreams),
    );
  if (o.numResidualStreams > 1 && o.resiDual)
    throw new OptionError('numResidualStreams', '1 with resiDual', String(o.numResidualStreams));
  if (o.layersExecuteOrder && o.customLayers && o.depth !== null)
    throw new OptionError(
      'depth',
      'none when customLayers and layersExecuteOrder are given',
      String(o.depth),
    );
  if (o.weightTieLayers && (o.customLayers || o.parRatio !== null || o.sandwichCoef !== null))
    throw new OptionError('weightTieLayers', 'no customLayers, parRatio or sandwichCoef with it', 'true');
  validateKwargs(o);
}

/** qkvReceiveDiffResiduals, relPosKwargs and residualFnKwargs against the options they act on. */
function validateKwargs(o: AttentionLayersOwnOptions): void {
  if (o.qkvReceiveDiffResiduals && o.numResidualStreams === 1)
    throw new OptionError(
      'qkvReceiveDiffResiduals',
      'numResidualStreams > 1 with it (the three inputs are mixed from the residual streams)',
      'numResidualStreams 1',
    );
  for (const [k, v] of Object.entries(o.relPosKwargs)) {
    if (k !== 'slopes')
      throw new OptionError(
        `relPosKwargs.${k}`,
        "only slopes (the stack sets the scheme's other arguments)",
        'an unknown key',
      );
    if (!o.alibiPosBias)
      throw new OptionError(
        'relPosKwargs.slopes',
        'alibiPosBias true (slopes are ALiBi head slopes)',
        'alibiPosBias false',
      );
    if (!Array.isArray(v) || v.length === 0 || !v.every((x) => typeof x === 'number' && Number.isFinite(x)))
      throw OptionError.of('relPosKwargs.slopes', 'a non-empty list of finite numbers', v);
  }
  for (const [k, v] of Object.entries(o.residualFnKwargs)) {
    if (k !== 'tanh')
      throw new OptionError(
        `residualFnKwargs.${k}`,
        "only tanh (the stack sets the residual's other arguments)",
        'an unknown key',
      );
    if (o.numResidualStreams === 1)
      throw new OptionError(
        'residualFnKwargs.tanh',
        'numResidualStreams > 1 (it is an option of hyper-connections)',
        'numResidualStreams 1',
      );
    if (typeof v !== 'boolean') throw OptionError.of('residualFnKwargs.tanh', 'a boolean', v);
  }
}

/**
 * Structured dropout of context tokens: keeps a random max(1, floor((1 - p) n)) of them per row
 * (masked tokens last), and the first ceil(count * (1 - p)) valid ones in the mask.
 * seq: [b, n, d], mask?: [b, n] bool.
 */
export function dropoutSeq(
  seq: tf.Tensor,
  mask: tf.Tensor | undefined,
  p: number,
  rng: Rng,
): [tf.Tensor, tf.Tensor | undefined] {
  const [b, n] = seq.shape as [number, number, number];
  let logits = tf.randomNormal([b, n], 0, 1, 'float32', rng.nextUint32());
  if (mask) logits = tf.where(mask, logits, tf.fill([b, n], -3.4e38));
  const keep = 1 - p;
  const numKeep = Math.max(1, Math.floor(keep * n));
  const idx = tf.topk(logits, numKeep).indices;
  const out = tf.gather(seq, idx, 1, 1);
  let newMask: tf.Tensor | undefined;
  if (mask) {
    const counts = tf.sum(tf.cast(mask, 'float32'), -1);
    const keepCounts = tf.ceil(tf.mul(counts, keep));
    const keepMask = tf.less(
      tf.expandDims(tf.range(0, numKeep, 1, 'float32'), 0),
      tf.expandDims(keepCounts, -1),
    );
    newMask = tf.logicalAnd(tf.gather(mask, idx, 1, 1), keepMask);
  }
  return [out, newMask];
}

/**
 * The options of a stack class that fixes some of them (an Encoder is not causal, ...): `fixed`
 * merged in, a given value of a fixed option refused. `what`: the class, for the message.
 */
function withFixed(
  options: AttentionLayersOptions,
  fixed: Partial<AttentionLayersOwnOptions>,
  what: string,
): AttentionLayersOptions {
  for (const [k, v] of Object.entries(fixed))
    if (k in options)
      throw OptionError.of(
        k,
        `none (${what} sets ${k} ${String(v)})`,
        (options as Record<string, unknown>)[k],
      );
  return { ...options, ...fixed };
}

/** A bidirectional stack (`causal` false). */
export class Encoder extends AttentionLayers {
  constructor(options: Omit<AttentionLayersOptions, 'causal'>) {
    super(withFixed(options, { causal: false }, 'an Encoder'));
  }
}

/** A causal stack. */
export class Decoder extends AttentionLayers {
  constructor(options: Omit<AttentionLayersOptions, 'causal'>) {
    super(withFixed(options, { causal: true }, 'a Decoder'));
  }
}

/** A stack of cross-attention and feedforward layers only. */
export class CrossAttender extends AttentionLayers {
  constructor(options: Omit<AttentionLayersOptions, 'crossAttend' | 'onlyCross'>) {
    super(withFixed(options, { crossAttend: true, onlyCross: true }, 'a CrossAttender'));
  }
}

/** Per-call options of `PrefixDecoder.forward`. */
export interface PrefixDecoderForwardOptions extends LayersForwardOptions {
  /** Length of the fully visible prefix: one number, or [b] int32. */
  prefixAttnLen?: number | tf.Tensor;
}

/** A decoder whose first `prefixAttnLen` positions attend bidirectionally (causal elsewhere). */
export class PrefixDecoder extends AttentionLayers {
  constructor(options: Omit<AttentionLayersOptions, 'causal'>) {
    super(withFixed(options, { causal: false }, 'a PrefixDecoder'));
  }

  /** x: [b, n, dim]. */
  override forward(x: tf.Tensor, opts: PrefixDecoderForwardOptions = {}): LayersOutput {
    const [b, n] = x.shape as [number, number, number];
    const { prefixAttnLen, ...rest } = opts;
    const attnMask = tf.tidy(() => {
      const i = tf.expandDims(tf.range(0, n, 1, 'int32'), 1);
      const j = tf.expandDims(tf.range(0, n, 1, 'int32'), 0);
      let m: tf.Tensor = tf.reshape(tf.lessEqual(j, i), [1, 1, n, n]);
      if (prefixAttnLen !== undefined) {
        const lens =
          typeof prefixAttnLen === 'number'
            ? tf.fill([b], prefixAttnLen, 'int32')
            : tf.cast(prefixAttnLen, 'int32');
        const prefix = tf.less(
          tf.reshape(tf.range(0, n, 1, 'int32'), [1, 1, 1, n]),
          tf.reshape(lens, [b, 1, 1, 1]),
        );
        m = tf.logicalOr(m, prefix);
      }
      if (opts.attnMask) {
        const am = opts.attnMask;
        const am4 = am.rank === 2 ? tf.reshape(am, [1, 1, n, n]) : am.rank === 3 ? tf.expandDims(am, 0) : am;
        m = tf.logicalAnd(m, am4);
      }
      return m;
    });
    try {
      return super.forward(x, { ...rest, attnMask });
    } finally {
      attnMask.dispose();
    }
  }
}

/**
 * Self-attention of rows decoded together: row r of h ([b, 1, dim]) attends over its own cache
 * (entry rows.layer of rows.caches[r]), exactly as it would alone; each row's new keys/values go to
 * rows.kvs[r]. Returns the rows' outputs, [b, 1, dim].
 */
function attendRows(
  h: tf.Tensor,
  rows: RowsState,
  call: (r: number, hr: tf.Tensor, cache: AttentionKv | undefined) => unknown,
): tf.Tensor {
  const parts = rows.caches.length === 1 ? [h] : tf.split(h, rows.caches.length, 0);
  const layer = rows.layer++;
  rows.tensorEntries = true;
  const outs = parts.map((hr, r) => {
    const res = call(r, hr, rows.caches[r]!.kvs[layer]) as {
      out: tf.Tensor;
      intermediates: AttentionIntermediates;
    };
    rows.kvs[r]!.push(res.intermediates.cachedKv!);
    return res.out;
  });
  return outs.length === 1 ? outs[0]! : tf.concat(outs, 0);
}

/** Whether a forward call decodes (a cache in or out) with position-only rotary (no xpos). */
function wantRotaryTables(rope: RotaryEmbedding, opts: { cache?: unknown; returnCache?: boolean }): boolean {
  return !rope.options.useXpos && (opts.cache != null || opts.returnCache === true);
}

/**
 * The tables of positions 0 .. n - 1: the previous step's when they reach that far, else new ones
 * for twice as many positions (at least 64), so a run computes them a logarithmic number of times.
 */
function sharedRotaryTables(
  rope: RotaryEmbedding,
  n: number,
  width: number,
  prev: SharedRotaryTables | null,
): SharedRotaryTables {
  if (prev && prev.capacity >= n && prev.width === width) return prev.hold();
  let capacity = Math.max(64, prev ? 2 * prev.capacity : 64);
  while (capacity < n) capacity *= 2;
  const full = tidyObj(() => prepareRotary(rope.forwardFromSeqLen(capacity), capacity, width));
  return new SharedRotaryTables(capacity, width, full);
}
