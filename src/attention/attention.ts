import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { OptionError, fmtShape } from '../utils/errors.js';
import { RULES, camelKey, checkOptionValues } from '../utils/option-rules.js';
import { getRng } from '../utils/random.js';
import { Attend, type AttendModuleOptions } from './attend.js';
import { CoPE } from './cope.js';
import {
  DataDependentAlibi,
  PerRowDataDependentAlibi,
  type DataDependentAlibiKwargs,
} from './data-dependent-alibi.js';
import { fillVariable, l2normGroups, padAxis } from './ops.js';
import { applyRotaryPosEmb, applyRotaryTables } from './rotary.js';
import { backendHasKernel } from '../nn/fused.js';
import { FoldAxially, MultiheadRMSNorm, buildHybridModule } from './hybrid.js';
import {
  attentionDefaults,
  isBackendKv,
  type AttentionForwardOptions,
  type AttentionIntermediates,
  type AttentionKv,
  type AttentionOptions,
  type BackendKv,
  type KvEntry,
  type RotaryInput,
} from './types.js';

/**
 * A kernel a backend may register to run plain self-attention over n new positions that start or
 * continue a key/value cache (a decoding step, n = 1 after a cache; a prompt's prefill, no cache):
 *   XtCachedAttention  inputs {x: [b, n, dim], wq, wk, wv, wo (the Linear weights, [out, in]),
 *                      kCache?: [b, h, t, d], vCache?: [b, h, t, dv] (absent: t = 0),
 *                      cos?, sin? ([1|b, 1, t + n, d]), cosQ?, sinQ? ([1|b, 1, n, d]), the tables
 *                      of `prepareRotary`}
 *                      attrs {scale, heads, causal, flash}
 *                      outputs [out: [b, n, dimOut], k: [b, h, t + n, d], v: [b, h, t + n, dv],
 *                      the new v: [b, h, n, dv]]
 *   It must compute what `forwardImpl` does for that call with its kernels (projections, heads
 *   split, cache appended, XtRotary on q and every key, the attention of the layer's path: XtAttention
 *   with flash, the composite's ops without; heads merged, output projection), so that a layer gives
 *   the same numbers either way. It has no gradient: calls that need one never run it.
 */
export const XT_CACHED_ATTENTION = 'XtCachedAttention';

/**
 * A kernel a backend may register to run one decoding step of plain self-attention for rows that
 * each continue their own cache (sequences of different lengths decoded together):
 *   XtCachedAttentionRows  inputs {x: [b, 1, dim], wq, wk, wv, wo}
 *                          attrs {scale, heads, rows: b, entries: row r's cache entry (KvEntry: k
 *                          [1, h, t_r, d], v [1, h, t_r, dv], tensors or the backend's ids),
 *                          tables: null or per row null or its rotary tables {cos, sin}
 *                          ([1, 1, >= t_r + 1, d], positions from 0, of which the row uses
 *                          0 .. t_r), kvOut: an empty array the kernel fills with each row's
 *                          entry with this step (BackendKv: ids the caller then owns)}
 *                          outputs [out: [b, 1, dimOut]]
 *   The rows' new keys and values are not TF.js tensors: a step makes no tensor per row and layer.
 *   Row r's numbers must be those XtCachedAttention gives for that row alone (while matrix products
 *   keep rows apart: `rowStableProducts`).
 */
export const XT_CACHED_ATTENTION_ROWS = 'XtCachedAttentionRows';

/** The full rotary tables of one row decoded with `decodeRows` (positions from 0). */
export interface RowRotaryTables {
  cos: tf.Tensor;
  sin: tf.Tensor;
}

/** Options that must keep these values for the one-kernel decoding step (none changes its math). */
const PLAIN_DECODE: Partial<AttentionOptions> = {
  preTalkingHeads: false,
  postTalkingHeads: false,
  preScalePostTalkingHeads: false,
  headScale: false,
  sparseTopk: null,
  numMemKv: 0,
  onAttn: false,
  gateValueHeads: false,
  gateValues: false,
  hard: false,
  maxAttendPast: null,
  qkNorm: false,
  l2Distance: false,
  sigmoid: false,
  selective: false,
  laser: false,
  useCope: false,
  dataDependentAlibi: false,
  learnedValueResidualMix: false,
  addZeroKv: false,
  softclampLogits: false,
  customAttnFn: null,
  qkvReceiveDiffResiduals: false,
  useLatentQ: false,
  useLatentKv: false,
  latentRopeSubheads: null,
  hybridModule: null,
};

/** The options merged with the defaults, each checked against the rule table. */
function resolveOptions(options: Partial<AttentionOptions>): AttentionOptions {
  checkOptionValues(options, attentionDefaults, 'Attention');
  const merged: Record<string, unknown> = { ...attentionDefaults };
  for (const [key, value] of Object.entries(options)) if (value !== undefined) merged[key] = value;
  return merged as unknown as AttentionOptions;
}

/**
 * Checks the options of an Attention of input size `dim` against each other (the rule table has
 * checked each one); returns its number of key/value heads.
 */
function checkOptions(o: AttentionOptions, dim: number): number {
  if (o.kvHeads !== null && o.oneKvHead)
    throw new OptionError(
      'kvHeads',
      'null when oneKvHead is true (oneKvHead means kvHeads = 1)',
      String(o.kvHeads),
    );
  const kvHeads = o.oneKvHead ? 1 : (o.kvHeads ?? o.heads);
  if (o.heads % kvHeads !== 0)
    throw new OptionError('kvHeads', `a divisor of heads (${o.heads})`, String(kvHeads));
  checkLatentHybridOptions(o, dim, kvHeads);
  if (o.rotateNumHeads !== null || o.latentRopeSubheads !== null) {
    const name = o.latentRopeSubheads !== null ? 'latentRopeSubheads' : 'rotateNumHeads';
    const r = o.latentRopeSubheads ?? o.rotateNumHeads ?? o.heads;
    if (r > o.heads) throw new OptionError(name, `an integer in [1, heads (${o.heads})]`, String(r));
    if (r < o.heads && kvHeads < o.heads)
      throw new OptionError(
        name,
        `all heads with grouped-query attention (kvHeads ${kvHeads}): rotating only some is not compatible`,
        String(r),
      );
  }
  if (o.qkNorm) {
    if (o.dimHead % o.qkNormGroups !== 0)
      throw new OptionError('qkNormGroups', `a divisor of dimHead (${o.dimHead})`, String(o.qkNormGroups));
    if (o.dimHead / o.qkNormGroups <= 2)
      throw new OptionError('qkNormGroups', 'dimHead / qkNormGroups > 2', `${o.dimHead} / ${o.qkNormGroups}`);
  }
  return kvHeads;
}

/**
 * Checks the options of multi-head latent attention, the hybrid module and qkv from different
 * residuals against each other (checkOptions checks the others).
 */
function checkLatentHybridOptions(o: AttentionOptions, dim: number, kvHeads: number): void {
  if (o.useLatentQ && o.dimLatentQ === null)
    throw new OptionError('dimLatentQ', 'a positive integer with useLatentQ', 'null');
  if (o.useLatentKv && o.dimLatentKv === null)
    throw new OptionError('dimLatentKv', 'a positive integer with useLatentKv', 'null');
  if (o.latentRopeSubheads !== null) {
    if (!o.useLatentKv)
      throw new OptionError('latentRopeSubheads', 'useLatentKv true with it', String(o.latentRopeSubheads));
    if (o.rotateNumHeads !== null)
      throw new OptionError(
        'rotateNumHeads',
        'null with latentRopeSubheads (which sets the rotated heads)',
        String(o.rotateNumHeads),
      );
    if (o.latentRopeSubheads > kvHeads)
      throw new OptionError(
        'latentRopeSubheads',
        `at most the key/value heads (${kvHeads})`,
        String(o.latentRopeSubheads),
      );
  }
  if (o.learnedValueResidualMix && o.useLatentQ && o.dimLatentQ !== dim)
    throw new OptionError(
      'dimLatentQ',
      `${dim} (dim) with learnedValueResidualMix, which mixes from the latent queries`,
      String(o.dimLatentQ),
    );
  if (o.qkvReceiveDiffResiduals) {
    if (o.dimContext !== null && o.dimContext !== dim)
      throw new OptionError(
        'dimContext',
        'none with qkvReceiveDiffResiduals (self-attention)',
        String(o.dimContext),
      );
    const fromX = (['useLatentKv', 'gateValues', 'gateValueHeads', 'dataDependentAlibi'] as const).find(
      (key) => o[key],
    );
    if (fromX || o.hybridModule !== null)
      throw new OptionError(
        'qkvReceiveDiffResiduals',
        `no ${fromX ?? 'hybridModule'} with it (that option reads one input x, here there are three)`,
        null,
      );
  }
  if (o.hybridModule === null) {
    if (o.hybridFoldAxialDim !== null || o.hybridMaskKwarg !== null)
      throw new OptionError(
        o.hybridFoldAxialDim !== null ? 'hybridFoldAxialDim' : 'hybridMaskKwarg',
        'a hybridModule with it',
        'none',
      );
    return;
  }
  if (o.hybridFoldAxialDim === null)
    throw new OptionError(
      'hybridFoldAxialDim',
      'a positive integer with hybridModule (1: no folding)',
      'null',
    );
  if (o.valueDimHead !== null && o.valueDimHead !== o.dimHead)
    throw new OptionError(
      'valueDimHead',
      `dimHead (${o.dimHead}) with hybridModule (both outputs are normed per head of dimHead)`,
      String(o.valueDimHead),
    );
}

/** CoPE of `useCope` (causal attention without flash), or null. */
function buildCope(o: AttentionOptions): CoPE | null {
  if (!o.useCope) return null;
  if (!o.causal)
    throw new OptionError('useCope', 'causal attention with it (CoPE was designed for it)', 'causal false');
  if (o.flash)
    throw new OptionError(
      'flash',
      'false with CoPE (useCope) (it needs the attention matrix, which flash does not form)',
      'true',
    );
  return new CoPE(o.dimHead, {
    heads: o.heads,
    maxPos: o.copeMaxPos,
    talkingHeads: o.copeTalkingHeads,
    softOnehot: o.copeSoftOnehotPos,
  });
}

/** The data-dependent ALiBi module of `dataDependentAlibi`, or null. */
function buildDataDependentAlibi(
  dim: number,
  o: AttentionOptions,
): DataDependentAlibi | PerRowDataDependentAlibi | null {
  if (!o.dataDependentAlibi) return null;
  const given = o.dataDependentAlibiKwargs as Record<string, unknown>;
  const ddaKwargs: DataDependentAlibiKwargs = {};
  for (const [key, value] of Object.entries(given)) {
    const name = camelKey(key);
    if (
      (name !== 'biasInit' && name !== 'postLogScale') ||
      typeof value !== 'number' ||
      !Number.isFinite(value)
    )
      throw OptionError.of('dataDependentAlibiKwargs', '{biasInit?: number, postLogScale?: number}', given);
    ddaKwargs[name] = value;
  }
  return o.dataDependentAlibiPerRow
    ? new PerRowDataDependentAlibi(dim, o.heads, o.causal, o.dataDependentAlibiPerRowDimHead, ddaKwargs)
    : new DataDependentAlibi(dim, o.heads, o.causal, ddaKwargs);
}

/** The options of the `Attend` of an Attention with options `o`, logit scale `scale` and CoPE. */
function attendOptions(o: AttentionOptions, scale: number, cope: CoPE | null): AttendModuleOptions {
  return {
    heads: o.heads,
    causal: o.causal,
    preTalkingHeads: o.preTalkingHeads,
    postTalkingHeads: o.postTalkingHeads,
    preScalePostTalkingHeads: o.preScalePostTalkingHeads,
    dropout: o.dropout,
    sparseTopk: o.sparseTopk,
    sparseTopkStraightThrough: o.sparseTopkStraightThrough,
    hard: o.hard,
    scale: o.qkNorm ? o.qkNormScale : scale,
    l2Distance: o.l2Distance,
    sigmoid: o.sigmoid,
    customAttnFn: o.customAttnFn,
    selective: o.selective,
    flash: o.flash,
    addZeroKv: o.addZeroKv,
    softclampLogits: o.softclampLogits,
    logitSoftclampValue: o.logitSoftclampValue,
    cope,
  };
}

/** Standard normal draws of the library generator: [a, b, c]. */
function drawNormal(shape: [number, number, number]): tf.Tensor3D {
  return tf.tensor3d(getRng().fillNormal(shape[0] * shape[1] * shape[2], 0, 1), shape);
}

/** sigmoid / silu gating helper of the reference's GLU: x: [..., 2d] -> a * sigmoid(g). */
function glu(x: tf.Tensor): tf.Tensor {
  const [a, g] = tf.split(x, 2, -1) as [tf.Tensor, tf.Tensor];
  return tf.mul(a, tf.sigmoid(g));
}

/** [b, n, h * d] -> [b, h, n, d]. */
function splitHeads(t: tf.Tensor, h: number): tf.Tensor {
  const [b, n, hd] = t.shape as [number, number, number];
  // with one position (cached decoding) or one head the transpose moves no data: a reshape will do
  if (n === 1 || h === 1) return tf.reshape(t, [b, h, n, hd / h]);
  return tf.transpose(tf.reshape(t, [b, n, h, hd / h]), [0, 2, 1, 3]);
}

/** [b, h, n, d] -> [b, n, h * d]. */
function mergeHeads(t: tf.Tensor): tf.Tensor {
  const [b, h, n, d] = t.shape as [number, number, number, number];
  if (n === 1 || h === 1) return tf.reshape(t, [b, n, h * d]);
  return tf.reshape(tf.transpose(t, [0, 2, 1, 3]), [b, n, h * d]);
}

/**
 * Multi-head attention with the reference's options (x-transformers 2.0.1 `Attention`):
 * grouped/multi-query key-values, memory key-values, qk-norm, talking heads, sparse top-k, hard
 * attention, gating, head scale, attention-on-attention, relative position biases, rotary / xpos,
 * XL memories, residual attention, CoPE, data-dependent ALiBi, value residuals and a key/value
 * cache for generation (keys cached as the reference does: projected, qk-normed, before rotary).
 * Parameters (state-dict names as the reference): qk_norm_q_scale, qk_norm_k_scale,
 * head_scale_params, mem_k, mem_v, to_q, to_k, to_v, to_v_gate, to_v_head_gate,
 * data_dependent_alibi.*, attend.* (talking heads, cope), to_value_residual_mix.0, to_out (to_out.0).
 */
export class Attention extends Module {
  readonly dim: number;
  readonly options: AttentionOptions;
  readonly heads: number;
  readonly kvHeads: number;
  readonly dimHead: number;
  readonly valueDimHead: number;
  readonly dimContext: number;
  readonly dimOut: number;
  readonly scale: number;
  readonly causal: boolean;
  readonly toQ: Linear;
  readonly toK: Linear;
  readonly toV: Linear;
  /** Multi-head latent attention: `to_latent_q`, `to_latent_kv`, `to_rotateable_k` (decoupled rope). */
  readonly toLatentQ: Linear | null = null;
  readonly toLatentKv: Linear | null = null;
  readonly toRotateableK: Linear | null = null;
  /** The hybrid module (inside `FoldAxially`) with its two per-head norms and `hybrid_mix`. */
  readonly hybrid: FoldAxially | null = null;
  readonly hybridNorms: [MultiheadRMSNorm, MultiheadRMSNorm] | null = null;
  readonly hybridMix: Linear | null = null;
  /** Heads that rotary turns (the last ones): rotateNumHeads, latentRopeSubheads, or all. */
  readonly rotateNumHeads: number;
  readonly toVGate: Linear | null = null;
  readonly toVHeadGate: Linear | null = null;
  readonly qkNormQScale: tf.Variable | null = null;
  readonly qkNormKScale: tf.Variable | null = null;
  readonly attend: Attend;
  readonly headScaleParams: tf.Variable | null = null;
  readonly memK: tf.Variable | null = null;
  readonly memV: tf.Variable | null = null;
  readonly toOut: Linear;
  readonly toValueResidualMix: Linear | null = null;
  readonly dataDependentAlibi: DataDependentAlibi | PerRowDataDependentAlibi | null = null;
  /** Whether this layer supports a key/value cache (not with selective attention). */
  readonly canCacheKv: boolean;
  /** Whether a decoding step may run as one XtCachedAttention kernel (plain options). */
  private readonly plainDecode: boolean;

  /** dim: feature size of x. */
  constructor(dim: number, options: Partial<AttentionOptions> = {}) {
    super();
    if (!RULES.posInt.test(dim)) throw OptionError.of('dim', RULES.posInt.expected, dim);
    const o = resolveOptions(options);
    this.options = o;
    this.dim = dim;
    const kvHeads = checkOptions(o, dim);
    this.heads = o.heads;
    this.causal = o.causal;
    this.dimHead = o.dimHead;
    this.scale = o.dimHead ** -0.5;
    this.valueDimHead = o.valueDimHead ?? o.dimHead;
    this.dimContext = o.dimContext ?? dim;
    this.dimOut = o.dimOut ?? dim;
    this.kvHeads = kvHeads;
    // a hybrid module sees the whole sequence: a layer with one recomputes rather than caches
    this.canCacheKv = !o.selective && o.hybridModule === null;
    this.rotateNumHeads = o.latentRopeSubheads ?? o.rotateNumHeads ?? o.heads;
    this.plainDecode =
      kvHeads === o.heads &&
      (o.rotateNumHeads === null || o.rotateNumHeads >= o.heads) &&
      (Object.keys(PLAIN_DECODE) as (keyof AttentionOptions)[]).every((key) => o[key] === PLAIN_DECODE[key]);
    const qDim = o.dimHead * o.heads;
    const kDim = o.dimHead * (kvHeads - (o.latentRopeSubheads ?? 0));
    const vDim = this.valueDimHead * kvHeads;
    const outDim = this.valueDimHead * o.heads;

    const noBias = { bias: false };
    if (o.useLatentQ)
      this.toLatentQ = this.registerModule('to_latent_q', new Linear(dim, o.dimLatentQ!, noBias));
    if (o.useLatentKv)
      this.toLatentKv = this.registerModule(
        'to_latent_kv',
        new Linear(this.dimContext, o.dimLatentKv!, noBias),
      );
    if (o.latentRopeSubheads !== null)
      this.toRotateableK = this.registerModule(
        'to_rotateable_k',
        new Linear(this.dimContext, o.dimHead * o.latentRopeSubheads, noBias),
      );
    const qIn = o.useLatentQ ? o.dimLatentQ! : dim;
    const kvIn = o.useLatentKv ? o.dimLatentKv! : this.dimContext;
    this.toQ = this.registerModule('to_q', new Linear(qIn, qDim, noBias));
    this.toK = this.registerModule('to_k', new Linear(kvIn, kDim, noBias));
    this.toV = this.registerModule('to_v', new Linear(kvIn, vDim, noBias));

    if (o.gateValues) {
      const gate = this.registerModule('to_v_gate', new Linear(dim, outDim));
      fillVariable(gate.weight, 0);
      fillVariable(gate.bias!, 10);
      this.toVGate = gate;
    }
    if (o.gateValueHeads) {
      const gate = this.registerModule('to_v_head_gate', new Linear(dim, o.heads));
      fillVariable(gate.weight, 0);
      fillVariable(gate.bias!, 10);
      this.toVHeadGate = gate;
    }
    if (o.qkNorm && o.qkNormDimScale) {
      this.qkNormQScale = this.registerParameter('qk_norm_q_scale', tf.ones([o.heads, 1, o.dimHead]));
      this.qkNormKScale = this.registerParameter('qk_norm_k_scale', tf.ones([kvHeads, 1, o.dimHead]));
    }

    const cope = buildCope(o);
    const dda = buildDataDependentAlibi(dim, o);
    if (dda) this.dataDependentAlibi = this.registerModule('data_dependent_alibi', dda);

    this.attend = this.registerModule('attend', new Attend(attendOptions(o, this.scale, cope)));

    if (o.headScale)
      this.headScaleParams = this.registerParameter('head_scale_params', tf.ones([1, o.heads, 1, 1]));

    if (o.numMemKv > 0) {
      this.memK = this.registerParameter('mem_k', drawNormal([kvHeads, o.numMemKv, o.dimHead]));
      // the reference sizes mem_v by dimHead too (so it cannot combine numMemKv with another valueDimHead)
      this.memV = this.registerParameter('mem_v', drawNormal([kvHeads, o.numMemKv, this.valueDimHead]));
    }

    if (o.learnedValueResidualMix)
      this.toValueResidualMix = this.registerModule(
        'to_value_residual_mix',
        new Sequential0(dim, o.heads),
      ).linear;

    if (o.hybridModule !== null) {
      const fold = new FoldAxially(
        o.hybridFoldAxialDim!,
        buildHybridModule(o.hybridModule, dim, outDim),
        o.causal ? null : o.hybridMaskKwarg,
      );
      this.hybrid = this.registerModule('hybrid_module', fold);
      const norms = this.registerModule('hybrid_norms', new ModuleList<MultiheadRMSNorm>());
      this.hybridNorms = [
        norms.push(new MultiheadRMSNorm(o.dimHead, o.heads)),
        norms.push(new MultiheadRMSNorm(o.dimHead, o.heads)),
      ];
      // as the reference 2.0.1: created, but its forward does not use it (no gradient reaches it)
      this.hybridMix = this.registerModule('hybrid_mix', new Linear(dim, o.heads, noBias));
    }

    if (o.onAttn) {
      const seq = this.registerModule('to_out', new ToOutGlu(outDim, this.dimOut));
      this.toOut = seq.linear;
    } else {
      this.toOut = this.registerModule('to_out', new Linear(outDim, this.dimOut, { bias: false }));
    }
    if (o.zeroInitOutput) fillVariable(this.toOut.weight, 0);
  }

  /**
   * x: [b, n, dim] -> out: [b, n, dimOut]. See `AttentionForwardOptions` for the optional inputs.
   * The returned tensors (out and intermediates) belong to the caller.
   */
  forward(
    x: tf.Tensor,
    opts: AttentionForwardOptions = {},
  ): { out: tf.Tensor; intermediates: AttentionIntermediates } {
    this.checkInputs(x, opts);
    type Result = { out: tf.Tensor; intermediates: AttentionIntermediates };
    return tf.tidy(() => this.forwardImpl(x, opts) as unknown as tf.TensorContainer) as unknown as Result;
  }

  private checkInputs(x: tf.Tensor, opts: AttentionForwardOptions): void {
    if (this.options.qkvReceiveDiffResiduals) {
      if (x.rank !== 4 || x.shape[0] !== 3 || x.shape[3] !== this.dim)
        throw new Error(
          `x: expected [3, batch, seq, ${this.dim}] (query, key and value inputs: qkvReceiveDiffResiduals), got ${fmtShape(x.shape)}`,
        );
      if (opts.context)
        throw new Error('context: expected none with qkvReceiveDiffResiduals (self-attention only)');
    } else if (x.rank !== 3 || x.shape[2] !== this.dim)
      throw new Error(`x: expected [batch, seq, ${this.dim}], got ${fmtShape(x.shape)}`);
    const [b, n] = x.shape.slice(x.rank - 3) as [number, number, number];
    const boolMask = (name: string, t: tf.Tensor | undefined, len: number | null): void => {
      if (!t) return;
      if (t.dtype !== 'bool') throw new Error(`${name}: expected dtype bool, got ${t.dtype}`);
      if (t.rank !== 2 || t.shape[0] !== b || (len !== null && t.shape[1] !== len))
        throw new Error(`${name}: expected [${b}, ${len ?? 'len'}], got ${fmtShape(t.shape)}`);
    };
    if (opts.context) {
      const c = opts.context;
      if (c.rank !== 3 || c.shape[0] !== b || c.shape[2] !== this.dimContext)
        throw new Error(`context: expected [${b}, len, ${this.dimContext}], got ${fmtShape(c.shape)}`);
    }
    if (opts.mem) {
      const m = opts.mem;
      if (m.rank !== 3 || m.shape[0] !== b || m.shape[2] !== this.dimContext)
        throw new Error(`mem: expected [${b}, len, ${this.dimContext}], got ${fmtShape(m.shape)}`);
      if (opts.context) throw new Error('mem: expected no memories with cross-attention (context given)');
    }
    boolMask('mask', opts.mask, n);
    boolMask('contextMask', opts.contextMask, null);
    boolMask('memMask', opts.memMask, opts.mem ? opts.mem.shape[1]! : null);
    if (opts.memMask && !opts.mem) throw new Error('memMask: expected mem to be given with it');
    if (opts.attnMask) {
      const a = opts.attnMask;
      if (a.dtype !== 'bool') throw new Error(`attnMask: expected dtype bool, got ${a.dtype}`);
      if (a.rank < 2 || a.rank > 4)
        throw new Error(`attnMask: expected rank 2 to 4, got ${fmtShape(a.shape)}`);
    }
    if (opts.cache) this.checkCache(opts.cache, b);
    if (opts.relPos && opts.attnBias)
      throw new Error('attnBias: expected either relPos or attnBias, got both');
  }

  private checkCache(cache: AttentionKv, b: number): void {
    this.checkCacheShapes(cache.k.shape, cache.v.shape, b);
  }

  /** checkCache on the shapes of the cached keys and values. */
  private checkCacheShapes(kShape: number[], vShape: number[], b: number): void {
    if (!this.canCacheKv)
      throw new Error(
        'cache: this layer cannot decode with a key/value cache (selective attention or a hybrid module)',
      );
    const o = this.options;
    if (o.useLatentKv) {
      const t = kShape[2];
      const [vh, vd] =
        o.latentRopeSubheads !== null ? [o.latentRopeSubheads, o.dimHead] : [1, o.dimLatentKv!];
      if (kShape.length !== 4 || kShape[0] !== b || kShape[1] !== 1 || kShape[3] !== o.dimLatentKv)
        throw new Error(`cache.k: expected latents [${b}, 1, t, ${o.dimLatentKv}], got ${fmtShape(kShape)}`);
      if (vShape.length !== 4 || vShape[0] !== b || vShape[1] !== vh || vShape[2] !== t || vShape[3] !== vd)
        throw new Error(`cache.v: expected [${b}, ${vh}, ${t}, ${vd}], got ${fmtShape(vShape)}`);
      return;
    }
    {
      if (kShape.length !== 4 || kShape[0] !== b || kShape[1] !== this.kvHeads || kShape[3] !== this.dimHead)
        throw new Error(
          `cache.k: expected [${b}, ${this.kvHeads}, t, ${this.dimHead}], got ${fmtShape(kShape)}`,
        );
      if (
        vShape.length !== 4 ||
        vShape[0] !== b ||
        vShape[1] !== this.kvHeads ||
        vShape[2] !== kShape[2] ||
        vShape[3] !== this.valueDimHead
      )
        throw new Error(
          `cache.v: expected [${b}, ${this.kvHeads}, ${kShape[2]}, ${this.valueDimHead}], got ${fmtShape(vShape)}`,
        );
    }
  }

  /** Whether a decoding step may run as the kernel `name`: plain options, no dropout, registered. */
  private decodeKernel(name: string): boolean {
    return this.plainDecode && !(this.training && this.options.dropout > 0) && backendHasKernel(name);
  }

  /** The inputs every decoding kernel takes: x and the projections' weights. */
  private decodeInputs(x: tf.Tensor): tf.NamedTensorMap {
    return { x, wq: this.toQ.weight, wk: this.toK.weight, wv: this.toV.weight, wo: this.toOut.weight };
  }

  /**
   * A call that starts or continues a cache as one XtCachedAttention kernel where the backend has it:
   * one decoding step (one new token after a cache), or with `cacheStep` any number of new positions
   * with or without a cache (a prompt's prefill); plain options, no extra inputs. Null where it does
   * not apply.
   */
  private decodeStep(
    x: tf.Tensor,
    opts: AttentionForwardOptions,
  ): { out: tf.Tensor; intermediates: AttentionIntermediates } | null {
    const cache = opts.cache;
    const n = x.shape[1]!;
    const oneStep = cache != null && n === 1;
    if (
      !this.decodeKernel(XT_CACHED_ATTENTION) ||
      !(oneStep || (opts.cacheStep && !this.training)) ||
      opts.context ||
      opts.mem ||
      opts.mask ||
      opts.attnMask ||
      opts.memMask ||
      opts.contextMask ||
      opts.relPos ||
      opts.attnBias ||
      opts.prevAttn ||
      opts.valueResidual
    )
      return null;
    const inputs: tf.NamedTensorMap = this.decodeInputs(x);
    if (cache) Object.assign(inputs, { kCache: cache.k, vCache: cache.v });
    if (opts.rotary) {
      const t = opts.rotary.tables;
      const nk = (cache ? cache.k.shape[2]! : 0) + n;
      // only what applyRotaryTables would use: full-width tables for these queries and every key
      if (
        !t ||
        opts.rotary.xposScale ||
        t.width !== this.dimHead ||
        t.queryLen !== n ||
        t.cos.shape[2] !== nk
      )
        return null;
      const bt = t.cos.shape[0]!;
      if (bt !== 1 && bt !== x.shape[0]) return null;
      Object.assign(inputs, { cos: t.cos, sin: t.sin, cosQ: t.cosQ, sinQ: t.sinQ });
    }
    const [out, k, v, values] = tf.engine().runKernel(XT_CACHED_ATTENTION, inputs, {
      scale: this.scale,
      heads: this.heads,
      causal: this.causal,
      flash: this.options.flash,
    }) as tf.Tensor[];
    const intermediates: AttentionIntermediates = {};
    if (opts.returnIntermediates) {
      intermediates.cachedKv = { k: k!, v: v! };
      intermediates.values = values!;
    }
    return { out: out!, intermediates };
  }

  /**
   * One decoding step of rows that each continue their own cache, as one XtCachedAttentionRows
   * kernel: row r of x ([b, 1, dim]) appends to entries[r] (its cache entry for this layer) and,
   * with `rotary`, is turned by rotary[r] (its full tables) at its next position. Returns the rows'
   * outputs [b, 1, dimOut] and each row's new entry, as backend ids the caller owns; null where the
   * kernel does not apply (the rows then run one by one through `forward`).
   */
  decodeRows(
    x: tf.Tensor,
    entries: KvEntry[],
    rotary: (RowRotaryTables | null)[] | null,
  ): { out: tf.Tensor; kvs: BackendKv[] } | null {
    const b = entries.length;
    if (!this.decodeKernel(XT_CACHED_ATTENTION_ROWS) || x.rank !== 3 || x.shape[0] !== b || x.shape[1] !== 1)
      return null;
    for (let r = 0; r < b; r++) {
      const e = entries[r]!;
      const [kShape, vShape] = isBackendKv(e) ? [e.kShape, e.vShape] : [e.k.shape, e.v.shape];
      this.checkCacheShapes(kShape, vShape, 1);
      if (!rotary) continue;
      const t = rotary[r];
      if (!t || t.cos.rank !== 4 || t.cos.shape[3] !== this.dimHead || t.cos.shape[2]! <= kShape[2]!)
        return null;
    }
    const kvOut: BackendKv[] = [];
    const attrs = { scale: this.scale, heads: this.heads, rows: b, entries, tables: rotary, kvOut };
    const [out] = tf
      .engine()
      .runKernel(
        XT_CACHED_ATTENTION_ROWS,
        this.decodeInputs(x),
        attrs as unknown as tf.NamedAttrMap,
      ) as tf.Tensor[];
    if (kvOut.length !== b)
      throw new Error(`${XT_CACHED_ATTENTION_ROWS}: expected ${b} new cache entries, got ${kvOut.length}`);
    return { out: out!, kvs: kvOut };
  }

  /**
   * Queries, keys and values of a call, heads split: q [b, h, i, d], k [b, kvHeads, j, d],
   * v [b, kvHeads, j, dv], with memories, latents, value residual, qk-norm and the cache applied;
   * cachedKv (with returnIntermediates) is the cache to pass next time; values this call's values
   * before the value residual mix; qStream the query input [b, n, dim].
   */
  private project(
    x: tf.Tensor,
    opts: AttentionForwardOptions,
  ): {
    q: tf.Tensor;
    k: tf.Tensor;
    v: tf.Tensor;
    values?: tf.Tensor;
    cachedKv?: AttentionKv;
    qStream: tf.Tensor;
  } {
    const o = this.options;
    const [qStream, kStream, vStream] = o.qkvReceiveDiffResiduals
      ? (tf.unstack(x) as [tf.Tensor, tf.Tensor, tf.Tensor])
      : [x, opts.context ?? x, opts.context ?? x];
    const mem = opts.mem ?? null;
    const memLen = mem ? mem.shape[1]! : 0;
    const withMem = (t: tf.Tensor): tf.Tensor => (mem ? tf.concat([mem, t], 1) : t);
    const kIn0 = withMem(kStream);
    let vIn = kStream === vStream ? kIn0 : withMem(vStream);
    let kIn = kIn0;
    const qIn = this.toLatentQ ? this.toLatentQ.forward(qStream) : qStream;

    // cached positions go after the memories and before this call's positions (time axis 2)
    const withCache = (t: tf.Tensor, cached: tf.Tensor | undefined): tf.Tensor => {
      if (!cached) return t;
      if (!memLen) return tf.concat([cached, t], 2);
      const [m, rest] = tf.split(t, [memLen, t.shape[2]! - memLen], 2) as [tf.Tensor, tf.Tensor];
      return tf.concat([m, cached, rest], 2);
    };
    // without memories or a cache, the cache returned would be a tensor used below: copy it
    const pastMem = (t: tf.Tensor): tf.Tensor =>
      memLen ? tf.slice(t, [0, 0, memLen, 0], [-1, -1, -1, -1]) : opts.cache ? t : tf.clone(t);

    let cachedKv: AttentionKv | undefined;
    let kSub: tf.Tensor | null = null;
    if (this.toLatentKv) {
      // multi-head latent attention: the cache holds the latents (and rotary key sub-heads)
      const latents = withCache(tf.expandDims(this.toLatentKv.forward(kIn), 1), opts.cache?.k);
      if (this.toRotateableK)
        kSub = withCache(splitHeads(this.toRotateableK.forward(kIn), o.latentRopeSubheads!), opts.cache?.v);
      if (opts.returnIntermediates) {
        const kept = pastMem(latents);
        cachedKv = { k: kept, v: kSub ? pastMem(kSub) : kept };
      }
      kIn = vIn = tf.squeeze(latents, [1]);
    }

    const q0 = splitHeads(this.toQ.forward(qIn), this.heads);
    let k = splitHeads(this.toK.forward(kIn), this.kvHeads - (o.latentRopeSubheads ?? 0));
    let v = splitHeads(this.toV.forward(vIn), this.kvHeads);
    if (kSub) k = tf.concat([k, kSub], 1);

    // v itself: it is never returned elsewhere (cachedKv holds a copy or the concatenation)
    const values = opts.returnIntermediates ? v : undefined;
    if (opts.valueResidual) {
      const vr = opts.valueResidual;
      if (vr.rank !== 4 || !vr.shape.every((d, ax) => d === v.shape[ax]))
        throw new Error(`valueResidual: expected ${fmtShape(v.shape)}, got ${fmtShape(vr.shape)}`);
      const mix: tf.Tensor | number = this.toValueResidualMix
        ? tf.expandDims(tf.transpose(tf.sigmoid(this.toValueResidualMix.forward(qIn)), [0, 2, 1]), -1)
        : 0.5;
      v = tf.add(vr, tf.mul(tf.sub(v, vr), mix));
    }

    let q = q0;
    if (o.qkNorm) {
      q = l2normGroups(q, o.qkNormGroups);
      k = l2normGroups(k, o.qkNormGroups);
      if (this.qkNormQScale) q = tf.mul(q, this.qkNormQScale);
      if (this.qkNormKScale) k = tf.mul(k, this.qkNormKScale);
    }

    if (!this.toLatentKv) {
      k = withCache(k, opts.cache?.k);
      v = withCache(v, opts.cache?.v);
      if (opts.returnIntermediates) cachedKv = { k: pastMem(k), v: pastMem(v) };
    }
    return { q, k, v, values, cachedKv, qStream };
  }

  /**
   * The hybrid module beside attention: out [b, h, n, d] and the module's output on x (heads split)
   * are each normed per head and averaged. mask: [b, n] bool, given to the module (non-causal).
   */
  private mixHybrid(out: tf.Tensor, x: tf.Tensor, mask: tf.Tensor | undefined): tf.Tensor {
    const hOut = this.hybrid!.forward(x, mask);
    const expected = this.heads * this.dimHead;
    if (hOut.shape[2] !== expected)
      throw new Error(
        `hybridModule: expected ${expected} output features (heads * dimHead), got ${hOut.shape[2]}`,
      );
    const [outNorm, hybridNorm] = this.hybridNorms!;
    const hybrid = hybridNorm.forward(splitHeads(hOut, this.heads));
    return tf.mul(tf.add(outNorm.forward(out), hybrid), 0.5);
  }

  /**
   * Rotary (and xpos) on q [b, h, i, d] and k [b, kvHeads, j, d], only on the last rotateNumHeads
   * heads; keys of a context turn by `contextRotary`.
   */
  private applyRotary(
    q: tf.Tensor,
    k: tf.Tensor,
    rotary: RotaryInput,
    contextRotary: RotaryInput | undefined,
    hasContext: boolean,
  ): [tf.Tensor, tf.Tensor] {
    const { freqs, xposScale } = rotary;
    const qScale = xposScale ?? 1;
    let kScale: tf.Tensor | number = xposScale ? tf.pow(xposScale, -1) : 1;
    const r = this.rotateNumHeads;
    const tables = rotary.tables;
    const rotate = (t: tf.Tensor, f: tf.Tensor, sc: tf.Tensor | number, name: string): tf.Tensor => {
      const th = t.shape[1]!;
      if (r >= th) {
        // shared cos / sin tables (prepareRotary): same numbers, fewer ops
        const fast = tables && f === freqs && sc === 1 ? applyRotaryTables(t, tables) : null;
        return fast ?? applyRotaryPosEmb(t, f, sc, name);
      }
      const [rest, rot] = tf.split(t, [th - r, r], 1) as [tf.Tensor, tf.Tensor];
      return tf.concat([rest, applyRotaryPosEmb(rot, f, sc, name)], 1);
    };
    q = rotate(q, freqs, qScale, 'rotary');
    let kFreqs = freqs;
    if (hasContext) {
      if (!contextRotary)
        throw new Error('contextRotary: expected it with rotary and context (cross-attention)');
      kFreqs = contextRotary.freqs;
      const cx = contextRotary.xposScale;
      kScale = cx ? tf.pow(cx, -1) : 1;
    }
    k = rotate(k, kFreqs, kScale, hasContext ? 'contextRotary' : 'rotary');
    return [q, k];
  }

  /**
   * The additive attention bias of a call: opts.attnBias, the relative position scheme's or the
   * data-dependent ALiBi's, padded for memory key/values. i, j: query and key counts (without them).
   */
  private attentionBias(
    x: tf.Tensor,
    opts: AttentionForwardOptions,
    i: number,
    j: number,
    numMemKv: number,
  ): tf.Tensor | null {
    let attnBias: tf.Tensor | null = opts.attnBias ?? null;
    const hasContext = opts.context != null;
    const mem = opts.mem ?? null;
    if (opts.relPos) {
      if (opts.pos) {
        if (!opts.relPos.biasFromPositions)
          throw new Error('pos: custom positions need a relPos with biasFromPositions (ALiBi)');
        attnBias = opts.relPos.biasFromPositions(opts.pos);
      } else {
        attnBias = opts.relPos.bias(i, j);
      }
      attnBias = padAxis(attnBias, -1, numMemKv, 0, 0);
    }
    if (this.dataDependentAlibi) {
      if (hasContext || mem)
        throw new Error(
          'dataDependentAlibi: expected plain self-attention (no context or mem), its bias comes from x alone',
        );
      if (!opts.cache) {
        attnBias = padAxis(this.dataDependentAlibi.forward(x), -1, numMemKv, 0, 0);
      } else if (x.shape[1] !== 1 || numMemKv > 0) {
        // the reference takes the bias of the new tokens alone, which only fits the keys for one token
        throw new Error(
          `dataDependentAlibi: with a cache, expected one new token and no memory key/values, got ${x.shape[1]} tokens and numMemKv ${numMemKv}`,
        );
      }
      // one new token with a cache: as the reference, its bias (the token's gates against themselves) is 0
    }
    return attnBias;
  }

  private forwardImpl(
    x: tf.Tensor,
    opts: AttentionForwardOptions,
  ): { out: tf.Tensor; intermediates: AttentionIntermediates } {
    const step = this.decodeStep(x, opts);
    if (step) return step;
    const o = this.options;
    const h = this.heads;
    const hasContext = opts.context != null;
    const mem = opts.mem ?? null;
    const memLen = mem ? mem.shape[1]! : 0;
    const p = this.project(x, opts);
    let { q, k, v } = p;
    const [b, n] = p.qStream.shape as [number, number, number];

    if (opts.rotary) [q, k] = this.applyRotary(q, k, opts.rotary, opts.contextRotary, hasContext);

    // the key mask, before memory key/values
    let inputMask: tf.Tensor | null = opts.contextMask ?? null;
    if (!inputMask && !hasContext) {
      inputMask = opts.mask ?? null;
      if ((inputMask || opts.memMask) && mem) {
        if (!opts.memMask) inputMask = padAxis(inputMask!, 1, memLen, 0, 1);
        else if (!inputMask) inputMask = padAxis(opts.memMask, 1, 0, n, 1);
        else inputMask = tf.concat([opts.memMask, inputMask], 1);
      }
    }

    const i = q.shape[2]!;
    const j = k.shape[2]!;
    if (inputMask && inputMask.shape[1] !== j)
      throw new Error(
        `${opts.contextMask ? 'contextMask' : 'mask'}: expected [${b}, ${j}] (one entry per key), got ${fmtShape(inputMask.shape)}`,
      );

    const numMemKv = o.numMemKv;
    if (numMemKv > 0) {
      let memK: tf.Tensor = tf.tile(tf.expandDims(this.memK!, 0), [b, 1, 1, 1]);
      const memV = tf.tile(tf.expandDims(this.memV!, 0), [b, 1, 1, 1]);
      if (o.qkNorm) {
        memK = l2normGroups(memK, 1);
        if (this.qkNormKScale) memK = tf.mul(memK, this.qkNormKScale);
      }
      k = tf.concat([memK, k], 2);
      v = tf.concat([memV, v], 2);
      if (inputMask) inputMask = padAxis(inputMask, 1, numMemKv, 0, 1);
    }

    // the combined "may attend" mask
    let keep: tf.Tensor | null = null;
    const and = (m: tf.Tensor): void => {
      keep = keep ? tf.logicalAnd(keep, m) : m;
    };
    if (inputMask) and(tf.reshape(inputMask, [b, 1, 1, inputMask.shape[1]!]));
    if (opts.attnMask) {
      let am = opts.attnMask;
      if (am.rank === 2) am = tf.reshape(am, [1, 1, am.shape[0]!, am.shape[1]!]);
      else if (am.rank === 3) am = tf.expandDims(am, 0);
      const jj = k.shape[2]!;
      const okShape =
        (am.shape[0] === 1 || am.shape[0] === b) &&
        (am.shape[1] === 1 || am.shape[1] === h) &&
        am.shape[2] === i &&
        am.shape[3] === jj;
      if (!okShape)
        throw new Error(
          `attnMask: expected [${i}, ${jj}], [${h}, ${i}, ${jj}] or [${b}|1, ${h}|1, ${i}, ${jj}], got ${fmtShape(opts.attnMask.shape)}`,
        );
      and(am);
    }
    if (o.maxAttendPast !== null) {
      const rq = tf.reshape(tf.range(j - i, j, 1, 'int32'), [i, 1]);
      const rk = tf.reshape(tf.range(0, j, 1, 'int32'), [1, j]);
      let within = tf.lessEqual(tf.sub(rq, rk), o.maxAttendPast);
      within = padAxis(within, 1, numMemKv, 0, 1);
      and(tf.reshape(within, [1, 1, i, j + numMemKv]));
    }

    const attnBias = this.attentionBias(x, opts, i, j, numMemKv);

    if (o.laser) {
      const c = o.laserSoftclampValue;
      v = tf.exp(tf.mul(tf.tanh(tf.div(v, c)), c));
    }

    const res = this.attend.forward(q, k, v, { mask: keep, attnBias, prevAttn: opts.prevAttn ?? null });
    let out = res.out;
    if (o.laser) out = tf.log(tf.maximum(out, 1e-20));
    if (this.headScaleParams) out = tf.mul(out, this.headScaleParams);
    if (this.toVHeadGate) {
      const gate = tf.sigmoid(this.toVHeadGate.forward(x)); // [b, n, h]
      out = tf.mul(out, tf.expandDims(tf.transpose(gate, [0, 2, 1]), -1));
    }
    if (this.hybrid) out = this.mixHybrid(out, x, opts.mask);
    out = mergeHeads(out);
    if (this.toVGate) {
      const gates = this.toVGate.forward(x);
      out = tf.mul(out, o.swigluValues ? tf.mul(gates, tf.sigmoid(gates)) : tf.sigmoid(gates));
    }
    out = this.toOut.forward(out);
    if (o.onAttn) out = glu(out);
    if (opts.mask) out = tf.where(tf.expandDims(opts.mask, -1), out, tf.zerosLike(out));

    const intermediates: AttentionIntermediates = {};
    if (opts.returnIntermediates) {
      if (res.preSoftmaxAttn) intermediates.preSoftmaxAttn = res.preSoftmaxAttn;
      if (res.postSoftmaxAttn) intermediates.postSoftmaxAttn = res.postSoftmaxAttn;
      if (res.qkSimilarities) intermediates.qkSimilarities = res.qkSimilarities;
      if (p.cachedKv) intermediates.cachedKv = p.cachedKv;
      if (p.values) intermediates.values = p.values;
    }
    return { out, intermediates };
  }
}

/** nn.Sequential(nn.Linear(dim, out), ...) holding the Linear at index '0'. */
class Sequential0 extends Module {
  readonly linear: Linear;
  constructor(inDim: number, outDim: number) {
    super();
    this.linear = this.registerModule('0', new Linear(inDim, outDim));
  }
}

/** `to_out` with attention-on-attention: nn.Sequential(Linear(outDim, 2 * dimOut, bias=False), GLU). */
class ToOutGlu extends Module {
  readonly linear: Linear;
  constructor(inDim: number, dimOut: number) {
    super();
    this.linear = this.registerModule('0', new Linear(inDim, dimOut * 2, { bias: false }));
  }
}
