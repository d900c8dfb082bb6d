import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { AdamW, XT_ADAMW } from '../../src/train/optimizer.js';
import { backendHasKernel, setFusedKernels } from '../../src/nn/fused.js';
import { Rng } from '../../src/utils/random.js';

// The AdamW checks shared by adamw.test.ts and adamw-foreach.test.ts: AdamW (one native update
// over every parameter where the backend has XtAdamW, ordinary ops otherwise) against the update
// rule computed here in double precision.

const LR = 0.05;
const WD = 0.1;
const B1 = 0.9;
const B2 = 0.999;
const EPS = 1e-8;

function referenceSteps(p0: number[], grads: number[][], decay: boolean): number[][] {
  const p = p0.slice();
  const m = p0.map(() => 0);
  const v = p0.map(() => 0);
  const out: number[][] = [];
  grads.forEach((g, s) => {
    const t = s + 1;
    for (let i = 0; i < p.length; i++) {
      m[i] = B1 * m[i]! + (1 - B1) * g[i]!;
      v[i] = B2 * v[i]! + (1 - B2) * g[i]! * g[i]!;
      if (decay) p[i] = p[i]! * (1 - LR * WD);
      const denom = Math.sqrt(v[i]!) / Math.sqrt(1 - B2 ** t) + EPS;
      p[i] = p[i]! - (LR / (1 - B1 ** t)) * (m[i]! / denom);
    }
    out.push(p.slice());
  });
  return out;
}

function close(actual: ArrayLike<number>, expected: number[], atol = 2e-6): void {
  expected.forEach((e, k) => {
    if (!(Math.abs(actual[k]! - e) <= atol)) expect.fail(`[${k}]: expected ${e}, got ${actual[k]}`);
  });
}

export function adamwCases(title: string): void {
  describe(title, () => {
    it('has the native update exactly on the torch backend', () => {
      expect(backendHasKernel(XT_ADAMW)).toBe(tf.getBackend() === 'torch');
    });

    for (const fused of [true, false]) {
      it(`${fused ? 'as the backend kernel where it has one' : 'as ordinary ops'}: follows the rule; tensors taken from a parameter keep their values`, () => {
        const prev = setFusedKernels(fused);
        try {
          const rng = new Rng(11);
          const w0 = Array.from({ length: 6 }, () => rng.normal(0, 1));
          const b0 = Array.from({ length: 3 }, () => rng.normal(0, 1));
          const gw = Array.from({ length: 4 }, () => Array.from({ length: 6 }, () => rng.normal(0, 0.5)));
          const gb = Array.from({ length: 4 }, () => Array.from({ length: 3 }, () => rng.normal(0, 0.5)));
          const w = tf.variable(tf.tensor2d(w0, [2, 3]));
          const b = tf.variable(tf.tensor1d(b0));
          const opt = new AdamW(
            [
              ['layer.weight', w],
              ['layer.bias', b],
            ],
            { learningRate: LR, weightDecay: WD, beta1: B1, beta2: B2, eps: EPS },
          );
          const wantW = referenceSteps(w0, gw, true);
          const wantB = referenceSteps(b0, gb, false);
          const step = (s: number): void => {
            const g = { 'layer.weight': tf.tensor2d(gw[s]!, [2, 3]), 'layer.bias': tf.tensor1d(gb[s]!) };
            opt.apply(g);
            tf.dispose(Object.values(g));
          };
          step(0);
          // a copy of the parameter (the same data in TF.js) taken now must not see the update
          const copy = tf.clone(w);
          const atCopy = Array.from(w.dataSync());
          step(1);
          close(w.dataSync(), wantW[1]!);
          close(b.dataSync(), wantB[1]!);
          expect(Array.from(copy.dataSync())).toEqual(atCopy);
          copy.dispose();
          // nor a view of it (a reshape shares the backend's storage)
          const view = tf.reshape(w, [6]);
          const atView = Array.from(w.dataSync());
          step(2);
          expect(Array.from(view.dataSync())).toEqual(atView);
          view.dispose();
          const before = tf.memory().numTensors;
          step(3);
          expect(tf.memory().numTensors).toBe(before);
          close(w.dataSync(), wantW[3]!);
          close(b.dataSync(), wantB[3]!);
          tf.dispose([w, b]);
          opt.dispose();
        } finally {
          setFusedKernels(prev);
        }
      });
    }
  });
}
