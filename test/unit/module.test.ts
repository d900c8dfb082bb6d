import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../../src/nn/module.js';

class Lin extends Module {
  weight: tf.Variable;
  bias: tf.Variable;
  constructor(i: number, o: number) {
    super();
    this.weight = this.registerParameter('weight', tf.ones([o, i]));
    this.bias = this.registerParameter('bias', tf.zeros([o]));
  }
}
class Net extends Module {
  layers: ModuleList<Lin>;
  head: Lin;
  constructor() {
    super();
    this.layers = this.registerModule('layers', new ModuleList([new Lin(2, 3), new Lin(3, 3)]));
    this.head = this.registerModule('head', new Lin(3, 1));
    this.registerBuffer('inv_freq', tf.tensor1d([1, 2]));
    this.registerBuffer('cache', tf.zeros([1]), false);
  }
}

describe('Module', () => {
  it('names parameters like a PyTorch state_dict', () => {
    const n = new Net();
    expect(n.namedParameters().map(([k]) => k)).toEqual([
      'layers.0.weight',
      'layers.0.bias',
      'layers.1.weight',
      'layers.1.bias',
      'head.weight',
      'head.bias',
    ]);
    expect(Object.keys(n.stateDict())).toContain('inv_freq');
    expect(Object.keys(n.stateDict())).not.toContain('cache');
    expect(n.numParameters()).toBe(6 + 3 + 9 + 3 + 3 + 1);
    n.dispose();
  });

  it('train/eval propagate', () => {
    const n = new Net();
    n.eval();
    expect(n.layers.at(1).training).toBe(false);
    n.train();
    expect(n.head.training).toBe(true);
    n.dispose();
  });

  it('loads a state dict and lists every problem when strict', () => {
    const a = new Net();
    const b = new Net();
    const sd: Record<string, tf.Tensor> = {};
    for (const [k, v] of Object.entries(a.stateDict())) sd[k] = tf.mul(v, 2);
    b.loadStateDict(sd);
    expect(Array.from(b.head.weight.dataSync())).toEqual([2, 2, 2]);
    const bad = { ...sd, extra: tf.zeros([1]), 'head.bias': tf.zeros([2]) };
    delete (bad as Record<string, tf.Tensor>)['layers.0.bias'];
    expect(() => b.loadStateDict(bad)).toThrow(
      /missing keys: layers\.0\.bias.*unexpected keys: extra.*mis-shaped keys: head\.bias \(expected \[1\], got \[2\]\)/,
    );
    const r = b.loadStateDict(bad, { strict: false });
    expect(r.missing).toEqual(['layers.0.bias']);
    tf.dispose(Object.values(sd));
    a.dispose();
    b.dispose();
  });

  it('reloads its own state dict without copying or leaking', () => {
    const n = new Net();
    const before = tf.memory().numTensors;
    n.loadStateDict(n.stateDict());
    expect(tf.memory().numTensors).toBe(before);
    expect(Array.from(n.head.weight.dataSync())).toEqual([1, 1, 1]);
    n.dispose();
  });
});
