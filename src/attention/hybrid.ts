import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { normalize } from '../nn/functional.js';
import { OptionError, fmtShape, renamingOptions } from '../utils/errors.js';
import { RULES } from '../utils/option-rules.js';
import { getRng } from '../utils/random.js';
import { padAxis } from './ops.js';

/**
 * A recurrent (or any sequence) module run beside attention, as the reference's `hybrid_module`
 * (Hymba). The interface a module must follow:
 *   forward(x: [b, n, dim], opts?: {[maskKwarg]: mask [b, n] bool}) -> {out: [b, n, heads * dimHead]}
 *   clone(): a copy with its own parameters, equal to this one's (each attention layer owns one, as
 *            the reference deep-copies the module it is given); needed only when a module itself,
 *            not a factory, is the option
 * `opts` holds the key/padding mask under the name `hybridMaskKwarg` (non-causal attention only).
 * Parameters are the module's own, under `hybrid_module.fn.` in the attention's state dict.
 */
export interface HybridModule extends Module {
  forward(x: tf.Tensor, opts?: Record<string, tf.Tensor | undefined>): { out: tf.Tensor };
  clone?(): HybridModule;
}

/** The JSON form of a hybrid module: a GRU (`torch.nn.GRU(dim, hiddenSize, batch_first=True)`). */
export interface GruSpec {
  type: 'gru';
  /** Hidden size per direction (default: heads * dimHead, halved when bidirectional). */
  hiddenSize?: number;
  numLayers?: number;
  bias?: boolean;
  bidirectional?: boolean;
}

/** `hybridModule`: a spec, a factory `(dim) => module`, or a module to copy (see `HybridModule`). */
export type HybridModuleOption = GruSpec | ((dim: number) => HybridModule) | HybridModule;

export interface GruOptions {
  inputSize: number;
  hiddenSize: number;
  numLayers?: number;
  bias?: boolean;
  bidirectional?: boolean;
}

/**
 * torch.nn.GRU(inputSize, hiddenSize, numLayers, bias, batch_first=True, bidirectional), initialised
 * uniform in +-1/sqrt(hiddenSize). Parameters (as torch): weight_ih_l{k}[_reverse] [3H, in],
 * weight_hh_l{k}[_reverse] [3H, H], bias_ih_l{k}[_reverse] [3H], bias_hh_l{k}[_reverse] [3H]; gates
 * in torch's order (reset, update, new). With a `mask` [b, n] (false = padding), a padded step leaves
 * the state as it is and outputs zeros: for right-padded rows, torch's packed-sequence result.
 */
export class GRU extends Module implements HybridModule {
  readonly options: Required<GruOptions>;
  private readonly weights: {
    ih: tf.Variable;
    hh: tf.Variable;
    bih: tf.Variable | null;
    bhh: tf.Variable | null;
  }[][] = [];

  constructor(options: GruOptions) {
    super();
    const o: Required<GruOptions> = { numLayers: 1, bias: true, bidirectional: false, ...options };
    for (const key of ['inputSize', 'hiddenSize', 'numLayers'] as const) {
      const v = o[key];
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0)
        throw OptionError.of(key, RULES.posInt.expected, v);
    }
    for (const key of ['bias', 'bidirectional'] as const)
      if (typeof o[key] !== 'boolean') throw OptionError.of(key, RULES.bool.expected, o[key]);
    this.options = o;
    const H = o.hiddenSize;
    const dirs = o.bidirectional ? 2 : 1;
    const rng = getRng();
    const k = 1 / Math.sqrt(H);
    const draw = (shape: number[]): tf.Tensor =>
      tf.tensor(
        rng.fillUniform(
          shape.reduce((a, c) => a * c, 1),
          -k,
          k,
        ),
        shape,
      );
    for (let l = 0; l < o.numLayers; l++) {
      const layer = [];
      const inSize = l === 0 ? o.inputSize : H * dirs;
      for (let d = 0; d < dirs; d++) {
        const sfx = `_l${l}${d === 1 ? '_reverse' : ''}`;
        layer.push({
          ih: this.registerParameter(`weight_ih${sfx}`, draw([3 * H, inSize])),
          hh: this.registerParameter(`weight_hh${sfx}`, draw([3 * H, H])),
          bih: o.bias ? this.registerParameter(`bias_ih${sfx}`, draw([3 * H])) : null,
          bhh: o.bias ? this.registerParameter(`bias_hh${sfx}`, draw([3 * H])) : null,
        });
      }
      this.weights.push(layer);
    }
  }

  /** Output features: hiddenSize times the number of directions. */
  get outSize(): number {
    return this.options.hiddenSize * (this.options.bidirectional ? 2 : 1);
  }

  /** x: [b, n, inputSize], mask?: [b, n] bool -> out: [b, n, outSize]. */
  forward(x: tf.Tensor, opts: Record<string, tf.Tensor | undefined> = {}): { out: tf.Tensor } {
    const o = this.options;
    if (x.rank !== 3 || x.shape[2] !== o.inputSize)
      throw new Error(`x: expected [batch, seq, ${o.inputSize}], got ${fmtShape(x.shape)}`);
    const [b, n] = x.shape as [number, number, number];
    const mask = opts.mask;
    if (mask && (mask.dtype !== 'bool' || mask.rank !== 2 || mask.shape[0] !== b || mask.shape[1] !== n))
      throw new Error(`mask: expected bool [${b}, ${n}], got ${mask.dtype} ${fmtShape(mask.shape)}`);
    return {
      out: tf.tidy(() => {
        const steps = mask ? tf.unstack(tf.expandDims(mask, -1), 1) : null;
        let h = x;
        for (const layer of this.weights) {
          const outs = layer.map((w, d) => this.direction(h, w, d === 1, steps));
          h = outs.length === 1 ? outs[0]! : tf.concat(outs, -1);
        }
        return h;
      }),
    };
  }

  /** One direction of one layer: x [b, n, in] -> [b, n, H]. steps: per position, [b, 1] bool. */
  private direction(
    x: tf.Tensor,
    w: (typeof this.weights)[number][number],
    reverse: boolean,
    steps: tf.Tensor[] | null,
  ): tf.Tensor {
    const [b, n, inSize] = x.shape as [number, number, number];
    const H = this.options.hiddenSize;
    let gi = tf.reshape(tf.matMul(tf.reshape(x, [b * n, inSize]), w.ih, false, true), [b, n, 3 * H]);
    if (w.bih) gi = tf.add(gi, w.bih);
    const gis = tf.unstack(gi, 1);
    let h: tf.Tensor = tf.zeros([b, H]);
    const outs: tf.Tensor[] = new Array<tf.Tensor>(n);
    for (let s = 0; s < n; s++) {
      const t = reverse ? n - 1 - s : s;
      let gh = tf.matMul(h, w.hh, false, true);
      if (w.bhh) gh = tf.add(gh, w.bhh);
      const [ir, iz, inn] = tf.split(gis[t]!, 3, -1) as [tf.Tensor, tf.Tensor, tf.Tensor];
      const [hr, hz, hn] = tf.split(gh, 3, -1) as [tf.Tensor, tf.Tensor, tf.Tensor];
      const r = tf.sigmoid(tf.add(ir, hr));
      const z = tf.sigmoid(tf.add(iz, hz));
      const cand = tf.tanh(tf.add(inn, tf.mul(r, hn)));
      const next = tf.add(cand, tf.mul(z, tf.sub(h, cand)));
      if (steps) {
        h = tf.where(steps[t]!, next, h);
        outs[t] = tf.where(steps[t]!, next, tf.zerosLike(next));
      } else {
        h = next;
        outs[t] = next;
      }
    }
    return tf.stack(outs, 1);
  }

  clone(): GRU {
    const copy = new GRU(this.options);
    copy.loadStateDict(this.stateDict());
    return copy;
  }
}

/**
 * Runs `fn` on the sequence folded by `axialDim` (position i goes to row i % axialDim, step
 * floor(i / axialDim)), zero-padded to a multiple, and unfolds its output: the reference's
 * FoldAxially. A mask is folded the same way (padding false). Holds `fn` as `fn`.
 */
export class FoldAxially extends Module {
  constructor(
    readonly axialDim: number,
    readonly fn: HybridModule,
    readonly maskKwarg: string | null,
  ) {
    super();
    this.registerModule('fn', fn);
  }

  /** x: [b, n, dim], mask?: [b, n] bool -> [b, n, features]. */
  forward(x: tf.Tensor, mask?: tf.Tensor): tf.Tensor {
    const kw = (m: tf.Tensor | undefined): Record<string, tf.Tensor | undefined> =>
      this.maskKwarg && m ? { [this.maskKwarg]: m } : {};
    return tf.tidy(() => {
      const a = this.axialDim;
      if (a === 1) return checkHybridOut(this.fn.forward(x, kw(mask)).out, x);
      const [b, n] = x.shape as [number, number, number];
      const m = Math.ceil(n / a);
      const fold = (t: tf.Tensor): tf.Tensor => {
        const p = padAxis(t, 1, 0, m * a - n, 0);
        const rest = t.shape.slice(2);
        const r = tf.reshape(p, [b, m, a, ...rest]);
        return tf.reshape(tf.transpose(r, [0, 2, 1, ...rest.map((_, i) => i + 3)]), [b * a, m, ...rest]);
      };
      const out = checkHybridOut(this.fn.forward(fold(x), kw(mask && fold(mask))).out, fold(x));
      const f = out.shape[2]!;
      const unfolded = tf.reshape(tf.transpose(tf.reshape(out, [b, a, m, f]), [0, 2, 1, 3]), [b, m * a, f]);
      return tf.slice(unfolded, [0, 0, 0], [-1, n, -1]);
    });
  }
}

function checkHybridOut(out: tf.Tensor, x: tf.Tensor): tf.Tensor {
  if (out.rank !== 3 || out.shape[0] !== x.shape[0] || out.shape[1] !== x.shape[1])
    throw new Error(
      `hybridModule: expected an output [${x.shape[0]}, ${x.shape[1]}, heads * dimHead], got ${fmtShape(out.shape)}`,
    );
  return out;
}

/** normalize(x) * sqrt(dim) * (gamma + 1), gamma [heads, 1, dim] (zeros): the reference's MultiheadRMSNorm. */
export class MultiheadRMSNorm extends Module {
  readonly gamma: tf.Variable;
  constructor(
    readonly dim: number,
    heads: number,
  ) {
    super();
    this.gamma = this.registerParameter('gamma', tf.zeros([heads, 1, dim]));
  }

  /** x: [b, heads, n, dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => tf.mul(tf.mul(normalize(x), this.dim ** 0.5), tf.add(this.gamma, 1)));
  }
}

const GRU_SPEC_KEYS: Record<string, string> = {
  type: 'type',
  hiddenSize: 'hiddenSize',
  hidden_size: 'hiddenSize',
  numLayers: 'numLayers',
  num_layers: 'numLayers',
  bias: 'bias',
  bidirectional: 'bidirectional',
};

/**
 * The hybrid module of one attention layer: a new GRU for a spec, the factory's module, or a copy of
 * the given module. dim: the attention's input size; outDim: heads * dimHead.
 */
export function buildHybridModule(option: unknown, dim: number, outDim: number): HybridModule {
  const expected = RULES.hybridModule.expected;
  if (typeof option === 'function')
    return checkModule((option as (d: number) => unknown)(dim), expected, false);
  if (option instanceof Module)
    return checkModule(checkModule(option, expected, true).clone!(), expected, false);
  if (typeof option !== 'object' || option === null || Array.isArray(option))
    throw OptionError.of('hybridModule', expected, option);
  const spec: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(option)) {
    const name = GRU_SPEC_KEYS[k];
    if (!name) throw new OptionError(`hybridModule.${k}`, 'an option of a GRU spec', 'an unknown option');
    spec[name] = v;
  }
  if (spec.type !== 'gru') throw OptionError.of('hybridModule.type', "'gru'", spec.type);
  const bidirectional = spec.bidirectional ?? false;
  const dirs = bidirectional === true ? 2 : 1;
  if (spec.hiddenSize === undefined && outDim % dirs !== 0)
    throw new OptionError('hybridModule.hiddenSize', `a value (heads * dimHead ${outDim} is odd)`, 'none');
  return renamingOptions(
    (e) => e.in('hybridModule'),
    () =>
      new GRU({
        inputSize: dim,
        hiddenSize: (spec.hiddenSize ?? outDim / dirs) as number,
        numLayers: (spec.numLayers ?? 1) as number,
        bias: (spec.bias ?? true) as boolean,
        bidirectional: bidirectional as boolean,
      }),
  );
}

function checkModule(m: unknown, expected: string, needClone: boolean): HybridModule {
  const ok =
    m instanceof Module &&
    typeof (m as unknown as Partial<HybridModule>).forward === 'function' &&
    (!needClone || typeof (m as unknown as Partial<HybridModule>).clone === 'function');
  if (!ok) {
    const got =
      m instanceof Module
        ? `a ${m.constructor.name} without ${typeof (m as { forward?: unknown }).forward === 'function' ? 'clone()' : 'forward()'}`
        : String(m);
    throw new OptionError('hybridModule', expected, got);
  }
  return m as HybridModule;
}
