/**
 * AdamW (decoupled weight decay, Loshchilov & Hutter) over named variables, with the update order
 * of PyTorch's `torch.optim.AdamW`, plus gradient clipping by global norm.
 */
import * as tf from '@tensorflow/tfjs-core';
import { backendHasKernel } from '../nn/fused.js';

/**
 * A kernel a backend may register to run the whole update as one step:
 *   XtAdamW  inputs {p0, g0, m0, v0, p1, ...}: each parameter with its gradient and moments
 *            attrs {decay: 0|1 per parameter, beta1, beta2, eps, stepSize, sqrtBc2, decayFactor}
 *            outputs [p0', m0', v0', p1', ...], each step rounded to float32 as the ops of `apply`:
 *            m' = m beta1 + g (1 - beta1); v' = v beta2 + g^2 (1 - beta2);
 *            p' = (decay ? p decayFactor : p) - m' / (sqrt(v') / sqrtBc2 + eps) stepSize
 */
export const XT_ADAMW = 'XtAdamW';

export interface AdamWOptions {
  learningRate: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Which parameters get weight decay; default: `defaultDecayFilter` (no norms, biases, embeddings). */
  decayFilter: (name: string, param: tf.Variable) => boolean;
}

/**
 * Default weight-decay rule: decay matrices (rank >= 2) except embeddings; never decay biases,
 * norm gains/scales or other vectors and scalars.
 */
export function defaultDecayFilter(name: string, param: tf.Variable): boolean {
  if (param.rank < 2) return false;
  const parts = name.toLowerCase().split('.');
  if (parts.some((p) => p.includes('emb') || p.includes('norm'))) return false;
  return true;
}

export const adamWDefaults: Omit<AdamWOptions, 'decayFilter'> = {
  learningRate: 1e-3,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
};

interface Slot {
  m: tf.Variable;
  v: tf.Variable;
}

/** AdamW over `params` (name -> variable). Keeps first/second moments per parameter. */
export class AdamW {
  readonly options: AdamWOptions;
  /** Number of updates applied (the bias-correction step). */
  stepCount = 0;
  private readonly slots = new Map<string, Slot>();
  private readonly decay = new Map<string, boolean>();

  constructor(
    readonly params: [string, tf.Variable][],
    options: Partial<AdamWOptions> = {},
  ) {
    this.options = { ...adamWDefaults, decayFilter: defaultDecayFilter, ...options };
    const o = this.options;
    if (!(o.learningRate >= 0))
      throw new Error(`learningRate: expected a non-negative number, got ${o.learningRate}`);
    if (!(o.beta1 >= 0 && o.beta1 < 1)) throw new Error(`beta1: expected a number in [0, 1), got ${o.beta1}`);
    if (!(o.beta2 >= 0 && o.beta2 < 1)) throw new Error(`beta2: expected a number in [0, 1), got ${o.beta2}`);
    if (!(o.eps > 0)) throw new Error(`eps: expected a positive number, got ${o.eps}`);
    if (!(o.weightDecay >= 0))
      throw new Error(`weightDecay: expected a non-negative number, got ${o.weightDecay}`);
    for (const [name, p] of params) this.decay.set(name, o.decayFilter(name, p));
  }

  /** Whether `name` gets weight decay. */
  decays(name: string): boolean {
    return this.decay.get(name) ?? false;
  }

  private slot(name: string, p: tf.Variable): Slot {
    let s = this.slots.get(name);
    if (!s) {
      const zeros = tf.zerosLike(p);
      s = { m: tf.variable(zeros, false), v: tf.variable(zeros, false) };
      zeros.dispose();
      this.slots.set(name, s);
    }
    return s;
  }

  /**
   * Applies one update with `grads` (name -> gradient, same shape as the parameter). Parameters with
   * no gradient are left untouched (their moments too). `learningRate` overrides the option.
   */
  apply(grads: Record<string, tf.Tensor>, learningRate = this.options.learningRate): void {
    const { beta1, beta2, eps, weightDecay } = this.options;
    this.stepCount++;
    const bc1 = 1 - beta1 ** this.stepCount;
    const bc2 = 1 - beta2 ** this.stepCount;
    const stepSize = learningRate / bc1;
    const sqrtBc2 = Math.sqrt(bc2);
    if (backendHasKernel(XT_ADAMW)) {
      this.applyFused(grads, { stepSize, sqrtBc2, decayFactor: 1 - learningRate * weightDecay });
      return;
    }
    for (const [name, p] of this.params) {
      const g = grads[name];
      if (!g) continue;
      const s = this.slot(name, p);
      tf.tidy(() => {
        const m = tf.add(tf.mul(s.m, beta1), tf.mul(g, 1 - beta1));
        const v = tf.add(tf.mul(s.v, beta2), tf.mul(tf.square(g), 1 - beta2));
        let base: tf.Tensor = p;
        if (weightDecay > 0 && this.decays(name)) base = tf.mul(p, 1 - learningRate * weightDecay);
        const denom = tf.add(tf.div(tf.sqrt(v), sqrtBc2), eps);
        const next = tf.sub(base, tf.mul(tf.div(m, denom), stepSize));
        s.m.assign(m);
        s.v.assign(v);
        p.assign(next);
      });
    }
  }

  /** `apply` as one XtAdamW kernel call over every parameter that has a gradient. */
  private applyFused(
    grads: Record<string, tf.Tensor>,
    step: { stepSize: number; sqrtBc2: number; decayFactor: number },
  ): void {
    const { beta1, beta2, eps, weightDecay } = this.options;
    const inputs: tf.NamedTensorMap = {};
    const decay: number[] = [];
    const updated: [tf.Variable, Slot][] = [];
    for (const [name, p] of this.params) {
      const g = grads[name];
      if (!g) continue;
      if (!tf.util.arraysEqual(g.shape, p.shape))
        throw new Error(`grads.${name}: expected shape [${p.shape}], got [${g.shape}]`);
      const s = this.slot(name, p);
      const k = updated.length;
      inputs[`p${k}`] = p;
      inputs[`g${k}`] = g;
      inputs[`m${k}`] = s.m;
      inputs[`v${k}`] = s.v;
      decay.push(weightDecay > 0 && this.decays(name) ? 1 : 0);
      updated.push([p, s]);
    }
    if (updated.length === 0) return;
    const out = tf.engine().runKernel(XT_ADAMW, inputs, {
      decay,
      beta1,
      beta2,
      eps,
      ...step,
    } as unknown as tf.NamedAttrMap) as tf.Tensor[];
    updated.forEach(([p, s], k) => {
      p.assign(out[3 * k]!);
      s.m.assign(out[3 * k + 1]!);
      s.v.assign(out[3 * k + 2]!);
    });
    tf.dispose(out);
  }

  /** Moments by name (`m.<param>`, `v.<param>`): the module's own tensors, do not dispose. */
  stateTensors(): Record<string, tf.Tensor> {
    const out: Record<string, tf.Tensor> = {};
    for (const [name, s] of this.slots) {
      out[`m.${name}`] = s.m;
      out[`v.${name}`] = s.v;
    }
    return out;
  }

  /** Restores moments saved by `stateTensors` (copies; the caller keeps `state`). */
  loadStateTensors(state: Record<string, tf.Tensor>, stepCount: number): void {
    const byName = new Map(this.params);
    for (const key of Object.keys(state)) {
      const [kind, ...rest] = key.split('.');
      const name = rest.join('.');
      if ((kind !== 'm' && kind !== 'v') || !byName.has(name)) {
        throw new Error(`optimizer state: unexpected entry "${key}"`);
      }
    }
    for (const [name, p] of this.params) {
      const m = state[`m.${name}`];
      const v = state[`v.${name}`];
      if (!m && !v) continue;
      if (!m || !v) throw new Error(`optimizer state: "${name}" needs both m and v entries`);
      for (const t of [m, v]) {
        if (t.shape.join() !== p.shape.join()) {
          throw new Error(`optimizer state: "${name}" expected shape [${p.shape}], got [${t.shape}]`);
        }
      }
      const s = this.slot(name, p);
      s.m.assign(m);
      s.v.assign(v);
    }
    this.stepCount = stepCount;
  }

  dispose(): void {
    for (const s of this.slots.values()) {
      s.m.dispose();
      s.v.dispose();
    }
    this.slots.clear();
  }
}

/** sqrt of the sum of squares of every gradient (a JS number). */
export function globalNorm(grads: tf.Tensor[]): number {
  if (!grads.length) return 0;
  return tf.tidy(() => tf.sqrt(tf.addN(grads.map((g) => tf.sum(tf.square(g))))).dataSync()[0]!);
}

/**
 * Scales gradients so their global norm is at most `maxNorm` (as torch's clip_grad_norm_: factor
 * `maxNorm / (norm + 1e-6)` when below 1). Returns the norm before clipping and the new gradients
 * (the inputs are disposed when replaced).
 */
export function clipByGlobalNorm(
  grads: Record<string, tf.Tensor>,
  maxNorm: number,
): { norm: number; grads: Record<string, tf.Tensor> } {
  const norm = globalNorm(Object.values(grads));
  const coef = maxNorm / (norm + 1e-6);
  if (!(coef < 1)) return { norm, grads };
  const out: Record<string, tf.Tensor> = {};
  for (const [k, g] of Object.entries(grads)) {
    out[k] = tf.mul(g, coef);
    g.dispose();
  }
  return { norm, grads: out };
}
