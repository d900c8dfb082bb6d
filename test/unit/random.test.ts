import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { Rng } from '../../src/utils/random.js';
import { normalTensor, uniformTensor, XT_RANDOM_FILL } from '../../src/nn/init.js';

// The generator's bulk fills (JavaScript loops, and the backend's native fill where it has one)
// must draw exactly the stream of its one-value methods, and leave the generator where they would.

describe('Rng fills', () => {
  it('fillUniform is n calls of uniform(), and leaves the same state', () => {
    const a = new Rng(42);
    const b = new Rng(42);
    const bulk = a.fillUniform(1001, -0.25, 0.75);
    const one = Float32Array.from({ length: 1001 }, () => b.uniform(-0.25, 0.75));
    expect(Array.from(bulk)).toEqual(Array.from(one));
    expect(a.nextUint32()).toBe(b.nextUint32());
  });

  it('has the native fill exactly on the torch backend', () => {
    expect(tf.getKernel(XT_RANDOM_FILL, tf.getBackend()) !== undefined).toBe(tf.getBackend() === 'torch');
  });

  it('uniformTensor draws the stream of fillUniform and advances the generator as it does', () => {
    const a = new Rng(7);
    const b = new Rng(7);
    const t = uniformTensor(a, [33, 31], -1, 1);
    expect(t.shape).toEqual([33, 31]);
    expect(t.dtype).toBe('float32');
    expect(Array.from(t.dataSync())).toEqual(Array.from(b.fillUniform(33 * 31, -1, 1)));
    expect(a.nextUint32()).toBe(b.nextUint32());
    t.dispose();
  });

  it('normalTensor draws the stream of fillNormal, spare value included', () => {
    const a = new Rng(9);
    const b = new Rng(9);
    a.normal(); // leaves a spare value for the fill to use first
    b.normal();
    const t = normalTensor(a, [1001], 0.5, 2);
    const want = b.fillNormal(1001, 0.5, 2);
    const got = t.dataSync();
    // log, sin and cos of the platform may differ from JavaScript's in a double's last bit; after
    // rounding to float32 that is at most one float32 step
    for (let i = 0; i < want.length; i++)
      expect(Math.abs(got[i]! - want[i]!)).toBeLessThanOrEqual(Math.abs(want[i]!) * 2 ** -23);
    expect(a.normal()).toBe(b.normal());
    expect(a.nextUint32()).toBe(b.nextUint32());
    t.dispose();
  });

  it('rejects a bad shape by name', () => {
    expect(() => uniformTensor(new Rng(1), [2, -1], 0, 1)).toThrow(/shape: expected non-negative integers/);
  });
});
