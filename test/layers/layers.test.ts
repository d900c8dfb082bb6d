import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { AttentionLayers, Decoder, Encoder, PrefixDecoder } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { Rng, manualSeed } from '../../src/utils/random.js';

const small = { dim: 16, depth: 2, heads: 2, attnDimHead: 8 };

function ids(b: number, n: number, vocab: number, seed = 1): tf.Tensor {
  const r = new Rng(seed);
  return tf.tensor2d(
    Int32Array.from({ length: b * n }, () => r.int(0, vocab)),
    [b, n],
    'int32',
  );
}

function maxDiff(a: tf.Tensor, b: tf.Tensor): number {
  return tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]!);
}

/** An Rng whose uniform draws are fixed (to force layer dropout decisions). */
class FixedRng extends Rng {
  constructor(private readonly value: number) {
    super(0);
  }
  override random(): number {
    return this.value;
  }
}

describe('AttentionLayers structure', () => {
  it('names parameters as the reference state_dict', () => {
    manualSeed(0);
    const m = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: new Decoder(small) });
    const names = m.namedParameters().map(([k]) => k);
    expect(names).toContain('token_emb.emb.weight');
    expect(names).toContain('pos_emb.emb.weight');
    expect(names).toContain('attn_layers.layers.0.0.0.gamma');
    expect(names).toContain('attn_layers.layers.0.1.to_q.weight');
    expect(names).toContain('attn_layers.layers.1.1.ff.0.0.weight');
    expect(names).toContain('attn_layers.layers.1.1.ff.2.bias');
    expect(names).toContain('attn_layers.final_norm.gamma');
    expect(names).toContain('to_logits.weight');
    m.dispose();
  });

  it('initialises deterministically from the seed', () => {
    manualSeed(7);
    const a = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: new Decoder(small) });
    manualSeed(7);
    const b = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: new Decoder(small) });
    manualSeed(8);
    const c = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: new Decoder(small) });
    const pa = a.stateDict();
    const pb = b.stateDict();
    const pc = c.stateDict();
    for (const k of Object.keys(pa)) expect(maxDiff(pa[k]!, pb[k]!)).toBe(0);
    expect(maxDiff(pa['to_logits.weight']!, pc['to_logits.weight']!)).toBeGreaterThan(0);
    [a, b, c].forEach((m) => m.dispose());
  });

  it('weight tying reuses one block for every depth step', () => {
    manualSeed(0);
    const tied = new Encoder({ ...small, depth: 3, weightTieLayers: true });
    expect(tied.layers.length).toBe(2);
    expect(tied.layersExecuteOrder).toEqual([0, 1, 0, 1, 0, 1]);
    tied.dispose();
  });

  it('macaron and sandwichCoef lay layers out as the reference', () => {
    const mac = new Encoder({ ...small, macaron: true });
    expect(mac.layerTypes).toEqual(['f', 'a', 'f', 'f', 'a', 'f']);
    const sw = new Encoder({ ...small, depth: 4, sandwichCoef: 2 });
    expect(sw.layerTypes).toEqual(['a', 'a', 'a', 'f', 'a', 'f', 'f', 'f']);
    mac.dispose();
    sw.dispose();
  });
});

describe('U-Net skips and input reinjection', () => {
  function copyInto(dst: AttentionLayers, src: AttentionLayers) {
    const sd = src.stateDict();
    const own = dst.stateDict();
    const subset: Record<string, tf.Tensor> = {};
    for (const k of Object.keys(sd)) if (k in own) subset[k] = sd[k]!;
    dst.loadStateDict(subset, { strict: false });
  }

  it('latter-half blocks combine a mirrored earlier input, named skip_combines.{i}.combine', () => {
    manualSeed(20);
    const plain = new Encoder({ ...small, depth: 4 }).eval();
    const unet = new Encoder({ ...small, depth: 4, unetSkips: true }).eval();
    expect(unet.skipFrom).toEqual([null, null, null, null, 2, null, 0, null]);
    const names = unet.namedParameters().map(([k, v]) => `${k}:${v.shape}`);
    expect(names).toContain('skip_combines.4.combine.weight:16,32');
    expect(names).toContain('skip_combines.6.combine.weight:16,32');
    copyInto(unet, plain);
    const x = tf.randomNormal([1, 5, 16], 0, 1, 'float32', 21);
    const base = plain.forward(x).out;
    // combine = [0 | I]: keeps the stream, so the output is the plain encoder's
    for (const [k, v] of unet.namedParameters())
      if (k.startsWith('skip_combines')) v.assign(tf.concat([tf.zeros([16, 16]), tf.eye(16)], 1));
    const same = unet.forward(x).out;
    expect(maxDiff(same, base)).toBeLessThan(1e-5);
    // combine = [I | 0]: the stream is replaced by the skipped input, the output changes
    for (const [k, v] of unet.namedParameters())
      if (k.startsWith('skip_combines')) v.assign(tf.concat([tf.eye(16), tf.zeros([16, 16])], 1));
    const other = unet.forward(x).out;
    expect(maxDiff(other, base)).toBeGreaterThan(1e-3);
    tf.dispose([x, base, same, other]);
    plain.dispose();
    unet.dispose();
  });

  it('reinjects a projection of the input into every branch', () => {
    manualSeed(22);
    const plain = new Decoder(small).eval();
    const re = new Decoder({ ...small, reinjectInput: true, learnedReinjectInputGate: true }).eval();
    expect(re.namedParameters().map(([k]) => k)).toEqual(
      expect.arrayContaining(['reinject_input_proj.weight', 'learned_reinject_input_gate.weight']),
    );
    copyInto(re, plain);
    const x = tf.randomNormal([1, 4, 16], 0, 1, 'float32', 23);
    const base = plain.forward(x).out;
    const changed = re.forward(x).out;
    expect(maxDiff(changed, base)).toBeGreaterThan(1e-3);
    re.reinjectInputProj!.weight.assign(tf.zeros([16, 16]));
    const same = re.forward(x).out;
    expect(maxDiff(same, base)).toBeLessThan(1e-6);
    expect(() => new Decoder({ ...small, learnedReinjectInputGate: true })).toThrow(
      /^learnedReinjectInputGate:/,
    );
    tf.dispose([x, base, changed, same]);
    plain.dispose();
    re.dispose();
  });
});

describe('KV cache', () => {
  it('cached incremental decoding gives the full-sequence logits', () => {
    manualSeed(1);
    const m = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 16,
      attnLayers: new Decoder({ ...small, rotaryPosEmb: true }),
    }).eval();
    const x = ids(2, 9, 20, 3);
    const full = m.forward(x);
    const before = tf.memory().numTensors;
    const prefix = tf.slice(x, [0, 0], [2, 6]);
    let st = m.forwardWithState(prefix, { returnCache: true });
    expect(st.cache!.seqLen).toBe(6);
    for (let t = 7; t <= 9; t++) {
      const seq = tf.slice(x, [0, 0], [2, t]);
      const next = m.forwardWithState(seq, { cache: st.cache });
      expect(next.logits.shape).toEqual([2, 1, 20]);
      const expected = tf.slice(full, [0, t - 1, 0], [2, 1, 20]);
      expect(maxDiff(next.logits, expected)).toBeLessThan(1e-4);
      expected.dispose();
      seq.dispose();
      st.cache!.dispose();
      tf.dispose([st.logits, st.embeddings]);
      st = next;
    }
    expect(st.cache!.seqLen).toBe(9);
    expect(st.cache!.selfAttn).toEqual([true, true]);
    const trimmed = st.cache!.trimmed(4);
    expect(trimmed.seqLen).toBe(4);
    expect(trimmed.kvs[0]!.k.shape[2]).toBe(4);
    trimmed.dispose();
    st.cache!.dispose();
    expect(st.cache!.isDisposed).toBe(true);
    expect(() => m.forwardWithState(x, { cache: st.cache })).toThrow(/^cache:/);
    tf.dispose([st.logits, st.embeddings, prefix]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([full, x]);
    m.dispose();
  });
});

describe('KV cache matches full recomputation for every positional scheme', () => {
  const variants: [string, Record<string, unknown>, Record<string, unknown>][] = [
    ['absolute positions', {}, {}],
    ['T5 relative bias', { relPosBias: true }, {}],
    ['ALiBi', { alibiPosBias: true }, {}],
    ['dynamic bias', { dynamicPosBias: true }, {}],
    ['xpos', { rotaryXpos: true }, {}],
    ['memory kv + grouped heads + qk norm', { attnNumMemKv: 2, attnKvHeads: 1, attnQkNorm: true }, {}],
    ['no absolute positions', {}, { useAbsPosEmb: false }],
  ];
  for (const [name, layerOpts, wrapOpts] of variants) {
    it(name, () => {
      manualSeed(30);
      const m = new TransformerWrapper({
        numTokens: 20,
        maxSeqLen: 16,
        ...wrapOpts,
        attnLayers: new Decoder({ ...small, ...layerOpts }),
      }).eval();
      const x = ids(2, 7, 20, 31);
      const full = m.forward(x);
      let st = m.forwardWithState(tf.slice(x, [0, 0], [2, 4]), { returnCache: true });
      for (let t = 5; t <= 7; t++) {
        const seq = tf.slice(x, [0, 0], [2, t]);
        const next = m.forwardWithState(seq, { cache: st.cache });
        const expected = tf.slice(full, [0, t - 1, 0], [2, 1, 20]);
        expect(maxDiff(next.logits, expected)).toBeLessThan(1e-4);
        tf.dispose([expected, seq, st.logits, st.embeddings]);
        st.cache!.dispose();
        st = next;
      }
      st.cache!.dispose();
      tf.dispose([st.logits, st.embeddings, full, x]);
      m.dispose();
    });
  }
});

describe('KV cache with cross-attention', () => {
  it('cross-attention keys/values are cached from the first call', () => {
    manualSeed(33);
    const m = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 16,
      attnLayers: new Decoder({ ...small, crossAttend: true, rotaryPosEmb: true }),
    }).eval();
    const x = ids(2, 6, 20, 34);
    const context = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 35);
    const contextMask = tf.tensor2d(
      [
        [true, true, true, true, true],
        [true, true, false, false, false],
      ],
      [2, 5],
      'bool',
    );
    const full = m.forward(x, { context, contextMask });
    let st = m.forwardWithState(tf.slice(x, [0, 0], [2, 4]), { context, contextMask, returnCache: true });
    expect(st.cache!.selfAttn).toEqual([true, false, true, false]);
    for (let t = 5; t <= 6; t++) {
      const seq = tf.slice(x, [0, 0], [2, t]);
      const next = m.forwardWithState(seq, { context, contextMask, cache: st.cache });
      const expected = tf.slice(full, [0, t - 1, 0], [2, 1, 20]);
      expect(maxDiff(next.logits, expected)).toBeLessThan(1e-4);
      tf.dispose([expected, seq, st.logits, st.embeddings]);
      st.cache!.dispose();
      st = next;
    }
    st.cache!.dispose();
    tf.dispose([st.logits, st.embeddings, full, x, context, contextMask]);
    m.dispose();
  });
});

describe('models that cannot use a KV cache say so', () => {
  it('token shifting and memory tokens turn caching off (recompute instead)', () => {
    manualSeed(32);
    const shifted = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 16,
      attnLayers: new Decoder({ ...small, shiftTokens: 1 }),
    });
    const mem = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 16,
      numMemoryTokens: 2,
      attnLayers: new Decoder(small),
    });
    const plain = new TransformerWrapper({ numTokens: 20, maxSeqLen: 16, attnLayers: new Decoder(small) });
    expect(shifted.canCacheKv).toBe(false);
    expect(mem.canCacheKv).toBe(false);
    expect(plain.canCacheKv).toBe(true);
    const x = ids(1, 3, 20);
    const st = plain.forwardWithState(x, { returnCache: true });
    expect(() => shifted.forwardWithState(x, { cache: st.cache })).toThrow(/^cache:/);
    st.cache!.dispose();
    tf.dispose([st.logits, st.embeddings, x]);
    [shifted, mem, plain].forEach((m) => m.dispose());
  });
});

describe('dropouts', () => {
  it('embedding, feedforward and attention dropout act in training only', () => {
    manualSeed(2);
    const m = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 8,
      embDropout: 0.3,
      attnLayers: new Decoder({ ...small, ffDropout: 0.3, attnDropout: 0.3 }),
    });
    const x = ids(2, 8, 20);
    m.train();
    const a = m.forward(x);
    const b = m.forward(x);
    expect(maxDiff(a, b)).toBeGreaterThan(1e-3);
    m.eval();
    const c = m.forward(x);
    const d = m.forward(x);
    expect(maxDiff(c, d)).toBe(0);
    tf.dispose([a, b, c, d, x]);
    m.dispose();
  });

  it('layer dropout skips whole layers in training, never in eval', () => {
    manualSeed(3);
    const layers = new Decoder({ ...small, layerDropout: 0.5 });
    const x = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 4);
    layers.eval();
    const evalOut = layers.forward(x, { rng: new FixedRng(0) }).out;
    layers.train();
    // every draw below p: every layer is skipped, only the final norm remains
    const skipped = layers.forward(x, { rng: new FixedRng(0.1) }).out;
    const normed = layers.finalNorm!.forward(x);
    expect(maxDiff(skipped, normed)).toBeLessThan(1e-6);
    // every draw above p: nothing skipped, same as eval (no other dropout)
    const kept = layers.forward(x, { rng: new FixedRng(0.9) }).out;
    expect(maxDiff(kept, evalOut)).toBeLessThan(1e-6);
    // a seeded generator gives reproducible choices
    const r1 = layers.forward(x, { rng: new Rng(11) }).out;
    const r2 = layers.forward(x, { rng: new Rng(11) }).out;
    expect(maxDiff(r1, r2)).toBe(0);
    tf.dispose([evalOut, skipped, normed, kept, r1, r2, x]);
    layers.dispose();
  });

  it('cross-attention token dropout drops context tokens in training only', () => {
    manualSeed(40);
    const layers = new AttentionLayers({ ...small, crossAttend: true, crossAttnTokensDropout: 0.5 });
    const x = tf.randomNormal([2, 4, 16], 0, 1, 'float32', 41);
    const context = tf.randomNormal([2, 8, 16], 0, 1, 'float32', 42);
    const contextMask = tf.tensor2d(
      [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0, 0, 0],
      ],
      [2, 8],
      'bool',
    );
    layers.eval();
    const e1 = layers.forward(x, { context, contextMask }).out;
    const e2 = layers.forward(x, { context, contextMask }).out;
    expect(maxDiff(e1, e2)).toBe(0);
    layers.train();
    const t1 = layers.forward(x, { context, contextMask, rng: new Rng(1) }).out;
    const t2 = layers.forward(x, { context, contextMask, rng: new Rng(2) }).out;
    const t1again = layers.forward(x, { context, contextMask, rng: new Rng(1) }).out;
    expect(maxDiff(t1, t2)).toBeGreaterThan(1e-4);
    expect(maxDiff(t1, t1again)).toBe(0);
    expect(maxDiff(t1, e1)).toBeGreaterThan(1e-4);
    tf.dispose([x, context, contextMask, e1, e2, t1, t2, t1again]);
    layers.dispose();
  });

  it('layer dropout per layer: a layer with p 0 always runs', () => {
    manualSeed(3);
    const layers = new Decoder({ ...small, depth: 1, layerDropout: [0.5, 0] }).train();
    const x = tf.randomNormal([1, 4, 16], 0, 1, 'float32', 5);
    const out = layers.forward(x, { rng: new FixedRng(0.1), returnHiddens: true });
    // the attention layer was skipped: the stream entering the feedforward is x itself
    expect(out.layerHiddens.length).toBe(2);
    expect(maxDiff(out.layerHiddens[0]!, x)).toBe(0);
    tf.dispose([out.out, ...out.layerHiddens, x]);
    layers.dispose();
  });
});

describe('resiDual', () => {
  it('is a post-LN stream plus the final-normed sum of scaled branch outputs', () => {
    manualSeed(4);
    const s = 0.5;
    const layers = new Encoder({
      dim: 16,
      depth: 1,
      heads: 2,
      attnDimHead: 8,
      resiDual: true,
      resiDualScale: s,
    });
    layers.eval();
    const names = layers.namedParameters().map(([k]) => k);
    expect(names).not.toContain('layers.0.0.0.gamma');
    expect(names).toContain('layers.0.0.2.gamma');
    expect(names).toContain('layers.1.0.2.gamma');
    expect(names).toContain('final_norm.gamma');
    // make the norms non-trivial
    for (const [, v] of layers.namedParameters())
      if (v.shape.length === 1 && v.name.includes('gamma'))
        v.assign(tf.randomNormal(v.shape, 0, 0.3, 'float32', 9));
    const x = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 6);
    const out = layers.forward(x).out;
    // the same computation written out from the weights: attention and feedforward by hand,
    // LayerNorm (unit offset: gain gamma + 1) by its formula
    const w = Object.fromEntries(layers.namedParameters()) as Record<string, tf.Tensor>;
    const expected = tf.tidy(() => {
      const ln = (t: tf.Tensor, gamma: tf.Tensor): tf.Tensor => {
        const mean = tf.mean(t, -1, true);
        const variance = tf.mean(tf.square(tf.sub(t, mean)), -1, true);
        return tf.mul(tf.div(tf.sub(t, mean), tf.sqrt(tf.add(variance, 1e-5))), tf.add(gamma, 1));
      };
      const lin = (t: tf.Tensor, name: string, bias = false): tf.Tensor => {
        const y = tf.matMul(tf.reshape(t, [-1, t.shape[2]!]), w[`${name}.weight`]!, false, true);
        return tf.reshape(bias ? tf.add(y, w[`${name}.bias`]!) : y, [2, 5, -1]);
      };
      const heads = (t: tf.Tensor): tf.Tensor => tf.transpose(tf.reshape(t, [2, 5, 2, 8]), [0, 2, 1, 3]);
      const attn = (t: tf.Tensor): tf.Tensor => {
        const [q, k, v] = ['to_q', 'to_k', 'to_v'].map((n) => heads(lin(t, `layers.0.1.${n}`)));
        const p = tf.softmax(tf.mul(tf.matMul(q!, k!, false, true), 8 ** -0.5));
        const o = tf.reshape(tf.transpose(tf.matMul(p, v!), [0, 2, 1, 3]), [2, 5, 16]);
        return lin(o, 'layers.0.1.to_out');
      };
      const ff = (t: tf.Tensor): tf.Tensor => {
        const h = lin(t, 'layers.1.1.ff.0.0', true);
        const g = tf.mul(tf.mul(h, 0.5), tf.add(1, tf.erf(tf.mul(h, Math.SQRT1_2))));
        return lin(g, 'layers.1.1.ff.2', true);
      };
      const a = attn(x);
      const x1 = ln(tf.add(x, a), w['layers.0.0.2.gamma']!);
      const f = ff(x1);
      const x2 = ln(tf.add(x1, f), w['layers.1.0.2.gamma']!);
      const outer = tf.mul(tf.add(tf.add(x, a), f), s);
      return tf.add(x2, ln(outer, w['final_norm.gamma']!));
    });
    expect(maxDiff(out, expected)).toBeLessThan(1e-5);
    tf.dispose([out, expected, x]);
    layers.dispose();
  });

  it('keeps the pre-LN stream un-normalised so its scale grows with depth', () => {
    manualSeed(5);
    const deep = new Encoder({ dim: 16, depth: 4, heads: 2, attnDimHead: 8, resiDual: true }).eval();
    const x = tf.randomNormal([1, 6, 16], 0, 1, 'float32', 7);
    const out = deep.forward(x, { returnHiddens: true });
    // every layer's stream is post-normalised (LayerNorm with unit gamma: mean 0, unit variance)
    for (const h of out.layerHiddens.slice(1)) {
      const { mean, variance } = tf.moments(h, -1);
      expect(tf.max(tf.abs(mean)).dataSync()[0]).toBeLessThan(1e-4);
      expect(Math.abs(tf.mean(variance).dataSync()[0]! - 1)).toBeLessThan(1e-2);
      tf.dispose([mean, variance]);
    }
    tf.dispose([out.out, ...out.layerHiddens, x]);
    deep.dispose();
  });

  it('the output does not depend on resiDualScale (the final norm is scale invariant)', () => {
    const build = (scale: number): Decoder => {
      manualSeed(12);
      return new Decoder({ ...small, depth: 3, resiDual: true, resiDualScale: scale }).eval();
    };
    const [a, b, c] = [build(1), build(0.1), build(0.5)];
    const x = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 13);
    const [oa, ob, oc] = [a, b, c].map((m) => m.forward(x).out) as [tf.Tensor, tf.Tensor, tf.Tensor];
    // LayerNorm(s u) = (u - mean) / sqrt(var + eps / s^2): the only trace of the scale is eps / s^2
    // (eps 1e-5). So the outputs differ little (measured: 2e-3 at s = 0.1), and by an amount that
    // grows as (1/s^2 - 1): s = 0.5 moves them (4 - 1) / (100 - 1) as far as s = 0.1 does. A scale
    // applied anywhere else (to the inner stream, or twice) would break both.
    const far = maxDiff(oa, ob);
    const near = maxDiff(oa, oc);
    expect(far).toBeLessThan(5e-3);
    expect(near / far).toBeGreaterThan((3 / 99) * 0.5);
    expect(near / far).toBeLessThan((3 / 99) * 2);
    tf.dispose([x, oa, ob, oc]);
    [a, b, c].forEach((m) => m.dispose());
  });

  it('rejects a scale outside (0, 1]', () => {
    expect(() => new Encoder({ ...small, resiDual: true, resiDualScale: 0 })).toThrow(/resiDualScale/);
  });
});

describe('PrefixDecoder', () => {
  it('prefix positions see the whole prefix, later ones are causal', () => {
    manualSeed(6);
    const layers = new PrefixDecoder({ ...small, depth: 1 }).eval();
    const x = tf.randomNormal([1, 6, 16], 0, 1, 'float32', 8);
    const a = layers.forward(x, { prefixAttnLen: 3 }).out;
    // change position 2 (inside the prefix): position 0 output changes
    const x2 = tf.tidy(() =>
      tf.concat(
        [
          tf.slice(x, [0, 0, 0], [1, 2, 16]),
          tf.onesLike(tf.slice(x, [0, 2, 0], [1, 1, 16])),
          tf.slice(x, [0, 3, 0], [1, 3, 16]),
        ],
        1,
      ),
    );
    const b = layers.forward(x2, { prefixAttnLen: 3 }).out;
    const d0 = maxDiff(tf.slice(a, [0, 0, 0], [1, 1, 16]), tf.slice(b, [0, 0, 0], [1, 1, 16]));
    expect(d0).toBeGreaterThan(1e-4);
    // change position 5 (after the prefix): positions 0..4 unchanged
    const x3 = tf.tidy(() =>
      tf.concat([tf.slice(x, [0, 0, 0], [1, 5, 16]), tf.onesLike(tf.slice(x, [0, 5, 0], [1, 1, 16]))], 1),
    );
    const c = layers.forward(x3, { prefixAttnLen: 3 }).out;
    expect(maxDiff(tf.slice(a, [0, 0, 0], [1, 5, 16]), tf.slice(c, [0, 0, 0], [1, 5, 16]))).toBeLessThan(
      1e-6,
    );
    tf.dispose([a, b, c, x, x2, x3]);
    layers.dispose();
  });
});

describe('bad inputs and options', () => {
  manualSeed(0);
  const m = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: new Decoder(small) });

  it('x must be int32 [b, n] with ids in range and n <= maxSeqLen', () => {
    const f = tf.zeros([2, 4]);
    expect(() => m.forward(f)).toThrow(/^x: expected dtype int32/);
    const r3 = tf.zeros([2, 4, 1], 'int32');
    expect(() => m.forward(r3)).toThrow(/^x: expected a tensor of rank 2/);
    const big = tf.fill([1, 4], 10, 'int32');
    expect(() => m.forward(big)).toThrow(/^x: expected token ids in \[0, 10\)/);
    const neg = tf.fill([1, 4], -1, 'int32');
    expect(() => m.forward(neg)).toThrow(/^x: expected token ids/);
    const long = tf.zeros([1, 9], 'int32');
    expect(() => m.forward(long)).toThrow(/^x: .*maxSeqLen 8/);
    tf.dispose([f, r3, big, neg, long]);
  });

  it('mask must be bool [b, n]', () => {
    const x = tf.zeros([2, 4], 'int32');
    const wrongShape = tf.ones([2, 5], 'bool');
    expect(() => m.forward(x, { mask: wrongShape })).toThrow(/^mask: expected shape \[2, 4\]/);
    const wrongType = tf.ones([2, 4], 'float32');
    expect(() => m.forward(x, { mask: wrongType })).toThrow(/^mask: expected dtype bool/);
    tf.dispose([x, wrongShape, wrongType]);
  });

  it('adaptive stacks require a condition of the right size', () => {
    const ada = new Decoder({ ...small, useAdaptiveLayernorm: true, dimCondition: 6 });
    const x = tf.zeros([2, 3, 16]);
    expect(() => ada.forward(x)).toThrow(/^condition: expected a tensor/);
    const bad = tf.zeros([2, 5]);
    expect(() => ada.forward(x, { condition: bad })).toThrow(/^condition: expected shape \[2, 6\]/);
    const plain = new Decoder(small);
    const c = tf.zeros([2, 6]);
    expect(() => plain.forward(x, { condition: c })).toThrow(/^condition: expected none/);
    const out = ada.forward(x, { condition: c }).out;
    expect(out.shape).toEqual([2, 3, 16]);
    tf.dispose([x, bad, c, out]);
    ada.dispose();
    plain.dispose();
  });

  it('layers check x, context and mems', () => {
    const layers = new Decoder(small);
    const x = tf.zeros([1, 3, 5]);
    expect(() => layers.forward(x)).toThrow(/^x: expected last dimension 16/);
    const ok = tf.zeros([1, 3, 16]);
    const ctx = tf.zeros([1, 2, 16]);
    expect(() => layers.forward(ok, { context: ctx })).toThrow(/^context:/);
    expect(() => layers.forward(ok, { mems: [ctx] })).toThrow(/^mems: expected 2 tensors/);
    const cross = new AttentionLayers({ ...small, crossAttend: true });
    expect(() => cross.forward(ok)).toThrow(/^context: expected a tensor/);
    tf.dispose([x, ok, ctx]);
    layers.dispose();
    cross.dispose();
  });

  it('incompatible or unknown options throw naming the option', () => {
    expect(() => new Decoder({ ...small, attnFlash: true, relPosBias: true })).toThrow(/^attnFlash:/);
    expect(() => new Decoder({ ...small, attnFlash: true, dynamicPosBias: true })).toThrow(/^attnFlash:/);
    expect(() => new Encoder({ ...small, attnFlash: true, residualAttn: true })).toThrow(/^attnFlash:/);
    expect(() => new Decoder({ ...small, attnFlash: true, attnPreTalkingHeads: true })).toThrow(
      /^attnFlash:/,
    );
    expect(() => new Decoder({ ...small, attnFlash: true, attnSparseTopk: 2 })).toThrow(/^attnFlash:/);
    expect(() => new Decoder({ ...small, attnKvHeads: 3 })).toThrow(/^attnKvHeads:/);
    expect(() => new AttentionLayers({ ...small, crossAttend: true, crossAttnDimHead: 0 })).toThrow(
      /^crossAttnDimHead:/,
    );
    expect(() => new Encoder({ ...small, preNorm: false, sandwichNorm: true })).toThrow(/^sandwichNorm:/);
    expect(() => new Encoder({ ...small, rotaryXpos: true })).toThrow(/^rotaryXpos:/);
    expect(() => new Encoder({ ...small, useRmsnorm: true, useScalenorm: true })).toThrow(/^useScalenorm:/);
    expect(() => new Encoder({ ...small, shiftTokens: [1, 1] })).toThrow(/^shiftTokens:/);
    expect(() => new Encoder({ ...small, numResidualStreams: 2, gateResidual: true })).toThrow(
      /^numResidualStreams:/,
    );
    expect(() => new Encoder({ ...small, numResidualStreams: 0 })).toThrow(/^numResidualStreams:/);
    expect(() => new Encoder({ ...small, depth: -1 })).toThrow(/^depth:/);
    expect(() => new Decoder({ ...small, causal: true } as never)).toThrow(/^causal:/);
    expect(() => new Encoder({ ...small, bogus: 1 } as never)).toThrow(/^bogus:/);
    expect(() => new Encoder({ ...small, attnBogus: 1 } as never)).toThrow(/^attnBogus:/);
    expect(() => new Encoder({ ...small, ffBogus: 1 } as never)).toThrow(/^ffBogus:/);
    expect(() => new Encoder({ ...small, customLayers: ['a', 'x'], depth: null })).toThrow(/^customLayers:/);
    const layers = new Decoder(small);
    expect(() => new TransformerWrapper({ numTokens: 0, maxSeqLen: 8, attnLayers: layers })).toThrow(
      /^numTokens:/,
    );
    expect(
      () => new TransformerWrapper({ numTokens: 5, maxSeqLen: 8, attnLayers: layers, bogus: 1 } as never),
    ).toThrow(/^bogus:/);
    expect(() => new AutoregressiveWrapper(m, { maskProb: 1 })).toThrow(/^maskProb:/);
    layers.dispose();
  });
});

describe('training', () => {
  it('20 steps of loss, gradients and SGD leak no tensors and lower the loss', () => {
    manualSeed(9);
    const net = new TransformerWrapper({
      numTokens: 12,
      maxSeqLen: 8,
      embDropout: 0.1,
      numMemoryTokens: 2,
      attnLayers: new Decoder({
        ...small,
        rotaryPosEmb: true,
        ffGlu: true,
        layerDropout: 0.1,
        shiftTokens: 1,
        gateResidual: true,
        attnDropout: 0.1,
      }),
    });
    const ar = new AutoregressiveWrapper(net, { maskProb: 0.2 });
    ar.train();
    const x = ids(2, 9, 12, 5);
    const opt = (grads: Record<string, tf.Tensor>) => {
      tf.tidy(() => {
        for (const v of ar.parameters()) {
          const g = grads[v.name];
          if (g) v.assign(tf.sub(v, tf.mul(g, 0.05)));
        }
      });
      tf.dispose(Object.values(grads));
    };
    // warm-up step: lazily created constants are not a leak
    {
      const { value, grads } = tf.variableGrads(() => ar.forward(x));
      value.dispose();
      opt(grads);
    }
    const before = tf.memory().numTensors;
    const losses: number[] = [];
    for (let i = 0; i < 20; i++) {
      const { value, grads } = tf.variableGrads(() => ar.forward(x));
      losses.push(value.dataSync()[0]!);
      value.dispose();
      opt(grads);
    }
    expect(tf.memory().numTensors).toBe(before);
    expect(losses.every(Number.isFinite)).toBe(true);
    expect(losses[19]!).toBeLessThan(losses[0]!);
    x.dispose();
    ar.dispose();
  });

  it('ignoreIndex targets do not count in the loss', () => {
    manualSeed(10);
    const net = new TransformerWrapper({
      numTokens: 12,
      maxSeqLen: 8,
      attnLayers: new Decoder(small),
    }).eval();
    const ar = new AutoregressiveWrapper(net, { ignoreIndex: -1 });
    const x = tf.tensor2d([[1, 2, 3, 4, 5]], [1, 5], 'int32');
    const xi = tf.tensor2d([[1, 2, 3, 4, -1]], [1, 5], 'int32');
    const full = ar.forward(x).dataSync()[0]!;
    const ign = ar.forward(xi).dataSync()[0]!;
    // manual: mean over the first three targets only
    const logits = net.forward(tf.tensor2d([[1, 2, 3, 4]], [1, 4], 'int32'));
    const lp = tf.logSoftmax(logits, -1).arraySync() as number[][][];
    const manual = -(lp[0]![0]![2]! + lp[0]![1]![3]! + lp[0]![2]![4]!) / 3;
    expect(Math.abs(ign - manual)).toBeLessThan(1e-5);
    expect(Math.abs(full - ign)).toBeGreaterThan(0);
    tf.dispose([x, xi, logits]);
    ar.dispose();
  });
});
