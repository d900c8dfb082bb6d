import { describe, expect, it } from 'vitest';
import { planLayers } from '../../src/layers/plan.js';
import { attentionLayersDefaults, type AttentionLayersOwnOptions } from '../../src/layers/options.js';

// The stack's plan from its options alone (no tensors), against the layer orders of the reference's
// AttentionLayers (x-transformers 2.0.1) worked out by hand from its constructor.

const plan = (o: Partial<AttentionLayersOwnOptions>) =>
  planLayers({ ...attentionLayersDefaults, dim: 8, depth: 2, ...o });
const errorOf = (fn: () => unknown): string => {
  try {
    fn();
  } catch (e) {
    return (e as Error).message;
  }
  return '(no error)';
};

describe('planLayers', () => {
  it('default blocks: attention then feedforward, run in order', () => {
    expect(plan({})).toEqual({
      layerTypes: ['a', 'f', 'a', 'f'],
      executeOrder: [0, 1, 2, 3],
      depth: 2,
      skipFrom: [null, null, null, null],
      shifts: [0, 0, 0, 0],
      layerDropouts: [0, 0, 0, 0],
      numAttnLayers: 2,
    });
  });

  it('cross-attention, cross only and macaron blocks', () => {
    expect(plan({ crossAttend: true }).layerTypes).toEqual(['a', 'c', 'f', 'a', 'c', 'f']);
    expect(plan({ crossAttend: true, onlyCross: true }).layerTypes).toEqual(['c', 'f', 'c', 'f']);
    expect(plan({ macaron: true, depth: 1 }).layerTypes).toEqual(['f', 'a', 'f']);
  });

  it('weight tying: one block run depth times, counted as depth 1', () => {
    const p = plan({ weightTieLayers: true, depth: 3 });
    expect(p.layerTypes).toEqual(['a', 'f']);
    expect(p.executeOrder).toEqual([0, 1, 0, 1, 0, 1]);
    expect(p.depth).toBe(1);
  });

  it('custom layers with their own order; depth counts the layers run', () => {
    const p = plan({ depth: null, customLayers: ['a', 'f', 'f'], layersExecuteOrder: [0, 1, 0, 2] });
    expect(p.layerTypes).toEqual(['a', 'f', 'f']);
    expect(p.executeOrder).toEqual([0, 1, 0, 2]);
    expect(p.depth).toBe(4);
    expect(p.numAttnLayers).toBe(1);
  });

  it('sandwich and parallel (parRatio) orders', () => {
    expect(plan({ depth: 4, sandwichCoef: 2 }).layerTypes).toEqual(['a', 'a', 'a', 'f', 'a', 'f', 'f', 'f']);
    // 8 layers, 8 // 2 = 4 attention layers of width (5 + 5 // 4) // 4 = 1, then feedforwards
    expect(plan({ depth: 4, parRatio: 2 }).layerTypes).toEqual(['a', 'a', 'a', 'a', 'f', 'f', 'f', 'f']);
  });

  it('U-Net skips: the latter half of the blocks take the mirrored block input', () => {
    // depth 4 blocks of 2 layers: 4 // 2 = 2 skip sources (layers 0 and 2), popped by blocks 2 and 3
    expect(plan({ depth: 4, unetSkips: true }).skipFrom).toEqual([null, null, null, null, 2, null, 0, null]);
  });

  it('token shifts and layer dropouts per layer', () => {
    const p = plan({ shiftTokens: [1, 0, 2, 0], layerDropout: 0.1 });
    expect(p.shifts).toEqual([1, 0, 2, 0]);
    expect(p.layerDropouts).toEqual([0.1, 0.1, 0.1, 0.1]);
  });

  it('names the option of a plan that cannot be made', () => {
    expect(errorOf(() => plan({ depth: null }))).toBe(
      'depth: expected a positive integer (or customLayers, parRatio or sandwichCoef), got null',
    );
    expect(errorOf(() => plan({ layersExecuteOrder: [0, 4] }))).toBe(
      'layersExecuteOrder: expected indices in [0, 4), got 4',
    );
    expect(errorOf(() => plan({ weightTieLayers: true, layersExecuteOrder: [0] }))).toBe(
      'layersExecuteOrder: expected none with weightTieLayers, got [0]',
    );
    expect(errorOf(() => plan({ shiftTokens: [1, 0] }))).toBe(
      'shiftTokens: expected 4 values (one per layer), got 2',
    );
    expect(errorOf(() => plan({ depth: 1, unetSkips: true, macaron: true }))).toBe(
      'unetSkips: expected a depth of at least 2 for U-Net skip connections, got depth 1',
    );
    expect(errorOf(() => plan({ customLayers: ['a', 'x'] }))).toBe(
      `customLayers: expected 'a', 'c' or 'f' at index 1, got "x"`,
    );
  });
});
